"""Discrete-event simulator that checks and times a pipeline schedule over all its ranks.

:func:`simulate` takes every rank's step list (see :mod:`megafast.pipeline.schedules`) and runs
them together with the engine's semantics:

* each rank runs its steps in order; FORWARD takes ``forward_time``, BACKWARD
  ``backward_time`` (per model chunk), communication takes no time;
* communication is rendezvous: a step's ops are posted together when the rank reaches it, an op
  is matched once the peer has reached the step holding the complementary op, and the step
  completes when all its ops are matched, at the latest of the posting times involved. Nothing
  is buffered, so a schedule that passes is deadlock-free under buffered sends as well;
* messages from rank a to rank b are paired first-in first-out (step order, then ``ops`` order
  inside an Exchange), as NCCL and gloo p2p do; pairs must agree on kind, microbatch and chunk.

It raises :class:`ScheduleError` (a ``ValueError``) when a check fails:

1. structure, per rank: every (microbatch, chunk) has exactly one FORWARD and one BACKWARD, the
   forward first; a non-first virtual stage receives its activation before the FORWARD, a
   non-last one sends it after; a non-last stage receives the output gradient before the
   BACKWARD, a non-first one sends the input gradient after; nothing else is communicated;
2. pairing: each send meets a receive of the same microbatch on the adjacent virtual stage;
3. progress: no deadlock (:class:`DeadlockError` lists the blocked ranks and their next steps);
4. data dependencies in time: forward of i on stage s starts after it ends on stage s - 1,
   backward of i on stage s starts after it ends on stage s + 1 and after the forward on s.

and otherwise returns a :class:`SimulationResult`: makespan, per-rank busy and idle time,
bubble fraction ``idle / (p * makespan)`` and the peak number of activations held (forwards
done minus backwards done, counted in model chunks).

Integer or Fraction times give exact Fraction bubble fractions; floats give floats.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational
from typing import Dict, List, Sequence, Tuple, Union

from megafast.pipeline.schedules import (
    BACKWARD,
    FORWARD,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    Action,
    ActionKind,
    Exchange,
    Step,
    comm_ops,
    peer_chunk,
    peer_rank,
    virtual_stage,
)

__all__ = ["DeadlockError", "ScheduleError", "SimulationResult", "StepTiming", "simulate"]

Number = Union[int, float, Fraction]

_MATCHING_RECV = {SEND_FORWARD: RECV_FORWARD, SEND_BACKWARD: RECV_BACKWARD}


class ScheduleError(ValueError):
    """A schedule breaks a pairing, ordering or dependency rule."""


class DeadlockError(ScheduleError):
    """No rank can make progress; ``blocked`` maps each stuck rank to (step index, step)."""

    def __init__(self, message: str, blocked: Dict[int, Tuple[int, Step]]) -> None:
        super().__init__(message)
        self.blocked = blocked


@dataclass(frozen=True)
class StepTiming:
    """When one step ran: posted (reached) at ``start``, completed at ``end``."""

    step: Step
    start: Number
    end: Number


@dataclass(frozen=True)
class SimulationResult:
    """Timing and memory figures of a schedule that passed every check."""

    makespan: Number
    busy: Tuple[Number, ...]  # compute time per rank
    idle: Tuple[Number, ...]  # makespan - busy, per rank
    bubble_fraction: Number  # sum(idle) / (p * makespan)
    rank_bubble_fraction: Tuple[Number, ...]  # idle / makespan, per rank
    peak_in_flight: Tuple[int, ...]  # max (forwards - backwards) done, per rank, in model chunks
    timeline: Tuple[Tuple[StepTiming, ...], ...]  # per rank, in step order


def _ratio(a: Number, b: Number) -> Number:
    if isinstance(a, Rational) and isinstance(b, Rational):
        return Fraction(a) / Fraction(b) if b else Fraction(0)
    return a / b if b else 0.0


def _where(rank: int, index: int, step: Step) -> str:
    return f"rank {rank} step {index} ({step})"


# --------------------------------------------------------------------------------------------
# 1. structure


def _check_structure(
    rank: int, steps: Sequence[Step], pp_size: int, num_microbatches: int, num_model_chunks: int
) -> None:
    """Exactly the required actions of every (microbatch, chunk), in a valid local order."""
    last_stage = num_model_chunks * pp_size - 1
    seen: Dict[Tuple[ActionKind, int, int], int] = {}
    for index, step in enumerate(steps):
        if not isinstance(step, (Action, Exchange)):
            raise ScheduleError(f"rank {rank} step {index} is {step!r}, not an Action or Exchange")
        for action in (step,) if isinstance(step, Action) else step.ops:
            where = _where(rank, index, step)
            if action.microbatch >= num_microbatches:
                raise ScheduleError(f"{where}: microbatch {action.microbatch} >= num_microbatches")
            if action.chunk >= num_model_chunks:
                raise ScheduleError(f"{where}: chunk {action.chunk} >= num_model_chunks")
            key = (action.kind, action.microbatch, action.chunk)
            if key in seen:
                raise ScheduleError(f"{where}: {action} appears twice (first at step {seen[key]})")
            seen[key] = index
    for chunk in range(num_model_chunks):
        stage = virtual_stage(chunk, pp_size, rank)
        first, last = stage == 0, stage == last_stage
        for i in range(num_microbatches):
            label = f"rank {rank} microbatch {i} chunk {chunk} (virtual stage {stage})"
            at = {kind: seen.get((kind, i, chunk)) for kind in ActionKind}
            f, b = at[FORWARD], at[BACKWARD]
            if f is None or b is None:
                raise ScheduleError(f"{label}: missing {'FORWARD' if f is None else 'BACKWARD'}")
            if b < f:
                raise ScheduleError(f"{label}: BACKWARD at step {b} comes before its FORWARD at step {f}")
            # (kind, whether this stage needs it, the compute step it belongs to, must come before it)
            rules = (
                (RECV_FORWARD, not first, FORWARD, True),
                (SEND_FORWARD, not last, FORWARD, False),
                (RECV_BACKWARD, not last, BACKWARD, True),
                (SEND_BACKWARD, not first, BACKWARD, False),
            )
            for kind, needed, compute, before in rules:
                pos, anchor = at[kind], at[compute]
                if not needed and pos is not None:
                    edge = "first" if kind in (RECV_FORWARD, SEND_BACKWARD) else "last"
                    raise ScheduleError(f"{label}: unexpected {kind.name} at step {pos} on the {edge} stage")
                if needed and pos is None:
                    when = "before" if before else "after"
                    raise ScheduleError(f"{label}: missing {kind.name} ({when} its {compute.name})")
                if needed and (pos > anchor if before else pos < anchor):
                    when = "before" if before else "after"
                    raise ScheduleError(
                        f"{label}: {kind.name} at step {pos} must come {when} its {compute.name} "
                        f"at step {anchor}"
                    )


# --------------------------------------------------------------------------------------------
# 2. pairing


def _pair_messages(
    schedules: Sequence[Sequence[Step]], pp_size: int
) -> List[List[List[Tuple[int, int]]]]:
    """For every rank and step, the (peer rank, peer step index) of each of its ops' partners."""
    sends: Dict[Tuple[int, int], List[Tuple[int, int, Action]]] = defaultdict(list)
    recvs: Dict[Tuple[int, int], List[Tuple[int, int, Action]]] = defaultdict(list)
    for rank, steps in enumerate(schedules):
        for index, step in enumerate(steps):
            for op in comm_ops(step):
                peer = peer_rank(op, pp_size, rank)
                if op.is_send:
                    sends[(rank, peer)].append((index, rank, op))
                else:
                    recvs[(peer, rank)].append((index, rank, op))
    partners: List[List[List[Tuple[int, int]]]] = [[[] for _ in steps] for steps in schedules]
    for channel in sorted(set(sends) | set(recvs)):
        src, dst = channel
        out, inc = sends.get(channel, []), recvs.get(channel, [])
        for (s_index, _, s_op), (r_index, _, r_op) in zip(out, inc):
            expected = Action(_MATCHING_RECV[s_op.kind], s_op.microbatch, peer_chunk(s_op, pp_size, src))
            if r_op != expected:
                raise ScheduleError(
                    f"{_where(src, s_index, schedules[src][s_index])} sends {s_op} to rank {dst}, but the "
                    f"receive it pairs with (first-in first-out) is {r_op} at "
                    f"{_where(dst, r_index, schedules[dst][r_index])}; expected {expected}"
                )
            partners[src][s_index].append((dst, r_index))
            partners[dst][r_index].append((src, s_index))
        if len(out) > len(inc):
            s_index, _, s_op = out[len(inc)]
            where = _where(src, s_index, schedules[src][s_index])
            raise ScheduleError(f"{where}: {s_op} to rank {dst} has no matching receive")
        if len(inc) > len(out):
            r_index, _, r_op = inc[len(out)]
            where = _where(dst, r_index, schedules[dst][r_index])
            raise ScheduleError(f"{where}: {r_op} from rank {src} has no matching send")
    return partners


