"""MoE kernels: the grouped matmul and the token permute/unpermute (Triton in the interpreter, and
their torch twins) against plain-torch loops over experts and tokens written here; forward and every
gradient (dx, dw, d hidden, d expert_out, d probs), fp32 and fp16, odd shapes, empty experts, one
token, every token on one expert, dropped (capacity) choices."""

from __future__ import annotations

import pytest
import torch

import seeding
from kernel_harness import check_against_reference, rel_err
from megafast.kernels import dispatch
from megafast.kernels import grouped_gemm_kernel as gg
from megafast.kernels import moe_permute_kernel as mp

pytest.importorskip("triton")

IMPLS = {"triton": (gg.grouped_gemm, mp.permute, mp.unpermute),
         "torch": (gg.grouped_gemm_torch, mp.permute_torch, mp.unpermute_torch)}
# fp16: outputs rounded once to fp16 (relative RMS error ~3e-4) after fp32 accumulation
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _seed(name: str = "seed") -> int:
    seed = seeding.draw_seed(name)
    torch.manual_seed(seed)
    return seed


# ----------------------------------------------------------------------------- references (loops)


def loop_grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row by row: the expert of row r is the group whose [start, end) holds r; rows past the groups -> 0."""
    rows = []
    bounds, start = [], 0
    for c in counts.tolist():
        bounds.append((start, start + c))
        start += c
    for r in range(x.shape[0]):
        e = next((e for e, (s, t) in enumerate(bounds) if s <= r < t), None)
        rows.append(x[r] @ w[e] if e is not None else x.new_zeros(w.shape[2]))
    if not rows:  # no tokens: an empty output that still depends on x and w (zero gradients)
        return x.new_zeros(0, w.shape[2]) + 0 * (x.sum() + w.sum())
    return torch.stack(rows)


def loop_permute(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Expert by expert, token by token, choice by choice; dropped choices' zero rows at the end."""
    t, k = indices.shape
    rows, row_id_map, counts = [], torch.full((t, k), -1, dtype=torch.int64), []
    for e in range(num_experts):
        counts.append(0)
        for tok in range(t):
            for j in range(k):
                if int(indices[tok, j]) == e:
                    row_id_map[tok, j] = len(rows)
                    rows.append(hidden[tok])
                    counts[-1] += 1
    while len(rows) < t * k:
        rows.append(hidden.new_zeros(hidden.shape[1]))
    return torch.stack(rows), row_id_map, torch.tensor(counts)


