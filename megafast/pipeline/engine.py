"""Runs a pipeline schedule (megafast.pipeline.schedules) on this rank's model chunks.

Loss accounting is Megatron's per-token one: the step's loss is

    L = sum over the global batch of loss_mask * token_loss  /  number of unmasked tokens

so each microbatch's backward is seeded with ``sum(mask * token_loss) * loss_scale / denominator``
(``denominator`` = unmasked tokens of the whole global batch, all DP ranks included), and DP
gradients are then summed, not averaged. Activations of a microbatch are dropped as soon as its
backward has run. ``loss_mask`` may hold per-token weights (multi-task weighting folds them in).

Packed microbatches carry ``segment_ids`` (several samples per row, attention confined to each,
see megafast.model.packing); their ``position_ids`` reach every stage. With ``task_ids`` and
``num_tasks``, the last stage also sums the token losses of each task (for per-task logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from megafast.model.packing import PackedSeqParams
from megafast.parallel.state import ParallelState
from megafast.pipeline import p2p
from megafast.pipeline.schedules import (
    BACKWARD,
    FORWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    Action,
    build_schedule,
    comm_ops,
    schedule_name,
)


@dataclass
class Microbatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float
    position_ids: Optional[torch.Tensor] = None  # [b, s]; default 0..s-1
    segment_ids: Optional[torch.Tensor] = None  # [b, s] packed samples of a row; None: one sequence per row
    task_ids: Optional[torch.Tensor] = None  # [b, s] task of each token's sample (per-task loss logging)


@dataclass
class StepLoss:
    loss_sum: torch.Tensor  # fp64 sum of mask * token_loss over this rank's microbatches (last stage)
    num_tokens: torch.Tensor  # fp64 count of unmasked tokens in this rank's microbatches
    task_loss_sums: Optional[torch.Tensor] = None  # fp64 [num_tasks]: unweighted token-loss sums per task


def _scaled(loss: torch.Tensor, scale) -> torch.Tensor:
    """``loss * scale`` with the same rounding as for a Python float ``scale`` (computed in the
    loss's op-math dtype, fp32 for fp32/bf16/fp16 losses, then rounded to the loss dtype) when
    ``scale`` is a 0-dim tensor on the device."""
    if not isinstance(scale, torch.Tensor):
        return loss * scale
    factor = scale.to(torch.promote_types(loss.dtype, torch.float32))
    return (loss * factor).to(loss.dtype)


class PipelineEngine:
    """Executes forward/backward of every microbatch of one global-batch step on this rank.

    ``chunks``: this rank's model chunks (one, or ``v`` virtual stages for interleaving; chunk c
    is virtual stage ``c * pp + pp_rank``). ``activation_shape`` is the [s, b, h] (or
    [s/tp, b, h] with sequence parallelism) tensor passed between stages.
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        state: ParallelState,
        activation_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        pipeline_schedule: str = "1f1b",
    ) -> None:
        self.chunks = list(chunks)
        self.state = state
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = device
        self.schedule = schedule_name(state.pp_size, len(self.chunks), pipeline_schedule)
        last = len(self.chunks) - 1
        self.first_virtual = [state.is_first_stage and c == 0 for c in range(len(self.chunks))]
        self.last_virtual = [state.is_last_stage and c == last for c in range(len(self.chunks))]

    def run(
        self,
        microbatches: Sequence[Microbatch],
        denominator: Union[float, torch.Tensor],
        loss_scale: float = 1.0,
        forward_only: bool = False,
        before_last_backward: Optional[Callable[[int], None]] = None,
        num_tasks: int = 0,
    ) -> StepLoss:
        """Forward (and unless ``forward_only``, backward) of all microbatches.

        ``before_last_backward(chunk)`` is called right before the last backward of each chunk
        (data parallelism starts its gradient reduction there, overlapping the rest).
        ``num_tasks`` > 0: also sum the token losses of each task id (microbatches with ``task_ids``).
        ``denominator`` may be a 0-dim fp64 tensor on the device (the trainer's, so that nothing
        waits for the host); the returned sums stay on the device too.
        """
        state, M = self.state, len(microbatches)
        steps = build_schedule(self.schedule, state.pp_size, state.pp_rank, M, len(self.chunks))
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # received activations (need their grads)
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # what backward starts from
        grads: dict[tuple[int, int], torch.Tensor] = {}  # received gradients of outputs
        pending: dict[Action, torch.Tensor] = {}  # tensors waiting for their send op
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        num_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in microbatches:
            num_tokens += mb.loss_mask.sum(dtype=torch.float64)
        task_sums = torch.zeros(num_tasks, dtype=torch.float64, device=self.device) if num_tasks else None
        scale = loss_scale / denominator  # a float, or a 0-dim fp64 tensor
        if not forward_only:  # MoE router losses: mean over micro-batches and DP ranks (model.moe.aux_loss)
            for chunk in self.chunks:
                if getattr(chunk, "moe_loss_tracker", None) is not None:
                    chunk.moe_loss_tracker.backward_scale = loss_scale / (M * state.dp_size)

        for step in steps:
            ops = comm_ops(step)
            if ops:
                received = p2p.exchange(ops, state, pending.pop, self._buffer)
                for op, tensor in received.items():
                    key = (op.microbatch, op.chunk)
                    if op.kind == RECV_FORWARD:
                        inputs[key] = tensor.requires_grad_(not forward_only)
                    elif not forward_only:
                        grads[key] = tensor
                continue
            i, c = step.microbatch, step.chunk
            if step.kind == FORWARD:
                out = self._forward(microbatches[i], c, inputs.get((i, c)), forward_only)
                if self.last_virtual[c]:
                    loss = (out * microbatches[i].loss_mask).sum()
                    loss_sum += loss.detach().double()
                    if task_sums is not None and microbatches[i].task_ids is not None:
                        valid = microbatches[i].loss_mask > 0
                        task_sums += torch.bincount(microbatches[i].task_ids[valid], out.detach()[valid].double(),
                                                    minlength=num_tasks)[:num_tasks]
                    if not forward_only:
                        outputs[(i, c)] = _scaled(loss, scale)
                else:
                    pending[Action(SEND_FORWARD, i, c)] = out.detach()
                    if not forward_only:
                        outputs[(i, c)] = out
            elif step.kind == BACKWARD and not forward_only:
                if before_last_backward is not None and i == M - 1:
                    before_last_backward(c)
                out = outputs.pop((i, c))
                torch.autograd.backward(out, None if self.last_virtual[c] else grads.pop((i, c)))
                x = inputs.pop((i, c), None)
                if not self.first_virtual[c]:
                    pending[Action(SEND_BACKWARD, i, c)] = x.grad
            elif step.kind == BACKWARD:  # forward-only run of a training schedule: ship zeros
                inputs.pop((i, c), None)
                if not self.first_virtual[c]:
                    pending[Action(SEND_BACKWARD, i, c)] = self._buffer(step)
        assert not outputs and not pending, "schedule left work undone"
        return StepLoss(loss_sum, num_tokens, task_sums)

    def _forward(self, mb: Microbatch, chunk: int, x: Optional[torch.Tensor], forward_only: bool) -> torch.Tensor:
        model = self.chunks[chunk]
        labels = mb.labels if self.last_virtual[chunk] else None
        extra = {}  # only what the microbatch has, so models without packing support still run
        if not self.first_virtual[chunk] and mb.position_ids is not None:
            extra["position_ids"] = mb.position_ids
        if mb.segment_ids is not None:
            extra["packed_seq_params"] = PackedSeqParams(mb.segment_ids)
        with torch.set_grad_enabled(not forward_only):
            if self.first_virtual[chunk]:
                return model(mb.tokens, position_ids=mb.position_ids, labels=labels, **extra)
            return model(hidden_states=x, labels=labels, **extra)

    def _buffer(self, op: Action) -> torch.Tensor:
        return torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)


__all__ = ["Microbatch", "PipelineEngine", "StepLoss"]
