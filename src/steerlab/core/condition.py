"""Conditional steering (CAST): a steering that applies to a row only when its prompt
projects onto a condition vector past a threshold (docs/design.md, "Conditions").

A :class:`Condition` is decided once per row, before decoding, from the unsteered prompt's
activations at one layer: the mean (or the last token) of ``h.u`` over the prompt, with
``u`` the condition vector's unit direction there. Rows where it does not hold get nothing
from that steering, bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector

Reduce = Literal["mean", "last"]


@dataclass(frozen=True)
class Condition:
    """Steer a row only when its prompt's projection onto ``vector`` at ``layer`` passes
    ``threshold``.

    Args:
        vector: the condition vector (e.g. harmful vs harmless prompts).
        layer: the layer whose block output is read (unsteered).
        threshold: the projection onto the unit direction that decides.
        above: hold when the score is above the threshold (False: below).
        reduce: ``mean`` over the prompt's tokens, or the ``last`` prompt token.
        on: what is read; ``prompt`` (the only choice: decided before decoding).
    """

    vector: SteeringVector
    layer: int
    threshold: float
    above: bool = True
    reduce: Reduce = "mean"
    on: Literal["prompt"] = "prompt"

    def __post_init__(self) -> None:
        if self.on != "prompt":
            raise SteerlabError(f"a condition is read on the prompt, not {self.on!r}")
        if self.reduce not in ("mean", "last"):
            raise SteerlabError(f"condition reduce must be 'mean' or 'last', got {self.reduce!r}")
        if not math.isfinite(self.threshold):
            raise SteerlabError(
                f"condition threshold must be a finite number, got {self.threshold}"
            )
        if self.layer not in self.vector.directions:
            raise SteerlabError(
                f"the condition vector has no layer {self.layer}: it has layers "
                f"{','.join(map(str, self.vector.layers))}"
            )
        if self.vector.positionwise:
            raise SteerlabError(
                "a condition needs one direction per layer, not a position-wise vector"
            )
        self.vector.unit(self.layer)  # refuses a zero direction

    def unit(self) -> torch.Tensor:
        """The float32 unit direction at the condition's layer."""
        return self.vector.unit(self.layer)

    def span(self, prompt_len: int) -> tuple[int, int]:
        """The prompt positions ``start..end-1`` whose projections are averaged."""
        return (prompt_len - 1, prompt_len) if self.reduce == "last" else (0, prompt_len)

    def holds(self, score: float) -> bool:
        """Whether a prompt with this score is steered."""
        return score > self.threshold if self.above else score < self.threshold


@dataclass(frozen=True)
class ConditionFit:
    """The fitted condition, its accuracy on the labelled prompts it was fitted on, and the
    AUC of their scores in the condition's direction (1: perfectly separated)."""

    condition: Condition
    accuracy: float
    auc: float
    positive: tuple[float, ...]
    negative: tuple[float, ...]

    def to_json(self, vector_path: Path) -> dict[str, Any]:
        c = self.condition
        return {
            "vector": str(vector_path),
            "layer": c.layer,
            "threshold": c.threshold,
            "above": c.above,
            "reduce": c.reduce,
            "accuracy": self.accuracy,
            "auc": self.auc,
            "positives": len(self.positive),
            "negatives": len(self.negative),
        }


def labelled_prompts(dataset: Dataset) -> list[tuple[str, bool]]:
    """``(prompt, holds)`` per example: an unpaired set's texts with their labels, or each
    pair's positive and negative text (after its prompt, if any) as two prompts."""
    if dataset.format == "unpaired":
        return [((t.prompt + "\n" if t.prompt else "") + t.text, t.positive) for t in dataset.texts]
    out = []
    for p in dataset.pairs:
        head = p.prompt + "\n" if p.prompt else ""
        out += [(head + p.positive, True), (head + p.negative, False)]
    return out


def best_threshold(positive: list[float], negative: list[float]) -> tuple[float, bool, float]:
    """The threshold, direction and accuracy that classify the scores best (midpoints)."""
    scores = sorted(set(positive) | set(negative))
    cuts = [scores[0] - 1.0] + [(a + b) / 2 for a, b in zip(scores, scores[1:], strict=False)]
    total = len(positive) + len(negative)
    best = (cuts[0], True, -1.0)
    for cut in cuts:
        right = sum(x > cut for x in positive) + sum(x <= cut for x in negative)
        for above, correct in ((True, right), (False, total - right)):
            if correct / total > best[2]:
                best = (cut, above, correct / total)
    return best


def read_condition(path: Path, load: Any) -> Condition:
    """A condition file written by ``steerlab condition fit -o`` (``load`` reads its vector)."""
    if not path.is_file():
        raise SteerlabError(
            f"{path}: no such condition file (make one with `steerlab condition fit -o`)"
        )
    try:
        data = json.loads(path.read_text())
        vector_path = Path(data["vector"])
        layer, threshold = int(data["layer"]), float(data["threshold"])
        above, reduce = bool(data.get("above", True)), data.get("reduce", "mean")
    except (ValueError, KeyError, TypeError):
        raise SteerlabError(
            f"{path}: not a condition file (JSON with vector, layer, threshold): make one with "
            "`steerlab condition fit -o`"
        ) from None
    if not vector_path.is_absolute():
        vector_path = path.parent / vector_path
    return Condition(load(vector_path), layer, threshold, above, reduce)
