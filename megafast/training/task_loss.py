"""Multi-task loss weighting and per-task loss accounting for fine-tuning (``--task-loss-weighting``).

With T tasks present in a global batch, n_t answer tokens of task t (all DP ranks together) and
token losses l_i:

- ``none``: L = sum_i l_i / sum_t n_t, every answer token counts the same (large tasks dominate);
- ``equal`` (MFTCoder-style balancing): L = (1/T) * sum_t (sum_{i in t} l_i / n_t), every task's
  mean loss counts the same, however many tokens it has.

- ``self-paced`` (MFTCoder's self-paced loss, ``weighted_loss_mode="selfpaced"``): task weights
  w_t move the balance towards the tasks whose validation loss falls slowest,
  L = sum_{t present} w_t * (sum_{i in t} l_i / n_t) / sum_{t present} w_t.

``equal`` is folded into the per-token loss mask, w_i = 1 / (n_{t(i)} * T), with the pipeline
engine's denominator set to 1: the engine's usual sum(mask * loss) / denominator then is L, on
every layout; ``self-paced`` likewise, w_i = w_{t(i)} / (n_{t(i)} * sum_{t present} w_t). Per-task
mean losses (sum_{i in t} l_i / n_t, unweighted) are logged for all.

Self-paced weights (:class:`SelfPacedWeights`), as MFTCoder computes them: every ``interval``
steps one validation global batch is run and each task's mean validation loss v_t appended to a
window of the last H values per task (the window starts as zeros; a task absent from a sample
gets 0). From step H on, every ``interval`` steps, with all K tasks of the run:

    s_t = least-squares slope of task t's non-zero window values against their positions
          (0 when fewer than two); S = sum_t |s_t|
    if S == 0: w_t = 1 / K
    else:      n_t = K * s_t / S;   score_t = softmax(n)_t * (-n_t);   w = softmax(c * score)

with c the scale factor (MFTCoder's default 50); before step H the weights are equal. A task
whose validation loss still falls fast (very negative s_t) gets a larger score, hence more
weight; a converged or diverging task (s_t >= 0) less. MFTCoder averages each rank's per-task
means; here v_t is the token mean over the whole sampled global batch (all DP ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megafast.pipeline.engine import Microbatch

WEIGHTINGS = ("none", "equal", "self-paced")


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


def apply_task_weights(microbatches: Sequence[Microbatch], global_counts: torch.Tensor,
                       task_weights: torch.Tensor) -> None:
    """Scale every loss mask in place to w_i = w_{t(i)} / (n_{t(i)} * sum_{t present} w_t).

    ``global_counts`` fp64 [num_tasks]: answer tokens per task over the global batch;
    ``task_weights`` [num_tasks]: w_t (only the present tasks' weights matter).
    """
    present = global_counts > 0
    w = task_weights.double().cpu()
    total = float((w * present).sum())
    weights = torch.where(present, w / (global_counts.clamp_min(1.0) * max(total, 1e-300)), 0.0)
    for mb in microbatches:
        mb.loss_mask = (mb.loss_mask * weights.to(mb.loss_mask.device)[mb.task_ids]).to(mb.loss_mask.dtype)


def window_slope(values: torch.Tensor) -> float:
    """Least-squares slope of the non-zero entries of ``values`` against their positions (0 when
    fewer than two), MFTCoder's ``fit_window_point(method="slope")`` with unit weights."""
    values = values.double()
    x = torch.nonzero(values).flatten().double()
    if len(x) < 2:
        return 0.0
    y = values[values != 0]
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def self_paced_weights(slopes: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """w = softmax(c * softmax(n) * (-n)), n = K * s / sum|s| (equal weights when all s are 0)."""
    slopes = slopes.double()
    k = len(slopes)
    total = float(slopes.abs().sum())
    if total == 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    n = k * slopes / total
    score = torch.softmax(n, dim=-1) * (-n)
    return torch.softmax(scale_factor * score, dim=-1)


@dataclass
class SelfPacedWeights:
    """Validation-loss history and task weights of ``--task-loss-weighting self-paced`` (module doc)."""

    num_tasks: int
    history_length: int = 100
    scale_factor: float = 50.0
    history: torch.Tensor = field(init=False)  # fp64 [H, num_tasks], oldest first
    weights: torch.Tensor = field(init=False)  # fp64 [num_tasks], the current w_t

    def __post_init__(self) -> None:
        self.history = torch.zeros(self.history_length, self.num_tasks, dtype=torch.float64)
        self.weights = torch.full((self.num_tasks,), 1.0 / max(self.num_tasks, 1), dtype=torch.float64)

    def add(self, valid_task_losses: torch.Tensor) -> None:
        """Append one sample of the per-task mean validation losses (0 for an absent task)."""
        row = valid_task_losses.detach().double().cpu().reshape(1, self.num_tasks)
        self.history = torch.cat([self.history, row])[-self.history_length:]

    def update(self) -> torch.Tensor:
        """Recompute w from the window's slopes (call from step H on, every interval steps)."""
        slopes = torch.tensor([window_slope(self.history[:, t]) for t in range(self.num_tasks)],
                              dtype=torch.float64)
        self.weights = self_paced_weights(slopes, self.scale_factor)
        return self.weights


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


__all__ = ["WEIGHTINGS", "SelfPacedWeights", "TaskLossMeter", "apply_equal_task_weighting", "apply_task_weights",
           "self_paced_weights", "task_token_counts", "window_slope"]
