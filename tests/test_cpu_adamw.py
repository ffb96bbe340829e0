"""The fused CPU AdamW step (megafast._C.adamw_cpu_pass, megafast/training/cpu_adamw.py) against
torch.optim.AdamW(foreach=True): the same parameters and states, bit for bit, over several steps
with clipping factors and weight decay, at sizes that are and are not multiples of the vector width;
checkpoints move between the two; and the trainer picks it (or refuses --fused-optimizer cpu) as
documented."""

from __future__ import annotations

import copy

import pytest
import torch

from megafast.training import cpu_adamw
from megafast.training.cpu_adamw import CpuAdamW
from tests.seeding import seed_torch

SIZES = [1, 7, 16, 17, 33, 255, 256, 1000, 4096, 32768, 65539, 131072, 100003]
FAST_ATEN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not FAST_ATEN, reason="the fused step matches ATen's AVX2/AVX-512 kernels only")


def _optimizers(params: list[torch.Tensor], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    groups = [{"params": params[::2], "weight_decay": wd}, {"params": params[1::2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def _gradients(steps: int) -> list[list[torch.Tensor]]:
    # magnitudes from 1e-6 to 10 so that eps, the bias corrections and both lerp branches all matter
    return [[torch.randn(n) * 10.0 ** torch.randint(-6, 2, ()).item() for n in SIZES] for _ in range(steps)]


@needs_kernel
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.999)])  # beta1 0.3: lerp's weight >= 0.5 branch
def test_bit_identical_to_torch_foreach_adamw(betas):
    seed = seed_torch()
    start = [torch.randn(n) for n in SIZES]
    ref, mine = [p.clone() for p in start], [p.clone() for p in start]
    torch_opt, opt = _optimizers(ref, betas=betas), _optimizers(mine, betas=betas)
    fused = CpuAdamW(opt)
    for step, grads in enumerate(_gradients(6)):
        clip = 0.37 if step % 2 else 1.0  # the clip factor is folded into the fused step
        for p, g in zip(ref, grads):
            p.grad = g * clip if clip != 1.0 else g.clone()
        torch_opt.step()
        fused.step({id(p): g for p, g in zip(mine, grads)}, clip)
        for g in opt.param_groups:
            g["lr"] *= 0.9  # a schedule: the step sizes change every step
        for g in torch_opt.param_groups:
            g["lr"] *= 0.9
    for n, a, b in zip(SIZES, ref, mine):
        sa, sb = torch_opt.state[a], opt.state[b]
        for what, x, y in (("param", a, b), ("exp_avg", sa["exp_avg"], sb["exp_avg"]),
                           ("exp_avg_sq", sa["exp_avg_sq"], sb["exp_avg_sq"]), ("step", sa["step"], sb["step"])):
            assert torch.equal(x, y), f"{what} of the size-{n} tensor differs from torch's (seed={seed})"


@needs_kernel
def test_checkpoints_move_between_fused_and_torch():
    seed = seed_torch()
    start = [torch.randn(n) for n in SIZES[:6]]
    ref, mine = [p.clone() for p in start], [p.clone() for p in start]
    torch_opt, opt = _optimizers(ref), _optimizers(mine)
    grads = [[torch.randn(n) for n in SIZES[:6]] for _ in range(4)]
    for g_step in grads[:2]:  # two steps with torch, then its state continues in the fused step
        for p, g in zip(ref, g_step):
            p.grad = g.clone()
        torch_opt.step()
        for p, g in zip(mine, g_step):
            p.grad = g.clone()
        opt.step()
    fused = CpuAdamW(opt)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # (load_state_dict keeps the tensors)
    for g_step in grads[2:]:
        for p, g in zip(ref, g_step):
            p.grad = g.clone()
        torch_opt.step()
        fused.step({id(p): g for p, g in zip(mine, g_step)})
    for a, b in zip(ref, mine):
        assert torch.equal(a, b), f"seed={seed}"
    resumed = _optimizers([p.clone() for p in mine])
    resumed.load_state_dict(opt.state_dict())  # the fused step's state is torch's format
    assert all(torch.equal(resumed.state[p]["exp_avg"], opt.state[q]["exp_avg"])
               for p, q in zip(resumed.param_groups[0]["params"], opt.param_groups[0]["params"]))


def test_usable_only_for_contiguous_fp32_cpu_tensors():
    p = torch.zeros(8)
    assert cpu_adamw.usable([p], [p.clone()]) == FAST_ATEN
    assert not cpu_adamw.usable([p.double()], [p.double()])
    assert not cpu_adamw.usable([torch.zeros(4, 4).t()], [torch.zeros(4, 4)])
    assert not cpu_adamw.usable([], [])


def test_trainer_optimizer_choice():
    from megafast.parallel.state import ParallelState
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    model = torch.nn.Linear(8, 8, bias=False)
    state = ParallelState.single()
    for choice, optimizer, expect in (("auto", "adam", FAST_ATEN), ("torch", "adam", False), ("auto", "lion", False)):
        ddp = DataParallel([model], state)
        opt = build_optimizer([model], ddp, state, OptimizerConfig(optimizer=optimizer, fused_optimizer=choice))
        assert (opt.cpu_step is not None) == expect, (choice, optimizer)
    if not FAST_ATEN:
        with pytest.raises(ValueError, match="--fused-optimizer cpu"):
            build_optimizer([model], DataParallel([model], state), state, OptimizerConfig(fused_optimizer="cpu"))
    with pytest.raises(ValueError, match="--fused-optimizer cpu"):
        build_optimizer([model], DataParallel([model], state), state,
                        OptimizerConfig(optimizer="lion", fused_optimizer="cpu"))
