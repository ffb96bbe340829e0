"""Data parallelism: contiguous fp32 gradient buffers, bucketed and reduced over the DP group.

Every trainable parameter ``p`` gets ``p.main_grad``, a view into a flat fp32 buffer (one buffer
per model chunk and parameter dtype). A post-accumulate-grad hook adds ``p.grad`` into it and frees
``p.grad``, so gradients accumulate in fp32 across microbatches even for bf16/fp16 parameters::

    main_grad = sum over microbatches m of  float32(grad_m)

Parameters are laid out in *reverse* order of ``chunk.parameters()`` (the order backward produces
their gradients) and the buffer is cut into buckets of about ``bucket_size_mb`` MiB. During the
last microbatch's backward (:meth:`DataParallel.set_last_microbatch`), a bucket's collective is
launched asynchronously as soon as all its parameters' gradients have arrived, overlapping the
rest of the backward pass; :meth:`DataParallel.finish_grad_sync` launches the rest and waits.

The collective is a sum over the DP ranks (``average_in_collective=False``, what the trainer
uses: its loss is already divided by the token count of the whole global batch) or a mean
(``True``: each rank pre-divides by the DP size).

With ``use_distributed_optimizer`` (ZeRO-1) every bucket is padded to a multiple of the DP size
and DP rank ``r`` owns the contiguous shard ``[start + r*n/d, start + (r+1)*n/d)`` of each bucket of
``n`` elements: the collective is a reduce-scatter (NCCL, in place; gloo has none, so an all-reduce
whose other shards are simply ignored), the optimizer updates only its shards, and
:meth:`DataParallel.gather_params` all-gathers the updated parameters, which then live in a
contiguous parameter buffer with the same layout as the gradient buffer. Parameters whose
gradient is also summed across pipeline stages (tied embeddings) get a bucket of their own, so the
first and last stage shard them identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megafast.parallel.mappings import group_size
from megafast.parallel.state import ParallelState

BYTES_PER_GRAD_ELEMENT = 4  # fp32


@dataclass(eq=False)
class GradBucket:
    """A contiguous range ``[start, end)`` of one :class:`GradBuffer`, reduced by one collective."""

    buffer: "GradBuffer"
    start: int
    end: int
    params: list[nn.Parameter]
    work: Optional[dist.Work] = None  # in-flight collective
    launched: bool = False
    arrived: set[int] = field(default_factory=set)  # ids of params whose last-microbatch grad arrived

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def grad_data(self) -> torch.Tensor:
        return self.buffer.grad_data[self.start : self.end]

    @property
    def param_data(self) -> torch.Tensor:
        assert self.buffer.param_data is not None, "parameter buffers exist only with the distributed optimizer"
        return self.buffer.param_data[self.start : self.end]

    def shard_range(self, rank: int, size: int) -> tuple[int, int]:
        """Buffer offsets ``[lo, hi)`` owned by DP rank ``rank`` of ``size`` (ZeRO-1)."""
        assert self.numel % size == 0, "bucket was not padded to a multiple of the DP size"
        n = self.numel // size
        return self.start + rank * n, self.start + (rank + 1) * n


@dataclass(eq=False)
class GradBuffer:
    """Flat fp32 gradients (and, for ZeRO-1, parameters) of one chunk's parameters of one dtype."""

    chunk: int
    param_dtype: torch.dtype
    grad_data: torch.Tensor  # fp32 [numel]
    ranges: dict[int, tuple[int, int]]  # id(param) -> [start, end) in the buffer
    params: list[nn.Parameter]  # buffer order (reverse of chunk.parameters())
    buckets: list[GradBucket] = field(default_factory=list)
    param_data: Optional[torch.Tensor] = None  # [numel] in param_dtype (distributed optimizer only)


