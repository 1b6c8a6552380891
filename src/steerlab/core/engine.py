"""The engine seam: what serving and the CLI need from a model runtime.

An engine runs a causal LM with per-row steering. The Hugging Face engine is
:class:`steerlab.hf.model.LoadedModel`; another engine (e.g. vLLM) implements the same
protocol over its own scheduler, computing positions with :mod:`steerlab.core.plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from steerlab.core.decoded import Decoded
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity

#: Called after every decoding step with the new tokens ``[batch]`` and the rows that are
#: done ``[batch]``; returns True to stop, or per-row flags of rows to finish now.
OnStep = Callable[[torch.Tensor, torch.Tensor], "bool | Sequence[bool] | torch.Tensor | None"]


class Engine(Protocol):
    """A model runtime that decodes batches of prompts, each row with its own steerings."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (Hugging Face API: ``__call__``, ``decode``, chat template)."""
        ...

    @property
    def identity(self) -> ModelIdentity:
        """Which model this is, as vectors record it."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype: a steering must stay finite in it."""
        ...

    @property
    def context_length(self) -> int:
        """The longest prompt + completion the model takes."""
        ...

    def decode_batch(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        sampling: Sampling,
        *,
        on_step: OnStep | None = None,
        explain: int = 0,
    ) -> Decoded:
        """Generate from unpadded prompt ids, one steering list per row.

        ``explain=k > 0`` also returns per-step KL from the unsteered model and the ``k``
        most changed tokens per step, on engines whose ``supports_explain`` is true.
        """
        ...


def complete(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    steering: Sequence[Sequence[Steering]],
    sampling: Sampling,
) -> list[str]:
    """The decoded completions (special tokens skipped) of one batch, on any engine."""
    out = engine.decode_batch(prompts, steering, sampling)
    return [
        engine.tokenizer.decode(out.tokens[r, : out.lengths[r]].tolist(), skip_special_tokens=True)
        for r in range(len(prompts))
    ]


def generate_multipliers(
    engine: Engine,
    prompt: str,
    steerings: Sequence[Steering],
    multipliers: Sequence[float],
    sampling: Sampling | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
) -> list[tuple[float, str]]:
    """One prompt, unsteered and at each multiplier, in one batch (one row per multiplier).

    Args:
        steerings: the steerings to apply; each row scales all of them by its multiplier.
        multipliers: the values to try; 0 is the unsteered row.

    Returns:
        ``(multiplier, completion)`` pairs, the unsteered one first.
    """
    from steerlab.core.prompts import prompt_ids

    values = [0.0] + [m for m in multipliers if m != 0.0]
    rows = [[s.with_multiplier(s.multiplier * m) for s in steerings] for m in values]
    ids = prompt_ids(engine.tokenizer, prompt, system=system, chat=chat)
    texts = complete(engine, [ids] * len(values), rows, sampling or Sampling())
    return list(zip(values, texts, strict=True))
