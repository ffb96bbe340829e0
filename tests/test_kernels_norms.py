"""RMSNorm, LayerNorm and fused residual-add + RMSNorm Triton kernels (CPU: Triton's interpreter)
against their float64 references: outputs and every gradient, fp32 and bf16, odd shapes."""

from __future__ import annotations

import pytest
import torch

from megafast.kernels.add_rms_norm_kernel import add_rms_norm_torch, add_rms_norm_triton
from megafast.kernels.layer_norm_kernel import layer_norm_torch, layer_norm_triton
from megafast.kernels.rms_norm_kernel import rms_norm_torch, rms_norm_triton
from kernel_harness import check_against_reference, fresh_seed, rel_err

SHAPES = [(3, 37, 1531), (1, 1531), (1, 7), (5, 96), (2, 3, 1000), (4, 4096)]  # odd, single rows, non-pow2
DTYPES = [torch.float32, torch.bfloat16]


def _param(n: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(n) * scale + shift).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype):
    seed = fresh_seed()
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_()
    w = _param(shape[-1], dtype, 0.5, 1.0)
    check_against_reference(
        rms_norm_triton, rms_norm_torch, (x, w, 1e-5), what=f"rms_norm {shape} {dtype} seed={seed}"
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, dtype, bias):
    seed = fresh_seed()
    x = (torch.randn(shape) * 3 + 1.0).to(dtype).requires_grad_()
    w = _param(shape[-1], dtype, 0.5, 1.0)
    b = _param(shape[-1], dtype, 0.5) if bias else None
    check_against_reference(
        layer_norm_triton,
        layer_norm_torch,
        (x, w, b, 1e-5),
        what=f"layer_norm {shape} {dtype} seed={seed}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 1531), (1, 1531), (5, 96)])
def test_add_rms_norm(shape, dtype):
    """Both outputs (normed, new residual) and the gradients of x, residual and weight."""
    seed = fresh_seed()
    x = torch.randn(shape).to(dtype).requires_grad_()
    residual = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    w = _param(shape[-1], dtype, 0.5, 1.0)
    check_against_reference(
        add_rms_norm_triton,
        add_rms_norm_torch,
        (x, residual, w, 1e-6),
        what=f"add_rms_norm {shape} {dtype} seed={seed}",
    )


def test_add_rms_norm_with_only_the_normed_output_used():
    """The residual output unused downstream (its gradient is None) must still give right gradients."""
    seed = fresh_seed()
    x, r = torch.randn(4, 40, requires_grad=True), torch.randn(4, 40, requires_grad=True)
    w = _param(40, torch.float32, 0.5, 1.0)
    check_against_reference(
        lambda *a: add_rms_norm_triton(*a)[0],
        lambda *a: add_rms_norm_torch(*a)[0],
        (x, r, w, 1e-5),
        what=f"add_rms_norm normed only seed={seed}",
    )


def test_non_contiguous_rows_and_mixed_weight_dtype():
    """A strided input (every other row) and a bf16 input with fp32 weight (output promoted, as torch)."""
    seed = fresh_seed()
    x = torch.randn(10, 300)[::2].requires_grad_()
    w = _param(300, torch.float32, 0.5, 1.0)
    check_against_reference(rms_norm_triton, rms_norm_torch, (x, w, 1e-5), what=f"strided seed={seed}")
    xb = torch.randn(3, 300).bfloat16()
    y = rms_norm_triton(xb, w.detach(), 1e-5)
    assert y.dtype == torch.float32  # bf16 normalised values times an fp32 weight
    assert rel_err(y, rms_norm_torch(xb.double(), w.detach().double(), 1e-5)) <= 1e-2


def test_torch_backend_is_the_model_formula_bit_for_bit():
    """The dispatcher's torch path is exactly what megafast.model.norm computed before kernels existed."""
    from megafast.kernels import layer_norm, rms_norm

    x, w, b = torch.randn(3, 5, 64), torch.randn(64), torch.randn(64)
    x32 = x.float()
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    assert torch.equal(rms_norm(x, w, 1e-5, backend="torch"), want)
    want_ln = torch.nn.functional.layer_norm(x.float(), (64,), w.float(), b.float(), 1e-5).to(x.dtype)
    assert torch.equal(layer_norm(x, w, b, 1e-5, backend="torch"), want_ln)
