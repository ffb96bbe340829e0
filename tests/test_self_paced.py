"""``--task-loss-weighting self-paced`` (MFTCoder's self-paced loss, megafast.training.task_loss):
the slopes of the per-task validation-loss windows, the weights, and the weighted loss of a fixed
two-task batch, against numbers computed by hand here.

Hand computation (scale factor c = 2, window of H = 4 samples):

    task 0 window 0, 3.0, 2.5, 2.0  -> the 0 (task absent) is skipped: points (1, 3.0), (2, 2.5), (3, 2.0)
                                       slope s0 = -0.5
    task 1 window 1.0, 0.9, 0.8, 0.7 -> slope s1 = -0.1
    S = |s0| + |s1| = 0.6;  n = 2 s / S = (-5/3, -1/3)
    softmax(n) = (e^(-5/3), e^(-1/3)) / (e^(-5/3) + e^(-1/3)) = (0.2086085273, 0.7913914727)
    score = softmax(n) * (-n) = (0.3476808789, 0.2637971576)
    w = softmax(2 score) = (0.5418437624, 0.4581562376)

Batch: task 0's answer-token losses 2, 3, 0.5 (mean 11/6), task 1's 4, 1, 6 (mean 11/3):
    L = (w0 * 11/6 + w1 * 11/3) / (w0 + w1) = 2.6732864356
"""

from __future__ import annotations

import math

import pytest
import torch

from megafast.pipeline.engine import Microbatch
from megafast.training.task_loss import (
    SelfPacedWeights,
    apply_equal_task_weighting,
    apply_task_weights,
    self_paced_weights,
    task_token_counts,
    window_slope,
)

W = (0.5418437624201767, 0.45815623757982327)  # hand computation above, to 1e-12


def test_window_slope_skips_absent_samples():
    assert window_slope(torch.tensor([0.0, 3.0, 2.5, 2.0], dtype=torch.float64)) == pytest.approx(-0.5, abs=1e-12)
    assert window_slope(torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)) == pytest.approx(-0.1, abs=1e-12)
    assert window_slope(torch.tensor([0.0, 0.0, 4.0, 0.0], dtype=torch.float64)) == 0.0  # fewer than two points
    assert window_slope(torch.tensor([2.0, 0.0, 0.0, 5.0], dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)  # (0, 2), (3, 5)


def test_weights_equal_the_hand_computation():
    # the formula, step by step with math (no torch), as in the module docstring
    n = (2 * -0.5 / 0.6, 2 * -0.1 / 0.6)
    p = [math.exp(x) / (math.exp(n[0]) + math.exp(n[1])) for x in n]
    score = [p[0] * -n[0], p[1] * -n[1]]
    w = [math.exp(2 * s) / (math.exp(2 * score[0]) + math.exp(2 * score[1])) for s in score]
    assert w == pytest.approx(W, abs=1e-12)
    got = self_paced_weights(torch.tensor([-0.5, -0.1], dtype=torch.float64), scale_factor=2.0)
    assert got.tolist() == pytest.approx(W, abs=1e-12)
    assert self_paced_weights(torch.zeros(3), 50.0).tolist() == pytest.approx([1 / 3] * 3)  # no slope: equal


def test_history_window_and_update():
    sp = SelfPacedWeights(num_tasks=2, history_length=4, scale_factor=2.0)
    assert sp.weights.tolist() == [0.5, 0.5]  # equal until the first update
    for v0, v1 in ((9.0, 9.0), (0.0, 1.0), (3.0, 0.9), (2.5, 0.8), (2.0, 0.7)):  # the first row slides out
        sp.add(torch.tensor([v0, v1], dtype=torch.float64))
    assert sp.history.tolist() == [[0.0, 1.0], [3.0, 0.9], [2.5, 0.8], [2.0, 0.7]]
    assert sp.update().tolist() == pytest.approx(W, abs=1e-12)


def two_task_batch() -> tuple[Microbatch, torch.Tensor]:
    losses = torch.tensor([[1.0, 2.0, 3.0, 0.5], [4.0, 1.0, 2.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    tasks = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    tokens = torch.zeros(2, 4, dtype=torch.long)
    return Microbatch(tokens, tokens, mask, task_ids=tasks), losses


def test_weighted_loss_of_a_two_task_batch():
    mb, losses = two_task_batch()
    counts = task_token_counts([mb], 2)
    assert counts.tolist() == [3.0, 3.0]
    apply_task_weights([mb], counts, torch.tensor(W, dtype=torch.float64))
    loss = float((mb.loss_mask.double() * losses).sum())  # the engine's sum(mask * loss) / 1
    assert loss == pytest.approx(2.6732864355630093, rel=1e-6)  # fp32 loss mask
    assert loss == pytest.approx(W[0] * 11 / 6 + W[1] * 11 / 3, rel=1e-6)


def test_absent_task_and_equal_weights():
    """Only the tasks present in the batch share the weight; w = (1, 1) is the ``equal`` weighting."""
    mb, losses = two_task_batch()
    counts = torch.tensor([3.0, 3.0, 0.0])  # a third task, absent from this batch
    apply_task_weights([mb], counts, torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64))
    assert float((mb.loss_mask.double() * losses).sum()) == pytest.approx((11 / 6 + 11 / 3) / 2, rel=1e-6)
    mb2, _ = two_task_batch()
    apply_equal_task_weighting([mb2], counts)
    assert torch.allclose(mb.loss_mask, mb2.loss_mask)
