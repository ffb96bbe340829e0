"""Full recompute methods (--recompute-method uniform|block, --recompute-num-layers): which layers
are checkpointed, that recomputation changes neither loss nor gradients (dropout replayed), the
activation memory the planner predicts for them, and their recompute FLOPs."""

from __future__ import annotations

import pytest
import torch

from megafast.arguments import model_config, parse_args, validate_args
from megafast.model import GPTModel
from megafast.model.recompute import recompute_plan, recomputed_layers
from megafast.planner import (
    Layout,
    Stage,
    layer_forward_flops_per_token,
    training_flops_per_token,
)
from megafast.planner.memory import activation_memory, chunk_activation_bytes
from planner_models import DTYPES, gpt2, llama, saved_activation_bytes
from seeding import seed_torch


def full(method: str, n: int, **kw):
    return llama(recompute_granularity="full", recompute_method=method, recompute_num_layers=n, **kw)


@pytest.mark.parametrize(
    "method,n,layers,want",
    [
        ("uniform", 1, 3, [(0, 1, True), (1, 2, True), (2, 3, True)]),
        ("uniform", 2, 5, [(0, 2, True), (2, 4, True), (4, 5, True)]),
        ("uniform", 8, 3, [(0, 3, True)]),
        ("block", 2, 5, [(0, 1, True), (1, 2, True), (2, 5, False)]),
        ("block", 7, 3, [(0, 1, True), (1, 2, True), (2, 3, True)]),
    ],
)
def test_recompute_plan(method, n, layers, want):
    config = full(method, n, num_layers=layers)
    assert recompute_plan(config, layers) == want
    assert recomputed_layers(config, layers) == sum(e - s for s, e, c in want if c)


def test_no_or_selective_recompute_is_one_plain_group():
    for rc in (None, "selective"):
        assert recompute_plan(llama(recompute_granularity=rc), 4) == [(0, 4, False)]
    assert recompute_plan(llama(recompute_granularity="full"), 2) == [(0, 1, True), (1, 2, True)]  # defaults


def _loss_and_grads(config, seed: int, ids: torch.Tensor):
    model = GPTModel(config, seed=seed)
    model.train()
    torch.manual_seed(seed)  # the default generator drives the replicated dropout
    loss = model(ids, labels=ids)
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,n", [("uniform", 2), ("uniform", 3), ("block", 2)])
def test_recompute_methods_change_nothing_but_memory(method, n):
    """With dropout on: loss and every gradient bit-identical to the run without recomputation,
    and the activations kept shrink as the planner says."""
    seed = seed_torch("seed")  # also seeds the ids below
    kw = dict(num_layers=5, hidden_dropout=0.1, attention_dropout=0.1)
    ids = torch.randint(0, 1000, (2, 32))
    want_loss, want = _loss_and_grads(llama(**kw), seed, ids)
    got_loss, got = _loss_and_grads(full(method, n, **kw), seed, ids)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    plain = saved_activation_bytes(GPTModel(llama(**kw), seed=1), ids)
    assert saved_activation_bytes(GPTModel(full(method, n, **kw), seed=1), ids) < plain


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,n", [("uniform", 2), ("block", 1), ("block", 3)])
@pytest.mark.parametrize("dtype,dropout", [("fp32", 0.0), ("bf16", 0.1)])
def test_activation_bytes_equal_saved_tensors(arch, method, n, dtype, dropout):
    make = llama if arch == "llama" else gpt2
    config = make(
        num_layers=5, recompute_granularity="full", recompute_method=method, recompute_num_layers=n,
        hidden_dropout=dropout,
    )
    model = GPTModel(config, seed=1, params_dtype=DTYPES[dtype])
    seed_torch("data_seed")
    ids = torch.randint(0, config.vocab_size, (2, 32))
    layout = Layout(
        seq_length=32, micro_batch_size=2, recompute="full", recompute_method=method, recompute_num_layers=n,
        dtype=dtype,
    )
    assert saved_activation_bytes(model, ids) == chunk_activation_bytes(
        config, layout, Stage((0, 5), True, True), "cpu"
    )


@pytest.mark.parametrize("method,n", [(None, None), ("block", 1), ("block", 2), ("uniform", 2)])
def test_later_pipeline_stage_counts_the_received_input_once(method, n):
    """PP stage 2 of 2, torch ops in bf16: a plain first layer's norm keeps an fp32 copy of the
    received input (which the pipeline keeps too); a checkpointed first layer keeps the input itself."""
    config = llama(num_layers=4, recompute_granularity="full" if method else None, recompute_method=method,
                   recompute_num_layers=n)
    layout = Layout(seq_length=32, micro_batch_size=2, pp=2, recompute="full" if method else None,
                    recompute_method=method or "uniform", recompute_num_layers=n or 1, dtype="bf16")
    model = GPTModel(config, seed=1, layer_range=(2, 4), pre_process=False, post_process=True,
                     params_dtype=torch.bfloat16)
    seed_torch("data_seed")
    hidden = torch.randn(32, 2, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {hidden.untyped_storage().data_ptr(): hidden.untyped_storage().nbytes()}  # kept by the pipeline
    model.train()

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(hidden_states=hidden, labels=ids)
    assert sum(seen.values()) == chunk_activation_bytes(config, layout, Stage((2, 4), False, True), "cpu")


def test_uniform_groups_rematerialise_together():
    """The transient of full recompute is the longest checkpointed group's activations."""
    one, two = (Layout(seq_length=64, recompute="full", recompute_num_layers=n) for n in (1, 2))
    block = Layout(seq_length=64, recompute="full", recompute_method="block", recompute_num_layers=2)
    c = llama(num_layers=4)
    t1, t2, tb = (activation_memory(c, lay, 0).transient for lay in (one, two, block))
    assert t1 < t2 and tb == t1
    assert activation_memory(c, two, 0).stored < activation_memory(c, one, 0).stored


def test_recompute_flops_count_the_recomputed_layers():
    for method, n, again in (("uniform", 2, 4), ("block", 1, 1), ("block", 3, 3), ("block", 9, 4)):
        c = full(method, n, num_layers=4)
        extra = training_flops_per_token(c, 32, include_recompute=True) - training_flops_per_token(c, 32)
        assert extra == pytest.approx(again * layer_forward_flops_per_token(c, 32))


BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "100"]


def test_flags_reach_the_model_and_are_validated():
    args = parse_args(BASE + ["--recompute-granularity", "full", "--recompute-method", "block",
                              "--recompute-num-layers", "2"])
    validate_args(args, world_size=1)
    config = model_config(args, 100)
    assert (config.recompute_method, config.recompute_num_layers) == ("block", 2)
    assert recompute_plan(config, 4) == [(0, 1, True), (1, 2, True), (2, 4, False)]
    args = parse_args(BASE + ["--recompute-method", "uniform"])
    with pytest.raises(SystemExit, match="add --recompute-granularity full"):
        validate_args(args, world_size=1)
    with pytest.raises(ValueError, match="recompute-num-layers must be >= 1"):
        full("uniform", 0)
