"""The fused CPU AdamW step (megafast.training.cpu_adamw) against torch.optim.AdamW (foreach and
the per-tensor loop) in one run, on the parameter shapes of bench_cpu_overhead.py's model.

    python benchmarks/bench_cpu_adamw.py --rounds 3

Prints the median step time of each over ``--steps`` steps per round (clip factor 0.5 folded into
the fused step; for torch the gradients are scaled in place first, as the trainer does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megafast.training.cpu_adamw import CpuAdamW, usable

# 4 layers, hidden 256, FFN 688 (SwiGLU), 8 heads / 4 query groups, vocabulary 8000, untied
SHAPES = [(8000, 256), (8000, 256)] + [(512, 256), (256, 256), (1376, 256), (256, 688), (256,), (256,)] * 4 + [(256,)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    params = {k: [torch.randn(s) for s in SHAPES] for k in ("foreach", "loop", "fused")}
    grads = [torch.randn(s) for s in SHAPES]
    opts = {k: torch.optim.AdamW(v, lr=1e-3, foreach=(k != "loop")) for k, v in params.items()}
    if not usable(params["fused"], grads):
        raise SystemExit("error: the fused CPU AdamW is not usable here (ATen without AVX2/AVX-512, or an old megafast._C)")
    fused = CpuAdamW(opts["fused"])
    fused_grads = {id(q): g for q, g in zip(params["fused"], grads)}

    for name in ("foreach", "loop"):
        for q, g in zip(params[name], grads):
            q.grad = g.clone()

    def torch_step(name: str) -> None:  # the trainer's clipping: the gradients scaled in place, then the step
        torch._foreach_mul_([q.grad for q in params[name]], 0.5)
        opts[name].step()

    steps = {"torch foreach": lambda: torch_step("foreach"), "torch loop": lambda: torch_step("loop"),
             "megafast fused": lambda: fused.step(fused_grads, 0.5)}
    for r in range(a.rounds):
        row = []
        for name, fn in steps.items():
            fn()
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            row.append(f"{name} {1000 * statistics.median(times):.1f} ms")
        print(f"round {r + 1}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
