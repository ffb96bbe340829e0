"""Tensor-parallel shards written by hand with ``torch.chunk`` (the expectations for megafast's own
``shard``/``unshard`` and for checkpoints): Megatron's layout for a partition ``stride`` s is the
full tensor cut into s equal blocks along ``dim``, each block cut into ``size`` equal chunks, rank r
holding its chunk of every block in block order (SwiGLU's fc1: ``[gate_r; up_r]``, s = 2)."""

from __future__ import annotations

import torch


def chunk_shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full``, as a new tensor."""
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(stride, dim)], dim)


def chunk_unshard(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's shard (the inverse of :func:`chunk_shard`)."""
    pieces = [p.chunk(stride, dim) for p in parts]  # per rank: its chunk of each block
    return torch.cat([torch.cat([pc[s] for pc in pieces], dim) for s in range(stride)], dim)


def megatron_partition(name: str, swiglu: bool) -> tuple[int, int] | None:
    """(dim, stride) of a GPT parameter split over TP, by Megatron's rules; None when replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")) or ".linear_qkv." in name:
        return 0, 1
    if ".linear_fc1." in name:
        return 0, 2 if swiglu else 1
    if name.endswith((".linear_proj.weight", ".linear_fc2.weight")):
        return 1, 1
    return None
