"""What reading a vector's projections gives (``steerlab inspect``): per-token values and how
well a layer separates a dataset's sides. Data only; the Hugging Face engine computes them
(:mod:`steerlab.hf.projection`), :mod:`steerlab.evaluation.pages` shows them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector


@dataclass(frozen=True)
class TokenProjections:
    """The projection of each token of one text onto a vector at one layer.

    Attributes:
        pieces: each token's text (pieces concatenate to the decoded text).
        values: each token's projection onto the unit vector.
        scale: the colour scale's end, ``max |value|`` over the tokens after the first
            (the first token's residual is often an outlier, an attention sink; it is
            clipped to the scale rather than setting it).
    """

    pieces: tuple[str, ...]
    values: tuple[float, ...]
    layer: int
    scale: float
    vector_name: str
    model_name: str


@dataclass(frozen=True)
class Contrast:
    """How one layer of a vector separates a dataset's positive and negative examples."""

    positive: tuple[float, ...]
    negative: tuple[float, ...]
    auc: float
    layer: int
    read_position: str

    @property
    def verdict(self) -> str:
        if self.auc >= 0.8:
            return "separates the examples well"
        if self.auc >= 0.6:
            return "separates the examples weakly"
        if self.auc > 0.4:
            return "does not separate the examples"
        return "separates them the other way round (the sign is flipped)"


def check_layer(vector: SteeringVector, layer: int) -> None:
    if layer not in vector.directions:
        have = ", ".join(str(x) for x in vector.layers)
        raise SteerlabError(f"the vector has no layer {layer}: pick one of {have} with --layer")
    if vector.positionwise:
        raise SteerlabError(
            "an ActAdd (position-wise) vector has one direction per position: inspect a "
            "mean-difference vector instead"
        )


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / n·m)."""
    if not positive or not negative:
        raise SteerlabError("the AUC needs positive and negative examples")
    pos = torch.tensor(list(positive), dtype=torch.float64)
    neg = torch.tensor(list(negative), dtype=torch.float64)
    above = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((above + 0.5 * ties) / (len(pos) * len(neg)))
