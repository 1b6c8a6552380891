"""What to steer: one vector, operator, multiplier, set of layers, position policy and scale.

A :class:`Steering` is an engine-independent value; :mod:`steerlab.core.plan` turns the
steerings of a batch into the per-token changes that every engine applies. Operators
(docs/design.md, "Operators"): ``add`` adds ``multiplier * v``; ``ablate`` projects the
direction out (``h <- h - (h.u)u``, ``u = v/|v|``); ``clamp`` keeps the projection ``h.u``
inside ``[lo, hi]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from steerlab.core.condition import Condition
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy, Span
from steerlab.core.vector import SITES, Site, SteeringVector

Scale = Literal["absolute", "relative"]
Operator = Literal["add", "ablate", "clamp"]
OPERATORS: tuple[str, ...] = ("add", "ablate", "clamp")


@dataclass(frozen=True)
class Steering:
    """One vector applied with one operator, set of layers and position policy.

    Args:
        vector: the steering vector.
        multiplier: alpha in ``h <- h + alpha * v`` (operator ``add`` only; ``ablate`` and
            ``clamp`` take 1, the default, or 0 for "off").
        layers: the layers to steer (default: every layer of the vector).
        policy: a :class:`Policy` or its name, e.g. ``after-prompt``.
        scale: ``absolute`` adds ``alpha * v``; ``relative`` adds a vector of norm
            ``alpha * (mean residual norm at that layer)`` in the direction of ``v``.
        operator: ``add`` (the default), ``ablate`` (project ``v``'s direction out of the
            hidden state) or ``clamp`` (keep the projection onto ``v/|v|`` in ``clamp``).
        clamp: ``(lo, hi)``, the range of the projection for operator ``clamp``; ends may
            be equal (pin the projection to a value).
        condition: steer a row only when its prompt passes this :class:`Condition`
            (decided before decoding by :func:`steerlab.decode` and ``steerlab.generate``).
        site: where in each block: ``block`` (its output, the residual stream), ``attn``
            or ``mlp`` (what the attention or the MLP adds to it). Default: where the
            vector was read (its ``layer_convention``).
    """

    vector: SteeringVector
    multiplier: float = 1.0
    layers: tuple[int, ...] | None = None
    policy: Policy = field(default_factory=Policy)
    scale: Scale = "absolute"
    operator: Operator = "add"
    clamp: tuple[float, float] | None = None
    condition: Condition | None = None
    site: Site | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if not math.isfinite(self.multiplier):
            raise SteerlabError(f"multiplier must be a finite number, got {self.multiplier}")
        if self.scale not in ("absolute", "relative"):
            raise SteerlabError(f"scale must be 'absolute' or 'relative', got {self.scale!r}")
        layers = tuple(self.vector.layers if self.layers is None else self.layers)
        missing = [layer for layer in layers if layer not in self.vector.directions]
        if missing:
            raise SteerlabError(
                f"the vector has no layer {missing[0]}: it has layers "
                f"{','.join(map(str, self.vector.layers))}"
            )
        object.__setattr__(self, "layers", layers)
        self._check_operator(layers)
        site = self.vector.site if self.site is None else self.site
        if site not in SITES:
            raise SteerlabError(f"site must be one of {', '.join(SITES)}, got {site!r}")
        object.__setattr__(self, "site", site)
        if self.condition is not None:
            if not isinstance(self.condition, Condition):
                raise SteerlabError("condition must be a steerlab Condition")
            try:  # the vector's own model check, against the steering vector's model
                self.condition.vector.check_model(self.vector.model)
            except SteerlabError as exc:
                raise SteerlabError(
                    f"the condition vector was made on another model than the steering "
                    f"vector ({exc})"
                ) from None
        if (self.policy.kind == "actadd") != self.vector.positionwise:
            raise SteerlabError(
                "policy actadd needs a position-wise (k x d) vector from `steerlab extract "
                "--format actadd`, and a position-wise vector needs policy actadd"
            )
        if self.scale == "relative":
            absent = [layer for layer in layers if layer not in self.vector.residual_norms]
            if absent:
                raise SteerlabError(
                    f"--scale relative needs the residual norm of layer {absent[0]}, which the "
                    "vector does not record: use --scale absolute"
                )
        layer = self.overflowing_layer(torch.float32)
        if layer is not None:
            raise SteerlabError(
                f"multiplier {self.multiplier:g} times the vector overflows float32 at "
                f"layer {layer}: use a smaller multiplier"
            )

    def _check_operator(self, layers: tuple[int, ...]) -> None:
        if self.operator not in OPERATORS:
            raise SteerlabError(
                f"operator must be one of {', '.join(OPERATORS)}, got {self.operator!r}"
            )
        if self.operator == "add":
            if self.clamp is not None:
                raise SteerlabError("clamp=(lo, hi) needs operator 'clamp'")
            return
        what = f"operator {self.operator}"
        if self.multiplier not in (0.0, 1.0):
            raise SteerlabError(
                f"multiplier applies to operator add only: leave it at 1 for {what} "
                "(0 turns it off)"
            )
        if self.scale != "absolute":
            raise SteerlabError(f"scale relative applies to operator add only, not {what}")
        if self.vector.positionwise:
            raise SteerlabError(f"{what} needs one direction per layer, not a position-wise vector")
        if self.operator == "clamp":
            if self.clamp is None:
                raise SteerlabError("operator clamp needs clamp=(lo, hi), the projection's range")
            try:
                lo, hi = (float(x) for x in self.clamp)
            except (TypeError, ValueError):
                raise SteerlabError("clamp must be two numbers (lo, hi)") from None
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise SteerlabError(f"clamp range ({lo:g}, {hi:g}) must have finite ends")
            if lo > hi:
                raise SteerlabError(f"clamp range ({lo:g}, {hi:g}) has lo > hi: swap the ends")
            object.__setattr__(self, "clamp", (lo, hi))
        elif self.clamp is not None:
            raise SteerlabError("clamp=(lo, hi) needs operator 'clamp', not 'ablate'")
        for layer in layers:
            norm = float(self.vector.directions[layer].norm())
            if not (math.isfinite(norm) and norm > 0.0):
                raise SteerlabError(
                    f"{what} needs a non-zero direction, but the vector is zero (or not finite) "
                    f"at layer {layer}"
                )

    @property
    def projects(self) -> bool:
        """Whether this steering acts on the projection onto its direction (ablate, clamp)."""
        return self.operator != "add"

    @property
    def projection_range(self) -> tuple[float, float]:
        """The range ``ablate`` (0, 0) or ``clamp`` keeps the projection onto ``u`` in."""
        return (0.0, 0.0) if self.operator == "ablate" else self.clamp or (0.0, 0.0)

    def unit(self, layer: int) -> torch.Tensor:
        """The float32 unit direction ``u = v/|v|`` at ``layer``."""
        return self.vector.unit(layer)

    @property
    def steered_layers(self) -> tuple[int, ...]:
        """The layers this steering adds to (``layers`` after validation)."""
        return self.layers or ()

    def span(self, prompt_len: int, marker_at: int | None = None) -> Span:
        """The steered span of one row under this steering's policy."""
        return self.policy.span(prompt_len, marker_at, rows=self.vector.rows)

    def with_multiplier(self, multiplier: float) -> Steering:
        """The same steering with another multiplier."""
        return Steering(
            self.vector,
            multiplier,
            self.layers,
            self.policy,
            self.scale,
            self.operator,
            self.clamp,
            self.condition,
            self.site,
        )

    def factor(self, layer: int) -> float:
        """What the vector at ``layer`` is multiplied by: the multiplier, or for the
        ``relative`` scale the multiplier times the residual norm over the vector's norm
        (per row of a position-wise vector)."""
        if self.scale == "absolute":
            return self.multiplier
        v = self.vector.directions[layer]
        norm = float(v.norm()) / math.sqrt(v.shape[0]) if v.dim() == 2 else float(v.norm())
        if norm == 0.0:
            return 0.0
        return self.multiplier * self.vector.residual_norms[layer] / norm

    def overflowing_layer(self, dtype: torch.dtype) -> int | None:
        """The first steered layer whose :meth:`delta` has an entry that is not finite in
        ``dtype`` (None: none; ablate and clamp add no multiple). One tensor operation for
        all layers, from each direction's largest entry (:meth:`SteeringVector.peaks`): a
        front door runs it on every request."""
        if self.operator != "add" or not self.layers:
            return None
        layers = self.steered_layers
        peaks = self.vector.peaks(layers)
        if self.scale == "absolute":
            largest = peaks * self.multiplier  # rounds as ``direction * multiplier`` does
        else:
            largest = peaks * torch.tensor([self.factor(x) for x in layers], dtype=torch.float32)
        finite = torch.isfinite(largest.to(dtype))
        if bool(finite.all()):
            return None
        return layers[int(torch.nonzero(~finite)[0, 0])]

    def delta(self, layer: int) -> torch.Tensor:
        """The float32 tensor added at ``layer`` (``[d]`` or ``[k, d]``)."""
        v = self.vector.directions[layer]
        if self.scale == "absolute":
            return v * self.multiplier
        return v * self.factor(layer)


