"""RoPE Triton kernel (half-split layout) against the float64 reference: any head count, GQA's k
sliced in place out of the fused QKV projection, shared and per-sequence cos/sin tables."""

from __future__ import annotations

import pytest
import torch

from megafast.kernels.rotary_kernel import apply_rotary_torch, apply_rotary_triton
from kernel_harness import check_against_reference, fresh_seed
from megafast.model.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,b,h,d", [(37, 3, 5, 24), (1, 1, 1, 2), (16, 2, 32, 128), (9, 2, 3, 64)])
def test_rotary_with_model_tables(s, b, h, d, dtype):
    seed = fresh_seed()
    cos, sin = RotaryEmbedding(d, 10000.0)(s, torch.device("cpu"))  # [s, 1, 1, d] fp32, as the model uses
    x = torch.randn(s, b, h, d).to(dtype).requires_grad_()
    check_against_reference(
        apply_rotary_triton,
        apply_rotary_torch,
        (x, cos, sin),
        what=f"rope {(s, b, h, d)} {dtype} seed={seed}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_general_tables_and_per_sequence_positions(dtype):
    """Unequal halves of cos/sin (the general formula) and [s, b, 1, d] tables (packed samples)."""
    seed = fresh_seed()
    s, b, h, d = 11, 3, 4, 40
    for shape in [(s, d), (s, 1, 1, d), (s, b, 1, d)]:
        cos, sin = torch.randn(shape), torch.randn(shape)
        x = torch.randn(s, b, h, d).to(dtype).requires_grad_()
        check_against_reference(
            apply_rotary_triton,
            apply_rotary_torch,
            (x, cos, sin),
            what=f"rope tables {shape} {dtype} seed={seed}",
        )


def test_rotary_on_gqa_views_of_fused_qkv():
    """q (a reshaped copy) and k (a strided view) taken out of the fused QKV tensor as attention does."""
    seed = fresh_seed()
    s, b, groups, per_group, d = 13, 2, 2, 3, 16
    qkv = torch.randn(s, b, groups, per_group + 2, d, requires_grad=True)
    cos, sin = RotaryEmbedding(d, 500000.0)(s, torch.device("cpu"))
    q = qkv[:, :, :, :per_group].reshape(s, b, groups * per_group, d)
    k = qkv[:, :, :, per_group]  # non-contiguous: strides of the fused tensor
    assert not k.is_contiguous()
    out = apply_rotary_triton(q, cos, sin).sum() * 2 + apply_rotary_triton(k, cos, sin).square().sum()
    (g,) = torch.autograd.grad(out, qkv)
    ref_qkv = qkv.detach().double().requires_grad_()
    rq = ref_qkv[:, :, :, :per_group].reshape(s, b, groups * per_group, d)
    rk = ref_qkv[:, :, :, per_group]
    ref = apply_rotary_torch(rq, cos.double(), sin.double()).sum() * 2
    ref = ref + apply_rotary_torch(rk, cos.double(), sin.double()).square().sum()
    (rg,) = torch.autograd.grad(ref, ref_qkv)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()), f"seed={seed}"
    assert ((g.double() - rg).norm() / rg.norm()).item() <= 1e-5, f"seed={seed}"


def test_rotary_three_dimensional_input():
    seed = fresh_seed()
    x = torch.randn(7, 3, 8, requires_grad=True)  # [s, heads, d]
    cos, sin = torch.randn(7, 8), torch.randn(7, 8)
    check_against_reference(
        apply_rotary_triton, apply_rotary_torch, (x, cos, sin), what=f"rope 3-D seed={seed}"
    )
