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
    """

    tokens: torch.Tensor
    lengths: list[int]
    logits: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    unsteered_logprobs: torch.Tensor | None = None
