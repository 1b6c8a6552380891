"""Each request's watch: its client's connection, checked every :data:`POLL` seconds for the
whole life of the request (tokens flowing or not), and its deadline."""

# No `from __future__ import annotations`: the queue's type is a string on purpose.
import asyncio
import time
from typing import Any

from steerlab.core.jobs import Job
from steerlab.serving.events import ClientGone
from steerlab.serving.service import ApiError

POLL = 0.25  # seconds between disconnect checks, for the whole life of a request


class Watch:
    """Cancels a request's jobs the moment its client goes away, tokens flowing or not.

    A task polls ``request.is_disconnected()`` every :data:`POLL` seconds for the whole
    life of the request and, when the client has left, cancels the jobs (the batcher frees
    their rows at the next step) and wakes the reader with :data:`GONE`.
    """

    def __init__(self, request: Any, jobs: list[Job], events: "asyncio.Queue[Any]") -> None:
        self.jobs, self.events = jobs, events
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Any) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(POLL)
        self.cancel()
        self.events.put_nowait(GONE)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()

    def stop(self) -> None:
        """The request is over: stop watching and free any row still running."""
        self.task.cancel()
        self.cancel()


GONE = object()  # the watcher's wake-up: the client left


async def next_event(events: "asyncio.Queue[Any]", watch: Watch, deadline: float) -> Any:
    """The next event; cancels the request's jobs when the client leaves or time is up."""
    try:
        item = await asyncio.wait_for(events.get(), max(deadline + 1.0 - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        watch.cancel()
        raise ApiError(504, "the request ran past its deadline", kind="server_error") from None
    if item is GONE:
        raise ClientGone
    return item
