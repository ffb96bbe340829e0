"""Deterministic, layout-independent initialisation.

Every weight is drawn in full from its own generator, seeded by (seed, global parameter name),
then sliced by the layer for its TP rank. So the same seed gives bit-identical full weights at any
TP or PP size (layer 7 is drawn the same whichever stage holds it). Megatron's scheme for the
values: N(0, std) for weights, N(0, std / sqrt(2 * num_layers)) for the output projections of
attention and MLP (``linear_proj``, ``linear_fc2``), zeros for biases, ones for norm weights.
Rows of the vocabulary padding are zero (and receive no gradient: they are masked out of the loss).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch

from megafast.config import GPTConfig
from megafast.parallel.layers import InitMethod

SCALED_INIT_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed mixing the run seed with a stable hash of the parameter name."""
    return ((seed & 0xFFFFFFFF) << 31 ^ zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


def param_std(config: GPTConfig, name: str) -> float:
    if name.endswith(SCALED_INIT_SUFFIXES):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def normal(seed: int, name: str, std: float, valid_rows: Optional[int] = None) -> InitMethod:
    """Fill a full weight with N(0, std) from the generator of ``name``; rows >= valid_rows get 0."""

    def fill(full: torch.Tensor) -> None:
        g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        rows = full.shape[0] if valid_rows is None else valid_rows
        full.zero_()
        full[:rows].normal_(0.0, std, generator=g)

    return fill


def for_param(config: GPTConfig, seed: int, name: str, valid_rows: Optional[int] = None) -> InitMethod:
    return normal(seed, name, param_std(config, name), valid_rows)
