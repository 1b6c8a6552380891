"""The GPU benchmark: one prepared script for a lent GPU machine (no downloads, no installs).

Run from the repository root on the machine with only PyTorch and transformers:

    PYTHONPATH=src python bench/gpu.py --out "$OUT"            # ~1B Llama-shaped, bf16
    PYTHONPATH=src python bench/gpu.py --tiny --out /tmp/gpu   # a smoke test, CPU or GPU

It builds a random-initialised Llama-shaped model from a config, then measures, side by
side in one process:

1. decoding tokens/s, batch 1 and 32: eager ``generate`` and compiled static-cache
   ``generate`` (transformers' CUDA default), unsteered vs steered (after-prompt at one
   layer and at all layers), and steerlab's loop unsteered vs ``transient``;
2. exactness: unsteered static-cache generation first, then steered, for after-prompt, all
   and prompt, against steerlab's exact ``decode`` (share of equal tokens);
3. extraction pairs/s at equal batch size against steering-vectors when its wheel is
   importable (``--peer-path`` adds a folder to ``sys.path``), with the vectors' cosine.

It writes ``gpu.json`` and ``gpu.md`` (a markdown table for BENCHMARKS.md) and stops
starting new sections once ``--budget`` seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def build(tiny: bool, device: str) -> Any:
    """A random Llama-shaped model with the test suite's character tokenizer."""
    import tiny as tiny_models
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steerlab.hf.model import describe

    if tiny:
        shape = dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:  # Llama-3.2-1B-shaped (a smaller vocabulary: the tokenizer is synthetic)
        shape = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    config = LlamaConfig(
        vocab_size=32_000,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # fixed-length runs
    model.generation_config.pad_token_id = 0
    return describe(
        model, tiny_models.tokenizer(), name="random-llama-1b" if not tiny else "random-llama-tiny"
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def prompts(lm: Any, batch: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    from steerlab.core.prompts import pad_batch

    gen = torch.Generator().manual_seed(batch)
    seqs = [torch.randint(4, 90, (length - (i % 5),), generator=gen).tolist() for i in range(batch)]
    ids, mask = pad_batch(seqs, 0)
    return ids.to(lm.device), mask.to(lm.device)


def decoding(
    lm: Any, device: str, tokens: int, batches: list[int], deadline: float
) -> dict[str, Any]:
    from transformers import CompileConfig

    from steerlab import Sampling, Steering, SteeringVector, decode

    d, n_layers = lm.info.hidden_size, lm.info.num_layers
    gen = torch.Generator().manual_seed(0)
    one = SteeringVector({n_layers // 2: torch.randn(d, generator=gen) * 0.05}, lm.identity)
    every = SteeringVector(
        {k: torch.randn(d, generator=gen) * 0.05 for k in range(n_layers)}, lm.identity
    )
    config = CompileConfig()
    config._compile_all_devices = True  # the CUDA default, also on a CPU smoke test
    results: dict[str, Any] = {}
    for batch in batches:
        if time.monotonic() > deadline:
            results[f"batch {batch}"] = "skipped: time budget"
            continue
        ids, mask = prompts(lm, batch)
        base = dict(
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
        static = dict(base, cache_implementation="static", compile_config=config)
        greedy = Sampling(tokens, stop_at_eos=False)
        runs = {
            "eager, unsteered": lambda: lm.model.generate(ids, **base),
            "eager, after-prompt 1 layer": lambda: _steered(lm, one, ids, base),
            "eager, after-prompt all layers": lambda: _steered(lm, every, ids, base),
            "compiled static, unsteered": lambda: lm.model.generate(ids, **static),
            "compiled static, after-prompt 1 layer": lambda: _steered(lm, one, ids, static),
            "compiled static, after-prompt all layers": lambda: _steered(lm, every, ids, static),
            "steerlab loop, unsteered": lambda: decode(
                lm.model, ids, mask, [], greedy, layer_map=lm.layers
            ),
            "steerlab loop, transient 1 layer": lambda: decode(
                lm.model,
                ids,
                mask,
                [Steering(one, 1.0, policy="transient")],
                greedy,
                layer_map=lm.layers,
            ),
        }
        row: dict[str, float] = {}
        for name, fn in runs.items():
            if time.monotonic() > deadline:
                row[name] = float("nan")
                continue
            fn()  # warm-up (and the compile, for the static-cache runs)
            row[name] = batch * tokens / timed(fn, device)
            print(f"batch {batch} {name}: {row[name]:.1f} tok/s", flush=True)
        results[f"batch {batch}"] = row
    return results


def _steered(lm: Any, vector: Any, ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    from steerlab import steer

    with steer(lm.model, vector, multiplier=4.0, policy="after-prompt"):
        return lm.model.generate(ids, **kwargs)


def exactness(lm: Any, tokens: int) -> dict[str, Any]:
    """Unsteered static-cache generation first, then steered; agreement with decode()."""
    from transformers import CompileConfig

    from steerlab import Sampling, Steering, SteeringVector, decode, steer

    config = CompileConfig()
    config._compile_all_devices = True
    ids, mask = prompts(lm, 4)
    d, n_layers = lm.info.hidden_size, lm.info.num_layers
    vec = SteeringVector(
        {
            k: torch.randn(d, generator=torch.Generator().manual_seed(k)) * 0.05
            for k in range(1, n_layers, 3)
        },
        lm.identity,
    )
    base = dict(attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    static = dict(base, cache_implementation="static", compile_config=config)
    out: dict[str, Any] = {}
    lm.model.generate(ids, **static)  # unsteered first, as a side-by-side comparison does
    for policy in ("after-prompt", "all", "prompt"):
        s = Steering(vec, 4.0, policy=policy)
        want = decode(
            lm.model, ids, mask, [s], Sampling(tokens, stop_at_eos=False), layer_map=lm.layers
        ).tokens
        row = {}
        for name, kwargs in (("eager", base), ("compiled static", static)):
            with steer(lm.model, s):
                got = lm.model.generate(ids, **kwargs)[:, ids.shape[1] :]
            row[name] = float((got == want).float().mean())
        out[policy] = row
        print("exactness", policy, row, flush=True)
    plain = decode(
        lm.model, ids, mask, [], Sampling(tokens, stop_at_eos=False), layer_map=lm.layers
    ).tokens
    again = lm.model.generate(ids, **static)[:, ids.shape[1] :]
    out["unsteered after steering (compiled static)"] = float((again == plain).float().mean())
    return out


def extraction(lm: Any, pairs: int, batches: list[int], deadline: float) -> dict[str, Any]:
    from steerlab import extract
    from steerlab.core.dataset import Dataset, Pair

    words = ["good", "bad", "calm", "angry", "kind", "cruel", "bright", "dark"]
    data = Dataset(
        "pairs",
        pairs=tuple(
            Pair(
                f"statement {i}: the day was",
                f" {words[i % 4 * 2]} and fine",
                f" {words[i % 4 * 2 + 1]} and poor",
                i + 1,
            )
            for i in range(pairs)
        ),
    )
    out: dict[str, Any] = {"pairs": pairs}
    try:
        import steering_vectors as sv
    except ImportError:
        sv = None
        out["steering-vectors"] = "not importable: pass --peer-path to its unpacked wheel"
    layers = list(range(lm.info.num_layers))
    for batch in batches:
        if time.monotonic() > deadline:
            out[f"batch {batch}"] = "skipped: time budget"
            continue
        row: dict[str, Any] = {}

        def ours() -> Any:
            return extract(lm, data, layers, read_position="last", batch_size=batch, chat=False)

        ours()
        row["steerlab pairs/s"] = pairs / timed(ours, lm.device.type, 2)
        if sv is not None:
            samples = [(p.prompt + p.positive, p.prompt + p.negative) for p in data.pairs]

            def peer() -> Any:
                return sv.train_steering_vector(
                    lm.model,
                    lm.tokenizer,
                    samples,
                    layers=layers,
                    read_token_index=-1,
                    batch_size=batch,
                    show_progress=False,
                )

            peer()
            row["steering-vectors pairs/s"] = pairs / timed(peer, lm.device.type, 2)
            mine, theirs = ours(), peer()
            row["min cosine"] = min(
                float(
                    torch.nn.functional.cosine_similarity(
                        mine.directions[k], theirs.layer_activations[k].float().cpu(), dim=0
                    )
                )
                for k in layers
            )
            row["steerlab / peer"] = row["steerlab pairs/s"] / row["steering-vectors pairs/s"]
        out[f"batch {batch}"] = row
        print("extraction", batch, row, flush=True)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"GPU run: {results['device']}, {results['model']}, torch {results['torch']}, "
        f"transformers {results['transformers']}, {results['date']}.",
        "",
    ]
    for key, row in results["decoding"].items():
        if not isinstance(row, dict):
            lines += [f"- {key}: {row}", ""]
            continue
        lines += [
            f"**decoding, {key}** (tokens/s)",
            "",
            "| run | tokens/s | vs unsteered (same path) |",
            "|---|---|---|",
        ]
        for name, value in row.items():
            base = row[
                next(k for k in row if k.startswith(name.split(",")[0]) and k.endswith("unsteered"))
            ]
            lines.append(f"| {name} | {value:.1f} | {value / base:.3f} |")
        lines.append("")
    lines += [
        "**exactness** (share of tokens equal to steerlab's exact decode)",
        "",
        "| policy | eager | compiled static |",
        "|---|---|---|",
    ]
    for policy, row in results["exactness"].items():
        if isinstance(row, dict):
            lines.append(
                f"| {policy} | {100 * row['eager']:.0f}% | {100 * row['compiled static']:.0f}% |"
            )
        else:
            lines.append(f"| {policy} | | {100 * row:.0f}% |")
    lines.append("")
    ext = results.get("extraction", {})
    for key, row in ext.items():
        if isinstance(row, dict):
            cells = ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
            lines.append(f"- extraction {key}: {cells}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results" / "gpu"))
    )
    parser.add_argument("--tiny", action="store_true", help="a small model: a smoke test")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds before sections are skipped"
    )
    parser.add_argument("--peer-path", default=None, help="a folder holding steering_vectors")
    args = parser.parse_args()
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    import transformers

    deadline = time.monotonic() + args.budget
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = build(args.tiny, device)
    tokens = 16 if args.tiny else 64
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": lm.info.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results["exactness"] = exactness(lm, 12 if args.tiny else 24)
    results["decoding"] = decoding(
        lm, device, tokens, [1, 32] if not args.tiny else [1, 4], deadline
    )
    results["extraction"] = extraction(
        lm, 64 if args.tiny else 512, [32, 128] if not args.tiny else [8], deadline
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    (out / "gpu.md").write_text(markdown(results))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