# --------------------------------------------------------------------------------------------
# 3. timing


def _run(
    schedules: Sequence[Sequence[Step]],
    partners: List[List[List[Tuple[int, int]]]],
    forward_time: Number,
    backward_time: Number,
) -> List[List[StepTiming]]:
    """Advance every rank as far as it can until all finish; raise DeadlockError if they can't."""
    p = len(schedules)
    lengths = [len(steps) for steps in schedules]
    index = [0] * p
    clock: List[Number] = [0] * p
    posted: List[List[Number]] = [[0] * max(n, 1) for n in lengths]  # time each step was reached
    timeline: List[List[StepTiming]] = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for rank in range(p):
            steps, mine = schedules[rank], partners[rank]
            while index[rank] < lengths[rank]:
                i = index[rank]
                step, start = steps[i], clock[rank]
                if isinstance(step, Action) and step.is_compute:
                    end = start + (forward_time if step.kind is FORWARD else backward_time)
                else:
                    if any(index[q] < j for q, j in mine[i]):
                        break  # some partner has not reached its step yet
                    end = max([start] + [posted[q][j] for q, j in mine[i]])
                timeline[rank].append(StepTiming(step, start, end))
                clock[rank] = end
                index[rank] = i + 1
                if i + 1 < lengths[rank]:
                    posted[rank][i + 1] = end
                progress = True
    blocked = {r: (index[r], schedules[r][index[r]]) for r in range(p) if index[r] < lengths[r]}
    if blocked:
        lines = []
        for r, (i, step) in blocked.items():
            waits = sorted({q for q, j in partners[r][i] if index[q] < j})
            lines.append(f"rank {r} at step {i} {step} waits for rank(s) {waits}")
        raise DeadlockError("deadlock: " + "; ".join(lines), blocked)
    return timeline


