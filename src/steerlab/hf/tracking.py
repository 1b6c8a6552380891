"""What a decoding loop records per step, and the unsteered shadow it compares against.

KL and the unsteered log-probability of each generated token need the unsteered model's
next-token distribution at every step. :class:`Shadow` runs the unsteered model on the
tokens the steered model picked, with its own cache, a few steps at a time: one forward over
the pending steps' tokens (teacher forcing) gives the distributions of all of them. It does
the same arithmetic as one token per step, but pays the per-forward overhead once per chunk,
which is most of the cost of a small batch's step on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from steerlab.core.decoded import Decoded
from steerlab.core.errors import SteerlabError
from steerlab.hf.transient import cache_of

#: Most bytes of pending steered logits a shadow keeps before it runs (and most steps).
PENDING_BYTES = 1 << 28
MOST_PENDING_STEPS = 16
COMPARE_ROWS = 8  # rows per pass when comparing steered and unsteered distributions


def select_rows(cache: Any, keep: torch.Tensor) -> Any:
    """The cache with only the rows ``keep`` (in place where the cache supports it)."""
    if cache is None:
        return None
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return cache
    if isinstance(cache, tuple):  # legacy tuple caches: ((k, v), ...) per layer
        return tuple(tuple(t[keep] for t in layer) for layer in cache)
    raise SteerlabError(f"cannot drop finished rows from a {type(cache).__name__} cache")


class Record:
    """Per-step outputs of the whole batch; rows that left the batch get the fill token."""

    def __init__(self, batch: int, fill: int, logits: bool, unsteered: bool, top: int = 0) -> None:
        self.batch, self.fill = batch, fill
        self.keep_logits, self.unsteered = logits, unsteered
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.tokens: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.kls: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.top = top if unsteered else 0  # most changed tokens kept per step (0: none)
        self.changes: list[torch.Tensor] = []
        self.change_probs: list[torch.Tensor] = []

    def step(self, active: torch.Tensor, token: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Record a step's tokens (and logits); returns the tokens ``[batch]``, fill where done."""
        rows = active.cpu()
        full = torch.full((self.batch,), self.fill, dtype=torch.long)
        full[rows] = token.cpu()
        self.tokens.append(full)
        if self.keep_logits:
            wide = torch.zeros(self.batch, logits.shape[-1])
            wide[rows] = logits.cpu()
            self.logits.append(wide)
        return full

    def compare(
        self, active: torch.Tensor, token: torch.Tensor, logits: torch.Tensor, plain: torch.Tensor
    ) -> None:
        """Record a step's KL and unsteered log-probability (steps in order, after step())."""
        if not self.unsteered:
            return
        rows = active.cpu()
        kl, lq = torch.zeros(self.batch), torch.zeros(self.batch)
        k = min(self.top, logits.shape[-1])
        wide_ids = torch.zeros(self.batch, k, dtype=torch.long)
        wide_p = torch.zeros(self.batch, k, 2)
        # A few rows at a time: the [rows, vocab] temporaries then stay in the CPU's caches
        # (three times faster than whole-batch passes at a sweep's batch sizes).
        for lo in range(0, len(rows), COMPARE_ROWS):
            part = slice(lo, lo + COMPARE_ROWS)
            at = rows[part]
            logp = torch.log_softmax(logits[part], -1)
            logq = torch.log_softmax(plain[part], -1)
            p = logp.exp()
            kl[at] = (p * (logp - logq)).sum(-1).cpu()
            lq[at] = logq.gather(-1, token[part, None]).squeeze(-1).cpu()
            if k:
                q = logq.exp()
                ids = (p - q).abs().topk(k, dim=-1).indices  # [part, k]
                wide_ids[at] = ids.cpu()
                wide_p[at] = torch.stack([p.gather(-1, ids), q.gather(-1, ids)], -1).cpu()
        self.kls.append(kl)
        self.logprobs.append(lq)
        if k:
            self.changes.append(wide_ids)
            self.change_probs.append(wide_p)

    def result(self, finished_at: list[int]) -> Decoded:
        tokens = torch.stack(self.tokens, dim=1)  # [batch, n]
        return Decoded(
            tokens=tokens,
            lengths=[min(f, tokens.shape[1]) for f in finished_at],
            logits=torch.stack(self.logits, dim=1) if self.keep_logits else None,
            kl=torch.stack(self.kls, dim=1) if self.kls else None,
            unsteered_logprobs=torch.stack(self.logprobs, dim=1) if self.logprobs else None,
            changes=torch.stack(self.changes, dim=1) if self.changes else None,
            change_probs=torch.stack(self.change_probs, dim=1) if self.change_probs else None,
        )


class Shadow:
    """The unsteered model on the steered tokens, fed the pending steps together.

    Args:
        cache: the unsteered cache of the prompt so far (None: the first input is the
            whole prompt).
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self._inputs: list[torch.Tensor] = []  # each pending step's input ids [rows, w]
        self._steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._bytes = 0

    @property
    def fresh(self) -> bool:
        """Whether the shadow has seen nothing (its first input must be the whole prompt)."""
        return self.cache is None and not self._inputs

    @property
    def full(self) -> bool:
        width = sum(int(i.shape[1]) for i in self._inputs)
        return width >= MOST_PENDING_STEPS or self._bytes >= PENDING_BYTES

    def add(
        self, inputs: torch.Tensor, active: torch.Tensor, token: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """One step: the ids fed to the steered model, the rows, the token and its logits."""
        self._inputs.append(inputs)
        self._steps.append((active, token, logits))
        self._bytes += logits.numel() * logits.element_size()

    def flush(
        self,
        run: Callable[[torch.Tensor, torch.Tensor, Any], Any],
        mask: torch.Tensor,
        record: Record,
    ) -> None:
        """Run the unsteered model on the pending inputs (``mask``: the latest step's) and
        record each pending step's comparison."""
        if not self._steps:
            return
        ids = torch.cat(self._inputs, dim=1)
        out = run(ids, mask, self.cache)
        self.cache = cache_of(out)
        end = -1
        for inputs, (active, token, logits) in zip(self._inputs, self._steps, strict=True):
            end += int(inputs.shape[1])
            record.compare(active, token, logits, out.logits[:, end, :].float())
        self._inputs, self._steps, self._bytes = [], [], 0

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (flush first: pending steps hold every row)."""
        if self._steps:
            raise SteerlabError("internal: the shadow must be flushed before rows leave")
        self.cache = select_rows(self.cache, keep)
