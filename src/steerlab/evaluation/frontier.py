"""Policies compared at equal behaviour shift: a side-effect frontier per policy.

A policy that moves behaviour less also costs less, so comparing policies at one
multiplier says little. Here each policy's multiplier is swept; every cell gives a
behaviour shift from the unsteered baseline (paired over prompts) and side effects (KL per
token, perplexity under the unsteered model, distinct-2), each with a 95% bootstrap
interval over prompts. Each policy's cells, in multiplier order from the baseline, form its
frontier; the cost of every policy is read off at one shared shift by linear
interpolation, inside the same bootstrap (so the intervals include the uncertainty of
where the shift is reached). No resample is dropped: one in which a policy never reaches
the shift counts as an unbounded cost (see :func:`unconditional`), and the default shift is
one every policy that moves behaviour at all reaches in at least 97.5% of resamples.
See docs/design.md, "Evaluation".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.vector import SteeringVector
from steerlab.evaluation import stats
from steerlab.evaluation.cells import score_cells
from steerlab.evaluation.config import Cell, SweepConfig, cells_per_batch, write_table
from steerlab.evaluation.frontier_report import COSTS, frontier_plot, frontier_report
from steerlab.evaluation.judges import Judge

FRONTIER_POLICIES = ("after-prompt", "transient", "all")


@dataclass(frozen=True)
class FrontierConfig:
    """What a frontier sweeps.

    Attributes:
        layer: the steered layer.
        multipliers: nonzero multipliers of one sign (the baseline, 0, is always added).
        policies: the policies compared; the first is the reference for differences.
        direction: ``increase`` or ``decrease``: the sign of the behaviour shift sought.
        shift: the shift the costs are read at (default: the smallest of the shifts each
            policy reaches in 97.5% of bootstrap resamples, over the policies for which that
            shift is positive).
        max_new_tokens: greedy tokens per completion.
        seed: bootstrap seed.
        batch_rows: most rows per padded batch of cells.
    """

    layer: int
    multipliers: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    policies: tuple[str, ...] = FRONTIER_POLICIES
    direction: str = "increase"
    shift: float | None = None
    max_new_tokens: int = 32
    seed: int = 0
    batch_rows: int = 192

    def __post_init__(self) -> None:
        ms = [m for m in self.multipliers if m != 0]
        if not ms or any(not math.isfinite(m) for m in ms):
            raise SteerlabError("a frontier needs finite nonzero multipliers, e.g. 2,4,6,8")
        if len({m > 0 for m in ms}) > 1:
            raise SteerlabError(
                "a frontier follows one direction: give multipliers of one sign, e.g. 2,4,6,8"
            )
        if not self.policies:
            raise SteerlabError("a frontier needs at least one policy: pass --policies")
        for p in self.policies:
            if Policy.parse(p).kind == "actadd":
                raise SteerlabError("actadd needs a position-wise vector: not in a frontier")
        if self.direction not in ("increase", "decrease"):
            raise SteerlabError(f"--direction must be increase or decrease, got {self.direction!r}")
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise SteerlabError("--shift must be a positive number (in the --direction)")

    @property
    def path(self) -> tuple[float, ...]:
        """The multipliers in order from the baseline outwards."""
        return (0.0, *sorted({m for m in self.multipliers if m != 0}, key=abs))


class _Items:
    """Per-prompt numbers of every cell ``[cells, prompts]``, for the bootstrap."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        def grid(key: str) -> torch.Tensor:
            return torch.tensor([r[key] for r in rows], dtype=torch.float64)

        self.behaviour = grid("items")
        self.kl, self.nll = grid("item_kl"), grid("item_nll")
        self.tokens = grid("item_tokens").clamp(min=1)
        self.distinct2 = grid("item_distinct2")

    def measure(self, index: torch.Tensor, sign: float) -> dict[str, torch.Tensor]:
        """Per resample (rows of ``index`` ``[B, n]``) and cell: shift (signed, from cell 0,
        the baseline) and the costs; each ``[B, cells]``."""
        b = self.behaviour[:, index].nanmean(-1).T  # [B, cells]
        tokens = self.tokens[:, index].sum(-1).T
        return {
            "shift": sign * (b - b[:, :1]),
            "kl": self.kl[:, index].sum(-1).T / tokens,
            "perplexity": torch.exp(self.nll[:, index].sum(-1).T / tokens),
            "distinct2": self.distinct2[:, index].mean(-1).T,
        }


def _unbounded(samples: torch.Tensor) -> torch.Tensor:
    """Resamples that never reach the shift (NaN from :func:`read_at`) as +inf."""
    return torch.where(torch.isnan(samples), math.inf, samples)


