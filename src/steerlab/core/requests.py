"""The one steering request schema: JSON entries to validated :class:`Steering` values.

A request (steerlab's server, or vLLM's ``extra_args``) carries a list of entries
``{vector, multiplier?, layers?, policy?, scale?, operator?, clamp?, site?, condition?}``.
Every engine's front door parses them here, against its :class:`Rules` (the served model's
layers and context, the engine's capabilities, the limits), so a request that an engine
cannot run exactly is refused where it enters, never in a forward pass. Each front door
maps :class:`EntryError` to its own error type (an HTTP 400/404, vLLM's validation error).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.core.condition import Condition
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.steering import Steering, operator_fields, site_field
from steerlab.core.vector import SteeringVector

KEY = "steering"
MAX_LAYER_ENTRIES = 4096  # longer layer lists are refused before they are looked at


class EntryError(SteerlabError):
    """A steering entry that cannot be served: one line, the field it names, and the HTTP
    status a server answers with (404 for an unknown vector, else 400)."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.status = field, status


@dataclass(frozen=True)
class Rules:
    """What a front door accepts.

    Attributes:
        num_layers: the served model's decoder blocks (a layer beyond them is refused).
        context: the served model's context; window bounds beyond it are refused.
        max_steerings: entries per request.
        max_multiplier: the cap on the *sum* of |multiplier| of the additions at any one
            layer of one request (so repeating an entry cannot exceed it).
        transient, sites, conditions: what the engine runs; others are refused naming the
            engine that does (``other_engine``).
        max_projections: ablate/clamp entries at one layer (None: no limit).
        dtype: the residual stream's dtype; a delta that overflows it is refused.
    """

    num_layers: int
    context: int | None = None
    max_steerings: int = 8
    max_multiplier: float = 1000.0
    transient: bool = True
    sites: bool = True
    conditions: bool = True
    max_projections: int | None = None
    dtype: torch.dtype | None = None
    other_engine: str = "the Hugging Face engine"


