"""Deciding conditional steerings (:class:`steerlab.core.condition.Condition`) on Hugging
Face models: one unsteered read of the prompts per condition, before decoding.

:func:`resolve_conditions` turns per-row steerings with conditions into plain ones: a
steering stays on a row whose prompt passes its condition (without the condition) and is
dropped from a row that does not, so that row gets nothing from it, bit for bit. The scores
come from :func:`prompt_scores`, which ``steerlab condition fit`` uses too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from steerlab.core.condition import Condition
from steerlab.core.errors import SteerlabError
from steerlab.core.steering import Steering
from steerlab.hf.layers import LayerMap
from steerlab.hf.reading import Item, read_activations


def prompt_scores(
    model: nn.Module,
    layer_map: LayerMap,
    prompts: Sequence[Sequence[int]],
    condition: Condition,
    *,
    pad_id: int = 0,
    batch_size: int = 16,
) -> list[float]:
    """The condition's score of each prompt (token ids): the projection of its unsteered
    ``layer`` activation (at the condition vector's site) onto the unit direction, averaged
    as ``condition.reduce`` says."""
    if condition.layer >= layer_map.num_layers:
        raise SteerlabError(
            f"condition layer {condition.layer} does not exist: the model has layers "
            f"0..{layer_map.num_layers - 1}"
        )
    d = int(condition.vector.directions[condition.layer].shape[-1])
    items = []
    for ids in prompts:
        if not ids:
            raise SteerlabError("a condition needs a non-empty prompt")
        start, end = condition.span(len(ids))
        items.append(Item(list(ids), start, end, True))
    unit = condition.unit()
    scores = [0.0] * len(items)
    for index, reads in read_activations(
        model,
        layer_map,
        items,
        [condition.layer],
        batch_size=batch_size,
        pad_id=pad_id,
        site=condition.vector.site,  # read where the condition vector was read
    ):
        if reads.shape[-1] != d:
            raise SteerlabError(
                f"the condition vector has d={d} but the model's hidden size is {reads.shape[-1]}"
            )
        for i, value in zip(index, (reads[:, 0] @ unit).tolist(), strict=True):
            scores[i] = float(value)
    return scores


def has_conditions(rows: Sequence[Steering] | Sequence[Sequence[Steering]]) -> bool:
    flat = rows if rows and isinstance(rows[0], Steering) else [s for r in rows for s in r]  # type: ignore[union-attr]
    return any(s.condition is not None for s in flat)  # type: ignore[union-attr]


@torch.no_grad()
def resolve_conditions(
    model: nn.Module,
    layer_map: LayerMap,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: Sequence[Steering] | Sequence[Sequence[Steering]],
    pad_id: int = 0,
) -> Sequence[Steering] | Sequence[Sequence[Steering]]:
    """Per-row steerings without conditions, decided on the left-padded prompts.

    Returns ``rows`` unchanged when no steering has a condition.
    """
    if not has_conditions(rows):
        return rows
    batch = int(input_ids.shape[0])
    per_row: list[list[Steering]] = (
        [list(rows) for _ in range(batch)]  # type: ignore[arg-type]
        if isinstance(rows[0], Steering)
        else [list(r) for r in rows]  # type: ignore[arg-type]
    )
    if len(per_row) != batch:
        raise SteerlabError(f"steering was given for {len(per_row)} rows but the batch has {batch}")
    prompts = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(batch)]
    decided: dict[int, list[bool]] = {}  # id(condition) -> holds, per row
    plain: dict[int, Steering] = {}  # id(steering) -> the same steering without condition
    out: list[list[Steering]] = []
    for r, items in enumerate(per_row):
        kept = []
        for s in items:
            cond = s.condition
            if cond is None:
                kept.append(s)
                continue
            if id(cond) not in decided:
                scores = prompt_scores(model, layer_map, prompts, cond, pad_id=pad_id)
                decided[id(cond)] = [cond.holds(x) for x in scores]
            if decided[id(cond)][r]:
                # one replacement per steering object, so identical rows share a plan column
                kept.append(plain.setdefault(id(s), dataclasses.replace(s, condition=None)))
        out.append(kept)
    return out
