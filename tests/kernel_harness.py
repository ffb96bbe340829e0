"""Checking a kernel against its reference: poisoned outputs, float64 references, relative norms.

    errors = check_against_reference(rms_norm_triton, rms_norm_torch, (x, w, 1e-5))

runs the kernel (forward, then backward with random output gradients) while every
``torch.empty``/``empty_like``/``empty_strided`` returns memory filled with NaN (so an element a
kernel forgets to write shows up), runs the reference on float64 copies of the same inputs, and
asserts ``||out - ref|| / ||ref|| <= TOLERANCES[dtype]`` for every output and every input gradient.
Used by tests/test_kernels_*.py (CPU interpreter and GPU) and the benchmark's correctness gate.
It lives under tests/ because it patches ``torch.empty`` process-wide while a check runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is all zeros; NaN stays NaN)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    num, den = (out64 - ref64).norm().item(), ref64.norm().item()
    return num / den if den > 0 else num


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, uninitialised torch allocations made from Python come back poisoned."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def wrap(fn):
        def poisoned(*args, **kwargs):
            with torch.no_grad():
                return _poison(fn(*args, **kwargs))

        return poisoned

    for name, fn in originals.items():
        setattr(torch, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Exact fp32 matmuls and convolutions (no TF32) within the block; the process's settings after it."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)  # also restores cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = cudnn


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _float64_copy(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def check_against_reference(
    fn: Callable,
    ref: Callable,
    args: Sequence,
    *,
    tol: Optional[float] = None,
    what: str = "",
    ref_args: Optional[Sequence] = None,
) -> dict[str, float]:
    """Compare ``fn(*args)`` and its input gradients with ``ref`` on float64 copies (see module doc).

    Tensors in ``args`` with ``requires_grad`` get their gradients compared; ``tol`` defaults to the
    tolerance of the first floating input's dtype. ``ref_args`` overrides the reference's inputs
    (float64 copies of ``args`` by default). Returns the relative errors by name.
    """
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    tol = tol if tol is not None else TOLERANCES[floats[0].dtype]
    with poisoned_allocations():
        outs = _as_tuple(fn(*args))
    r_args = list(ref_args) if ref_args is not None else [_float64_copy(a) for a in args]
    r_outs = _as_tuple(ref(*r_args))
    errors = {}
    for i, (o, r) in enumerate(zip(outs, r_outs)):
        assert o.shape == r.shape, f"{what} output {i}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        errors[f"out{i}"] = rel_err(o, r)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    r_inputs = [a for a in r_args if isinstance(a, torch.Tensor) and a.requires_grad]
    if inputs:
        grad_outs = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs]
        with poisoned_allocations():
            grads = torch.autograd.grad(outs, inputs, grad_outs)
        r_grads = torch.autograd.grad(r_outs, r_inputs, [g.to(r.dtype) for g, r in zip(grad_outs, r_outs)])
        for i, (g, r) in enumerate(zip(grads, r_grads)):
            assert g.shape == r.shape, (
                f"{what} grad {i}: shape {tuple(g.shape)} != reference {tuple(r.shape)}"
            )
            errors[f"grad{i}"] = rel_err(g, r)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad} (all: {errors})"
    return errors


def fresh_seed() -> int:
    """Seed torch from the OS (fresh inputs every run) and return the seed for failure messages."""
    import random

    seed = random.SystemRandom().randrange(1 << 31)
    torch.manual_seed(seed)
    return seed
