"""MoE in the planner: parameter names/shapes/order equal the model's, total and active counts,
forward/backward FLOPs (top-k experts, router, shared experts) equal torch's FlopCounterMode, the
activation bytes of MoE layers equal the storages autograd saves (every router, capacity factor,
shared experts, loop or grouped GEMM; fp32 on CPU), expert parallelism's model state (hand count)
and dispatcher traffic, and the layout search proposing EP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megafast.config import GPTConfig
from megafast.model import GPTModel
from megafast.planner import (
    Cluster,
    Layout,
    Stage,
    active_parameter_count,
    attention_flops_per_token,
    chunk_activation_bytes,
    estimate,
    forward_flops_per_token,
    search,
    static_memory,
    total_parameter_count,
    training_flops_per_token,
)
from megafast.planner.moe import dispatch_bytes
from megafast.planner.parameters import stage_parameters
from planner_models import DTYPES, saved_activation_bytes

VOCAB = 256


def moe(**kw) -> GPTConfig:
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                ffn_hidden_size=48, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                add_bias_linear=False, tie_embeddings=False, make_vocab_size_divisible_by=128,
                num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24)
    base.update(kw)
    return GPTConfig(**base)


CONFIGS = {
    "mixtral_like": moe(),
    "qwen_like": moe(moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True, moe_layer_freq=(1, 1, 0, 1)),
    "gelu_every_other": moe(activation="gelu", moe_layer_freq=2, moe_router_topk=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_equal_the_model(name):
    config = CONFIGS[name]
    model = GPTModel(config, seed=1)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    want = [(p.name, p.shape) for p in stage_parameters(config, Stage((0, config.num_layers), True, True))]
    assert got == want
    assert total_parameter_count(config) == sum(p.numel() for p in model.parameters())
    glu = 2 if config.activation == "swiglu" else 1
    unused = sum(config.is_moe_layer(i) for i in range(4)) * (4 - config.moe_router_topk) * (glu + 1) * 24 * 32
    assert active_parameter_count(config) == total_parameter_count(config) - unused


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_equal_flop_counter(name):
    config = CONFIGS[name]
    b, s = 2, 16
    model = GPTModel(config, seed=1)
    ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd:
        loss = model(ids, labels=ids).sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    attention = b * s * config.num_layers * attention_flops_per_token(config, s)
    matmul = b * s * forward_flops_per_token(config, s) - attention  # CPU attention is not counted
    assert fwd.get_total_flops() == matmul
    assert bwd.get_total_flops() == 2 * matmul
    assert training_flops_per_token(config, s) == 3 * forward_flops_per_token(config, s)


# ------------------------------------------------------------------ activations, EP memory and traffic


ROUTERS = {
    "softmax": {},
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "aux_z": dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
    "seq_aux": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01),
    "capacity": dict(moe_expert_capacity_factor=4.0),  # c = E / k: no choice is ever dropped
    "shared_gated": dict(moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True),
    "gelu_shared": dict(activation="gelu", moe_shared_expert_intermediate_size=40),
}


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_activation_bytes_equal_saved_tensors(name, grouped):
    """One MoE and one dense layer, fp32 on CPU (torch kernels): the planner's bytes equal the
    storages autograd keeps, for each router, the capacity factor, shared experts, loop or grouped GEMM."""
    config = moe(num_layers=2, moe_layer_freq=(1, 0), moe_grouped_gemm=grouped, **ROUTERS[name])
    model = GPTModel(config, seed=1, params_dtype=DTYPES["fp32"])
    ids = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    layout = Layout(seq_length=32, micro_batch_size=3, dtype="fp32")
    assert saved_activation_bytes(model, ids) == chunk_activation_bytes(config, layout, Stage((0, 2), True, True), "cpu")


def test_capacity_factor_bytes_bound_the_saved_tensors():
    """With drops the experts compute fewer rows than the planner's bound min(T k, E capacity)."""
    config = moe(num_layers=2, moe_layer_freq=(1, 0), moe_expert_capacity_factor=0.75)
    model = GPTModel(config, seed=1)
    ids = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    layout = Layout(seq_length=32, micro_batch_size=3, dtype="fp32")
    predicted = chunk_activation_bytes(config, layout, Stage((0, 2), True, True), "cpu")
    measured = saved_activation_bytes(model, ids)
    assert measured <= predicted
    dropless = chunk_activation_bytes(moe(num_layers=2, moe_layer_freq=(1, 0)), layout, Stage((0, 2), True, True), "cpu")
    assert predicted < dropless + 3 * 32 * 2 * 2  # the bound is below dropless (+ the two kept masks)


