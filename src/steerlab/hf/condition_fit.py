"""Fitting a condition (``steerlab condition fit``) on the Hugging Face engine: every labelled
prompt's score at one layer, and the best-separating threshold."""

from __future__ import annotations

from steerlab.core.condition import (
    Condition,
    ConditionFit,
    Reduce,
    best_threshold,
    labelled_prompts,
)
from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.projections import auc
from steerlab.core.prompts import prompt_ids
from steerlab.core.vector import SteeringVector
from steerlab.hf.conditions import prompt_scores
from steerlab.hf.engine import LoadedModel


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
