"""The reference semantics of docs/design.md, written plainly: no cache, no batching.

At every step the whole sequence is recomputed from scratch and each steering applies its
operator at its site (the block's output, or its attention's or MLP's) at exactly the
positions its policy names: ``add`` adds its vector, ``ablate`` and
``clamp`` replace the projection ``h.u`` onto the unit direction by 0 or by its value clamped
to the range. At a layer the projection operators act first, in the order given, then the
additions. Slow on purpose; the tests hold the
fast implementations in :mod:`steerlab.hf.hooks` and :mod:`steerlab.hf.decoding` to it.
The positions come from :meth:`steerlab.core.policy.Policy.span`, as in every engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerlab.core.policy import marker_end
from steerlab.core.steering import Steering
from steerlab.hf.layers import (
    LayerMap,
    block_output,
    find_layers,
    input_device,
    replace_block_output,
)


def steered_positions(
    steering: Steering, prompt_len: int, seq_len: int, marker_at: int | None = None
) -> list[int]:
    """The set S of docs/design.md for one sequence of ``seq_len`` tokens, as a sorted list."""
    return steering.span(prompt_len, marker_at).positions(seq_len)


@torch.no_grad()
def reference_logits(
    model: nn.Module,
    ids: Sequence[int],
    prompt_len: int,
    steerings: Sequence[Steering],
    layer_map: LayerMap | None = None,
    tokenizer: Any = None,
) -> torch.Tensor:
    """Logits ``[seq, vocab]`` of one unpadded sequence with each steering at its set S."""
    layer_map = layer_map or find_layers(model)
    handles = []
    try:
        ordered = [s for s in steerings if s.projects] + [s for s in steerings if not s.projects]
        for s in ordered:
            if s.multiplier == 0.0:
                continue
            marker_at = None
            if s.policy.needs_marker:
                marker_at = marker_end(tokenizer, list(ids[:prompt_len]), str(s.policy.marker))
            positions = steered_positions(s, prompt_len, len(ids), marker_at)
            for layer in s.steered_layers:
                module = layer_map.site(layer, str(s.site))
                if s.projects:
                    handles.append(
                        module.register_forward_hook(
                            _projection_hook(s.unit(layer), *s.projection_range, positions)
                        )
                    )
                    continue
                delta = s.delta(layer)

                def hook(
                    module: nn.Module,
                    args: Any,
                    output: Any,
                    delta: torch.Tensor = delta,
                    positions: list[int] = positions,
                    actadd: bool = s.policy.kind == "actadd",
                ) -> Any:
                    flat = block_output(output)
                    hidden = flat.clone().view(1, -1, flat.shape[-1])  # [1, seq, d]
                    for t in positions:
                        row = delta[t] if actadd else delta
                        hidden[0, t] = hidden[0, t] + row.to(hidden.dtype)
                    return replace_block_output(output, hidden.view(flat.shape))

                handles.append(module.register_forward_hook(hook))
        tensor = torch.tensor([list(ids)], device=input_device(model))
        return model(input_ids=tensor, use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def _projection_hook(unit: torch.Tensor, lo: float, hi: float, positions: list[int]) -> Any:
    """A hook that sets ``h.u`` to ``clamp(h.u, lo, hi)`` at each position, one by one."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        flat = block_output(output)
        hidden = flat.clone().view(1, -1, flat.shape[-1])  # [1, seq, d]
        u = unit.to(hidden.device, hidden.dtype)
        for t in positions:
            h = hidden[0, t]
            p = torch.dot(h, u)
            hidden[0, t] = h + (p.clamp(lo, hi) - p) * u
        return replace_block_output(output, hidden.view(flat.shape))

    return hook


@torch.no_grad()
def reference_generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    steerings: Sequence[Steering],
    max_new_tokens: int,
    layer_map: LayerMap | None = None,
    tokenizer: Any = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full recomputation at every step.

    Returns:
        The generated ids and the per-step logits ``[n, vocab]``.
    """
    seq = list(prompt_ids)
    prompt_len = len(seq)
    steps = []
    for _ in range(max_new_tokens):
        logits = reference_logits(model, seq, prompt_len, steerings, layer_map, tokenizer)[-1]
        steps.append(logits)
        seq.append(int(logits.argmax()))
    return seq[prompt_len:], torch.stack(steps)
