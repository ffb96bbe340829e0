"""RNG streams for dropout under tensor parallelism, and activation recompute replaying them.

- RNGStatesTracker.fork draws from (and advances) a named stream and leaves the default one alone;
- model_parallel_rng_tracker gives each TP rank its own stream (seed + 2718 + tp_rank);
- in a GPTModel at TP = 2 on gloo: hidden dropout draws the same mask on both TP ranks without
  sequence parallelism (the activations are replicated) and a per-rank mask with it; attention
  dropout (each rank's own heads) always draws from the per-rank stream;
- recompute ("full" and "selective") with dropout on is bit-identical to no recompute.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dist import run_distributed
from seeding import draw_seed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState, RNGStatesTracker, model_parallel_rng_tracker
from megafast.parallel.random import MODEL_PARALLEL_RNG, TP_SEED_OFFSET, checkpointed, tensor_parallel_dropout

P = 0.3  # dropout probability used throughout


def draws(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Successive torch.rand draws of a fresh generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) for s in shapes]


@pytest.fixture
def seeds() -> tuple[int, int]:
    a = draw_seed("seed")
    return a, a + 1 + draw_seed("stream_offset") % (1 << 20)


# ----------------------------------------------------------------------------------------------
# the tracker itself


def test_fork_uses_and_advances_the_named_stream_only(seeds):
    default_seed, stream_seed = seeds
    tracker = RNGStatesTracker()
    torch.manual_seed(default_seed)
    tracker.add("dropout", stream_seed)  # adding does not touch the default generator
    want_default = draws(default_seed, (4,), (3,))
    want_stream = draws(stream_seed, (5,), (6,), (2,), (7,))

    assert torch.equal(torch.rand(4), want_default[0])
    with tracker.fork("dropout"):
        assert torch.equal(torch.rand(5), want_stream[0])
    with tracker.fork("dropout"):  # continues where the last fork stopped
        assert torch.equal(torch.rand(6), want_stream[1])
    assert torch.equal(torch.rand(3), want_default[1]), "fork disturbed the default generator"

    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.fork("dropout"):
            torch.rand(2)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before), "an exception inside fork leaked the stream"
    with tracker.fork("dropout"):  # the 2 draws before the exception still advanced the stream
        assert torch.equal(torch.rand(7), want_stream[3])


def test_tracker_states_round_trip_and_errors(seeds):
    tracker = RNGStatesTracker()
    tracker.add("a", seeds[0])
    snapshot = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(8)
    with tracker.fork("a"):
        assert not torch.equal(torch.rand(8), first)
    tracker.set_states(snapshot)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(8), first)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 1)
    with pytest.raises(ValueError, match="never added"):
        with tracker.fork("b"):
            pass


def test_model_parallel_tracker_gives_each_tp_rank_its_own_stream(seeds):
    seed = seeds[0]
    got = []
    for tp_rank in range(4):
        tracker = model_parallel_rng_tracker(seed, tp_rank)
        with tracker.fork():
            got.append(torch.rand(16))
        assert torch.equal(got[-1], draws(seed + TP_SEED_OFFSET + tp_rank, (16,))[0])
        with model_parallel_rng_tracker(seed, tp_rank).fork(MODEL_PARALLEL_RNG):  # same seed, same stream
            assert torch.equal(torch.rand(16), got[-1])
    assert all(not torch.equal(got[i], got[j]) for i in range(4) for j in range(i))


def test_tensor_parallel_dropout_streams(seeds):
    """Replicated activations draw from the default generator, sharded ones from the rank's stream."""
    default_seed, model_seed = seeds
    x = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(default_seed))
    tracker = model_parallel_rng_tracker(model_seed, tp_rank=1)
    tracker_before = tracker.get_states()

    torch.manual_seed(default_seed)
    got = tensor_parallel_dropout(x, P, training=True, tracker=tracker, sharded=False)
    torch.manual_seed(default_seed)
    assert torch.equal(got, F.dropout(x, P, training=True)), f"replicated mask, seeds {seeds}"
    assert torch.equal(tracker.get_states()[MODEL_PARALLEL_RNG], tracker_before[MODEL_PARALLEL_RNG])

    torch.manual_seed(default_seed)
    got = tensor_parallel_dropout(x, P, training=True, tracker=tracker, sharded=True)
    assert torch.equal(torch.rand(5), draws(default_seed, (5,))[0]), f"default stream touched, seeds {seeds}"
    torch.manual_seed(model_seed + TP_SEED_OFFSET + 1)
    assert torch.equal(got, F.dropout(x, P, training=True)), f"sharded mask, seeds {seeds}"

    before = torch.get_rng_state()
    for training, p in ((False, P), (True, 0.0)):
        for sharded in (False, True):
            assert tensor_parallel_dropout(x, p, training=training, tracker=tracker, sharded=sharded) is x
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpointed_replays_default_and_tracker_streams(seeds):
    """Recompute of a function with dropout from both streams gives the same gradient, and leaves
    both streams where the plain run leaves them."""
    seed, data_seed = seeds
    x0 = torch.randn(64, 8, generator=torch.Generator().manual_seed(data_seed + 1))

    def fn(tracker):
        def f(x):
            a = F.dropout(x, P, training=True)  # default stream
            with tracker.fork():
                b = F.dropout(a.sin(), P, training=True)  # tracker stream
            return b * x

        return f

    results = []
    for recompute in (False, True):
        torch.manual_seed(data_seed)
        tracker = model_parallel_rng_tracker(seed, 0)
        x = x0.clone().requires_grad_()
        y = checkpointed(fn(tracker), tracker, x) if recompute else fn(tracker)(x)
        torch.rand(3)  # draws between forward and backward must not leak into the recompute
        with tracker.fork():
            torch.rand(3)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, torch.get_rng_state(), tracker.get_states()[MODEL_PARALLEL_RNG]))
    (y0, g0, d0, t0), (y1, g1, d1, t1) = results
    assert (y0 == 0).any(), "dropout was not active"
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert torch.equal(d0, d1), "recompute moved the default generator"
    assert torch.equal(t0, t1), "recompute moved the tracker's stream"


