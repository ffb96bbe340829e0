"""Tensor-parallel layers on gloo (TP = 2 and 4) against plain torch on the full tensors.

Each layer is built with an ``init_method`` that fills the *full* weight from a seeded generator;
the reference is the torch module (nn.Linear, nn.Embedding, F.cross_entropy) holding that full
weight. Outputs, input gradients and gathered weight/bias gradients must agree within fp32
tolerances on every rank. The upstream gradient is a random G: the scalar loss is <Y, G>, held
by every rank when the output is replicated, or split across ranks when it is sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist import run_distributed
from seeding import draw_seed
from tp_shards import chunk_shard
from megafast.config import ParallelConfig
from megafast.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    sync_sequence_parallel_grads,
    vocab_parallel_cross_entropy,
)
from megafast.parallel.layers import gather_full

RTOL = 1e-5  # fp32; the absolute floor is RTOL times the tensor's largest magnitude
SEQ, BATCH, H_IN = 3, 2, 12  # sequence length is SEQ * tp so that it splits over TP
VOCAB = 1001
IGNORE = -100


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Elementwise |a - e| <= RTOL * (|e| + max |e|): relative, with sums that cancel to ~0 judged
    against the scale of the whole tensor."""
    atol = RTOL * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded_init(seed: int, std: float, calls: list | None = None):
    """init_method filling the full weight from its own generator (and recording the shape asked)."""

    def fill(full: torch.Tensor) -> None:
        if calls is not None:
            calls.append(tuple(full.shape))
        full.normal_(0.0, std, generator=gen(seed))

    return fill


def full_weight(seed: int, std: float, shape: tuple[int, ...]) -> torch.Tensor:
    w = torch.empty(shape)
    seeded_init(seed, std)(w)
    return w


@dataclass
class LinearData:
    w_seed: int
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor  # [out]
    x: torch.Tensor  # [s, b, in]
    grad_y: torch.Tensor  # [s, b, out]


def linear_data(seed: int, tp: int, h_in: int, h_out: int) -> LinearData:
    g = gen(seed)
    w_seed = int(torch.randint(1 << 30, (1,), generator=g))
    return LinearData(
        w_seed=w_seed,
        weight=full_weight(w_seed, h_in**-0.5, (h_out, h_in)),
        bias=torch.randn(h_out, generator=g),
        x=torch.randn(SEQ * tp, BATCH, h_in, generator=g),
        grad_y=torch.randn(SEQ * tp, BATCH, h_out, generator=g),
    )


def reference_linear(d: LinearData, bias: bool) -> dict:
    ref = nn.Linear(d.weight.shape[1], d.weight.shape[0], bias=bias)
    with torch.no_grad():
        ref.weight.copy_(d.weight)
        if bias:
            ref.bias.copy_(d.bias)
    x = d.x.clone().requires_grad_()
    y = ref(x)
    y.backward(d.grad_y)
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "w_grad": ref.weight.grad,
        "b_grad": ref.bias.grad if bias else None,
    }


# ----------------------------------------------------------------------------------------------
# cases

COLUMN_CASES = [
    (gather, bias, sp, stride)
    for gather in (False, True)
    for bias in (False, True)
    for sp in (False, True)
    for stride in (1, 2)
    if not (gather and stride == 2)  # see test_column_parallel_gather_output_with_stride_two
]
ROW_CASES = [
    (input_is_parallel, bias, sp)
    for input_is_parallel in (True, False)
    for bias in (False, True)
    for sp in (False, True)
    if not (sp and not input_is_parallel)  # rejected: test_row_parallel_sp_needs_parallel_input
]
CE_CASES = ["padded", "no_padding", "whole_shard_padding"]


def column_out_size(tp: int) -> int:
    return 6 * tp  # divisible by tp * stride for stride 1 and 2


