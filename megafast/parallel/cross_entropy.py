"""Cross-entropy over vocabulary-parallel logits, without gathering the [.., V] logits.

Rank i holds logits z[..., i*V/p:(i+1)*V/p]. With m = max_v z (all-reduce MAX) and
S = sum_v exp(z_v - m) (all-reduce SUM), and z_t the target's logit (found on exactly one rank,
all-reduce SUM of the masked pick):

    loss = log S - (z_t - m)
    d loss / d z_v = softmax(z)_v - [v == t]

Columns at or beyond ``vocab_size`` (vocabulary padding) are excluded from the softmax, so the loss
does not depend on how much padding the TP size needs. Targets equal to ``ignore_index`` get loss 0
and no gradient. With ``inplace=True`` the caller hands the logits buffer over: z - m, exp and the
softmax saved for backward are computed in it (no second [..., V/p] tensor; the output head's logits
are a temporary that nothing else reads).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megafast.parallel.mappings import Group, group_rank, group_size


def _all_reduce_(x: torch.Tensor, op: dist.ReduceOp, group: Group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, inplace):
        # logits [..., V/p], target [...]
        owned = inplace and logits.dtype == torch.float32  # else .float() below makes a new tensor
        logits = logits.float()
        per_rank = logits.shape[-1]
        start = group_rank(group) * per_rank
        if vocab_size is not None and start + per_rank > vocab_size:
            if not owned:
                logits, owned = logits.clone(), True
            logits[..., max(vocab_size - start, 0):] = float("-inf")

        logits_max = logits.amax(dim=-1)
        _all_reduce_(logits_max, dist.ReduceOp.MAX, group)
        # z - m, [..., V/p]
        shifted = logits.sub_(logits_max.unsqueeze(-1)) if owned else logits - logits_max.unsqueeze(-1)

        ignored = target == ignore_index
        local_target = target - start
        off_shard = (local_target < 0) | (local_target >= per_rank) | ignored
        local_target = local_target.masked_fill(off_shard, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(off_shard, 0.0)
        _all_reduce_(target_logit, dist.ReduceOp.SUM, group)

        exp = shifted.exp_()  # reuse the buffer: exp(z - m)
        sum_exp = exp.sum(dim=-1)
        _all_reduce_(sum_exp, dist.ReduceOp.SUM, group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, off_shard, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, off_shard, ignored = ctx.saved_tensors
        grad = softmax  # consumed: backward runs once
        one_hot = (~off_shard).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot.unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: Group,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-token loss (fp32, same shape as ``target``) of vocabulary-parallel ``logits``.

    ``vocab_size``: the true vocabulary; padded columns beyond it are excluded. Multiply by a loss
    mask and reduce (e.g. mean over unmasked tokens) outside. ``inplace``: fp32 ``logits`` are
    overwritten (the caller must not read them afterwards).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size, ignore_index, inplace)
