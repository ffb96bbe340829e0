"""MixedPrecisionOptimizer: global grad norm without double counting, clipping, loss scaling,
weight-decay groups, AdamW/Lion updates and bit-exact state-dict resume.

The norm test runs 4 gloo ranks as TP=2 x DP=2 (sequence parallel, ZeRO-1) and TP=2 x PP=2
(tied embeddings, with and without sequence parallelism) and compares the step's grad norm and
updated parameters with a single-process model built from the same seed (GPTModel's init is
TP/PP-invariant), whose norm is plain ``sqrt(sum ||p.grad||^2)``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist import run_distributed
from seeding import draw_seed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.parallel.layers import gather_full
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer import LossScaler, OptimizerConfig, build_optimizer

VOCAB = 101
BATCH, SEQ = 4, 16
# A large eps makes Adam's update scale-sensitive, so a wrong clipping factor shows in the params.
CLIPPED_ADAM = dict(lr=1e-2, weight_decay=0.1, adam_eps=1e-2, clip_grad=0.05)
CASES = {  # name: (tp, pp, sequence_parallel, distributed optimizer, GPTConfig overrides)
    "tp2_dp2_sp_zero1": (2, 1, True, True, {}),
    "tp2_pp2_tied": (2, 2, False, False, {}),
    "tp2_pp2_tied_sp": (2, 2, True, False, {}),
    "tp2_pp2_llama_sp": (
        2, 2, True, False,
        dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False, position_embedding_type="rope",
             tie_embeddings=False, num_query_groups=2),
    ),
}


def gpt_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ,
        make_vocab_size_divisible_by=1, init_method_std=0.1,
    )
    return GPTConfig(**{**base, **kw})


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[1, :4] = -100
    return ids, labels


def forward_backward(model: GPTModel, state: ParallelState, ids, labels, denom) -> None:
    """One microbatch through this rank's stage; with PP=2 activations/grads go over p2p."""
    if state.pp_size == 1:
        (model(ids, labels=labels).sum() / denom).backward()
        return
    peer = state.pp_ranks[1 - state.pp_rank]
    s = SEQ // state.tp_size if state.sequence_parallel else SEQ
    if state.is_first_stage:
        hidden = model(ids)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
    else:
        hidden = torch.empty(s, ids.shape[0], model.config.hidden_size)
        dist.recv(hidden, peer)
        hidden.requires_grad_()
        (model(hidden_states=hidden, labels=labels).sum() / denom).backward()
        dist.send(hidden.grad.contiguous(), peer)


def norm_worker(rank: int, world: int, seed: int, data_seed: int) -> dict:
    out = {}
    for name, (tp, pp, sp, zero1, overrides) in CASES.items():
        state = ParallelState.create(ParallelConfig(tp, pp, sp))
        config = gpt_config(**overrides)
        model = GPTModel(config, state, seed=seed)
        ddp = DataParallel([model], state, bucket_size_mb=0.002, use_distributed_optimizer=zero1)
        opt = build_optimizer([model], ddp, state, OptimizerConfig(**CLIPPED_ADAM, use_distributed_optimizer=zero1))
        ids, labels = make_batch(data_seed)
        denom = (labels != -100).sum()
        per = BATCH // state.dp_size
        mine = slice(state.dp_rank * per, (state.dp_rank + 1) * per)
        forward_backward(model, state, ids[mine], labels[mine], denom)
        result = opt.step()
        params = {}
        for n, p in model.named_parameters():
            full = gather_full(p.detach(), p, state.tp_group)
            params[n] = full[:VOCAB] if n.endswith(("word_embeddings.weight", "output_layer.weight")) else full
        out[name] = {"norm": result.grad_norm, "success": result.success, "params": params, "pp_rank": state.pp_rank}
    return out


