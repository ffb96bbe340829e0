"""The skeleton shared by the preprocessing tools (pretraining and SFT): workers, order, progress,
outputs that appear complete or not at all.

    with ExitStack() as stack:
        outputs = IndexedOutputs(stack, {"text": (prefix, np.uint16)})   # temporary files
        pool = WorkerPool(stack, workers, Encoder, (spec,))              # or inline for 1 worker
        progress = Progress(total_bytes, None, 1000, "corpus.jsonl", "documents")
        stack.callback(progress.close)
        for chunk, result in pool.imap(read_chunks()):                   # input order
            ...append result to outputs["text"]...
            progress.update(done, chunk.end_position)
        outputs.finalize()                                               # renamed into place

`WorkerPool` runs one worker object per process (built there by `make_worker(*args)`, so each
process holds its own tokenizer and caches), keeps at most `IN_FLIGHT_PER_WORKER * workers`
items in flight so memory does not grow with the input, and yields the results in input order.
The pool is a `fork` pool where the platform has one; its processes ignore SIGINT, so Ctrl-C is
handled once, by the main process, whose ExitStack then terminates the pool and deletes the
temporary files of every output (`IndexedDatasetBuilder.abort`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from contextlib import ExitStack
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

import numpy.typing as npt

from megafast.data.indexed_dataset import IndexedDatasetBuilder

T = TypeVar("T")
R = TypeVar("R")

# Items submitted but not yet written, per worker process.
IN_FLIGHT_PER_WORKER = 4

_worker: Callable[[Any], Any] | None = None  # the worker object of a pool process, never in main


def _init_worker(make_worker: Callable[..., Callable[[Any], Any]], args: tuple) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled (once) by the main process
    _worker = make_worker(*args)


def _run_worker(item: Any) -> Any:
    assert _worker is not None, "worker not initialised"
    return _worker(item)


class WorkerPool(Generic[T, R]):
    """Applies a worker (a callable item -> result) to items, in `workers` processes or inline.

    Args:
        stack: the run's ExitStack; it terminates the pool when the run ends or fails.
        workers: processes; 1 runs the worker in the calling process.
        make_worker: builds the worker from `args` (in each pool process; picklable by reference).
        args: its arguments (picklable).
        inline: the worker to use when `workers` is 1 (default: `make_worker(*args)`), e.g. one
            sharing the main process's tokenizer.
    """

    def __init__(
        self,
        stack: ExitStack,
        workers: int,
        make_worker: Callable[..., Callable[[T], R]],
        args: tuple = (),
        inline: Callable[[T], R] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool = None
        self._inline: Callable[[T], R] | None = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = context.Pool(workers, _init_worker, (make_worker, args))
            stack.callback(self._pool.terminate)  # runs after close/join on success; kills on failure
        else:
            self._inline = inline if inline is not None else make_worker(*args)

    def imap(self, items: Iterable[T], send: Callable[[T], Any] | None = None) -> Iterator[tuple[T, R]]:
        """(item, result) for each item, in input order.

        Inline, each item is processed when read and its result yielded before the next is read.
        With processes, `send(item)` (default: the item) goes to a worker, and results are yielded
        once more than `IN_FLIGHT_PER_WORKER * workers` items are in flight, then all at the end,
        after which the pool is closed and joined.
        """
        pool = self._pool
        pending: deque[tuple[T, Any]] = deque()
        limit = IN_FLIGHT_PER_WORKER * self.workers if pool is not None else 0
        for item in items:
            if pool is not None:
                job = pool.apply_async(_run_worker, (item if send is None else send(item),))
            else:
                assert self._inline is not None
                job = self._inline(item)
            pending.append((item, job))
            while len(pending) > limit:
                yield self._oldest(pending)
        while pending:
            yield self._oldest(pending)
        if pool is not None:
            pool.close()
            pool.join()

    def _oldest(self, pending: deque[tuple[T, Any]]) -> tuple[T, R]:
        item, job = pending.popleft()
        return item, (job.get() if self._pool is not None else job)


class IndexedOutputs:
    """Indexed datasets written together: temporary files until `finalize` renames every one into
    place; if the run fails first (the stack unwinds without `finalize`), all are deleted.

    Args:
        stack: the run's ExitStack.
        outputs: name -> (path prefix, token dtype); files are `{prefix}.bin` and `{prefix}.idx`.
    """

    def __init__(self, stack: ExitStack, outputs: Mapping[str, tuple[str, npt.DTypeLike]]) -> None:
        self.prefixes = {name: prefix for name, (prefix, _) in outputs.items()}
        for prefix in self.prefixes.values():
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builders = {name: stack.enter_context(IndexedDatasetBuilder(prefix + ".bin", dtype))
                         for name, (prefix, dtype) in outputs.items()}

    def __getitem__(self, name: str) -> IndexedDatasetBuilder:
        return self.builders[name]

    def finalize(self) -> list[str]:
        """Write every `.idx` and rename the files into place, in order; returns the prefixes."""
        for name, builder in self.builders.items():
            builder.finalize(self.prefixes[name] + ".idx")
        return list(self.prefixes.values())


class Progress:
    """A tqdm bar over the input bytes on a terminal, else a log line every `log_interval` units.

    Args:
        total: input size in bytes.
        enabled: True for a bar, False for log lines, None for a bar when stderr is a terminal.
        log_interval: units (documents, records) between log lines.
        name: the bar's label (the input file's name).
        unit: what is counted, plural ("documents", "records").
        rate_unit: its short form in rates ("docs" gives "docs/s").
    """

    def __init__(self, total: int, enabled: bool | None, log_interval: int, name: str, unit: str,
                 rate_unit: str | None = None) -> None:
        self.bar = None
        self.log_interval = log_interval
        self.next_log = log_interval
        self.unit = unit
        self.rate_unit = rate_unit or unit
        self.start = time.perf_counter()
        self.position = 0
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, smoothing=0.1)

    def update(self, done: int, position: int) -> None:
        """`done` units so far, the input read up to byte `position`."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{done / elapsed:,.0f} {self.rate_unit}/s", refresh=False)
            self.bar.update(position - self.position)
        elif done >= self.next_log:
            print(f"processed {done} {self.unit} ({done / elapsed:,.0f} {self.rate_unit}/s, "
                  f"{position / elapsed / 1e6:.2f} MB/s)", file=sys.stderr, flush=True)
            self.next_log = (done // self.log_interval + 1) * self.log_interval
        self.position = position

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
