"""Where each token of a Hugging Face forward sits: its row-relative position, whether it is
real (not padding), and whether the forward starts a sequence (docs/design.md, "Coordinates").
"""

from __future__ import annotations

from typing import Any

import torch


def token_positions(
    kwargs: dict[str, Any], batch: int, cur: int, device: torch.device, compiling: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Each token's position relative to its row's first real token, which tokens are real,
    and whether this forward is a prefill (it starts a sequence).

    Sources, best first: a 2D attention mask (dynamic caches, plain forwards); the
    ``position_ids`` that ``generate`` passes (static caches hand the blocks a 4D mask),
    with left padding, as ``generate`` requires for decoder-only models; the cache length.
    Inside a compiled graph nothing is read back to the host: such a forward is a decoding
    step (``generate`` runs the prefill uncompiled).
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        past = int(mask.shape[1]) - cur
        counts = mask.long().cumsum(-1)  # [batch, past + cur]
        t = counts[:, past:] - 1  # position relative to the row's first real token
        return t, mask[:, past:].bool(), past == 0
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        t = positions.to(device).long().expand(batch, cur)  # [batch, cur]
        if compiling:
            return t, torch.ones(batch, cur, dtype=torch.bool, device=device), False
        prefill = bool((t[:, 0] == 0).any())  # a sequence starts at position 0
        if not prefill:
            return t, torch.ones(batch, cur, dtype=torch.bool, device=device), False
        # Left padding: a row of P real tokens ends the batch, so its last P columns are real.
        lengths = t[:, -1:] + 1  # [batch, 1]
        columns = torch.arange(cur, device=device).unsqueeze(0)  # [1, cur]
        return t, columns >= cur - lengths, True
    past = 0 if compiling else _cache_length(kwargs)
    t = torch.arange(past, past + cur, device=device).expand(batch, cur)
    return t, torch.ones(batch, cur, dtype=torch.bool, device=device), past == 0 and not compiling


def _cache_length(kwargs: dict[str, Any]) -> int:
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0