def read_at(shift: torch.Tensor, value: torch.Tensor, target: float) -> torch.Tensor:
    """``value`` ``[B, P]`` interpolated linearly at the first point where ``shift`` ``[B, P]``
    (along a path that starts at 0) reaches ``target``; NaN where it never does."""
    out = torch.full(shift.shape[:1], float("nan"), dtype=value.dtype)
    found = torch.zeros(shift.shape[:1], dtype=torch.bool)
    for i in range(shift.shape[1] - 1):
        s0, s1 = shift[:, i], shift[:, i + 1]
        hit = ~found & (s0 < target) & (s1 >= target)
        w = (target - s0) / (s1 - s0)
        out = torch.where(hit, value[:, i] + w * (value[:, i + 1] - value[:, i]), out)
        found |= hit
    return out


def _interval(samples: torch.Tensor, point: float) -> list[float]:
    """[point estimate, lo, hi] of a cell's number from the resamples that are not NaN."""
    kept = samples[~torch.isnan(samples)]
    if kept.numel() == 0:
        return [point, float("nan"), float("nan")]
    lo, hi = torch.quantile(kept, torch.tensor([0.025, 0.975], dtype=kept.dtype)).tolist()
    return [point, float(lo), float(hi)]


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile (linear interpolation, as ``torch.quantile``) of values that may be
    infinite; between a finite and an infinite neighbour it takes the one in the tail."""
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    i = int(pos)
    a, b = float(ordered[i]), float(ordered[min(i + 1, ordered.numel() - 1)])
    frac = pos - i
    if frac == 0.0 or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return a if q < 0.5 else b
    return a + frac * (b - a)


def unconditional(samples: torch.Tensor, point: float) -> list[float]:
    """[point estimate, lo, hi] over *every* resample, none dropped.

    A reading's resamples are infinite where a policy never reaches the shift (its cost is
    unbounded: it cannot get there), and NaN where two policies both never reach it (their
    difference is unknown, so it counts as -inf for the lower end and +inf for the upper
    one). An end is infinite when more than 2.5% of the resamples put it there.
    """
    nan = torch.isnan(samples)
    lo = _quantile(torch.where(nan, -math.inf, samples), 0.025)
    hi = _quantile(torch.where(nan, math.inf, samples), 0.975)
    return [point, lo, hi]


def reliable_shift(reach: torch.Tensor) -> float:
    """The largest shift a policy reaches in enough resamples that the upper 97.5% end of
    an :func:`unconditional` interval at it stays finite (``reach`` ``[B]``: each resample's
    largest shift on the policy's path); at least 97.5% of resamples reach it."""
    ordered = reach.sort().values
    count = ordered.numel()
    misses = count - 1 - math.ceil(0.975 * (count - 1))  # infinite values the end tolerates
    return float(ordered[max(misses, 0)])


def read_policies(
    full: dict[str, torch.Tensor],
    boot: dict[str, torch.Tensor],
    paths: dict[str, list[int]],
    path: Sequence[float],
    target: float,
) -> list[dict[str, Any]]:
    """Each policy's multiplier and costs at shift ``target``, with unconditional intervals.

    Args:
        full: every cell's shift and costs on all prompts (each ``[1, cells]``).
        boot: the same per bootstrap resample (each ``[B, cells]``).
        paths: per policy, its cells from the baseline outwards (the first policy is the
            reference of the paired differences).
        path: the multipliers along every path (0 first).
    """
    policies = list(paths)
    resamples = boot["shift"].shape[0]
    mults = torch.tensor(list(path), dtype=torch.float64)
    ref: dict[str, tuple[float, torch.Tensor]] = {}
    readings = []
    for p in policies:
        idx = paths[p]
        reading: dict[str, Any] = {"policy": p}
        shift_b, shift_f = boot["shift"][:, idx], full["shift"][:, idx]
        # A resample in which the policy never reaches the shift is a result, not a gap:
        # the multiplier and the costs it would take are unbounded there (+inf).
        reached = read_at(shift_b, mults.expand(resamples, -1), target)
        reading["reached"] = float((~torch.isnan(reached)).double().mean())
        point_m = float(read_at(shift_f, mults[None], target)[0])
        reading["multiplier"] = unconditional(_unbounded(reached), point_m)
        for key in COSTS:
            samples = _unbounded(read_at(shift_b, boot[key][:, idx], target))
            point = float(read_at(shift_f, full[key][:, idx], target)[0])
            reading[key] = unconditional(samples, point)
            if p == policies[0]:
                ref[key] = (point, samples)
            else:
                reading[f"{key}_minus_{policies[0]}"] = unconditional(
                    samples - ref[key][1], point - ref[key][0]
                )
        readings.append(reading)
    return readings


def run_frontier(
    lm: Engine,
    vector: SteeringVector,
    prompts: Sequence[str],
    judge: Judge,
    config: FrontierConfig,
    out_dir: Path,
    *,
    behaviour_label: str = "behaviour",
    resamples: int = stats.RESAMPLES,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sweep every policy's multiplier, and read each policy's side effects at equal shift.

    Writes ``frontier.csv``/``.json`` (the cells), ``frontier-readings.json`` (everything
    returned), ``frontier.png`` and ``frontier.md`` into ``out_dir``.

    Returns:
        ``{"cells": [...], "shift": S | None, "readings": [...], "files": [...]}``; a
        reading holds, per policy, ``[estimate, lo, hi]`` of the multiplier, each cost and
        each cost minus the reference policy's at shift S, and the share of resamples in
        which the policy reaches S. ``on_batch(done, total)`` is called after each batch
        of cells.
    """
    if config.layer not in vector.directions:
        raise SteerlabError(
            f"the vector has no layer {config.layer}: it has layers "
            f"{','.join(map(str, vector.layers))}"
        )
    if len(prompts) < 2:
        raise SteerlabError("a frontier needs at least two prompts (intervals over prompts)")
    policies = [str(Policy.parse(p)) for p in config.policies]
    cells: list[Cell] = [(config.layer, 0.0, policies[0], "chat")] + [
        (config.layer, m, p, "chat") for p in policies for m in config.path[1:]
    ]
    sweep = SweepConfig(
        layers=(config.layer,),
        multipliers=config.path,
        policies=tuple(policies),
        max_new_tokens=config.max_new_tokens,
        batch_rows=config.batch_rows,
    )
    per_call = cells_per_batch(sweep, len(prompts))
    scored: dict[Cell, dict[str, Any]] = {}
    for first in range(0, len(cells), per_call):
        group = cells[first : first + per_call]
        scored.update(score_cells(lm, None, list(prompts), group, vector, sweep, judge))
        if on_batch is not None:
            on_batch(len(scored), len(cells))
    rows = [scored[c] for c in cells]
    sign = 1.0 if config.direction == "increase" else -1.0
    items = _Items(rows)
    n = len(prompts)
    full = items.measure(torch.arange(n)[None], sign)
    gen = torch.Generator().manual_seed(config.seed)
    boot = items.measure(torch.randint(0, n, (resamples, n), generator=gen), sign)
    table = []
    for c, row in enumerate(rows):
        entry = {k: row[k] for k in ("layer", "multiplier", "policy")}
        entry["policy"] = "unsteered" if row["multiplier"] == 0 else row["policy"]
        for key in ("shift", *COSTS):
            entry[key], entry[f"{key}_lo"], entry[f"{key}_hi"] = _interval(
                boot[key][:, c], float(full[key][0, c])
            )
        entry["example"] = row.get("example", "")
        table.append(entry)
    # Each policy's path: the baseline, then its cells by |multiplier|.
    paths = {p: [0] + [1 + i * (len(config.path) - 1) + j for j in range(len(config.path) - 1)]
             for i, p in enumerate(policies)}  # fmt: skip
    reach = {p: float(full["shift"][0, paths[p]].max()) for p in policies}
    # Each policy's shift reached in 97.5% of resamples; the costs are read by default at
    # the smallest such shift among the policies that reliably move behaviour at all, so
    # every one of them reaches it in at least 97.5% of resamples.
    sure = {p: reliable_shift(boot["shift"][:, paths[p]].max(-1).values) for p in policies}
    target = config.shift
    if target is None and any(v > 0 for v in sure.values()):
        target = min(v for v in sure.values() if v > 0)
    readings = [] if target is None else read_policies(full, boot, paths, config.path, target)
    for reading in readings:
        reading["reliable_shift"] = sure[reading["policy"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(table, out_dir, "frontier")
    result = {
        "layer": config.layer,
        "direction": config.direction,
        "prompts": n,
        "shift": target,
        "reach": reach,
        "reliable_reach": sure,
        "cells": table,
        "readings": readings,
        "behaviour": behaviour_label,
    }
    (out_dir / "frontier-readings.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    plot = frontier_plot(result, out_dir)
    report = frontier_report(result, out_dir)
    result["files"] = [str(plot), str(report)]
    return result