def entries_of(raw: Any) -> list[Any]:
    """A request's entries: a list, or a JSON string of one (vLLM's ``vllm_xargs``)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise EntryError("'steering' is not valid JSON", KEY) from None
    if not isinstance(raw, list):
        raise EntryError("'steering' must be a list of {vector, multiplier, layers?, policy?}", KEY)
    return raw


def _unknown(name: Any, where: str, vectors: Mapping[str, SteeringVector]) -> EntryError:
    known = ", ".join(sorted(vectors)) or "none"
    shown = name[:64] if isinstance(name, str) else name
    return EntryError(
        f"unknown vector {shown!r} in {where}: known vectors are {known}", f"{where}.vector", 404
    )


def _number(value: Any, where: str, bound: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EntryError(f"{where} must be a finite number", where)
    x = float(value) if isinstance(value, float) or abs(value) < 10**18 else math.inf
    if not math.isfinite(x) or abs(x) > bound:
        raise EntryError(f"{where} must be within +/-{bound:g} (a finite number)", where)
    return x


def _layers(raw: Any, where: str, vector: SteeringVector, name: str, rules: Rules) -> Any:
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or not raw
        or len(raw) > MAX_LAYER_ENTRIES
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    ):
        raise EntryError(f"{where}.layers must be a non-empty list of integers", f"{where}.layers")
    if len(set(raw)) != len(raw):
        twice = next(x for x in raw if raw.count(x) > 1)
        raise EntryError(
            f"{where}.layers names layer {twice} twice: list each layer once (raise the "
            "multiplier instead)",
            f"{where}.layers",
        )
    for x in raw:
        if not 0 <= x < rules.num_layers:
            raise EntryError(
                f"{where}: layer {x} does not exist in the served model (layers 0.."
                f"{rules.num_layers - 1})",
                f"{where}.layers",
            )
        if x not in vector.directions:
            raise EntryError(
                f"{where}: vector {name!r} has no layer {x} (it has "
                f"{','.join(map(str, vector.layers))})",
                f"{where}.layers",
            )
    return tuple(raw)


def _policy(raw: Any, where: str, rules: Rules) -> Policy:
    if not isinstance(raw, str) or len(raw) > 256:
        raise EntryError(f"{where}.policy must be a policy name", f"{where}.policy")
    try:
        policy = Policy.parse(raw)
    except SteerlabError as exc:
        raise EntryError(f"{where}: {exc}", f"{where}.policy") from None
    if policy.kind == "window" and rules.context is not None:
        top = max(policy.start, policy.stop or 0)
        if top >= rules.context:
            raise EntryError(
                f"{where}: {policy} reaches past the model's context of {rules.context} tokens: "
                "give window bounds below it",
                f"{where}.policy",
            )
    if not policy.persisting and not rules.transient:
        raise EntryError(
            f"{where}: policy transient needs two passes per token, which this engine does "
            f"not run: use {rules.other_engine}",
            f"{where}.policy",
        )
    return policy


def _condition(
    raw: Any, where: str, vectors: Mapping[str, SteeringVector], rules: Rules
) -> Condition | None:
    """``{vector, layer, threshold, above?, reduce?}``: steer only prompts that pass."""
    if raw is None:
        return None
    if not rules.conditions:
        raise EntryError(
            f"{where}: conditional steering reads the prompt before decoding, which this "
            f"engine does not do: use {rules.other_engine}",
            where,
        )
    if not isinstance(raw, dict):
        raise EntryError(f"{where} must be an object {{vector, layer, threshold}}", where)
    name = raw.get("vector")
    if not isinstance(name, str) or name not in vectors:
        raise _unknown(name, where, vectors)
    layer = raw.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise EntryError(f"{where}.layer must be an integer", f"{where}.layer")
    threshold = _number(raw.get("threshold"), f"{where}.threshold", 1e9)
    above = raw.get("above", True)
    if not isinstance(above, bool):
        raise EntryError(f"{where}.above must be true or false", f"{where}.above")
    reduce = raw.get("reduce", "mean")
    if reduce not in ("mean", "last"):
        raise EntryError(f"{where}.reduce must be 'mean' or 'last'", f"{where}.reduce")
    try:
        return Condition(vectors[name], layer, threshold, above, reduce)
    except SteerlabError as exc:
        raise EntryError(f"{where}: {exc}", where) from None


def parse_entry(
    item: Any, where: str, vectors: Mapping[str, SteeringVector], rules: Rules
) -> Steering:
    """One validated entry (see :func:`parse_steerings`)."""
    if not isinstance(item, dict):
        raise EntryError(f"{where} must be an object", where)
    name = item.get("vector")
    if not isinstance(name, str) or name not in vectors:
        raise _unknown(name, where, vectors)
    vector = vectors[name]
    multiplier = _number(item.get("multiplier", 1.0), f"{where}.multiplier", rules.max_multiplier)
    layers = _layers(item.get("layers"), where, vector, name, rules)
    policy = _policy(item.get("policy", "after-prompt"), where, rules)
    condition = _condition(item.get("condition"), f"{where}.condition", vectors, rules)
    try:
        operator, clamp = operator_fields(item)
        site = site_field(item)
        steering = Steering(
            vector,
            multiplier,
            layers,
            policy,
            item.get("scale", "absolute"),
            operator,
            clamp,
            condition,
            site,
        )
    except SteerlabError as exc:
        raise EntryError(f"{where}: {exc}", where) from None
    if steering.site != "block" and not rules.sites:
        raise EntryError(
            f"{where}: site {steering.site!r} is steered by {rules.other_engine} only; this "
            "engine steers block outputs (use a block-output vector)",
            f"{where}.site",
        )
    missing = [x for x in steering.steered_layers if x >= rules.num_layers]
    if missing:
        raise EntryError(
            f"{where}: layer {missing[0]} does not exist in the served model (layers 0.."
            f"{rules.num_layers - 1})",
            f"{where}.layers",
        )
    layer = None if rules.dtype is None else steering.overflowing_layer(rules.dtype)
    if layer is not None:
        raise EntryError(
            f"{where}: multiplier {multiplier:g} times vector {name!r} overflows the "
            f"model's {str(rules.dtype).removeprefix('torch.')} at layer {layer}: use a "
            "smaller multiplier",
            f"{where}.multiplier",
        )
    return steering


def parse_steerings(
    raw: Any, vectors: Mapping[str, SteeringVector], rules: Rules
) -> list[Steering]:
    """A request's validated steerings (``raw``: its entries, None for none).

    Raises:
        EntryError: one line naming the entry, its field, the problem and the fix.
    """
    if raw is None:
        return []
    entries = entries_of(raw)
    if len(entries) > rules.max_steerings:
        raise EntryError(f"at most {rules.max_steerings} steerings per request", KEY)
    steerings = [
        parse_entry(item, f"steering[{i}]", vectors, rules) for i, item in enumerate(entries)
    ]
    check_totals(steerings, rules)
    return steerings


def check_totals(steerings: Sequence[Steering], rules: Rules) -> None:
    """The caps over a request's entries together: the sum of |multiplier| of the
    additions at each layer, and the ablate/clamp entries at each layer.

    Raises:
        EntryError: naming the layer and the cap.
    """
    added: dict[int, float] = {}
    projections: dict[int, int] = {}
    for s in steerings:
        for layer in s.steered_layers:
            if s.projects:
                projections[layer] = projections.get(layer, 0) + (s.multiplier != 0)
            else:
                added[layer] = added.get(layer, 0.0) + abs(s.multiplier)
    for layer, total in sorted(added.items()):
        if total > rules.max_multiplier:
            raise EntryError(
                f"the steerings add {total:g} times their vectors at layer {layer}, above this "
                f"server's cap of {rules.max_multiplier:g} on the sum of |multiplier| per layer",
                KEY,
            )
    if rules.max_projections is not None:
        for layer, count in sorted(projections.items()):
            if rules.max_projections == 0:
                raise EntryError(
                    f"ablate/clamp at layer {layer} needs projection rounds this engine was "
                    "started without: start the vLLM server with STEERLAB_PROJECTIONS=1 (or "
                    "more), or use the Hugging Face engine",
                    KEY,
                )
            if count > rules.max_projections:
                raise EntryError(
                    f"{count} ablate/clamp steerings at layer {layer}: this engine applies at "
                    f"most {rules.max_projections} per layer (set STEERLAB_PROJECTIONS on the "
                    "vLLM server, or use the Hugging Face engine)",
                    KEY,
                )
