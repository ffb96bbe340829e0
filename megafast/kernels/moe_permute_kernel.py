"""MoE token permutation: copy each token's hidden state to its k experts' rows, sorted by expert,
and combine the experts' outputs back, weighted by the router probabilities.

    permute(hidden [T, H], indices [T, k], E) -> permuted [T*k, H], row_id_map [T, k], tokens_per_expert [E]
        indices[t, j]: the expert of token t's j-th choice, or -1 for a dropped choice (capacity factor);
        permuted rows are sorted by expert, stably (token order, then choice order, within an expert),
        the kept choices first: rows [sum(tokens_per_expert), T*k) are zero slots of dropped choices;
        row_id_map[t, j] = the permuted row of choice (t, j), -1 when dropped.
    unpermute(expert_out [T*k, H], row_id_map [T, k], probs [T, k]) -> out [T, H]
        out[t] = sum over kept j of probs[t, j] * expert_out[row_id_map[t, j]]   (fp32 sum, out in
        expert_out's dtype)

Both are differentiable: d hidden[t] = sum over kept j of d permuted[row_id_map[t, j]];
d expert_out[row_id_map[t, j]] = probs[t, j] * d out[t] (zero rows for dropped slots);
d probs[t, j] = <d out[t], expert_out[row_id_map[t, j]]> (0 when dropped).

The sort is ``torch.argsort(stable=True)`` and the counts a ``scatter_add`` (device ops, no host
sync). Triton: every copy is a gather, each output row written by exactly one program, so no
atomics and no zero-filled buffers:

- ``_gather_rows_kernel``: out[p] = scale * src[token of permuted row p] (permute forward, and
  unpermute's expert_out gradient with scale = probs of that choice); zeros for dropped slots;
- ``_combine_rows_kernel``: out[t] = sum_j scale[t, j] * src[row_id_map[t, j]] (unpermute forward,
  and permute's hidden gradient with scale 1);
- ``_prob_grad_kernel``: d probs[t, j] = dot(d out[t], expert_out[row_id_map[t, j]]).

Layout: kernels -> launchers -> autograd.Functions -> ``permute``/``unpermute`` (Triton) ->
``permute_torch``/``unpermute_torch``.
"""

from __future__ import annotations

import torch

from megafast.kernels._triton import tl, triton

