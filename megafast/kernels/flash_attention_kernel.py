"""Flash attention (FlashAttention-2 algorithm) in Triton: forward and backward, causal, GQA,
causal sliding window.

q [b, H, s, d], k/v [b, G, s, d] (any strides, last dimension contiguous; query heads
h*G/H .. share kv head h // (H/G), the model's grouped layout), scale = 1/sqrt(d) by default:

    S = scale * q k^T (causal: -inf above the diagonal),  P = softmax(S),  O = P v

Sliding window (``window_left`` = W, with ``WINDOW``; causal only, megafast.model.sliding_window):
query i also masks keys j < i - W, i.e. it sees i - W <= j <= i (HF's ``sliding_window`` is W + 1).
Key blocks entirely left of a query block's window (and, in dK/dV, query blocks entirely right of
a key block's reach) are skipped, so the work is O(s W) instead of O(s^2).

Forward walks the key blocks with an online softmax (running max m and sum l, base-2
exponentials) and saves only lse2 = m + log2(l) per query row (fp32). Backward, with
D = rowsum(dO * O):

    P = exp2(S log2(e) - lse2),  dV = P^T dO,  dP = dO v^T,  dS = P * (dP - D)
    dQ = scale * dS k,           dK = scale * dS^T q

in two kernels without atomics: one per key block (dK, dV summed over the H/G query heads of its
kv head) and one per query block (dQ). Outputs and gradients are laid out [s, b, heads, d] in
memory (returned as [b, heads, s, d] views), so the model's transpose back is free.
fp32 inputs use IEEE-precision dots (no TF32) and run only in the CPU interpreter: on a GPU those
dots use no tensor cores and spill tens of KB of registers per thread, so the kernels take
bf16/fp16 there (:func:`attention_dtypes`) and the dispatcher routes fp32 attention to SDPA.
Head dims up to 256. No dropout.

Layout: kernels -> launchers -> autograd.Function -> ``flash_attention_triton`` -> ``attention_torch``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megafast.kernels._triton import HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634
# group_size (query heads per kv head) and n_groups (kv heads) are index divisors only: they are not
# specialised, so MHA and GQA models share one compiled binary per block configuration.

# ---------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["group_size"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    n_heads,
    group_size,
    seq_len,
    head_dim,
    qk_scale,
    window_left,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    g = h // group_size
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=(offs_m[:, None] < seq_len) & dmask[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
    else:
        hi = seq_len
    if WINDOW:  # the first key block that any query of this block can see
        lo = (tl.maximum(start_m * BLOCK_M - window_left, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None],
            mask=(cols[None, :] < seq_len) & dmask[:, None],
            other=0.0,
        )  # [D, N]
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # log2 domain
        valid = cols[None, :] < seq_len
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        if WINDOW:
            valid = valid & (offs_m[:, None] - cols[None, :] <= window_left)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        if WINDOW:  # a row may see no key of its first blocks yet: exp2(-inf - -inf) must be 0, not NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :],
            mask=(cols[:, None] < seq_len) & dmask[None, :],
            other=0.0,
        )  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    rmask = offs_m < seq_len
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )
    tl.store(LSE + bh * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=rmask)


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_os,
    stride_db,
    stride_dh,
    stride_ds,
    n_heads,
    seq_len,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit(do_not_specialize=["n_groups", "group_size"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    n_heads,
    n_groups,
    group_size,
    seq_len,
    head_dim,
    sm_scale,
    qk_scale,
    window_left,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    b = bg // n_groups
    g = bg % n_groups
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    kv_mask = (cols[:, None] < seq_len) & dmask[None, :]
    k = tl.load(
        K + b * stride_kb + g * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + g * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier query blocks cannot see these keys
    else:
        lo = 0
    # One flat loop over (query head of this group, query block): nested loops keep the outer loop's
    # state live across the pipelined inner loop and spill registers at head dim 128 with GQA.
    if WINDOW:  # later query blocks are past these keys' window
        hi = tl.minimum((start_n + 1) * BLOCK_N + window_left, seq_len)
    else:
        hi = seq_len
    m_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, group_size * m_blocks):
        hh = it // m_blocks
        start_m = lo + (it - hh * m_blocks) * BLOCK_M
        h = g * group_size + hh
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_heads + h) * seq_len
        rows = start_m + offs_m
        rmask = rows < seq_len
        qt = tl.load(
            q_base + rows[None, :] * stride_qs + offs_d[:, None],
            mask=rmask[None, :] & dmask[:, None],
            other=0.0,
        )  # [D, M]
        lse = tl.load(LSE + row_base + rows, mask=rmask, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse[None, :])  # [N, M]
        valid = rmask[None, :] & (cols[:, None] < seq_len)
        if CAUSAL:
            valid = valid & (rows[None, :] >= cols[:, None])
        if WINDOW:
            valid = valid & (rows[None, :] - cols[:, None] <= window_left)
        pt = tl.where(valid, pt, 0.0)
        do = tl.load(
            do_base + rows[:, None] * stride_dos + offs_d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [M, D]
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [N, M]
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    tl.store(
        DK + b * stride_dkb + g * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + g * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit(do_not_specialize=["group_size"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    n_heads,
    group_size,
    seq_len,
    head_dim,
    sm_scale,
    qk_scale,
    window_left,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    g = h // group_size
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    rmask = rows < seq_len
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :], mask=qmask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
        mask=qmask,
        other=0.0,
    )
    lse = tl.load(LSE + bh * seq_len + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh * seq_len + rows, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
    else:
        hi = seq_len
    if WINDOW:
        lo = (tl.maximum(start_m * BLOCK_M - window_left, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kvmask = (cols[None, :] < seq_len) & dmask[:, None]
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kvmask, other=0.0)  # [D, N]
        vt = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=kvmask, other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])  # [M, N]
        valid = rmask[:, None] & (cols[None, :] < seq_len)
        if CAUSAL:
            valid = valid & (rows[:, None] >= cols[None, :])
        if WINDOW:
            valid = valid & (rows[:, None] - cols[None, :] <= window_left)
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=qmask,
    )


def attention_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the kernels take on a GPU (fp32 only in the interpreter; see the module docstring)."""
    return (torch.bfloat16, torch.float16)


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) of the CUDA launches, before pruning.
FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)]
DKDV_CONFIGS = [
    (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 3), (16, 64, 4, 4)
]
DQ_CONFIGS = [(128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
DELTA_BLOCK_M = 64  # rows per program of the backward's D = rowsum(dO * O) on GPU

# Candidates that spill registers, by (kernel, BLOCK_D, arch), found by compiling them all
# (``python -m megafast.kernels.aot_check``, which fails if any candidate left after pruning spills
# or overflows shared memory at head dims 64 and 128, bf16 and fp16, with and without GQA).
_SPILLING = {
    ("fwd", 128, "sm_90a"): {(128, 64, 4, 3), (128, 32, 4, 4)},
    ("fwd", 128, "sm_80"): {(128, 64, 4, 3), (128, 32, 4, 4)},
    ("dkdv", 64, "sm_80"): {(64, 128, 8, 3), (64, 64, 8, 3)},
    ("dkdv", 128, "sm_90a"): {(64, 128, 8, 3)},
    ("dkdv", 128, "sm_80"): {(64, 128, 8, 3), (32, 128, 8, 3)},
    ("dq", 64, "sm_80"): {(64, 64, 4, 3), (128, 64, 8, 3)},
    ("dq", 128, "sm_90a"): {(128, 32, 4, 3)},
    ("dq", 128, "sm_80"): {(128, 32, 4, 3), (128, 64, 8, 3)},
}
# ... and the further ones that spill with the sliding-window mask (one more live comparison)
_SPILLING_WINDOW = {
    ("dkdv", 64, "sm_80"): {(64, 64, 8, 3), (32, 64, 4, 3)},
    ("dkdv", 128, "sm_90a"): {(32, 64, 4, 3)},
    ("dq", 64, "sm_80"): {(128, 32, 4, 3)},
    ("dq", 128, "sm_80"): {(64, 64, 4, 3)},
}


def prune_attention_configs(
    configs: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    head_dim: int,
    capability: int,
    kind: str = "fwd",
    window: bool = False,
) -> list[tuple[int, int, int, int]]:
    """The candidates of ``configs`` that neither spill nor overflow shared memory on ``capability``.

    ``kind``: 'fwd', 'dkdv' or 'dq'; ``window``: the sliding-window specialisation. Verified at
    BLOCK_D 64 and 128 (head dims 33-128); smaller head dims use the BLOCK_D 64 rule, larger ones
    (up to 256) the BLOCK_D 128 rule.
    """
    if dtype not in attention_dtypes():
        raise ValueError(f"the Triton flash attention takes bf16/fp16 on a GPU, got {dtype}")
    block_d = 64 if head_dim <= 64 else 128
    arch = "sm_90a" if capability >= 90 else "sm_80"
    spilling = _SPILLING.get((kind, block_d, arch), set())
    if window:
        spilling = spilling | _SPILLING_WINDOW.get((kind, block_d, arch), set())
    kept = [c for c in configs if tuple(c) not in spilling]
    return kept or [min(configs, key=lambda c: c[0] * c[1])]


def _autotuned(kernel, configs: list[tuple[int, int, int, int]], kind: str):
    """The same kernel autotuned over (BLOCK_M, BLOCK_N, num_warps, num_stages) for CUDA launches,
    over the candidates :func:`prune_attention_configs` keeps for the launch's dtype, head dim and GPU."""
    if not HAS_TRITON:
        return kernel

    def prune(candidates, named_args, **kw):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        cc = 10 * major + minor
        window = bool(kw.get("WINDOW", named_args.get("WINDOW", False)))
        keep = set(prune_attention_configs(configs, q.dtype, named_args["head_dim"], cc, kind, window))
        return [c for c in candidates
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]

    return triton.autotune(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs],
        key=["seq_len", "head_dim", "CAUSAL", "WINDOW", "BLOCK_D"],
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_FWD_TUNED = _autotuned(_attn_fwd_kernel, FWD_CONFIGS, "fwd")
_DKDV_TUNED = _autotuned(_attn_bwd_dkdv_kernel, DKDV_CONFIGS, "dkdv")
_DQ_TUNED = _autotuned(_attn_bwd_dq_kernel, DQ_CONFIGS, "dq")
CPU_BLOCK = 32  # the interpreter: small tiles, few programs

# -------------------------------------------------------------------------------------- launchers


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _like_sbhd(b: int, heads: int, s: int, d: int, ref: torch.Tensor) -> torch.Tensor:
    """An uninitialised [b, heads, s, d] view of an [s, b, heads, d]-contiguous tensor."""
    return torch.empty((s, b, heads, d), dtype=ref.dtype, device=ref.device).permute(1, 2, 0, 3)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"flash attention needs q [b, H, s, d] and k, v [b, G, s, d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, heads, s, d = q.shape
    groups = k.shape[1]
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(
            f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (same batch, length and head dim)"
        )
    if heads % groups:
        raise ValueError(f"{heads} query heads are not a multiple of {groups} kv heads")
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton flash attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.is_cuda and q.dtype not in attention_dtypes():
        raise ValueError(
            f"the Triton flash attention takes bf16/fp16 on a GPU, got {q.dtype}: use SDPA "
            "(megafast.kernels.attention routes fp32 there)"
        )
    return b, heads, groups, s, d


def _last_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def attention_settings(dtype: torch.dtype, head_dim: int) -> tuple[str, int]:
    """(PRECISION, BLOCK_D) of every attention kernel for inputs of ``dtype`` and ``head_dim``."""
    return ("ieee" if dtype == torch.float32 else "tf32"), max(16, triton.next_power_of_2(head_dim))


def _launch_args(q: torch.Tensor) -> tuple[str, int]:
    return attention_settings(q.dtype, q.shape[-1])


def _window_args(causal: bool, window: Optional[int]) -> tuple[int, bool]:
    """(window_left, WINDOW) kernel arguments of a left ``window`` (None: no window)."""
    if window is None:
        return 0, False
    if not causal or window < 0:
        raise ValueError(f"a sliding window needs causal attention and a left width >= 0, got {window}")
    return int(window), True


def flash_attention_forward(q, k, v, causal: bool, sm_scale: float, window: Optional[int] = None):
    """-> (o [b, H, s, d] (an [s, b, H, d]-contiguous view), lse2 [b, H, s] fp32). ``window``: query
    i sees keys i - window .. i (causal only)."""
    window_left, has_window = _window_args(causal, window)
    b, heads, groups, s, d = _check(q, k, v)
    q, k, v = _last_contiguous(q, k, v)
    o = _like_sbhd(b, heads, s, d, q)
    lse = torch.empty((b, heads, s), dtype=torch.float32, device=q.device)
    precision, block_d = _launch_args(q)
    args = (
        q,
        k,
        v,
        o,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        heads,
        heads // groups,
        s,
        d,
        sm_scale * LOG2E,
        window_left,
    )
    if s * b * heads == 0:
        return o, lse
    flags = dict(CAUSAL=causal, WINDOW=has_window, PRECISION=precision, BLOCK_D=block_d)
    if q.is_cuda:
        grid = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * heads)  # noqa: E731
        _FWD_TUNED[grid](*args, **flags)
    else:
        _attn_fwd_kernel[(triton.cdiv(s, CPU_BLOCK), b * heads)](
            *args, **flags, BLOCK_M=CPU_BLOCK, BLOCK_N=CPU_BLOCK
        )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, window: Optional[int] = None):
    """-> (dq, dk, dv), each an [s, b, heads, d]-contiguous view shaped like q, k, v."""
    window_left, has_window = _window_args(causal, window)
    b, heads, groups, s, d = _check(q, k, v)
    q, k, v, do = _last_contiguous(q, k, v, do)
    precision, block_d = _launch_args(q)
    dq, dk, dv = _like_sbhd(b, heads, s, d, q), _like_sbhd(b, groups, s, d, k), _like_sbhd(b, groups, s, d, v)
    delta = torch.empty((b, heads, s), dtype=torch.float32, device=q.device)
    if s * b * heads == 0:
        return dq, dk, dv
    block_m = DELTA_BLOCK_M if q.is_cuda else CPU_BLOCK
    _attn_bwd_delta_kernel[(triton.cdiv(s, block_m), b * heads)](
        o, do, delta, *_strides(o), *_strides(do), heads, s, d, BLOCK_M=block_m, BLOCK_D=block_d
    )
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    scales = (sm_scale, sm_scale * LOG2E, window_left)
    dkdv_args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        *common,
        *_strides(dk),
        *_strides(dv),
        heads,
        groups,
        heads // groups,
        s,
        d,
        *scales,
    )
    dq_args = (q, k, v, do, lse, delta, dq, *common, *_strides(dq), heads, heads // groups, s, d, *scales)
    flags = dict(CAUSAL=causal, WINDOW=has_window, PRECISION=precision, BLOCK_D=block_d)
    if q.is_cuda:
        _DKDV_TUNED[lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * groups)](*dkdv_args, **flags)
        _DQ_TUNED[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * heads)](*dq_args, **flags)
    else:
        blocks = dict(BLOCK_M=CPU_BLOCK, BLOCK_N=CPU_BLOCK)
        _attn_bwd_dkdv_kernel[(triton.cdiv(s, CPU_BLOCK), b * groups)](*dkdv_args, **flags, **blocks)
        _attn_bwd_dq_kernel[(triton.cdiv(s, CPU_BLOCK), b * heads)](*dq_args, **flags, **blocks)
    return dq, dk, dv


# --------------------------------------------------------------------------------- autograd.Function


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, window=None):
        o, lse = flash_attention_forward(q, k, v, causal, sm_scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (causal, sm_scale, window)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, *ctx.meta)
        return dq, dk, dv, None, None, None


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """softmax(scale q k^T, causal) v for q [b, H, s, d], k/v [b, G, s, d] (GQA when G < H);
    ``window``: the left width of a causal sliding window (query i sees keys i - window .. i)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, scale, window)


# ------------------------------------------------------------------------------------------ torch


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Plain torch: explicit masked softmax in q's dtype, kv heads repeated for GQA."""
    heads, groups, s = q.shape[1], k.shape[1], q.shape[2]
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v
