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


def _windowed_reference(q, k, v, left):
    """Plain attention with the sliding-window mask written out: query i sees keys i - left .. i."""
    heads, groups, s = q.shape[1], k.shape[1], q.shape[2]
    k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    visible = (j <= i) & (j >= i - left)  # [s, s]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,heads,groups,s,d,left",
    [
        (1, 4, 2, 77, 64, 5),  # window far below the 32-row tiles: most key blocks skipped
        (2, 2, 1, 45, 40, 33),  # window just over one tile, odd head dim
        (1, 2, 2, 37, 64, 1),  # each token sees itself and the one before (left 0 makes dq = dk = 0 exactly:
        #                        the relative error of fp32 rounding noise against zero says nothing)
        (1, 1, 1, 20, 64, 100),  # window wider than the sequence: plain causal
    ],
)
def test_flash_attention_sliding_window(b, heads, groups, s, d, left, dtype):
    seed = fresh_seed()
    q = torch.randn(b, heads, s, d).to(dtype).requires_grad_()
    k = torch.randn(b, groups, s, d).to(dtype).requires_grad_()
    v = torch.randn(b, groups, s, d).to(dtype).requires_grad_()
    check_against_reference(
        lambda *a: flash_attention_triton(*a, causal=True, window=left),
        lambda *a: _windowed_reference(*a, left),
        (q, k, v),
        what=f"flash window {(b, heads, groups, s, d, left)} {dtype} seed={seed}",
    )


def test_flash_attention_window_changes_the_result_and_needs_causal():
    """Guards the test above: the window must mask something (else it would pass with no window)."""
    seed = fresh_seed()
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    assert rel_err(flash_attention_triton(q, k, v, window=4), attention_torch(q, k, v)) > 1e-2, f"seed={seed}"
    with pytest.raises(ValueError, match="sliding window needs causal"):
        flash_attention_triton(q, k, v, causal=False, window=4)
