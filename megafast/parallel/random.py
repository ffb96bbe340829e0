"""RNG states that make dropout consistent across tensor-parallel ranks.

Two streams, as in Megatron:
- the default torch generator, seeded identically on every TP rank: dropout on activations that
  every TP rank holds in full (hidden dropout without sequence parallelism) draws the same mask;
- the named ``"model-parallel"`` stream, seeded ``seed + 2718 + tp_rank``: dropout on
  activations that are split across TP ranks (attention probabilities of each rank's heads,
  sequence-parallel shards) draws independent masks, so the whole equals one unsplit model's
  in distribution.

The tracker holds generator states of the device in use (CPU or CUDA) and swaps them into the
default generator inside :meth:`RNGStatesTracker.fork`; it is an object owned by the model, not a
module global. :func:`tensor_parallel_dropout` picks the stream for an activation (the model's
hidden and embedding dropout and LoRA's input dropout all go through it).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODEL_PARALLEL_RNG = "model-parallel"
TP_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states; ``with tracker.fork(name):`` draws from that stream and advances it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise ValueError(f"RNG state {name!r} was never added to the tracker")
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)


def model_parallel_rng_tracker(seed: int, tp_rank: int, device: torch.device | str = "cpu") -> RNGStatesTracker:
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + tp_rank)
    return tracker


def tensor_parallel_dropout(
    x: torch.Tensor, p: float, *, training: bool, tracker: RNGStatesTracker, sharded: bool
) -> torch.Tensor:
    """Dropout of ``x`` with the mask each TP rank must draw.

    ``sharded=False``: ``x`` is the same on every TP rank (replicated activations), so the mask is
    drawn from the default generator, seeded alike on every rank: the same mask everywhere.
    ``sharded=True``: each rank holds its own part (a sequence-parallel shard, a row-parallel
    input), so the mask comes from the tracker's model-parallel stream: independent per rank.
    Not training or ``p == 0``: ``x`` itself, no random numbers drawn.
    """
    if not training or p == 0.0:
        return x
    if sharded:
        with tracker.fork():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


def checkpointed(fn: Callable, tracker: RNGStatesTracker, *args):
    """Activation recompute of ``fn(*args)`` that replays the same dropout masks.

    ``torch.utils.checkpoint`` restores the default generator for the recompute; the tracker's
    named streams are restored here too (their state at the first call) and put back afterwards.
    """
    snapshot = tracker.get_states()
    calls = 0

    def run(*a):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*a)
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            return fn(*a)
        finally:
            tracker.set_states(current)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
