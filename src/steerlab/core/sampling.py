"""Decoding settings shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass

from steerlab.core.errors import SteerlabError

#: Temperatures below this decode greedily (their limit): dividing logits by 1e-300 would
#: overflow the softmax.
MIN_TEMPERATURE = 1e-3
#: The smallest nucleus: top_p below it keeps only the most likely token (its limit).
MIN_TOP_P = 1e-6


def limit_temperature(temperature: float) -> float:
    """The temperature decoding uses: below :data:`MIN_TEMPERATURE`, 0 (greedy, its limit)."""
    return 0.0 if temperature < MIN_TEMPERATURE else temperature


@dataclass(frozen=True)
class Sampling:
    """Decoding settings.

    Args:
        max_new_tokens: tokens to generate per row.
        temperature: 0 for greedy decoding (and anything below :data:`MIN_TEMPERATURE`).
        top_p: nucleus sampling mass (with temperature > 0); the most likely token is
            always kept.
        seed: seed for sampling: every row draws from its own generator (row ``r`` of a
            batch seeded with ``seed + r``), so a row's tokens do not depend on its
            batch-mates. None draws fresh randomness.
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
        object.__setattr__(self, "temperature", limit_temperature(self.temperature))
