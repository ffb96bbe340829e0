"""NF4 dequantization (QLoRA's 4-bit NormalFloat storage): Triton kernel and its torch twin.

    out[i] = codebook[code(i)] * absmax[i // block_size]        (fp32, rounded once to out's dtype)

``codes`` [ceil(n / 2)] uint8 holds two 4-bit codes per byte, the even element in the high nibble
(bitsandbytes' packing): ``code(i) = codes[i // 2] >> 4`` for even i, ``codes[i // 2] & 15`` for
odd i. ``absmax`` [n_blocks] fp32 is each block's absolute maximum (already restored from its
8-bit form when the weight is double-quantized: megafast.quant.nf4 does that, in torch, before
calling here). ``codebook`` [16] fp32 is the NF4 table (megafast.quant.nf4.NF4_CODEBOOK).

Elementwise over the flattened weight: one program writes ``BLOCK`` consecutive elements; the
byte of each pair is read twice (adjacent lanes, one cache line). No autograd: the weight is
frozen, and megafast.quant.linear dequantizes again in the backward pass.

Layout: kernel -> launcher -> ``nf4_dequantize_triton`` -> ``nf4_dequantize_torch``.
"""

from __future__ import annotations

import torch

from megafast.kernels._triton import tl, triton

BLOCK = 1024  # elements per program
NUM_WARPS = 4

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _nf4_dequantize_kernel(CODES, ABSMAX, CODEBOOK, OUT, n, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(CODES + offs // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(CODEBOOK + code, mask=mask, other=0.0)
    scale = tl.load(ABSMAX + offs // BLOCK_SIZE, mask=mask, other=0.0)
    tl.store(OUT + offs, (value * scale).to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers


def nf4_dequantize_triton(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, numel: int, block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``numel`` dequantized elements [numel] in ``dtype`` by the Triton kernel (module doc)."""
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        _nf4_dequantize_kernel[(triton.cdiv(numel, BLOCK),)](
            codes, absmax, codebook, out, numel, BLOCK_SIZE=block_size, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return out


# ------------------------------------------------------------------------------------------ torch


def nf4_dequantize_torch(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, numel: int, block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain torch: unpack the nibbles, look them up, scale by the block's absmax ([numel], ``dtype``)."""
    pairs = torch.stack((codes >> 4, codes & 15), dim=-1)  # [bytes, 2]: (even element, odd element)
    values = codebook[pairs.reshape(-1)[:numel].long()]  # [numel] fp32
    scale = absmax.repeat_interleave(block_size)[:numel]  # [numel] fp32
    return (values * scale).to(dtype)
