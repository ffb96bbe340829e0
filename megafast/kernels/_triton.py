"""Triton, when it is installed; a stand-in that lets the kernel files import without it.

Every kernel file does ``from megafast.kernels._triton import HAS_TRITON, tl, triton``: with
Triton installed these are the real modules; without it (a laptop without Triton) ``triton.jit``
leaves the function undecorated and ``tl.constexpr`` is a plain annotation, so the torch
implementations (``*_torch``) in the same files stay importable and the dispatcher never picks a
Triton kernel.

Triton decides at decoration time whether a kernel is compiled or interpreted
(``TRITON_INTERPRET=1`` runs kernels on CPU tensors in numpy): set it before importing
``megafast.kernels``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    def _jit(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)

    def _next_power_of_2(n: int) -> int:
        return 1 << max(int(n) - 1, 0).bit_length()

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b), next_power_of_2=_next_power_of_2)
    tl = SimpleNamespace(constexpr=object)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_settings(n_cols: int, element_size: int = 4) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel holding one row of ``n_cols`` in registers (Liger's rule)."""
    block = triton.next_power_of_2(n_cols)
    if block * element_size > 256 * 1024:
        raise ValueError(f"rows of {n_cols} elements are too long for a one-row-per-program kernel")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def num_programs(x_is_cuda: bool, rows: int, device=None) -> int:
    """Programs for kernels that loop over rows (weight-gradient partial sums): ~2 per SM on GPU."""
    if x_is_cuda:
        import torch

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    return max(1, min(rows, 4))


def norm_grad_buffers(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """For a norm's backward over the rows of ``x2`` [rows, n]: (dx like x2, fp32 weight-gradient
    partial sums [programs, n], programs, rows per program); each program sums its rows' dw."""
    rows, n = x2.shape
    programs = num_programs(x2.is_cuda, rows, x2.device)
    per_program = triton.cdiv(rows, programs) if rows else 1
    dx = torch.empty((rows, n), dtype=x2.dtype, device=x2.device)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
    return dx, dw_partial, programs, per_program


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as [rows, last dim] with unit stride along the last dim (copied only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
