"""SwiGLU ([gate; up] layout) and GELU (tanh and erf) Triton kernels against float64 references."""

from __future__ import annotations

import pytest
import torch

from megafast.kernels.gelu_kernel import gelu_torch, gelu_triton
from megafast.kernels.swiglu_kernel import swiglu_torch, swiglu_triton
from kernel_harness import check_against_reference, fresh_seed

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 2 * 1531), (1, 2 * 7), (2, 5, 2 * 1100), (4, 2 * 96)])
def test_swiglu(shape, dtype):
    seed = fresh_seed()
    x = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    check_against_reference(swiglu_triton, swiglu_torch, (x,), what=f"swiglu {shape} {dtype} seed={seed}")


def test_swiglu_on_a_column_parallel_output_layout():
    """The model's fc1 output [s, b, 2F] with [gate_r; up_r] halves: the kernel splits the last dimension."""
    seed = fresh_seed()
    gate, up = torch.randn(6, 2, 50), torch.randn(6, 2, 50)
    x = torch.cat([gate, up], dim=-1)
    y = swiglu_triton(x)
    assert torch.allclose(y, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6), f"seed={seed}"


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 1531), (1, 9), (7, 1000)])
def test_gelu(shape, dtype, approximate):
    seed = fresh_seed()
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    check_against_reference(
        lambda t: gelu_triton(t, approximate),
        lambda t: gelu_torch(t, approximate),
        (x,),
        what=f"gelu {approximate} {shape} {dtype} seed={seed}",
    )


def test_gelu_saturates_without_nan():
    x = torch.tensor([-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4], requires_grad=True)
    for approximate in ("tanh", "none"):
        y = gelu_triton(x, approximate)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
        assert torch.allclose(y, gelu_torch(x.detach(), approximate), atol=1e-4)
