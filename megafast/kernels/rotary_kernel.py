"""Rotary position embedding (half-split ``rotate_half`` layout, as HF Llama): Triton forward/backward.

For x = [x1, x2] (the two halves of the head dimension d) and cos = [c1, c2], sin = [s1, s2] the
rows of the model's cached tables (``RotaryEmbedding``: c1 = c2, s1 = s2, fp32):

    y1 = x1 * c1 - x2 * s1          dx1 = dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = dy2 * c2 - dy1 * s1

x is [s, b, heads, d] (any strides, last dimension contiguous: q and k sliced out of the fused QKV
projection are used in place), any number of heads (so q and GQA's fewer k heads alike); cos/sin
are the same for every sequence ([s, d] or [s, 1, 1, d]) or per sequence ([s, b, 1, d]: packed
samples with their own positions), read once per (position, batch) row for all heads. The
arithmetic is fp32, rounded once to x's dtype.

Layout: kernels -> launchers -> autograd.Function -> ``apply_rotary_triton`` -> ``apply_rotary_torch``.
"""

from __future__ import annotations

import torch

from megafast.kernels._triton import tl, triton

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _rotary_kernel(
    X,
    COS,
    SIN,
    Y,
    batch,
    heads,
    half,
    stride_xs,
    stride_xb,
    stride_xh,
    stride_ys,
    stride_yb,
    stride_yh,
    stride_cs,
    stride_cb,
    stride_ss,
    stride_sb,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = pid // batch
    b = pid % batch
    hs = tl.arange(0, BLOCK_H)[:, None]
    ds = tl.arange(0, BLOCK_D)[None, :]
    dmask = ds < half
    mask = (hs < heads) & dmask
    c_row = COS + s * stride_cs + b * stride_cb
    s_row = SIN + s * stride_ss + b * stride_sb
    c1 = tl.load(c_row + ds, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + half + ds, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + ds, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + half + ds, mask=dmask, other=0.0).to(tl.float32)
    x_row = X + s * stride_xs + b * stride_xb + hs * stride_xh
    x1 = tl.load(x_row + ds, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + ds, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_row = Y + s * stride_ys + b * stride_yb + hs * stride_yh
    tl.store(y_row + ds, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + half + ds, y2.to(Y.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers


def _table(t: torch.Tensor, s: int, b: int, d: int) -> torch.Tensor:
    """cos or sin as fp32 [s, b, d] (a stride-0 batch dimension when shared by all sequences)."""
    if t.dim() == 4 and t.shape[2] == 1:
        t = t[:, :, 0]
    elif t.dim() == 2:
        t = t[:, None]
    if t.dim() != 3 or t.shape[0] != s or t.shape[1] not in (1, b) or t.shape[2] != d:
        raise ValueError(
            f"cos/sin must be [s, d], [s, 1, 1, d] or [s, b, 1, d] with s={s}, b={b}, d={d}; "
            f"got {tuple(t.shape)}"
        )
    t = t.float()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.expand(s, b, d)


def _tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, b, _, d = x.shape
    if d % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {d}")
    return _table(cos, s, b, d), _table(sin, s, b, d)


def rotary_blocks(heads: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for ``heads`` heads of head dim ``d`` (one program per (s, b) row)."""
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(d // 2)
    return block_h, block_d, 8 if block_h * block_d >= 4096 else 4


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """y (contiguous [s, b, heads, d], x's dtype) = RoPE(x), or its transpose when ``backward``."""
    squeeze = x.dim() == 3  # [s, heads, d]
    x4 = x.unsqueeze(1) if squeeze else x
    if x4.dim() != 4:
        raise ValueError(f"rotary input must be [s, b, heads, d] or [s, heads, d], got {tuple(x.shape)}")
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    cos2, sin2 = _tables(x4, cos, sin)
    s, b, h, d = x4.shape
    y = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    block_h, block_d, warps = rotary_blocks(h, d)
    if s * b:
        _rotary_kernel[(s * b,)](
            x4,
            cos2,
            sin2,
            y,
            b,
            h,
            d // 2,
            x4.stride(0),
            x4.stride(1),
            x4.stride(2),
            y.stride(0),
            y.stride(1),
            y.stride(2),
            cos2.stride(0),
            cos2.stride(1),
            sin2.stride(0),
            sin2.stride(1),
            BACKWARD=backward,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    return y.squeeze(1) if squeeze else y


# --------------------------------------------------------------------------------- autograd.Function


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_launch(dy, cos, sin, backward=True), None, None


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [s, b, heads, d] with ``cos``/``sin`` [s, d] by the Triton kernel."""
    return RotaryFunction.apply(x, cos, sin)


# ------------------------------------------------------------------------------------------ torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _RotaryTorch(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` with its transpose as the backward,
    ``dx = g * cos + rotate_half^T(g * sin)``, ``rotate_half^T([y1, y2]) = [y2, -y1]``: the values
    autograd computes through the formula, bit for bit, in fewer passes and temporaries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        # [x1, x2] cos + [-x2, x1] sin, the halves in place: x1 c1 - x2 s1 and x2 c2 + x1 s2 (a + (-b)
        # is a - b in IEEE arithmetic, so the bits are the formula's), without rotate_half's copies
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].sub_(x[..., half:] * sin[..., :half])
        out[..., half:].add_(x[..., :half] * sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        g_sin = g * sin
        dx = g * cos
        half = dx.shape[-1] // 2
        dx[..., :half].add_(g_sin[..., half:])
        dx[..., half:].sub_(g_sin[..., :half])
        return dx, None, None


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``x * cos + rotate_half(x) * sin`` in x's dtype (the model's own formula);
    cos/sin [s, d], or broadcastable to x: [s, 1, 1, d], [s, b, 1, d]."""
    if cos.dim() == 2:
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
    return _RotaryTorch.apply(x, cos.to(x.dtype), sin.to(x.dtype))


# ----------------------------------------------------------- CUDA alternative (csrc/cuda/rope.cu)


def rotary_cuda_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    from megafast.kernels.cuda_ext import current_stream, require_cuda_extension

    ext = require_cuda_extension("the CUDA RoPE kernel")
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(1) if squeeze else x
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    cos2, sin2 = _tables(x4, cos, sin)
    with torch.cuda.device(x.device):
        y = ext.rope(x4, cos2, sin2, backward, current_stream(x.device))  # cos2/sin2 [s, b, d]
    return y.squeeze(1) if squeeze else y


class RotaryCudaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_cuda_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_cuda_launch(dy, cos, sin, backward=True), None, None


def apply_rotary_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [s, b, heads, d] by the CUDA kernel of ``megafast._C`` (same maths as Triton's)."""
    return RotaryCudaFunction.apply(x, cos, sin)
