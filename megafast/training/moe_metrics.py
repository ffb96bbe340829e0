"""The MoE router losses in the training log: interval means of ``load_balancing_loss`` and ``z_loss``.

Each model chunk's :class:`~megafast.model.moe.aux_loss.MoELossTracker` sums the losses its MoE
layers attach (coefficients included) over the step's micro-batches; after each step the meter
moves those sums (and counts) into its own device accumulator, with no host synchronisation. At a
logging iteration :meth:`MoELossMeter.means` sums them over the pipeline stages and DP ranks (a
collective every rank calls) and returns, per loss, its mean over MoE layers, micro-batches, DP
ranks and the interval's iterations.
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

    def after_step(self) -> None:
        """Move this step's tracked losses into the interval totals (and clear the trackers)."""
        for tracker in self.trackers:
            for i, name in enumerate(self.names):
                if name in tracker.sums:
                    self.totals[i, 0] += tracker.sums[name]
                    self.totals[i, 1] += tracker.counts[name]
            tracker.reset()

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
