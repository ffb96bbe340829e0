"""Fused output projection + cross-entropy that never materialises the [tokens, V] logits.

    logits = x W^T  (x [N, h], W [V/p, h] this rank's vocabulary shard),  loss = CE(logits, target)

The N tokens are processed in chunks of C: each chunk's logits [C, V/p] are computed by one
matmul, reduced by the Triton cross-entropy kernels (``cross_entropy.py``: online softmax, padding
and ``ignore_index`` as ``megafast.parallel.cross_entropy``, statistics combined over TP with the
same all-reduces) and overwritten in place by their gradient, so peak extra memory is C x V/p
instead of N x V/p (x 2 with the fp32 softmax of the unfused path).

- ``reduction="none"`` (per-token loss, any upstream gradient): forward keeps only the fp32
  log-sum-exp per token; backward recomputes each chunk's logits (one extra matmul) and then
      dlogits_c = (softmax - onehot) * dloss_c,  dx_c = dlogits_c W,  dW += dlogits_c^T x_c
- ``reduction="sum"|"mean"`` (scalar loss): the gradients are computed during forward, as
  Liger-Kernel does (no recompute), and backward only scales them by the upstream scalar.

Under tensor parallelism dx is this rank's partial sum: feed x through
``copy_to_tensor_parallel_region`` (or the sequence-parallel gather) so backward all-reduces it,
exactly as the column-parallel output layer does. Gradients accumulate in W's dtype.

Layout: launcher (chunk loop) -> autograd.Function -> ``fused_linear_cross_entropy_triton`` ->
``fused_linear_cross_entropy_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megafast.kernels._triton import triton
from megafast.kernels.cross_entropy_kernel import (
    ce_grad,
    ce_stats,
    combine_stats,
    cross_entropy_torch,
    shard_columns,
)
from megafast.parallel.mappings import Group

REDUCTIONS = ("none", "sum", "mean")


def default_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's rule: chunks whose logits are about as large as x itself (a power of two)."""
    chunks = max(1, triton.cdiv(vocab, hidden))
    return min(triton.next_power_of_2(triton.cdiv(max(tokens, 1), chunks)), max(tokens, 1))


# ----------------------------------------------------------------------------------------- launcher


def _chunk_loss_and_grad(
    x2, weight, target1, group, vocab_size, ignore_index, chunk, grad_rows_fn, want_dx, want_dw
):
    """Chunked forward; when ``grad_rows_fn`` is given also the gradients (dx, dW) for it."""
    n = x2.shape[0]
    start, n_valid = shard_columns(weight.shape[0], group, vocab_size)
    loss = torch.empty(n, dtype=torch.float32, device=x2.device)
    lse = torch.empty(n, dtype=torch.float32, device=x2.device)
    dx = torch.empty_like(x2) if grad_rows_fn is not None and want_dx else None
    dw = torch.zeros_like(weight) if grad_rows_fn is not None and want_dw else None
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        xc, tc = x2[lo:hi], target1[lo:hi]
        logits = xc @ weight.t()  # [C, V/p]
        m, s, zt = ce_stats(logits, tc, start, n_valid, ignore_index)
        lse_c, zt = combine_stats(m, s, zt, group)
        lse[lo:hi] = lse_c
        loss[lo:hi] = torch.where(tc == ignore_index, 0.0, lse_c - zt)
        if grad_rows_fn is not None:
            dlogits = ce_grad(logits, tc, lse_c, grad_rows_fn(lo, hi), start, n_valid, out=logits)
            if dx is not None:
                torch.mm(dlogits, weight, out=dx[lo:hi])
            if dw is not None:
                dw.addmm_(dlogits.t(), xc)
    return loss, lse, dx, dw


def _recompute_grads(x2, weight, target1, lse, grad_rows, group, vocab_size, chunk, want_dx, want_dw):
    start, n_valid = shard_columns(weight.shape[0], group, vocab_size)
    dx = torch.empty_like(x2) if want_dx else None
    dw = torch.zeros_like(weight) if want_dw else None
    for lo in range(0, x2.shape[0], chunk):
        hi = min(lo + chunk, x2.shape[0])
        logits = x2[lo:hi] @ weight.t()
        dlogits = ce_grad(logits, target1[lo:hi], lse[lo:hi], grad_rows[lo:hi], start, n_valid, out=logits)
        if dx is not None:
            torch.mm(dlogits, weight, out=dx[lo:hi])
        if dw is not None:
            dw.addmm_(dlogits.t(), x2[lo:hi])
    return dx, dw


# --------------------------------------------------------------------------------- autograd.Function


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, group, vocab_size, ignore_index, reduction, chunk_size):
        if x.shape[:-1] != target.shape or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
            raise ValueError(
                f"fused linear cross-entropy needs x [..., h], weight [V, h], target [...]; got "
                f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}"
            )
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        target1 = target.reshape(-1).contiguous()
        chunk = chunk_size or default_chunk_size(x2.shape[0], weight.shape[0], x2.shape[1])
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ignored = target1 == ignore_index
        ctx.meta = (group, vocab_size, reduction, chunk, x.shape)
        if reduction == "none" or not (want_dx or want_dw):
            loss, lse, _, _ = _chunk_loss_and_grad(
                x2, weight, target1, group, vocab_size, ignore_index, chunk, None, False, False
            )
            ctx.save_for_backward(x2, weight, target1, lse, ignored)
        else:
            scale = 1.0 / (~ignored).sum().clamp_min(1).float() if reduction == "mean" else torch.ones(())
            grad_all = torch.where(ignored, 0.0, scale.to(x2.device))

            def grad_rows(lo, hi):
                return grad_all[lo:hi].contiguous()

            loss, _, dx, dw = _chunk_loss_and_grad(
                x2, weight, target1, group, vocab_size, ignore_index, chunk, grad_rows, want_dx, want_dw
            )
            ctx.save_for_backward(dx, dw)
        if reduction == "none":
            return loss.view(target.shape)
        total = loss.sum()
        return total / (~ignored).sum().clamp_min(1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, dloss):
        group, vocab_size, reduction, chunk, shape = ctx.meta
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if reduction == "none":
            x2, weight, target1, lse, ignored = ctx.saved_tensors
            grad_rows = torch.where(ignored, 0.0, dloss.reshape(-1).float()).contiguous()
            dx, dw = _recompute_grads(
                x2, weight, target1, lse, grad_rows, group, vocab_size, chunk, want_dx, want_dw
            )
        else:
            dx, dw = ctx.saved_tensors
            dx = dx.mul_(dloss.to(dx.dtype)) if want_dx else None  # consumed: backward runs once
            dw = dw.mul_(dloss.to(dw.dtype)) if want_dw else None
        return (dx.view(shape) if dx is not None else None), dw, None, None, None, None, None, None


def fused_linear_cross_entropy_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: Group = None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "none",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T`` (vocabulary-parallel ``weight`` [V/p, h]) without the full logits.

    ``reduction``: 'none' -> per-token fp32 loss of target's shape; 'sum'; 'mean' over non-ignored tokens.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return FusedLinearCrossEntropyFunction.apply(
        x, weight, target, tp_group, vocab_size, ignore_index, reduction, chunk_size
    )


# ------------------------------------------------------------------------------------------ torch


def fused_linear_cross_entropy_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "none",
) -> torch.Tensor:
    """Plain torch, unfused: full logits ``x @ weight.T`` then :func:`cross_entropy_torch`."""
    loss = cross_entropy_torch(x @ weight.t(), target, ignore_index, vocab_size)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum().clamp_min(1)
    return loss