def reference_step(name: str, seed: int, data_seed: int) -> dict:
    *_, overrides = CASES[name]
    state = ParallelState.single()
    model = GPTModel(gpt_config(**overrides), state, seed=seed)
    ddp = DataParallel([model], state)
    opt = build_optimizer([model], ddp, state, OptimizerConfig(**CLIPPED_ADAM))
    ids, labels = make_batch(data_seed)
    (model(ids, labels=labels).sum() / (labels != -100).sum()).backward()
    ddp.finish_grad_sync()
    plain_norm = math.sqrt(sum(p.main_grad.double().pow(2).sum().item() for p in model.parameters()))
    result = opt.step()
    return {"plain_norm": plain_norm, "norm": result.grad_norm, "params": dict(model.named_parameters())}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.float().abs().max().clamp_min(1e-30)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"


def test_global_grad_norm_and_clipping_match_one_process():
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    results = run_distributed(norm_worker, 4, seed, data_seed)
    for name in CASES:
        ref = reference_step(name, seed, data_seed)
        assert ref["norm"] == pytest.approx(ref["plain_norm"], rel=1e-6)
        assert ref["norm"] > CLIPPED_ADAM["clip_grad"] * 2  # clipping is active
        tied = CASES[name][1] > 1 and gpt_config(**CASES[name][4]).tie_embeddings
        for rank, out in enumerate(results):
            got = out[name]
            assert got["success"]
            assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5), f"{name} rank {rank}: grad norm"
            for n, p in got["params"].items():
                want = ref["params"]["embedding.word_embeddings.weight" if tied and n == "output_layer.weight" else n]
                assert_rel_close(p, want.detach(), 1e-5, f"{name} rank {rank}: updated {n}")


# ------------------------------------------------------------------------ single process


def tiny_gpt(seed: int = 3, **kw) -> tuple[GPTModel, DataParallel]:
    model = GPTModel(gpt_config(), seed=seed, **kw)
    return model, DataParallel([model], ParallelState.single())


def backward(model: GPTModel, data_seed: int, scale: float = 1.0) -> None:
    ids, labels = make_batch(data_seed)
    (model(ids, labels=labels).sum() / (labels != -100).sum() * scale).backward()


# Megatron's rule written out for gpt_config(): the embeddings and the four linear weights of each
# layer decay; biases and norm weights do not.
DECAYED = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight"} | {
    f"decoder.layers.{i}.{w}.weight"
    for i in range(2)
    for w in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
}


def test_weight_decay_groups_skip_biases_and_norms():
    model, ddp = tiny_gpt()
    opt = build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    name_at = {p.data_ptr(): n for n, p in model.named_parameters()}  # fp32: the masters are the parameters
    assert {name_at[t.data_ptr()] for t in decay["params"]} == DECAYED
    assert {name_at[t.data_ptr()] for t in no_decay["params"]} == set(name_at.values()) - DECAYED
    assert len(decay["params"]) + len(no_decay["params"]) == len(name_at)


