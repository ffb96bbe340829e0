"""8-bit blockwise quantization with bitsandbytes' dynamic map: QLoRA's double quantization.

QLoRA stores each 64-element block's fp32 absmax; double quantization stores those absmax values
in 8 bits instead (Dettmers et al. 2023, section 3: "8-bit Floats with a blocksize of 256"), as
bitsandbytes' ``quantize_4bit(..., compress_statistics=True)`` does:

    offset = mean(absmax)                               one fp32 scalar
    c      = absmax - offset                            centred (the 8-bit map is signed)
    scale  = max |c| over each block of 256             fp32 [ceil(n_blocks / 256)]
    q      = the nearest entry of DYNAMIC_MAP to c / scale   uint8 [n_blocks]
    absmax ~ DYNAMIC_MAP[q] * scale + offset

``DYNAMIC_MAP`` is bitsandbytes' ``create_dynamic_map(signed=True)``: 256 sorted values in
[-1, 1], a sign, a run of zeros as the exponent (10^-6 ... 10^0) and a linear fraction, so small
values keep their relative precision. That costs 8 bits + 32/256 bits per block of 64 instead of
32: 0.127 bits per weight instead of 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DOUBLE_QUANT_BLOCK_SIZE = 256


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(True, 7, 8)``): [256] fp32, sorted.

    For each exponent i = 0..6: the midpoints of ``linspace(0.1, 1, 2^i + 1)`` times 10^(i - 6),
    with both signs (254 values), then 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def nearest_index(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the entry of the sorted ``table`` nearest to each element of ``x`` (ties: the lower).

    Bucketing on the midpoints between neighbours is the argmin of ``|x - table|`` without the
    [numel, len(table)] distance matrix.
    """
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x, midpoints, right=False)


@dataclass(frozen=True)
class Blockwise8:
    """The 8-bit form of a 1-D fp32 tensor (module doc): ``codes`` uint8 [n], ``scale`` fp32
    [ceil(n / block_size)], ``offset`` fp32 [1] (the mean that was subtracted)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    block_size: int = DOUBLE_QUANT_BLOCK_SIZE

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` [n] zero-padded and viewed as [ceil(n / block_size), block_size]."""
    pad = -x.numel() % block_size
    return torch.nn.functional.pad(x, (0, pad)).view(-1, block_size)


def quantize_blockwise8(x: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK_SIZE) -> Blockwise8:
    """Mean-subtracted 8-bit blockwise quantization of the fp32 vector ``x`` [n] (module doc)."""
    x = x.float().reshape(-1)
    offset = x.mean().reshape(1)
    centred = _blocks(x - offset, block_size)  # [blocks, block_size]
    scale = centred.abs().amax(dim=1)  # [blocks]
    normalized = centred / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    codes = nearest_index(normalized, dynamic_map(x.device)).to(torch.uint8)
    return Blockwise8(codes.reshape(-1)[: x.numel()].contiguous(), scale, offset, block_size)


def dequantize_blockwise8(q: Blockwise8, table: torch.Tensor | None = None) -> torch.Tensor:
    """``DYNAMIC_MAP[code] * scale[block] + offset`` [n] fp32 (``table``: the map, if already on the device)."""
    table = dynamic_map(q.codes.device) if table is None else table
    n = q.codes.numel()
    return table[q.codes.long()] * q.scale.repeat_interleave(q.block_size)[:n] + q.offset
