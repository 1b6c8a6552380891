"""Steered generation, compiled generation, extraction scaling and model load times.

Run in .venv-bench (``make bench``: transformers 4.57, beside steering-vectors and
repeng). The default model in fp32 on the CPU; every variant of a comparison runs the same
number of times in interleaved rounds whose order rotates (``bench/common.py: rounds``),
and its figure is its median round. Writes ``bench/results/generation-<date>.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, ROOT, THREADS, Quiet, rounds, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "model-written-evals"
REPEATS = int(os.environ.get("BENCH_ROUNDS", "3"))
LAYER = 10
NEW_TOKENS = 16 if os.environ.get("BENCH_QUICK") else 128


def interleaved(fns: dict[str, Any], repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds."""
    return {name: statistics.median(t) for name, t in rounds(fns, repeats).items()}


def load() -> Any:
    import steerlab

    return steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")


def generation(lm: Any) -> dict[str, Any]:
    import numpy as np
    import repeng
    import steering_vectors as sv

    from steerlab import Sampling, Steering, decode, steer
    from steerlab.core.prompts import encode_prompts, pad_batch
    from steerlab.core.vector import SteeringVector

    model, tok = lm.model, lm.tokenizer
    direction = torch.randn(lm.info.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5

    vec = SteeringVector({LAYER: direction}, lm.identity)
    prompts = PROMPTS
    out: dict[str, Any] = {"new_tokens": NEW_TOKENS}
    for batch in (1, 8):
        ids, mask = encode_prompts(lm.tokenizer, prompts[:batch])
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        greedy = Sampling(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        times: dict[str, float] = {}

        def hf_plain() -> None:
            model.generate(**kwargs)

        def hf_steerlab() -> None:
            with steer(model, vec, multiplier=2.0, policy="after-prompt"):
                model.generate(**kwargs)

        def loop_plain() -> None:
            decode(model, ids, mask, [], greedy, layer_map=lm.layers)

        def loop_transient() -> None:
            decode(
                model,
                ids,
                mask,
                [Steering(vec, 2.0, policy="transient")],
                greedy,
                layer_map=lm.layers,
            )

        sv_vec = sv.SteeringVector(layer_activations={LAYER: direction}, layer_type="decoder_block")

        def hf_sv() -> None:
            with sv_vec.apply(model, multiplier=2.0, min_token_index=0):
                model.generate(**kwargs)

        def hf_repeng() -> None:
            control = repeng.ControlModel(model, [LAYER])
            try:
                control.set_control(
                    repeng.ControlVector(
                        model_type="llama",
                        directions={LAYER: direction.numpy().astype(np.float32)},
                    ),
                    2.0,
                )
                control.generate(**kwargs)
            finally:
                control.unwrap()

        hf_plain()  # warm-up
        variants = {
            "HF generate, unsteered": hf_plain,
            "HF generate + steerlab after-prompt": hf_steerlab,
            "steerlab loop, unsteered": loop_plain,
            "steerlab loop, transient": loop_transient,
            "HF generate + steering-vectors (all positions)": hf_sv,
            "HF generate + repeng ControlModel": hf_repeng,
        }
        # Interleaved (A B C ... B C A ...) so that drift in machine speed hits every variant;
        # batch 1 gets more rounds because its runs are short. bench/overhead.py times
        # steerlab's hooks themselves.
        times.update(interleaved(variants, REPEATS + 1 if batch == 1 else REPEATS))
        tokens = NEW_TOKENS * batch
        out[f"batch {batch}"] = {name: tokens / t for name, t in times.items()}
        print("batch", batch, {k: round(tokens / v, 1) for k, v in times.items()}, flush=True)
    # generation time vs number of steered layers (steerlab loop, batch 1, after-prompt)
    ids, mask = pad_batch([tok(prompts[0])["input_ids"]], tok.pad_token_id)
    greedy = Sampling(max_new_tokens=32, stop_at_eos=False)
    runs = {}
    for n in (0, 1, 5, lm.info.num_layers):
        layers = list(range(n))
        steering = (
            []
            if n == 0
            else [Steering(SteeringVector({k: direction for k in layers}, lm.identity), 1.0)]
        )
        runs[str(n)] = lambda s=steering: decode(model, ids, mask, s, greedy, layer_map=lm.layers)
    per_layers = {n: 32 / t for n, t in interleaved(runs, REPEATS + 2).items()}
    out["tokens_per_s_by_steered_layers"] = per_layers
    print("layers", per_layers, flush=True)
    return out


def compiled(lm: Any) -> dict[str, Any]:
    """Compiled static-cache generate (the CUDA default, forced on the CPU), unsteered vs
    steered after-prompt, batch 1; compile time is excluded (one warm-up call each)."""
    from transformers import CompileConfig

    from steerlab import steer
    from steerlab.core.prompts import encode_prompts
    from steerlab.core.vector import SteeringVector

    config = CompileConfig()
    config._compile_all_devices = True
    tokens = 48
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS[:1])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,
        cache_implementation="static",
        compile_config=config,
    )
    direction = torch.randn(lm.info.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    vec = SteeringVector({LAYER: direction}, lm.identity)
    start = time.perf_counter()
    plain_out = lm.model.generate(**kwargs)
    compile_plain = time.perf_counter() - start
    with steer(lm.model, vec, multiplier=2.0):
        start = time.perf_counter()
        steered_out = lm.model.generate(**kwargs)
        compile_steered = time.perf_counter() - start
    from steerlab import Sampling, Steering, decode

    exact = decode(
        lm.model,
        ids,
        mask,
        [Steering(vec, 2.0)],
        Sampling(tokens, stop_at_eos=False),
        layer_map=lm.layers,
    ).tokens
    agree = float((steered_out[:, ids.shape[1] :] == exact).float().mean())

    def plain() -> None:
        lm.model.generate(**kwargs)

    def steered() -> None:
        with steer(lm.model, vec, multiplier=2.0):
            lm.model.generate(**kwargs)

    times = interleaved(
        {"compiled static, unsteered": plain, "compiled static + steerlab after-prompt": steered},
        REPEATS + 1,
    )
    out = {name: tokens / t for name, t in times.items()}
    out.update(
        first_call_unsteered_s=compile_plain,
        first_call_steered_s=compile_steered,
        agreement_with_decode=agree,
        unsteered_changed=bool(not torch.equal(plain_out, steered_out)),
    )
    print("compiled", out, flush=True)
    return out


SCALING_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
import steerlab
from steerlab.core.dataset import load_dataset, Dataset
from steerlab.hf.extraction import extract
from pathlib import Path
n = int(sys.argv[1])
lm = steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")
# The same 200 pairs cycled: every size has the same length distribution, so time and
# memory show the dependence on N alone (peak memory follows the longest batch, not N).
pool = list(load_dataset(Path(sys.argv[3]) / "advanced-ai-risk" / "corrigible-neutral-HHH.jsonl").pairs)[:200]
data = Dataset("ab", pairs=tuple((pool * (n // len(pool) + 1))[:n]))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t = time.perf_counter(); extract(lm, data, [LAYER_PLACEHOLDER], batch_size=64); t = time.perf_counter() - t
print(json.dumps({"pairs": n, "seconds": t, "peak_rss_mb": status("VmHWM:"), "rss_before_mb": before}))
""".replace("LAYER_PLACEHOLDER", str(LAYER))


def scaling() -> list[dict[str, Any]]:
    rows = []
    sizes = (20, 40) if os.environ.get("BENCH_QUICK") else (100, 1000, 5000)
    for n in sizes:
        result = subprocess.run(
            [sys.executable, "-c", SCALING_CHILD, str(n), str(THREADS), str(SHARED)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


LOAD_CHILD = (
    "import time; start = time.perf_counter()\n"
    "import steerlab, transformers, transformers.models.auto\n"
    "t = time.perf_counter(); steerlab.load_model('smollm2-135m'); end = time.perf_counter()\n"
    "print(end - t, end - start)"
)


def model_load() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "STEERLAB_CACHE": cache}

        def once() -> list[float]:
            out = subprocess.run(
                [sys.executable, "-c", LOAD_CHILD],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            return [float(x) for x in out.stdout.split()[-2:]]

        cold = once()
        warm = [once() for _ in range(2)]
    result = {
        "cold_s": cold[0],
        "warm_s": statistics.median(w[0] for w in warm),
        "warm_with_imports_s": statistics.median(w[1] for w in warm),
    }
    print(result, flush=True)
    return result


def main() -> None:
    torch.set_num_threads(THREADS)
    with Quiet("generation") as quiet:
        lm = load()
        results: dict[str, Any] = {"rounds": REPEATS}
        results["generation"] = generation(lm)
        results["compiled"] = compiled(lm)
        results["scaling"] = scaling()
        results["model_load"] = model_load()
    write_result("generation", results, quiet)


if __name__ == "__main__":
    main()
