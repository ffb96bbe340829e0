"""The MoE figures of the training log: interval means of ``load_balancing_loss`` and ``z_loss``, and
the tokens each expert of each MoE layer received.

Each model chunk's :class:`~megafast.model.moe.aux_loss.MoELossTracker` sums the losses its MoE
layers attach (coefficients included) over the step's micro-batches; after each step the meter
moves those sums (and counts) into its own device accumulator, with no host synchronisation. At a
logging iteration :meth:`MoELossMeter.means` sums them over the pipeline stages and DP ranks (a
collective every rank calls) and returns, per loss, its mean over MoE layers, micro-batches, DP
ranks and the interval's iterations.

Tokens per expert: each router counts the (token, expert) choices its experts process (after any
capacity drop) per micro-batch; :meth:`MoELossMeter.tokens_per_expert` sums them over the
micro-batches, the pipeline stages (each holds its own layers) and the DP (x CP) ranks (each
routes its own tokens; TP ranks route the same tokens and are not summed), and divides by the
interval's iterations: per MoE layer, the global batch's choices routed to each expert per
iteration (they sum to tokens x top-k when nothing is dropped).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from megafast.config import GPTConfig
from megafast.model.moe.aux_loss import loss_names
from megafast.parallel.state import ParallelState


class MoELossMeter:
    def __init__(self, chunks: Sequence[nn.Module], config: GPTConfig, state: ParallelState, device) -> None:
        self.names = loss_names(config)
        self.trackers = [
            c.moe_loss_tracker for c in chunks if getattr(c, "moe_loss_tracker", None) is not None
        ]
        self.state = state
        self.totals = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)  # (sum, count)
        self.moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)] if config.is_moe else []
        # [num_layers, E] routed choices per expert over the interval (rows of other stages stay 0)
        self.tokens = torch.zeros(config.num_layers, config.num_experts or 0, dtype=torch.float64, device=device)
        self.steps = 0

    def after_step(self) -> None:
        """Move this step's tracked losses into the interval totals (and clear the trackers)."""
        for tracker in self.trackers:
            for i, name in enumerate(self.names):
                if name in tracker.sums:
                    self.totals[i, 0] += tracker.sums[name]
                    self.totals[i, 1] += tracker.counts[name]
            for layer, counts in tracker.tokens_per_expert.items():
                self.tokens[layer] += counts
            tracker.reset()
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Interval means over every stage and DP rank (every rank must call it), then reset."""
        if not self.names:
            return {}
        totals = self.totals.clone()
        for group in (self.state.pp_group, self.state.dp_group):
            if group is not None:
                dist.all_reduce(totals, group=group)
        self.totals.zero_()
        return {name: s / max(c, 1.0) for name, (s, c) in zip(self.names, totals.tolist())}

    def tokens_per_expert(self) -> dict[int, list[float]]:
        """MoE layer -> choices routed to each expert per iteration over the interval, summed over
        the stages and DP (x CP) ranks (every rank must call it), then reset."""
        if not self.moe_layers:
            return {}
        tokens = self.tokens.clone()
        data_group = self.state.dp_cp_group if self.state.cp_size > 1 else self.state.dp_group
        for group in (self.state.pp_group, data_group):
            if group is not None:
                dist.all_reduce(tokens, group=group)
        tokens /= max(self.steps, 1)
        self.tokens.zero_()
        self.steps = 0
        return {i: tokens[i].tolist() for i in self.moe_layers}
