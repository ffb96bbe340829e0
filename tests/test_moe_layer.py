"""The MoE layer against a plain-torch reference written here (a loop over experts and tokens):
forward, every gradient and the router losses, fp32 to 1e-5, dropless and with a capacity factor,
softmax and sigmoid routers, with and without shared experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megafast.config import GPTConfig
from megafast.model.moe import MoELayer, MoELossTracker
from megafast.parallel.state import ParallelState
from seeding import seed_torch

E, H, FFN, SHARED = 4, 16, 12, 20
S, B = 7, 3  # T = 21 tokens: capacities are not round


def _config(**moe) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=2, vocab_size=50, ffn_hidden_size=32,
        position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        num_experts=E, moe_ffn_hidden_size=FFN, init_method_std=0.3,
    )
    base.update(moe)
    return GPTConfig(**base)


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def reference(x, params, cfg: GPTConfig):
    """y [T, h] and the router losses, one token and one expert at a time (x [s, b, h])."""
    s, b, h = x.shape
    tokens = x.reshape(s * b, h)
    T, k = tokens.shape[0], cfg.moe_router_topk
    logits = tokens @ params["router"].t()  # [T, E]
    chosen, weight = [], []
    for t in range(T):
        order = sorted(range(E), key=lambda e: -logits[t, e].item())[:k]
        if cfg.moe_router_score_function == "sigmoid":
            sig = torch.sigmoid(logits[t, order])
            w = sig / (sig.sum() + 1e-20) if k > 1 else sig
        elif cfg.moe_router_pre_softmax:
            w = torch.softmax(logits[t], dim=0)[order]
        else:
            w = torch.exp(logits[t, order] - logits[t, order].max())
            w = w / w.sum()
        chosen.append(order)
        weight.append(w)
    kept = [set(c) for c in chosen]
    if cfg.moe_expert_capacity_factor is not None:
        capacity = max(1, math.ceil(T * k / E * cfg.moe_expert_capacity_factor))
        for e in range(E):
            routed = [(weight[t][chosen[t].index(e)].item(), t) for t in range(T) if e in chosen[t]]
            for _, t in sorted(routed, reverse=True)[capacity:]:
                kept[t].discard(e)  # lowest weights dropped
    y = torch.zeros_like(tokens)
    for e in range(E):
        w1, w2 = params["fc1"][e], params["fc2"][e]
        for t in range(T):
            if e in kept[t]:
                out = _act(tokens[t] @ w1.t(), cfg.activation) @ w2.t()
                y[t] = y[t] + weight[t][chosen[t].index(e)] * out
    if cfg.moe_shared_expert_intermediate_size:
        shared = _act(tokens @ params["shared_fc1"].t(), cfg.activation) @ params["shared_fc2"].t()
        if cfg.moe_shared_expert_gate:
            shared = shared * torch.sigmoid(tokens @ params["shared_gate"].t())
        y = y + shared
    # losses: scores over all experts, top-k counts before dropping
    if cfg.moe_router_score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        sig = torch.sigmoid(logits)
        scores = sig / (sig.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.zeros(T, E)
    for t in range(T):
        for e in chosen[t]:
            counts[t, e] = 1.0
    losses = {}
    coeff = cfg.moe_aux_loss_coeff
    if cfg.moe_router_load_balancing_type == "aux_loss":
        f = counts.sum(0)
        losses["load_balancing_loss"] = coeff * E / (k * T * T) * sum(scores[:, e].sum() * f[e] for e in range(E))
    elif cfg.moe_router_load_balancing_type == "seq_aux_loss":
        per_seq = []
        for j in range(b):
            rows = [i * b + j for i in range(s)]  # tokens are [s, b] sequence-major
            f = counts[rows].sum(0) * E / (k * s)
            per_seq.append(sum(f[e] * scores[rows, e].mean() for e in range(E)))
        losses["load_balancing_loss"] = coeff * sum(per_seq) / b
    if cfg.moe_z_loss_coeff:
        lse = torch.stack([torch.log(torch.exp(logits[t]).sum()) for t in range(T)])
        losses["z_loss"] = cfg.moe_z_loss_coeff * (lse**2).mean()
    return y.reshape(s, b, h), losses


CASES = {
    "softmax_dropless": dict(moe_router_topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    "softmax_pre_capacity_shared": dict(
        moe_router_topk=2, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
        moe_shared_expert_intermediate_size=SHARED, moe_shared_expert_gate=True,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.2,
    ),
    "sigmoid_dropless_shared": dict(
        moe_router_topk=2, moe_router_score_function="sigmoid", moe_shared_expert_intermediate_size=SHARED,
        moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.02,
    ),
    "sigmoid_capacity": dict(
        moe_router_topk=3, moe_router_score_function="sigmoid", moe_expert_capacity_factor=0.5,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1,
    ),
    "sigmoid_top1": dict(moe_router_topk=1, moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.1),
    "gelu_capacity_shared": dict(
        activation="gelu", moe_router_topk=2, moe_expert_capacity_factor=1.25,
        moe_shared_expert_intermediate_size=SHARED, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
    ),
    "softmax_no_balancing": dict(moe_router_topk=2, moe_router_load_balancing_type="none"),
}


@pytest.mark.parametrize("grouped_gemm", [False, True], ids=["loop", "grouped"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_matches_reference(case, grouped_gemm):
    seed = seed_torch()
    cfg = _config(**CASES[case], moe_grouped_gemm=grouped_gemm)
    tracker = MoELossTracker()
    layer = MoELayer(cfg, ParallelState.single(), 1, seed, tracker)
    layer.train()
    params = {"router": layer.router.weight, "fc1": layer.experts.linear_fc1.weight,
              "fc2": layer.experts.linear_fc2.weight}
    if layer.shared_experts is not None:
        params["shared_fc1"] = layer.shared_experts.linear_fc1.weight
        params["shared_fc2"] = layer.shared_experts.linear_fc2.weight
        if layer.shared_experts.gate_weight is not None:
            params["shared_gate"] = layer.shared_experts.gate_weight
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}

    x = torch.randn(S, B, H, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(S, B, H)

    y = layer(x)
    y_ref, losses_ref = reference(x_ref, ref_params, cfg)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} seed={seed}: output {m}")
    assert set(tracker.sums) == set(losses_ref), f"{case} seed={seed}: losses {set(tracker.sums)}"
    for name, value in losses_ref.items():
        assert abs(tracker.sums[name].item() - value.item()) <= 1e-5 * max(1.0, abs(value.item())), (
            f"{case} seed={seed}: {name} {tracker.sums[name].item()} vs {value.item()}")

    # the attached losses get gradient 1 (tracker.backward_scale): d(y . g + losses)
    (y * grad_out).sum().backward()
    ((y_ref * grad_out).sum() + sum(losses_ref.values(), torch.zeros(()))).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} seed={seed}: dx {m}")
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{case} seed={seed}: d{n} {m}")


def test_aux_loss_gradient_follows_backward_scale():
    seed = seed_torch()
    cfg = _config(moe_router_topk=2, moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1)
    grads = []
    for scale in (1.0, 0.25):
        tracker = MoELossTracker()
        tracker.backward_scale = scale
        layer = MoELayer(cfg, ParallelState.single(), 0, seed, tracker)
        x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(seed))
        layer(x).sum().mul(0.0).backward()  # only the attached losses reach the router
        grads.append(layer.router.weight.grad.clone())
    assert grads[0].abs().sum() > 0, f"seed={seed}"
    torch.testing.assert_close(grads[1], grads[0] * 0.25, rtol=1e-6, atol=1e-7, msg=lambda m: f"seed={seed}: {m}")


def test_eval_records_no_losses_and_dropless_routes_every_token():
    seed = seed_torch()
    tracker = MoELossTracker()
    layer = MoELayer(_config(moe_router_topk=2, moe_aux_loss_coeff=0.1), ParallelState.single(), 0, seed, tracker)
    layer.eval()
    with torch.no_grad():
        probs, indices = layer.router(torch.randn(S * B, H), (S, B))
    assert tracker.sums == {}
    assert probs.shape == indices.shape == (S * B, 2) and (indices >= 0).all(), f"seed={seed}"
    assert (indices[:, 0] != indices[:, 1]).all(), f"seed={seed}"
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(S * B), msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_router_topk=5), "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (dict(moe_router_load_balancing_type="sinkhorn"), "unknown --moe-router-load-balancing-type"),
        (dict(moe_router_score_function="relu"), "unknown --moe-router-score-function"),
        (dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=True), "--moe-router-pre-softmax"),
        (dict(moe_expert_capacity_factor=0.0), "--moe-expert-capacity-factor must be > 0"),
        (dict(moe_layer_freq=(1, 0, 1)), "--moe-layer-freq [1, 0, 1] must list 0 (dense) or 1 (MoE)"),
        (dict(moe_shared_expert_gate=True), "--moe-shared-expert-gate needs shared experts"),
        (dict(add_bias_linear=True), "MoE experts have no biases"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        _config(**overrides)
    assert message in str(err.value)


def test_layer_freq_interleaves_dense_and_moe():
    from megafast.model.gpt import GPTModel
    from megafast.model.moe import MoELayer as Moe
    from megafast.model.transformer import MLP

    for freq, pattern in ((2, [1, 0, 1, 0]), ((0, 1, 1, 0), [0, 1, 1, 0])):
        model = GPTModel(_config(num_layers=4, moe_layer_freq=freq))
        kinds = [isinstance(layer.mlp, Moe) for layer in model.decoder.layers.values()]
        assert kinds == [bool(p) for p in pattern]
        assert all(isinstance(layer.mlp, (Moe, MLP)) for layer in model.decoder.layers.values())


@pytest.mark.parametrize("case", ["softmax_pre_capacity_shared", "sigmoid_dropless_shared"])
def test_moe_layer_triton_kernels_match_reference(case):
    """--kernels triton: the grouped GEMM, permutation and SwiGLU Triton kernels (interpreter)."""
    seed = seed_torch()
    cfg = _config(**CASES[case], moe_grouped_gemm=True, kernels="triton")
    layer = MoELayer(cfg, ParallelState.single(), 0, seed, MoELossTracker())
    params = {"router": layer.router.weight, "fc1": layer.experts.linear_fc1.weight,
              "fc2": layer.experts.linear_fc2.weight, "shared_fc1": layer.shared_experts.linear_fc1.weight,
              "shared_fc2": layer.shared_experts.linear_fc2.weight}
    if layer.shared_experts.gate_weight is not None:
        params["shared_gate"] = layer.shared_experts.gate_weight
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x = torch.randn(S, B, H, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(S, B, H)
    y = layer(x)
    y_ref, losses_ref = reference(x_ref, ref_params, cfg)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} seed={seed}: output {m}")
    (y * grad_out).sum().backward()
    ((y_ref * grad_out).sum() + sum(losses_ref.values(), torch.zeros(()))).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} seed={seed}: dx {m}")
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{case} seed={seed}: d{n} {m}")


def test_full_recompute_gives_the_same_gradients_and_records_losses_once():
    from megafast.model.gpt import GPTModel

    seed = seed_torch()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
    results = []
    for recompute in (None, "full"):
        cfg = _config(num_layers=3, moe_router_topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                      moe_expert_capacity_factor=1.0, recompute_granularity=recompute)
        model = GPTModel(cfg, seed=seed)
        model.train()
        model(ids, labels=ids).sum().backward()
        tracker = model.moe_loss_tracker
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                        dict(tracker.counts), {k: v.item() for k, v in tracker.sums.items()}))
    (plain, plain_counts, plain_sums), (rec, rec_counts, rec_sums) = results
    assert plain_counts == rec_counts == {"load_balancing_loss": 3, "z_loss": 3}, f"seed={seed}"
    assert plain_sums == rec_sums, f"seed={seed}"
    for name, grad in plain.items():
        torch.testing.assert_close(rec[name], grad, rtol=0, atol=0, msg=lambda m, n=name: f"seed={seed}: {n} {m}")
