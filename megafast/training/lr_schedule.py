"""Learning-rate schedules with Megatron's ``OptimizerParamScheduler`` semantics.

With ``n`` the number of steps taken so far (W warmup, D decay, lr_0 = ``init_lr``, default 0)::

    n <= W (W > 0):           lr = lr_0 + (max_lr - lr_0) * n / W
    constant:                 lr = max_lr
    n > D:                    lr = min_lr
    inverse-square-root:      lr = max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
    otherwise, r = (n - W) / (D - W),  lr = min_lr + c * (max_lr - min_lr) with
      linear:  c = 1 - r
      cosine:  c = (1 + cos(pi * r)) / 2
      WSD:     c = 1 until n <= D - D_wsd, then with q = (n - (D - D_wsd)) / D_wsd:
               linear 1 - q | cosine (1 + cos(pi q)) / 2 | exponential 2 * 0.5^q - 1 | minus_sqrt 1 - sqrt(q)

As in Megatron the step that follows ``n`` updates uses ``get_lr(n)``: the first update of a run
with warmup uses ``lr_0``. Megatron counts steps in *samples* (each iteration advances by the
global batch size); :func:`megatron_schedule_steps` converts its flags, and counting iterations
instead (``global_batch_size=1``, ``step()`` once per iteration) gives the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

DecayStyle = Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"]
WSDDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
_SCHEDULE_FIELDS = (
    "max_lr", "min_lr", "init_lr", "warmup_steps", "decay_steps", "decay_style", "wsd_decay_steps", "wsd_decay_style"
)


class LRScheduler:
    """Warmup then decay of the learning rate; ``step()`` after each optimizer step."""

    def __init__(
        self,
        max_lr: float,
        min_lr: float,
        warmup_steps: float,
        decay_steps: float,
        decay_style: DecayStyle = "cosine",
        wsd_decay_steps: Optional[float] = None,
        wsd_decay_style: WSDDecayStyle = "linear",
        init_lr: float = 0.0,
    ) -> None:
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr, got min_lr={min_lr}, lr={max_lr}")
        if not 0.0 <= init_lr <= max_lr:
            raise ValueError(f"need 0 <= --lr-warmup-init <= --lr, got {init_lr} and {max_lr}")
        if decay_steps <= 0:
            raise ValueError(f"decay steps must be > 0, got {decay_steps}: set --lr-decay-iters or --train-iters")
        if not 0 <= warmup_steps < decay_steps:
            raise ValueError(
                f"warmup steps ({warmup_steps}) must be >= 0 and below the decay steps ({decay_steps}): "
                "lower --lr-warmup-iters/--lr-warmup-fraction or raise --lr-decay-iters"
            )
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown --lr-decay-style {decay_style!r}: use one of {', '.join(DECAY_STYLES)}")
        if decay_style == "WSD":
            if wsd_decay_steps is None or not 0 < wsd_decay_steps <= decay_steps:
                raise ValueError(
                    f"WSD needs 0 < --lr-wsd-decay-iters <= decay steps ({decay_steps}), got {wsd_decay_steps}"
                )
            if wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(
                    f"unknown --lr-wsd-decay-style {wsd_decay_style!r}: use one of {', '.join(WSD_DECAY_STYLES)}"
                )
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.init_lr = float(init_lr)
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.decay_style = decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.wsd_decay_style = wsd_decay_style
        self.num_steps = 0

    @property
    def lr(self) -> float:
        """The learning rate for the next update."""
        return self.get_lr(self.num_steps)

    def get_lr(self, step: float) -> float:
        """The learning rate after ``step`` steps (the formulas of the module docstring)."""
        W, D = self.warmup_steps, self.decay_steps
        if W > 0 and step <= W:
            return self.init_lr + (self.max_lr - self.init_lr) * float(step) / float(W)
        if self.decay_style == "constant":
            return self.max_lr
        if step > D:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            lr = self.max_lr * max(W, 1) ** 0.5 / max(step, 1) ** 0.5
            return max(self.min_lr, lr)
        ratio = float(step - W) / float(D - W)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable, then anneal over the last wsd_decay_steps
            anneal_start = D - self.wsd_decay_steps
            if step <= anneal_start:
                coeff = 1.0
            else:
                q = float(step - anneal_start) / float(self.wsd_decay_steps)
                if self.wsd_decay_style == "linear":
                    coeff = 1.0 - q
                elif self.wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * q) + 1.0)
                elif self.wsd_decay_style == "exponential":
                    coeff = 2.0 * math.pow(0.5, q) - 1.0
                else:  # minus_sqrt
                    coeff = 1.0 - math.sqrt(q)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: float = 1) -> float:
        """Advance by ``increment`` steps (1 per iteration, or the global batch size for samples)."""
        self.num_steps += increment
        return self.lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, **{k: getattr(self, k) for k in _SCHEDULE_FIELDS}}

    def load_state_dict(self, sd: dict, policy: Literal["check", "override", "use_checkpoint"] = "check") -> None:
        """Restore the step count; schedule parameters follow ``policy`` (Megatron's options).

        ``check``: they must equal this scheduler's (else ValueError); ``override``: keep this
        scheduler's (``--override-opt_param-scheduler``); ``use_checkpoint``: take the
        checkpoint's (``--use-checkpoint-opt_param-scheduler``).
        """
        if policy not in ("check", "override", "use_checkpoint"):
            raise ValueError(f"unknown policy {policy!r}: use check, override or use_checkpoint")
        for key in _SCHEDULE_FIELDS:
            ours, theirs = getattr(self, key), sd[key]
            if policy == "use_checkpoint":
                setattr(self, key, theirs)
            elif policy == "check" and ours != theirs:
                raise ValueError(
                    f"learning-rate schedule {key} is {ours} but the checkpoint has {theirs}: pass the "
                    "checkpoint's value, --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler"
                )
        self.num_steps = sd["num_steps"]


@dataclass(frozen=True)
class ScheduleSteps:
    warmup_steps: float
    decay_steps: float
    wsd_decay_steps: Optional[float]


def megatron_schedule_steps(
    train_iters: int,
    lr_decay_iters: Optional[int] = None,
    lr_warmup_iters: int = 0,
    lr_warmup_fraction: Optional[float] = None,
    lr_wsd_decay_iters: Optional[int] = None,
    global_batch_size: int = 1,
) -> ScheduleSteps:
    """Megatron's iteration flags as scheduler steps (samples when ``global_batch_size`` > 1).

    decay = ``--lr-decay-iters`` (default ``--train-iters``) * gbs; warmup =
    ``--lr-warmup-fraction`` * decay, or ``--lr-warmup-iters`` * gbs; WSD anneal =
    ``--lr-wsd-decay-iters`` * gbs.
    """
    if train_iters < 1:
        raise ValueError(f"--train-iters must be >= 1, got {train_iters}")
    if lr_warmup_fraction is not None and lr_warmup_iters:
        raise ValueError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive: pass one")
    if lr_warmup_fraction is not None and not 0.0 <= lr_warmup_fraction < 1.0:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {lr_warmup_fraction}")
    if lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be >= 0, got {lr_warmup_iters}")
    decay = (train_iters if lr_decay_iters is None else lr_decay_iters) * global_batch_size
    warmup = lr_warmup_fraction * decay if lr_warmup_fraction is not None else lr_warmup_iters * global_batch_size
    wsd = None if lr_wsd_decay_iters is None else lr_wsd_decay_iters * global_batch_size
    return ScheduleSteps(warmup, decay, wsd)


__all__ = ["LRScheduler", "ScheduleSteps", "megatron_schedule_steps"]