# ----------------------------------------------------------------------------------------------
# dropout inside GPTModel at TP = 2 (gloo)


def dropout_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=32,
        make_vocab_size_divisible_by=1, hidden_dropout=P, attention_dropout=P, init_method_std=0.2,
    )
    base.update(kw)
    return GPTConfig(**base)


def dropout_worker(rank: int, tp: int, seed: int, data_seed: int) -> dict:
    out = {}
    config = dropout_config()
    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=tp))
    model = GPTModel(config, state, seed=seed).train()
    layer = model.decoder.layers["0"]

    # Attention dropout, called directly with the same q/k/v and default seed on every rank.
    g = torch.Generator().manual_seed(data_seed)
    shape = (2, config.num_attention_heads // tp, 12, config.head_dim)  # (b, heads/p, s, d)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    torch.manual_seed(data_seed)
    before = torch.get_rng_state()
    out["attn"] = layer.self_attention.core_attention(q, k, v)
    out["attn_default_untouched"] = torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(seed + TP_SEED_OFFSET + rank)  # what the rank's forked stream starts from
    out["attn_expected"] = F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)
    out["attn_no_dropout"] = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    # Hidden dropout without sequence parallelism: the default generator, same seed on every rank.
    x = torch.ones(12, 2, config.hidden_size)
    torch.manual_seed(data_seed + 1)
    out["hidden"] = layer.dropout(x)
    torch.manual_seed(data_seed + 1)
    out["hidden_expected"] = F.dropout(x, P, training=True)

    # With sequence parallelism every rank holds a different shard: the per-rank stream.
    sp_state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True))
    sp_layer = GPTModel(config, sp_state, seed=seed).train().decoder.layers["0"]
    torch.manual_seed(data_seed + 1)
    before = torch.get_rng_state()
    out["hidden_sp"] = sp_layer.dropout(x)
    out["hidden_sp_default_untouched"] = torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(seed + TP_SEED_OFFSET + rank)
    out["hidden_sp_expected"] = F.dropout(x, P, training=True)

    # The whole model: each layer's output is replicated on the TP ranks (the masks agree).
    fresh = GPTModel(config, state, seed=seed)
    captured: dict = {}
    for name, lyr in fresh.decoder.layers.items():
        lyr.register_forward_hook(lambda mod, args, res, name=name: captured.__setitem__(name, res.detach()))
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=g)
    for mode in ("train", "eval"):
        getattr(fresh, mode)()
        torch.manual_seed(data_seed + 2)
        with torch.no_grad():
            fresh(ids)
        out[f"layers_{mode}"] = dict(captured)
    return out