def test_adamw_matches_torch_adamw():
    config = OptimizerConfig(lr=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, clip_grad=0.0)
    model, ddp = tiny_gpt()
    opt = build_optimizer([model], ddp, ParallelState.single(), config)
    ref = GPTModel(gpt_config(), seed=3)  # plain torch: no DataParallel hooks
    ref_params = dict(ref.named_parameters())
    groups = [
        {"params": [p for n, p in ref_params.items() if n in DECAYED], "weight_decay": 0.1},
        {"params": [p for n, p in ref_params.items() if n not in DECAYED], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    for step in range(3):
        backward(model, step)
        assert opt.step().success
        ref.zero_grad(set_to_none=True)
        backward(ref, step)
        torch_opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, ref_params[n]), f"{n} differs from torch.optim.AdamW"


def test_lion_matches_reference_update():
    b1, b2, lr, wd = 0.9, 0.99, 1e-3, 0.1
    config = OptimizerConfig(optimizer="lion", lr=lr, weight_decay=wd, lion_beta1=b1, lion_beta2=b2, clip_grad=0.0)
    model, ddp = tiny_gpt()
    opt = build_optimizer([model], ddp, ParallelState.single(), config)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(3):
        backward(model, step)
        ddp.finish_grad_sync()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        assert opt.step().success
        for n, g in grads.items():
            w = wd if n in DECAYED else 0.0
            update = torch.sign(b1 * m[n] + (1 - b1) * g)
            params[n] = params[n] - lr * (update + w * params[n])
            m[n] = b2 * m[n] + (1 - b2) * g
    for n, p in model.named_parameters():
        assert_rel_close(p.detach(), params[n], 1e-6, f"lion {n}")


def linear_fp16() -> tuple[nn.Module, DataParallel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).to(torch.float16)
    return model, DataParallel([model], ParallelState.single())


def fp16_backward(model, opt, poison: bool = False) -> None:
    x = torch.randn(16, 8, dtype=torch.float16)
    (model(x).float().pow(2).mean() * opt.loss_scale).backward()  # loss * S: gradients scaled by S
    if poison:
        model[0].weight.main_grad[0, 0] = float("inf")


def test_fp16_dynamic_loss_scale_skips_halves_and_raises():
    config = OptimizerConfig(
        lr=1e-2, fp16=True, initial_loss_scale=16.0, min_loss_scale=1.0, hysteresis=2, loss_scale_window=3,
        max_skipped_steps=3,
    )
    model, ddp = linear_fp16()
    opt = build_optimizer([model], ddp, ParallelState.single(), config)
    assert opt.shards[0].master.dtype == torch.float32 and model[0].weight.dtype == torch.float16

    # Gradients are unscaled before the norm: the norm is that of the true (fp32-summed) gradient.
    fp16_backward(model, opt)
    ddp.finish_grad_sync()
    true_norm = math.sqrt(sum((p.main_grad.double() / 16.0).pow(2).sum().item() for p in model.parameters()))
    result = opt.step()
    assert result.success and result.loss_scale == 16.0
    assert result.grad_norm == pytest.approx(true_norm, rel=1e-6)
    for _ in range(2):
        fp16_backward(model, opt)
        assert opt.step().success
    assert opt.loss_scale == 32.0  # doubled after loss_scale_window = 3 clean steps

    expected_scales = [32.0, 16.0, 8.0, 4.0, 2.0]  # hysteresis 2: the first overflow keeps the scale
    for k, scale in enumerate(expected_scales, start=1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        masters = [s.master.clone() for s in opt.shards]
        fp16_backward(model, opt, poison=True)
        result = opt.step()
        assert not result.success and not math.isfinite(result.grad_norm)
        assert result.skipped_in_a_row == k and result.num_skipped == k and opt.skipped_in_a_row == k
        assert opt.loss_scale == scale, f"after {k} overflows"
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "skipped step changed params"
        assert all(torch.equal(s.master, m) for s, m in zip(opt.shards, masters))
        assert all(torch.count_nonzero(p.main_grad) == 0 for p in model.parameters())
    # 6th overflow: the scale reaches its minimum with more than max_skipped_steps skips in a row.
    fp16_backward(model, opt, poison=True)
    with pytest.raises(RuntimeError, match="non-finite.*6 steps in a row.*--bf16"):
        opt.step()

    # A clean step resets the consecutive count but not the total.
    opt2 = build_optimizer([model], ddp, ParallelState.single(), config)
    fp16_backward(model, opt2, poison=True)
    assert not opt2.step().success
    fp16_backward(model, opt2)
    result = opt2.step()
    assert result.success and result.skipped_in_a_row == 0 and result.num_skipped == 1


def test_bf16_nonfinite_gradients_skip_then_raise():
    model, ddp = tiny_gpt(params_dtype=torch.bfloat16)
    opt = build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig(bf16=True, max_skipped_steps=2))
    assert opt.loss_scale == 1.0
    for k in (1, 2):
        backward(model, k, scale=float("nan"))
        assert not opt.step().success and opt.skipped_in_a_row == k
    backward(model, 3, scale=float("nan"))
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        opt.step()


def test_loss_scaler_matches_megatron_rules():
    s = LossScaler(8.0, dynamic=True, min_scale=2.0, window=2, hysteresis=2)
    seq = [(True, 8.0), (True, 4.0), (True, 2.0), (True, 2.0), (False, 2.0), (False, 4.0), (True, 4.0), (True, 2.0)]
    for found_inf, scale in seq:
        s.update(found_inf)
        assert s.scale == scale
    static = LossScaler(128.0, dynamic=False)
    static.update(True)
    assert static.scale == 128.0 and static.at_minimum


def snapshot(model, opt) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "masters": [s.master.clone() for s in opt.shards],
        "scaler": opt.scaler.state_dict(),
        "skipped": (opt.skipped_in_a_row, opt.num_skipped),
    }


