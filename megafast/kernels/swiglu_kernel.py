"""SwiGLU on the ``[gate; up]`` layout of ``linear_fc1``'s output: Triton forward/backward.

    x = [g, u] (the two halves of the last dimension, each F wide)
    y = silu(g) * u = g * sigmoid(g) * u
    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   du = dy * silu(g)

Backward recomputes sigmoid from g instead of saving any intermediate: only x is kept. fp32
arithmetic, one rounding to x's dtype.

Layout: kernels -> launchers -> autograd.Function -> ``swiglu_triton`` -> ``swiglu_torch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafast.kernels._triton import as_rows, tl, triton

BLOCK = 1024

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu_fwd_kernel(X, Y, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DX + row * stride_dx + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + n_cols + cols, du.to(DX.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers


def swiglu_blocks(f: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``f`` outputs (a program per row and BLOCK columns)."""
    block = min(BLOCK, triton.next_power_of_2(f))
    return block, 8 if block >= 1024 else 4


def _grid(rows: int, f: int) -> tuple[tuple[int, int], int, int]:
    block, warps = swiglu_blocks(f)
    return (rows, triton.cdiv(f, block)), block, warps


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"SwiGLU input's last dimension must be even ([gate; up]), got {x.shape[-1]}")
    f = x.shape[-1] // 2
    x2 = as_rows(x)
    y = torch.empty((x2.shape[0], f), dtype=x.dtype, device=x.device)
    grid, block, warps = _grid(x2.shape[0], f)
    if x2.shape[0]:
        _swiglu_fwd_kernel[grid](x2, y, x2.stride(0), y.stride(0), f, BLOCK=block, num_warps=warps)
    return y.view(*x.shape[:-1], f)


def swiglu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    f = x.shape[-1] // 2
    x2, dy2 = as_rows(x), as_rows(dy)
    dx = torch.empty((x2.shape[0], 2 * f), dtype=x.dtype, device=x.device)
    grid, block, warps = _grid(x2.shape[0], f)
    if x2.shape[0]:
        _swiglu_bwd_kernel[grid](
            dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0), f, BLOCK=block, num_warps=warps
        )
    return dx.view(x.shape)


# --------------------------------------------------------------------------------- autograd.Function


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return swiglu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return swiglu_backward(dy, x)


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``x`` = [..., gate | up] ([..., 2F] -> [..., F]) by the Triton kernels."""
    return SwiGLUFunction.apply(x)


# ------------------------------------------------------------------------------------------ torch


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``silu(gate) * up`` with ``gate, up = x.chunk(2, -1)``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
