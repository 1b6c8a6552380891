"""Sweep cells one by one against the sweep's batches, side by side in one process.

The sweep of issue #13 on the default model: the shipped sentiment vector at layers
6,9,12,15,18 x multipliers -8,-4,-2,0,2,4,8 (the unsteered baseline once), the first 6
shipped neutral prompts, 40 greedy tokens, the VADER judge. Three ways, same numbers:

* ``old_loop``: the loop the sweep had before batching, one cell at a time on the decoding
  of that time (every row prefills its whole prompt; the unsteered shadow takes one token
  per step), reproduced here by patching today's decode back to it;
* ``cell_loop``: one cell at a time on today's decode (shared prefill, chunked shadow);
* ``batched``: what ``steerlab sweep`` runs, cells in padded batches of ``batch_rows`` rows.

Writes bench/results/sweep.json, which bench/report.py adds to BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (6, 9, 12, 15, 18)
MULTIPLIERS = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
PROMPTS = 6
TOKENS = 40


@contextlib.contextmanager
def decoding_before_batching() -> Iterator[None]:
    """Today's decode run as it was before #13: no shared prompt prefill, and a shadow that
    is fed one token per step (the same arithmetic as that code)."""
    import steerlab.evaluation.metrics as metrics
    import steerlab.hf.tracking as tracking

    generate, steps = metrics.generate, tracking.MOST_PENDING_STEPS

    def plain(*args: Any, **kwargs: Any) -> Any:
        return generate(*args, **{**kwargs, "share_prompts": False})

    metrics.generate, tracking.MOST_PENDING_STEPS = plain, 1  # type: ignore[assignment]
    try:
        yield
    finally:
        metrics.generate, tracking.MOST_PENDING_STEPS = generate, steps


def main() -> None:
    import torch

    import steerlab
    from steerlab import Sampling, Steering
    from steerlab.core.dataset import load_dataset
    from steerlab.evaluation.cells import cells_per_batch, score_cells
    from steerlab.evaluation.demo import sentiment_dataset_path
    from steerlab.evaluation.judges import sentiment
    from steerlab.evaluation.metrics import judged_generation
    from steerlab.evaluation.sweep import SweepConfig, neutral_prompts

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lm = steerlab.load_model()
    vector = steerlab.extract(lm, load_dataset(sentiment_dataset_path()), list(LAYERS))
    prompts = list(neutral_prompts())[:PROMPTS]
    judge = sentiment()
    config = SweepConfig(layers=LAYERS, multipliers=MULTIPLIERS, max_new_tokens=TOKENS)
    # The cells a sweep computes: the baseline once, then every steered cell.
    cells = [(LAYERS[0], 0.0, "after-prompt", "chat")] + [
        (layer, m, "after-prompt", "chat") for layer in LAYERS for m in MULTIPLIERS if m != 0
    ]
    sampling = Sampling(max_new_tokens=TOKENS)

    def cell_loop() -> tuple[list[Any], float]:
        start = time.perf_counter()
        scores = [
            judged_generation(
                lm, prompts, [] if m == 0 else [Steering(vector, m, (layer,))], judge, sampling
            )
            for layer, m, _, _ in cells
        ]
        return scores, time.perf_counter() - start

    with decoding_before_batching():
        old_loop, old_s = cell_loop()
    one_by_one, loop_s = cell_loop()
    per_call = cells_per_batch(config, len(prompts))
    start = time.perf_counter()
    batched = {}
    for first in range(0, len(cells), per_call):
        batched.update(
            score_cells(lm, None, prompts, cells[first : first + per_call], vector, config, judge)
        )
    batch_s = time.perf_counter() - start
    pairs = [(batched[c], g) for c, g in zip(cells, one_by_one, strict=True)]
    pairs += [(batched[c], g) for c, g in zip(cells, old_loop, strict=True)]
    result = {
        "layers": list(LAYERS),
        "multipliers": list(MULTIPLIERS),
        "cells": len(cells),
        "prompts": len(prompts),
        "tokens": TOKENS,
        "rows_per_batch": per_call * len(prompts),
        "old_loop_s": old_s,
        "cell_loop_s": loop_s,
        "batched_s": batch_s,
        "speedup_vs_old_loop": old_s / batch_s,
        "speedup_vs_cell_loop": loop_s / batch_s,
        "max_behaviour_difference": max(abs(b["behaviour"] - g.behaviour) for b, g in pairs),
        "max_kl_difference": max(abs(b["kl"] - g.kl) for b, g in pairs),
        "max_perplexity_relative_difference": max(
            abs(b["perplexity"] / g.perplexity - 1) for b, g in pairs
        ),
        "same_first_texts": all(b["example"] == g.texts[0] for b, g in pairs),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