def ce_vocab(case: str, tp: int) -> tuple[int, int, int | None]:
    """(true vocabulary, padded vocabulary, vocab_size argument)."""
    if case == "padded":
        return 1531, -(-1531 // tp) * tp, 1531  # 1532 at TP 2 and 4
    if case == "no_padding":
        return 24 * tp, 24 * tp, None
    return tp + 1, 2 * tp, tp + 1  # TP 4: vocab 5 of 8, rank 3 holds only padding


def ce_data(seed: int, case: str, tp: int):
    vocab, padded, _ = ce_vocab(case, tp)
    g = gen(seed)
    logits = 3.0 * torch.randn(3, 37, padded, generator=g)
    logits[..., vocab:] = 30.0  # padding that would dominate the softmax if it were not excluded
    target = torch.randint(0, vocab, (3, 37), generator=g)
    target.view(-1)[torch.randperm(target.numel(), generator=g)[:20]] = IGNORE
    # a target in every rank's shard of the true vocabulary
    per = padded // tp
    spread = torch.tensor([min(r * per, vocab - 1) for r in range(tp)] + [vocab - 1, 0])
    target[1, : len(spread)] = spread
    weights = torch.rand(3, 37, generator=g)
    return logits, target, weights


def embedding_data(seed: int, tp: int):
    padded = -(-VOCAB // tp) * tp  # 1002 at TP 2, 1004 at TP 4
    g = gen(seed)
    w_seed = int(torch.randint(1 << 30, (1,), generator=g))
    weight = full_weight(w_seed, 1.0, (padded, 16))
    ids = torch.randint(0, VOCAB, (3, 37), generator=g)
    per = padded // tp
    edges = {min(i, VOCAB - 1) for r in range(tp) for i in (r * per, (r + 1) * per - 1)}
    boundaries = sorted(edges | {0, VOCAB - 1})
    ids[0, : len(boundaries)] = torch.tensor(boundaries)
    grad_out = torch.randn(3, 37, 16, generator=g)
    return padded, w_seed, weight, ids, grad_out


# ----------------------------------------------------------------------------------------------
# worker: builds each layer on this rank's shard and returns what it computed


def layers_worker(rank: int, tp: int, seed: int) -> dict:
    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=tp))
    group = state.tp_group
    out: dict = {}

    def gathered(t, param):
        return None if t is None else gather_full(t.detach(), param, group).clone()

    for i, case in enumerate(COLUMN_CASES):
        gather, bias, sp, stride = case
        h_out = column_out_size(tp)
        d = linear_data(seed + i, tp, H_IN, h_out)
        calls: list = []
        layer = ColumnParallelLinear(
            H_IN, h_out, tp_group=group, bias=bias, gather_output=gather, sequence_parallel=sp,
            init_method=seeded_init(d.w_seed, H_IN**-0.5, calls), partition_stride=stride,
        )
        if bias:
            with torch.no_grad():
                layer.bias.copy_(chunk_shard(d.bias, 0, rank, tp, stride))
        x = (d.x.chunk(tp, 0)[rank] if sp else d.x).clone().requires_grad_()
        y = layer(x)
        y.backward(d.grad_y if gather else chunk_shard(d.grad_y, -1, rank, tp, stride))
        before_sync = [p.grad.clone() for p in layer.parameters()]
        sync_sequence_parallel_grads(layer, group)  # column-parallel params are sharded: a no-op
        out[("column", case)] = {
            "init_calls": calls,
            "weight": layer.weight.detach().clone(),
            "weight_full": gathered(layer.weight, layer.weight),
            "y": y.detach(),
            "x_grad": x.grad,
            "w_grad": gathered(layer.weight.grad, layer.weight),
            "b_grad": gathered(layer.bias.grad, layer.bias) if bias else None,
            "sync_untouched": all(torch.equal(a, p.grad) for a, p in zip(before_sync, layer.parameters())),
        }

    for i, case in enumerate(ROW_CASES):
        input_is_parallel, bias, sp = case
        h_in, h_out = 4 * tp, 10
        d = linear_data(seed + 100 + i, tp, h_in, h_out)
        calls = []
        layer = RowParallelLinear(
            h_in, h_out, tp_group=group, bias=bias, input_is_parallel=input_is_parallel, sequence_parallel=sp,
            init_method=seeded_init(d.w_seed, h_in**-0.5, calls),
        )
        if bias:
            with torch.no_grad():
                layer.bias.copy_(d.bias)
        x = (d.x.chunk(tp, -1)[rank] if input_is_parallel else d.x).clone().requires_grad_()
        y = layer(x)
        y.backward(d.grad_y.chunk(tp, 0)[rank] if sp else d.grad_y)
        b_grad_before_sync = layer.bias.grad.clone() if bias else None
        sync_sequence_parallel_grads(layer, group)
        out[("row", case)] = {
            "init_calls": calls,
            "weight": layer.weight.detach().clone(),
            "weight_full": gathered(layer.weight, layer.weight),
            "y": y.detach(),
            "x_grad": x.grad,
            "w_grad": gathered(layer.weight.grad, layer.weight),
            "b_grad_before_sync": b_grad_before_sync,
            "b_grad": layer.bias.grad.clone() if bias else None,
        }
    try:
        RowParallelLinear(4 * tp, 8, tp_group=group, input_is_parallel=False, sequence_parallel=True)
        out["row_sp_error"] = None
    except ValueError as e:
        out["row_sp_error"] = str(e)

    padded, w_seed, _, ids, grad_out = embedding_data(seed + 200, tp)
    calls = []
    emb = VocabParallelEmbedding(padded, 16, tp_group=group, init_method=seeded_init(w_seed, 1.0, calls))
    y = emb(ids)
    y.backward(grad_out)
    out["embedding"] = {
        "init_calls": calls,
        "range": (emb.vocab_start, emb.vocab_end),
        "weight": emb.weight.detach().clone(),
        "y": y.detach(),
        "w_grad": gathered(emb.weight.grad, emb.weight),
    }

    for i, case in enumerate(CE_CASES):
        _, _, vocab_size = ce_vocab(case, tp)
        logits, target, weights = ce_data(seed + 300 + i, case, tp)
        local = logits.chunk(tp, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab_size, ignore_index=IGNORE)
        (loss * weights).sum().backward()
        out[("ce", case)] = {
            "loss": loss.detach(),
            "grad": local.grad,
            "input_untouched": torch.equal(local.detach(), logits.chunk(tp, -1)[rank]),
        }
    d = linear_data(seed + 400, tp, H_IN, column_out_size(tp))
    layer = ColumnParallelLinear(
        H_IN, column_out_size(tp), tp_group=group, bias=False, gather_output=True,
        init_method=seeded_init(d.w_seed, H_IN**-0.5), partition_stride=2,
    )
    with torch.no_grad():
        out["column_gather_stride2"] = layer(d.x)
    return out


