"""The server's batcher: one worker thread runs queued requests as padded batches.

Requests waiting when the worker is free form one left-padded batch (rows with equal
sampling settings), each row with its own steerings, through the engine's
``decode_batch`` (:class:`steerlab.core.engine.Engine`). A request that arrives during a
batch waits for the next one (per-batch, not continuous, batching). Each row's tokens are
pushed to its own callback as they are made, for streaming.

Fairness: the queue is bounded (:class:`QueueFull` when it is full); a row leaves the
batch as soon as it reaches its own ``max_tokens``, EOS, its deadline, or is cancelled
(its client went away); and when a batch fails, its rows that have not produced a token
yet are retried one by one, so one bad row fails alone.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from typing import Any

import torch

from steerlab.core.engine import Engine
from steerlab.core.jobs import Job, QueueFull
from steerlab.core.sampling import Sampling

__all__ = ["Batcher", "Job", "QueueFull"]


class Batcher:
    """Owns the engine; serves :class:`Job` rows from a bounded queue in one worker thread.

    Args:
        lm: the engine.
        max_batch: rows per batch.
        max_queue: requests that may wait; :meth:`submit` raises :class:`QueueFull` beyond.
    """

    def __init__(self, lm: Engine, max_batch: int = 8, max_queue: int = 64) -> None:
        self.lm = lm
        self.max_batch = max_batch
        # A list is a group (one request's rows) that runs as one batch.
        self.jobs: queue.Queue[Job | list[Job] | None] = queue.Queue(maxsize=max_queue + 1)
        self.max_queue = max_queue
        # Items the worker took out of the queue but set aside (other sampling settings):
        # kept here, in order, never put back into the bounded queue (that could block the
        # worker forever on a queue that clients refilled meanwhile).
        self._held: collections.deque[Job | list[Job] | None] = collections.deque()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="steerlab-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job | list[Job]) -> None:
        """Queue a job, or a group of jobs that run together in one batch (up to
        ``max_batch`` rows, equal sampling settings).

        Raises:
            QueueFull: ``max_queue`` jobs are waiting already.
            ValueError: a group that is empty, over ``max_batch`` rows, or mixes sampling
                settings (the caller validates requests before they get here).
        """
        if isinstance(job, list) and (
            not job or len(job) > self.max_batch or len({j.sampling_key for j in job}) != 1
        ):
            raise ValueError(
                f"a group needs 1..{self.max_batch} jobs with the same sampling settings"
            )
        if self._waiting() >= self.max_queue:
            self._purge()
        if self._waiting() >= self.max_queue:
            raise QueueFull
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _waiting(self) -> int:
        with self._lock:
            return self.jobs.qsize() + len(self._held)

    def _purge(self) -> None:
        """Drop cancelled jobs from the queue: a client that left holds no place in it."""
        with self.jobs.mutex:
            kept = [j for j in self.jobs.queue if not _cancelled(j)]
            self.jobs.queue.clear()
            self.jobs.queue.extend(kept)
        with self._lock:
            held = [j for j in self._held if not _cancelled(j)]
            self._held.clear()
            self._held.extend(held)

    def close(self) -> None:
        with self._lock:
            self._held.append(None)  # the worker sees it even on a full queue
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)  # wakes a worker blocked on an empty queue
        self.thread.join(timeout=10)

    def _next(self, block: bool) -> Job | list[Job] | None:
        """The next item: set-aside ones first, then the queue.

        Raises:
            queue.Empty: nothing waits (``block=False``).
        """
        with self._lock:
            if self._held:
                return self._held.popleft()
        return self.jobs.get() if block else self.jobs.get_nowait()

    def _take(self) -> list[Job] | None:
        item = self._next(block=True)
        if item is None:
            return None
        if isinstance(item, list):
            return item  # a group runs alone, as one batch
        batch: list[Job] = [item]
        later: list[Job | list[Job] | None] = []
        while len(batch) < self.max_batch:
            try:
                job = self._next(block=False)
            except queue.Empty:
                break
            if job is None:
                later.append(None)
                break
            if isinstance(job, Job) and job.sampling_key == item.sampling_key:
                batch.append(job)
            else:
                later.append(job)
        with self._lock:  # back in front, in their order; the queue itself is never waited on
            self._held.extendleft(reversed(later))
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    continue
                if job.expired():
                    job.close("error", "the request waited past its deadline")
                    continue
                live.append(job)
            if live:
                self._serve_isolated(live)

    def _serve_isolated(self, batch: list[Job]) -> None:
        try:
            self._serve(batch)
        except Exception as exc:  # a failing batch frees its rows and the worker lives on
            message = f"{type(exc).__name__}: {exc}"
            if len(batch) == 1:
                batch[0].close("error", message)
                return
            for job in batch:
                if job.closed:
                    continue
                if job.emitted:  # its client has tokens already: it cannot start over
                    job.close("error", message)
                else:
                    self._serve_isolated([job])

    @torch.no_grad()
    def _serve(self, batch: list[Job]) -> None:
        tok = self.lm.tokenizer
        first = batch[0]
        sampling = Sampling(
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
        )
        seeds = [j.seed for j in batch]  # each row its own generator; None: fresh randomness
        finished = [False] * len(batch)
        explain = max(j.explain for j in batch)
        reasons: dict[int, str] = {}  # explained rows: "done" waits for their explanation
        eos = tok.eos_token_id

        def finish(r: int, job: Job, reason: str) -> None:
            finished[r] = True
            if explain:
                reasons[r] = reason
            else:
                job.close("done", reason)

        def on_step(tokens: torch.Tensor, done: torch.Tensor) -> list[bool]:
            for r, job in enumerate(batch):
                if finished[r]:
                    continue
                token = int(tokens[r])
                if token == eos:
                    finish(r, job, "stop")
                    continue
                job.emit("token", token)
                job.emitted += 1
                if job.emitted >= job.max_tokens:
                    finish(r, job, "length")
                elif job.cancelled.is_set():
                    finished[r] = True
                elif job.expired():
                    finished[r] = True
                    job.close("error", "the request ran past its deadline")
            return list(finished)

        prompts, rows = [j.ids for j in batch], [j.steering for j in batch]
        if explain:
            out = self.lm.decode_batch(
                prompts, rows, sampling, on_step=on_step, explain=explain, seeds=seeds
            )
        else:
            out = self.lm.decode_batch(prompts, rows, sampling, on_step=on_step, seeds=seeds)
        for r, job in enumerate(batch):
            if job.closed or job.cancelled.is_set():
                continue
            if explain:
                job.emit("explain", _explanation(out, r, job.emitted))
            job.close("done", reasons.get(r, "length"))


def _cancelled(item: Job | list[Job] | None) -> bool:
    if item is None:
        return False
    jobs = item if isinstance(item, list) else [item]
    return all(j.cancelled.is_set() for j in jobs)


def _explanation(out: Any, row: int, n: int) -> dict[str, Any]:
    """Row ``row``'s first ``n`` tokens: KL(steered || unsteered) and the most changed tokens."""
    kl = [] if out.kl is None else [float(x) for x in out.kl[row, :n]]
    top: list[list[tuple[int, float, float]]] = []
    if out.changes is not None and out.change_probs is not None:
        for t in range(n):
            ids = out.changes[row, t].tolist()
            probs = out.change_probs[row, t].tolist()
            top.append([(int(i), float(p), float(q)) for i, (p, q) in zip(ids, probs, strict=True)])
    return {"kl": kl, "top": top}
