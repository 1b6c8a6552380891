"""``steerlab condition fit``: the threshold of a :class:`~steerlab.core.condition.Condition`
that best separates a labelled set of prompts, and how well it does.

Each example is scored exactly as a conditional steering scores a prompt at run time
(:func:`steerlab.hf.conditions.prompt_scores` on the prompt rendered the same way), so the
fitted threshold means the same thing when it steers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.condition import Condition, Reduce
from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import prompt_ids
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.projection import auc
from steerlab.hf.conditions import prompt_scores
from steerlab.hf.model import LoadedModel


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


def fit_condition(
    lm: LoadedModel,
    dataset: Dataset,
    vector: SteeringVector,
    layer: int,
    *,
    reduce: Reduce = "mean",
    chat: bool = True,
    holds_for_positive: bool = True,
) -> ConditionFit:
    """Score every labelled prompt at ``layer`` and pick the best-separating threshold.

    Args:
        holds_for_positive: the condition should hold for (steer) the positive examples;
            False: for the negative ones. ``positive``/``negative`` of the result are the
            prompts it should hold for and the others.
    """
    examples = [(text, h == holds_for_positive) for text, h in labelled_prompts(dataset)]
    if not any(h for _, h in examples) or all(h for _, h in examples):
        raise SteerlabError(
            f"{dataset.info.path}: a condition needs prompts of both labels to separate"
        )
    probe = Condition(vector, layer, 0.0, reduce=reduce)  # validates the layer and vector
    ids = [prompt_ids(lm.tokenizer, text, chat=chat) for text, _ in examples]
    pad = lm.tokenizer.pad_token_id or 0
    scores = prompt_scores(lm.model, lm.layers, ids, probe, pad_id=pad)
    pos = [s for s, (_, h) in zip(scores, examples, strict=True) if h]
    neg = [s for s, (_, h) in zip(scores, examples, strict=True) if not h]
    threshold, above, accuracy = best_threshold(pos, neg)
    separation = auc(pos, neg) if above else auc(neg, pos)  # in the condition's direction
    return ConditionFit(
        Condition(vector, layer, threshold, above, reduce),
        accuracy,
        separation,
        tuple(pos),
        tuple(neg),
    )


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
