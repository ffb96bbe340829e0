"""RMSNorm over the last dimension: Triton forward/backward, fp32 statistics.

    rstd = 1 / sqrt(mean(x^2) + eps)            (fp32, one per row, saved for backward)
    y    = w * (x * rstd).to(x.dtype)           (the model's rounding: Llama/HF order)

Backward, with xhat = x * rstd and dxhat = dy * w:

    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    dw = sum over rows of dy * xhat             (per-program fp32 partial sums, then one reduction)

Layout: kernels -> launchers -> autograd.Function -> ``rms_norm_triton`` -> ``rms_norm_torch``
(the plain-torch maths, also the ``torch`` backend, and float64-exact in tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from megafast.kernels._triton import as_rows, norm_grad_buffers, row_settings, tl, triton

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the model
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    DH,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_dh,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dx (+ dh: the residual stream's gradient, for the fused add + RMSNorm) and dw partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets past 2^31 elements
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        dxhat = dy * w
        c = tl.sum(dxhat * xhat, axis=0) / n_cols
        dx = rstd * (dxhat - xhat * c)
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y with x's shape in promote(x, w) dtype, rstd [rows] fp32)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({n},)")
    x2 = as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, warps = row_settings(n, x.element_size())
    if rows:
        _rms_norm_fwd_kernel[(rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block, num_warps=warps
        )
    return y.view(x.shape), rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dw like weight); ``dh`` (like x) is added to dx when given."""
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    dh2 = as_rows(dh) if dh is not None else dy2  # dy2: a valid pointer the kernel never reads
    rows = x2.shape[0]
    dx, dw_partial, programs, per_program = norm_grad_buffers(x2)
    block, warps = row_settings(n, x.element_size())
    _rms_norm_bwd_kernel[(programs,)](
        dy2,
        dh2,
        x2,
        weight,
        rstd,
        dx,
        dw_partial,
        dy2.stride(0),
        dh2.stride(0),
        x2.stride(0),
        dx.stride(0),
        rows,
        n,
        per_program,
        HAS_DH=dh is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------- autograd.Function


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm of ``x`` [..., n] with ``weight`` [n] by the Triton kernels."""
    return RMSNormFunction.apply(x, weight, eps)


# ------------------------------------------------------------------------------------------ torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype: fp32, or float64 when x already is (exact references)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain torch: ``w * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``, statistics in fp32 (or fp64)."""
    xa = _acc(x)
    y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
