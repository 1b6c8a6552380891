"""The cost of steering itself: time spent inside steerlab's hooks per generated token.

End-to-end tokens/s on this machine drift by about ±10% between runs, more than the cost
being measured; this times the hooks directly during steered decoding (batch 1 and 8,
128 tokens, 1 and all 30 layers) and reports it against the decode time.
Writes ``bench/results/overhead-<date>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, THREADS, Quiet, write_result  # noqa: E402

from steerlab import Sampling, Steering, decode, load_model
from steerlab.core.prompts import encode_prompts
from steerlab.core.vector import SteeringVector
from steerlab.hf.hooks import Steerer


def main() -> None:
    torch.set_num_threads(THREADS)
    quiet = Quiet("overhead").__enter__()
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    spent = [0.0]
    original_pre, original_make = Steerer._pre_hook, Steerer._make_hook

    def timed_pre(self: Steerer, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_pre(self, *args)
        finally:
            spent[0] += time.perf_counter() - start

    def timed_make(self: Steerer, layer: int) -> Any:
        hook = original_make(self, layer)

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args)
            finally:
                spent[0] += time.perf_counter() - start

        return timed

    Steerer._pre_hook = timed_pre  # type: ignore[method-assign]
    Steerer._make_hook = timed_make  # type: ignore[method-assign]
    prompts = PROMPTS
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids, mask = encode_prompts(lm.tokenizer, prompts[:batch])
        for n_layers in (1, lm.info.num_layers):
            layers = [10] if n_layers == 1 else list(range(n_layers))
            vec = SteeringVector(
                {k: torch.randn(lm.info.hidden_size, generator=gen) * 0.5 for k in layers},
                lm.identity,
            )
            spent[0] = 0.0
            start = time.perf_counter()
            decode(
                lm.model,
                ids,
                mask,
                [Steering(vec, 2.0)],
                Sampling(128, stop_at_eos=False),
                layer_map=lm.layers,
            )
            total = time.perf_counter() - start
            rows.append(
                {
                    "batch": batch,
                    "layers": n_layers,
                    "decode_s": total,
                    "hook_s": spent[0],
                    "hook_ms_per_token": 1000 * spent[0] / 128,
                    "fraction": spent[0] / total,
                }
            )
            print(rows[-1], flush=True)
    quiet.__exit__()
    write_result("overhead", {"tokens": 128, "rows": rows}, quiet)


if __name__ == "__main__":
    main()