@pytest.fixture(scope="module")
def seed() -> int:
    return draw_seed("seed")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"tp{p}")
def results(request, seed):
    tp = request.param
    return tp, run_distributed(layers_worker, tp, seed)


# ----------------------------------------------------------------------------------------------
# checks


@pytest.mark.parametrize(
    "case", COLUMN_CASES, ids=lambda c: "gather{}-bias{}-sp{}-stride{}".format(*map(int, c))
)
def test_column_parallel_linear_matches_nn_linear(results, seed, case):
    tp, per_rank = results
    gather, bias, sp, stride = case
    h_out = column_out_size(tp)
    d = linear_data(seed + COLUMN_CASES.index(case), tp, H_IN, h_out)
    want = reference_linear(d, bias)
    for r in range(tp):
        got = per_rank[r][("column", case)]
        tag = f"rank {r}"
        assert got["init_calls"] == [(h_out, H_IN)], "init_method must be called once, on the full shape"
        assert torch.equal(got["weight"], chunk_shard(d.weight, 0, r, tp, stride)), f"{tag}: not its weight shard"
        assert got["weight"].shape == (h_out // tp, H_IN)
        assert torch.equal(got["weight_full"], d.weight), f"{tag}: gather_full(weight) != full weight"
        close(got["y"], want["y"] if gather else chunk_shard(want["y"], -1, r, tp, stride), f"{tag} output")
        close(got["x_grad"], want["x_grad"].chunk(tp, 0)[r] if sp else want["x_grad"], f"{tag} input grad")
        close(got["w_grad"], want["w_grad"], f"{tag} weight grad")
        if bias:
            close(got["b_grad"], want["b_grad"], f"{tag} bias grad")
        assert got["sync_untouched"], "sync_sequence_parallel_grads changed a column-parallel gradient"


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "parallel_in{}-bias{}-sp{}".format(*map(int, c)))
def test_row_parallel_linear_matches_nn_linear(results, seed, case):
    tp, per_rank = results
    input_is_parallel, bias, sp = case
    h_in = 4 * tp
    d = linear_data(seed + 100 + ROW_CASES.index(case), tp, h_in, 10)
    want = reference_linear(d, bias)
    for r in range(tp):
        got = per_rank[r][("row", case)]
        tag = f"rank {r}"
        assert got["init_calls"] == [(10, h_in)]
        assert torch.equal(got["weight"], chunk_shard(d.weight, 1, r, tp)), f"{tag}: weight is not its shard"
        assert torch.equal(got["weight_full"], d.weight)
        close(got["y"], want["y"].chunk(tp, 0)[r] if sp else want["y"], f"{tag} output")
        want_x_grad = want["x_grad"].chunk(tp, -1)[r] if input_is_parallel else want["x_grad"]
        close(got["x_grad"], want_x_grad, f"{tag} input grad")
        close(got["w_grad"], want["w_grad"], f"{tag} weight grad")
        if bias:
            # Under SP each rank's bias saw only its sequence shard: partial until synced over TP.
            partial = d.grad_y.chunk(tp, 0)[r].sum((0, 1)) if sp else want["b_grad"]
            close(got["b_grad_before_sync"], partial, f"{tag} bias grad before sync")
            close(got["b_grad"], want["b_grad"], f"{tag} bias grad after sync_sequence_parallel_grads")


