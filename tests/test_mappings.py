"""The tensor/sequence-parallel collectives of megafast.parallel.mappings on gloo, TP = 2 and 4.

Every rank regenerates every rank's input and upstream gradient from one shared seed, so the
expected forward output and input gradient of each collective is computed here by hand from the
full set of inputs (sums, concatenations, chunks) and compared with what each rank got.
"""

from __future__ import annotations


import pytest
import torch

from dist import run_distributed
from seeding import draw_seed, seed_torch
from megafast.config import ParallelConfig
from megafast.parallel import ParallelState
from megafast.parallel import mappings as M
from megafast.parallel.layers import shard, unshard

RTOL = 1e-5  # fp32; the absolute floor is RTOL times the tensor's largest magnitude
S, B, H = 3, 2, 5  # per-rank chunk sizes: first dim S * tp, last dim H * tp when split

def _full(p):  # [S*p, B, H*p]
    return (S * p, B, H * p)


def _seq_full(p):  # [S*p, B, H]
    return (S * p, B, H)


def _last_shard(p):  # [S*p, B, H]: a last-dim shard of _full
    return (S * p, B, H)


def _seq_shard(p):  # [S, B, H]: a first-dim shard of _seq_full
    return (S, B, H)


AUTOGRAD_CASES = [
    # name, function, kwargs, per-rank input shape, per-rank output shape (as functions of tp)
    ("copy_to", M.copy_to_tensor_parallel_region, {}, _full, _full),
    ("reduce_from", M.reduce_from_tensor_parallel_region, {}, _full, _full),
    ("scatter_to", M.scatter_to_tensor_parallel_region, {}, _full, _last_shard),
    ("gather_from", M.gather_from_tensor_parallel_region, {}, _last_shard, _full),
    ("sp_scatter", M.scatter_to_sequence_parallel_region, {}, _seq_full, _seq_shard),
    ("sp_gather", M.gather_from_sequence_parallel_region, {}, _seq_shard, _seq_full),
    (
        "sp_gather_no_tp_grad",
        M.gather_from_sequence_parallel_region,
        {"tensor_parallel_output_grad": False},
        _seq_shard,
        _seq_full,
    ),
    ("sp_reduce_scatter", M.reduce_scatter_to_sequence_parallel_region, {}, _seq_full, _seq_shard),
]
NAMES = [c[0] for c in AUTOGRAD_CASES]
HELPER_DIMS = {"all_gather": (0, 1, -1), "reduce_scatter": (0, 1, -1), "split": (0, 1, -1)}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Elementwise |a - e| <= RTOL * (|e| + max |e|) (sums that cancel judged at the tensor's scale)."""
    atol = RTOL * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def rank_tensors(seed: int, tag: int, tp: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Every rank's tensor of one role (input or upstream gradient), from the shared seed."""
    g = torch.Generator().manual_seed(seed * 1000 + tag)
    return [torch.randn(shape, generator=g) for _ in range(tp)]


def case_data(seed: int, index: int, tp: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    _, _, _, in_shape, out_shape = AUTOGRAD_CASES[index]
    inputs = rank_tensors(seed, 2 * index, tp, in_shape(tp))
    return inputs, rank_tensors(seed, 2 * index + 1, tp, out_shape(tp))


def helper_inputs(seed: int, tp: int) -> list[torch.Tensor]:
    # every dim divisible by tp (and by 2 * tp for dim 1 of the split/reduce-scatter cases)
    return rank_tensors(seed, 999, tp, (2 * tp, 2 * tp, 3 * tp))


def mappings_worker(rank: int, tp: int, seed: int) -> dict:
    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=tp))
    group = state.tp_group
    assert group is not None and M.group_size(group) == tp and M.group_rank(group) == rank
    out: dict = {"autograd": {}, "helpers": {}}
    for index, (name, fn, kwargs, _, _) in enumerate(AUTOGRAD_CASES):
        xs, gs = case_data(seed, index, tp)
        x = xs[rank].clone().requires_grad_()
        y = fn(x, group, **kwargs)
        y.backward(gs[rank])
        out["autograd"][name] = {
            "y": y.detach().clone(),
            "grad": x.grad.clone(),
            "x_after": x.detach().clone(),
        }

    xs = helper_inputs(seed, tp)
    x = xs[rank].clone()
    reduced = M.all_reduce(x, group)
    out["helpers"]["all_reduce"] = reduced
    out["helpers"]["all_reduce_input_untouched"] = torch.equal(x, xs[rank])
    for dim in HELPER_DIMS["all_gather"]:
        out["helpers"][("all_gather", dim)] = M.all_gather(x, dim, group)
    for dim in HELPER_DIMS["reduce_scatter"]:
        out["helpers"][("reduce_scatter", dim)] = M.reduce_scatter(x, dim, group)
    for dim in HELPER_DIMS["split"]:
        out["helpers"][("split", dim)] = M.split(x, dim, group)

    errors = {}
    for what, call in {
        "split": lambda: M.split(torch.zeros(tp + 1, 4), 0, group),
        "reduce_scatter": lambda: M.reduce_scatter(torch.zeros(4, tp + 1), 1, group),
        "sp_scatter": lambda: M.scatter_to_sequence_parallel_region(torch.zeros(tp + 1, 2, 2), group),
    }.items():
        try:
            call()
            errors[what] = None
        except ValueError as e:
            errors[what] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def seed() -> int:
    return draw_seed("seed")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"tp{p}")