@pytest.mark.parametrize(
    "config",
    [
        OptimizerConfig(optimizer="lion", lr=1e-3, bf16=True),
        # fp16: clean steps double the scale every step until it overflows after the resume point.
        OptimizerConfig(optimizer="adam", lr=1e-3, fp16=True, initial_loss_scale=2.0**16, loss_scale_window=1),
        OptimizerConfig(optimizer="adam", lr=1e-3),
    ],
    ids=["lion_bf16", "adam_fp16", "adam_fp32"],
)
def test_state_dict_round_trip_is_bit_exact(config):
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    model, ddp = tiny_gpt(params_dtype=dtype)
    opt = build_optimizer([model], ddp, ParallelState.single(), config)

    def train(m, o, seeds):
        for s in seeds:
            backward(m, s, scale=o.loss_scale)
            o.step()

    train(model, opt, [0, 1])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    train(model, opt, [2, 3, 4, 5])

    model2, ddp2 = tiny_gpt(seed=99, params_dtype=dtype)
    opt2 = build_optimizer([model2], ddp2, ParallelState.single(), config)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    train(model2, opt2, [2, 3, 4, 5])
    a, b = snapshot(model, opt), snapshot(model2, opt2)
    if config.fp16:
        assert 0 < opt.num_skipped < 4  # both clean and skipped steps happened after the resume point
    assert a["scaler"] == b["scaler"] and a["skipped"] == b["skipped"]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"]))


def test_state_dict_rejects_a_different_layout():
    model, ddp = tiny_gpt()
    sd = build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig()).state_dict()
    other = GPTModel(gpt_config(num_layers=1))
    opt = build_optimizer([other], DataParallel([other], ParallelState.single()), ParallelState.single(), OptimizerConfig())
    with pytest.raises(ValueError, match="layout"):
        opt.load_state_dict(sd)
    lion = build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig(optimizer="lion"))
    with pytest.raises(ValueError, match="same --optimizer"):
        lion.load_state_dict(sd)


def test_set_lr_and_mismatched_sharding_flag():
    model, ddp = tiny_gpt()
    opt = build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig(lr=1.0))
    opt.set_lr(0.25)
    assert opt.lr == 0.25 and all(g["lr"] == 0.25 for g in opt.param_groups)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        build_optimizer([model], ddp, ParallelState.single(), OptimizerConfig(use_distributed_optimizer=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer="sgd"), "unknown optimizer"),
        (dict(lr=1e-4, min_lr=1e-3), "min-lr"),
        (dict(bf16=True, fp16=True), "mutually exclusive"),
        (dict(adam_beta2=1.0), "adam-beta2"),
        (dict(clip_grad=-1.0), "clip-grad"),
        (dict(loss_scale=0.0), "loss-scale"),
        (dict(min_loss_scale=8.0, initial_loss_scale=4.0), "min-loss-scale"),
        (dict(hysteresis=0), "hysteresis"),
        (dict(weight_decay=-0.1), "weight-decay"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)