# --------------------------------------------------------------------------------------------
# 4. dependencies and figures


def _check_dependencies(timeline: List[List[StepTiming]], pp_size: int) -> None:
    """Cross-stage data dependencies hold in the simulated times."""
    f_time: Dict[Tuple[int, int], Tuple[Number, Number]] = {}
    b_time: Dict[Tuple[int, int], Tuple[Number, Number]] = {}
    for rank, steps in enumerate(timeline):
        for t in steps:
            if isinstance(t.step, Action) and t.step.is_compute:
                key = (t.step.microbatch, virtual_stage(t.step.chunk, pp_size, rank))
                (f_time if t.step.kind is FORWARD else b_time)[key] = (t.start, t.end)
    for (i, s), (start, _) in f_time.items():
        if s > 0 and start < f_time[(i, s - 1)][1]:
            raise ScheduleError(f"forward of microbatch {i} on stage {s} starts before stage {s - 1} ends it")
    for (i, s), (start, _) in b_time.items():
        if start < f_time[(i, s)][1]:
            raise ScheduleError(f"backward of microbatch {i} on stage {s} starts before its forward ends")
        if (i, s + 1) in b_time and start < b_time[(i, s + 1)][1]:
            raise ScheduleError(f"backward of microbatch {i} on stage {s} starts before stage {s + 1} ends")


def _peak_in_flight(steps: Sequence[Step]) -> int:
    held = peak = 0
    for step in steps:
        if isinstance(step, Action) and step.kind is FORWARD:
            held += 1
            peak = max(peak, held)
        elif isinstance(step, Action) and step.kind is BACKWARD:
            held -= 1
    return peak


def simulate(
    schedules: Sequence[Sequence[Step]],
    num_microbatches: int,
    num_model_chunks: int = 1,
    forward_time: Number = 1,
    backward_time: Number = 2,
) -> SimulationResult:
    """Check every rank's steps together and time them (see the module docstring).

    ``schedules[r]`` is rank r's step list; ``forward_time`` / ``backward_time`` are the cost
    of one FORWARD / BACKWARD step (of one model chunk).
    """
    if not schedules:
        raise ValueError("simulate needs the schedules of at least one rank")
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if isinstance(num_model_chunks, bool) or not isinstance(num_model_chunks, int) or num_model_chunks < 1:
        raise ValueError(f"num_model_chunks must be an integer >= 1, got {num_model_chunks!r}")
    for name, value in (("forward_time", forward_time), ("backward_time", backward_time)):
        if not isinstance(value, (int, float, Fraction)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    p = len(schedules)
    for rank, steps in enumerate(schedules):
        _check_structure(rank, steps, p, num_microbatches, num_model_chunks)
    partners = _pair_messages(schedules, p)
    timeline = _run(schedules, partners, forward_time, backward_time)
    _check_dependencies(timeline, p)

    makespan: Number = max(steps[-1].end for steps in timeline)
    busy = tuple(
        sum(t.end - t.start for t in steps if isinstance(t.step, Action) and t.step.is_compute)
        for steps in timeline
    )
    idle = tuple(makespan - b for b in busy)
    return SimulationResult(
        makespan=makespan,
        busy=busy,
        idle=idle,
        bubble_fraction=_ratio(sum(idle), p * makespan),
        rank_bubble_fraction=tuple(_ratio(x, makespan) for x in idle),
        peak_in_flight=tuple(_peak_in_flight(steps) for steps in schedules),
        timeline=tuple(tuple(steps) for steps in timeline),
    )
