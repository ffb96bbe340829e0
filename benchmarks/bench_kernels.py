"""Kernel benchmark: megafast's fused kernels vs torch eager, torch.compile and Liger-Kernel.

    python benchmarks/bench_kernels.py [--out DIR] [--tokens 16384] [--hidden 2048 4096 8192]
                                       [--vocab 128256] [--only rms_norm,swiglu,...] [--no-compile]
    python benchmarks/bench_kernels.py --smoke          # CPU self-check: tiny shapes, interpreter

On a GPU, for every kernel and hidden size (``--tokens`` rows): forward and forward+backward time
(median of ``triton.testing.do_bench``, L2 flushed), achieved GB/s from the bytes the op must move
(reads + writes of its inputs, outputs and gradients), that as a fraction of the measured
device-to-device copy bandwidth, and the speed-up of megafast's kernel over the plain-torch
reference run eagerly, over ``torch.compile`` of that reference (dynamic shapes: one compile per
kernel) and over Liger-Kernel (when ``liger_kernel`` is importable: carry its wheel). Also:
flash attention vs SDPA (TFLOP/s), the multi-tensor AdamW/Lion step vs ``torch.optim.AdamW(fused=True)``
plus the separate bf16 copy, and fused linear + cross-entropy (peak memory and time) vs the
unfused projection + loss at vocabulary ``--vocab``. Every kernel's output is checked against
the reference before it is timed.

Targets (issue 5): >= 85% of copy bandwidth for RMSNorm, SwiGLU and RoPE at hidden >= 4096; no
kernel slower than Liger's. Results: ``bench_kernels.json`` and ``bench_kernels.md`` (a table with
date, device and versions, for docs/benchmarks.md) under ``--out`` (default ``$OUT`` or
benchmarks/results); the script exits 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # kernel_harness: the tests' rel_err

import torch  # noqa: E402

SMOKE = "--smoke" in sys.argv
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors only in the interpreter
    if not SMOKE:
        raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke for the CPU self-check")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from megafast.kernels import add_rms_norm as k_add_rms_norm  # noqa: E402
from megafast.kernels import flash_attention as k_flash  # noqa: E402
from megafast.kernels.add_rms_norm_kernel import add_rms_norm_torch  # noqa: E402
from megafast.kernels.cross_entropy_kernel import cross_entropy_torch, cross_entropy_triton  # noqa: E402
from megafast.kernels.cuda_ext import cuda_available  # noqa: E402
from megafast.kernels.fused_linear_cross_entropy_kernel import fused_linear_cross_entropy_triton  # noqa: E402
from megafast.kernels.gelu_kernel import gelu_torch, gelu_triton  # noqa: E402
from megafast.kernels.layer_norm_kernel import layer_norm_torch, layer_norm_triton  # noqa: E402
from megafast.kernels.rms_norm_kernel import rms_norm_torch, rms_norm_triton  # noqa: E402
from megafast.kernels.rotary_kernel import apply_rotary_cuda, apply_rotary_torch, apply_rotary_triton  # noqa: E402
from megafast.kernels.swiglu_kernel import swiglu_torch, swiglu_triton  # noqa: E402
from kernel_harness import rel_err  # noqa: E402

try:
    from liger_kernel.transformers import functional as liger
except Exception:  # noqa: BLE001 - optional comparison
    liger = None

KERNELS = (
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "swiglu",
    "gelu",
    "rope",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "attention",
    "optimizer",
)
BANDWIDTH_TARGET = 0.85  # of device-to-device copy bandwidth, RMSNorm/SwiGLU/RoPE at hidden >= 4096


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    impl: str
    fwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    fwd_gbs: Optional[float] = None
    fwdbwd_gbs: Optional[float] = None
    fwd_frac_copy: Optional[float] = None
    fwdbwd_frac_copy: Optional[float] = None
    tflops: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    max_rel_err: Optional[float] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ timing


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.copy_gbs = self.measure_copy_bandwidth()
        self.compiled: dict[str, Callable] = {}

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms, return_mode="median"))
        fn()  # CPU smoke: one warm call, one timed call (the interpreter's times mean nothing)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def graph_time_ms(self, fn: Callable[[], object]) -> Optional[float]:
        """Kernel time without CPU launch overhead: ``fn`` captured in a CUDA graph and replayed."""
        if self.device.type != "cuda" or self.args.no_graphs:
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            ms = self.time_ms(graph.replay)
            del graph
            return ms
        except Exception:  # noqa: BLE001 - not capturable: the eager time stands
            torch.cuda.synchronize()
            return None

    def measure_copy_bandwidth(self) -> float:
        """GB/s of a device-to-device copy, counting bytes read and written (the 100% mark)."""
        n = (1 << 29) if self.device.type == "cuda" else (1 << 20)  # 1 GiB of bf16 on GPU
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * n * 2 / (ms * 1e-3) / 1e9

    def compile(self, key: str, fn: Callable) -> Callable:
        if key not in self.compiled:
            self.compiled[key] = torch.compile(fn, dynamic=True)
        return self.compiled[key]

    def run_impls(
        self,
        kernel: str,
        shape: str,
        dtype: torch.dtype,
        impls: dict,
        bytes_fwd: float,
        bytes_fwdbwd: float,
        check: Optional[Callable[[Callable], float]] = None,
        flops: Optional[tuple[float, float]] = None,
        graphs: bool = True,
        hidden: Optional[int] = None,
    ) -> None:
        """Time each implementation's (forward, forward+backward) closures and record a row."""
        for impl, (fwd, fwdbwd) in impls.items():
            row = Row(kernel, shape, str(dtype).replace("torch.", ""), impl)
            row.extra["hidden"] = hidden
            try:
                if check is not None and impl in ("megafast", "megafast-cuda"):
                    row.max_rel_err = check(fwd)
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    if not row.max_rel_err <= tol:
                        self.failures.append(f"{kernel} {shape} {impl}: relative error {row.max_rel_err:.2e}")
                row.fwd_ms = self.time_ms(fwd)
                row.fwdbwd_ms = self.time_ms(fwdbwd) if fwdbwd is not None else None
                if graphs:  # bandwidth from the kernels' own time (launch overhead replayed away)
                    row.extra["graph_fwd_ms"] = self.graph_time_ms(fwd)
                    row.extra["graph_fwdbwd_ms"] = self.graph_time_ms(fwdbwd) if fwdbwd is not None else None
                fwd_t = row.extra.get("graph_fwd_ms") or row.fwd_ms
                row.fwd_gbs = bytes_fwd / (fwd_t * 1e-3) / 1e9
                row.fwd_frac_copy = row.fwd_gbs / self.copy_gbs
                if row.fwdbwd_ms is not None:
                    bwd_t = row.extra.get("graph_fwdbwd_ms") or row.fwdbwd_ms
                    row.fwdbwd_gbs = bytes_fwdbwd / (bwd_t * 1e-3) / 1e9
                    row.fwdbwd_frac_copy = row.fwdbwd_gbs / self.copy_gbs
                if flops is not None:
                    row.tflops = flops[0] / (row.fwd_ms * 1e-3) / 1e12
                    if row.fwdbwd_ms is not None:
                        row.extra["fwdbwd_tflops"] = (flops[0] + flops[1]) / (row.fwdbwd_ms * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001 - one failing comparison must not stop the run
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if impl in ("megafast", "megafast-cuda"):
                    self.failures.append(f"{kernel} {shape} {impl}: {row.error}")
                    traceback.print_exc()
            self.rows.append(row)
            print(_format_row(row), flush=True)


def _grad_fn(fn: Callable, inputs: list[torch.Tensor], grads: Optional[list[torch.Tensor]] = None):
    """Closure running fn's forward then autograd.grad into the inputs (no .grad accumulation)."""

    def run():
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        gs = grads if grads is not None else [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, inputs, gs[: len(outs)])

    return run


def _req(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in ts]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


# ------------------------------------------------------------------------------- the kernels


def bench_rowwise(b: Bench, n_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    dev, shape = b.device, f"{n_tokens}x{hidden}"
    e = torch.tensor([], dtype=dtype).element_size()
    x, w, bias, r = _req(
        torch.randn(n_tokens, hidden, device=dev, dtype=dtype),
        torch.rand(hidden, device=dev, dtype=dtype) + 0.5,
        torch.randn(hidden, device=dev, dtype=dtype),
        torch.randn(n_tokens, hidden, device=dev, dtype=dtype),
    )
    dy = torch.randn_like(x)
    sel = b.args.only

    def impls(ours, ref, ref_fn, ref_args, liger_fn, inputs, ngrad=1):
        """ours/ref/liger_fn: closures; the reference function itself is compiled once (dynamic shapes)."""
        grads = [dy] * ngrad
        out = {
            "megafast": (ours, _grad_fn(ours, inputs, grads)),
            "torch": (ref, _grad_fn(ref, inputs, grads)),
        }
        if not b.args.no_compile:
            comp = b.compile(ref_fn.__name__, ref_fn)
            compiled = lambda: comp(*ref_args)  # noqa: E731
            out["torch.compile"] = (compiled, _grad_fn(compiled, inputs, grads))
        if liger_fn is not None:  # Liger's backward may overwrite the output gradient: its own copy
            out["liger"] = (liger_fn, _grad_fn(liger_fn, inputs, [dy.clone() for _ in range(ngrad)]))
        return out

    def check(ours, ref):
        return lambda fwd: max(rel_err(o, r_) for o, r_ in zip(_tuple(ours()), _tuple(ref())))

    if "rms_norm" in sel:
        ours, ref = (lambda: rms_norm_triton(x, w, 1e-5)), (lambda: rms_norm_torch(x, w, 1e-5))
        lig = (lambda: liger.liger_rms_norm(x, w, 1e-5)) if liger else None
        b.run_impls(
            "rms_norm",
            shape,
            dtype,
            impls(ours, ref, rms_norm_torch, (x, w, 1e-5), lig, [x, w]),
            2 * n_tokens * hidden * e,
            5 * n_tokens * hidden * e,
            check(ours, ref),
            hidden=hidden,
        )
    if "add_rms_norm" in sel:
        ours = lambda: k_add_rms_norm(x, r, w, 1e-5, backend="triton")  # noqa: E731
        ref = lambda: k_add_rms_norm(x, r, w, 1e-5, backend="torch")  # noqa: E731
        b.run_impls(
            "add_rms_norm",
            shape,
            dtype,
            impls(ours, ref, add_rms_norm_torch, (x, r, w, 1e-5), None, [x, r, w], 2),
            4 * n_tokens * hidden * e,
            8 * n_tokens * hidden * e,
            check(ours, ref),
            hidden=hidden,
        )
    if "layer_norm" in sel:
        ours, ref = (
            (lambda: layer_norm_triton(x, w, bias, 1e-5)),
            (lambda: layer_norm_torch(x, w, bias, 1e-5)),
        )
        lig = (lambda: liger.liger_layer_norm(x, w, bias, 1e-5)) if liger else None
        b.run_impls(
            "layer_norm",
            shape,
            dtype,
            impls(ours, ref, layer_norm_torch, (x, w, bias, 1e-5), lig, [x, w, bias]),
            2 * n_tokens * hidden * e,
            5 * n_tokens * hidden * e,
            check(ours, ref),
            hidden=hidden,
        )
    if "gelu" in sel:
        ours, ref = (lambda: gelu_triton(x, "tanh")), (lambda: gelu_torch(x, "tanh"))
        b.run_impls(
            "gelu_tanh",
            shape,
            dtype,
            impls(ours, ref, gelu_torch, (x, "tanh"), None, [x]),
            2 * n_tokens * hidden * e,
            5 * n_tokens * hidden * e,
            check(ours, ref),
            hidden=hidden,
        )
    if "swiglu" in sel:  # fc1 output [tokens, 2F] -> [tokens, F], F = hidden
        h2 = _req(torch.randn(n_tokens, 2 * hidden, device=dev, dtype=dtype))[0]
        a, g = _req(*h2.detach().chunk(2, dim=-1))
        a, g = a.detach().contiguous().requires_grad_(), g.detach().contiguous().requires_grad_()
        ours, ref = (lambda: swiglu_triton(h2)), (lambda: swiglu_torch(h2))
        out = impls(ours, ref, swiglu_torch, (h2,), None, [h2])
        if liger:
            lig = lambda: liger.liger_swiglu(a, g)  # noqa: E731 - Liger takes gate and up separately
            out["liger"] = (lig, _grad_fn(lig, [a, g], [dy.clone()]))
        b.run_impls(
            "swiglu",
            f"{n_tokens}x2*{hidden}",
            dtype,
            out,
            3 * n_tokens * hidden * e,
            8 * n_tokens * hidden * e,
            check(ours, ref),
            hidden=hidden,
        )


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def bench_rope(b: Bench, n_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    """q [s, b, H, d] and k [s, b, G, d] (d = 128, G = H/4), as the model applies them (two calls)."""
    from megafast.model.rotary import RotaryEmbedding

    dev = b.device
    d = 128 if hidden >= 512 else 32
    heads, groups = hidden // d, max(1, hidden // d // 4)
    batch = 4 if n_tokens % 4 == 0 and n_tokens >= 64 else 1
    s = n_tokens // batch
    e = torch.tensor([], dtype=dtype).element_size()
    cos, sin = RotaryEmbedding(d, 10000.0)(s, dev)
    q, k = _req(
        torch.randn(s, batch, heads, d, device=dev, dtype=dtype),
        torch.randn(s, batch, groups, d, device=dev, dtype=dtype),
    )
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def pair(fn):
        return lambda: (fn(q, cos, sin), fn(k, cos, sin))

    ours, ref = pair(apply_rotary_triton), pair(apply_rotary_torch)
    impls = {
        "megafast": (ours, _grad_fn(ours, [q, k], [dq, dk])),
        "torch": (ref, _grad_fn(ref, [q, k], [dq, dk])),
    }
    if cuda_available() and dev.type == "cuda":
        cu = pair(apply_rotary_cuda)
        impls["megafast-cuda"] = (cu, _grad_fn(cu, [q, k], [dq, dk]))
    if not b.args.no_compile:
        comp = b.compile("rope", apply_rotary_torch)
        cp = pair(comp)
        impls["torch.compile"] = (cp, _grad_fn(cp, [q, k], [dq, dk]))
    if liger:  # Liger's layout: q [b, H, s, d], k [b, G, s, d], cos/sin [1, s, d]; one call for both
        ql, kl = _req(
            q.detach().permute(1, 2, 0, 3).contiguous(), k.detach().permute(1, 2, 0, 3).contiguous()
        )
        cl, sl = cos[:, 0, 0][None], sin[:, 0, 0][None]
        dql, dkl = dq.permute(1, 2, 0, 3).contiguous(), dk.permute(1, 2, 0, 3).contiguous()
        lig = lambda: liger.liger_rope(ql, kl, cl, sl)  # noqa: E731
        impls["liger"] = (lig, _grad_fn(lig, [ql, kl], [dql, dkl]))
    moved = (q.numel() + k.numel()) * e
    check = lambda fwd: max(rel_err(o, r) for o, r in zip(fwd(), ref()))  # noqa: E731
    b.run_impls(
        "rope",
        f"s{s} b{batch} H{heads} G{groups} d{d}",
        dtype,
        impls,
        2 * moved,
        4 * moved,
        check,
        hidden=hidden,
    )


def bench_cross_entropy(b: Bench, n_tokens: int, vocab: int, dtype: torch.dtype) -> None:
    dev = b.device
    e = torch.tensor([], dtype=dtype).element_size()
    logits = _req(torch.randn(n_tokens, vocab, device=dev, dtype=dtype) * 3)[0]
    target = torch.randint(0, vocab, (n_tokens,), device=dev)
    target[::7] = -100
    ours = lambda: cross_entropy_triton(logits, target)  # noqa: E731
    ref = lambda: cross_entropy_torch(logits, target)  # noqa: E731
    impls = {"megafast": (ours, _grad_fn(ours, [logits])), "torch": (ref, _grad_fn(ref, [logits]))}
    if not b.args.no_compile:
        comp = b.compile("ce", cross_entropy_torch)
        cp = lambda: comp(logits, target)  # noqa: E731
        impls["torch.compile"] = (cp, _grad_fn(cp, [logits]))
    if liger:  # Liger writes the gradient into its input during forward: give it its own copy
        ll = _req(logits.detach().clone())[0]
        lig = lambda: liger.liger_cross_entropy(ll, target, reduction="sum")  # noqa: E731
        impls["liger"] = (lig, _grad_fn(lig, [ll]))
    check = lambda fwd: rel_err(fwd(), ref())  # noqa: E731
    b.run_impls(
        "cross_entropy",
        f"{n_tokens}x{vocab}",
        dtype,
        impls,
        n_tokens * vocab * e,
        3 * n_tokens * vocab * e,
        check,
    )


def bench_flce(b: Bench, n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> None:
    """Time and peak memory of forward+backward: fused (per-token and mean) vs unfused vs Liger."""
    dev = b.device
    x, w = _req(
        torch.randn(n_tokens, hidden, device=dev, dtype=dtype),
        torch.randn(vocab, hidden, device=dev, dtype=dtype) * hidden**-0.5,
    )
    target = torch.randint(0, vocab, (n_tokens,), device=dev)
    fns = {
        "megafast (per-token)": lambda: fused_linear_cross_entropy_triton(x, w, target).sum(),
        "megafast (mean)": lambda: fused_linear_cross_entropy_triton(x, w, target, reduction="mean"),
        "torch unfused": lambda: cross_entropy_torch(x @ w.t(), target).mean(),
    }
    if liger:
        fns["liger"] = lambda: liger.liger_fused_linear_cross_entropy(x, w, target, reduction="mean")
    want = fns["torch unfused"]().item()
    for name, fn in fns.items():
        row = Row(
            "fused_linear_cross_entropy",
            f"{n_tokens}x{hidden} V{vocab}",
            str(dtype).replace("torch.", ""),
            name,
        )
        try:
            got = fn().item()
            if name.startswith("megafast (mean)"):
                row.max_rel_err = abs(got - want) / abs(want)
                if not row.max_rel_err <= (1e-4 if dtype == torch.float32 else 2e-2):
                    b.failures.append(f"flce mean loss: relative error {row.max_rel_err:.2e}")
            step = _grad_fn(fn, [x, w])
            row.fwd_ms = b.time_ms(fn)
            row.fwdbwd_ms = b.time_ms(step)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row.peak_mem_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
            flops = 2 * n_tokens * hidden * vocab
            row.tflops = flops / (row.fwd_ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if name.startswith("megafast"):
                b.failures.append(f"flce {name}: {row.error}")
        b.rows.append(row)
        print(_format_row(row), flush=True)


def bench_attention(b: Bench, n_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    dev = b.device
    d = 128 if hidden >= 512 else 64
    heads = max(1, hidden // d)
    groups = max(1, heads // 4)
    batch = 4 if n_tokens >= 4096 else 1
    s = n_tokens // batch
    q, k, v = _req(
        torch.randn(batch, heads, s, d, device=dev, dtype=dtype),
        torch.randn(batch, groups, s, d, device=dev, dtype=dtype),
        torch.randn(batch, groups, s, d, device=dev, dtype=dtype),
    )
    do = torch.randn_like(q)

    def sdpa():
        rep = heads // groups
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
        )

    ours = lambda: k_flash(q, k, v, causal=True)  # noqa: E731
    impls = {
        "megafast": (ours, _grad_fn(ours, [q, k, v], [do])),
        "torch sdpa": (sdpa, _grad_fn(sdpa, [q, k, v], [do])),
    }
    try:
        from flash_attn import flash_attn_func

        fa = lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # noqa: E731
        impls["flash-attn"] = (fa, _grad_fn(fa, [q, k, v], [do.transpose(1, 2)]))
    except ImportError:
        pass
    fwd_flops = 4 * batch * heads * s * s * d / 2  # causal: half the score matrix
    check = lambda fwd: rel_err(fwd(), sdpa())  # noqa: E731
    e = torch.tensor([], dtype=dtype).element_size()
    moved = (2 * q.numel() + 2 * k.numel()) * e
    b.run_impls(
        "attention",
        f"b{batch} s{s} H{heads} G{groups} d{d} causal",
        dtype,
        impls,
        moved,
        3 * moved,
        check,
        flops=(fwd_flops, 2.5 * fwd_flops),
    )


def bench_optimizer(b: Bench, n_params: int) -> None:
    """One step over ~n_params fp32 masters (bf16 model weights): fused kernel vs torch + copy."""
    from megafast.kernels.multi_tensor_optim import multi_tensor_adamw_, multi_tensor_lion_
    from megafast.training.optimizer import Lion

    dev = b.device
    big = 4096 * 4096 if n_params >= 4096 * 4096 * 8 else 1024
    sizes = [big] * max(1, n_params // big) + [4096] * 32
    masters = [torch.randn(n, device=dev) for n in sizes]
    grads = [torch.randn(n, device=dev) * 1e-3 for n in sizes]
    model = [m.to(torch.bfloat16) for m in masters]
    total = sum(sizes)
    shape = f"{len(sizes)} tensors, {total / 1e6:.0f}M params"
    moved = 30 * total  # read p, g, m, v (16 B), write p, m, v (12 B), write bf16 weight (2 B)
    for opt in ("adamw", "lion"):
        impls = {}
        if cuda_available() and dev.type == "cuda":
            m1 = [torch.zeros_like(p) for p in masters]
            v1 = [torch.zeros_like(p) for p in masters]

            def fused(opt=opt, m1=m1, v1=v1):
                hyper = dict(lr=1e-4, beta1=0.9, weight_decay=0.1)
                if opt == "adamw":
                    multi_tensor_adamw_(masters, grads, m1, v1, model, beta2=0.95, eps=1e-8, step=10, **hyper)
                else:
                    multi_tensor_lion_(masters, grads, m1, model, beta2=0.99, **hyper)

            impls["megafast-cuda"] = (fused, None)
        params = [torch.nn.Parameter(m.clone()) for m in masters]
        for p, g in zip(params, grads):
            p.grad = g
        if opt == "adamw":
            torch_opt = torch.optim.AdamW(
                params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda"
            )
        else:
            torch_opt = Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)

        def torch_step(o=torch_opt, ps=params):
            o.step()
            torch._foreach_copy_(model, [p.detach() for p in ps])

        impls["torch" + (" fused" if opt == "adamw" else "") + " + bf16 copy"] = (torch_step, None)
        b.run_impls(f"optimizer {opt}", shape, torch.float32, impls, moved, moved, graphs=False)
        del impls, params, torch_opt


# ---------------------------------------------------------------------------------- reporting


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _format_row(r: Row) -> str:
    if r.error:
        return f"{r.kernel:28s} {r.shape:34s} {r.impl:22s} ERROR {r.error}"
    parts = [
        f"{r.kernel:28s} {r.shape:34s} {r.impl:22s}",
        f"fwd {_fmt(r.fwd_ms, '8.3f')} ms",
        f"fwd+bwd {_fmt(r.fwdbwd_ms, '8.3f')} ms",
    ]
    if r.fwd_frac_copy is not None:
        parts.append(
            f"{_fmt(r.fwd_gbs, '6.0f')}/{_fmt(r.fwdbwd_gbs, '6.0f')} GB/s "
            f"({_fmt(r.fwd_frac_copy and 100 * r.fwd_frac_copy, '3.0f')}%/"
            f"{_fmt(r.fwdbwd_frac_copy and 100 * r.fwdbwd_frac_copy, '3.0f')}% of copy)"
        )
    if r.tflops is not None:
        parts.append(f"{r.tflops:6.1f} TFLOP/s fwd")
    if r.peak_mem_gib is not None:
        parts.append(f"peak +{r.peak_mem_gib:.2f} GiB")
    if r.max_rel_err is not None:
        parts.append(f"err {r.max_rel_err:.1e}")
    return "  ".join(parts)


def speedups(rows: list[Row]) -> list[dict]:
    """Per (kernel, shape): megafast's speed-up over each other implementation."""
    out = []
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.shape, r.dtype), {})[r.impl] = r
    for (kernel, shape, dtype), impls in groups.items():
        for ours_name in [n for n in impls if n.startswith("megafast")]:
            ours = impls[ours_name]
            for other, r in impls.items():
                if other.startswith("megafast") or r.error or ours.error:
                    continue
                entry = {"kernel": kernel, "shape": shape, "dtype": dtype, "ours": ours_name, "vs": other}
                for phase in ("fwd_ms", "fwdbwd_ms"):
                    a, c = getattr(ours, phase), getattr(r, phase)
                    entry[phase.replace("_ms", "_speedup")] = None if not a or not c else c / a
                out.append(entry)
    return out


def targets(rows: list[Row], sp: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r.impl == "megafast" and r.kernel in ("rms_norm", "swiglu", "rope") and not r.error:
            hidden = r.extra.get("hidden")
            if hidden is not None and hidden >= 4096 and r.fwdbwd_frac_copy is not None:
                ok = min(r.fwd_frac_copy, r.fwdbwd_frac_copy) >= BANDWIDTH_TARGET
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} bandwidth {r.kernel} {r.shape} {r.dtype}: fwd "
                    f"{100 * r.fwd_frac_copy:.0f}%, fwd+bwd {100 * r.fwdbwd_frac_copy:.0f}% of copy "
                    f"(target {100 * BANDWIDTH_TARGET:.0f}%)"
                )
    for s in sp:
        if s["vs"] == "liger":
            worst = min(v for v in (s["fwd_speedup"], s["fwdbwd_speedup"]) if v is not None)
            lines.append(
                f"{'PASS' if worst >= 1.0 else 'FAIL'} vs Liger {s['kernel']} {s['shape']} {s['dtype']} "
                f"({s['ours']}): fwd x{_fmt(s['fwd_speedup'], '.2f')}, "
                f"fwd+bwd x{_fmt(s['fwdbwd_speedup'], '.2f')}"
            )
    return lines


def versions() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["liger_kernel"] = getattr(sys.modules.get("liger_kernel"), "__version__", None) if liger else None
    if liger and info["liger_kernel"] is None:
        try:
            from importlib.metadata import version

            info["liger_kernel"] = version("liger-kernel")
        except Exception:  # noqa: BLE001
            info["liger_kernel"] = "installed"
    info["device"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    )
    info["megafast_cuda_ext"] = cuda_available()
    return info


def write_markdown(
    path: str,
    info: dict,
    copy_gbs: float,
    rows: list[Row],
    sp: list[dict],
    tgt: list[str],
    args: argparse.Namespace,
) -> None:
    with open(path, "w") as f:
        f.write(f"### Kernels ({info['date']}, {info['device']})\n\n")
        f.write(
            f"torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, Python {info['python']}, "
            f"Liger-Kernel {info['liger_kernel'] or 'not installed'}, megafast CUDA extension "
            f"{'built' if info['megafast_cuda_ext'] else 'absent'}. Command: "
            f"`python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`. Device-to-device copy: "
            f"{copy_gbs:.0f} GB/s (read + write); times are medians of triton.testing.do_bench.\n\n"
        )
        f.write(
            "| kernel | shape | dtype | impl | fwd ms | fwd+bwd ms | GB/s fwd / fwd+bwd | % of copy | "
            "TFLOP/s | peak GiB | max rel err |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
        for r in rows:
            if r.error:
                f.write(f"| {r.kernel} | {r.shape} | {r.dtype} | {r.impl} | error: {r.error} |||||||\n")
                continue
            pct = (
                f"{_fmt(r.fwd_frac_copy and 100 * r.fwd_frac_copy, '.0f')} / "
                f"{_fmt(r.fwdbwd_frac_copy and 100 * r.fwdbwd_frac_copy, '.0f')}"
            )
            f.write(
                f"| {r.kernel} | {r.shape} | {r.dtype} | {r.impl} | {_fmt(r.fwd_ms, '.3f')} | "
                f"{_fmt(r.fwdbwd_ms, '.3f')} | {_fmt(r.fwd_gbs, '.0f')} / {_fmt(r.fwdbwd_gbs, '.0f')} | "
                f"{pct} | "
                f"{_fmt(r.tflops, '.1f')} | {_fmt(r.peak_mem_gib, '.2f')} | {_fmt(r.max_rel_err, '.1e')} |\n"
            )
        f.write(
            "\n| kernel | shape | dtype | megafast impl | vs | fwd speed-up | fwd+bwd speed-up |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for s in sp:
            f.write(
                f"| {s['kernel']} | {s['shape']} | {s['dtype']} | {s['ours']} | {s['vs']} | "
                f"{_fmt(s['fwd_speedup'], '.2f')} | {_fmt(s['fwdbwd_speedup'], '.2f')} |\n"
            )
        if tgt:
            f.write("\nTargets:\n\n" + "".join(f"- {t}\n" for t in tgt))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU self-check: tiny shapes, Triton interpreter")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument(
        "--optimizer-params", type=float, default=1e9, help="parameters in the optimizer benchmark"
    )
    p.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    p.add_argument(
        "--no-graphs", action="store_true", help="skip the CUDA-graph (launch-overhead-free) timings"
    )
    p.add_argument("--warmup-ms", type=int, default=10)
    p.add_argument("--rep-ms", type=int, default=50)
    args = p.parse_args()
    args.only = set(args.only.split(","))
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.optimizer_params = 64, [96], 1000, 4096
        args.no_compile = True
        dtype = torch.float32  # the interpreter's bf16 tl.dot is broken; fp32 checks everything here
    if unknown := args.only - set(KERNELS):
        raise SystemExit(f"unknown kernels {sorted(unknown)}: choose from {', '.join(KERNELS)}")

    torch.manual_seed(0)
    bench = Bench(args)
    info = versions()
    print(json.dumps(info), flush=True)
    print(f"device-to-device copy: {bench.copy_gbs:.0f} GB/s", flush=True)
    os.makedirs(args.out, exist_ok=True)

    def save() -> list[str]:
        """Write the results so far (a run stopped by a time limit still leaves its tables)."""
        sp = speedups(bench.rows)
        tgt = targets(bench.rows, sp)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(
                {
                    "info": info,
                    "copy_gbs": bench.copy_gbs,
                    "rows": [asdict(r) for r in bench.rows],
                    "speedups": sp,
                    "targets": tgt,
                    "failures": bench.failures,
                },
                f,
                indent=1,
            )
        write_markdown(
            os.path.join(args.out, "bench_kernels.md"), info, bench.copy_gbs, bench.rows, sp, tgt, args
        )
        return tgt

    sections = [
        (
            f"hidden {h}",
            lambda h=h: (
                bench_rowwise(bench, args.tokens, h, dtype),
                "rope" in args.only and bench_rope(bench, args.tokens, h, dtype),
            ),
        )
        for h in args.hidden
    ]
    if "attention" in args.only:
        sections += [
            (f"attention {h}", lambda h=h: bench_attention(bench, args.tokens, h, dtype)) for h in args.hidden
        ]
    if "cross_entropy" in args.only:
        sections.append(("cross_entropy", lambda: bench_cross_entropy(bench, args.tokens, args.vocab, dtype)))
    if "fused_linear_cross_entropy" in args.only:
        flce_hidden = 4096 if not args.smoke else 96
        sections.append(("flce", lambda: bench_flce(bench, args.tokens, flce_hidden, args.vocab, dtype)))
    if "optimizer" in args.only:
        sections.append(("optimizer", lambda: bench_optimizer(bench, int(args.optimizer_params))))
    for name, run in sections:
        t0 = time.perf_counter()
        run()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        tgt = save()
        print(f"-- {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(["", "targets:"] + tgt) if tgt else "", flush=True)
    if bench.failures:
        print("CORRECTNESS FAILURES:\n" + "\n".join(bench.failures), flush=True)
        return 1
    print(f"wrote {args.out}/bench_kernels.json and bench_kernels.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