def results(request, seed):
    tp = request.param
    return tp, run_distributed(mappings_worker, tp, seed)


def expected_autograd(name: str, xs: list[torch.Tensor], gs: list[torch.Tensor], r: int):
    """(forward output, input gradient) of rank r, from every rank's input and upstream grad."""
    p = len(xs)
    total_x, total_g = torch.stack(xs).sum(0), torch.stack(gs).sum(0)
    if name == "copy_to":  # identity / all-reduce
        return xs[r], total_g
    if name == "reduce_from":  # all-reduce / identity
        return total_x, gs[r]
    if name == "scatter_to":  # own chunk of the last dim / all-gather last dim
        return xs[r].chunk(p, -1)[r], torch.cat(gs, -1)
    if name == "gather_from":  # all-gather last dim / own chunk
        return torch.cat(xs, -1), gs[r].chunk(p, -1)[r]
    if name == "sp_scatter":  # own chunk of the first dim / all-gather first dim
        return xs[r].chunk(p, 0)[r], torch.cat(gs, 0)
    if name == "sp_gather":  # all-gather first dim / reduce-scatter first dim
        return torch.cat(xs, 0), total_g.chunk(p, 0)[r]
    if name == "sp_gather_no_tp_grad":  # all-gather first dim / own chunk of the (full) gradient
        return torch.cat(xs, 0), gs[r].chunk(p, 0)[r]
    if name == "sp_reduce_scatter":  # reduce-scatter first dim / all-gather first dim
        return total_x.chunk(p, 0)[r], torch.cat(gs, 0)
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_autograd_collective_forward_and_backward(results, seed, name):
    tp, per_rank = results
    index = NAMES.index(name)
    xs, gs = case_data(seed, index, tp)
    for r in range(tp):
        got = per_rank[r]["autograd"][name]
        want_y, want_grad = expected_autograd(name, xs, gs, r)
        close(got["y"], want_y, f"{name} forward, rank {r}")
        close(got["grad"], want_grad, f"{name} backward, rank {r}")
        assert torch.equal(got["x_after"], xs[r]), f"{name} modified its input on rank {r}"


def test_helpers(results, seed):
    tp, per_rank = results
    xs = helper_inputs(seed, tp)
    total = torch.stack(xs).sum(0)
    for r in range(tp):
        got = per_rank[r]["helpers"]
        assert got["all_reduce_input_untouched"], "all_reduce modified its input"
        close(got["all_reduce"], total, f"all_reduce rank {r}")
        for dim in HELPER_DIMS["all_gather"]:
            assert torch.equal(got[("all_gather", dim)], torch.cat(xs, dim)), f"all_gather dim {dim} rank {r}"
        for dim in HELPER_DIMS["reduce_scatter"]:
            close(got[("reduce_scatter", dim)], total.chunk(tp, dim)[r], f"reduce_scatter dim {dim} rank {r}")
        for dim in HELPER_DIMS["split"]:
            assert torch.equal(got[("split", dim)], xs[r].chunk(tp, dim)[r]), f"split dim {dim} rank {r}"


def test_indivisible_split_is_a_clear_value_error(results):
    tp, per_rank = results
    for r in range(tp):
        for what, message in per_rank[r]["errors"].items():
            assert message is not None, f"{what} of a dim of size {tp + 1} over {tp} ranks did not raise"
            assert f"not divisible by the group size {tp}" in message, message


def test_none_group_is_the_identity():
    assert M.group_size(None) == 1 and M.group_rank(None) == 0
    seed_torch()
    x = torch.randn(4, 3, 6)
    for name, fn, kwargs, _, _ in AUTOGRAD_CASES:
        leaf = x.clone().requires_grad_()
        y = fn(leaf, None, **kwargs)
        assert torch.equal(y, x), name
        g = torch.randn_like(x)
        y.backward(g)
        assert torch.equal(leaf.grad, g), name
    assert M.all_reduce(x, None) is x
    for dim in (0, 1, -1):
        assert M.all_gather(x, dim, None) is x
        assert M.reduce_scatter(x, dim, None) is x
        assert M.split(x, dim, None) is x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_unshard_round_trip(dim, size, stride):
    shape = [3, 5]
    shape[dim] = 2 * stride * size * 3  # each rank's chunk of each block has 6 rows
    seed_torch()
    full = torch.randn(shape)
    parts = [shard(full, dim, r, size, stride) for r in range(size)]
    for r, part in enumerate(parts):
        # by hand: rank r's chunk of each of the `stride` blocks, stacked in block order
        block = shape[dim] // stride
        per = block // size
        idx = torch.cat([torch.arange(s * block + r * per, s * block + (r + 1) * per) for s in range(stride)])
        assert torch.equal(part, full.index_select(dim, idx)), f"rank {r}"
    assert torch.equal(unshard(parts, dim, stride), full)


def test_shard_with_stride_two_keeps_gate_and_up_halves():
    """SwiGLU's [gate; up] at TP 2: rank r holds [gate_r; up_r]."""
    seed_torch()
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    full = torch.cat([gate, up])
    assert torch.equal(shard(full, 0, 1, 2, stride=2), torch.cat([gate[4:], up[4:]]))
    assert not torch.equal(shard(full, 0, 1, 2, stride=2), shard(full, 0, 1, 2, stride=1))
