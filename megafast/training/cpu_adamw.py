"""AdamW on CPU in two fused passes (``megafast._C.adamw_cpu_pass``, csrc/cpu_adamw.cpp), the same
bits as ``torch.optim.AdamW(foreach=True)`` on fp32 tensors.

torch's multi-tensor update makes eight passes over memory (lerp, mul, addcmul, sqrt, div, add,
the weight-decay mul, addcdiv; plus the clipping mul): on a CPU the step is bound by memory
bandwidth, so it costs about twice what these passes do:

    pass 1 (C++):  m = lerp(m, s g, 1 - beta1);  v = v beta2 + (1 - beta2) (s g)^2      s: clip factor
    torch.sqrt:    d = sqrt(v)                    (torch's own sqrt, into a scratch buffer)
    pass 2 (C++):  p = p (1 - lr wd) + (-lr / bc1) m / (d / sqrt(bc2) + eps)

It works on the torch optimizer's own state (``exp_avg``, ``exp_avg_sq``, ``step``), so checkpoints
move freely between this path and torch's.
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    from megafast import _C
except ImportError:  # pragma: no cover - the extension is built by pip install -e .
    _C = None


def usable(masters: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether the fused CPU step can update ``masters`` from ``grads``: contiguous fp32 CPU tensors,
    a megafast._C built with it, and ATen running its AVX2/AVX-512 kernels (whose lerp and addcmul
    are fused multiply-adds, as the C++ passes' are; ATen's other builds round them twice)."""
    if _C is None or not hasattr(_C, "adamw_cpu_pass") or not masters:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in (*masters, *grads))


class CpuAdamW:
    """The fused step over a ``torch.optim.AdamW``'s groups (scratch buffer for sqrt(v) kept)."""

    def __init__(self, optimizer: torch.optim.AdamW) -> None:
        self.optimizer = optimizer
        self._scratch: dict[int, torch.Tensor] = {}

    def _denoms(self, masters: list[torch.Tensor]) -> list[torch.Tensor]:
        """One scratch tensor per master (views of one flat buffer per group), reused every step."""
        key = id(masters[0])
        total = sum(m.numel() for m in masters)
        flat = self._scratch.get(key)
        if flat is None or flat.numel() != total:
            flat = self._scratch[key] = torch.empty(total, dtype=torch.float32)
        return [d.view_as(m) for d, m in zip(flat.split([m.numel() for m in masters]), masters)]

    @torch.no_grad()
    def step(self, grads: dict[int, torch.Tensor], grad_scale: float = 1.0) -> None:
        """One AdamW step; ``grads[id(master)]`` is each master's gradient, used multiplied by
        ``grad_scale`` (the clip factor; the gradients themselves are not modified)."""
        threads = torch.get_num_threads()
        for group in self.optimizer.param_groups:
            masters = [m for m in group["params"] if id(m) in grads]
            if not masters:
                continue
            states = [self.optimizer.state[m] for m in masters]
            for m, st in zip(masters, states):
                if "step" not in st:  # as torch.optim.AdamW initialises its state
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            if not all(st[k].is_contiguous() and st[k].dtype == torch.float32 and st[k].device.type == "cpu"
                       for st in states for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError("the fused CPU AdamW step needs contiguous fp32 CPU optimizer states: "
                                 "use --fused-optimizer torch")
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1.0)
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            step_values = torch.stack(steps).tolist()  # CPU counters (as torch.optim's): one read
            # Python floats (fp64) as torch computes them; the kernel casts them to fp32 as torch does
            step_sizes = [(lr / (1 - beta1**t)) * -1 for t in step_values]
            bc2_sqrts = [(1 - beta2**t) ** 0.5 for t in step_values]
            exp_avgs = [st["exp_avg"] for st in states]
            exp_avg_sqs = [st["exp_avg_sq"] for st in states]
            denoms = self._denoms(masters)
            ptrs = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
            common = dict(
                params=ptrs(masters), grads=ptrs([grads[id(m)] for m in masters]), exp_avgs=ptrs(exp_avgs),
                exp_avg_sqs=ptrs(exp_avg_sqs), denoms=ptrs(denoms), numels=[m.numel() for m in masters],
                step_sizes=step_sizes, bias_correction2_sqrts=bc2_sqrts, grad_scale=grad_scale,
                decay=1 - lr * wd if wd != 0 else 1.0, lerp_weight=1 - beta1, beta2=beta2,
                one_minus_beta2=1 - beta2, eps=eps, num_threads=threads,
            )
            _C.adamw_cpu_pass(update=False, **common)
            for v, d in zip(exp_avg_sqs, denoms):
                torch.sqrt(v, out=d)
            _C.adamw_cpu_pass(update=True, **common)
