"""How the MoE router's auxiliary losses reach the gradients and the log.

The load-balancing and z losses are not part of the layer's output. As in Megatron-core
(``MoEAuxLossAutoScaler``), each is attached to the routing weights by an autograd function that
is the identity forward and, in backward, gives the loss the gradient ``backward_scale``. So a
pipeline stage's losses reach its own parameters without travelling to the last stage, and the
trained objective is

    lm_loss + sum over MoE layers of (mean over micro-batches and DP ranks of each attached loss)

for which the pipeline engine sets ``backward_scale = loss_scale / (micro-batches * DP size)``
before each step (DP gradients are summed, the LM loss being normalised by the global token
count). One :class:`MoELossTracker` per model chunk (no module globals) holds that scale and the
losses' values, summed on the device for logging, and, per MoE layer, how many token choices each
expert received (after any capacity drop), for the log's tokens-per-expert figures.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from megafast.config import GPTConfig

Scale = Union[float, torch.Tensor]


class MoELossTracker:
    """The aux losses' gradient scale and their running sums (name -> fp64 device tensor)."""

    def __init__(self) -> None:
        self.backward_scale: Scale = 1.0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # records per name (MoE layers x micro-batches on this chunk)
        self.tokens_per_expert: dict[int, torch.Tensor] = {}  # layer number -> [E] int64 (device)

    def record(self, name: str, layer_number: int, loss: torch.Tensor) -> None:
        """Add one layer's loss value (not when autograd reruns a forward for activation recompute)."""
        if torch._C._current_graph_task_id() != -1:  # inside backward: a recompute, already recorded
            return
        value = loss.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def record_tokens(self, layer_number: int, indices: torch.Tensor, num_experts: int) -> None:
        """Add the routed choices of one forward, ``indices`` [T, k] (-1: dropped), as counts per expert
        (on the device, no host synchronisation; not again when a recompute reruns the forward)."""
        if torch._C._current_graph_task_id() != -1:
            return
        counts = torch.bincount((indices.detach() + 1).flatten(), minlength=num_experts + 1)[1:]  # [E]
        seen = self.tokens_per_expert.get(layer_number)
        self.tokens_per_expert[layer_number] = counts if seen is None else seen + counts

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.tokens_per_expert.clear()


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, tracker: Optional[MoELossTracker]) -> torch.Tensor:
        ctx.tracker = tracker
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        scale = 1.0 if ctx.tracker is None else ctx.tracker.backward_scale
        if isinstance(scale, torch.Tensor):
            loss_grad = scale.to(device=loss.device, dtype=loss.dtype).expand_as(loss).clone()
        else:
            loss_grad = torch.full_like(loss, scale)
        return grad, loss_grad, None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, tracker: Optional[MoELossTracker]) -> torch.Tensor:
    """``x`` unchanged; backward also differentiates ``loss`` with gradient ``tracker.backward_scale``
    (1 without a tracker)."""
    return _AttachLoss.apply(x, loss, tracker)


def loss_names(config: GPTConfig) -> tuple[str, ...]:
    """The losses the router of ``config`` attaches (and the log shows), in order."""
    names = []
    if config.is_moe and config.moe_router_load_balancing_type != "none" and config.moe_aux_loss_coeff > 0:
        names.append("load_balancing_loss")
    if config.is_moe and config.moe_z_loss_coeff:
        names.append("z_loss")
    return tuple(names)
