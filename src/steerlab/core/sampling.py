"""Decoding settings shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass

from steerlab.core.errors import SteerlabError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings.

    Args:
        max_new_tokens: tokens to generate per row.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass (with temperature > 0).
        seed: seed for sampling.
        stop_at_eos: stop a row at its EOS token.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SteerlabError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise SteerlabError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SteerlabError(f"top_p must be in (0, 1], got {self.top_p}")
