"""Multi-task loss weighting and per-task loss accounting for fine-tuning (``--task-loss-weighting``).

With T tasks present in a global batch, n_t answer tokens of task t (all DP ranks together) and
token losses l_i:

- ``none``: L = sum_i l_i / sum_t n_t, every answer token counts the same (large tasks dominate);
- ``equal`` (MFTCoder-style balancing): L = (1/T) * sum_t (sum_{i in t} l_i / n_t), every task's
  mean loss counts the same, however many tokens it has.

``equal`` is folded into the per-token loss mask, w_i = 1 / (n_{t(i)} * T), with the pipeline
engine's denominator set to 1: the engine's usual sum(mask * loss) / denominator then is L, on
every layout. Per-task mean losses (sum_{i in t} l_i / n_t, unweighted) are logged for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megafast.pipeline.engine import Microbatch

WEIGHTINGS = ("none", "equal")


def task_token_counts(microbatches: Sequence[Microbatch], num_tasks: int) -> torch.Tensor:
    """fp64 [num_tasks]: answer tokens (loss mask > 0) of each task in these microbatches."""
    counts = torch.zeros(num_tasks, dtype=torch.float64)
    for mb in microbatches:
        if mb.task_ids is None:
            raise ValueError("per-task losses need task ids: train on --dataset-type sft data")
        valid = mb.loss_mask > 0
        counts += torch.bincount(mb.task_ids[valid].cpu(), minlength=num_tasks)[:num_tasks].double()
    return counts


def apply_equal_task_weighting(microbatches: Sequence[Microbatch], global_counts: torch.Tensor) -> None:
    """Scale every loss mask in place to w_i = 1 / (n_{t(i)} * T) (module docstring).

    ``global_counts`` fp64 [num_tasks]: answer tokens per task over the whole global batch.
    """
    present = global_counts > 0
    num_present = int(present.sum())
    weights = torch.where(present, 1.0 / (global_counts.clamp_min(1.0) * max(num_present, 1)), 0.0)
    for mb in microbatches:
        w = weights.to(mb.loss_mask.device)[mb.task_ids]  # [b, s]
        mb.loss_mask = (mb.loss_mask * w).to(mb.loss_mask.dtype)


@dataclass
class TaskLossMeter:
    """Per-task loss sums and token counts over a logging interval."""

    names: list[str]
    sums: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, loss_sums: torch.Tensor, counts: torch.Tensor) -> None:
        """One iteration's DP-summed per-task token-loss sums and answer-token counts."""
        self.sums += loss_sums.cpu().double()
        self.counts += counts.cpu().double()

    def means(self) -> dict[str, float]:
        """Token-weighted mean loss of each task seen in the interval, by name."""
        return {n: (self.sums[i] / self.counts[i]).item() for i, n in enumerate(self.names) if self.counts[i] > 0}


__all__ = ["WEIGHTINGS", "TaskLossMeter", "apply_equal_task_weighting", "task_token_counts"]
