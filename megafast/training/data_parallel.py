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

Sharding strategies (Megatron-FSDP's names, ``sharding_strategy``): ``no_shard`` (plain DDP),
``optim`` (ZeRO-1, the above; ``use_distributed_optimizer=True`` is its alias), ``optim_grads``
(ZeRO-2) and ``optim_grads_params`` (ZeRO-3). With gradients sharded there is no full-size
gradient buffer: ``grad_data`` holds only this rank's shard of every bucket (``numel / dp``
elements each, bucket after bucket) and parameters get no ``main_grad``. During each
micro-batch's backward a bucket's gradients are added into a temporary full-size fp32 bucket,
which is reduce-scattered (sum over DP) as soon as the bucket is complete and freed once the
result is added into the shard::

    grad_shard_r = sum over micro-batches m of  reduce_scatter_r(sum over DP of float32(grad_m))

With parameters sharded too (ZeRO-3) each rank keeps only its shard of every bucket's parameters;
buckets follow the model's sharding units (megafast.training.sharded_params: the embedding, each
transformer layer, the final norm, the output head), whose full weights are all-gathered just
before their forward and backward and freed after each (the next unit's gather is prefetched).
Frozen parameters (a LoRA base) are not in the buffers and stay whole on every rank.

Expert parallelism (``state.ep_size`` > 1): the routed experts' parameters (marked
``expert_parallel``) get buffers of their own, reduced over the expert-data-parallel group (the
ranks holding the same experts, ``state.expert_dp_group``) and sharded over it by the distributed
optimizer; every other parameter over DP as above. Each :class:`GradBuffer` carries its group, size
and rank; an expert group of one rank (EP = DP) needs no collective.

Why not torch's FSDP2 (``torch.distributed.fsdp.fully_shard``, which does run on gloo/CPU): it
turns parameters into DTensors with its own reduce-scatter and gradient dtype, while our
optimizer, global-norm rules (``tensor_model_parallel``/``sequence_parallel``/``shared_embedding``
attributes), tied-embedding and sequence-parallel gradient sums, the pipeline engine's
per-micro-batch sync control and the Megatron-format sharded checkpoints all work on these flat
fp32 buckets and plain parameters; extending the buckets keeps one code path for every strategy,
fp32 accumulation across micro-batches and bit-exact resume.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megafast.parallel.mappings import group_size
from megafast.parallel.state import ParallelState
from megafast.training.sharded_params import ParamGatherer, sharding_units

BYTES_PER_GRAD_ELEMENT = 4  # fp32
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
IN_FLIGHT = 2  # gradients sharded: reduce-scatters (each holding a full-size fp32 bucket) running at once


