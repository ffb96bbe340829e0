"""Micro-batches prepared ahead of the training step, in the sampler's order.

:class:`MicroBatchPrefetcher` runs one background thread that takes the sampler's index lists in
order, reads the samples, collates them (``collate(items) -> dict of CPU tensors``) and, when the
batches go to a CUDA device, copies them into pinned (page-locked) memory; the training loop's
:meth:`MicroBatchPrefetcher.next` then only starts the host-to-device copies (``non_blocking``, so
they overlap the GPU work already queued). Up to ``depth`` collated micro-batches wait in a
bounded queue, so the next step's data is read while the current step runs.

Order is exactly the sampler's (one producer, a FIFO queue): a run with the prefetcher sees the
same samples in the same order as one that reads them inline. An exception in the producer is
raised by :meth:`next` in the training loop. The producer may read up to ``depth`` micro-batches
beyond what the loop consumes; they are dropped by :meth:`close` (resuming uses the consumed
sample count, not the sampler's position).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional

import torch

_END = object()  # the sampler is exhausted


class MicroBatchPrefetcher:
    """Background reading, collation and pinning of micro-batches (see the module docstring).

    Args:
        dataset: indexable (``dataset[i]`` -> dict of tensors).
        sampler: iterator of index lists, one per micro-batch (e.g. ``iter(MicroBatchSampler(...))``).
        collate: list of samples -> dict of CPU tensors (one micro-batch); ``None`` values allowed.
        device: where :meth:`next` puts the tensors.
        depth: micro-batches prepared ahead (>= 1).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: Iterator[list[int]],
        collate: Callable[[list], dict[str, Optional[torch.Tensor]]],
        device: torch.device,
        depth: int = 2,
    ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self._dataset, self._sampler, self._collate = dataset, sampler, collate
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="megafast-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for indices in self._sampler:
                batch = self._collate([self._dataset[i] for i in indices])
                if self.pin:
                    batch = {k: None if t is None else t.pin_memory() for k, t in batch.items()}
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless closed meanwhile (False: stop producing)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> dict[str, Optional[torch.Tensor]]:
        """The next micro-batch, on ``device`` (copies started asynchronously from pinned memory)."""
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return {k: None if t is None else t.to(self.device, non_blocking=self.pin) for k, t in item.items()}

    def close(self) -> None:
        """Stop the producer and drop what it prepared ahead."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)

    def __enter__(self) -> "MicroBatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineMicroBatchReader:
    """The same interface as :class:`MicroBatchPrefetcher` without the thread: each micro-batch is read
    and collated when :meth:`next` asks for it (Megatron's ``--num-workers 0``: data loading in the
    training process's main thread). Same micro-batches in the same order."""

    def __init__(self, dataset: Any, sampler: Iterator[list[int]],
                 collate: Callable[[list], dict[str, Optional[torch.Tensor]]], device: torch.device) -> None:
        self.device = torch.device(device)
        self._dataset, self._sampler, self._collate = dataset, sampler, collate

    def next(self) -> dict[str, Optional[torch.Tensor]]:
        """The next micro-batch, on ``device``."""
        batch = self._collate([self._dataset[i] for i in next(self._sampler)])
        return {k: None if t is None else t.to(self.device) for k, t in batch.items()}

    def close(self) -> None:
        """Nothing to stop."""


__all__ = ["InlineMicroBatchReader", "MicroBatchPrefetcher"]
