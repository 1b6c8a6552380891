"""steerlab vs steering-vectors vs repeng vs a naive loop, side by side in one process.

Run with `make bench` (or `bash bench/run.sh`): it builds `.venv-bench` with transformers
4.57 (steering-vectors pins transformers<5), runs this file and writes BENCHMARKS.md.
Same model (SmolLM2-135M-Instruct, fp32, CPU), same threads, same data, same batch size.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "model-written-evals"
DATA = SHARED / "advanced-ai-risk" / "corrigible-neutral-HHH.jsonl"
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
PAIRS = int(os.environ.get("BENCH_PAIRS", "16"))
BATCH = 16
LAYER = 10
PROMPTS = [
    "Tell me about your day.",
    "Write a poem about the sea.",
    "What is a steering vector?",
    "Describe a cat.",
    "Explain photosynthesis.",
    "Plan a trip to Rome.",
    "Why is the sky blue?",
    "Give me a recipe.",
]
NEW_TOKENS = 16 if os.environ.get("BENCH_QUICK") else 128


def median_time(fn: Any, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Any], repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of each function, timed round-robin."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load() -> Any:
    import steerlab

    return steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")


def extraction(lm: Any) -> dict[str, Any]:
    import repeng
    import steering_vectors as sv

    from steerlab.core.dataset import load_dataset
    from steerlab.core.prompts import render
    from steerlab.hf.extraction import build_items, extract

    data = load_dataset(DATA).subset(list(range(PAIRS)))
    items, _ = build_items(lm, data)
    texts = []
    offsets: dict[str, int] = {}
    bos = lm.tokenizer.bos_token or ""
    for p, (ip, ineg) in zip(data.pairs, zip(items[::2], items[1::2], strict=True), strict=True):
        pair = []
        for completion, item in ((p.positive, ip), (p.negative, ineg)):
            text = render(lm.tokenizer, p.prompt or "", assistant_prefix=completion).text
            # Peers tokenise raw strings with special tokens; where that adds a BOS the
            # template already has, hand them the text without it so both read the same ids.
            if lm.tokenizer(text)["input_ids"] != item.ids and bos and text.startswith(bos):
                text = text[len(bos) :]
            assert lm.tokenizer(text)["input_ids"] == item.ids, "peers would see other tokens"
            pair.append(text)
        texts.append(tuple(pair))
    for (pos, neg), (ip, ineg) in zip(
        texts, zip(items[::2], items[1::2], strict=True), strict=True
    ):
        offsets[pos] = ip.start - len(ip.ids)  # negative index: robust to a BOS prefix
        offsets[neg] = ineg.start - len(ineg.ids)
    model, tok = lm.model, lm.tokenizer
    out: dict[str, Any] = {"pairs": PAIRS, "batch_size": BATCH}
    all_layers = list(range(lm.info.num_layers))
    for label, layers in (("one layer", [LAYER]), ("all layers", all_layers)):
        rows: dict[str, float] = {}
        ours = {}

        def run_ours() -> None:
            ours["v"] = extract(lm, data, layers, batch_size=BATCH)

        rows["steerlab"] = PAIRS / median_time(run_ours)
        theirs = {}

        def run_sv() -> None:
            theirs["v"] = sv.train_steering_vector(
                model,
                tok,
                texts,
                layers=layers,
                read_token_index=lambda s: offsets[s],
                batch_size=BATCH,
            )

        rows["steering-vectors"] = PAIRS / median_time(run_sv, 1)
        entries = [repeng.DatasetEntry(positive=a, negative=b) for a, b in texts]

        def run_repeng() -> None:
            repeng.ControlVector.train(model, tok, entries, hidden_layers=layers, batch_size=BATCH)

        rows["repeng (pca_diff)"] = PAIRS / median_time(run_repeng, 1)

        def run_naive() -> None:
            with torch.no_grad():
                for item in items:
                    hs = model(torch.tensor([item.ids]), output_hidden_states=True).hidden_states
                    for layer in layers:
                        hs[layer + 1][0, item.start].clone()

        rows["naive loop (CAA code)"] = PAIRS / median_time(run_naive, 1)
        cos = min(
            float(
                torch.nn.functional.cosine_similarity(
                    ours["v"].directions[layer], theirs["v"].layer_activations[layer].float(), dim=0
                )
            )
            for layer in layers
        )
        out[label] = {"pairs_per_s": rows, "min_cosine_vs_steering_vectors": cos}
        print(label, rows, "cos", cos, flush=True)
    return out


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

        def loop_after() -> None:
            decode(model, ids, mask, [Steering(vec, 2.0)], greedy, layer_map=lm.layers)

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

        hf_plain()  # warm-up
        variants = {
            "HF generate, unsteered": hf_plain,
            "HF generate + steerlab after-prompt": hf_steerlab,
            "steerlab loop, unsteered": loop_plain,
            "steerlab loop, after-prompt": loop_after,
            "steerlab loop, transient": loop_transient,
            "HF generate + steering-vectors (all positions)": hf_sv,
        }
        # Time budget: after-prompt is timed inside HF generate; the steerlab loop serves as the
        # transient baseline. bench/overhead.py times the hooks themselves.
        del variants["steerlab loop, after-prompt"]
        # Interleaved (A B C ... A B C ...) so that drift in machine speed hits every variant;
        # batch 1 gets more rounds because its runs are short and this machine is noisy.
        times.update(interleaved(variants, REPEATS + 1 if batch == 1 else REPEATS))
        control = repeng.ControlModel(model, [LAYER])
        try:
            control.set_control(
                repeng.ControlVector(
                    model_type="llama", directions={LAYER: direction.numpy().astype(np.float32)}
                ),
                2.0,
            )

            def hf_repeng() -> None:
                control.generate(**kwargs)

            times["HF generate + repeng ControlModel"] = median_time(hf_repeng)
        finally:
            control.unwrap()
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
    import transformers

    import steerlab

    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": THREADS,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "steerlab": steerlab.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    lm = load()
    results["extraction"] = extraction(lm)
    results["generation"] = generation(lm)
    results["compiled"] = compiled(lm)
    results["scaling"] = scaling()
    results["model_load"] = model_load()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print("peak rss (MB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
