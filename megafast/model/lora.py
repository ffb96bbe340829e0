"""LoRA adapters on the tensor-parallel linear layers, sharded like their base layer.

A LoRA adapter adds a low-rank update to a frozen weight W [out, in]:

    y = x W^T + s * (dropout(x) A^T) B^T,     A [r, in], B [out, r], s = alpha / r

A starts U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform bound), B at zero, so training starts
from the base model. The full A is drawn from a generator seeded by (seed, parameter name) and
then sliced, as every other weight (megafast.model.init): the same seed gives the same adapters at
any TP size.

Sharding follows the base layer, with TP collectives on the rank-r activations only:

- column-parallel base (W = [W_1; ...; W_p] by output rows; the output head too, by vocabulary
  rows): A replicated, B sharded like the output (B_i, same partition stride as W, so SwiGLU's
  [gate_i; up_i] stays aligned).
  h = x A^T is the same on every rank; ``copy_to_tensor_parallel_region`` all-reduces its
  gradient (each rank's B_i contributes a part). With sequence parallelism x is this rank's
  sequence shard: h is computed on the shard and all-gathered ([s/p, b, r] -> [s, b, r]), and A's
  gradient, partial over the shards, is summed over TP (A is marked ``sequence_parallel``).
- row-parallel base (W = [W_1, ..., W_p] by input columns): A sharded like the input (A_i),
  B replicated. h = sum_i x_i A_i^T is all-reduced over TP (reduce-scattered over the sequence
  with sequence parallelism, B then marked ``sequence_parallel``), and y += s * h B^T after the
  base layer's own reduction.

Merging is shard-local: W_i + s B_i A (column) and W_i + s B A_i (row) are exactly the shards of
W + s B A, so a checkpoint merges rank by rank (:func:`merge_state_dict`).

Names follow Megatron-Bridge: ``{layer}.adapter.linear_in.weight`` (A) and
``{layer}.adapter.linear_out.weight`` (B), e.g.
``decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megafast.config import LORA_TARGET_MODULES as TARGET_MODULES
from megafast.config import LoRAConfig
from megafast.model.init import param_seed
from megafast.model.output_head import OutputHead
from megafast.parallel.layers import ColumnParallelLinear, RowParallelLinear, _set_tp_attributes, shard
from megafast.parallel.mappings import (
    Group,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megafast.parallel.random import RNGStatesTracker, tensor_parallel_dropout

ADAPTER = "adapter"
LINEAR_IN = f"{ADAPTER}.linear_in.weight"  # A
LINEAR_OUT = f"{ADAPTER}.linear_out.weight"  # B


class _Projection(nn.Module):
    """Holds one adapter matrix as ``weight`` (so names read ``adapter.linear_in.weight``)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


