"""Grouped matmul of the MoE experts: rows sorted by expert, one weight matrix per expert.

    x  [T, K]  rows sorted by expert: the first c_0 = tokens_per_expert[0] rows go to expert 0, ...
    w  [E, K, N]
    y  [T, N]  y[rows of e] = x[rows of e] @ w[e]            (rows past sum(c_e) -> 0: dropped slots)

Backward (dy [T, N]):

    dx[rows of e] = dy[rows of e] @ w[e]^T                     (the same grouped kernel, w's strides swapped)
    dw[e]         = x[rows of e]^T @ dy[rows of e]             (K x N per expert, 0 for an empty expert)

``sum(tokens_per_expert)`` may be less than T: the trailing rows are slots of dropped tokens (the
permutation's capacity-factor padding) and get zero outputs and zero gradients.

Triton: one launch over (row tile, column tile) programs. The row tiles are laid out expert by
expert (``ceil(c_e / BLOCK_M)`` tiles for expert e, plus the dropped slots as an extra group that
writes zeros); the tile -> (expert, first row, end row) map is computed on the device by torch ops
(cumsum/searchsorted), so there is no host sync: the grid is the upper bound
``ceil(T / BLOCK_M) + E + 1`` row tiles and programs past the last real tile exit at once. fp32
accumulation, ``tl.dot`` on bf16/fp16 (wgmma on sm_90a); fp32 inputs use exact (IEEE) dots and
run only in the interpreter (on a GPU, fp32 goes to the torch path: see ``dispatch.grouped_gemm``).

Layout: kernels -> launchers -> autograd.Function -> ``grouped_gemm`` (Triton) -> ``grouped_gemm_torch``.
"""

from __future__ import annotations

import torch

from megafast.kernels._triton import tl, triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU: 128x128 output tiles, 64-deep K steps
# (3 stages of bf16 A and B tiles: 96 KiB of shared memory, under sm_80's and sm_90a's limits)
GPU_BLOCKS = (128, 128, 64, 8, 3)
INTERPRETER_BLOCKS = (32, 32, 32, 4, 1)  # CPU interpreter: few programs, masks still exercised
# the weight gradient's (BLOCK_M: rows reduced per step, BLOCK_N, BLOCK_K, warps, stages): 128x128 dw tiles
DW_GPU_BLOCKS = (64, 128, 128, 8, 3)
GROUP = 8  # row tiles (dw: K tiles) that sweep the column tiles together, for L2 reuse

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _grouped_gemm_kernel(
    A, B, C, TILE_MAP, n_tiles,  # TILE_MAP int32 [3, n_tiles]: expert (-1: no tile), first row, end row
    N, K, num_experts,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[rows of a row tile] = A[rows] @ B[e] (e: that tile's expert) for one column tile."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    # grouped order (Triton's matmul tutorial): GROUP_M consecutive row tiles sweep the column
    # tiles together, so each B column slab is read once per group of row tiles, not per row tile
    in_group = GROUP_M * n_col_tiles
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)
    tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    expert = tl.load(TILE_MAP + tile)
    if expert >= 0:
        row0 = tl.load(TILE_MAP + n_tiles + tile)
        row_end = tl.load(TILE_MAP + 2 * n_tiles + tile)
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rows < row_end
        mask_n = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if expert < num_experts:  # else: the dropped slots, zeros
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
            b_ptrs = B + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
            for k0 in range(0, K, BLOCK_K):
                mask_k = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
        c_ptrs = C + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_gemm_dw_kernel(
    X, DY, DW, GROUP_START, GROUP_END,  # int64 [E]: the expert's rows are [start, end)
    N, K,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_K: tl.constexpr,
):
    """DW[e][k tile, n tile] = X[rows of e, k tile]^T @ DY[rows of e, n tile] (0 when e has no rows)."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    expert = pid // (n_col_tiles * n_k_tiles)
    rest = pid % (n_col_tiles * n_k_tiles)
    in_group = GROUP_K * n_col_tiles  # grouped order, as in _grouped_gemm_kernel, over (k, n) tiles
    first = (rest // in_group) * GROUP_K
    size = tl.minimum(n_k_tiles - first, GROUP_K)
    pid_k = first + (rest % in_group) % size
    pid_n = (rest % in_group) // size
    start = tl.load(GROUP_START + expert)
    end = tl.load(GROUP_END + expert)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = ks < K
    mask_n = cols < N
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + ms).to(tl.int64)
        mask_m = rows < end
        xt = tl.load(X + rows[None, :] * stride_xm + ks[:, None] * stride_xk,  # [BLOCK_K, BLOCK_M]
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    w_ptrs = DW + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    tl.store(w_ptrs, acc.to(DW.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# -------------------------------------------------------------------------------------- launchers


def gemm_blocks(is_cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped kernel (y and dx)."""
    return GPU_BLOCKS if is_cuda else INTERPRETER_BLOCKS


