"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding.

Parameter metadata (Megatron's attribute names), read by initialisation, checkpoint resharding
and gradient reduction:
- ``tensor_model_parallel``: the parameter is a shard of a larger "full" parameter;
- ``partition_dim``: the dimension it is split along;
- ``partition_stride``: the full parameter is ``stride`` blocks along that dimension and each rank
  holds its chunk of every block, stacked (SwiGLU's ``[gate_r; up_r]`` has stride 2);
- ``sequence_parallel``: replicated across TP but fed by sequence shards, so each rank's gradient
  is partial and must be summed over TP (:func:`sync_sequence_parallel_grads`).

Layers take ``init_method(full) -> None`` filling the *full* weight in place; each rank then keeps
its shard. Drawing the full weight from the same generator on every rank makes the model
independent of the TP size.

The two linear layers have an optional ``adapter`` (a module, e.g. a LoRA adapter from
``megafast.model.lora``) whose output is added to the layer's: for the column-parallel layer it
gets the layer's input and returns this rank's output shard; for the row-parallel layer it gets
this rank's input shard and returns the (reduced) output.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast.parallel.mappings import (
    Group,
    all_gather,
    all_reduce,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float = 0.02) -> InitMethod:
    """Default init: N(0, std) from the global generator (seed it identically on every rank)."""
    return lambda full: nn.init.normal_(full, mean=0.0, std=std)


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's part of ``full``: its chunk of each of ``stride`` blocks along ``dim``, stacked."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


def unshard(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's part in rank order."""
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def _set_tp_attributes(param: nn.Parameter, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def _make_weight(
    full_shape: tuple[int, ...],
    dim: int,
    group: Group,
    stride: int,
    init_method: InitMethod,
    dtype: torch.dtype,
    device: Optional[torch.device],
) -> nn.Parameter:
    full = torch.empty(full_shape, dtype=torch.float32)
    init_method(full)
    local = shard(full, dim, group_rank(group), group_size(group), stride)
    weight = nn.Parameter(local.to(device=device, dtype=dtype).contiguous())
    _set_tp_attributes(weight, dim, stride)
    return weight


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} {n} is not divisible by the tensor parallel size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split along its output dimension: A = [A_1, ..., A_p], Y_i = X A_i + b_i.

    Input [s, b, h_in] replicated on the TP ranks (or, with ``sequence_parallel``, this rank's
    [s/p, b, h_in] shard, all-gathered here). Output [s, b, h_out/p], or [s, b, h_out] with
    ``gather_output``. Weight [h_out/p, h_in] (torch's Linear layout).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group: Group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod = normal_init(),
        partition_stride: int = 1,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.partition_stride = partition_stride
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        tp = group_size(tp_group)
        self.output_size_per_partition = _divide(output_size, tp * partition_stride, "output size") * partition_stride
        self.weight = _make_weight(
            (output_size, input_size), 0, tp_group, partition_stride, init_method, params_dtype, device
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device))
            _set_tp_attributes(self.bias, 0, partition_stride)
        else:
            self.register_parameter("bias", None)
        self.adapter: Optional[nn.Module] = None  # x -> [s, b, h_out/p], added to the output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = column_parallel_linear(x, self.weight, self.bias, self.tp_group, self.sequence_parallel)
        if self.adapter is not None:
            y = y + self.adapter(x)
        if not self.gather_output:
            return y
        y = gather_from_tensor_parallel_region(y, self.tp_group)  # [.., rank 0's part, rank 1's part, ...]
        if self.partition_stride > 1:  # back to the full layout [block 0; block 1; ...]
            y = unshard(list(y.chunk(group_size(self.tp_group), dim=-1)), -1, self.partition_stride)
        return y


def column_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    tp_group: Group,
    sequence_parallel: bool,
) -> torch.Tensor:
    """X A_i + b_i for this rank's column shard A_i; also used with a tied embedding as A_i."""
    return linear(column_parallel_input(x, tp_group, sequence_parallel), weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor | nn.Module, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b``. ``weight`` is a tensor, or a module computing the product from a compressed
    frozen form as ``weight(x, bias)`` (QLoRA's NF4 base weights, megafast.quant.NF4Weight)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x, bias)


def column_parallel_input(x: torch.Tensor, tp_group: Group, sequence_parallel: bool) -> torch.Tensor:
    """The full input every rank's column shard multiplies: identity forward and all-reduced
    gradient, or with sequence parallelism [s/p, b, h] -> [s, b, h] gathered, gradient reduce-scattered."""
    if sequence_parallel and group_size(tp_group) > 1:
        return gather_from_sequence_parallel_region(x, tp_group)
    return copy_to_tensor_parallel_region(x, tp_group)


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split along its input dimension: A = [A_1; ...; A_p], Y = sum_i X_i A_i + b.

    Input [s, b, h_in/p] (``input_is_parallel``) or [s, b, h_in] split here. Output [s, b, h_out]
    summed over TP, or with ``sequence_parallel`` reduce-scattered to [s/p, b, h_out]. The bias
    is replicated and added after the reduction. Weight [h_out, h_in/p].
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group: Group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod = normal_init(),
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence parallelism needs input_is_parallel=True")
        _divide(input_size, group_size(tp_group), "input size")
        self.weight = _make_weight((output_size, input_size), 1, tp_group, 1, init_method, params_dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)
        self.adapter: Optional[nn.Module] = None  # x_i -> reduced [s, b, h_out] (or [s/p, b, h_out])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)
        y = linear(x, self.weight)  # partial sum over this rank's slice of h_in
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp_group)
        if self.adapter is not None:
            y = y + self.adapter(x)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across TP ranks: rank i holds rows [i*V/p, (i+1)*V/p).

    ``num_embeddings`` is the padded vocabulary (a multiple of the TP size). Ids outside this
    rank's range look up zeros; the all-reduce over TP then yields every id's row. ids [...]
    -> [..., h].
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: Group,
        init_method: InitMethod = normal_init(),
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.num_embeddings = num_embeddings
        per_rank = _divide(num_embeddings, group_size(tp_group), "padded vocabulary size")
        self.vocab_start = group_rank(tp_group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _make_weight(
            (num_embeddings, embedding_dim), 0, tp_group, 1, init_method, params_dtype, device
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.tp_group)


@torch.no_grad()
def sync_sequence_parallel_grads(module: nn.Module, tp_group: Group) -> None:
    """Sum over TP the gradients of replicated parameters that saw only a sequence shard."""
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if group_size(tp_group) == 1 or not grads:
        return
    summed = all_reduce(torch.cat([g.flatten() for g in grads]), tp_group)  # one collective for all
    for g, s in zip(grads, summed.split([g.numel() for g in grads])):
        g.copy_(s.view_as(g))


def gather_full(tensor: torch.Tensor, like: nn.Parameter, tp_group: Group) -> torch.Tensor:
    """The full tensor of which ``tensor`` (``like`` itself, or its gradient) is this rank's shard."""
    if not getattr(like, "tensor_model_parallel", False) or group_size(tp_group) == 1:
        return tensor
    parts = all_gather(tensor.unsqueeze(0), 0, tp_group).unbind(0)
    return unshard(list(parts), like.partition_dim, like.partition_stride)