def operator_fields(item: Mapping[str, Any]) -> tuple[Operator, tuple[float, float] | None]:
    """``operator`` and ``clamp`` of a JSON steering entry (a server's or vLLM's request).

    Raises:
        SteerlabError: one line naming the field and the fix (the caller names the entry).
    """
    operator = item.get("operator", "add")
    if operator not in OPERATORS:
        raise SteerlabError(f"operator must be one of {', '.join(OPERATORS)}")
    raw = item.get("clamp")
    if raw is None:
        return operator, None
    if (
        not isinstance(raw, (list, tuple))
        or len(raw) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw)
    ):
        raise SteerlabError("clamp must be [lo, hi], two numbers")
    return operator, (float(raw[0]), float(raw[1]))


def site_field(item: Mapping[str, Any]) -> Site | None:
    """``site`` of a JSON steering entry (None: the vector's own site)."""
    site = item.get("site")
    if site is not None and site not in SITES:
        raise SteerlabError(f"site must be one of {', '.join(SITES)}")
    return site  # type: ignore[no-any-return]


def as_steerings(
    vector: SteeringVector | Steering | Sequence[Steering],
    multiplier: float = 1.0,
    layers: Sequence[int] | None = None,
    policy: str | Policy = "after-prompt",
    scale: Scale = "absolute",
) -> list[Steering]:
    """Normalise the ways of naming steering into a list of :class:`Steering`."""
    if isinstance(vector, SteeringVector):
        return [
            Steering(
                vector,
                multiplier,
                None if layers is None else tuple(layers),
                Policy.parse(policy),
                scale,
            )
        ]
    if isinstance(vector, Steering):
        return [vector]
    return list(vector)
