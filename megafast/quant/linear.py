"""A frozen linear weight held in NF4 and dequantized on the fly: QLoRA's base layers.

    y = x W_hat^T + b,     W_hat = nf4_dequantize(q)      (forward)
    dx = dy W_hat                                          (backward: W_hat dequantized again)

:class:`NF4Weight` replaces the ``weight`` parameter of a column- or row-parallel layer
(``layer.weight = NF4Weight.from_weight(layer.weight)``; megafast.parallel.layers.linear calls
it as ``weight(x, bias)``). Only the packed codes and the block scales are kept: the full-precision
W_hat exists for one matmul at a time, in the forward and again in the backward pass (nothing but
the input's gradient needs it; W is frozen, so autograd saves no copy of it). Under tensor
parallelism each rank's shard is quantized on its own.

The buffers are not persistent: a QLoRA checkpoint holds the adapters only, and the base is
quantized again from the full-precision ``--pretrained-checkpoint`` when a run starts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast.quant.blockwise8 import DOUBLE_QUANT_BLOCK_SIZE, Blockwise8, dynamic_map
from megafast.quant.nf4 import NF4_BLOCK_SIZE, NF4Tensor, nf4_codebook, nf4_dequantize, nf4_quantize


class NF4LinearFunction(torch.autograd.Function):
    """x [..., in] -> x W_hat^T + b [..., out] with W_hat dequantized in forward and in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight  # the module: its packed buffers, not a dequantized copy
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize(), bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = dy.matmul(ctx.weight.dequantize()) if ctx.needs_input_grad[0] else None  # [..., in]
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None


class NF4Weight(nn.Module):
    """A frozen [out, in] weight in NF4 (module doc); ``weight(x, bias)`` is the linear layer's product.

    Buffers (non-persistent): ``codes`` uint8 [numel / 2], ``absmax`` fp32 [blocks] or, with double
    quantization, ``absmax_codes`` uint8 [blocks], ``absmax_scale`` fp32 [blocks / 256] and
    ``absmax_offset`` fp32 [1]; the constant tables ``codebook`` [16] (and ``absmax_map`` [256]).
    ``backend`` picks the dequantize kernel (megafast.kernels.dispatch: auto = Triton on CUDA).
    """

    def __init__(self, q: NF4Tensor, backend: str = "auto") -> None:
        super().__init__()
        self.shape, self.dtype, self.block_size, self.backend = q.shape, q.dtype, q.block_size, backend
        self.register_buffer("codes", q.codes, persistent=False)
        self.register_buffer("codebook", nf4_codebook(q.codes.device), persistent=False)
        dq = q.double_quant
        self.double_quant_block_size = dq.block_size if dq is not None else None
        self.register_buffer("absmax", q.absmax, persistent=False)
        self.register_buffer("absmax_codes", None if dq is None else dq.codes, persistent=False)
        self.register_buffer("absmax_scale", None if dq is None else dq.scale, persistent=False)
        self.register_buffer("absmax_offset", None if dq is None else dq.offset, persistent=False)
        self.register_buffer("absmax_map", None if dq is None else dynamic_map(q.codes.device), persistent=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        block_size: int = NF4_BLOCK_SIZE,
        double_quant: bool = False,
        double_quant_block_size: int = DOUBLE_QUANT_BLOCK_SIZE,
        backend: str = "auto",
    ) -> NF4Weight:
        return cls(nf4_quantize(weight, block_size, double_quant, double_quant_block_size), backend)

    def nf4(self) -> NF4Tensor:
        """The stored form (on the buffers' current device)."""
        dq = None
        if self.absmax_codes is not None:
            dq = Blockwise8(self.absmax_codes, self.absmax_scale, self.absmax_offset, self.double_quant_block_size)
        return NF4Tensor(self.codes, self.absmax, self.shape, self.dtype, self.block_size, dq)

    @property
    def nbytes(self) -> int:
        return self.nf4().nbytes

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """W_hat [out, in] in the original dtype."""
        return nf4_dequantize(self.nf4(), backend=self.backend, codebook=self.codebook, absmax_map=self.absmax_map)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return NF4LinearFunction.apply(x, bias, self)

    def extra_repr(self) -> str:
        dq = f", double_quant={self.double_quant_block_size}" if self.absmax_codes is not None else ""
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}{dq}"
