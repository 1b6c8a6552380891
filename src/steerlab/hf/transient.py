"""Transient decoding at its physical cost (docs/design.md, "The transient decoding loop").

A transient steering at layer l changes nothing below l: the blocks up to l compute the
same in the steered and the unsteered pass. So one step runs the whole body once
unsteered (its keys and values persist), then only the blocks above l again, steered,
for the logits: the blocks up to l replay their outputs from the first pass, and the cache
is rewound by the new token for that pass and restored after it. That is about
``1 + (L - l - 1) / L`` forwards per token instead of 2, and exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from steerlab.hf.hooks import Steerer


def can_share(cache: Any) -> bool:
    """Whether the cache's layers can be rewound by reference (full-attention dynamic layers)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(
        type(layer).__name__ == "DynamicLayer"
        and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and layer.keys.dim() == 4
        for layer in layers
    )


@contextmanager
def _replaying(blocks: list[nn.Module], outputs: dict[int, Any]) -> Iterator[None]:
    """Blocks that return their recorded outputs instead of computing (hooks still run)."""
    try:
        for i, block in enumerate(blocks):
            block.forward = _replay(outputs[i])  # type: ignore[method-assign]
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _replay(output: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output

    return forward


def shared_step(
    steerer: Steerer,
    forward: Callable[[nn.Module, Any], Any],
    model: nn.Module,
    body: nn.Module,
    cache: Any,
    new_tokens: int,
    plain_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """One transient step: (steered logits ``[rows, vocab]``, unsteered logits or None, cache).

    Args:
        forward: runs a module on this step's tokens with the given cache.
        plain_logits: also return the unsteered pass's logits (it then runs the LM head).
    """
    blocks = list(steerer.layer_map.blocks)[: steerer.plan.unchanged_blocks]
    raw: dict[int, Any] = {}

    def record(i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            raw[i] = output  # before the steering hooks: they run after this one

        return hook

    handles = [b.register_forward_hook(record(i), prepend=True) for i, b in enumerate(blocks)]
    try:
        # Pass 1: no transient steering; these keys and values persist.
        kept = forward(model if plain_logits else body, cache)
    finally:
        for handle in handles:
            handle.remove()
    cache = cache_of(kept)
    plain = kept.logits[:, -1, :].float() if plain_logits else None
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    try:
        for layer in cache.layers:  # the cache as it was before this step's tokens
            layer.keys = layer.keys[:, :, :-new_tokens, :]
            layer.values = layer.values[:, :, :-new_tokens, :]
        # Pass 2: blocks up to `low` replay pass 1; the blocks above run with the newest
        # token steered, for this step's logits only.
        with _replaying(blocks, raw), steerer.logits_pass():
            out = forward(model, cache)
        logits = out.logits[:, -1, :].float()
    finally:
        for layer, (keys, values) in zip(cache.layers, saved, strict=True):
            layer.keys, layer.values = keys, values
    return logits, plain, cache


def cache_of(out: Any) -> Any:
    """The KV cache of a forward's output (``past_key_values`` in 4.x, ``cache`` in 5.x)."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)
