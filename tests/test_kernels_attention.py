"""Triton flash attention (forward and backward, causal, GQA, head dims 64/128) against the float64
math reference. The interpreter's bf16 tl.dot is broken (ENVIRONMENT.md): fp32 and fp16 here,
bf16 in the gpu-marked tests."""

from __future__ import annotations

import pytest
import torch

from megafast.kernels import attention
from megafast.kernels.flash_attention_kernel import attention_torch, flash_attention_triton
from kernel_harness import check_against_reference, fresh_seed, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,heads,groups,s,d,causal",
    [
        (2, 4, 2, 45, 64, True),
        (1, 2, 2, 37, 128, True),
        (1, 3, 1, 20, 64, False),
        (1, 1, 1, 1, 64, True),
        (2, 2, 1, 33, 40, True),
    ],
)
def test_flash_attention(b, heads, groups, s, d, causal, dtype):
    seed = fresh_seed()
    qkv = torch.randn(3, s, b, heads, d).to(dtype)
    q = qkv[0].permute(1, 2, 0, 3).requires_grad_()  # [b, H, s, d], [s, b, H, d] memory like the model
    k = qkv[1, :, :, :groups].permute(1, 2, 0, 3).requires_grad_()  # non-contiguous slice
    v = torch.randn(b, groups, s, d).to(dtype).requires_grad_()
    check_against_reference(
        lambda *a: flash_attention_triton(*a, causal=causal),
        lambda *a: attention_torch(*a, causal=causal),
        (q, k, v),
        what=f"flash {(b, heads, groups, s, d, causal)} {dtype} seed={seed}",
    )


def test_dispatch_triton_matches_sdpa_with_gqa():
    seed = fresh_seed()
    q = torch.randn(2, 6, 29, 64, requires_grad=True)
    k = torch.randn(2, 3, 29, 64, requires_grad=True)
    v = torch.randn(2, 3, 29, 64, requires_grad=True)
    got = attention(q, k, v, backend="triton")
    want = attention(q, k, v, backend="sdpa")
    assert rel_err(got, want) <= 1e-5, f"seed={seed}"
    g = torch.randn_like(got)
    for a, b_ in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert rel_err(a, b_) <= 1e-5, f"seed={seed}"


def test_triton_attention_refuses_dropout():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="dropout"):
        attention(q, q, q, dropout_p=0.1, backend="triton")