def test_expert_parallel_model_state_divides_experts_over_ep():
    """Experts 1/ep per rank, their fp32 grads/masters/Adam states sharded over expert-DP = dp/ep;
    dense parameters over DP (hand count of the tiny model: every layer MoE, no padding at 1 bucket)."""
    config = moe()
    E, f, h = 4, 24, 32
    expert = 4 * E * 3 * f * h  # 4 layers x E experts x (2f + f) x h
    dense = total_parameter_count(config) - expert
    for ep, dp in ((1, 4), (2, 4), (4, 4), (2, 2)):
        base = Layout(dp=dp, ep=ep, dtype="bf16", distributed_optimizer=True, bucket_size_mb=None)
        s = static_memory(config, base, 0)
        local_experts = expert // ep
        edp = dp // ep
        pad = lambda n, d: -(-n // d) * d  # noqa: E731
        assert s.gradients == 4 * (pad(dense, dp) + pad(local_experts, edp)), (ep, dp)
        assert s.weights == 2 * (pad(dense, dp) + pad(local_experts, edp))
        assert s.master_weights == 4 * (pad(dense, dp) // dp + pad(local_experts, edp) // edp)
    with pytest.raises(ValueError, match="EP 3 must divide DP 4"):
        Layout(dp=4, ep=3).check(config)


def test_dispatcher_traffic_and_search_proposes_ep():
    config = moe(num_layers=4, hidden_size=64, num_attention_heads=4, moe_ffn_hidden_size=64)
    T, e, h, k = 2048, 2, 64, 2
    assert dispatch_bytes(config, T, e, 1, "alltoall") == 0
    assert dispatch_bytes(config, T, e, 4, "alltoall") == pytest.approx(3 / 4 * k * e * T * h)
    assert dispatch_bytes(config, T, e, 4, "allgather") == pytest.approx(3 * e * T * h)
    cluster = Cluster(num_gpus=8, gpu_memory_gb=80)
    base = Layout(dp=8, seq_length=1024, micro_batch_size=2, num_microbatches=1)
    t1 = estimate(config, base, cluster).time
    a2a = estimate(config, dataclasses.replace(base, ep=4), cluster).time
    ag = estimate(config, dataclasses.replace(base, ep=4, moe_token_dispatcher_type="allgather"), cluster).time
    assert t1.ep_comm == 0 < a2a.ep_comm < ag.ep_comm  # top-2 of 4 ranks: all-to-all moves less
    plan = search(config, cluster, 1024, 16)
    eps = {est.layout.ep for est in plan.feasible}
    assert eps >= {1, 2, 4} and all(config.num_experts % e == 0 for e in eps)



def _plan_json(*flags: str) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fixed = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--micro-batch-size", "1",
             "--recompute-granularity", "none", "--num-gpus", "8", "--global-batch-size", "64", "--json"]
    out = subprocess.run([sys.executable, str(root / "tools/plan.py"), *flags, *fixed], capture_output=True,
                         text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_plan_tool_searches_or_fixes_ep(tmp_path):
    import json

    model = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "512",
             "--vocab-size", "1000", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
             "--normalization", "RMSNorm", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128"]
    searched = _plan_json(*model)
    assert {e["layout"]["ep"] for e in searched["feasible"]} == {1, 2, 4}
    fixed = _plan_json(*model, "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather")
    layouts = [e["layout"] for e in fixed["feasible"]]
    assert layouts and all(x["ep"] == 2 and x["moe_token_dispatcher_type"] == "allgather" for x in layouts)
    assert all(e["step_time_s"]["ep_comm"] > 0 for e in fixed["feasible"])
    hf = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=1000, hidden_size=256,
              intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=512, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    assert {e["layout"]["ep"] for e in _plan_json("--hf-config", str(path))["feasible"]} == {1, 2, 4, 8}
