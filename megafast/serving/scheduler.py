"""Static batching of concurrent requests on one worker thread.

HTTP handlers submit jobs (one or more sequences each) to a queue. The worker thread takes the
first waiting job, then keeps collecting jobs while they keep coming (until ``batch_wait_s``
passes without a new one, or ``4 * batch_wait_s`` after the first; at most ``max_batch_size``
sequences in all), and runs them as one left-padded batch through the
engine, to the end: a batch does not admit new sequences while it runs (static batching, not
continuous batching); jobs that arrive meanwhile form the next batch. Finished sequences leave
the running batch early (megafast.generation.generator), so a short request in a batch of long
ones costs only its own steps. Each job's ``on_step`` is called on the worker thread after each of
its tokens (streaming), and its future receives its results when the batch ends.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

from megafast.generation.generator import SequenceRequest, SequenceResult
from megafast.generation.stopping import TextTracker
from megafast.serving.engine import ServingEngine

# on_step(sequence index within the job, tracker of that sequence)
JobStep = Callable[[int, TextTracker], None]


@dataclass
class Job:
    requests: list[SequenceRequest]
    on_step: Optional[JobStep] = None
    future: "Future[list[SequenceResult]]" = field(default_factory=Future)


@dataclass
class SchedulerStats:
    batches: int = 0
    sequences: int = 0
    largest_batch: int = 0


class BatchScheduler:
    """Collects jobs into batches and runs them on the engine, one batch at a time."""

    def __init__(self, engine: ServingEngine, max_batch_size: int = 32, batch_wait_s: float = 0.02) -> None:
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"--batch-wait-ms must be >= 0, got {batch_wait_s * 1000:g}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.stats = SchedulerStats()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._carry: Optional[Job] = None  # a job that did not fit in the last batch
        self._thread = threading.Thread(target=self._loop, name="megafast-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if not 1 <= len(job.requests) <= self.max_batch_size:
            raise ValueError(f"a request may hold 1 .. {self.max_batch_size} sequences, got {len(job.requests)}")
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Finish the waiting jobs, stop the thread and release the engine's followers."""
        self._queue.put(None)
        self._thread.join()
        self.engine.shutdown()

    def _next_batch(self) -> tuple[list[Job], bool]:
        """(jobs of the next batch, whether close() was called); blocks until there is a job."""
        first = self._carry
        self._carry = None
        while first is None:
            try:
                first = self._queue.get(timeout=ServingEngine.HEARTBEAT_S)
            except queue.Empty:
                self.engine.heartbeat()
                continue
            if first is None:
                return [], True
        jobs, size = [first], len(first.requests)
        now = time.monotonic()
        last_call, deadline = now + 4 * self.batch_wait_s, now + self.batch_wait_s
        while size < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(min(deadline, last_call) - time.monotonic(), 0.0))
            except queue.Empty:
                break
            deadline = time.monotonic() + self.batch_wait_s  # another arrival: wait for the next one
            if job is None:
                return jobs, True
            if size + len(job.requests) > self.max_batch_size:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.requests)
        return jobs, False

    def _loop(self) -> None:
        closing = False
        while not closing or self._carry is not None:
            jobs, closing_now = self._next_batch()
            closing = closing or closing_now
            if jobs:
                self._run(jobs)
        # drain what arrived after close(): nothing is served any more
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def _run(self, jobs: list[Job]) -> None:
        rows = [(job, i) for job in jobs for i in range(len(job.requests))]  # batch row -> (job, index)
        requests = [job.requests[i] for job, i in rows]

        def on_step(row: int, tracker: TextTracker) -> None:
            job, i = rows[row]
            if job.on_step is not None:
                try:
                    job.on_step(i, tracker)
                except Exception:  # noqa: BLE001 - a gone client stops listening, the batch goes on
                    job.on_step = None

        try:
            results = self.engine.run(requests, on_step)
        except Exception as exc:  # noqa: BLE001 - every waiting client gets the error
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.sequences += len(requests)
        self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.requests)])
            start += len(job.requests)


__all__ = ["BatchScheduler", "Job", "SchedulerStats"]
