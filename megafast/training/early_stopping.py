"""``--early-stopping-patience K --early-stopping-min-delta D``: stop on a stalled validation loss.

Each evaluation (every ``--eval-interval`` iterations) gives a validation loss v. It improves when
v < best - D (the first evaluation always does); after K evaluations in a row without an
improvement the run stops, saves a checkpoint and says why in one log line. A non-finite loss
never improves. The state (best loss, its iteration, evaluations since) is kept in the
checkpoint's arguments so a resumed run continues counting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class EarlyStopping:
    patience: int
    min_delta: float = 0.0
    best: Optional[float] = None
    best_iteration: Optional[int] = None
    bad_evaluations: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"--early-stopping-patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"--early-stopping-min-delta must be >= 0, got {self.min_delta}")

    def update(self, iteration: int, loss: float) -> bool:
        """Record one evaluation; True when training should stop now."""
        if math.isfinite(loss) and (self.best is None or loss < self.best - self.min_delta):
            self.best, self.best_iteration, self.bad_evaluations = loss, iteration, 0
            return False
        self.bad_evaluations += 1
        return self.bad_evaluations >= self.patience

    def reason(self, iteration: int) -> str:
        """The one log line that says why the run stopped."""
        best = "none" if self.best is None else f"{self.best:.6E} at iteration {self.best_iteration}"
        return (f"early stopping at iteration {iteration}: the validation loss has not improved by more than "
                f"{self.min_delta:g} for {self.bad_evaluations} evaluations (--early-stopping-patience "
                f"{self.patience}; best {best})")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_iteration": self.best_iteration, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.best, self.best_iteration = state.get("best"), state.get("best_iteration")
            self.bad_evaluations = int(state.get("bad_evaluations", 0))


__all__ = ["EarlyStopping"]
