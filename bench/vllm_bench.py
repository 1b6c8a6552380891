"""vLLM (CPU build) with steerlab's plugin beside steerlab's Hugging Face engine, in one run.

Run by `make bench` in .venv-vllm (it has vLLM, transformers 5.19 and steerlab). Default
model, fp32, greedy, fixed length; unsteered vs steered (one layer; all layers), batch 1, 8
and 32, in interleaved rounds (the best round of each, and the median over rounds of the
unsteered/steered time ratio within a round). Writes bench/results/vllm.json, which
bench/report.py adds to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENS = int(os.environ.get("BENCH_VLLM_TOKENS", "32"))
BATCHES = (1, 8, 32)
LAYER = 10
ROUNDS = int(os.environ.get("BENCH_VLLM_ROUNDS", "9"))
HF_ROUNDS = 3


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    import steerlab
    from steerlab import Sampling, Steering, SteeringVector, decode, save_vector
    from steerlab.core.prompts import encode_prompts, prompt_ids

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lm = steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")
    d, n_layers = lm.info.hidden_size, lm.info.num_layers
    gen = torch.Generator().manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-vectors-"))
    one = SteeringVector({LAYER: torch.randn(d, generator=gen) * 0.5}, lm.identity)
    every = SteeringVector(
        {k: torch.randn(d, generator=gen) * 0.1 for k in range(n_layers)}, lm.identity
    )
    save_vector(one, folder / "one.safetensors")
    save_vector(every, folder / "every.safetensors")
    os.environ["STEERLAB_VECTORS"] = str(folder)
    from vllm import LLM, SamplingParams, TokensPrompt

    import steerlab.vllm

    llm = LLM(
        model=str(steerlab.vllm.model_dir()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=32,
        enable_prefix_caching=False,
        seed=0,
    )
    texts = [f"Tell me fact number {i} about the sea." for i in range(32)]
    ids = [prompt_ids(lm.tokenizer, t) for t in texts]
    variants: dict[str, list[dict[str, Any]]] = {
        "unsteered": [],
        "steered, 1 layer": [{"vector": "one", "multiplier": 2.0, "layers": [LAYER]}],
        f"steered, all {n_layers} layers": [{"vector": "every", "multiplier": 2.0}],
    }
    results: dict[str, Any] = {"tokens": TOKENS, "rounds": ROUNDS, "vllm": {}, "hf": {}}
    for batch in BATCHES:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in ids[:batch]]
        params = {
            name: SamplingParams(
                max_tokens=TOKENS,
                temperature=0,
                ignore_eos=True,
                extra_args=steerlab.vllm.extra_args(entries) if entries else None,
            )
            for name, entries in variants.items()
        }
        for name in variants:
            llm.generate(prompts, params[name], use_tqdm=False)  # warm-up
        # Interleaved rounds (each round runs every variant, in a rotating order), so that
        # the machine's drift over a run hits all variants alike; best round per variant.
        best_v = dict.fromkeys(variants, float("inf"))
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                llm.generate(prompts, params[name], use_tqdm=False)
                rounds[name].append(time.perf_counter() - start)
                best_v[name] = min(best_v[name], rounds[name][-1])
        # the median over rounds of (unsteered time / steered time) in the same round
        results.setdefault("paired", {})[str(batch)] = {
            name: statistics.median(
                u / x for u, x in zip(rounds["unsteered"], rounds[name], strict=True)
            )
            for name in names
        }
        # steerlab's Hugging Face engine on the same prompts and steering, interleaved too
        steers = {
            name: []
            if not entries
            else [
                Steering(
                    one if entries[0]["vector"] == "one" else every,
                    2.0,
                    tuple(entries[0].get("layers") or []) or None,
                )
            ]
            for name, entries in variants.items()
        }
        pids, mask = encode_prompts(lm.tokenizer, texts[:batch])
        greedy = Sampling(TOKENS, stop_at_eos=False)
        best_h = dict.fromkeys(variants, float("inf"))
        for r in range(HF_ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                decode(lm.model, pids, mask, steers[name], greedy, layer_map=lm.layers)
                best_h[name] = min(best_h[name], time.perf_counter() - start)
        row_v = {name: batch * TOKENS / best_v[name] for name in variants}
        row_h = {name: batch * TOKENS / best_h[name] for name in variants}
        for name in variants:
            print(
                f"batch {batch} {name}: vLLM {row_v[name]:.1f} tok/s "
                f"({row_v[name] / row_v['unsteered']:.3f}, paired median "
                f"{results['paired'][str(batch)][name]:.3f}), HF {row_h[name]:.1f} tok/s",
                flush=True,
            )
        results["vllm"][str(batch)] = row_v
        results["hf"][str(batch)] = row_h
        results.setdefault("plugin_share", {})[str(batch)] = {
            name: _plugin_share(llm, prompts, params[name]) for name in names
        }
        print("share of time in the plugin:", results["plugin_share"][str(batch)], flush=True)
    import transformers
    import vllm

    results["versions"] = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm.json").write_text(json.dumps(results, indent=2))
    print("wrote", out / "vllm.json")


def _plugin_share(llm: Any, prompts: Any, params: Any) -> float:
    """The share of one generate call spent in steerlab's plugin code (building each step's
    plan and the per-layer hooks), which machine drift does not blur as it blurs tokens/s."""
    from steerlab.vllm import plugin

    spent = [0.0]

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    of, hook = plugin._Step.of, plugin._Step._hook
    plugin._Step.of = classmethod(timed(of.__func__))  # type: ignore[method-assign]
    plugin._Step._hook = lambda self, layer: timed(hook(self, layer))  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - start
    finally:
        plugin._Step.of, plugin._Step._hook = of, hook  # type: ignore[method-assign]
    return spent[0] / total


if __name__ == "__main__":
    main()
