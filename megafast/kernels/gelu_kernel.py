"""GELU, tanh approximation (GPT-2's ``--openai-gelu``) or exact (erf): Triton forward/backward.

    tanh: y = 0.5 x (1 + tanh(u)) = x sigmoid(2u),  u = k (x + 0.044715 x^3),  k = sqrt(2 / pi)
          dy/dx = sigmoid(2u) + 2 x sigmoid(2u) (1 - sigmoid(2u)) k (1 + 3 * 0.044715 x^2)
          (the sigmoid form keeps full relative precision in the negative tail, where 1 + tanh cancels)
    erf:  y = 0.5 x (1 + erf(x / sqrt 2)),   dy/dx = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)

Elementwise over the flattened tensor; backward recomputes from x (nothing else saved). fp32
arithmetic, rounded once to x's dtype.

Layout: kernels -> launchers -> autograd.Function -> ``gelu_triton`` -> ``gelu_torch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafast.kernels._triton import tl, triton

BLOCK = 1024  # elements per program
NUM_WARPS = 4

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _gelu_kernel(X, DY, OUT, n, BACKWARD: tl.constexpr, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        k = 0.7978845608028654  # sqrt(2 / pi)
        z = tl.minimum(-2.0 * k * (x + 0.044715 * x * x * x), 80.0)  # clamped: exp stays finite
        sig = 1.0 / (1.0 + tl.exp(z))  # sigmoid(2u), limits 0 and 1 without cancellation
        if BACKWARD:
            d = sig + 2.0 * x * sig * (1.0 - sig) * k * (1.0 + 3.0 * 0.044715 * x * x)
        else:
            y = x * sig
    else:
        e = tl.math.erf(x * 0.7071067811865476)
        if BACKWARD:
            d = 0.5 * (1.0 + e) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
        else:
            y = 0.5 * x * (1.0 + e)
    if BACKWARD:
        y = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * d
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers


def gelu_launch(x: torch.Tensor, dy, approximate: str) -> torch.Tensor:
    """gelu(x), or dy * gelu'(x) when ``dy`` is given; same shape and dtype as x."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"GELU approximate must be 'tanh' or 'none', got {approximate!r}")
    xc = x.contiguous()
    dyc = dy.contiguous() if dy is not None else xc
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, BLOCK),)](
            xc, dyc, out, n, BACKWARD=dy is not None, TANH=approximate == "tanh", BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out


# --------------------------------------------------------------------------------- autograd.Function


class GeLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.approximate = approximate
        ctx.save_for_backward(x)
        return gelu_launch(x, None, approximate)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_launch(x, dy, ctx.approximate), None


def gelu_triton(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU of ``x`` (``approximate`` 'tanh' or 'none', as torch) by the Triton kernel."""
    return GeLUFunction.apply(x, approximate)


# ------------------------------------------------------------------------------------------ torch


def gelu_torch(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Plain torch ``F.gelu``."""
    return F.gelu(x, approximate=approximate)
