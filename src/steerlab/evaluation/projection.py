"""What a vector sees: per-token projections onto it, and how well it separates a dataset.

The projection of a token is ``h · v / |v|``: the block output ``h`` of the vector's layer
(the same site steering adds to) onto the unit direction. :func:`token_projections` gives
it for every token of a text; :func:`contrast` scores every example of a dataset the way
extraction reads it and reports the AUC of positive against negative examples (0.5: no
separation; 1.0: every positive projects above every negative; below 0.5: the vector
points the other way). Rendering lives in :mod:`steerlab.evaluation.pages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import prompt_ids
from steerlab.core.vector import SteeringVector
from steerlab.hf.layers import input_device
from steerlab.hf.model import LoadedModel


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


def token_pieces(
    tokenizer: object, ids: Sequence[int], *, skip_special_tokens: bool = False
) -> list[str]:
    """Each token's text, so that the pieces concatenate to the decoded text.

    A token that ends half way through a multi-byte character gets ``""``; the character
    shows with the token that completes it.
    """
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(  # type: ignore[attr-defined]
            list(ids[: i + 1]), skip_special_tokens=skip_special_tokens
        )
        if text.endswith("\ufffd") and i < len(ids) - 1:
            pieces.append("")
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else text)
        before = text
    return pieces


@torch.no_grad()
def token_projections(
    lm: LoadedModel,
    text: str,
    vector: SteeringVector,
    layer: int,
    *,
    chat: bool = False,
    name: str = "vector",
) -> TokenProjections:
    """Project every token's block output at ``layer`` onto ``vector``.

    Raises:
        SteerlabError: an empty text, a text over the model's context, or a layer the
            vector lacks.
    """
    check_layer(vector, layer)
    if not text.strip():
        raise SteerlabError("the text is empty: give some text to inspect")
    ids = prompt_ids(lm.tokenizer, text, chat=chat)
    if len(ids) > lm.context_length:
        raise SteerlabError(
            f"the text is {len(ids)} tokens, over the model's context of {lm.context_length}: "
            "shorten it"
        )
    unit = vector.unit(layer)
    device = input_device(lm.model)
    out = lm.model(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states[layer + 1][0].float().cpu()  # [seq, d], the block's output
    values = (hidden @ unit).tolist()
    rest = values[1:] if len(values) > 1 else values
    scale = max(abs(v) for v in rest) or 1.0
    return TokenProjections(
        pieces=tuple(token_pieces(lm.tokenizer, ids)),
        values=tuple(float(v) for v in values),
        layer=layer,
        scale=float(scale),
        vector_name=name,
        model_name=lm.identity.name,
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


@torch.no_grad()
def contrast(
    lm: LoadedModel,
    dataset: Dataset,
    vector: SteeringVector,
    layer: int,
    *,
    chat: bool = True,
    read_position: str = "auto",
    batch_size: int = 16,
) -> Contrast:
    """Score every example of ``dataset`` as extraction reads it, and the AUC.

    Use a held-out file: on the vector's own training data the AUC is optimistic.
    """
    check_layer(vector, layer)
    from steerlab.hf.extraction import build_items
    from steerlab.hf.reading import read_activations

    items, used = build_items(lm, dataset, read_position, chat=chat)
    if not any(it.positive for it in items) or all(it.positive for it in items):
        raise SteerlabError(f"{dataset.info.path}: needs both positive and negative examples")
    unit = vector.unit(layer)
    scores = [0.0] * len(items)
    pad = lm.tokenizer.pad_token_id or 0
    for index, reads in read_activations(
        lm.model, lm.layers, items, [layer], batch_size=batch_size, pad_id=pad
    ):
        for i, value in zip(index, (reads[:, 0] @ unit).tolist(), strict=True):
            scores[i] = float(value)
    pos = tuple(s for s, it in zip(scores, items, strict=True) if it.positive)
    neg = tuple(s for s, it in zip(scores, items, strict=True) if not it.positive)
    return Contrast(pos, neg, auc(pos, neg), layer, used)
