"""Pipeline-parallel schedules as pure functions: each rank's ordered list of steps.

A schedule says *what* one pipeline rank does and in which order; it does no communication and
needs no torch. ``megafast.pipeline.engine`` executes the steps with torch.distributed p2p and
``megafast.pipeline.simulator`` runs all ranks' lists together to check them and to time them.

Steps
-----
A rank's schedule is a list of steps, each either an :class:`Action` or an :class:`Exchange`.

| kind            | meaning on rank r, model chunk c, microbatch i                                  |
|-----------------|---------------------------------------------------------------------------------|
| FORWARD         | run chunk c forward on microbatch i; keep its activations                       |
| BACKWARD        | backward of chunk c for microbatch i (grads accumulate); free its activations   |
| SEND_FORWARD    | send chunk c's output activation of i to the next virtual stage                 |
| RECV_FORWARD    | receive chunk c's input activation of i from the previous virtual stage         |
| SEND_BACKWARD   | send the gradient w.r.t. chunk c's input of i to the previous virtual stage     |
| RECV_BACKWARD   | receive the gradient w.r.t. chunk c's output of i from the next virtual stage   |

``chunk`` is always the *local* model chunk the tensor belongs to. Model chunk c on rank r is
virtual stage ``c * pp + r`` (Megatron's layout), so the next virtual stage of (r, c) is
(r + 1, c), or (0, c + 1) when r is the last rank; :func:`peer_rank` and :func:`peer_chunk` give
the other end of a communication action. Without interleaving every chunk is 0.

An :class:`Exchange` is a batch of communication actions issued together and complete together
(``torch.distributed.batch_isend_irecv`` followed by waiting on every request), as Megatron's
``send_forward_recv_backward`` and friends. A lone communication action is the same thing with
one op. Execution semantics, which :mod:`~megafast.pipeline.simulator` checks:

* a rank runs its steps strictly in order; a communication step blocks until *every* op in it
  has been matched, and an op is matched once the peer has reached the step holding the
  complementary op (rendezvous: sends are not buffered). A schedule that is deadlock-free
  under rendezvous is deadlock-free with buffered (eager) sends too;
* messages between an ordered pair of ranks are matched first-in first-out, in step order and,
  inside an Exchange, in ``ops`` order (NCCL and gloo p2p match by order, not by tag).

Bubble
------
With forward time t_f and backward time t_b per microbatch per rank and free communication, a
rank's bubble fraction is ``idle / makespan`` (idle = makespan minus its own compute time). For
GPipe and 1F1B the makespan is ``(M + p - 1)(t_f + t_b)`` so the bubble fraction is
``(p - 1) / (M + p - 1)`` (Narayanan et al. 2021 quote ``(p - 1) / M`` relative to the ideal
time ``M (t_f + t_b)``; ours is relative to the actual total). 1F1B has GPipe's bubble but holds
the activations of at most ``min(p - r, M)`` microbatches on rank r instead of M. Interleaving v
chunks (each 1/v of the rank's layers, so a chunk step costs t_f / v, t_b / v) shrinks the
bubble time by v: makespan ``(v M + p - 1)(t_f + t_b) / v`` and bubble fraction
``(p - 1) / (v M + p - 1)``; see :func:`bubble_fraction`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Sequence, Tuple, Union

__all__ = [
    "Action",
    "ActionKind",
    "Exchange",
    "Step",
    "SCHEDULES",
    "BACKWARD",
    "FORWARD",
    "RECV_BACKWARD",
    "RECV_FORWARD",
    "SEND_BACKWARD",
    "SEND_FORWARD",
    "bubble_fraction",
    "build_rank_schedules",
    "build_schedule",
    "comm_ops",
    "gpipe",
    "interleaved_one_f_one_b",
    "no_pipelining",
    "num_warmup_steps",
    "one_f_one_b",
    "peer_chunk",
    "peer_rank",
    "schedule_name",
    "virtual_stage",
]


class ActionKind(str, enum.Enum):
    """What an :class:`Action` does; the value is the short name used in printed schedules."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_FORWARD = "SF"
    RECV_FORWARD = "RF"
    SEND_BACKWARD = "SB"
    RECV_BACKWARD = "RB"