def dw_blocks(is_cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the weight-gradient kernel."""
    return DW_GPU_BLOCKS if is_cuda else INTERPRETER_BLOCKS


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit dots ignore it (fp32 accumulation)


def max_row_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum over groups of ceil(c_g / BLOCK_M): E experts + the dropped-slot group."""
    return triton.cdiv(rows, block_m) + num_experts + 1


def group_bounds(tokens_per_expert: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int64 [E + 1] of each expert's rows and (last) of the dropped slots, on the device."""
    counts = tokens_per_expert.to(torch.int64)
    ends = torch.cumsum(counts, 0)
    total = ends[-1:] if counts.numel() else counts.new_zeros(1)
    ends = torch.cat([ends, total.clamp_min(rows)])  # the dropped slots: [sum c_e, rows)
    starts = torch.cat([ends[:1].new_zeros(1), ends[:-1]])
    return starts, ends


def tile_map(tokens_per_expert: torch.Tensor, rows: int, block_m: int) -> torch.Tensor:
    """int32 [3, max_row_tiles]: per row tile its group (-1: unused), first row and end row (device ops)."""
    e = tokens_per_expert.numel()
    starts, ends = group_bounds(tokens_per_expert, rows)
    tiles = (ends - starts + block_m - 1) // block_m  # [E + 1]
    tiles_end = torch.cumsum(tiles, 0)
    n = max_row_tiles(rows, e, block_m)
    i = torch.arange(n, device=tiles.device)
    group = torch.searchsorted(tiles_end, i, right=True)  # the group whose tiles hold tile i (E + 1: none)
    g = group.clamp(max=e)
    first = starts[g] + (i - (tiles_end[g] - tiles[g])) * block_m
    expert = torch.where(group <= e, g, -1)
    return torch.stack([expert, first, ends[g]]).to(torch.int32)


def _check(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"grouped_gemm: x must be [T, K] and w [E, K, N], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if tokens_per_expert.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_gemm: tokens_per_expert must be [E] = [{w.shape[0]}], "
            f"got {tuple(tokens_per_expert.shape)}"
        )


def grouped_gemm_forward(
    a: torch.Tensor, b: torch.Tensor, tokens_per_expert: torch.Tensor, *, b_transposed: bool = False
) -> torch.Tensor:
    """a [T, K] @ b[e] per group (b [E, K, N], or [E, N, K] used transposed) -> [T, N] (zeros past
    the groups)."""
    rows, k = a.shape
    e = b.shape[0]
    n = b.shape[1] if b_transposed else b.shape[2]
    stride_be, stride_bk, stride_bn = (b.stride(0), b.stride(2), b.stride(1)) if b_transposed else b.stride()
    block_m, block_n, block_k, warps, stages = gemm_blocks(a.is_cuda)
    c = torch.empty((rows, n), dtype=a.dtype, device=a.device)
    if rows == 0 or n == 0:
        return c
    tmap = tile_map(tokens_per_expert.to(a.device), rows, block_m)
    n_tiles = tmap.shape[1]
    grid = (n_tiles * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, tmap, n_tiles, n, k, e,
        a.stride(0), a.stride(1), stride_be, stride_bk, stride_bn, c.stride(0), c.stride(1),
        PRECISION=_precision(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP,
        num_warps=warps, num_stages=stages,
    )
    return c


def grouped_gemm_dw(
    x: torch.Tensor, dy: torch.Tensor, tokens_per_expert: torch.Tensor, w_dtype: torch.dtype
) -> torch.Tensor:
    """dw [E, K, N]: x[rows of e]^T @ dy[rows of e] per expert."""
    (rows, k), n, e = x.shape, dy.shape[1], tokens_per_expert.numel()
    block_m, block_n, block_k, warps, stages = dw_blocks(x.is_cuda)
    dw = torch.empty((e, k, n), dtype=w_dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    starts, ends = group_bounds(tokens_per_expert.to(x.device), rows)
    grid = (e * triton.cdiv(k, block_k) * triton.cdiv(n, block_n),)
    _grouped_gemm_dw_kernel[grid](
        x, dy, dw, starts, ends, n, k,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_K=GROUP,
        num_warps=warps, num_stages=stages,
    )
    return dw


# --------------------------------------------------------------------------------- autograd.Function


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, tokens_per_expert):
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, tokens_per_expert)
        return grouped_gemm_forward(x, w, tokens_per_expert)

    @staticmethod
    def backward(ctx, dy):
        x, w, tokens_per_expert = ctx.saved_tensors
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grouped_gemm_forward(dy, w, tokens_per_expert, b_transposed=True)
        dw = grouped_gemm_dw(x, dy, tokens_per_expert, w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """y [T, N]: ``x[rows of e] @ w[e]`` per expert e by the Triton kernels (see the module doc)."""
    _check(x, w, tokens_per_expert)
    return GroupedGemmFunction.apply(x, w, tokens_per_expert)


# ------------------------------------------------------------------------------------------ torch


class _GroupedGemmTorch(torch.autograd.Function):
    """The per-expert loop of ``torch.mm`` writing into slices of one output (no concatenation)."""

    @staticmethod
    def forward(ctx, x, w, tokens_per_expert):
        counts = [int(c) for c in tokens_per_expert.tolist()]  # host values: the split points
        ctx.counts = counts
        ctx.save_for_backward(x, w)
        y = torch.empty((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(x[start:start + c], w[e], out=y[start:start + c])
            start += c
        y[start:].zero_()  # dropped slots
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        counts = ctx.counts
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, c in enumerate(counts):
            dy_e = dy[start:start + c]
            if dx is not None and c:
                torch.mm(dy_e, w[e].t(), out=dx[start:start + c])
            if dw is not None:
                if c:
                    torch.mm(x[start:start + c].t(), dy_e, out=dw[e])
                else:
                    dw[e].zero_()
            start += c
        if dx is not None:
            dx[start:].zero_()
        return dx, dw, None


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Plain torch: one ``torch.mm`` per non-empty expert into its slice of y (reads the counts on the
    host: a device sync on a GPU). ``torch._grouped_mm`` is not used: on CPU (torch 2.13) it requires
    16-byte-aligned strides and its backward fails."""
    _check(x, w, tokens_per_expert)
    return _GroupedGemmTorch.apply(x, w, tokens_per_expert)
