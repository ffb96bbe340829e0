"""Impossible layouts fail early with one clear ValueError; vocabulary padding; Megatron's rank order.

Every layout error must be raised before any process-group work (torch.distributed stays
uninitialised) and name the problem and the flag that fixes it, on one line.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

from dist import run_distributed
from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.model import GPTModel
from megafast.parallel import ParallelState

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def gpt(**kw) -> GPTConfig:
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8, vocab_size=1000)
    base.update(kw)
    return GPTConfig(**base)


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    assert not dist.is_initialized(), "a layout error must come before any process group work"
    return message


# ----------------------------------------------------------------------------------------------
# model/layout combinations that cannot be sharded

LAYOUT_ERRORS = [
    # (model kwargs, tp, pp, world size or None, expected message regex)
    (dict(hidden_size=96, num_attention_heads=12), 8, 1, None,
     r"tensor parallel size 8 does not divide 12 attention heads.*--tensor-model-parallel-size"),
    (dict(num_attention_heads=8, num_query_groups=2), 4, 1, None,
     r"tensor parallel size 4 does not divide 2 query groups.*--num-query-groups"),
    (dict(ffn_hidden_size=100), 8, 1, None,
     r"tensor parallel size 8 does not divide FFN hidden size 100.*--ffn-hidden-size"),
    (dict(num_layers=2), 1, 4, None,
     r"pipeline parallel size 4 exceeds the 2 layers.*--pipeline-model-parallel-size"),
    (dict(), 2, 2, 6,
     r"world size 6 is not a multiple of tensor x pipeline parallel size 2 x 2 = 4.*--nproc-per-node"),
]


@pytest.mark.parametrize(
    "model_kw, tp, pp, world, match", LAYOUT_ERRORS, ids=["heads", "groups", "ffn", "pp>layers", "world"]
)
def test_validate_layout_rejects_impossible_layouts(model_kw, tp, pp, world, match):
    config = gpt(**model_kw)
    raises_one_line(match, validate_layout, config, ParallelConfig(tp, pp), world)


def test_valid_layout_passes():
    validate_layout(gpt(num_query_groups=4, ffn_hidden_size=96), ParallelConfig(4, 4), world_size=32)
    assert ParallelConfig(4, 4).data_parallel_size(32) == 2
    assert ParallelConfig(2, 1).data_parallel_size(2) == 1


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(hidden_size=100, num_attention_heads=16),
            r"hidden size 100 is not divisible by 16 attention heads.*--num-attention-heads",
        ),
        (
            dict(num_attention_heads=8, num_query_groups=3),
            r"8 attention heads are not divisible by 3 query groups.*--num-query-groups",
        ),
        (dict(num_layers=0), r"num_layers must be >= 1"),
        (dict(hidden_dropout=1.0), r"hidden_dropout must be in \[0, 1\)"),
        (
            dict(position_embedding_type="rope", hidden_size=24, num_attention_heads=8),
            r"RoPE needs an even head dimension",
        ),
        (dict(recompute_granularity="layer"), r"unknown recompute granularity"),
    ],
    ids=["hidden%heads", "heads%groups", "no-layers", "dropout", "rope-odd", "recompute"],
)
def test_gpt_config_rejects_impossible_models(kw, match):
    raises_one_line(match, gpt, **kw)


def test_parallel_config_rejects_nonpositive_sizes():
    raises_one_line(r"must be >= 1", ParallelConfig, 0, 1)
    raises_one_line(r"must be >= 1", ParallelConfig, 1, 0)
    assert ParallelConfig(1, 1, sequence_parallel=True).sequence_parallel is False  # nothing to shard over


def test_world_size_mismatch_in_data_parallel_size():
    match = r"world size 12 is not a multiple of .* 8 x 1 = 8"
    raises_one_line(match, ParallelConfig(8, 1).data_parallel_size, 12)


def test_gpt_model_rejects_tp_not_dividing_heads():
    state = ParallelState(tp_size=3, tp_rank=0)  # no group needed: the check comes first
    match = r"tensor parallel size 3 does not divide 4 attention heads"
    raises_one_line(match, GPTModel, gpt(num_attention_heads=4), state)


@pytest.fixture
def no_process_group():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():  # only if the code under test wrongly initialised it
        dist.destroy_process_group()


def test_from_env_with_mismatching_world_size_fails_before_init(monkeypatch, no_process_group):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    # A short timeout so that a missing check fails the test quickly instead of waiting for rank 1.
    raises_one_line(
        r"world size 3 is not a multiple of tensor x pipeline parallel size 2 x 1 = 2",
        ParallelState.from_env, ParallelConfig(2, 1), backend="gloo", timeout_minutes=0.05,
    )
    assert not dist.is_initialized()


def test_from_env_without_torchrun_says_launch_with_torchrun(monkeypatch, no_process_group):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    message = raises_one_line(r"launch with torchrun", ParallelState.from_env, ParallelConfig())
    assert all(var in message for var in TORCHRUN_VARS), message
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    match = r"MASTER_ADDR, MASTER_PORT are not set: launch with torchrun"
    message = raises_one_line(match, ParallelState.from_env, ParallelConfig())
    assert "RANK," not in message


# ----------------------------------------------------------------------------------------------
# vocabulary padding (Megatron's rule)


def megatron_padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's _vocab_size_with_padding, verbatim in spirit: increment until divisible."""
    after = vocab
    multiple = divisible_by * tp
    while after % multiple != 0:
        after += 1
    return after


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [
        (50257, 128, 1, 50304),  # GPT-2
        (50257, 128, 2, 50432),
        (50257, 128, 4, 50688),
        (50257, 128, 8, 51200),
        (32000, 128, 1, 32000),  # Llama 2: already a multiple
        (32000, 128, 8, 32768),
        (128256, 128, 8, 129024),  # Llama 3
        (1001, 1, 1, 1001),
        (1001, 1, 2, 1002),
        (1001, 1, 4, 1004),
        (1, 128, 1, 128),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, expected):
    config = gpt(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    assert config.padded_vocab_size(tp) == expected
    assert expected == megatron_padded_vocab(vocab, divisible_by, tp)


def test_padded_vocab_size_random_cases():
    rng = random.Random()
    for _ in range(200):
        vocab, div, tp = rng.randrange(1, 300000), rng.choice([1, 2, 8, 64, 128]), rng.choice([1, 2, 3, 4, 8])
        got = gpt(vocab_size=vocab, make_vocab_size_divisible_by=div).padded_vocab_size(tp)
        assert got == megatron_padded_vocab(vocab, div, tp), (vocab, div, tp)
        multiple = div * tp
        assert got % multiple == 0 and vocab <= got < vocab + multiple
        assert got == math.ceil(vocab / multiple) * multiple


# ----------------------------------------------------------------------------------------------
# ParallelState.create: Megatron's rank order, rank = pp * dp * tp + dp * tp + tp

LAYOUTS = [(2, 2), (8, 1), (1, 8), (4, 1)]  # (tp, pp) on 8 ranks


def group_ranks(group) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def layout_worker(rank: int, world: int) -> dict:
    out = {}
    for tp, pp in LAYOUTS:
        state = ParallelState.create(ParallelConfig(tp, pp))
        summed = torch.tensor([float(rank)])
        if state.tp_group is not None:  # the group really connects the ranks it lists
            dist.all_reduce(summed, group=state.tp_group)
        out[(tp, pp)] = {
            "coords": (state.tp_rank, state.dp_rank, state.pp_rank),
            "sizes": (state.tp_size, state.dp_size, state.pp_size),
            "rank": state.rank,
            "world": state.world_size,
            "first_last": (state.is_first_stage, state.is_last_stage),
            "tp": group_ranks(state.tp_group),
            "dp": group_ranks(state.dp_group),
            "pp": group_ranks(state.pp_group),
            "mp": group_ranks(state.model_parallel_group),
            "emb": group_ranks(state.embedding_group),
            "pp_ranks": state.pp_ranks,
            "tp_sum": summed.item(),
        }
    return out


def megatron_layout(rank: int, world: int, tp: int, pp: int) -> dict:
    """The expected coordinates and groups, enumerated from rank = p*dp*tp + d*tp + t."""
    dp = world // (tp * pp)
    table = {(p, d, t): p * dp * tp + d * tp + t for p in range(pp) for d in range(dp) for t in range(tp)}
    (p0, d0, t0) = next(k for k, v in table.items() if v == rank)

    def ranks(pred) -> list[int]:
        return sorted(v for k, v in table.items() if pred(*k))

    def or_none(rs: list[int]) -> list[int] | None:
        return rs if len(rs) > 1 else None

    pipeline = ranks(lambda p, d, t: d == d0 and t == t0)
    tp_group = ranks(lambda p, d, t: p == p0 and d == d0)
    return {
        "coords": (t0, d0, p0),
        "sizes": (tp, dp, pp),
        "rank": rank,
        "world": world,
        "first_last": (p0 == 0, p0 == pp - 1),
        "tp": or_none(tp_group),
        "dp": or_none(ranks(lambda p, d, t: p == p0 and t == t0)),
        "pp": or_none(pipeline),
        "mp": or_none(ranks(lambda p, d, t: d == d0)),
        # first and last stage share the tied embedding; middle stages are in no such group
        "emb": [pipeline[0], pipeline[-1]] if pp > 1 and rank in (pipeline[0], pipeline[-1]) else None,
        "pp_ranks": pipeline,
        "tp_sum": float(sum(tp_group)),
    }


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(layout_worker, 8)


@pytest.mark.parametrize("tp, pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_create_follows_megatron_rank_order(layouts, tp, pp):
    for rank, got in enumerate(layouts):
        assert got[(tp, pp)] == megatron_layout(rank, 8, tp, pp), f"rank {rank}"


def test_create_tp2_pp2_dp2_spelled_out(layouts):
    """The 8-rank example, written out: tp fastest, then dp, then pp."""
    got = [r[(2, 2)] for r in layouts]
    assert [g["coords"] for g in got] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1),
    ]
    assert [g["tp"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    assert [g["dp"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert [g["pp"] for g in got] == [[0, 4], [1, 5], [2, 6], [3, 7], [0, 4], [1, 5], [2, 6], [3, 7]]
    assert [g["mp"] for g in got] == [[0, 1, 4, 5], [0, 1, 4, 5], [2, 3, 6, 7], [2, 3, 6, 7]] * 2