def resolve_sharding_strategy(strategy: Optional[str], use_distributed_optimizer: bool) -> str:
    """The strategy named by ``--data-parallel-sharding-strategy`` and its alias
    ``--use-distributed-optimizer`` (= ``optim``)."""
    if strategy is None:
        return "optim" if use_distributed_optimizer else "no_shard"
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(
            f"unknown data-parallel sharding strategy {strategy!r}: use one of {', '.join(SHARDING_STRATEGIES)}"
        )
    if use_distributed_optimizer and strategy == "no_shard":
        raise ValueError(
            "--use-distributed-optimizer contradicts --data-parallel-sharding-strategy no_shard: drop one"
        )
    return strategy


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


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
    # gradients sharded (ZeRO-2/3): the micro-batch's full-size fp32 gradients until reduce-scattered,
    # then (collective, full, result shard) until the result is added into the shard
    grad_full: Optional[torch.Tensor] = None
    pending: list = field(default_factory=list)
    # parameters sharded (ZeRO-3): this rank's shard, and the full bucket whose storage is freed between uses
    param_shard: Optional[torch.Tensor] = None
    param_full: Optional[torch.Tensor] = None
    gathered: bool = False
    gather_work: Optional[dist.Work] = None

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

    def grad_shard(self, size: int) -> torch.Tensor:
        """This rank's gradient shard of the bucket (gradients sharded: a slice of ``grad_data``)."""
        return self.buffer.grad_data[self.start // size : self.end // size]

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
    grad_data: torch.Tensor  # fp32 [numel], or [numel / dp] (this rank's shards) when gradients are sharded
    ranges: dict[int, tuple[int, int]]  # id(param) -> [start, end) in the buffer
    params: list[nn.Parameter]  # buffer order (reverse of chunk.parameters())
    buckets: list[GradBucket] = field(default_factory=list)
    param_data: Optional[torch.Tensor] = None  # [numel] in param_dtype (ZeRO-1/2 only)
    param_shards: Optional[torch.Tensor] = None  # [numel / dp] in param_dtype (ZeRO-3 only)
    # the ranks reducing (and sharding) this buffer: DP, or expert-DP for expert parameters
    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    expert: bool = False


class DataParallel:
    """Megatron-style DDP over a list of model chunks (one, or several for virtual pipelining).

    Typical use, per global batch::

        ddp.zero_grad()
        for i, mb in enumerate(microbatches):
            ddp.set_last_microbatch(i == len(microbatches) - 1)
            loss_fn(chunk(mb)).backward()
        ddp.finish_grad_sync()   # every rank now has the DP-summed gradients in p.main_grad
                                 # (in its grad shards when gradients are sharded)
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        state: ParallelState,
        bucket_size_mb: Optional[float] = 25.0,
        use_distributed_optimizer: bool = False,
        overlap_grad_reduce: bool = True,
        average_in_collective: bool = False,
        sharding_strategy: Optional[str] = None,
    ) -> None:
        if bucket_size_mb is not None and bucket_size_mb <= 0:
            raise ValueError(f"bucket size must be > 0 MiB, got {bucket_size_mb}: use None for a single bucket")
        self.chunks = list(chunks)
        self.state = state
        self.dp_group = state.dp_group
        self.dp_size = group_size(state.dp_group)
        self.dp_rank = state.dp_rank if self.dp_size > 1 else 0
        self.sharding_strategy = resolve_sharding_strategy(sharding_strategy, use_distributed_optimizer)
        self.use_distributed_optimizer = self.sharding_strategy != "no_shard"
        # with one DP rank there is nothing to shard: ZeRO-2/3 behave as ZeRO-1
        sharded_grads = self.sharding_strategy in ("optim_grads", "optim_grads_params")
        self.shard_grads = sharded_grads and self.dp_size > 1
        self.shard_params = self.sharding_strategy == "optim_grads_params" and self.dp_size > 1
        self.overlap_grad_reduce = overlap_grad_reduce
        self.average_in_collective = average_in_collective
        self.bucket_numel = (
            None if bucket_size_mb is None else max(1, int(bucket_size_mb * 2**20 / BYTES_PER_GRAD_ELEMENT))
        )
        self._sync_on_backward = [True] * len(self.chunks)
        self._synced = False  # finish_grad_sync ran and no gradient arrived since
        self._in_flight: list[GradBucket] = []  # gradients sharded: buckets maybe still reduce-scattering

        seen: set[int] = set()
        self.buffers: list[GradBuffer] = []
        units_of_chunk = []
        for c, chunk in enumerate(self.chunks):
            shared = {id(p) for p in getattr(chunk, "shared_embedding_parameters", lambda: [])()}
            params = [p for p in chunk.parameters() if p.requires_grad]
            if any(id(p) in seen for p in params):
                raise ValueError(
                    f"model chunk {c} shares a parameter with an earlier chunk: chunks must be disjoint"
                )
            seen.update(id(p) for p in params)
            # ZeRO-3: a bucket never spans two sharding units, so each unit gathers its own buckets
            units = sharding_units(chunk) if self.shard_params else []
            units_of_chunk.append(units)
            unit_of: dict[int, int] = {}  # a parameter's bucket follows the first unit listing it
            for i, (_, ps) in enumerate(units):
                for p in ps:
                    unit_of.setdefault(id(p), i)
            experts = state.ep_size > 1  # expert parameters in buffers of their own
            for expert in (False, True) if experts else (False,):
                for dtype in dict.fromkeys(p.dtype for p in params):
                    group = [p for p in reversed(params)
                             if p.dtype == dtype and bool(getattr(p, "expert_parallel", False)) == expert]
                    if group:
                        self.buffers.append(self._build_buffer(c, dtype, group, shared, unit_of, expert))
        self.buckets: list[GradBucket] = [b for buf in self.buffers for b in buf.buckets]
        self.params: list[nn.Parameter] = [p for buf in self.buffers for p in buf.params]
        for buf in self.buffers:
            for bucket in buf.buckets:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(self._make_hook(bucket, buf.chunk))
        self.param_gatherer: Optional[ParamGatherer] = None
        if self.shard_params:
            bucket_of = {id(p): b for b in self.buckets for p in b.params}
            self.param_gatherer = ParamGatherer(self, [
                [(module, [bucket_of[id(p)] for p in dict.fromkeys(ps) if id(p) in bucket_of])
                 for module, ps in units]
                for units in units_of_chunk
            ])

    # ----------------------------------------------------------------------------------- layout

    def _build_buffer(
        self,
        chunk: int,
        dtype: torch.dtype,
        params: list[nn.Parameter],
        shared: set[int],
        unit_of: dict[int, int],
        expert: bool = False,
    ) -> GradBuffer:
        """Assign ``[start, end)`` ranges bucket by bucket; pad each bucket for DP sharding."""
        if expert:
            group, size = self.state.expert_dp_group, group_size(self.state.expert_dp_group)
            rank = self.state.expert_dp_rank if size > 1 else 0
        else:
            group, size, rank = self.dp_group, self.dp_size, self.dp_rank
        pad_to = size if self.use_distributed_optimizer else 1
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
            if own_bucket or (members and unit_of.get(id(p)) != unit_of.get(id(members[-1]))):
                close()
            ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if own_bucket or (self.bucket_numel is not None and offset - bucket_start >= self.bucket_numel):
                close()
        close()

        device = params[0].device
        grad_numel = offset // size if self.shard_grads else offset
        grad_data = torch.zeros(grad_numel, dtype=torch.float32, device=device)
        buf = GradBuffer(chunk, dtype, grad_data, ranges, params, group=group, size=size, rank=rank, expert=expert)
        buf.buckets = [GradBucket(buf, s, e, m) for s, e, m in bucket_spans]
        if self.shard_params:  # each bucket: its own full storage (freed between uses) and this rank's shard
            buf.param_shards = torch.zeros(offset // size, dtype=dtype, device=device)
            for bucket in buf.buckets:
                full = torch.zeros(bucket.numel, dtype=dtype, device=device)
                for p in bucket.params:
                    s, e = ranges[id(p)]
                    full[s - bucket.start : e - bucket.start].copy_(p.data.view(-1))
                    p.data = full[s - bucket.start : e - bucket.start].view(p.shape)
                lo, hi = bucket.shard_range(rank, size)
                d = size
                bucket.param_shard = buf.param_shards[bucket.start // d : bucket.end // d]
                bucket.param_shard.copy_(full[lo - bucket.start : hi - bucket.start])
                bucket.param_full, bucket.gathered = full, True
        elif self.use_distributed_optimizer:
            buf.param_data = torch.zeros(offset, dtype=dtype, device=device)
        for p in params:
            s, e = ranges[id(p)]
            if not self.shard_grads:
                p.main_grad = buf.grad_data[s:e].view(p.shape)
            if buf.param_data is not None:  # parameters become views of the contiguous buffer
                buf.param_data[s:e].copy_(p.data.view(-1))
                p.data = buf.param_data[s:e].view(p.shape)
        return buf

    def local_grad(self, bucket: GradBucket, lo: int, hi: int) -> torch.Tensor:
        """The fp32 gradient of buffer elements ``[lo, hi)`` (inside this rank's shard when sharded)."""
        if not self.shard_grads:
            return bucket.buffer.grad_data[lo:hi]
        buf = bucket.buffer
        first, _ = bucket.shard_range(buf.rank, buf.size)
        base = bucket.start // buf.size
        return bucket.buffer.grad_data[base + lo - first : base + hi - first]

    def local_param(self, bucket: GradBucket, lo: int, hi: int) -> Optional[torch.Tensor]:
        """ZeRO-3: this rank's persistent copy of buffer elements ``[lo, hi)`` of its shard (else None)."""
        if not self.shard_params:
            return None
        first, _ = bucket.shard_range(bucket.buffer.rank, bucket.buffer.size)
        return bucket.param_shard[lo - first : hi - first]

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
            if self.shard_grads:
                self._accumulate_sharded(bucket, param)
                return
            if bucket.launched:
                raise RuntimeError(
                    "a gradient arrived for a bucket whose DP reduction already started: call "
                    "set_last_microbatch(False) before every backward except the last microbatch's"
                )
            with torch.no_grad():
                param.main_grad.add_(param.grad)  # fp32 accumulation
            param.grad = None
            if self.overlap_grad_reduce and bucket.buffer.size > 1 and self._sync_on_backward[chunk]:
                bucket.arrived.add(id(param))
                if len(bucket.arrived) == len(bucket.params):
                    self._launch(bucket)

        return hook

    @torch.no_grad()
    def _accumulate_sharded(self, bucket: GradBucket, param: nn.Parameter) -> None:
        """ZeRO-2/3: this micro-batch's gradient into the bucket's temporary full-size fp32 buffer;
        reduce-scatter the bucket once complete (every micro-batch: no full buffer outlives it)."""
        if id(param) in bucket.arrived:  # a new micro-batch began before the bucket was complete
            self._launch_sharded(bucket)
        if bucket.grad_full is None:
            bucket.grad_full = torch.zeros(bucket.numel, dtype=torch.float32, device=param.device)
        s, e = bucket.buffer.ranges[id(param)]
        bucket.grad_full[s - bucket.start : e - bucket.start].add_(param.grad.view(-1))
        param.grad = None
        bucket.arrived.add(id(param))
        if len(bucket.arrived) == len(bucket.params):
            self._launch_sharded(bucket)
            if self.param_gatherer is not None:  # the bucket's backward is done: free its full weights
                self.param_gatherer.release(bucket)

    def _launch_sharded(self, bucket: GradBucket) -> None:
        full, bucket.grad_full = bucket.grad_full, None
        bucket.arrived.clear()
        if full is None:
            return
        self._drain(bucket)  # at most one reduction per bucket in flight
        buf = bucket.buffer
        if buf.size == 1:  # an expert group of one rank: the gradient is complete here
            bucket.pending.append((None, full, full))
            self._drain(bucket)
            return
        if self.average_in_collective:
            full.div_(buf.size)
        out = torch.empty(bucket.numel // buf.size, dtype=torch.float32, device=full.device)
        work = _reduce_scatter(out, full, buf.group, async_op=self.overlap_grad_reduce)
        bucket.pending.append((work, full, out))
        if not self.overlap_grad_reduce:
            self._drain(bucket)
            return
        # bound the full-size temporaries alive at once: at most IN_FLIGHT buckets reducing
        self._in_flight.append(bucket)
        while len(self._in_flight) > IN_FLIGHT:
            self._drain(self._in_flight.pop(0))

    @staticmethod
    def _drain(bucket: GradBucket) -> None:
        """Wait for the bucket's reduce-scatters and add their results into its gradient shard."""
        for work, _full, out in bucket.pending:
            if work is not None:
                work.wait()
            bucket.grad_shard(bucket.numel // out.numel()).add_(out)
        bucket.pending.clear()

    def set_last_microbatch(self, flag: bool, chunk: Optional[int] = None) -> None:
        """Whether the next backward is the last of the step, for ``chunk`` (default: every chunk).

        When it is, each bucket's DP collective starts as soon as its gradients are complete.
        (Gradients sharded: buckets are reduce-scattered after every micro-batch regardless.)
        """
        for c in range(len(self.chunks)) if chunk is None else [chunk]:
            self._sync_on_backward[c] = flag

    def _launch(self, bucket: GradBucket) -> None:
        grad, buf = bucket.grad_data, bucket.buffer
        bucket.launched = True
        if buf.size == 1:  # an expert group of one rank: nothing to reduce
            return
        if self.average_in_collective:
            grad.div_(buf.size)
        if self.use_distributed_optimizer and dist.get_backend(buf.group) == "nccl":
            lo, hi = bucket.shard_range(buf.rank, buf.size)
            shard = buf.grad_data[lo:hi]  # in place: NCCL's output is a slice of its input
            bucket.work = dist.reduce_scatter_tensor(shard, grad, group=buf.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(grad, group=buf.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet reduced, wait for all. Idempotent until the next backward."""
        if self._synced:
            return
        if self.shard_grads:
            for bucket in self.buckets:
                self._launch_sharded(bucket)  # buckets some of whose parameters got no gradient
                self._drain(bucket)
            self._in_flight.clear()
            if self.param_gatherer is not None:
                self.param_gatherer.release_all()
        elif self.dp_size > 1:
            for bucket in self.buckets:
                if not bucket.launched:
                    self._launch(bucket)
            for bucket in self.buckets:
                if bucket.work is not None:
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
            for work, _full, _out in bucket.pending:
                if work is not None:
                    work.wait()
            bucket.pending.clear()
            bucket.grad_full = None
        self._in_flight.clear()
        for buf in self.buffers:
            buf.grad_data.zero_()
        for p in self.params:
            p.grad = None
        self._reset_buckets()
        self._synced = False

    # ------------------------------------------------------------------------ ZeRO-1/2 gather

    def gather_params(self) -> None:
        """All-gather every bucket's parameter shards over DP (ZeRO-1/2; ZeRO-3 gathers on use)."""
        if not self.use_distributed_optimizer or self.dp_size == 1 or self.shard_params:
            return
        nccl = dist.get_backend(self.dp_group) == "nccl"
        works = []
        for bucket in self.buckets:
            buf = bucket.buffer
            if buf.size == 1:
                continue
            full = bucket.param_data
            lo, hi = bucket.shard_range(buf.rank, buf.size)
            shard = buf.param_data[lo:hi]
            if nccl:
                works.append(dist.all_gather_into_tensor(full, shard, group=buf.group, async_op=True))
            else:
                parts = list(full.chunk(buf.size))
                works.append(dist.all_gather(parts, shard.clone(), group=buf.group, async_op=True))
        for w in works:
            w.wait()

    def unsharded_params(self, write_back: bool = False):
        """Context manager: every parameter whole while inside (ZeRO-3; a no-op otherwise), e.g. to
        save or load the model's state dict. ``write_back``: copy the (loaded) full weights into this
        rank's shards on exit."""
        if self.param_gatherer is None:
            return contextlib.nullcontext()
        return self.param_gatherer.all_gathered(write_back)


__all__ = ["DataParallel", "GradBucket", "GradBuffer", "SHARDING_STRATEGIES", "resolve_sharding_strategy"]
