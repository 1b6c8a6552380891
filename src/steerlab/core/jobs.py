"""A served request row and where its tokens go: what serving hands an engine.

The server turns each request into :class:`Job` rows. The Hugging Face engine runs them in
padded batches through :class:`steerlab.serving.batcher.Batcher`; an engine that schedules
rows itself (``Capabilities.continuous``, e.g. vLLM) takes them with ``submit``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steerlab.core.steering import Steering

# ("token", id) / ("explain", {"kl", "top"}) / ("done", finish_reason) / ("error", message)
Emit = Callable[[str, Any], None]


class QueueFull(Exception):
    """The batcher's queue holds as many requests as it may: answer 503 and retry later."""


@dataclass
class Job:
    """One request row: prompt ids, steerings, decoding settings and where tokens go.

    Attributes:
        deadline: ``time.monotonic()`` after which the row is stopped (None: no deadline).
        cancelled: set when the client goes away; the row stops at the next step.
        explain: ``k > 0`` tracks the unsteered model too: before "done" the job gets an
            "explain" event with each token's KL and the ``k`` most changed tokens.
    """

    ids: list[int]
    steering: list[Steering]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    emit: Emit
    deadline: float | None = None
    explain: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    emitted: int = 0
    closed: bool = False

    def close(self, kind: str, value: Any) -> None:
        """Send the final event ("done" or "error"), once."""
        if not self.closed:
            self.closed = True
            self.emit(kind, value)

    @property
    def sampling_key(self) -> tuple[float, float, int]:
        """Rows that may share a batch (each row samples from its own seeded generator)."""
        return (self.temperature, self.top_p, self.explain)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline
