"""The host side of the CUDA optimizer step (``--fused-optimizer cuda``), run on CPU.

``MixedPrecisionOptimizer._cuda_step`` creates the AdamW/Lion state itself, advances the step
counter, folds the clipping factor into the kernel's ``grad_scale`` and lets the kernel write the
bf16 model weights. Here the CUDA launchers of ``megafast.kernels.multi_tensor_optim`` are swapped
for their plain-torch twins (same signature, same maths) and the step is forced onto that path, so
all of that host logic runs without a GPU; the results are checked against torch.optim.AdamW and
Lion written out by hand, on a bf16 model with clipping active, and checkpoints are moved between
the CUDA and the torch paths in both directions.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import megafast.kernels.multi_tensor_optim as launchers
from megafast.config import GPTConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer import OptimizerConfig, build_optimizer

VOCAB, BATCH, SEQ = 101, 4, 16
LR, WD, B1, B2, EPS, CLIP = 1e-2, 0.1, 0.8, 0.95, 1e-2, 0.05  # clip 0.05: clipping active every step
# Megatron's rule written out for this model: embeddings and linear weights decay, biases and norms don't.
DECAYED = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight"} | {
    f"decoder.layers.{i}.{w}.weight"
    for i in range(2)
    for w in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
}


def config(optimizer: str, fused: str) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=optimizer, lr=LR, weight_decay=WD, adam_beta1=B1, adam_beta2=B2, adam_eps=EPS,
        lion_beta1=B1, lion_beta2=B2, clip_grad=CLIP, bf16=True, fused_optimizer=fused,
    )


def bf16_gpt(seed: int = 3) -> tuple[GPTModel, DataParallel]:
    cfg = GPTConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ,
        make_vocab_size_divisible_by=1, init_method_std=0.1,
    )
    model = GPTModel(cfg, seed=seed, params_dtype=torch.bfloat16)
    return model, DataParallel([model], ParallelState.single())


def backward(model: GPTModel, data_seed: int) -> None:
    g = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    (model(ids, labels=labels).sum() / labels.numel()).backward()


class Calls:
    """What the optimizer passed to the launchers, one dict per launch."""

    def __init__(self) -> None:
        self.launches: list[dict] = []


@pytest.fixture
def calls(monkeypatch) -> Calls:
    """The CUDA launchers replaced by their plain-torch twins, recording each launch."""
    record = Calls()

    def recording(torch_impl):
        def launch(params, grads, *states_and_model, **kw):
            model_params = states_and_model[-1]
            record.launches.append({**kw, "n": len(params), "writes_model": [w is not None for w in model_params]})
            torch_impl(params, grads, *states_and_model, **kw)

        return launch

    monkeypatch.setattr(launchers, "multi_tensor_adamw_", recording(launchers.multi_tensor_adamw_torch))
    monkeypatch.setattr(launchers, "multi_tensor_lion_", recording(launchers.multi_tensor_lion_torch))
    return record


def on_cuda_path(opt):
    """Force the step onto the CUDA path (chosen by device and build otherwise: CPU picks torch)."""
    assert not opt.cuda_step
    opt.cuda_step = True
    return opt


def grads_of(model: GPTModel, ddp: DataParallel) -> dict[str, torch.Tensor]:
    ddp.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}


def clip_factor(grads: dict[str, torch.Tensor]) -> float:
    norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
    return min(1.0, CLIP / (norm + 1e-6))


@pytest.mark.parametrize("optimizer", ["adam", "lion"])
def test_cuda_path_matches_hand_written_update_on_bf16_weights(optimizer, calls):
    model, ddp = bf16_gpt()
    opt = on_cuda_path(build_optimizer([model], ddp, ParallelState.single(), config(optimizer, "torch")))
    # The reference: fp32 copies of the initial weights, stepped by torch.optim.AdamW or Lion by hand.
    ref = {n: p.detach().float().clone().requires_grad_() for n, p in model.named_parameters()}
    torch_adamw = torch.optim.AdamW(
        [{"params": [p for n, p in ref.items() if n in DECAYED], "weight_decay": WD},
         {"params": [p for n, p in ref.items() if n not in DECAYED], "weight_decay": 0.0}],
        lr=LR, betas=(B1, B2), eps=EPS,
    )
    lion_m = {n: torch.zeros_like(p) for n, p in ref.items()}
    scales = []
    for step in range(3):
        backward(model, step)
        grads = grads_of(model, ddp)
        coef = clip_factor(grads)
        assert coef < 1.0
        scales.append(coef)
        assert opt.step().success
        with torch.no_grad():
            for n, p in ref.items():
                g = grads[n] * coef
                if optimizer == "adam":
                    p.grad = g
                else:
                    wd = WD if n in DECAYED else 0.0
                    update = torch.sign(B1 * lion_m[n] + (1 - B1) * g)
                    p.sub_(LR * (update + wd * p))
                    lion_m[n] = B2 * lion_m[n] + (1 - B2) * g
            if optimizer == "adam":
                torch_adamw.step()

    # Two launches per step (decay and no-decay groups), the clip factor as the grad scale, the step
    # counter 1, 2, 3, and the bf16 weights written by the kernel (no fp32 alias in a bf16 model).
    assert len(calls.launches) == 6
    for k, launch in enumerate(calls.launches):
        assert launch["grad_scale"] == pytest.approx(scales[k // 2], rel=1e-6), f"launch {k}: clip factor"
        assert all(launch["writes_model"]), f"launch {k}: bf16 weights not handed to the kernel"
        if optimizer == "adam":
            assert launch["step"] == k // 2 + 1, f"launch {k}: step counter"
    assert {launch["weight_decay"] for launch in calls.launches} == {WD, 0.0}

    masters = {s.name: s.master for s in opt.shards}
    for n, p in model.named_parameters():
        want = ref[n].detach()
        err = ((masters[n] - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-6, f"{optimizer} {n}: fp32 master differs from the hand-written update ({err:.2e})"
        assert torch.equal(p.detach(), masters[n].to(torch.bfloat16)), f"{n}: bf16 weight is not the master"
        state = opt.optimizer.state[masters[n]]
        if optimizer == "adam":
            assert state["step"].item() == 3.0 and not state["step"].is_cuda
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        else:
            assert set(state) == {"exp_avg"}


def train(model, ddp, opt, data_seeds) -> None:
    for s in data_seeds:
        backward(model, s)
        assert opt.step().success


def save(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("optimizer", ["adam", "lion"])
@pytest.mark.parametrize("direction", ["cuda_to_torch", "torch_to_cuda"])
def test_checkpoints_move_between_the_cuda_and_torch_paths(optimizer, direction, calls):
    """Two steps on one path, a checkpoint, two more steps: resuming the checkpoint on the other path
    gives the same weights and state as continuing on the first."""
    first_cuda = direction == "cuda_to_torch"
    model, ddp = bf16_gpt()
    opt = build_optimizer([model], ddp, ParallelState.single(), config(optimizer, "torch"))
    if first_cuda:
        on_cuda_path(opt)
    train(model, ddp, opt, [0, 1])
    blob = save(model, opt)
    train(model, ddp, opt, [2, 3])

    model2, ddp2 = bf16_gpt(seed=99)
    opt2 = build_optimizer([model2], ddp2, ParallelState.single(), config(optimizer, "torch"))
    if not first_cuda:
        on_cuda_path(opt2)
    ckpt = torch.load(io.BytesIO(blob), weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    train(model2, ddp2, opt2, [2, 3])

    # Two launches (groups) per step on the CUDA path: four steps there, or the two after the resume.
    assert len(calls.launches) == (8 if first_cuda else 4)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), f"{direction}: bf16 weight {n}"
    for s, s2 in zip(opt.shards, opt2.shards):
        st, st2 = opt.optimizer.state[s.master], opt2.optimizer.state[s2.master]
        assert set(st) == set(st2), f"{direction}: state keys of {s.name}"
        for key in st:
            a, b = st[key], st2[key]
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-6, f"{direction}: {key} of {s.name} ({err:.2e})"
        err = ((s.master - s2.master).abs().max() / s.master.abs().max()).item()
        assert err <= 1e-6, f"{direction}: master {s.name} ({err:.2e})"
