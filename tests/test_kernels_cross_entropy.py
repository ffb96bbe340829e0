"""Cross-entropy Triton kernels against the float64 reference: padding columns, ignore_index,
vocabularies spanning several blocks, the vocabulary-parallel variant composed with the TP
all-reduces on 2 gloo ranks (same contract as megafast.parallel.cross_entropy), and the fused
linear + cross-entropy (chunked over tokens; fp32/fp16/bf16 since its matmuls are torch's)."""

from __future__ import annotations

import pytest
import torch
from dist import run_distributed

from megafast.kernels import cross_entropy, fused_linear_cross_entropy
from megafast.kernels.cross_entropy_kernel import cross_entropy_torch, cross_entropy_triton
from megafast.kernels.fused_linear_cross_entropy_kernel import (
    fused_linear_cross_entropy_torch,
    fused_linear_cross_entropy_triton,
)
from kernel_harness import TOLERANCES, check_against_reference, fresh_seed, rel_err
from megafast.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_vocab_parallel_ce


def _targets(shape, vocab_size: int) -> torch.Tensor:
    t = torch.randint(0, vocab_size, shape)
    flat = t.view(-1)
    flat[:: max(1, flat.numel() // 5)] = -100  # some ignored tokens
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,padded,vocab", [((3, 37), 1531, 1500), ((1,), 2500, 2500), ((4, 5), 3000, 2049), ((2,), 7, 5)]
)
def test_cross_entropy(rows, padded, vocab, dtype):
    """Padded columns (>= vocab) excluded; 2500/3000 columns span several 1024-wide blocks."""
    seed = fresh_seed()
    logits = (torch.randn(*rows, padded) * 4).to(dtype).requires_grad_()
    target = _targets(rows, vocab)
    check_against_reference(
        lambda z, t: cross_entropy_triton(z, t, -100, vocab),
        lambda z, t: cross_entropy_torch(z, t, -100, vocab),
        (logits, target),
        what=f"ce {rows}x{padded} vocab {vocab} {dtype} seed={seed}",
    )


def test_cross_entropy_gradient_is_zero_on_padding_and_ignored_rows():
    fresh_seed()
    logits = torch.randn(4, 300, requires_grad=True)
    target = torch.tensor([5, -100, 249, 0])
    loss = cross_entropy_triton(logits, target, -100, 250)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert loss[1] == 0 and torch.equal(g[1], torch.zeros(300))
    assert torch.equal(g[:, 250:], torch.zeros(4, 50))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_dispatch_reductions_match_the_torch_backend(reduction):
    seed = fresh_seed()
    logits, target = torch.randn(6, 9, 130, requires_grad=True), _targets((6, 9), 130)
    got = cross_entropy(logits, target, reduction=reduction, backend="triton")
    want = cross_entropy(logits, target, reduction=reduction, backend="torch")
    assert rel_err(got, want) <= 1e-6, f"seed={seed}"


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_linear_cross_entropy(dtype, reduction):
    """37 tokens in chunks of 8 (a short last chunk), 1000 padded columns of which 990 are vocabulary."""
    seed = fresh_seed()
    x = torch.randn(37, 24).to(dtype).requires_grad_()
    w = (torch.randn(1000, 24) * 0.3).to(dtype).requires_grad_()
    target = _targets((37,), 990)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # fp16/bf16 logits rounded
    check_against_reference(
        lambda a, b, t: fused_linear_cross_entropy_triton(a, b, t, None, 990, -100, reduction, 8),
        lambda a, b, t: fused_linear_cross_entropy_torch(a, b, t, 990, -100, reduction),
        (x, w, target),
        tol=tol,
        what=f"flce {dtype} {reduction} seed={seed}",
    )


def test_fused_linear_cross_entropy_default_chunks_and_batch_shape():
    seed = fresh_seed()
    x = torch.randn(2, 21, 16, requires_grad=True)  # [b, s, h]
    w = torch.randn(200, 16, requires_grad=True)
    target = _targets((2, 21), 200)
    check_against_reference(
        lambda a, b, t: fused_linear_cross_entropy(a, b, t, backend="triton"),
        lambda a, b, t: fused_linear_cross_entropy_torch(a, b, t),
        (x, w, target),
        what=f"flce default chunk seed={seed}",
    )


# --------------------------------------------------------------- vocabulary parallel, 2 gloo ranks

TP_VOCAB, TP_PADDED, HIDDEN = 1001, 1100, 16  # rank 1's shard [550, 1100) is partly padding


def _tp_worker(
    rank: int, world: int, logits: torch.Tensor, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor
):
    import torch.distributed as dist

    from megafast.kernels.cross_entropy_kernel import vocab_parallel_cross_entropy_triton
    from megafast.parallel.mappings import copy_to_tensor_parallel_region

    group = dist.group.WORLD
    shard = TP_PADDED // world
    cols = slice(rank * shard, (rank + 1) * shard)
    out = {}
    # Triton and torch vocabulary-parallel cross-entropy on this rank's logits shard.
    for name, fn in (("triton", vocab_parallel_cross_entropy_triton), ("torch", torch_vocab_parallel_ce)):
        local = logits[:, :, cols].clone().requires_grad_()
        loss = fn(local, target, group, TP_VOCAB, -100)
        (g,) = torch.autograd.grad((loss * torch.linspace(0.5, 2, loss.numel()).view_as(loss)).sum(), local)
        out[name] = (loss.detach(), g)
    # Fused linear + cross-entropy on this rank's weight shard; x's gradient all-reduced by the mapping.
    xr = x.clone().requires_grad_()
    wr = w[cols].clone().requires_grad_()
    x_in = copy_to_tensor_parallel_region(xr, group)
    loss = fused_linear_cross_entropy_triton(x_in, wr, target, group, TP_VOCAB, -100, "none", 5)
    gx, gw = torch.autograd.grad((loss * torch.linspace(0.5, 2, loss.numel()).view_as(loss)).sum(), (xr, wr))
    out["flce"] = (loss.detach(), gx, gw)
    return out


def test_vocab_parallel_cross_entropy_composes_with_tp_all_reduces():
    """TP=2: per-rank losses equal the full-vocabulary reference; the logits-gradient shards and the
    fused linear+CE's weight shards and (all-reduced) input gradient equal the reference's."""
    seed = fresh_seed()
    logits = torch.randn(3, 7, TP_PADDED) * 3
    x, w = torch.randn(3, 7, HIDDEN), torch.randn(TP_PADDED, HIDDEN) * 0.5
    target = _targets((3, 7), TP_VOCAB)
    results = run_distributed(_tp_worker, 2, logits, x, w, target)
    weights = torch.linspace(0.5, 2, target.numel(), dtype=torch.float64).view_as(target)

    ref_logits = logits.double().requires_grad_()
    ref = cross_entropy_torch(ref_logits, target, -100, TP_VOCAB)
    (ref_g,) = torch.autograd.grad((ref * weights).sum(), ref_logits)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref_fl = fused_linear_cross_entropy_torch(xd, wd, target, TP_VOCAB)
    ref_gx, ref_gw = torch.autograd.grad((ref_fl * weights).sum(), (xd, wd))
    tol = TOLERANCES[torch.float32]
    for name in ("triton", "torch"):
        for r in results:
            assert rel_err(r[name][0], ref) <= tol, f"{name} loss seed={seed}"
        grad = torch.cat([r[name][1] for r in results], dim=-1)
        assert rel_err(grad, ref_g) <= tol, f"{name} logits grad seed={seed}"
    for r in results:
        assert rel_err(r["flce"][0], ref_fl) <= tol, f"flce loss seed={seed}"
        assert rel_err(r["flce"][1], ref_gx) <= tol, f"flce x grad (all-reduced) seed={seed}"
    assert rel_err(torch.cat([r["flce"][2] for r in results]), ref_gw) <= tol, f"flce weight grad seed={seed}"
