"""Fused residual add + RMSNorm (the pre-norm transformer's ``h = x + r; y = norm(h)``).

    h = x + residual                              (in x's dtype: the new residual stream)
    y = w * (h * rstd).to(h.dtype),  rstd = 1 / sqrt(mean(h^2) + eps)

One pass reads x and residual and writes h and y (instead of add, then norm re-reading h).
Backward receives dy and dh (the gradient flowing along the residual stream) and writes one
tensor, dx = dresidual = dh + RMSNorm-backward(dy): RMSNorm's backward kernel with dh added.

Layout: kernels -> launchers -> autograd.Function -> ``add_rms_norm_triton`` -> ``add_rms_norm_torch``.
"""

from __future__ import annotations

import torch

from megafast.kernels._triton import as_rows, row_settings, tl, triton
from megafast.kernels.rms_norm_kernel import rms_norm_backward, rms_norm_torch

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _add_rms_norm_fwd_kernel(
    X, R, W, H, Y, RSTD, stride_x, stride_r, stride_h, stride_y, n_cols, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)  # rounded like torch's x + r
    tl.store(H + row * stride_h + cols, h, mask=mask)
    h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    hhat = (h * rstd).to(H.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (hhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# -------------------------------------------------------------------------------------- launchers


def add_rms_norm_forward(x, residual, weight, eps):
    """-> (y in promote(x, w) dtype, h = x + residual in x's dtype, rstd [rows] fp32)."""
    n = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)}/{residual.dtype} must match x {tuple(x.shape)}/{x.dtype}"
        )
    if weight.shape != (n,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({n},)")
    x2, r2 = as_rows(x), as_rows(residual)
    rows = x2.shape[0]
    h = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    y = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, warps = row_settings(n, x.element_size())
    if rows:
        _add_rms_norm_fwd_kernel[(rows,)](
            x2,
            r2,
            weight,
            h,
            y,
            rstd,
            x2.stride(0),
            r2.stride(0),
            h.stride(0),
            y.stride(0),
            n,
            eps,
            BLOCK=block,
            num_warps=warps,
        )
    return y.view(x.shape), h.view(x.shape), rstd


# --------------------------------------------------------------------------------- autograd.Function


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd = add_rms_norm_forward(x, residual, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h, dtype=torch.promote_types(h.dtype, weight.dtype))
        dx, dw = rms_norm_backward(dy, h, weight, rstd, dh)  # dresidual = dx: h = x + residual
        return dx, dx, dw, None


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) by one Triton pass each way."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)


# ------------------------------------------------------------------------------------------ torch


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: ``h = x + residual; (rms_norm(h), h)``."""
    h = x + residual
    return rms_norm_torch(h, weight, eps), h
