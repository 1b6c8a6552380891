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
    ) -> Decoded:
        """Generate from unpadded prompt ids, one steering list per row."""
        ...
