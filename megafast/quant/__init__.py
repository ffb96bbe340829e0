"""Quantized storage of frozen weights: NF4 (QLoRA's 4-bit NormalFloat) with optional double
quantization of its block scales, and a linear weight that dequantizes it on the fly.

    from megafast.quant import nf4_quantize, nf4_dequantize
    q = nf4_quantize(w, block_size=64)       # NF4Tensor, ~4.5 bits per element
    w_hat = nf4_dequantize(q)                # w's shape and dtype
"""

from megafast.quant.blockwise8 import Blockwise8, dequantize_blockwise8, dynamic_map, quantize_blockwise8
from megafast.quant.linear import NF4LinearFunction, NF4Weight
from megafast.quant.nf4 import NF4_BLOCK_SIZE, NF4_CODEBOOK, NF4Tensor, nf4_codebook, nf4_dequantize, nf4_quantize

__all__ = [
    "NF4_BLOCK_SIZE",
    "NF4_CODEBOOK",
    "Blockwise8",
    "NF4LinearFunction",
    "NF4Tensor",
    "NF4Weight",
    "dequantize_blockwise8",
    "dynamic_map",
    "nf4_codebook",
    "nf4_dequantize",
    "nf4_quantize",
    "quantize_blockwise8",
]
