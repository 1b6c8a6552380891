"""What a decoding run returns, whatever the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Decoded:
    """Output of a decoding run.

    Attributes:
        tokens: ``[batch, n]`` generated ids (rows that stopped early are padded with EOS).
        lengths: generated tokens per row, EOS included.
        logits: per-step steered logits ``[batch, n, vocab]`` when requested.
        kl: per-step KL(steered || unsteered) ``[batch, n]`` when ``track_unsteered``.
        unsteered_logprobs: log-probability of each generated token under the unsteered
            model ``[batch, n]`` when ``track_unsteered``.
        changes: with ``top_changes=k``, the ``k`` tokens per step whose probability the
            steering changed most ``[batch, n, k]``.
        change_probs: their probabilities, steered then unsteered ``[batch, n, k, 2]``.
    """

    tokens: torch.Tensor
    lengths: list[int]
    logits: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    unsteered_logprobs: torch.Tensor | None = None
    changes: torch.Tensor | None = None
    change_probs: torch.Tensor | None = None
