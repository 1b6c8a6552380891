"""Scoring sweep cells together: cells (any layer, multiplier and policy, and the unsteered
baseline) run in padded batches with per-row steering, every prompt's prefill shared by the
cells whose policy leaves it unsteered, and give the same numbers as each cell alone (tested
in tests/test_sweep.py)."""

from __future__ import annotations

from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.core.engine import Engine
from steerlab.core.policy import Policy
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.evaluation import stats
from steerlab.evaluation.config import Cell, SweepConfig, cell_keys, cells_per_batch
from steerlab.evaluation.judges import Judge
from steerlab.evaluation.metrics import (
    NEUTRAL_TEXT,
    JudgedRows,
    behaviour_probability_cells,
    distinct_n,
    generation_score,
    judged_rows,
    text_perplexity,
)


def score_cells(
    lm: Engine,
    test: Dataset | None,
    prompts: list[str],
    cells: list[Cell],
    vector: Any,
    config: SweepConfig,
    judge: Judge | None,
) -> dict[Cell, dict[str, Any]]:
    """Every cell's row; the cells run together (A/B: per item chunk; free text: one
    padded batch of whole cells, each with every prompt, so padding is as if alone)."""
    if not cells:
        return {}
    steerings = [
        [] if m == 0 else [Steering(vector, m, (layer,), Policy.parse(p), config.scale)]  # type: ignore[arg-type]
        for layer, m, p, _ in cells
    ]
    out: dict[Cell, dict[str, Any]] = {}
    if test is not None:
        per_cell = behaviour_probability_cells(lm, test, steerings)
        for cell, steering, scores in zip(cells, steerings, per_cell, strict=True):
            fluency = text_perplexity(lm, NEUTRAL_TEXT, steering)
            out[cell] = {
                **cell_keys(cell),
                "behaviour": stats.mean(scores),
                "fluency": fluency,
                "perplexity": float("nan"),
                "distinct2": float("nan"),
                "kl": float("nan"),
                "neutral_perplexity": fluency,
                "n_test": len(scores),
                "items": list(scores),
            }
        return out
    assert judge is not None
    k = config.samples
    sampling = (
        Sampling(max_new_tokens=config.max_new_tokens)
        if k == 1
        else Sampling(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed
        )
    )
    width = len(prompts) * k
    per_batch = cells_per_batch(config, len(prompts))
    for first in range(0, len(cells), per_batch):
        group = list(range(first, min(first + per_batch, len(cells))))
        rows_prompts = [p for _ in group for p in prompts for _ in range(k)]
        rows_steering = [steerings[c] for c in group for _ in range(width)]
        judged = judged_rows(lm, rows_prompts, rows_steering, judge, sampling)
        for g, c in enumerate(group):
            part = slice(g * width, (g + 1) * width)
            cell_rows = JudgedRows(*(field[part] for field in vars(judged).values()))
            score = generation_score(cell_rows, text_perplexity(lm, NEUTRAL_TEXT, steerings[c]))
            by_prompt = [
                stats.mean(cell_rows.scores[i * k : (i + 1) * k]) for i in range(len(prompts))
            ]
            out[cells[c]] = {
                **cell_keys(cells[c]),
                "behaviour": score.behaviour,
                "fluency": score.perplexity,
                "perplexity": score.perplexity,
                "distinct2": score.distinct2,
                "kl": score.kl,
                "neutral_perplexity": score.neutral_perplexity,
                "example": score.texts[0],
                "n_test": len(prompts),
                "items": by_prompt,
                "item_nll": [sum(cell_rows.nll[i * k : (i + 1) * k]) for i in range(len(prompts))],
                "item_tokens": [
                    sum(cell_rows.tokens[i * k : (i + 1) * k]) for i in range(len(prompts))
                ],
                "item_kl": [sum(cell_rows.kl[i * k : (i + 1) * k]) for i in range(len(prompts))],
                "item_distinct2": [
                    distinct_n(cell_rows.texts[i * k : (i + 1) * k], 2) for i in range(len(prompts))
                ],
            }
    return out


def add_shifts(rows: list[dict[str, Any]], seed: int) -> None:
    """Each row's behaviour interval, and its shift from the baseline with a paired one."""
    base = next((r for r in rows if r["multiplier"] == 0), None)
    for r in rows:
        items = r.get("items") or []
        b = stats.Estimate.of(items, seed)
        r["behaviour_lo"], r["behaviour_hi"] = b.lo, b.hi
        if base is None or not items:
            continue
        shift = stats.Estimate.of(stats.paired(items, base["items"]), seed)
        r["shift"], r["shift_lo"], r["shift_hi"] = shift.mean, shift.lo, shift.hi