def _uniform_a(full: torch.Tensor, seed: int, name: str, fan_in: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    bound = 1.0 / math.sqrt(fan_in)
    full.uniform_(-bound, bound, generator=g)


class LoRAAdapter(nn.Module):
    """The update s * B(A(dropout(x))) of one column- or row-parallel layer (module docstring).

    Column: x [s, b, in] (or [s/p, b, in]) -> [s, b, out/p]. Row: x_i [s, b, in/p] ->
    [s, b, out] (or [s/p, b, out] with sequence parallelism).
    """

    def __init__(
        self,
        base: ColumnParallelLinear | RowParallelLinear | OutputHead,
        config: LoRAConfig,
        name: str,
        seed: int,
        tracker: RNGStatesTracker,
    ) -> None:
        super().__init__()
        self.column = not isinstance(base, RowParallelLinear)  # column-parallel layer or the output head
        self.tp_group: Group = base.tp_group
        self.sequence_parallel = base.sequence_parallel
        self.scale = config.scale
        self.dropout = config.dropout
        self.tracker = tracker
        tp, rank = group_size(base.tp_group), group_rank(base.tp_group)
        r = config.rank
        out_local, in_local = base.weight.shape
        dtype, device = base.weight.dtype, base.weight.device
        in_full = in_local if self.column else in_local * tp
        out_full = out_local * tp if self.column else out_local
        full_a = torch.empty(r, in_full, dtype=torch.float32)
        _uniform_a(full_a, seed, f"{name}.{LINEAR_IN}", in_full)
        if self.column:  # A replicated, B sharded by output rows like W (same stride)
            a = nn.Parameter(full_a.to(device=device, dtype=dtype))
            a.sequence_parallel = self.sequence_parallel
            b = nn.Parameter(torch.zeros(out_local, r, dtype=dtype, device=device))
            _set_tp_attributes(b, 0, base.partition_stride)
        else:  # A sharded by input columns like W, B replicated
            a = nn.Parameter(shard(full_a, 1, rank, tp).to(device=device, dtype=dtype).contiguous())
            _set_tp_attributes(a, 1)
            b = nn.Parameter(torch.zeros(out_full, r, dtype=dtype, device=device))
            b.sequence_parallel = self.sequence_parallel
        self.linear_in = _Projection(a)
        self.linear_out = _Projection(b)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # column-parallel x is replicated (the same mask on every TP rank) unless it is a sequence
        # shard; row-parallel x is this rank's input columns: its own mask
        sharded = not self.column or self.sequence_parallel
        return tensor_parallel_dropout(
            x, self.dropout, training=self.training, tracker=self.tracker, sharded=sharded
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self._dropout(x), self.linear_in.weight)  # [s(/p), b, r]; row: partial over TP
        if self.column and self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, self.tp_group)  # [s, b, r]
        elif self.column:
            h = copy_to_tensor_parallel_region(h, self.tp_group)
        elif self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, self.tp_group)  # [s/p, b, r]
        else:
            h = reduce_from_tensor_parallel_region(h, self.tp_group)  # [s, b, r]
        return F.linear(h, self.linear_out.weight) * self.scale


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int) -> list[str]:
    """Attach adapters to every target layer of ``model`` (a GPTModel stage) and freeze the rest.

    Returns the names of the adapted layers. Only adapter parameters keep ``requires_grad``.
    """
    adapted = []
    for name, module in list(model.named_modules()):
        if (
            name.rsplit(".", 1)[-1] in config.target_modules
            and isinstance(module, (ColumnParallelLinear, RowParallelLinear, OutputHead))
            and module.weight is not None  # an output layer tied to this stage's embedding has none
        ):
            module.adapter = LoRAAdapter(module, config, name, seed, model.tracker)
            adapted.append(name)
    for pname, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(pname))
    return adapted


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict key belongs to a LoRA adapter."""
    return f".{ADAPTER}." in f".{name}"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter entries of ``model.state_dict()`` (what a LoRA checkpoint holds)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_name(k)}


def merge_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + s B A for every adapted layer of a (full or one TP rank's) state dict, adapters removed.

    Works shard by shard: column-parallel shards hold (W_i, A, B_i), row-parallel (W_i, A_i, B), and
    ``W_i + s B_i A`` resp. ``W_i + s B A_i`` are the shards of the merged weight. Computed in fp32,
    stored in W's dtype.
    """
    out = {k: v for k, v in state.items() if not is_adapter_name(k)}
    for key in state:
        if not key.endswith(LINEAR_IN):
            continue
        layer = key[: -len(LINEAR_IN) - 1]
        a, b = state[key].float(), state[f"{layer}.{LINEAR_OUT}"].float()
        weight = f"{layer}.weight"
        if weight not in out:
            raise ValueError(f"adapter {layer} has no base weight {weight} to merge into")
        w = out[weight]
        delta = scale * (b @ a)  # [out(/p), in(/p)]
        if delta.shape != w.shape:
            raise ValueError(f"adapter {layer}: B A is {tuple(delta.shape)} but the weight is {tuple(w.shape)}")
        out[weight] = (w.float() + delta).to(w.dtype)
    return out


@torch.no_grad()
def merge_lora_(model: nn.Module, scale: float) -> None:
    """Fold every adapter of ``model`` into its base weight and remove it (in place; a QLoRA base
    becomes its dequantized weight plus the update)."""
    for module in model.modules():
        adapter = getattr(module, "adapter", None)
        if isinstance(adapter, LoRAAdapter):
            delta = scale * (adapter.linear_out.weight.float() @ adapter.linear_in.weight.float())
            if not isinstance(module.weight, torch.Tensor):  # QLoRA's NF4 weight: merged into its dequantized form
                base = module.weight.dequantize()
                module.weight = nn.Parameter((base.float() + delta).to(base.dtype), requires_grad=False)
            else:
                module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            module.adapter = None


__all__ = [
    "TARGET_MODULES",
    "LoRAAdapter",
    "LoRAConfig",
    "adapter_state_dict",
    "apply_lora",
    "is_adapter_name",
    "merge_lora_",
    "merge_state_dict",
]