FORWARD = ActionKind.FORWARD
BACKWARD = ActionKind.BACKWARD
SEND_FORWARD = ActionKind.SEND_FORWARD
RECV_FORWARD = ActionKind.RECV_FORWARD
SEND_BACKWARD = ActionKind.SEND_BACKWARD
RECV_BACKWARD = ActionKind.RECV_BACKWARD

_COMPUTE = frozenset({FORWARD, BACKWARD})
_SENDS = frozenset({SEND_FORWARD, SEND_BACKWARD})
# Where a communication action's peer sits along the virtual stages: +1 the next stage (sending
# activations to it, receiving gradients from it), -1 the previous one.
_DIRECTION = {SEND_FORWARD: 1, RECV_FORWARD: -1, SEND_BACKWARD: -1, RECV_BACKWARD: 1}


@dataclass(frozen=True)
class Action:
    """One compute or communication action on microbatch ``microbatch`` of local chunk ``chunk``."""

    kind: ActionKind
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            raise ValueError(f"Action kind must be an ActionKind, got {self.kind!r}")
        if not isinstance(self.microbatch, int) or self.microbatch < 0:
            raise ValueError(f"Action microbatch must be an int >= 0, got {self.microbatch!r}")
        if not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"Action chunk must be an int >= 0, got {self.chunk!r}")

    @property
    def is_compute(self) -> bool:
        return self.kind in _COMPUTE

    @property
    def is_send(self) -> bool:
        return self.kind in _SENDS

    def __str__(self) -> str:
        return f"{self.kind.value}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Exchange:
    """Communication actions issued as one batch (``batch_isend_irecv``) and waited on together.

    ``ops`` order is the issue order, which fixes FIFO matching when two ops go to one peer.
    """

    ops: Tuple[Action, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.ops:
            raise ValueError("Exchange needs at least one communication action")
        for op in self.ops:
            if not isinstance(op, Action) or op.is_compute:
                raise ValueError(f"Exchange ops must be communication Actions, got {op!r}")

    def __str__(self) -> str:
        return "[" + " ".join(str(op) for op in self.ops) + "]"


Step = Union[Action, Exchange]


def comm_ops(step: Step) -> Tuple[Action, ...]:
    """The communication actions of a step: () for compute, (step,) for a lone one, or the batch."""
    if isinstance(step, Exchange):
        return step.ops
    return () if step.is_compute else (step,)


def virtual_stage(chunk: int, pp_size: int, pp_rank: int) -> int:
    """Global index of model chunk ``chunk`` on rank ``pp_rank``: ``chunk * pp_size + pp_rank``."""
    return chunk * pp_size + pp_rank


def peer_rank(action: Action, pp_size: int, pp_rank: int) -> int:
    """The rank at the other end of communication ``action`` issued by ``pp_rank``."""
    if action.is_compute:
        raise ValueError(f"{action} is a compute action and has no peer")
    return (pp_rank + _DIRECTION[action.kind]) % pp_size


def peer_chunk(action: Action, pp_size: int, pp_rank: int) -> int:
    """The peer's local chunk for ``action``'s tensor (it changes only when wrapping around)."""
    if action.is_compute:
        raise ValueError(f"{action} is a compute action and has no peer")
    stage = virtual_stage(action.chunk, pp_size, pp_rank) + _DIRECTION[action.kind]
    if stage < 0:
        raise ValueError(f"{action} on rank {pp_rank} chunk {action.chunk} has no previous stage")
    return stage // pp_size


# --------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _validate(pp_size: int, pp_rank: int, num_microbatches: int, num_model_chunks: int = 1) -> None:
    _check_int("pp_size", pp_size, 1)
    _check_int("pp_rank", pp_rank, 0)
    if pp_rank >= pp_size:
        raise ValueError(f"pp_rank {pp_rank} is out of range for pp_size {pp_size} (0..{pp_size - 1})")
    _check_int("num_microbatches", num_microbatches, 1)
    _check_int("num_model_chunks", num_model_chunks, 1)


def _comm(ops: Sequence[Action]) -> List[Step]:
    """Zero, one lone action or one Exchange for a group of communication actions."""
    if not ops:
        return []
    return [ops[0]] if len(ops) == 1 else [Exchange(tuple(ops))]


# --------------------------------------------------------------------------------------------
# schedules


def no_pipelining(num_microbatches: int) -> List[Step]:
    """pp = 1: forward then backward of each microbatch in turn, gradients accumulating.

    Only one microbatch's activations are alive at a time; there is no bubble.
    """
    _validate(1, 0, num_microbatches)
    steps: List[Step] = []
    for i in range(num_microbatches):
        steps += [Action(FORWARD, i), Action(BACKWARD, i)]
    return steps


def gpipe(pp_size: int, pp_rank: int, num_microbatches: int) -> List[Step]:
    """GPipe: all M forwards (receive, compute, send), then all M backwards in the same order.

    Every rank holds the activations of all M microbatches at the flush; bubble fraction
    ``(p - 1) / (M + p - 1)``.
    """
    _validate(pp_size, pp_rank, num_microbatches)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    steps: List[Step] = []
    for i in range(num_microbatches):
        steps += _comm([] if first else [Action(RECV_FORWARD, i)])
        steps.append(Action(FORWARD, i))
        steps += _comm([] if last else [Action(SEND_FORWARD, i)])
    for i in range(num_microbatches):
        steps += _comm([] if last else [Action(RECV_BACKWARD, i)])
        steps.append(Action(BACKWARD, i))
        steps += _comm([] if first else [Action(SEND_BACKWARD, i)])
    return steps


def one_f_one_b(pp_size: int, pp_rank: int, num_microbatches: int) -> List[Step]:
    """Megatron's non-interleaved 1F1B (PipeDream-flush) schedule for rank ``pp_rank``.

    * warmup: ``w = min(p - r - 1, M)`` forwards, each ``RF(i) F(i) SF(i)``;
    * steady state, k = 0 .. M - w - 1: ``F(w + k) [SF(w + k) RB(k)] B(k) [SB(k) RF(w + k + 1)]``
      (the bracketed pairs go to one peer and are batched, as Megatron's
      ``send_forward_recv_backward`` / ``send_backward_recv_forward``; unbatched they deadlock);
    * cooldown: ``RB(k) B(k) SB(k)`` for the last w microbatches.

    Rank r holds at most ``min(p - r, M)`` microbatches' activations; bubble fraction
    ``(p - 1) / (M + p - 1)``.
    """
    _validate(pp_size, pp_rank, num_microbatches)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    m = num_microbatches
    warmup = min(pp_size - pp_rank - 1, m)
    remaining = m - warmup

    def rf(i: int) -> List[Action]:
        return [] if first else [Action(RECV_FORWARD, i)]

    def sf(i: int) -> List[Action]:
        return [] if last else [Action(SEND_FORWARD, i)]

    def rb(i: int) -> List[Action]:
        return [] if last else [Action(RECV_BACKWARD, i)]

    def sb(i: int) -> List[Action]:
        return [] if first else [Action(SEND_BACKWARD, i)]

    steps: List[Step] = []
    for i in range(warmup):
        steps += _comm(rf(i)) + [Action(FORWARD, i)] + _comm(sf(i))
    if remaining:
        steps += _comm(rf(warmup))
    for k in range(remaining):
        j = warmup + k
        steps.append(Action(FORWARD, j))
        steps += _comm(sf(j) + rb(k))
        steps.append(Action(BACKWARD, k))
        steps += _comm(sb(k) + (rf(j + 1) if k < remaining - 1 else []))
    for k in range(remaining, m):
        steps += _comm(rb(k)) + [Action(BACKWARD, k)] + _comm(sb(k))
    return steps


def num_warmup_steps(pp_size: int, pp_rank: int, num_microbatches: int, num_model_chunks: int = 1) -> int:
    """Forward steps a rank runs before its first backward (Megatron's ``num_warmup_microbatches``).

    1F1B (``num_model_chunks == 1``): ``min(p - r - 1, M)``. Interleaved: ``min((p - r - 1) * 2 +
    (v - 1) * p, v * M)`` chunk-forwards: the v - 1 earlier chunks of one group of p
    microbatches on every rank, plus two per later rank so the last rank can start 1F1B at once.
    """
    _validate(pp_size, pp_rank, num_microbatches, num_model_chunks)
    if num_model_chunks == 1:
        return min(pp_size - pp_rank - 1, num_microbatches)
    warmup = (pp_size - pp_rank - 1) * 2 + (num_model_chunks - 1) * pp_size
    return min(warmup, num_model_chunks * num_microbatches)


def _interleaved_order(pp_size: int, num_microbatches: int, num_model_chunks: int) -> List[Tuple[int, int]]:
    """Forward order of (microbatch, chunk): groups of p microbatches, each through every chunk.

    For p = 2, M = 4, v = 2: (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1).
    """
    order = []
    for group in range(0, num_microbatches, pp_size):
        for chunk in range(num_model_chunks):
            order += [(i, chunk) for i in range(group, group + pp_size)]
    return order


def interleaved_one_f_one_b(
    pp_size: int, pp_rank: int, num_microbatches: int, num_model_chunks: int
) -> List[Step]:
    """Megatron's interleaved 1F1B over ``v = num_model_chunks`` virtual stages per rank.

    Forward step k (k = 0 .. vM - 1) runs ``order[k]`` of :func:`_interleaved_order` (groups of
    p microbatches through chunk 0, then chunk 1, ...); backward step k runs the same
    microbatch on chunk ``v - 1 - c``. After ``W = num_warmup_steps(...)`` warmup forwards each
    steady step is ``F(W + k) B(k) [exchange]``, and the cooldown runs the last W backwards.

    Communication follows Megatron: each compute step is followed by one Exchange that sends
    its result and receives the tensor the peer is producing *at the same time*, to be used
    later. A rank r > 0 receives the input of its next forward step; rank 0 receives from the
    last rank, which trails it by p - 1 steps, the output of the last rank's forward step
    k - (p - 1) (input of chunk c + 1 on rank 0). Backward mirrors this with the last rank
    receiving from rank 0. Needs ``M % p == 0`` (as Megatron without
    ``microbatch_group_size_per_vp_stage``), ``p >= 2`` and ``v >= 2`` (with v = 1 this step
    structure leaves the pipeline half idle; '1f1b' is the schedule for one chunk).

    Rank r holds at most ``min(W + 1, vM)`` chunk activations (each 1/v of the rank's layers);
    bubble fraction ``(p - 1) / (v M + p - 1)``.
    """
    _validate(pp_size, pp_rank, num_microbatches, num_model_chunks)
    if pp_size < 2:
        raise ValueError(f"the interleaved schedule needs pp_size >= 2, got {pp_size}; use '1f1b' or 'none'")
    if num_model_chunks < 2:
        raise ValueError(
            f"the interleaved schedule needs num_model_chunks >= 2, got {num_model_chunks}; use '1f1b'"
        )
    if num_microbatches % pp_size:
        raise ValueError(
            f"the interleaved schedule needs num_microbatches ({num_microbatches}) to be a multiple "
            f"of pp_size ({pp_size})"
        )
    p, r, v = pp_size, pp_rank, num_model_chunks
    order = _interleaved_order(p, num_microbatches, v)
    total = len(order)
    warmup = num_warmup_steps(p, r, num_microbatches, v)
    remaining = total - warmup

    def fwd(k: int) -> Tuple[int, int]:
        return order[k]

    def bwd(k: int) -> Tuple[int, int]:
        i, c = order[k]
        return i, v - 1 - c

    def is_first(chunk: int) -> bool:
        return r == 0 and chunk == 0

    def is_last(chunk: int) -> bool:
        return r == p - 1 and chunk == v - 1

    def send_f(k: int) -> List[Action]:
        i, c = fwd(k)
        return [] if is_last(c) else [Action(SEND_FORWARD, i, c)]

    def send_b(k: int) -> List[Action]:
        i, c = bwd(k)
        return [] if is_first(c) else [Action(SEND_BACKWARD, i, c)]

    def recv_f_after(k: int) -> List[Action]:
        """Activation received in the exchange after forward step k."""
        if r > 0:
            return [Action(RECV_FORWARD, *fwd(k + 1))] if k + 1 < total else []
        j = k - (p - 1)  # the last rank's forward step running alongside
        if j < 0 or fwd(j)[1] == v - 1:
            return []
        i, c = fwd(j)
        return [Action(RECV_FORWARD, i, c + 1)]

    def recv_b_after(k: int) -> List[Action]:
        """Output gradient received in the exchange after backward step k."""
        if r < p - 1:
            return [Action(RECV_BACKWARD, *bwd(k + 1))] if k + 1 < total else []
        j = k - (p - 1)  # rank 0's backward step running alongside
        if j < 0 or bwd(j)[1] == 0:
            return []
        i, c = bwd(j)
        return [Action(RECV_BACKWARD, i, c - 1)]

    def first_recv_b() -> List[Action]:
        return [] if is_last(bwd(0)[1]) else [Action(RECV_BACKWARD, *bwd(0))]

    steps: List[Step] = []
    steps += _comm([] if is_first(fwd(0)[1]) else [Action(RECV_FORWARD, *fwd(0))])
    for k in range(warmup):
        steps.append(Action(FORWARD, *fwd(k)))
        extra = first_recv_b() if (k == warmup - 1 and remaining) else []
        steps += _comm(send_f(k) + recv_f_after(k) + extra)
    for k in range(remaining):
        f = warmup + k
        steps += [Action(FORWARD, *fwd(f)), Action(BACKWARD, *bwd(k))]
        steps += _comm(send_f(f) + send_b(k) + recv_f_after(f) + recv_b_after(k))
    if not remaining:
        steps += _comm(first_recv_b())
    for k in range(remaining, total):
        steps.append(Action(BACKWARD, *bwd(k)))
        steps += _comm(send_b(k) + recv_b_after(k))
    return steps


SCHEDULES = ("none", "gpipe", "1f1b", "interleaved")


def schedule_name(pp_size: int, num_chunks: int, pipeline_schedule: str = "1f1b") -> str:
    """The schedule a run uses: ``none`` without pipelining, ``interleaved`` with several model
    chunks per rank, else ``pipeline_schedule`` (``--pipeline-schedule``: 1f1b or gpipe)."""
    if pp_size == 1:
        return "none"
    return "interleaved" if num_chunks > 1 else pipeline_schedule


def build_schedule(
    name: str, pp_size: int, pp_rank: int, num_microbatches: int, num_model_chunks: int = 1
) -> List[Step]:
    """Rank ``pp_rank``'s steps for schedule ``name`` (one of :data:`SCHEDULES`)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    _validate(pp_size, pp_rank, num_microbatches, num_model_chunks)
    if name != "interleaved" and num_model_chunks != 1:
        raise ValueError(
            f"schedule {name!r} runs one model chunk per rank, got num_model_chunks={num_model_chunks}; "
            "use 'interleaved'"
        )
    if name == "none":
        if pp_size != 1:
            raise ValueError(f"schedule 'none' needs pp_size 1, got {pp_size}; use '1f1b' or 'gpipe'")
        return no_pipelining(num_microbatches)
    if name == "gpipe":
        return gpipe(pp_size, pp_rank, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(pp_size, pp_rank, num_microbatches)
    return interleaved_one_f_one_b(pp_size, pp_rank, num_microbatches, num_model_chunks)


def build_rank_schedules(
    name: str, pp_size: int, num_microbatches: int, num_model_chunks: int = 1
) -> List[List[Step]]:
    """Every rank's steps, ``[build_schedule(name, pp_size, r, ...) for r in range(pp_size)]``."""
    _check_int("pp_size", pp_size, 1)
    return [build_schedule(name, pp_size, r, num_microbatches, num_model_chunks) for r in range(pp_size)]


def bubble_fraction(name: str, pp_size: int, num_microbatches: int, num_model_chunks: int = 1) -> Fraction:
    """Idle time over total time per rank, with free communication and equal stages.

    ``(p - 1) / (v M + p - 1)`` for 'gpipe', '1f1b' (v = 1) and 'interleaved'; 0 for 'none'.
    With t_f, t_b the times of a whole rank's layers (a chunk step taking t_f / v, t_b / v) the
    makespan is ``(v M + p - 1)(t_f + t_b) / v`` against ``M (t_f + t_b)`` of compute on every
    rank: the fill and drain cost p - 1 chunk-forwards and p - 1 chunk-backwards. Relative to
    the ideal time instead of the total this is Narayanan et al.'s ``(p - 1) / (v M)``. The
    simulator reproduces it exactly for any t_f, t_b (tested with t_b / t_f = 1 and 2).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    _validate(pp_size, 0, num_microbatches, num_model_chunks)
    if name == "none":
        return Fraction(0)
    v = num_model_chunks
    return Fraction(pp_size - 1, v * num_microbatches + pp_size - 1)
