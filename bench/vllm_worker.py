"""One vLLM engine for bench/vllm_bench.py, driven over stdin/stdout.

Usage (by the driver only): ``python bench/vllm_worker.py '{"eager": false}'`` with the
environment choosing the plugin (``STEERLAB_VECTORS``, or ``VLLM_PLUGINS=""`` for none).
It loads the engine, warms every batch size and variant up, prints ``READY``, then answers
each line ``{"batch": B, "variant": NAME}`` with the seconds one ``generate`` took (and
``{"share": ...}`` requests with the share of that time spent in steerlab's per-step host
code before each forward). The engine is in-process and idle between commands, so an idle
worker costs nothing while another runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

TOKENS = int(os.environ.get("BENCH_VLLM_TOKENS", "32"))


def main() -> None:
    options = json.loads(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # five engines share 24 GiB
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from vllm import LLM, SamplingParams, TokensPrompt

    import steerlab.vllm

    llm = LLM(
        model=str(steerlab.vllm.model_dir()),
        dtype="float32",
        enforce_eager=bool(options.get("eager")),
        max_model_len=512,
        max_num_seqs=32,
        enable_prefix_caching=False,
        seed=0,
    )
    prompts: list[list[int]] = options["prompts"]
    variants: dict[str, list[dict[str, Any]]] = options["variants"]

    def sampling(entries: list[dict[str, Any]], tokens: int) -> Any:
        return SamplingParams(
            max_tokens=tokens,
            temperature=0,
            ignore_eos=True,
            extra_args=steerlab.vllm.extra_args(entries) if entries else None,
        )

    params = {name: sampling(entries, TOKENS) for name, entries in variants.items()}
    warm = {name: sampling(entries, 2) for name, entries in variants.items()}

    def run(batch: int, variant: str) -> float:
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]]
        # Untimed: one short call first, so this engine's weights are back in the CPU's cache
        # after another engine's turn (a lone engine, as deployed, always finds them there).
        llm.generate(inputs, warm[variant], use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(inputs, params[variant], use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == TOKENS for o in outs)
        return elapsed

    for batch in options["batches"]:
        for variant in variants:
            run(batch, variant)  # warm-up (and, compiled, any shape it has not seen)
    print("READY", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "share" in command:
            print(json.dumps(_share(run, command["batch"], command["share"])), flush=True)
            continue
        print(json.dumps(run(command["batch"], command["variant"])), flush=True)


def _share(run: Any, batch: int, variant: str) -> float:
    """The share of one generate call spent in steerlab's host code before each forward
    (each step's requests, then its coefficients)."""
    from steerlab.vllm import plugin

    spent = [0.0]
    original = plugin._before_forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    plugin._before_forward = timed
    try:
        total = run(batch, variant)
    finally:
        plugin._before_forward = original
    return spent[0] / total


if __name__ == "__main__":
    main()