def loop_unpermute(expert_out: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    out = []
    for tok in range(row_id_map.shape[0]):
        acc = expert_out.new_zeros(expert_out.shape[1])
        for j in range(row_id_map.shape[1]):
            if int(row_id_map[tok, j]) >= 0:
                acc = acc + probs[tok, j] * expert_out[int(row_id_map[tok, j])]
        out.append(acc)
    return torch.stack(out)


# ---------------------------------------------------------------------------------- grouped GEMM

GEMM_CASES = {  # name: (tokens per expert, rows T (>= their sum: the rest are dropped slots), K, N)
    "odd": ([10, 0, 30, 7], 47, 37, 45),
    "multi_tile": ([40, 3, 0, 33, 0, 1, 5], 82, 64, 70),
    "one_token": ([0, 1, 0], 1, 19, 23),
    "one_expert": ([0, 0, 40, 0], 40, 33, 17),
    "dropped_slots": ([5, 0, 9], 20, 16, 40),
    "many_k_tiles": ([20, 0, 13], 33, 300, 40),  # dw: two groups of K tiles, the last one partial
    "tail_group": ([33, 33, 33, 33, 1], 133, 40, 70),  # a real row tile in the last, partial tile group
    "no_tokens": ([0, 0], 0, 8, 8),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", GEMM_CASES)
def test_grouped_gemm_against_a_loop(case, dtype, impl):
    seed = _seed()
    counts, rows, k, n = GEMM_CASES[case]
    counts = torch.tensor(counts)
    x = torch.randn(rows, k).to(dtype).requires_grad_()
    w = (torch.randn(len(counts), k, n) / k**0.5).to(dtype).requires_grad_()
    fn = IMPLS[impl][0]
    check_against_reference(fn, loop_grouped_gemm, (x, w, counts), tol=TOL[dtype],
                            what=f"grouped_gemm {impl} {case} {dtype} seed={seed}")


def test_grouped_gemm_gradient_of_an_empty_expert_is_zero():
    _seed()
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(3, 8, 5, requires_grad=True)
    for fn in (gg.grouped_gemm, gg.grouped_gemm_torch):
        w.grad = None
        fn(x, w, torch.tensor([4, 0, 2])).sum().backward()
        assert torch.equal(w.grad[1], torch.zeros(8, 5))


def test_tile_map_lists_every_expert_tile_once():
    """The device-side tile map against a Python walk over the groups (dropped slots: group E)."""
    counts, rows, bm = [70, 0, 3, 64, 0, 1], 150, 32
    tmap = gg.tile_map(torch.tensor(counts), rows, bm)
    expected, start = [], 0
    for e, c in enumerate(counts + [rows - sum(counts)]):
        for first in range(start, start + c, bm):
            expected.append((e, first, start + c))
        start += c
    got = [tuple(col) for col in tmap.t().tolist() if col[0] >= 0]
    assert got == expected
    assert tmap.shape[1] == gg.max_row_tiles(rows, len(counts), bm) >= len(expected)


def test_grouped_gemm_checks_shapes():
    with pytest.raises(ValueError, match="tokens_per_expert must be"):
        gg.grouped_gemm_torch(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([4]))
    with pytest.raises(ValueError, match=r"x must be \[T, K\]"):
        gg.grouped_gemm(torch.randn(4, 3), torch.randn(2, 4, 5), torch.tensor([2, 2]))


# ------------------------------------------------------------------------------ permute/unpermute

PERMUTE_CASES = {  # name: (tokens T, top-k, experts E, hidden H, routing)
    "odd_hidden": (9, 2, 4, 1100, "random"),  # two column blocks of 1024
    "one_token": (1, 2, 5, 37, "random"),
    "one_token_top1": (1, 1, 3, 8, "random"),
    "one_expert": (12, 1, 4, 33, "expert2"),
    "empty_experts": (7, 2, 8, 40, "first3"),
    "top4_of_60": (6, 4, 60, 24, "random"),
    "dropped": (10, 2, 4, 29, "dropped"),
}


def _indices(t: int, k: int, e: int, routing: str) -> torch.Tensor:
    if routing == "expert2":
        return torch.full((t, k), 2, dtype=torch.int64)
    pool = 3 if routing == "first3" else e
    idx = torch.stack([torch.randperm(pool)[:k] for _ in range(t)])
    if routing == "dropped":
        idx[torch.rand(t, k) < 0.3] = -1
        idx[0, 0] = -1
    return idx


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PERMUTE_CASES)
def test_permute_and_unpermute_against_loops(case, dtype, impl):
    seed = _seed()
    t, k, e, h, routing = PERMUTE_CASES[case]
    _, permute, unpermute = IMPLS[impl]
    what = f"{impl} {case} {dtype} seed={seed}"
    idx = _indices(t, k, e, routing)
    hidden = torch.randn(t, h).to(dtype).requires_grad_()
    permuted, row_id_map, counts = permute(hidden, idx, e)
    ref_permuted, ref_map, ref_counts = loop_permute(hidden.detach(), idx, e)
    assert torch.equal(row_id_map, ref_map), what
    assert torch.equal(counts, ref_counts), what
    assert torch.equal(permuted.detach(), ref_permuted), what  # a copy: exact in every dtype
    check_against_reference(lambda x: permute(x, idx, e)[0], lambda x: loop_permute(x, idx, e)[0], (hidden,),
                            tol=TOL[dtype], what=f"permute {what}")
    expert_out = torch.randn(t * k, h).to(dtype).requires_grad_()
    probs = torch.rand(t, k).to(dtype).requires_grad_()
    check_against_reference(lambda y, p: unpermute(y, row_id_map, p),
                            lambda y, p: loop_unpermute(y, ref_map, p), (expert_out, probs),
                            tol=TOL[dtype], what=f"unpermute {what}")


def test_unpermute_with_fp32_probs_keeps_the_expert_dtype():
    _seed()
    idx = torch.tensor([[0, 1], [1, 0], [1, 1]])
    expert_out = torch.randn(6, 16, dtype=torch.float16, requires_grad=True)
    probs = torch.rand(3, 2, requires_grad=True)
    for unpermute in (mp.unpermute, mp.unpermute_torch):
        _, row_id_map, _ = mp.permute_torch(torch.randn(3, 16), idx, 2)
        out = unpermute(expert_out, row_id_map, probs)
        assert out.dtype == torch.float16
        d_out, d_probs = torch.autograd.grad(out.float().sum(), (expert_out, probs))
        assert d_out.dtype == torch.float16 and d_probs.dtype == torch.float32


def test_permute_checks_its_inputs():
    with pytest.raises(ValueError, match=r"indices must be \[T, k\]"):
        mp.permute(torch.randn(4, 8), torch.zeros(3, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="int64"):
        mp.permute_torch(torch.randn(4, 8), torch.zeros(4, 2), 2)
    with pytest.raises(ValueError, match=r"probs \[T, k\]"):
        mp.unpermute(torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 1))


# ------------------------------------------------------------------------- the MoE path end to end


def test_dispatch_backends_agree_on_a_routed_expert_layer():
    """permute -> grouped GEMM -> unpermute through dispatch: Triton (interpreter) equals torch, and
    both equal a loop over tokens; 'auto' on CPU is the torch twin."""
    seed = _seed()
    t, k, e, h, f = 11, 2, 5, 24, 40
    hidden = torch.randn(t, h, requires_grad=True)
    w = (torch.randn(e, h, f) / h**0.5).requires_grad_()
    scores = torch.randn(t, e).softmax(-1)
    probs, idx = scores.topk(k, dim=-1)
    probs.requires_grad_()
    outs = {}
    for backend in ("triton", "torch", "auto"):
        permuted, row_id_map, counts = dispatch.moe_permute(hidden, idx, e, backend=backend)
        y = dispatch.grouped_gemm(permuted, w, counts, backend=backend)
        out = dispatch.moe_unpermute(y, row_id_map, probs, backend=backend)
        outs[backend] = (out, *torch.autograd.grad(out.square().sum(), (hidden, w, probs)))
    ref = torch.stack([sum(probs[i, j] * (hidden[i] @ w[idx[i, j]]) for j in range(k)) for i in range(t)])
    ref_grads = torch.autograd.grad(ref.square().sum(), (hidden, w, probs))
    for backend, got in outs.items():
        for name, a, b in zip(("out", "d hidden", "d w", "d probs"), got, (ref, *ref_grads)):
            assert rel_err(a, b) <= 1e-5, f"{backend} {name}: {rel_err(a, b)} seed={seed}"
    assert all(torch.equal(a, b) for a, b in zip(outs["auto"], outs["torch"]))


def test_bench_moe_smoke_mode(tmp_path):
    """benchmarks/bench_moe.py --smoke: every implementation checked against the loop, its tables
    written, and a docs section replaced in place."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "bench_moe.py")
    doc = tmp_path / "doc.md"
    doc.write_text("# doc\n\nkept\n")
    # as a script: its EP dispatcher part spawns one process per rank, which re-imports the script
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, path, "--smoke", "--out", str(tmp_path), "--write-doc", str(doc)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = __import__("json").loads((tmp_path / "bench_moe.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"loop", "torch"}
    assert all(r["max_rel_err"] is None or r["max_rel_err"] <= 1e-5 for r in rows)
    text = doc.read_text()
    assert "kept" in text and "<!-- bench_moe:start -->" in text and "| grouped_gemm |" in text