BLOCK_H = 1024  # hidden columns per program (a GPU row of 4096 bf16: 4 programs)
NUM_WARPS = 4

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _gather_rows_kernel(
    SRC, OUT, SOURCE_CHOICE, SCALE, n_cols, top_k, stride_src, stride_out,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """OUT[p] = SCALE[c] * SRC[c // top_k] for c = SOURCE_CHOICE[p] (the flat choice t*k + j), 0 if c < 0."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    choice = tl.load(SOURCE_CHOICE + p)
    kept = choice >= 0
    token = tl.where(kept, choice // top_k, 0)
    x = tl.load(SRC + token * stride_src + cols, mask=mask & kept, other=0.0)
    if HAS_SCALE:
        s = tl.load(SCALE + tl.where(kept, choice, 0)).to(tl.float32)
        y = x.to(tl.float32) * s
    else:
        y = x
    tl.store(OUT + p * stride_out + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _combine_rows_kernel(
    SRC, OUT, ROW_ID_MAP, SCALE, n_cols, stride_src, stride_out,
    TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """OUT[t] = sum_j SCALE[t, j] * SRC[ROW_ID_MAP[t, j]] over the kept choices (fp32 sum)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(ROW_ID_MAP + t * TOP_K + j)
        kept = row >= 0
        src_ptrs = SRC + tl.where(kept, row, 0) * stride_src + cols
        x = tl.load(src_ptrs, mask=mask & kept, other=0.0).to(tl.float32)
        if HAS_SCALE:
            x = x * tl.load(SCALE + t * TOP_K + j).to(tl.float32)
        acc += x
    tl.store(OUT + t * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _prob_grad_kernel(
    DOUT, EXPERT_OUT, ROW_ID_MAP, DPROBS, n_cols, top_k, stride_dout, stride_e, BLOCK: tl.constexpr
):
    """DPROBS[c] = dot(DOUT[c // top_k], EXPERT_OUT[ROW_ID_MAP[c]]) for the flat choice c (0 if dropped)."""
    c = tl.program_id(0).to(tl.int64)
    t = c // top_k
    row = tl.load(ROW_ID_MAP + c)
    kept = row >= 0
    row = tl.where(kept, row, 0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = (cols < n_cols) & kept
        g = tl.load(DOUT + t * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(EXPERT_OUT + row * stride_e + cols, mask=mask, other=0.0).to(tl.float32)
        acc += g * x
    tl.store(DPROBS + c, tl.sum(acc, axis=0).to(DPROBS.dtype.element_ty))


# ------------------------------------------------------------------------------- routing (torch ops)


def _check(indices: torch.Tensor, num_experts: int, rows: int) -> None:
    if indices.dim() != 2 or indices.shape[0] != rows:
        raise ValueError(
            f"moe permute: indices must be [T, k] with T = {rows} tokens, got {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe permute: indices must be int64 (or int32) expert ids, got {indices.dtype}")
    if num_experts < 1:
        raise ValueError(f"moe permute: num_experts must be >= 1, got {num_experts}")


def routing(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source_choice [T*k]: flat choice t*k + j of each permuted row, -1 for a dropped slot;
    row_id_map [T, k]: permuted row of each choice, -1 when dropped; tokens_per_expert [E] int64)."""
    t, k = indices.shape
    flat = indices.reshape(-1).to(torch.int64)
    dropped = flat < 0
    key = torch.where(dropped, num_experts, flat)  # dropped choices sort last
    order = torch.argsort(key, stable=True)  # [T*k]: the flat choice of each permuted row
    positions = torch.arange(t * k, device=flat.device)
    row_id_map = torch.empty_like(flat).scatter_(0, order, positions)
    row_id_map = torch.where(dropped, -1, row_id_map).view(t, k)
    source_choice = torch.where(dropped[order], -1, order)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return source_choice, row_id_map, counts[:num_experts]


def source_choice_of(row_id_map: torch.Tensor) -> torch.Tensor:
    """The inverse of ``row_id_map`` [T, k]: the flat choice of each of the T*k permuted rows (-1: none)."""
    n = row_id_map.numel()
    flat = row_id_map.reshape(-1)
    dest = torch.where(flat >= 0, flat, n)  # dropped choices write into a spare slot n, discarded
    inv = torch.full((n + 1,), -1, dtype=torch.int64, device=flat.device)
    inv.scatter_(0, dest, torch.arange(n, device=flat.device))
    return inv[:n]


# -------------------------------------------------------------------------------------- launchers


def _blocks(n_cols: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(max(n_cols, 1)))


def gather_rows(
    src: torch.Tensor, source_choice: torch.Tensor, top_k: int, scale=None, dtype=None
) -> torch.Tensor:
    """[len(source_choice), H]: row p = scale[c] * src[c // top_k] for c = source_choice[p] (0 if c < 0)."""
    n_cols = src.shape[1]
    out = torch.empty((source_choice.numel(), n_cols), dtype=dtype or src.dtype, device=src.device)
    block = _blocks(n_cols)
    if out.numel():
        _gather_rows_kernel[(out.shape[0], triton.cdiv(n_cols, block))](
            src, out, source_choice, scale if scale is not None else src, n_cols, top_k,
            src.stride(0), out.stride(0), HAS_SCALE=scale is not None, BLOCK=block, num_warps=NUM_WARPS,
        )
    return out


def combine_rows(src: torch.Tensor, row_id_map: torch.Tensor, scale=None, dtype=None) -> torch.Tensor:
    """[T, H]: row t = sum over kept j of scale[t, j] * src[row_id_map[t, j]]."""
    t, k = row_id_map.shape
    n_cols = src.shape[1]
    out = torch.empty((t, n_cols), dtype=dtype or src.dtype, device=src.device)
    block = _blocks(n_cols)
    if out.numel():
        _combine_rows_kernel[(t, triton.cdiv(n_cols, block))](
            src, out, row_id_map, scale if scale is not None else src, n_cols, src.stride(0), out.stride(0),
            TOP_K=k, HAS_SCALE=scale is not None, BLOCK=block, num_warps=NUM_WARPS,
        )
    return out


def prob_grad(dout: torch.Tensor, expert_out: torch.Tensor, row_id_map: torch.Tensor, dtype) -> torch.Tensor:
    """[T, k]: dot(dout[t], expert_out[row_id_map[t, j]]), 0 for dropped choices."""
    t, k = row_id_map.shape
    dprobs = torch.empty((t, k), dtype=dtype, device=dout.device)
    if dprobs.numel():
        _prob_grad_kernel[(t * k,)](
            dout, expert_out, row_id_map, dprobs, dout.shape[1], k, dout.stride(0), expert_out.stride(0),
            BLOCK=_blocks(dout.shape[1]), num_warps=NUM_WARPS,
        )
    return dprobs


# --------------------------------------------------------------------------------- autograd.Functions


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, source_choice, row_id_map, top_k):
        hidden = hidden.contiguous()
        ctx.save_for_backward(row_id_map)
        return gather_rows(hidden, source_choice, top_k)

    @staticmethod
    def backward(ctx, dpermuted):
        (row_id_map,) = ctx.saved_tensors
        return combine_rows(dpermuted.contiguous(), row_id_map), None, None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, row_id_map, probs):
        expert_out, probs = expert_out.contiguous(), probs.contiguous()
        ctx.save_for_backward(expert_out, row_id_map, probs)
        return combine_rows(expert_out, row_id_map, probs)

    @staticmethod
    def backward(ctx, dout):
        expert_out, row_id_map, probs = ctx.saved_tensors
        dout = dout.contiguous()
        d_expert = d_probs = None
        if ctx.needs_input_grad[0]:
            source = source_choice_of(row_id_map)
            d_expert = gather_rows(dout, source, row_id_map.shape[1], probs, dtype=expert_out.dtype)
        if ctx.needs_input_grad[2]:
            d_probs = prob_grad(dout, expert_out, row_id_map, probs.dtype)
        return d_expert, None, d_probs


def permute(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """(permuted [T*k, H], row_id_map [T, k], tokens_per_expert [E]) by the Triton gather (see module doc)."""
    _check(indices, num_experts, hidden.shape[0])
    source_choice, row_id_map, counts = routing(indices, num_experts)
    permuted = PermuteFunction.apply(hidden, source_choice, row_id_map, indices.shape[1])
    return permuted, row_id_map, counts


def unpermute(expert_out: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """out [T, H] = sum over kept j of probs[t, j] * expert_out[row_id_map[t, j]] by the Triton kernels."""
    _check_unpermute(expert_out, row_id_map, probs)
    return UnpermuteFunction.apply(expert_out, row_id_map, probs)


def _check_unpermute(expert_out: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor) -> None:
    if probs.shape != row_id_map.shape or expert_out.dim() != 2 or expert_out.shape[0] != row_id_map.numel():
        raise ValueError(
            f"moe unpermute: expert_out must be [T*k, H] and probs [T, k] like row_id_map "
            f"{tuple(row_id_map.shape)}, "
            f"got {tuple(expert_out.shape)} and {tuple(probs.shape)}"
        )


# ------------------------------------------------------------------------------------------ torch


def permute_torch(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Plain torch: ``index_select`` of each permuted row's token (its backward: ``index_add``)."""
    _check(indices, num_experts, hidden.shape[0])
    source_choice, row_id_map, counts = routing(indices, num_experts)
    tokens = torch.div(source_choice.clamp_min(0), indices.shape[1], rounding_mode="floor")
    permuted = hidden.index_select(0, tokens)
    dropped = source_choice < 0
    if bool(dropped.any()):
        permuted = permuted.masked_fill(dropped.unsqueeze(-1), 0)
    return permuted, row_id_map, counts


def unpermute_torch(expert_out: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Plain torch: gather the k rows of each token, weight by probs (0 for dropped choices) and sum
    in fp32; the result in ``expert_out``'s dtype."""
    _check_unpermute(expert_out, row_id_map, probs)
    t, k = row_id_map.shape
    kept = row_id_map >= 0
    rows = expert_out.index_select(0, row_id_map.clamp_min(0).reshape(-1)).view(t, k, -1)
    weights = torch.where(kept, probs, torch.zeros_like(probs)).float()
    return torch.bmm(weights.unsqueeze(1), rows.float()).squeeze(1).to(expert_out.dtype)
