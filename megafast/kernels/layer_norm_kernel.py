"""LayerNorm over the last dimension: Triton forward/backward, fp32 statistics.

    mean = mean(x), rstd = 1 / sqrt(var(x) + eps)     (fp32, per row, saved for backward)
    y    = ((x - mean) * rstd * w + b).to(x.dtype)     (as the model: normalised in fp32)

Backward, with xhat = (x - mean) * rstd and wdy = w * dy:

    dx = rstd * (wdy - xhat * mean(wdy * xhat) - mean(wdy))
    dw = sum over rows of dy * xhat,   db = sum over rows of dy

Layout: kernels -> launchers -> autograd.Function -> ``layer_norm_triton`` -> ``layer_norm_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megafast.kernels._triton import as_rows, norm_grad_buffers, row_settings, tl, triton

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y like x, mean [rows] fp32, rstd [rows] fp32)."""
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"LayerNorm weight/bias must have shape ({n},)")
    x2 = as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, warps = row_settings(n, x.element_size())
    if rows:
        _layer_norm_fwd_kernel[(rows,)](
            x2,
            weight,
            bias if bias is not None else weight,
            y,
            mean,
            rstd,
            x2.stride(0),
            y.stride(0),
            n,
            eps,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return y.view(x.shape), mean, rstd


def layer_norm_backward(dy, x, weight, bias, mean, rstd):
    """-> (dx like x, dw like weight, db like bias or None)."""
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    rows = x2.shape[0]
    dx, dw_partial, programs, per_program = norm_grad_buffers(x2)
    db_partial = torch.empty_like(dw_partial) if bias is not None else dw_partial
    block, warps = row_settings(n, x.element_size())
    _layer_norm_bwd_kernel[(programs,)](
        dy2,
        x2,
        weight,
        mean,
        rstd,
        dx,
        dw_partial,
        db_partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        rows,
        n,
        per_program,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=warps,
    )
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype), db


# --------------------------------------------------------------------------------- autograd.Function


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias if bias is not None else weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x, weight, bias if ctx.has_bias else None, mean, rstd)
        return dx, dw, db, None


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of ``x`` [..., n] with ``weight`` (and ``bias``) [n] by the Triton kernels."""
    return LayerNormFunction.apply(x, weight, bias, eps)


# ------------------------------------------------------------------------------------------ torch


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """Plain torch: normalised in fp32 (float64 stays float64), cast back to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc), b, eps).to(x.dtype)
