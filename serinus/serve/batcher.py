"""Batching across clients: one bounded queue, one model thread.

Requests from any number of clients wait in the queue; the model thread takes up to
`max_batch` of them at once, or, when fewer are waiting, what arrives within `max_wait_ms` of
the oldest, and decodes them as one `transcribe()` batch (each row with its own prompt, so
requests in different languages share a batch). It waits only while other requests are on
their way in (`arrival()`: being uploaded and checked), so a lone client is not kept waiting.
The model never runs on the event loop.

A full queue refuses new work (`QueueFull`, HTTP 503) instead of growing. A request whose
client went away is cancelled: it leaves the queue and is never decoded. `stop()` lets the
thread finish everything already queued, for a graceful shutdown.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from serinus.decoding import Hypothesis


class QueueFull(RuntimeError):
    """The queue holds `queue_size` requests already; `retry_after` estimates when to come back (s)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One request's work: its samples, prompt slots, and whether it wants timestamps."""

    samples: np.ndarray
    slots: dict
    timestamps: bool = False
    name: str = "upload"
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    served: int = 0
    batches: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    rejected: int = 0
    batch_seconds: float = 0.0  # moving average of one batch's decoding time


def decode_jobs(model, jobs: list[Job], batch_size: int) -> list[Hypothesis]:
    """Decode jobs with `transcribe()`: one call for those that want timestamps, one for the rest."""
    from serinus.transcribe import Item, transcribe

    hyps: list[Hypothesis | None] = [None] * len(jobs)
    for timestamps in (False, True):
        group = [k for k, job in enumerate(jobs) if job.timestamps == timestamps]
        if not group:
            continue
        # An Item with `entry` carries its own prompt slots, as a manifest line does.
        items = [Item(n, jobs[k].name, samples=jobs[k].samples, num_samples=len(jobs[k].samples), entry=jobs[k].slots)
                 for n, k in enumerate(group)]
        for k, hyp in zip(group, transcribe(model, items, batch_size=batch_size, timestamps=timestamps or None)):
            hyps[k] = hyp
    return hyps


class Batcher:
    """The queue and its model thread. `decode(jobs) -> hypotheses` runs on that thread."""

    def __init__(self, decode: Callable[[list[Job]], list[Hypothesis]], max_batch: int = 8,
                 max_wait_ms: float = 50, queue_size: int = 64):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.decode, self.max_batch, self.max_wait, self.queue_size = decode, max_batch, max_wait_ms / 1000, queue_size
        self.queue: deque[Job] = deque()
        self.decoding = 0  # jobs in the batch on the model now
        self.arriving = 0  # requests being read and checked, not queued yet
        self.stats = Stats()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="serinus-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @contextlib.contextmanager
    def arrival(self):
        """Around reading a request until it is submitted: a batch being formed waits for it."""
        with self._cond:
            self.arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self.arriving -= 1
                self._cond.notify_all()

    def check_room(self) -> None:
        """Raise QueueFull when a job would be refused now (checked before an upload is read, too)."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._stopping:
            raise QueueFull("the server is shutting down", retry_after=5)
        if len(self.queue) >= self.queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"the server is busy: {len(self.queue)} requests are queued (limit {self.queue_size})",
                            retry_after=self._retry_after())

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the hypothesis. Raises QueueFull when the queue is full."""
        with self._cond:
            self._check_room()
            self.queue.append(job)
            self._cond.notify_all()
        job.future.add_done_callback(lambda _: self._forget(job))
        return job.future

    def _forget(self, job: Job) -> None:
        """A cancelled job (its client left) leaves the queue."""
        if not job.future.cancelled():
            return
        with self._cond:
            try:
                self.queue.remove(job)
                self.stats.cancelled += 1
            except ValueError:
                pass

    def _retry_after(self) -> int:
        batches_ahead = len(self.queue) / self.max_batch + 1
        return max(1, math.ceil(batches_ahead * (self.stats.batch_seconds or 1.0)))

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self.queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self.queue[0].queued_at + self.max_wait
            while len(self.queue) < self.max_batch and self.arriving > 0 and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                if not self.queue:  # all cancelled while waiting
                    return []
            batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
            self.decoding = len(batch)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
            start = time.monotonic()
            try:
                hyps = self.decode(jobs) if jobs else []
            except Exception as e:  # noqa: BLE001 - the clients get it; the server goes on
                for job in jobs:
                    job.future.set_exception(e)
            else:
                for job, hyp in zip(jobs, hyps):
                    job.future.set_result(hyp)
            with self._cond:
                self.decoding = 0
                self.stats.cancelled += len(batch) - len(jobs)
                if jobs:
                    seconds = time.monotonic() - start
                    s = self.stats
                    s.batch_seconds = seconds if not s.batches else 0.8 * s.batch_seconds + 0.2 * seconds
                    s.served += len(jobs)
                    s.batches += 1
                    s.largest_batch = max(s.largest_batch, len(jobs))
