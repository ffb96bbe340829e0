"""The MoE figures of the training log (issue 13).

- The router counts, per MoE layer, the (token, expert) choices each expert processes: equal to a
  plain-torch count of the top-k choices (dropless) and of the choices left after the capacity
  drop (a per-expert loop in this test), not counted again by an activation recompute.
- A tiny MoE Llama pretrained at PP=2 (the logging rank holds only the last two layers): the
  stdout line shows the load-balancing and z losses; TensorBoard (read back with tensorboard's
  EventAccumulator) holds ``moe/layer_{i}/tokens_per_expert/expert_{e}`` for every MoE layer and
  no dense one, equal to the jsonl record's ``tokens_per_expert``, summing to the global batch's
  tokens x top-k each iteration; the logged TFLOP/s count active parameters (a hand count of the
  tiny model's multiply-adds, written here).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from seeding import draw_seed

from megafast.config import GPTConfig
from megafast.data.indexed_dataset import IndexedDatasetBuilder
from megafast.model.moe import MoELossTracker
from megafast.model.moe.router import TopKRouter
from pretrain_run import MODEL, TRAIN, VOCAB, data_args, torchrun, train_records

E, K, LAYERS = 4, 2, 4


def _config(**kw) -> GPTConfig:
    return GPTConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, vocab_size=64, ffn_hidden_size=64,
                     num_experts=E, moe_router_topk=K, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01,
                     add_bias_linear=False, **kw)


def _reference_counts(x: torch.Tensor, weight: torch.Tensor, capacity_factor) -> torch.Tensor:
    """Choices per expert: top-k of softmax routing, then (with a capacity factor) each expert keeps
    its ceil(T k / E c) highest-weight choices."""
    logits = x.double() @ weight.double().t()  # [T, E]
    top, idx = logits.topk(K, dim=-1)
    w = torch.softmax(top, dim=-1)
    counts = torch.zeros(E, dtype=torch.int64)
    for e in range(E):
        chosen = [(w[t, j].item(), t) for t in range(x.shape[0]) for j in range(K) if idx[t, j] == e]
        if capacity_factor is not None:
            cap = max(1, min(math.ceil(x.shape[0] * K / E * capacity_factor), x.shape[0]))
            chosen = sorted(chosen, reverse=True)[:cap]
        counts[e] = len(chosen)
    return counts


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_router_counts_tokens_per_expert(capacity_factor):
    seed = draw_seed("seed")
    torch.manual_seed(seed)
    tracker = MoELossTracker()
    router = TopKRouter(_config(moe_expert_capacity_factor=capacity_factor), 3, seed, tracker).train()
    xs = [torch.randn(24, 32, requires_grad=True), torch.randn(10, 32, requires_grad=True)]  # two micro-batches
    want = torch.zeros(E, dtype=torch.int64)
    for x in xs:
        probs, _ = router(x, (x.shape[0], 1))
        probs.sum().backward()
        want += _reference_counts(x.detach(), router.weight.detach(), capacity_factor)
    assert list(tracker.tokens_per_expert) == [3]
    got = tracker.tokens_per_expert[3]
    assert torch.equal(got, want), f"seed {seed}: {got.tolist()} != {want.tolist()}"
    if capacity_factor is None:
        assert int(got.sum()) == 34 * K
    # a forward rerun inside backward (activation recompute) is not counted again
    x = torch.randn(8, 32, requires_grad=True)
    before = got.clone()
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # the rerun goes through the count
        y = torch.utils.checkpoint.checkpoint(lambda t: router(t, (8, 1))[0], x, use_reentrant=False)
        once = tracker.tokens_per_expert[3].clone()
        y.sum().backward()
    assert torch.equal(tracker.tokens_per_expert[3], once) and int((once - before).sum()) <= 8 * K
    tracker.reset()
    assert tracker.tokens_per_expert == {}


MOE = ["--num-experts", str(E), "--moe-router-topk", str(K), "--moe-ffn-hidden-size", "32",
       "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--moe-layer-freq", "[1,1,0,1]"]
ITERS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    seed = random.SystemRandom().randrange(1 << 31)
    tmp = tmp_path_factory.mktemp(f"moe_logging_seed{seed}_")
    prefix = str(tmp / "corpus_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(100):
        doc = rng.integers(0, VOCAB - 1, rng.integers(5, 60)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    log, tb = tmp / "log.jsonl", tmp / "tb"
    proc = torchrun(2, MODEL + MOE + TRAIN + data_args(prefix, tmp) + [
        "--pipeline-model-parallel-size", "2", "--train-iters", str(ITERS), "--log-jsonl", str(log),
        "--tensorboard-dir", str(tb), "--gpu-peak-tflops", "1.0"])
    return proc, train_records(log), tb


def test_log_line_shows_the_router_losses(run):
    proc, _, _ = run
    lines = [line for line in proc.stdout.splitlines() if " iteration " in line and "lm loss:" in line]
    assert len(lines) == ITERS, proc.stdout[-2000:]
    assert all("load_balancing_loss:" in line and "z_loss:" in line for line in lines), lines[0]


def test_tensorboard_tokens_per_expert_per_layer(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, records, tb = run
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("moe/")]
    moe_layers = [0, 1, 3]  # --moe-layer-freq [1,1,0,1]; layers 0, 1 live on the other stage
    assert sorted(tags) == sorted(f"moe/layer_{i}/tokens_per_expert/expert_{e}" for i in moe_layers for e in range(E))
    tokens_x_topk = 8 * 16 * K  # global batch 8 x seq 16, top-2, dropless
    for it in range(1, ITERS + 1):
        rec = records[it]["tokens_per_expert"]
        assert sorted(rec) == [str(i) for i in moe_layers]
        for i in moe_layers:
            tb_counts = [next(ev.value for ev in acc.Scalars(f"moe/layer_{i}/tokens_per_expert/expert_{e}")
                              if ev.step == it) for e in range(E)]
            assert tb_counts == pytest.approx(rec[str(i)], rel=1e-6)
            assert sum(rec[str(i)]) == tokens_x_topk and all(float(c).is_integer() for c in rec[str(i)])
        assert records[it]["load_balancing_loss"] > 0 and records[it]["z_loss"] > 0


def test_tflops_count_active_parameters(run):
    _, records, _ = run
    h, s, heads, d, vocab = 32, 16, 4, 8, VOCAB  # --make-vocab-size-divisible-by 1: vocab not padded
    attn_weights = h * (heads * d + 2 * 2 * d) + heads * d * h  # q, k, v (2 groups), proj
    moe_layer = attn_weights + h * E + K * 3 * 32 * h + K * h  # router, top-2 SwiGLU experts, weighted combine
    dense_layer = attn_weights + 3 * 64 * h
    attention = 2 * s * heads * d  # QK^T and PV, causal (half of 2 x 2 s H d)
    forward = 2 * (3 * moe_layer + dense_layer + h * vocab) + LAYERS * attention
    for rec in records.values():
        flops_per_token = rec["tflops_per_gpu"] * 1e12 * 2 / rec["tokens_per_sec"]  # 2 ranks
        assert flops_per_token == pytest.approx(3 * forward, rel=1e-9)
        assert rec["mfu"] == pytest.approx(rec["tflops_per_gpu"], rel=1e-9)  # --gpu-peak-tflops 1
