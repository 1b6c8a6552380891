"""KL from the unsteered model on vLLM, exactly, computed in the worker at the logits.

A steered row is generated with a tag; :class:`Twins`, a vLLM logits processor the engine is
started with, keeps the row's log-probabilities over the whole vocabulary at every generated
position (they never leave the worker). When the row is done, the engine sends its *twin*:
one unsteered scoring request whose prompt is the row's prompt and generated tokens, with
prompt log-probabilities on. While vLLM computes the twin's logits for those positions,
:func:`score_hook` (wrapped around the runner's prompt-log-probability step) computes
KL(steered || unsteered) at each generated position against the stored distributions. The
twin's own prompt log-probabilities are the unsteered log-probabilities of the row's tokens;
the engine reads the KL back with ``collective_rpc`` (:func:`fetch`). One prefill per row
instead of a second generation, and exact: both distributions are whole.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor.interface import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

KEY = "steerlab_twin"  # extra_args: {"key": ..., "role": "row"} or {"key", "role": "twin", "prompt": P}

# Worker-side, per key: the row's log-probabilities by generated position (until its twin
# reads them), and the KL the twin gave.
_pending: dict[str, dict[int, torch.Tensor]] = {}
_kl: dict[str, dict[int, float]] = {}


def fetch(worker: Any, keys: list[str]) -> dict[str, list[float]]:
    """The KL of each scored row, by generated position, forgotten once read
    (``collective_rpc``)."""
    out = {}
    for key in keys:
        values = _kl.pop(key, {})
        _pending.pop(key, None)
        out[key] = [values[i] for i in sorted(values)]
    return out


def _tag(params: Any) -> dict[str, Any] | None:
    tag = (getattr(params, "extra_args", None) or {}).get(KEY)
    return tag if isinstance(tag, dict) else None


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
            tag = _tag(params)
            if tag is not None and tag.get("role") == "row":
                self.rows[index] = (str(tag["key"]), output)
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


def score_hook(runner: Any, hidden_states: torch.Tensor, scheduled: dict[str, int]) -> None:
    """Before vLLM turns a step's prompt logits into log-probabilities: for every twin in the
    step, its logits at the positions that predict its row's generated tokens, and the KL
    of the row's stored distributions from them."""
    for req_id in list(getattr(runner, "num_prompt_logprobs", {}) or {}):
        tokens = scheduled.get(req_id)
        request = runner.requests.get(req_id)
        if tokens is None or request is None or request.prompt_token_ids is None:
            continue
        tag = _tag(request.sampling_params)
        if tag is None or tag.get("role") != "twin":
            continue
        key, prompt = str(tag["key"]), int(tag["prompt"])
        start = request.num_computed_tokens  # position of this chunk's first token
        count = min(tokens, len(request.prompt_token_ids) - 1 - start)
        first = max(0, prompt - 1 - start)  # the chunk's first token that predicts a row token
        stored = _pending.get(key, {})
        # (index in the chunk, which generated token it predicts) for the stored ones
        picked = [(i, start + i - (prompt - 1)) for i in range(first, max(count, first))]
        picked = [(i, g) for i, g in picked if g in stored]
        if not picked:
            continue
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        rows = torch.tensor([offset + i for i, _ in picked], device=hidden_states.device)
        lq = torch.log_softmax(
            runner.model.compute_logits(hidden_states.index_select(0, rows)).float(), -1
        )
        lp = torch.stack([stored.pop(g) for _, g in picked])
        p = lp.exp()
        kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
        values = _kl.setdefault(key, {})
        for (_, g), value in zip(picked, kl.tolist(), strict=True):
            values[g] = value
