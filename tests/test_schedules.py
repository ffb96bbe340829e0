"""Pipeline schedules (pure action lists) checked and timed by the simulator.

Bubble fraction, as the simulator measures it: with communication free, a rank's idle time is
the makespan minus its own compute; the fraction is idle / makespan. For GPipe and 1F1B every
rank computes ``M (t_f + t_b)`` and idles ``(p - 1)(t_f + t_b)`` (filling and draining the
pipeline), so the fraction is ``(p - 1)(t_f + t_b) / ((M + p - 1)(t_f + t_b))``, i.e.
``(p - 1) / (M + p - 1)`` whatever t_b / t_f. Interleaving v chunks per rank makes the fill and
drain cost p - 1 *chunk* steps: with each chunk step taking t_f, t_b a rank computes
``v M (t_f + t_b)`` and idles ``(p - 1)(t_f + t_b)``, giving ``(p - 1) / (v M + p - 1)``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import List

import pytest

from megafast.pipeline import (
    BACKWARD,
    FORWARD,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    Action,
    DeadlockError,
    Exchange,
    ScheduleError,
    Step,
    bubble_fraction,
    build_rank_schedules,
    build_schedule,
    comm_ops,
    gpipe,
    interleaved_one_f_one_b,
    no_pipelining,
    num_warmup_steps,
    one_f_one_b,
    peer_chunk,
    peer_rank,
    simulate,
)

TIMINGS = [(1, 1), (1, 2)]  # (t_f, t_b): equal, and backward twice the forward


def _compute_order(steps: List[Step]) -> str:
    return " ".join(str(s) for s in steps if isinstance(s, Action) and s.is_compute)


# --------------------------------------------------------------------------------------------
# every schedule passes the simulator, with the expected bubble and memory


def test_no_pipelining() -> None:
    for m in range(1, 33):
        steps = no_pipelining(m)
        assert steps == build_schedule("none", 1, 0, m)
        for t_f, t_b in TIMINGS:
            result = simulate([steps], m, forward_time=t_f, backward_time=t_b)
            assert result.makespan == m * (t_f + t_b)
            assert result.bubble_fraction == 0 == bubble_fraction("none", 1, m)
            assert result.peak_in_flight == (1,)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_and_memory(name: str) -> None:
    for p in range(1, 9):
        for m in range(1, 33):
            schedules = build_rank_schedules(name, p, m)
            expected = Fraction(p - 1, m + p - 1)
            assert bubble_fraction(name, p, m) == expected
            for t_f, t_b in TIMINGS:
                result = simulate(schedules, m, forward_time=t_f, backward_time=t_b)
                assert result.makespan == (m + p - 1) * (t_f + t_b), (name, p, m, t_f, t_b)
                assert result.idle == ((p - 1) * (t_f + t_b),) * p  # every rank idles the same
                assert result.bubble_fraction == expected, (name, p, m, t_f, t_b)
                assert result.rank_bubble_fraction == (expected,) * p
            if name == "gpipe":
                assert result.peak_in_flight == (m,) * p
            else:  # 1F1B: warmup p - r - 1 forwards, then one more before the first backward
                assert result.peak_in_flight == tuple(min(p - r, m) for r in range(p)), (p, m)


def test_interleaved_bubble_memory_and_gain() -> None:
    for v in (2, 3):
        for p in range(2, 9):
            for m in range(p, 33, p):
                schedules = build_rank_schedules("interleaved", p, m, v)
                expected = Fraction(p - 1, v * m + p - 1)
                assert bubble_fraction("interleaved", p, m, v) == expected
                for t_f, t_b in TIMINGS:
                    result = simulate(schedules, m, v, forward_time=t_f, backward_time=t_b)
                    assert result.makespan == (v * m + p - 1) * (t_f + t_b), (v, p, m, t_f, t_b)
                    assert result.bubble_fraction == expected, (v, p, m, t_f, t_b)
                    one_f_one_b_result = simulate(build_rank_schedules("1f1b", p, m), m, 1, t_f, t_b)
                    assert result.bubble_fraction < one_f_one_b_result.bubble_fraction
                warmups = [min((p - r - 1) * 2 + (v - 1) * p, v * m) for r in range(p)]
                assert [num_warmup_steps(p, r, m, v) for r in range(p)] == warmups
                # counted in chunk activations, each 1/v of the rank's layers
                assert result.peak_in_flight == tuple(min(w + 1, v * m) for w in warmups), (v, p, m)


def test_interleaved_bubble_formula_holds_for_other_timings() -> None:
    for t_f, t_b in [(Fraction(1, 2), Fraction(3, 2)), (3, 5), (2, 1)]:
        for p, m, v in [(2, 6, 2), (4, 8, 3), (3, 9, 2), (8, 16, 2)]:
            result = simulate(build_rank_schedules("interleaved", p, m, v), m, v, t_f, t_b)
            assert result.bubble_fraction == Fraction(p - 1, v * m + p - 1)


def test_float_times_give_float_fractions() -> None:
    result = simulate(build_rank_schedules("1f1b", 4, 8), 8, forward_time=1.0, backward_time=2.0)
    assert isinstance(result.bubble_fraction, float)
    assert result.bubble_fraction == pytest.approx(3 / 11)


# --------------------------------------------------------------------------------------------
# the exact orders (Megatron's)


def test_one_f_one_b_order_matches_megatron() -> None:
    # p = 4, M = 6: rank 0 warms up with 3 forwards, rank 3 starts 1F1B at once.
    assert _compute_order(one_f_one_b(4, 0, 6)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert _compute_order(one_f_one_b(4, 3, 6)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # fewer microbatches than the warmup: all forwards, then all backwards
    assert _compute_order(one_f_one_b(4, 0, 2)) == "F0 F1 B0 B1"
    steps = one_f_one_b(3, 1, 4)
    assert [str(s) for s in steps[:7]] == ["RF0", "F0", "SF0", "RF1", "F1", "[SF1 RB0]", "B0"]


def test_gpipe_order() -> None:
    assert _compute_order(gpipe(3, 1, 3)) == "F0 F1 F2 B0 B1 B2"
    assert [str(s) for s in gpipe(2, 0, 2)] == ["F0", "SF0", "F1", "SF1", "RB0", "B0", "RB1", "B1"]


def test_interleaved_order_matches_megatron() -> None:
    # Megatron's table for p = 2, M = 4, v = 2: groups of p microbatches through each chunk;
    # "F1.1" is microbatch 1 on chunk 1. Rank 0 warms up with (2 - 0 - 1) * 2 + 1 * 2 = 4.
    assert _compute_order(interleaved_one_f_one_b(2, 0, 4, 2)) == (
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    )
    assert _compute_order(interleaved_one_f_one_b(2, 1, 4, 2)) == (
        "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3"
    )


def test_peers_wrap_between_chunks() -> None:
    p = 4

    def peer(kind, chunk: int, rank: int):
        action = Action(kind, 0, chunk)
        return peer_rank(action, p, rank), peer_chunk(action, p, rank)

    # (rank, chunk) -> (peer rank, peer chunk); chunk c on rank r is virtual stage c * p + r
    assert peer(SEND_FORWARD, 0, 3) == (0, 1)  # stage 3 -> stage 4
    assert peer(RECV_FORWARD, 1, 0) == (3, 0)  # stage 4 <- stage 3
    assert peer(SEND_BACKWARD, 1, 0) == (3, 0)  # stage 4 -> stage 3
    assert peer(RECV_BACKWARD, 0, 3) == (0, 1)  # stage 3 <- stage 4
    assert peer(SEND_FORWARD, 1, 1) == (2, 1)  # stage 5 -> stage 6
    with pytest.raises(ValueError, match="no previous stage"):
        peer_chunk(Action(RECV_FORWARD, 0, 0), p, 0)
    with pytest.raises(ValueError, match="no peer"):
        peer_rank(Action(FORWARD, 0), p, 0)
    assert comm_ops(Action(FORWARD, 0)) == ()
    assert comm_ops(Action(SEND_FORWARD, 0)) == (Action(SEND_FORWARD, 0),)


# --------------------------------------------------------------------------------------------
# the checker can fail


def _remove(steps: List[Step], target: Action) -> List[Step]:
    out: List[Step] = []
    for step in steps:
        if step == target:
            continue
        if isinstance(step, Exchange) and target in step.ops:
            rest = tuple(op for op in step.ops if op != target)
            out += [Exchange(rest)] if len(rest) > 1 else list(rest)
            continue
        out.append(step)
    return out


def _unbatch(steps: List[Step]) -> List[Step]:
    """Split every Exchange into its lone actions, in ops order."""
    out: List[Step] = []
    for step in steps:
        out += list(step.ops) if isinstance(step, Exchange) else [step]
    return out


def test_catches_missing_send() -> None:
    schedules = build_rank_schedules("1f1b", 3, 4)
    schedules[1] = _remove(schedules[1], Action(SEND_FORWARD, 2))
    with pytest.raises(ScheduleError, match="rank 1 microbatch 2 .*missing SEND_FORWARD"):
        simulate(schedules, 4)


def test_catches_backward_before_forward() -> None:
    steps = no_pipelining(3)
    steps[0], steps[1] = steps[1], steps[0]
    with pytest.raises(ScheduleError, match="BACKWARD at step 0 comes before its FORWARD"):
        simulate([steps], 3)


def test_catches_unbatched_1f1b_deadlock() -> None:
    # Megatron batches send_forward+recv_backward; issued one by one (send first) both ranks block.
    schedules = [_unbatch(s) for s in build_rank_schedules("1f1b", 2, 4)]
    with pytest.raises(DeadlockError, match="deadlock: rank 0 at step .* waits for rank") as info:
        simulate(schedules, 4)
    assert sorted(info.value.blocked) == [0, 1]
    assert all(not step.is_compute for _, step in info.value.blocked.values())


def test_catches_swapped_order_deadlock() -> None:
    # rank 0 waits for the gradient of microbatch 0 before sending the activation of microbatch 1,
    # which rank 1 needs before it can produce that gradient... under GPipe rank 1 computes F1 first.
    schedules = build_rank_schedules("gpipe", 2, 2)
    rank0 = schedules[0]
    i, j = rank0.index(Action(SEND_FORWARD, 1)), rank0.index(Action(RECV_BACKWARD, 0))
    rank0[i], rank0[j] = rank0[j], rank0[i]
    with pytest.raises(DeadlockError, match="rank 0 at step 3 RB0 waits for rank"):
        simulate(schedules, 2)


def test_catches_fifo_mismatch() -> None:
    schedules = build_rank_schedules("gpipe", 2, 2)
    # rank 1 receives microbatch 1 first, but rank 0 sends microbatch 0 first
    schedules[1] = [Action(RECV_FORWARD, 1), Action(RECV_FORWARD, 0)] + [
        s for s in schedules[1] if not (isinstance(s, Action) and s.kind is RECV_FORWARD)
    ]
    with pytest.raises(ScheduleError, match="sends SF0 to rank 1, but the receive it pairs with"):
        simulate(schedules, 2)


def test_catches_structure_errors() -> None:
    with pytest.raises(ScheduleError, match="unexpected SEND_FORWARD .* on the last stage"):
        simulate([no_pipelining(1) + [Action(SEND_FORWARD, 0)]], 1)
    with pytest.raises(ScheduleError, match="appears twice"):
        simulate([no_pipelining(1) + [Action(FORWARD, 0)]], 1)
    with pytest.raises(ScheduleError, match="missing BACKWARD"):
        simulate([[Action(FORWARD, 0)]], 1)
    with pytest.raises(ScheduleError, match="microbatch 2 >= num_microbatches"):
        simulate([no_pipelining(3)], 2)
    with pytest.raises(ScheduleError, match="chunk 1 >= num_model_chunks"):
        simulate(build_rank_schedules("interleaved", 2, 2, 2), 2, 1)
    with pytest.raises(ScheduleError, match="RECV_BACKWARD at step .* must come before its BACKWARD"):
        steps = gpipe(2, 0, 1)  # F0 SF0 RB0 B0
        simulate([[steps[0], steps[1], steps[3], steps[2]], gpipe(2, 1, 1)], 1)
    with pytest.raises(ScheduleError, match="not an Action or Exchange"):
        simulate([["F0"]], 1)  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: one_f_one_b(0, 0, 4), "pp_size must be an integer >= 1"),
        (lambda: one_f_one_b(4, 4, 4), "pp_rank 4 is out of range for pp_size 4"),
        (lambda: gpipe(4, -1, 4), "pp_rank must be an integer >= 0"),
        (lambda: gpipe(2, 0, 0), "num_microbatches must be an integer >= 1"),
        (lambda: no_pipelining(True), "num_microbatches must be an integer"),
        (lambda: interleaved_one_f_one_b(2, 0, 4, 0), "num_model_chunks must be an integer >= 1"),
        (lambda: interleaved_one_f_one_b(2, 0, 4, 1), "needs num_model_chunks >= 2"),
        (lambda: interleaved_one_f_one_b(4, 0, 6, 2), r"num_microbatches \(6\) to be a multiple of pp_size"),
        (lambda: interleaved_one_f_one_b(1, 0, 4, 2), "needs pp_size >= 2"),
        (lambda: build_schedule("zb", 2, 0, 4), "unknown pipeline schedule 'zb'"),
        (lambda: build_schedule("none", 2, 0, 4), "'none' needs pp_size 1"),
        (lambda: build_schedule("1f1b", 2, 0, 4, 2), "one model chunk per rank"),
        (lambda: bubble_fraction("gpipe", 0, 4), "pp_size must be"),
        (lambda: Action(FORWARD, -1), "microbatch must be an int >= 0"),
        (lambda: Action("F", 0), "kind must be an ActionKind"),  # type: ignore[arg-type]
        (lambda: Exchange(()), "at least one communication action"),
        (lambda: Exchange((Action(FORWARD, 0),)), "must be communication Actions"),
        (lambda: simulate([], 1), "at least one rank"),
        (lambda: simulate([no_pipelining(2)], 0), "num_microbatches must be an integer >= 1"),
        (lambda: simulate([no_pipelining(2)], 2, backward_time=-1), "backward_time must be a number >= 0"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_exchange_ops_and_schedule_kinds() -> None:
    exchange = Exchange([Action(SEND_BACKWARD, 1), Action(RECV_FORWARD, 2)])
    assert exchange.ops == (Action(SEND_BACKWARD, 1), Action(RECV_FORWARD, 2))
    schedules = build_rank_schedules("interleaved", 4, 8, 2)
    kinds = {op.kind for steps in schedules for step in steps for op in comm_ops(step)}
    assert kinds == {SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD, RECV_BACKWARD}
    assert BACKWARD.value == "B"
