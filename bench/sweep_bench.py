"""A sweep on the Hugging Face engine and on vLLM, in one run (issue #25).

Run by `make bench` in .venv-vllm (it has vLLM, and steerlab with the eval extra). The
shipped sentiment vector at layers 6,9,12,15,18 x multipliers -8,-4,-2,0,2,4,8 (35 cells, each
layer's multiplier 0 included), the 32 shipped neutral prompts, 40 greedy tokens, the VADER judge, KL and
perplexity under the unsteered model for every cell. The vector is extracted once; each
engine then scores every cell (``run_sweep`` with the vector already in its folder): the
Hugging Face engine in padded batches of 192 rows sharing each prompt's prefill, vLLM (its
default compiled mode, 192 rows at once, as `steerlab sweep --engine vllm` starts it:
32-token KV blocks and, on this small CPU machine, its one worker on both cores) with an
unsteered twin per steered row for KL. The two sweeps run one after the other in this process; vLLM's start (and compile) is
timed on its own. Writes ``bench/results/sweep-<date>.json``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, Quiet, write_result  # noqa: E402

LAYERS = (6, 9, 12, 15, 18)
MULTIPLIERS = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
TOKENS = int(os.environ.get("BENCH_SWEEP_TOKENS", "40"))
PROMPTS = int(os.environ.get("BENCH_SWEEP_PROMPTS", "32"))


def main() -> None:
    import torch

    import steerlab
    from steerlab.core.dataset import load_dataset
    from steerlab.core.files import sentiment_dataset_path
    from steerlab.evaluation.judges import sentiment
    from steerlab.evaluation.sweep import SweepConfig, neutral_prompts, run_sweep
    from steerlab.formats import save_vector
    from steerlab.vllm.engine import VllmEngine

    torch.set_num_threads(THREADS)
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    lm = steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")
    data = load_dataset(sentiment_dataset_path())
    config = SweepConfig(
        layers=LAYERS,
        multipliers=MULTIPLIERS,
        max_new_tokens=TOKENS,
        prompts=tuple(neutral_prompts()[:PROMPTS]),
    )
    judge = sentiment()
    with Quiet("sweep") as quiet:
        start = time.perf_counter()
        vector = steerlab.extract(lm, data.subset(list(range(210))), list(LAYERS))
        extract_s = time.perf_counter() - start
        for name in ("hf", "vllm"):
            (root / name).mkdir()
            save_vector(vector, root / name / "vector.safetensors")
        start = time.perf_counter()
        on_hf = run_sweep(lm, data, config, root / "hf", judge=judge)
        hf_s = time.perf_counter() - start
        start = time.perf_counter()
        # as `steerlab sweep --engine vllm` starts it: --batch-rows rows at once
        engine = VllmEngine(
            "smollm2-135m", root / "vllm", max_model_len=512, max_num_seqs=config.batch_rows
        )
        start_s = time.perf_counter() - start
        start = time.perf_counter()
        on_vllm = run_sweep(engine, data, config, root / "vllm", judge=judge)
        vllm_s = time.perf_counter() - start
        engine.close()
    pairs = list(zip(on_hf["rows"], on_vllm["rows"], strict=True))

    def cell(best: dict[str, Any] | None) -> list[Any] | None:
        return None if best is None else [best["layer"], best["multiplier"], best["policy"]]

    result = {
        "layers": list(LAYERS),
        "multipliers": list(MULTIPLIERS),
        "cells": len(pairs),
        "prompts": PROMPTS,
        "tokens": TOKENS,
        "extract_s": extract_s,
        "hf_s": hf_s,
        "vllm_start_s": start_s,
        "vllm_s": vllm_s,
        "speedup": hf_s / vllm_s,
        "speedup_with_start": hf_s / (vllm_s + start_s),
        "recommendation_hf": cell(on_hf["recommendation"]),
        "recommendation_vllm": cell(on_vllm["recommendation"]),
        "same_recommendation": cell(on_hf["recommendation"]) == cell(on_vllm["recommendation"]),
        "same_first_texts": sum(a["example"] == b["example"] for a, b in pairs),
        "max_behaviour_difference": max(abs(a["behaviour"] - b["behaviour"]) for a, b in pairs),
        "max_kl_difference": max(abs(a["kl"] - b["kl"]) for a, b in pairs),
        "max_perplexity_relative_difference": max(
            abs(a["perplexity"] / b["perplexity"] - 1) for a, b in pairs
        ),
    }
    print(result, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    import vllm  # noqa: F401  (its version goes into the result)

    write_result("sweep", result, quiet)


if __name__ == "__main__":
    main()
