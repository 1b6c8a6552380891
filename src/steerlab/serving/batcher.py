"""The server's batcher: one worker thread runs queued requests as padded batches.

Requests waiting when the worker is free form one left-padded batch (rows with equal
sampling settings), each row with its own steerings, through the engine's ``decode_batch`` (:class:`steerlab.core.engine.Engine`). A
request that arrives during a batch waits for the next one (per-batch, not continuous,
batching). Each row's tokens are pushed to its own queue as they are made, for streaming.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.core.engine import Engine
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering

Emit = Callable[[str, Any], None]  # ("token", id) / ("done", finish_reason) / ("error", message)


@dataclass
class Job:
    """One request row: prompt ids, steerings, decoding settings and where tokens go."""

    ids: list[int]
    steering: list[Steering]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling_key(self) -> tuple[float, float, int | None]:
        return (self.temperature, self.top_p, self.seed)


class Batcher:
    """Owns the model; serves :class:`Job` rows from a queue in one worker thread."""

    def __init__(self, lm: Engine, max_batch: int = 8) -> None:
        self.lm = lm
        self.max_batch = max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="steerlab-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _take(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch: list[Job] = [first]
        later: list[Job] = []
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            (batch if job.sampling_key == first.sampling_key else later).append(job)
        for job in later:
            self.jobs.put(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled.is_set()]
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as exc:  # a failing batch frees its rows and the worker lives on
                for job in batch:
                    job.emit("error", f"{type(exc).__name__}: {exc}")

    @torch.no_grad()
    def _serve(self, batch: list[Job]) -> None:
        tok = self.lm.tokenizer
        first = batch[0]
        sampling = Sampling(
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
        )
        counts = [0] * len(batch)
        finished = [False] * len(batch)
        eos = tok.eos_token_id

        def on_step(tokens: torch.Tensor, done: torch.Tensor) -> bool:
            for r, job in enumerate(batch):
                if finished[r]:
                    continue
                token = int(tokens[r])
                if token == eos:
                    finished[r] = True
                    job.emit("done", "stop")
                    continue
                job.emit("token", token)
                counts[r] += 1
                if counts[r] >= job.max_tokens:
                    finished[r] = True
                    job.emit("done", "length")
                elif job.cancelled.is_set():
                    finished[r] = True
            return all(finished)

        self.lm.decode_batch(
            [j.ids for j in batch], [j.steering for j in batch], sampling, on_step=on_step
        )
        for r, job in enumerate(batch):
            if not finished[r]:
                job.emit("done", "length")