@pytest.fixture(scope="module")
def tp2_dropout():
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    return run_distributed(dropout_worker, 2, seed, data_seed)


def test_attention_dropout_uses_the_per_rank_stream(tp2_dropout):
    r0, r1 = tp2_dropout
    for r, got in enumerate(tp2_dropout):
        assert got["attn_default_untouched"], f"rank {r}: core_attention advanced the default generator"
        assert torch.equal(got["attn"], got["attn_expected"]), f"rank {r}: not seed + 2718 + tp_rank's mask"
        assert not torch.equal(got["attn"], got["attn_no_dropout"]), "attention dropout was not applied"
    # identical inputs and default seeds on both ranks, yet different masks
    assert torch.equal(r0["attn_no_dropout"], r1["attn_no_dropout"])
    assert not torch.equal(r0["attn"], r1["attn"])


def test_hidden_dropout_mask_is_shared_without_sp_and_per_rank_with_sp(tp2_dropout):
    r0, r1 = tp2_dropout
    for r, got in enumerate(tp2_dropout):
        assert torch.equal(got["hidden"], got["hidden_expected"]), f"rank {r}: not the default stream's mask"
        assert got["hidden_sp_default_untouched"], f"rank {r}: SP dropout advanced the default generator"
        assert torch.equal(got["hidden_sp"], got["hidden_sp_expected"]), f"rank {r}: SP mask not per-rank"
    assert (r0["hidden"] == 0).any() and (r0["hidden"] != 0).any()
    assert torch.equal(r0["hidden"], r1["hidden"])
    assert not torch.equal(r0["hidden_sp"], r1["hidden_sp"])


def test_layer_outputs_stay_replicated_across_tp_ranks_with_dropout(tp2_dropout):
    r0, r1 = tp2_dropout
    for name in ("0", "1"):
        a, b = r0["layers_train"][name], r1["layers_train"][name]
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"layer {name} output differs across TP ranks: {m}"
        )
        assert (a - r0["layers_eval"][name]).abs().max() > 1e-3, "dropout had no effect in training mode"


# ----------------------------------------------------------------------------------------------
# activation recompute


def recompute_configs() -> dict[str, GPTConfig]:
    gpt2 = dropout_config(hidden_dropout=0.2, attention_dropout=0.2)
    llama = dropout_config(
        hidden_dropout=0.2, attention_dropout=0.2, num_query_groups=2, position_embedding_type="rope",
        normalization="RMSNorm", activation="swiglu", add_bias_linear=False, tie_embeddings=False,
    )
    return {"gpt2": gpt2, "llama": llama}


def loss_and_grads(
    config: GPTConfig, granularity, seed: int, data_seed: int, ids, labels, train: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    config = dataclasses.replace(config, recompute_granularity=granularity)
    torch.manual_seed(data_seed)
    model = GPTModel(config, seed=seed).train(train)
    loss = model(ids, labels=labels)
    (loss.sum() / (labels != -100).sum()).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_recompute_with_dropout_is_bit_identical(name, seeds):
    seed, data_seed = seeds
    config = recompute_configs()[name]
    g = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, config.vocab_size, (2, 16), generator=g)
    labels[0, :2] = -100
    base_loss, base_grads = loss_and_grads(config, None, seed, data_seed, ids, labels)
    eval_loss, _ = loss_and_grads(config, None, seed, data_seed, ids, labels, train=False)
    other_loss, _ = loss_and_grads(config, None, seed, data_seed + 1, ids, labels)
    assert not torch.equal(base_loss, eval_loss), "dropout was not active"
    assert not torch.equal(base_loss, other_loss), "the default seed did not change the dropout masks"
    for granularity in ("full", "selective"):
        loss, grads = loss_and_grads(config, granularity, seed, data_seed, ids, labels)
        assert torch.equal(loss, base_loss), f"{granularity}: loss differs from no recompute"
        assert grads.keys() == base_grads.keys()
        for n, grad in grads.items():
            assert torch.equal(grad, base_grads[n]), f"{granularity}: grad of {n} differs from no recompute"
