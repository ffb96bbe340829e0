"""The planner with context parallelism: at seq 4096 the activations a rank saves (counted with
saved_tensors_hooks, as test_planner.py does) are what the planner predicts, byte for byte, and
CP=4 keeps at most 30% of what CP=1 keeps; sharding, FLOPs, traffic and the longest-sequence search."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from dist import run_distributed
from planner_models import llama
from megafast.planner import Layout, Stage, chunk_activation_bytes, context_parallel_cost, longest_sequence, peak_memory

SEQ = 4096


def config():
    return llama(num_layers=2, attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=SEQ)


def saved_bytes(model, ids, position_ids) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with saved_tensors_hooks(pack, lambda t: t):
        model(ids, position_ids=position_ids, labels=ids)
    return sum(seen.values())


def _measure(rank, world):
    from megafast.config import ParallelConfig
    from megafast.model import GPTModel
    from megafast.parallel.context_parallel import slice_sequence
    from megafast.parallel.state import ParallelState

    ids = torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for comm in ("p2p", "a2a"):
        state = ParallelState.create(ParallelConfig(context_parallel_size=world, cp_comm_type=comm))
        model = GPTModel(config(), state, seed=1)
        positions = torch.arange(SEQ)[None]
        out[comm] = saved_bytes(model, slice_sequence(ids, world, rank), slice_sequence(positions, world, rank))
    if rank == 0:  # CP = 1 on the same rank (no communication)
        out["cp1"] = saved_bytes(GPTModel(config(), seed=1), ids, None)
    return out


def test_context_parallel_activation_bytes_are_predicted_and_shrink():
    results = run_distributed(_measure, 4)
    stage = Stage((0, 2), True, True)
    cp1 = results[0]["cp1"]
    assert cp1 == chunk_activation_bytes(config(), Layout(seq_length=SEQ, dtype="fp32"), stage, "cpu")
    for comm in ("p2p", "a2a"):
        layout = Layout(seq_length=SEQ, dtype="fp32", cp=4, cp_comm_type=comm)
        predicted = chunk_activation_bytes(config(), layout, stage, "cpu")
        for rank, r in enumerate(results):
            assert r[comm] == predicted, f"{comm} rank {rank}: saved {r[comm]} bytes, planner {predicted}"
        assert predicted <= 0.30 * cp1, f"{comm}: CP=4 keeps {predicted / cp1:.1%} of CP=1's activations"


def test_distributed_optimizer_shards_over_data_and_context_parallel_ranks():
    c = config()
    plain = peak_memory(c, Layout(seq_length=SEQ, dp=2, cp=2, distributed_optimizer=False, dtype="bf16"), "cpu")
    dp4 = peak_memory(c, Layout(seq_length=SEQ, dp=4, distributed_optimizer=True, dtype="bf16"), "cpu")
    cp2 = peak_memory(c, Layout(seq_length=SEQ, dp=2, cp=2, distributed_optimizer=True, dtype="bf16"), "cpu")
    assert cp2.static == dp4.static  # 4 shards either way
    assert cp2.static.optimizer_states < plain.static.optimizer_states


def test_attention_work_and_traffic_per_rank():
    c = config()  # 8 heads, 2 groups, head dim 8
    b, s = 2, 1024
    base = context_parallel_cost(c, Layout(seq_length=s, micro_batch_size=b, dtype="bf16"))
    assert base.attention_flops == 2 * 2 * b * s * s / 2 * 8 * 8 and base.forward_bytes == 0
    ring = context_parallel_cost(c, Layout(seq_length=s, micro_batch_size=b, dtype="bf16", cp=4))
    assert ring.attention_flops == base.attention_flops / 4
    kv = 2 * b * 2 * (s // 4) * 8  # k and v of this rank's 2 groups
    assert ring.forward_bytes == 3 * kv * 2 and ring.backward_bytes == 3 * kv * 2 + 4 * kv * 4
    a2a = context_parallel_cost(c, Layout(seq_length=s, micro_batch_size=b, dtype="bf16", cp=2, cp_comm_type="a2a"))
    assert a2a.forward_bytes == b * (s // 2) * 8 * 2 * (2 * 8 + 2 * 2) // 2


def test_longest_sequence_fits_and_the_next_does_not():
    c = config()
    for cp in (1, 4):
        layout = Layout(dtype="bf16", cp=cp)
        budget = 1.5e9
        n = longest_sequence(c, layout, budget, "cpu")
        step = 2 * cp if cp > 1 else 1
        assert n % step == 0
        at = peak_memory(c, Layout(dtype="bf16", cp=cp, seq_length=n), "cpu").total
        after = peak_memory(c, Layout(dtype="bf16", cp=cp, seq_length=n + step), "cpu").total
        assert at <= budget < after, (cp, n, at, after)
    assert longest_sequence(c, Layout(dtype="bf16", cp=4), 1e3, "cpu") is None
    one, four = (longest_sequence(c, Layout(dtype="bf16", cp=cp), 1.5e9, "cpu") for cp in (1, 4))
    assert four > 3 * one


@pytest.mark.parametrize("kw,message", [
    (dict(cp=2, seq_length=1026), "not divisible by 2 x context parallel size 2"),
    (dict(cp=4, cp_comm_type="a2a", seq_length=1024), "splits the 8 attention heads"),
])
def test_layout_check_rejects_impossible_context_parallel(kw, message):
    c = config()
    if kw.get("cp_comm_type") == "a2a":  # 8 heads do not split over 16 ranks... use 6 heads
        c = llama(num_layers=2, num_attention_heads=6, kv_channels=8, num_query_groups=2, attention_dropout=0.0)
        kw = dict(kw, cp=4)
        message = "splits the 6 attention heads"
    with pytest.raises(ValueError, match=message):
        Layout(**kw).check(c)


def test_plan_tool_finds_the_longest_sequence(capsys):
    import importlib.util
    import json
    import os

    from megafast.config import GPTConfig

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "plan.py")
    spec = importlib.util.spec_from_file_location("plan_tool_cp", tool)
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    model = ("--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4 "
             "--ffn-hidden-size 512 --swiglu --normalization RMSNorm --position-embedding-type rope "
             "--disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 32000 --hidden-dropout 0 "
             "--max-seq-length-search --json --gpu-memory-gb 8 --memory-headroom 0").split()
    answers = {}
    for cp in (1, 4):
        assert plan.main(model + ["--context-parallel-size", str(cp), "--num-gpus", str(cp)]) == 0
        answers[cp] = json.loads(capsys.readouterr().out)
    config = GPTConfig(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512,
                       activation="swiglu", normalization="RMSNorm", position_embedding_type="rope",
                       add_bias_linear=False, tie_embeddings=False, vocab_size=32000, hidden_dropout=0.0,
                       max_position_embeddings=1 << 24)
    for cp, out in answers.items():
        n = out["max_seq_length"]
        assert peak_memory(config, Layout(cp=cp, seq_length=n)).total <= 8e9
        assert peak_memory(config, Layout(cp=cp, seq_length=n + 2 * cp if cp > 1 else n + 1)).total > 8e9
    assert answers[4]["max_seq_length"] > 3 * answers[1]["max_seq_length"]
    with pytest.raises(SystemExit, match="--num-gpus 6 is not a multiple of TP x PP x CP = 4"):
        plan.main(model + ["--context-parallel-size", "4", "--num-gpus", "6"])
