"""LRScheduler equals megatron-core's OptimizerParamScheduler for every decay style (and WSD
variant) at many steps; hand-computed values pin the formulas when megatron-core is missing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from megafast.training.lr_schedule import LRScheduler, megatron_schedule_steps

STEPS = [0, 1, 5, 9, 10, 11, 37, 50, 63, 64, 77, 99, 100, 101, 250]
CASES = [
    dict(decay_style="constant"),
    dict(decay_style="linear"),
    dict(decay_style="cosine"),
    dict(decay_style="inverse-square-root"),
    dict(decay_style="WSD", wsd_decay_steps=36, wsd_decay_style="linear"),
    dict(decay_style="WSD", wsd_decay_steps=36, wsd_decay_style="cosine"),
    dict(decay_style="WSD", wsd_decay_steps=36, wsd_decay_style="exponential"),
    dict(decay_style="WSD", wsd_decay_steps=36, wsd_decay_style="minus_sqrt"),
]


def megatron_scheduler(max_lr, min_lr, warmup, decay, case, init_lr=0.0):
    mod = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    return mod.OptimizerParamScheduler(
        SimpleNamespace(param_groups=[{}]), init_lr=init_lr, max_lr=max_lr, min_lr=min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=case["decay_style"], start_wd=0.0,
        end_wd=0.0, wd_incr_steps=decay, wd_incr_style="constant", wsd_decay_steps=case.get("wsd_decay_steps"),
        lr_wsd_decay_style=case.get("wsd_decay_style"),
    )


@pytest.mark.megatron
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["decay_style"] + "-" + c.get("wsd_decay_style", ""))
@pytest.mark.parametrize("warmup", [0, 10])
def test_matches_megatron_core(case, warmup):
    ours = LRScheduler(3e-4, 3e-5, warmup, 100, **case)
    theirs = megatron_scheduler(3e-4, 3e-5, warmup, 100, case)
    done = 0
    for step in STEPS:
        theirs.step(step - done)
        ours.step(step - done)
        done = step
        assert ours.lr == theirs.optimizer.param_groups[0]["lr"], f"step {step}"
        assert ours.get_lr(step) == ours.lr


@pytest.mark.megatron
def test_warmup_from_init_lr_matches_megatron_core():
    case = dict(decay_style="cosine")
    ours = LRScheduler(1e-3, 1e-5, 8, 40, init_lr=1e-4, **case)
    theirs = megatron_scheduler(1e-3, 1e-5, 8, 40, case, init_lr=1e-4)
    for step in range(45):
        theirs.num_steps = step
        assert ours.get_lr(step) == theirs.get_lr({}), f"step {step}"


def test_hand_computed_values():
    lin = LRScheduler(1.0, 0.1, 10, 110, "linear")
    assert lin.get_lr(0) == 0.0 and lin.get_lr(5) == 0.5 and lin.get_lr(10) == 1.0
    assert lin.get_lr(60) == pytest.approx(0.1 + 0.5 * 0.9) and lin.get_lr(110) == pytest.approx(0.1)
    assert lin.get_lr(111) == 0.1 and lin.get_lr(10_000) == 0.1
    cos = LRScheduler(1.0, 0.0, 0, 100, "cosine")
    assert cos.get_lr(0) == 1.0 and cos.get_lr(50) == pytest.approx(0.5) and cos.get_lr(100) == pytest.approx(0.0)
    isr = LRScheduler(1.0, 0.01, 4, 100, "inverse-square-root")
    assert isr.get_lr(16) == pytest.approx(0.5) and isr.get_lr(99) == pytest.approx(2 / math.sqrt(99))
    assert isr.get_lr(101) == 0.01
    wsd = LRScheduler(1.0, 0.0, 0, 100, "WSD", wsd_decay_steps=20, wsd_decay_style="exponential")
    assert wsd.get_lr(80) == 1.0 and wsd.get_lr(90) == pytest.approx(2 * 0.5**0.5 - 1) and wsd.get_lr(100) == 0.0
    sqrt = LRScheduler(1.0, 0.0, 0, 100, "WSD", wsd_decay_steps=25, wsd_decay_style="minus_sqrt")
    assert sqrt.get_lr(75) == 1.0 and sqrt.get_lr(100 - 25 + 4) == pytest.approx(1 - math.sqrt(4 / 25))
    const = LRScheduler(2.0, 0.0, 4, 10, "constant")
    assert const.get_lr(2) == 1.0 and const.get_lr(4) == 2.0 and const.get_lr(1000) == 2.0


def test_megatron_flags_to_steps_in_iterations_and_samples():
    s = megatron_schedule_steps(train_iters=1000, lr_warmup_fraction=0.015)
    assert (s.warmup_steps, s.decay_steps, s.wsd_decay_steps) == (15.0, 1000, None)
    s = megatron_schedule_steps(train_iters=1000, lr_decay_iters=800, lr_warmup_iters=20, lr_wsd_decay_iters=100,
                                global_batch_size=32)
    assert (s.warmup_steps, s.decay_steps, s.wsd_decay_steps) == (640, 25600, 3200)
    with pytest.raises(ValueError, match="mutually exclusive"):
        megatron_schedule_steps(train_iters=10, lr_warmup_iters=2, lr_warmup_fraction=0.1)
    with pytest.raises(ValueError, match="train-iters"):
        megatron_schedule_steps(train_iters=0)

    # Counting samples (Megatron) or iterations gives the same learning rate at every iteration.
    gbs, kw = 24, dict(train_iters=200, lr_warmup_fraction=0.07, lr_wsd_decay_iters=50)
    it, sm = megatron_schedule_steps(**kw), megatron_schedule_steps(**kw, global_batch_size=gbs)
    by_iter = LRScheduler(1e-3, 1e-4, it.warmup_steps, it.decay_steps, "WSD", it.wsd_decay_steps, "cosine")
    by_sample = LRScheduler(1e-3, 1e-4, sm.warmup_steps, sm.decay_steps, "WSD", sm.wsd_decay_steps, "cosine")
    for _ in range(220):
        assert by_iter.lr == pytest.approx(by_sample.lr, rel=1e-12, abs=1e-18)
        by_iter.step()
        by_sample.step(gbs)


def test_state_dict_round_trip_and_policies():
    a = LRScheduler(1e-3, 1e-5, 10, 100, "cosine")
    for _ in range(42):
        a.step()
    sd = a.state_dict()
    b = LRScheduler(1e-3, 1e-5, 10, 100, "cosine")
    b.load_state_dict(sd)
    assert b.num_steps == 42 and b.lr == a.lr
    assert [b.step() for _ in range(5)] == [a.step() for _ in range(5)]

    changed = LRScheduler(2e-3, 1e-5, 10, 100, "cosine")
    with pytest.raises(ValueError, match="max_lr"):
        changed.load_state_dict(sd)
    changed.load_state_dict(sd, policy="override")
    assert changed.max_lr == 2e-3 and changed.num_steps == 42
    changed.load_state_dict(sd, policy="use_checkpoint")
    assert changed.max_lr == 1e-3 and changed.lr == a.get_lr(42)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_lr=1e-4, min_lr=1e-3, warmup_steps=0, decay_steps=10), "min-lr"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=10, decay_steps=10), "warmup steps"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=0), "decay steps"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=10, decay_style="step"), "decay-style"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=10, decay_style="WSD"), "wsd-decay-iters"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=10, decay_style="WSD", wsd_decay_steps=5,
              wsd_decay_style="square"), "wsd-decay-style"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRScheduler(**kwargs)
