"""Fused kernels: Triton (norms, RoPE, activations, cross-entropy, flash attention, the MoE grouped
GEMM and token permutation), CUDA (RoPE, multi-tensor AdamW/Lion) and their plain-torch implementations.

Each op is one file ``*_kernel.py`` (kernels -> launchers -> autograd.Function -> ``*_torch``, the
plain-torch implementation that is also the CPU backend); the functions exported here dispatch
between them by device, overridable with ``backend=`` (see
:mod:`megafast.kernels.dispatch`). Set ``TRITON_INTERPRET=1`` before importing to run the
Triton kernels on CPU tensors (tests).

The exported functions never shadow a file: ``megafast.kernels.rms_norm`` is the function,
``megafast.kernels.rms_norm_kernel`` the file
(``from megafast.kernels.rms_norm_kernel import rms_norm_triton``).
:class:`~megafast.config.KernelConfig` lives with the other configs in :mod:`megafast.config`.
"""

from megafast.kernels.dispatch import (
    add_rms_norm,
    apply_rotary,
    attention,
    cross_entropy,
    fused_linear_cross_entropy,
    gelu,
    grouped_gemm,
    layer_norm,
    moe_permute,
    moe_unpermute,
    nf4_dequantize,
    resolve_attention,
    resolve_backend,
    rms_norm,
    swiglu,
    vocab_parallel_cross_entropy,
)
from megafast.kernels.flash_attention_kernel import flash_attention_triton as flash_attention

__all__ = [
    "add_rms_norm",
    "apply_rotary",
    "attention",
    "cross_entropy",
    "flash_attention",
    "fused_linear_cross_entropy",
    "gelu",
    "grouped_gemm",
    "layer_norm",
    "moe_permute",
    "moe_unpermute",
    "nf4_dequantize",
    "resolve_attention",
    "resolve_backend",
    "rms_norm",
    "swiglu",
    "vocab_parallel_cross_entropy",
]
