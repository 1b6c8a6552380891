"""What the server sends: OpenAI completion bodies, server-sent events, streamed text
deltas, the playground's explain events and the sweep summary."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from typing import Any

from steerlab.core.prompts import token_pieces
from steerlab.evaluation.sweep_summary import SweepSummary
from steerlab.serving.bodies import ApiError


def failure(message: Any) -> ApiError:
    status = 504 if "deadline" in str(message) else 500
    return ApiError(status, f"generation failed: {message}", kind="server_error")


class Text:
    """A row's text as its tokens arrive: deltas that never split a multi-byte character,
    and that stop before the first of the request's stop strings (the text is cut there and
    the row finishes with reason ``stop``). Up to the longest stop string's length - 1
    characters are held back, since they may begin one."""

    def __init__(self, tok: Any, stops: Sequence[str] = ()) -> None:
        self.tok, self.sent = tok, ""
        self.ids: list[int] = []
        self.stops = list(stops)
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stops:
            start = max(len(self.sent) - self.hold, 0)
            found = [i for i in (text.find(x, start) for x in self.stops) if i >= 0]
            if found:
                self.stopped = True
                delta, self.sent = text[len(self.sent) : min(found)], text[: min(found)]
                return delta
        if text.endswith("\ufffd"):
            return ""  # half a character: wait for the rest
        end = len(text) - self.hold
        if end <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : end], text[:end]
        return delta

    def rest(self) -> str:
        """What is left to send once the row is done (held-back or half characters)."""
        if self.stopped:
            return ""
        return self.tok.decode(self.ids, skip_special_tokens=True)[len(self.sent) :]


class ClientGone(Exception):  # noqa: N818
    """The client closed the connection: its job is cancelled and nothing is sent."""


def sweep_json(sweep: SweepSummary, vector: str | None) -> dict[str, Any]:
    """What ``/v1/steerlab/sweep`` answers: the recommendation, the table, the plots inline
    (data URIs, so they load with an API key too); non-finite numbers become null."""

    def clean(row: dict[str, Any]) -> dict[str, Any]:
        keys = ("layer", "multiplier", "behaviour", "fluency", "kl", "shift", "baseline")
        return {
            k: None if isinstance(row[k], float) and not math.isfinite(row[k]) else row[k]
            for k in keys
            if k in row
        }

    best = sweep.recommendation
    return {
        "object": "steerlab.sweep",
        "vector": vector,
        "perplexity_bound": sweep.perplexity_bound,
        "recommendation": None if best is None else clean(best),
        "rows": [clean(r) for r in sweep.rows],
        "plots": [
            {"name": name, "src": "data:image/png;base64," + base64.b64encode(png).decode()}
            for name, png in sweep.plots.items()
        ],
    }


def explained(text: Text, value: dict[str, Any], tok: Any) -> dict[str, Any]:
    """An explain event for the page: each token's text, KL and most changed tokens."""
    top = [
        [{"token": tok.decode([i]), "steered": p, "unsteered": q} for i, p, q in changes]
        for changes in value["top"]
    ]
    pieces = token_pieces(tok, text.ids[: len(value["kl"])], skip_special_tokens=True)
    return {"pieces": pieces, "kl": value["kl"], "top": top}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def completion(
    rid: str, created: int, model: str, chat: bool, text: str, reason: str, prompt: int, tok: Any
) -> dict[str, Any]:
    completion_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
