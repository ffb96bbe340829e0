"""ZeRO-3 parameter sharding: each unit's weights all-gathered just before use and freed after.

With ``--data-parallel-sharding-strategy optim_grads_params`` every DP rank keeps only its shard
(``1/dp``) of each gradient bucket's parameters (megafast.training.data_parallel). A model chunk is
cut into *sharding units* (:func:`sharding_units`): the embedding, each transformer layer, the
final norm and the output head of a GPTModel (any other module: its direct children, plus the
root for parameters of its own). Each unit's buckets hold only that unit's parameters, and a
bucket's full weights live in one flat tensor whose storage is allocated only while needed::

    forward of unit i:   all-gather unit i (waits for the prefetch), prefetch unit i+1,
                         run, free unit i
    backward of unit i:  a hook on unit i's outputs fires when their gradient is ready (just before
                         the unit's backward): all-gather unit i, prefetch unit i-1; once every
                         gradient of a bucket has arrived (data_parallel), free the bucket

The parameters stay the same ``nn.Parameter`` objects, views of that flat tensor: freeing resizes
its storage to 0 bytes and gathering resizes it back and fills it, so autograd's saved references
to the weights see the gathered values in backward (FSDP1's approach). A forward re-run during
backward (activation recompute) finds the unit gathered and leaves it so. The tied output head of a
one-stage model also gathers the embedding's word weight (it multiplies by it).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from megafast.training.data_parallel import DataParallel, GradBucket

Unit = tuple[nn.Module, list[nn.Parameter]]  # (module whose forward uses them, trainable parameters)


def sharding_units(chunk: nn.Module) -> list[Unit]:
    """The chunk's sharding units in forward order, each with the trainable parameters it gathers.

    A parameter belongs to the first unit listing it (its bucket's unit); a later unit may list it
    too when its forward also reads it (the tied output head and the word embeddings).
    """
    decoder = getattr(chunk, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleDict):
        modules = [getattr(chunk, "embedding", None), *decoder.layers.values(),
                   getattr(decoder, "final_layernorm", None), getattr(chunk, "output_layer", None)]
    else:
        modules = list(chunk.children())
    head = getattr(chunk, "output_layer", None)
    embedding = getattr(chunk, "embedding", None)
    tied = None  # the word embeddings, when the output head multiplies by them on this stage
    if head is not None and embedding is not None and getattr(head, "weight", 1) is None:
        tied = embedding.word_embeddings.weight if embedding.word_embeddings.weight.requires_grad else None
    units: list[Unit] = []
    owned: set[int] = set()
    for m in modules:
        if m is None:
            continue
        ps = [p for p in m.parameters() if p.requires_grad and id(p) not in owned]
        owned.update(id(p) for p in ps)
        if m is head and tied is not None:
            ps = ps + [tied]
        if ps:
            units.append((m, ps))
    rest = [p for p in chunk.parameters() if p.requires_grad and id(p) not in owned]
    if rest:  # parameters outside every unit: gathered around the whole chunk's forward
        units.insert(0, (chunk, rest))
    return units


class ParamGatherer:
    """Gathers and frees the sharded parameters of each unit around its forward and backward."""

    def __init__(
        self, ddp: "DataParallel", units: Sequence[Sequence[tuple[nn.Module, list["GradBucket"]]]]
    ) -> None:
        self.nccl = dist.get_backend(ddp.dp_group) == "nccl"
        self.buckets = list(dict.fromkeys(b for chunk_units in units for _, bs in chunk_units for b in bs))
        for chunk_units in units:
            order = [bs for _, bs in chunk_units]
            for i, (module, _) in enumerate(chunk_units):
                module.register_forward_pre_hook(functools.partial(self._pre_forward, order, i))
                module.register_forward_hook(functools.partial(self._post_forward, order, i))
        self.release_all()

    # ------------------------------------------------------------------------ gather / free

    def gather(self, bucket: "GradBucket", wait: bool = True) -> None:
        """Make the bucket's full weights valid (``wait=False``: start the all-gather and return)."""
        if not bucket.gathered:
            full, buf = bucket.param_full, bucket.buffer  # reduced and sharded over buf.group (DP or expert-DP)
            full.untyped_storage().resize_(full.numel() * full.element_size())
            if buf.size == 1:
                full.copy_(bucket.param_shard)
                work = None
            elif self.nccl:
                work = dist.all_gather_into_tensor(full, bucket.param_shard, group=buf.group, async_op=True)
            else:
                work = dist.all_gather(list(full.chunk(buf.size)), bucket.param_shard, group=buf.group,
                                       async_op=True)
            bucket.gathered, bucket.gather_work = True, work
        if wait and bucket.gather_work is not None:
            bucket.gather_work.wait()
            bucket.gather_work = None

    def release(self, bucket: "GradBucket") -> None:
        """Free the bucket's full weights (its shard stays)."""
        if not bucket.gathered:
            return
        if bucket.gather_work is not None:
            bucket.gather_work.wait()
            bucket.gather_work = None
        bucket.param_full.untyped_storage().resize_(0)
        bucket.gathered = False

    def release_all(self) -> None:
        for bucket in self.buckets:
            self.release(bucket)

    @contextlib.contextmanager
    def all_gathered(self, write_back: bool = False) -> Iterator[None]:
        """Every bucket gathered inside; ``write_back`` copies the full weights into the shards on exit."""
        for bucket in self.buckets:
            self.gather(bucket, wait=False)
        for bucket in self.buckets:
            self.gather(bucket)
        try:
            yield
            if write_back:
                with torch.no_grad():
                    for bucket in self.buckets:
                        size, rank = bucket.buffer.size, bucket.buffer.rank
                        n = bucket.numel // size
                        bucket.param_shard.copy_(bucket.param_full[rank * n : (rank + 1) * n])
        finally:
            self.release_all()

    # -------------------------------------------------------------------------------- hooks

    def _pre_forward(self, order: list[list["GradBucket"]], i: int, module: nn.Module, args) -> None:
        for bucket in order[i]:
            self.gather(bucket)
        if i + 1 < len(order):  # prefetch the next unit's weights while this one computes
            for bucket in order[i + 1]:
                self.gather(bucket, wait=False)

    def _post_forward(self, order: list[list["GradBucket"]], i: int, module: nn.Module, args, output):
        if torch._C._current_graph_task_id() != -1:
            return None  # recompute inside backward: keep the weights until the gradients arrive
        if torch.is_grad_enabled():
            hook = functools.partial(self._pre_backward, order, i)
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(hook)
        for bucket in order[i]:
            self.release(bucket)
        return None

    def _pre_backward(self, order: list[list["GradBucket"]], i: int, grad: torch.Tensor) -> None:
        for bucket in order[i]:
            self.gather(bucket)
        if i > 0:  # prefetch the unit whose backward comes next
            for bucket in order[i - 1]:
                self.gather(bucket, wait=False)
        return None


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


__all__ = ["ParamGatherer", "sharding_units"]
