"""What a sweep or a frontier runs, and the helpers every evaluation module shares: the
layer below :mod:`~steerlab.evaluation.sweep`, :mod:`~steerlab.evaluation.cells`,
:mod:`~steerlab.evaluation.sweep_report` and :mod:`~steerlab.evaluation.frontier`, so none of
them imports another for a type."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy

Cell = tuple[int, float, str, str]  # layer, multiplier, policy, context
# What only the recommendation depends on: changing it re-reads a finished sweep's cells.
RULE_FIELDS = ("direction", "target", "perplexity_bound")


def cell_keys(cell: Cell) -> dict[str, Any]:
    layer, mult, policy, context = cell
    return {"layer": layer, "multiplier": mult, "policy": policy, "context": context}


DEFAULT_PROMPTS = (  # the first six shipped neutral prompts (the quick demo uses them)
    "Tell me about your day.",
    "Write a sentence about the ocean.",
    "What do you think of cats?",
    "Describe your neighbourhood.",
    "How was the movie you saw?",
    "What is your opinion of Mondays?",
)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs; validated on construction.

    Args:
        layers: layers to extract and evaluate.
        multipliers: multipliers to evaluate (0 is the unsteered baseline).
        policies: position policies (an axis of the sweep).
        contexts: extraction contexts (an axis): ``chat`` (the chat template) and/or
            ``raw`` (plain text); one vector is extracted per context.
        method: aggregator.
        test_fraction: share of prompts held out for scoring.
        seed: split, sampling and bootstrap seed.
        max_new_tokens: tokens per judged completion.
        prompts: prompts for judged generation (default: the shipped neutral prompts).
        samples: completions per prompt (1: greedy; more: sampled at ``temperature``).
        temperature: sampling temperature when ``samples`` > 1.
        perplexity_bound: the recommendation keeps cells whose fluency is at most this
            times the unsteered one.
        direction: ``increase`` or ``decrease`` the behaviour.
        target: a behaviour value to reach instead (the cell closest to it).
        scale: absolute or relative multipliers.
        max_test_items: A/B items scored per cell.
        batch_rows: most rows per batch when cells run together.
    """

    layers: tuple[int, ...]
    multipliers: tuple[float, ...]
    policies: tuple[str, ...] = ("after-prompt",)
    contexts: tuple[str, ...] = ("chat",)
    method: str = "mean-diff"
    test_fraction: float = 0.3
    seed: int = 0
    max_new_tokens: int = 32
    prompts: tuple[str, ...] = ()
    samples: int = 1
    temperature: float = 0.7
    perplexity_bound: float = 2.0
    direction: str = "increase"
    target: float | None = None
    scale: str = "absolute"
    max_test_items: int = 200
    batch_rows: int = 192

    def __post_init__(self) -> None:
        if not self.layers:
            raise SteerlabError("a sweep needs at least one layer: pass --layers")
        if not self.multipliers:
            raise SteerlabError("a sweep needs at least one multiplier: pass --multipliers")
        if any(not math.isfinite(m) for m in self.multipliers):
            raise SteerlabError("multipliers must be finite numbers")
        if not self.policies:
            raise SteerlabError("a sweep needs at least one policy: pass --policies")
        for policy in self.policies:
            Policy.parse(policy)
        if not self.contexts or any(c not in ("chat", "raw") for c in self.contexts):
            raise SteerlabError("--contexts takes chat, raw or both (chat,raw)")
        if self.perplexity_bound <= 1:
            raise SteerlabError(f"--perplexity-bound must be above 1, got {self.perplexity_bound}")
        if self.direction not in ("increase", "decrease"):
            raise SteerlabError(f"--direction must be increase or decrease, got {self.direction!r}")
        if self.target is not None and not math.isfinite(self.target):
            raise SteerlabError("--target must be a finite number")
        if self.samples < 1:
            raise SteerlabError(f"--samples must be at least 1, got {self.samples}")
        if self.batch_rows < 1:
            raise SteerlabError(f"--batch-rows must be at least 1, got {self.batch_rows}")
        if self.samples > 1 and not self.temperature > 0:
            raise SteerlabError("--samples above 1 needs a --temperature above 0")

    def manifest(self) -> dict[str, Any]:
        """What the cells' numbers depend on: ``batch_rows`` changes no number, and the rule
        (``direction``, ``target``, ``perplexity_bound``) only the recommendation, so a
        finished sweep re-read under another rule reuses every cell."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(self).items()
            if k != "batch_rows" and k not in RULE_FIELDS
        }


def parse_floats(text: str) -> tuple[float, ...]:
    """``-8,-4,0,4,8`` -> floats, with a one-line error for junk."""
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise SteerlabError(f"cannot read numbers from '{text}': use a list like -4,0,4") from None
    if not values:
        raise SteerlabError("no numbers given: use a list like -4,0,4")
    return values


def cells_per_batch(config: SweepConfig, prompts: int) -> int:
    """How many free-text cells run in one padded batch (every prompt and sample of each)."""
    return max(1, config.batch_rows // (prompts * config.samples))


def write_table(rows: Sequence[dict[str, Any]], out_dir: Path, stem: str) -> None:
    """``stem.csv`` (scalars only) and ``stem.json`` (everything but per-item lists)."""
    if not rows:
        return
    keys = [k for k in rows[0] if k not in LISTS]
    with (out_dir / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plain = [{k: v for k, v in r.items() if k not in LISTS} for r in rows]
    (out_dir / f"{stem}.json").write_text(json.dumps(plain, indent=2, sort_keys=True))


LISTS = (
    "texts",
    "items",
    "item_nll",
    "item_tokens",
    "item_kl",
    "item_distinct2",
)  # per-item data, kept in results.jsonl


def neutral_prompts() -> tuple[str, ...]:
    """The shipped neutral prompts for free-text sweeps (32)."""
    from importlib.resources import files

    text = files("steerlab").joinpath("data/neutral_prompts.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())
