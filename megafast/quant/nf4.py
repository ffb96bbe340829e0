"""NF4, QLoRA's 4-bit NormalFloat storage of frozen weights (Dettmers et al. 2023, section 3).

    q = nf4_quantize(w, block_size=64)      # NF4Tensor: 0.5 byte per element + absmax
    w_hat = nf4_dequantize(q)               # w's shape and dtype

The flattened tensor is cut into blocks of ``block_size`` (64) elements; each block is scaled by
its absolute maximum into [-1, 1] and every element becomes the index (4 bits) of the nearest of
the 16 NormalFloat values::

    absmax[b] = max |w[i]| over block b                  (fp32)
    code[i]   = argmin_k |w[i] / absmax[b] - NF4[k]|
    w_hat[i]  = NF4[code[i]] * absmax[b]

NF4 is bitsandbytes' table (``create_normal_map(offset=0.9677083)``): the quantiles of N(0, 1)
at 8 evenly spaced probabilities from 0.5 to 0.9677 (positive side, 0 dropped) and 7 from 0.5 to
0.9677 (negative side), with an exact 0, normalised to [-1, 1] (the paper's "asymmetric" type
with one more positive value). Two codes are packed per byte, the even element in the high nibble
(bitsandbytes' layout); a last partial block is zero-padded (padding is code 7, the exact 0).

Storage per element: 4 bits + 32 / 64 bits of absmax = 4.5 bits; with ``double_quant`` the absmax
values are themselves 8-bit blockwise (megafast.quant.blockwise8): 4 + 8/64 + 32/(64 * 256) = 4.127
bits. (The two constant tables are not counted.)

Dequantization runs the Triton kernel on CUDA tensors and torch on CPU
(megafast.kernels.dispatch.nf4_dequantize; ``backend`` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megafast.kernels.dispatch import nf4_dequantize as _dequantize_codes
from megafast.quant.blockwise8 import (
    DOUBLE_QUANT_BLOCK_SIZE,
    Blockwise8,
    dequantize_blockwise8,
    nearest_index,
    quantize_blockwise8,
)

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), float32 literals
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCK_SIZE = 64


def nf4_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values [16] fp32 on ``device``."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored as NF4 (module doc).

    ``codes`` uint8 [blocks * block_size / 2] (two codes a byte, high nibble first, the last block
    zero-padded); ``absmax`` fp32 [blocks], or None when ``double_quant`` holds it in 8 bits.
    """

    codes: torch.Tensor
    absmax: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = NF4_BLOCK_SIZE
    double_quant: Optional[Blockwise8] = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed codes and the absmax (or its 8-bit form)."""
        scales = self.double_quant.nbytes if self.double_quant is not None else self.absmax.numel() * 4
        return self.codes.numel() + scales

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def block_absmax(self, absmax_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fp32 absmax [blocks] the codes are scaled by (restored from 8 bits with double quant;
        ``absmax_map``: the 8-bit map, if already on the device)."""
        if self.double_quant is None:
            return self.absmax
        return dequantize_blockwise8(self.double_quant, absmax_map)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block size must be a positive even integer (QLoRA uses 64), got {block_size!r}")


def nf4_quantize(
    t: torch.Tensor,
    block_size: int = NF4_BLOCK_SIZE,
    double_quant: bool = False,
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK_SIZE,
) -> NF4Tensor:
    """``t`` (any shape, floating point) in NF4 over blocks of ``block_size`` (module doc).

    ``double_quant`` stores the absmax values 8-bit blockwise over blocks of
    ``double_quant_block_size`` (QLoRA's double quantization).
    """
    _check_block_size(block_size)
    if not t.is_floating_point():
        raise ValueError(f"nf4_quantize takes a floating-point tensor, got {t.dtype}")
    flat = t.detach().reshape(-1).float()
    pad = -flat.numel() % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)  # [blocks, block_size]
    absmax = blocks.abs().amax(dim=1)  # [blocks] fp32
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = nearest_index(normalized.reshape(-1), nf4_codebook(t.device)).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]  # [blocks * block_size / 2]
    dq = quantize_blockwise8(absmax, double_quant_block_size) if double_quant else None
    return NF4Tensor(packed, None if double_quant else absmax, t.shape, t.dtype, block_size, dq)


def nf4_dequantize(
    q: NF4Tensor,
    *,
    backend: str = "auto",
    codebook: Optional[torch.Tensor] = None,
    absmax_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``NF4[code] * absmax`` in ``q``'s original shape and dtype (Triton on CUDA, torch on CPU).

    ``codebook`` / ``absmax_map``: the NF4 table / the 8-bit map of double quantization already on
    ``q``'s device (saves building and copying them on every call).
    """
    table = nf4_codebook(q.codes.device) if codebook is None else codebook
    absmax = q.block_absmax(absmax_map)
    flat = _dequantize_codes(q.codes, absmax, table, q.numel, q.block_size, q.dtype, backend=backend)
    return flat.view(q.shape)
