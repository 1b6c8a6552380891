"""Sweep cells one by one (the old loop) against one batch per layer, side by side.

Default model, the shipped sentiment vector's layer 9, multipliers -8,-4,0,4,8, the 32
shipped neutral prompts, 24 greedy tokens, the VADER judge. Both paths must give the same
numbers; writes bench/results/sweep.json, which bench/report.py adds to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTIPLIERS = (-8.0, -4.0, 0.0, 4.0, 8.0)
LAYER = 9


def main() -> None:
    import torch

    import steerlab
    from steerlab import Sampling, Steering
    from steerlab.core.dataset import load_dataset
    from steerlab.evaluation.cells import score_cells
    from steerlab.evaluation.demo import sentiment_dataset_path
    from steerlab.evaluation.judges import sentiment
    from steerlab.evaluation.metrics import judged_generation
    from steerlab.evaluation.sweep import SweepConfig, neutral_prompts

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lm = steerlab.load_model()
    vector = steerlab.extract(lm, load_dataset(sentiment_dataset_path()), [LAYER])
    prompts = list(neutral_prompts())
    judge = sentiment()
    config = SweepConfig(layers=(LAYER,), multipliers=MULTIPLIERS, max_new_tokens=24)
    cells = [(LAYER, m, "after-prompt", "chat") for m in MULTIPLIERS]
    start = time.perf_counter()
    one_by_one = [
        judged_generation(
            lm,
            prompts,
            [] if m == 0 else [Steering(vector, m, (LAYER,))],
            judge,
            Sampling(max_new_tokens=24),
        )
        for m in MULTIPLIERS
    ]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = score_cells(lm, None, prompts, cells, vector, config, judge)
    batch_s = time.perf_counter() - start
    worst = max(
        abs(batched[c]["behaviour"] - g.behaviour) for c, g in zip(cells, one_by_one, strict=True)
    )
    same_text = all(
        batched[c]["example"] == g.texts[0] for c, g in zip(cells, one_by_one, strict=True)
    )
    result = {
        "cells": len(cells),
        "prompts": len(prompts),
        "tokens": 24,
        "loop_s": loop_s,
        "batched_s": batch_s,
        "speedup": loop_s / batch_s,
        "max_behaviour_difference": worst,
        "same_first_texts": same_text,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
