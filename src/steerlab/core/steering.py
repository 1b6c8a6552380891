"""What to steer: one vector, multiplier, set of layers, position policy and scale.

A :class:`Steering` is an engine-independent value; :mod:`steerlab.core.plan` turns the
steerings of a batch into the per-token deltas that every engine adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy, Span
from steerlab.core.vector import SteeringVector

Scale = Literal["absolute", "relative"]


@dataclass(frozen=True)
class Steering:
    """One vector applied with one multiplier, set of layers and position policy.

    Args:
        vector: the steering vector.
        multiplier: alpha in ``h <- h + alpha * v``.
        layers: the layers to steer (default: every layer of the vector).
        policy: a :class:`Policy` or its name, e.g. ``after-prompt``.
        scale: ``absolute`` adds ``alpha * v``; ``relative`` adds a vector of norm
            ``alpha * (mean residual norm at that layer)`` in the direction of ``v``.
    """

    vector: SteeringVector
    multiplier: float = 1.0
    layers: tuple[int, ...] | None = None
    policy: Policy = field(default_factory=Policy)
    scale: Scale = "absolute"

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
        for layer in layers:
            if not bool(torch.isfinite(self.delta(layer)).all()):
                raise SteerlabError(
                    f"multiplier {self.multiplier:g} times the vector overflows float32 at "
                    f"layer {layer}: use a smaller multiplier"
                )

    @property
    def steered_layers(self) -> tuple[int, ...]:
        """The layers this steering adds to (``layers`` after validation)."""
        return self.layers or ()

    def span(self, prompt_len: int, marker_at: int | None = None) -> Span:
        """The steered span of one row under this steering's policy."""
        return self.policy.span(prompt_len, marker_at, rows=self.vector.rows)

    def with_multiplier(self, multiplier: float) -> Steering:
        """The same steering with another multiplier."""
        return Steering(self.vector, multiplier, self.layers, self.policy, self.scale)

    def delta(self, layer: int) -> torch.Tensor:
        """The float32 tensor added at ``layer`` (``[d]`` or ``[k, d]``)."""
        v = self.vector.directions[layer]
        if self.scale == "absolute":
            return v * self.multiplier
        norm = float(v.norm()) / math.sqrt(v.shape[0]) if v.dim() == 2 else float(v.norm())
        if norm == 0.0:
            return v * 0.0
        return v * (self.multiplier * self.vector.residual_norms[layer] / norm)


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
