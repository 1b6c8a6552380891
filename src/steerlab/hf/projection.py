"""Projections of activations onto a vector on the Hugging Face engine (``steerlab inspect``):
each token of a text, and the contrast of a dataset's positive and negative examples."""

from __future__ import annotations

import torch

from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.projections import Contrast, TokenProjections, auc, check_layer
from steerlab.core.prompts import prompt_ids, token_pieces
from steerlab.core.vector import SteeringVector
from steerlab.hf.engine import LoadedModel
from steerlab.hf.layers import input_device


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
