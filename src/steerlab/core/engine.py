"""The engine seam: what serving and the CLI need from a model runtime.

An engine runs a causal LM with per-row steering. The Hugging Face engine is
:class:`steerlab.hf.model.LoadedModel`; another engine (e.g. vLLM) implements the same
protocol over its own scheduler, computing positions with :mod:`steerlab.core.plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from steerlab.core.decoded import Decoded
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity

#: Called after every decoding step with the new tokens ``[batch]`` and the rows that are
#: done ``[batch]``; returns True to stop, or per-row flags of rows to finish now.
OnStep = Callable[[torch.Tensor, torch.Tensor], "bool | Sequence[bool] | torch.Tensor | None"]


@dataclass(frozen=True)
class Capabilities:
    """What an engine runs exactly; anything else is refused where a request enters.

    Attributes:
        transient: the ``transient`` policy (two passes per token).
        sites: steering at the attention or MLP output (not only the block's output).
        conditions: conditional steering (decided on the prompt before decoding).
        explain: per-token KL from the unsteered model and the most changed tokens.
        kl: the unsteered comparison behind KL and perplexity in evaluation.
        projections: ablate/clamp steerings at one layer of one request (None: any).
        continuous: the engine schedules served rows itself (``submit(job)``, see
            :mod:`steerlab.core.jobs`), streaming each row's tokens as they are made.
        activations: reading hidden states (extraction, ``inspect``, ``condition fit``).
    """

    transient: bool = True
    sites: bool = True
    conditions: bool = True
    explain: bool = True
    kl: bool = True
    projections: int | None = None
    continuous: bool = False
    activations: bool = True


class Engine(Protocol):
    """A model runtime that decodes batches of prompts, each row with its own steerings."""

    @property
    def capabilities(self) -> Capabilities:
        """What this engine runs (checked by :mod:`steerlab.core.requests` and the CLI)."""
        ...

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
        seeds: Sequence[int | None] | None = None,
        track_unsteered: bool = False,
        share_prompts: bool = False,
    ) -> Decoded:
        """Generate from unpadded prompt ids, one steering list per row.

        Sampling draws each row from its own generator (``seeds[r]``; None: fresh
        randomness; default ``sampling.seed + r``), so a row does not depend on its batch.
        ``track_unsteered`` also returns each step's KL(steered || unsteered) and the
        unsteered log-probability of each generated token (engines with ``kl``);
        ``share_prompts`` lets rows share their prompts' prefill where the engine can.

        ``explain=k > 0`` also returns per-step KL from the unsteered model and the ``k``
        most changed tokens per step, on engines whose capabilities include ``explain``.
        """
        ...

    def next_token_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        candidates: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Each candidate token's log-probability at the position after each prompt, each
        row with its own steerings (the A/B behaviour probability)."""
        ...

    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        steering: Sequence[Sequence[Steering]],
        *,
        batch_size: int = 16,
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) of each pair, and whether the continuation is the
        greedy one; each row's steering counts positions from its context, as when the
        continuation is generated after it (the harness, perplexity of a text)."""
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
