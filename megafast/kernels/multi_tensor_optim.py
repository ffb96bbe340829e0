"""Multi-tensor fused AdamW and Lion steps (csrc/cuda/multi_tensor_optim.cu), what apex's
multi-tensor Adam gave, without apex.

One launch per parameter group updates every fp32 master weight and its fp32 states in place,
multiplies the gradients by ``grad_scale`` on the fly (fp16 unscaling and global-norm clipping
folded into the update instead of a separate pass) and writes the bf16/fp16 model weights in the
same pass (instead of a separate copy after the step). Maths (torch.optim.AdamW's and megafast's Lion):

    AdamW: p <- p (1 - lr wd);  m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2
           p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    Lion:  c = b1 m + (1 - b1) g;  p <- p - lr (sign(c) + wd p);  m <- b2 m + (1 - b2) g

Layout: launchers (``multi_tensor_adamw_``, ``multi_tensor_lion_``) -> ``*_torch`` (plain torch,
the same maths tensor by tensor; used by the GPU tests).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from megafast.kernels.cuda_ext import current_stream, require_cuda_extension

CHUNK_SIZE = 65536  # elements per CUDA block

# -------------------------------------------------------------------------------------- launchers


def multi_tensor_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    model_params: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step (``step`` >= 1, already incremented) over fp32 CUDA tensors, in place."""
    if not params:
        return
    ext = require_cuda_extension("the multi-tensor AdamW step")
    device = params[0].device
    with torch.cuda.device(device):
        ext.multi_tensor_adamw(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            list(model_params),
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            1.0 - beta1**step,
            math.sqrt(1.0 - beta2**step),
            grad_scale,
            CHUNK_SIZE,
            current_stream(device),
        )


def multi_tensor_lion_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    model_params: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    grad_scale: float = 1.0,
) -> None:
    """One Lion step over fp32 CUDA tensors, in place."""
    if not params:
        return
    ext = require_cuda_extension("the multi-tensor Lion step")
    device = params[0].device
    with torch.cuda.device(device):
        ext.multi_tensor_lion(
            list(params),
            list(grads),
            list(exp_avgs),
            list(model_params),
            lr,
            beta1,
            beta2,
            weight_decay,
            grad_scale,
            CHUNK_SIZE,
            current_stream(device),
        )


# -------------------------------------------------------------------------------------- reference


@torch.no_grad()
def multi_tensor_adamw_torch(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    model_params,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale=1.0,
) -> None:
    """Plain torch, tensor by tensor, the same maths (any device and float dtype)."""
    bc1, bc2_sqrt = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    for p, g, m, v, w in zip(params, grads, exp_avgs, exp_avg_sqs, model_params):
        g = g.to(p.dtype) * grad_scale
        p.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.addcdiv_(m, v.sqrt() / bc2_sqrt + eps, value=-lr / bc1)
        if w is not None:
            w.copy_(p)


@torch.no_grad()
def multi_tensor_lion_torch(
    params, grads, exp_avgs, model_params, *, lr, beta1, beta2, weight_decay, grad_scale=1.0
) -> None:
    """Plain torch, tensor by tensor, the same maths as ``megafast.training.optimizer.Lion``."""
    for p, g, m, w in zip(params, grads, exp_avgs, model_params):
        g = g.to(p.dtype) * grad_scale
        update = (m * beta1).add_(g, alpha=1.0 - beta1).sign_()
        p.add_(update.add_(p, alpha=weight_decay), alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        if w is not None:
            w.copy_(p)
