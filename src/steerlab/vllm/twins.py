"""KL from the unsteered model on vLLM, exactly, computed in the worker at the logits.

A steered row is generated with a tag; :class:`Twins`, a vLLM logits processor the engine is
started with, keeps the row's log-probabilities over the whole vocabulary at every generated
position (they never leave the worker). When the row is done, the engine sends its *twin*:
one unsteered request whose prompt is the row's prompt and generated tokens, one token long.
Right after the forward that computes the twin's positions, :func:`score` (called by the
plugin's forward wrapper) takes the final hidden states at the positions that predict the
row's tokens, computes their logits, and from them KL(steered || unsteered) against the
stored distributions and the unsteered log-probability of each of the row's tokens. The
engine reads both back with ``collective_rpc`` (:func:`fetch`). One prefill per row instead
of a second generation, exact (both distributions are whole), with logits only where they
are scored, and no prompt log-probabilities asked of vLLM: so a twin reads its prompt from
the prefix cache like any request, and only the blocks from the row's last prompt token on,
salted per twin (:func:`block_key`), are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor.interface import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

CHUNK = 256  # scored positions per pass: a few whole-vocabulary rows of memory, not a step's all
KEY = "steerlab_twin"  # extra_args: {"key": ..., "role": "row"} or {"key", "role": "twin", "prompt": P}

# Worker-side, per key: the row's log-probabilities by generated position (until its twin
# reads them), and what the twin gave: (KL, unsteered log-probability of the row's token).
_pending: dict[str, dict[int, torch.Tensor]] = {}
_scored: dict[str, dict[int, tuple[float, float]]] = {}


@dataclass(frozen=True)
class Twin:
    """A twin request in a worker: its row's key and the row's prompt length."""

    key: str
    prompt: int


def fetch(worker: Any, keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Each scored row's KL and unsteered log-probabilities, by generated position, forgotten
    once read (``collective_rpc``); a key asked for is forgotten whether or not it was scored."""
    out = {}
    for key in keys:
        values = _scored.pop(key, {})
        _pending.pop(key, None)
        ordered = [values[i] for i in sorted(values)]
        out[key] = ([kl for kl, _ in ordered], [lp for _, lp in ordered])
    return out


def tag(params: Any) -> dict[str, Any] | None:
    """A request's twin tag (its ``extra_args[KEY]``), or None."""
    found = (getattr(params, "extra_args", None) or {}).get(KEY)
    return found if isinstance(found, dict) else None


def twin_of(params: Any) -> Twin | None:
    """The :class:`Twin` a request is, or None (a row or any other request)."""
    found = tag(params)
    if found is None or found.get("role") != "twin":
        return None
    return Twin(str(found["key"]), int(found["prompt"]))


def block_key(params: Any, start: int, end: int) -> tuple[str, str] | None:
    """A twin's blocks from the one holding its row's last prompt token on get a key of
    their own, so the twin computes every position it scores (a block before it is plain
    prompt and shared like any other)."""
    twin = twin_of(params)
    if twin is None or end <= twin.prompt - 1:
        return None
    return ("steerlab-twin", twin.key)


class Twins(LogitsProcessor):  # type: ignore[misc]
    """Keeps each tagged row's log-probabilities at every generated position (a vLLM logits
    processor: ``LLM(..., logits_processors=[Twins])``); it changes no logit."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch index -> (key, output token ids: a live reference)
        self.rows: dict[int, tuple[str, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # so vLLM calls it for greedy rows too (it changes nothing)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output in batch_update.added:
            found = tag(params)
            if found is not None and found.get("role") == "row":
                self.rows[index] = (str(found["key"]), output)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [(i, key, out) for i, (key, out) in self.rows.items() if i < logits.shape[0]]
        if rows:  # one log-softmax for the step's tagged rows; each keeps its own row
            index = torch.tensor([i for i, _, _ in rows], device=logits.device)
            lps = torch.log_softmax(logits.index_select(0, index).float(), -1)
            for lp, (_, key, output) in zip(lps, rows, strict=True):
                _pending.setdefault(key, {})[len(output)] = lp
        return logits


def score(runner: Any, hidden_states: torch.Tensor, twins: list[tuple[int, Any, Twin]]) -> None:
    """After a forward: for every twin in it (batch index, request state, twin), its logits at
    the positions this step computed that predict its row's generated tokens, and from them
    the KL of the row's stored distributions and the unsteered log-probability of each token."""
    starts = runner.query_start_loc.np
    # (row of hidden_states, key, generated index, the row's token there)
    picked: list[tuple[int, str, int, int]] = []
    for index, state, twin in twins:
        ids = state.prompt_token_ids
        stored = _pending.get(twin.key)
        if ids is None or not stored:
            continue
        first = int(state.num_computed_tokens)  # position of this step's first token
        count = int(starts[index + 1]) - int(starts[index])
        offset = int(starts[index])
        # positions prompt-1 .. len(ids)-2 predict the row's tokens 0 .. len(ids)-prompt-1
        for position in range(max(first, twin.prompt - 1), min(first + count, len(ids) - 1)):
            g = position - (twin.prompt - 1)
            if g in stored:
                picked.append((offset + position - first, twin.key, g, int(ids[position + 1])))
    for first in range(0, len(picked), CHUNK):
        _score(runner, hidden_states, picked[first : first + CHUNK])


def _score(
    runner: Any, hidden_states: torch.Tensor, picked: list[tuple[int, str, int, int]]
) -> None:
    rows = torch.tensor([r for r, _, _, _ in picked], device=hidden_states.device)
    lq = torch.log_softmax(
        runner.model.compute_logits(hidden_states.index_select(0, rows)).float(), -1
    )
    lp = torch.stack([_pending[key].pop(g) for _, key, g, _ in picked])
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    # the unsteered log-probability of the token the row generated at each position
    tokens = torch.tensor([t for _, _, _, t in picked], device=hidden_states.device)
    own = lq.gather(1, tokens[:, None])[:, 0]
    for (_, key, g, _), k, q in zip(picked, kl.tolist(), own.tolist(), strict=True):
        _scored.setdefault(key, {})[g] = (k, q)
