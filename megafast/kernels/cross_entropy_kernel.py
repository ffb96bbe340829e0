"""Cross-entropy over (vocabulary-parallel) logits: fused log-softmax + loss + gradient in Triton.

Rank i of the tensor-parallel group holds the logits z[..., i*V/p:(i+1)*V/p]; columns at or beyond
``vocab_size`` are vocabulary padding and excluded. Per row, one pass over this rank's columns in
chunks of BLOCK keeps a running max and rescaled sum (online softmax) and picks the target logit:

    m_r = max_v z_v,   s_r = sum_v exp(z_v - m_r),   z_t (0 unless the target is on this rank)

The ranks combine them with the same three all-reduces as ``megafast.parallel.cross_entropy``
(M = MAX m_r; S = SUM s_r exp(m_r - M); z_t = SUM), so the loss and gradient are the same maths:

    lse = M + log S,   loss = lse - z_t  (0 where target == ignore_index)
    d loss / d z_v = (exp(z_v - lse) - [v == t]) * dloss   (0 for padding and ignored rows)

Backward is a second pass over the logits writing the gradient (into a new tensor, or in place for
the fused linear + cross-entropy, which owns its logits). With no group this is the ordinary
single-device cross-entropy. Losses and statistics are fp32 whatever the logits' dtype.

Layout: kernels -> launchers -> autograd.Function -> ``vocab_parallel_cross_entropy_triton`` /
``cross_entropy_triton`` -> ``cross_entropy_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megafast.kernels._triton import tl, triton
from megafast.parallel.mappings import Group, group_rank, group_size

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _ce_stats_kernel(
    LOGITS, TARGET, MAX, SUMEXP, TLOGIT, stride, n_valid, start, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m = -1e30  # finite: a shard that is all padding gives m = -1e30, s = 0 and drops out of the combine
    s = 0.0
    for off in range(0, n_valid, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    t = tl.load(TARGET + row)
    local = t - start
    on_shard = (t != ignore_index) & (local >= 0) & (local < n_valid)
    zt = tl.load(base + tl.where(on_shard, local, 0), mask=on_shard, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TLOGIT + row, zt)


@triton.jit
def _ce_grad_kernel(
    LOGITS, DLOGITS, TARGET, LSE, GRAD, stride_l, stride_d, n_cols, n_valid, start, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(LSE + row)
    g = tl.load(GRAD + row)  # d loss_row, already 0 for ignored rows
    local = tl.load(TARGET + row) - start  # off this shard (or ignored: -100 - start < 0): never matches
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.where(cols < n_valid, tl.exp(z - lse), 0.0)
        p = tl.where(cols == local, p - 1.0, p)
        tl.store(DLOGITS + row * stride_d + cols, (p * g).to(DLOGITS.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers


def ce_block(n_cols: int, is_cuda: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) for a pass over rows of ``n_cols`` logits in chunks of BLOCK columns."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), 8192 if is_cuda else 1024)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def shard_columns(n_cols: int, group: Group, vocab_size: Optional[int]) -> tuple[int, int]:
    """(first global column of this rank's shard, number of its columns below ``vocab_size``)."""
    start = group_rank(group) * n_cols
    valid = n_cols if vocab_size is None else min(max(vocab_size - start, 0), n_cols)
    return start, valid


def ce_stats(logits2: torch.Tensor, target1: torch.Tensor, start: int, n_valid: int, ignore_index: int):
    """Per-row (max, sum of exp(z - max), target logit or 0), each [rows] fp32, of one shard."""
    rows = logits2.shape[0]
    out = [torch.empty(rows, dtype=torch.float32, device=logits2.device) for _ in range(3)]
    block, warps = ce_block(logits2.shape[1], logits2.is_cuda)
    if rows:
        _ce_stats_kernel[(rows,)](
            logits2,
            target1,
            *out,
            logits2.stride(0),
            n_valid,
            start,
            ignore_index,
            BLOCK=block,
            num_warps=warps,
        )
    return out


def combine_stats(m, s, zt, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, target logit) over the whole vocabulary from every rank's shard statistics."""
    if group_size(group) > 1:
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([s * torch.exp(m - big_m), zt])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        m, (s, zt) = big_m, both
    return m + torch.log(s), zt


def ce_grad(logits2, target1, lse, grad_rows, start: int, n_valid: int, out: Optional[torch.Tensor] = None):
    """d loss / d logits of one shard, [rows, V/p] in the logits' dtype (``out`` may be ``logits2``)."""
    rows, n_cols = logits2.shape
    dlogits = torch.empty_like(logits2) if out is None else out
    block, warps = ce_block(n_cols, logits2.is_cuda)
    if rows:
        _ce_grad_kernel[(rows,)](
            logits2,
            dlogits,
            target1,
            lse,
            grad_rows,
            logits2.stride(0),
            dlogits.stride(0),
            n_cols,
            n_valid,
            start,
            BLOCK=block,
            num_warps=warps,
        )
    return dlogits


def _rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    return logits2, target.reshape(-1).contiguous()


# --------------------------------------------------------------------------------- autograd.Function


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index):
        logits2, target1 = _rows(logits, target)
        start, n_valid = shard_columns(logits2.shape[1], group, vocab_size)
        m, s, zt = ce_stats(logits2, target1, start, n_valid, ignore_index)
        lse, zt = combine_stats(m, s, zt, group)
        ignored = target1 == ignore_index
        loss = torch.where(ignored, 0.0, lse - zt)
        ctx.meta = (start, n_valid, logits.shape)
        ctx.save_for_backward(logits2, target1, lse, ignored)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, dloss):
        logits2, target1, lse, ignored = ctx.saved_tensors
        start, n_valid, shape = ctx.meta
        grad_rows = torch.where(ignored, 0.0, dloss.reshape(-1).float()).contiguous()
        return ce_grad(logits2, target1, lse, grad_rows, start, n_valid).view(shape), None, None, None, None


def vocab_parallel_cross_entropy_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: Group = None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss (fp32, target's shape) of vocabulary-parallel ``logits`` [..., V/p].

    Same contract as :func:`megafast.parallel.vocab_parallel_cross_entropy`: ``vocab_size`` is the
    unpadded vocabulary (padded columns are excluded); ``ignore_index`` targets give 0 and no gradient.
    """
    return VocabParallelCrossEntropyFunction.apply(logits, target, tp_group, vocab_size, ignore_index)


def cross_entropy_triton(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Per-token loss of full-vocabulary ``logits`` [..., V] on one device."""
    return VocabParallelCrossEntropyFunction.apply(logits, target, None, vocab_size, ignore_index)


# ------------------------------------------------------------------------------------------ torch


def cross_entropy_torch(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Plain torch per-token loss over full logits [..., V], fp32 (float64 stays float64)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    if vocab_size is not None and vocab_size < z.shape[-1]:
        padded = torch.arange(z.shape[-1], device=z.device) >= vocab_size
        z = z.masked_fill(padded, float("-inf"))
    ignored = target == ignore_index
    zt = z.gather(-1, target.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(z, dim=-1) - zt).masked_fill(ignored, 0.0)