class DataParallel:
    """Megatron-style DDP over a list of model chunks (one, or several for virtual pipelining).

    Typical use, per global batch::

        ddp.zero_grad()
        for i, mb in enumerate(microbatches):
            ddp.set_last_microbatch(i == len(microbatches) - 1)
            loss_fn(chunk(mb)).backward()
        ddp.finish_grad_sync()   # every rank now has the DP-summed gradients in p.main_grad
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        state: ParallelState,
        bucket_size_mb: Optional[float] = 25.0,
        use_distributed_optimizer: bool = False,
        overlap_grad_reduce: bool = True,
        average_in_collective: bool = False,
    ) -> None:
        if bucket_size_mb is not None and bucket_size_mb <= 0:
            raise ValueError(f"bucket size must be > 0 MiB, got {bucket_size_mb}: use None for a single bucket")
        self.chunks = list(chunks)
        self.state = state
        self.dp_group = state.dp_group
        self.dp_size = group_size(state.dp_group)
        self.dp_rank = state.dp_rank if self.dp_size > 1 else 0
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.average_in_collective = average_in_collective
        self.bucket_numel = (
            None if bucket_size_mb is None else max(1, int(bucket_size_mb * 2**20 / BYTES_PER_GRAD_ELEMENT))
        )
        self._sync_on_backward = [True] * len(self.chunks)
        self._synced = False  # finish_grad_sync ran and no gradient arrived since

        seen: set[int] = set()
        self.buffers: list[GradBuffer] = []
        for c, chunk in enumerate(self.chunks):
            shared = {id(p) for p in getattr(chunk, "shared_embedding_parameters", lambda: [])()}
            params = [p for p in chunk.parameters() if p.requires_grad]
            if any(id(p) in seen for p in params):
                raise ValueError(
                    f"model chunk {c} shares a parameter with an earlier chunk: chunks must be disjoint"
                )
            seen.update(id(p) for p in params)
            for dtype in dict.fromkeys(p.dtype for p in params):
                group = [p for p in reversed(params) if p.dtype == dtype]
                self.buffers.append(self._build_buffer(c, dtype, group, shared))
        self.buckets: list[GradBucket] = [b for buf in self.buffers for b in buf.buckets]
        self.params: list[nn.Parameter] = [p for buf in self.buffers for p in buf.params]
        for buf in self.buffers:
            for bucket in buf.buckets:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(self._make_hook(bucket, buf.chunk))

    # ----------------------------------------------------------------------------------- layout

    def _build_buffer(
        self, chunk: int, dtype: torch.dtype, params: list[nn.Parameter], shared: set[int]
    ) -> GradBuffer:
        """Assign ``[start, end)`` ranges bucket by bucket; pad each bucket for ZeRO-1 sharding."""
        pad_to = self.dp_size if self.use_distributed_optimizer else 1
        ranges: dict[int, tuple[int, int]] = {}
        bucket_spans: list[tuple[int, int, list[nn.Parameter]]] = []
        offset, bucket_start, members = 0, 0, []

        def close() -> None:
            nonlocal offset, bucket_start, members
            if members:
                offset = -(-offset // pad_to) * pad_to
                bucket_spans.append((bucket_start, offset, members))
            bucket_start, members = offset, []

        for p in params:
            own_bucket = id(p) in shared
            if own_bucket:
                close()
            ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if own_bucket or (self.bucket_numel is not None and offset - bucket_start >= self.bucket_numel):
                close()
        close()

        device = params[0].device
        buf = GradBuffer(chunk, dtype, torch.zeros(offset, dtype=torch.float32, device=device), ranges, params)
        buf.buckets = [GradBucket(buf, s, e, m) for s, e, m in bucket_spans]
        if self.use_distributed_optimizer:
            buf.param_data = torch.zeros(offset, dtype=dtype, device=device)
        for p in params:
            s, e = ranges[id(p)]
            p.main_grad = buf.grad_data[s:e].view(p.shape)
            if buf.param_data is not None:  # parameters become views of the contiguous buffer
                buf.param_data[s:e].copy_(p.data.view(-1))
                p.data = buf.param_data[s:e].view(p.shape)
        return buf

    # ------------------------------------------------------------------------------- backward

    def _make_hook(self, bucket: GradBucket, chunk: int):
        def hook(param: nn.Parameter) -> None:
            if param.grad is None:
                return
            if self._synced:
                raise RuntimeError(
                    "a gradient arrived after finish_grad_sync(): call zero_grad() (or optimizer.step()) "
                    "before the next backward"
                )
            if bucket.launched:
                raise RuntimeError(
                    "a gradient arrived for a bucket whose DP reduction already started: call "
                    "set_last_microbatch(False) before every backward except the last microbatch's"
                )
            with torch.no_grad():
                param.main_grad.add_(param.grad)  # fp32 accumulation
            param.grad = None
            if self.overlap_grad_reduce and self.dp_size > 1 and self._sync_on_backward[chunk]:
                bucket.arrived.add(id(param))
                if len(bucket.arrived) == len(bucket.params):
                    self._launch(bucket)

        return hook

    def set_last_microbatch(self, flag: bool, chunk: Optional[int] = None) -> None:
        """Whether the next backward is the last of the step, for ``chunk`` (default: every chunk).

        When it is, each bucket's DP collective starts as soon as its gradients are complete.
        """
        for c in range(len(self.chunks)) if chunk is None else [chunk]:
            self._sync_on_backward[c] = flag

    def _launch(self, bucket: GradBucket) -> None:
        grad = bucket.grad_data
        if self.average_in_collective:
            grad.div_(self.dp_size)
        if self.use_distributed_optimizer and dist.get_backend(self.dp_group) == "nccl":
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            shard = bucket.buffer.grad_data[lo:hi]  # in place: NCCL's output is a slice of its input
            bucket.work = dist.reduce_scatter_tensor(shard, grad, group=self.dp_group, async_op=True)
        else:
            bucket.work = dist.all_reduce(grad, group=self.dp_group, async_op=True)
        bucket.launched = True

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet reduced, wait for all. Idempotent until the next backward."""
        if self._synced:
            return
        if self.dp_size > 1:
            for bucket in self.buckets:
                if not bucket.launched:
                    self._launch(bucket)
            for bucket in self.buckets:
                bucket.work.wait()
        self._reset_buckets()
        self._synced = True

    def _reset_buckets(self) -> None:
        for bucket in self.buckets:
            bucket.work, bucket.launched = None, False
            bucket.arrived.clear()

    def zero_grad(self) -> None:
        """Zero every ``main_grad`` (and drop any stray ``.grad``) before a new global batch."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
        for buf in self.buffers:
            buf.grad_data.zero_()
        for p in self.params:
            p.grad = None
        self._reset_buckets()
        self._synced = False

    # ------------------------------------------------------------------------ ZeRO-1 gather

    def gather_params(self) -> None:
        """All-gather every bucket's parameter shards over DP (distributed optimizer only)."""
        if not self.use_distributed_optimizer or self.dp_size == 1:
            return
        nccl = dist.get_backend(self.dp_group) == "nccl"
        works = []
        for bucket in self.buckets:
            full = bucket.param_data
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            shard = bucket.buffer.param_data[lo:hi]
            if nccl:
                works.append(dist.all_gather_into_tensor(full, shard, group=self.dp_group, async_op=True))
            else:
                parts = list(full.chunk(self.dp_size))
                works.append(dist.all_gather(parts, shard.clone(), group=self.dp_group, async_op=True))
        for w in works:
            w.wait()


__all__ = ["DataParallel", "GradBucket", "GradBuffer"]
