"""Conditional steering (CAST): a steering that applies to a row only when its prompt
projects onto a condition vector past a threshold (docs/design.md, "Conditions").

A :class:`Condition` is decided once per row, before decoding, from the unsteered prompt's
activations at one layer: the mean (or the last token) of ``h.u`` over the prompt, with
``u`` the condition vector's unit direction there. Rows where it does not hold get nothing
from that steering, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

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
