"""Fused kernels: Triton (norms, RoPE, activations, cross-entropy, flash attention), CUDA (RoPE,
multi-tensor AdamW/Lion) and their plain-torch references.

Each op is one file (kernels -> launchers -> autograd.Function -> ``*_reference``); the functions
exported here dispatch between them by device, overridable with ``backend=`` (see
:mod:`megafast.kernels.dispatch`). Set ``TRITON_INTERPRET=1`` before importing to run the
Triton kernels on CPU tensors (tests).

The exported functions share names with the files that implement them (``megafast.kernels.rms_norm``
is the function): import a file's contents with ``from megafast.kernels.rms_norm import rms_norm_triton``.
"""

from megafast.kernels.dispatch import (
    ATTENTION_BACKENDS,
    KERNEL_BACKENDS,
    ROPE_BACKENDS,
    KernelConfig,
    add_rms_norm,
    apply_rotary,
    attention,
    cross_entropy,
    fused_linear_cross_entropy,
    gelu,
    layer_norm,
    resolve_attention,
    resolve_backend,
    rms_norm,
    swiglu,
    vocab_parallel_cross_entropy,
)
from megafast.kernels.flash_attention import flash_attention_triton as flash_attention

__all__ = [
    "ATTENTION_BACKENDS",
    "KERNEL_BACKENDS",
    "ROPE_BACKENDS",
    "KernelConfig",
    "add_rms_norm",
    "apply_rotary",
    "attention",
    "cross_entropy",
    "flash_attention",
    "fused_linear_cross_entropy",
    "gelu",
    "layer_norm",
    "resolve_attention",
    "resolve_backend",
    "rms_norm",
    "swiglu",
    "vocab_parallel_cross_entropy",
]
