"""The tensor/sequence-parallel collectives, each written once as a named autograd pair.

| function                                   | forward                       | backward                  |
|--------------------------------------------|-------------------------------|---------------------------|
| copy_to_tensor_parallel_region             | identity                      | all-reduce                |
| reduce_from_tensor_parallel_region         | all-reduce                    | identity                  |
| scatter_to_tensor_parallel_region          | split last dim, keep own part | all-gather last dim       |
| gather_from_tensor_parallel_region         | all-gather last dim           | split last dim            |
| scatter_to_sequence_parallel_region        | split first dim               | all-gather first dim      |
| gather_from_sequence_parallel_region       | all-gather first dim          | reduce-scatter first dim  |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter first dim      | all-gather first dim      |
| all_to_all (expert parallelism)            | all-to-all of rows, splits    | all-to-all, splits swapped|

Activations are [s, b, h] (sequence first), so "first dim" is the sequence. Every function takes the
tensor-parallel group explicitly; a ``None`` group means a group of one and makes it the identity.
The first-dim gather and reduce-scatter pairs are also what the MoE all-gather token dispatcher
runs over the expert-parallel group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _is_nccl(group: Group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``x`` over the group, in a new tensor (``x`` is left untouched)."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    if _is_nccl(group):
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out if dim == 0 else torch.cat(out.chunk(n, dim=0), dim=dim)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim`` (gloo: all-reduce + split)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    if _is_nccl(group) and dim == 0:
        out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    return split(all_reduce(x, group), dim, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return split(g, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        # The consumer was tensor-parallel (each rank holds a partial gradient): sum and scatter.
        # Otherwise every rank holds the full gradient and just keeps its own chunk.
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter(g, 0, ctx.group), None, None
        return split(g, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, 0, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if group_size(group) > 1 else x


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group) if group_size(group) > 1 else x


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group) if group_size(group) > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToSP.apply(x, group) if group_size(group) > 1 else x


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad) if group_size(group) > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x, group) if group_size(group) > 1 else x


def _all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
    """Rows ``input_splits[r]`` of ``x`` (in order) go to rank r; the result holds
    ``output_splits[r]`` rows from each rank r, in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, g):
        output_splits, input_splits = ctx.splits
        return _all_to_all_rows(g, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
    """Differentiable all-to-all of rows (first dim) with per-rank split sizes; backward sends each
    row's gradient back where the row came from."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group) if group_size(group) > 1 else x