def test_row_parallel_sp_needs_parallel_input(results):
    tp, per_rank = results
    for r in range(tp):
        assert per_rank[r]["row_sp_error"] is not None
        assert "input_is_parallel=True" in per_rank[r]["row_sp_error"]


def test_vocab_parallel_embedding_matches_nn_embedding(results, seed):
    tp, per_rank = results
    padded, _, weight, ids, grad_out = embedding_data(seed + 200, tp)
    ref = nn.Embedding(padded, 16)
    with torch.no_grad():
        ref.weight.copy_(weight)
    y = ref(ids)
    y.backward(grad_out)
    per = padded // tp
    for r in range(tp):
        got = per_rank[r]["embedding"]
        assert got["init_calls"] == [(padded, 16)]
        assert got["range"] == (r * per, (r + 1) * per)
        assert torch.equal(got["weight"], chunk_shard(weight, 0, r, tp)), f"rank {r}: weight is not its shard"
        close(got["y"], y.detach(), f"rank {r} output")
        close(got["w_grad"], ref.weight.grad, f"rank {r} weight grad")
    # the ids did reach every shard, so every rank's rows received gradient
    assert all(ref.weight.grad[r * per : (r + 1) * per].abs().sum() > 0 for r in range(tp))


@pytest.mark.parametrize("case", CE_CASES)
def test_vocab_parallel_cross_entropy_matches_torch(results, seed, case):
    tp, per_rank = results
    vocab, padded, _ = ce_vocab(case, tp)
    logits, target, weights = ce_data(seed + 300 + CE_CASES.index(case), case, tp)
    z = logits.clone().requires_grad_()
    want = F.cross_entropy(
        z[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none", ignore_index=IGNORE
    ).view_as(target)
    (want * weights).sum().backward()
    assert (target == IGNORE).any() and (want[target == IGNORE] == 0).all()
    for r in range(tp):
        got = per_rank[r][("ce", case)]
        assert got["loss"].dtype == torch.float32 and got["loss"].shape == target.shape
        close(got["loss"], want.detach(), f"rank {r} loss")
        close(got["grad"], z.grad.chunk(tp, -1)[r], f"rank {r} logits grad")
        assert got["input_untouched"], f"rank {r}: the logits were modified in place"
    per = padded // tp
    for r in range(tp):  # padding columns get exactly no gradient
        pad_from = min(max(vocab - r * per, 0), per)
        pad_grad = per_rank[r][("ce", case)]["grad"][..., pad_from:]
        assert (pad_grad == 0).all(), f"rank {r}: padding got gradient"


def test_column_parallel_gather_output_with_stride_two(results, seed):
    """Y = XA + b gathered to [s, b, h_out] in the full weight's column order, also with stride 2."""
    tp, per_rank = results
    d = linear_data(seed + 400, tp, H_IN, column_out_size(tp))
    want = reference_linear(d, False)
    for r in range(tp):
        close(per_rank[r]["column_gather_stride2"], want["y"], f"rank {r} gathered output with stride 2")
