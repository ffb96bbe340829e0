"""Context-parallel attention (ring p2p and all-to-all) against plain attention of the whole
sequence written here: forward outputs and q/k/v gradients, causal and packed, GQA, on gloo.

One process launch per world size runs every case (launches dominate the cost on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from dist import run_distributed
from seeding import draw_seed

B, H, G, D = 2, 4, 2, 8


def reference_attention(q, k, v, segments=None, window=None):
    """softmax(q k^T / sqrt(d) + causal (and same-segment, and sliding-window: key j visible from
    query i when i - window <= j <= i) mask) v on the whole sequence, fp64."""
    q, k, v = q.double(), k.double(), v.double()
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, H, s, s]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None]
    if window is not None:
        allowed = allowed & ~torch.ones(s, s, dtype=torch.bool).tril(-window - 1)[None]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def held_positions(seq: int, cp: int, rank: int) -> torch.Tensor:
    """Chunks rank and 2cp-1-rank of the sequence cut in 2cp (written out, not megafast's helper)."""
    c = seq // (2 * cp)
    return torch.tensor(list(range(rank * c, rank * c + c)) + list(range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)))


def make_inputs(seed: int, seq: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, seq, D, generator=g)
    k = torch.randn(B, G, seq, D, generator=g)
    v = torch.randn(B, G, seq, D, generator=g)
    dout = torch.randn(B, H, seq, D, generator=g)
    # packed rows: row 0 four samples (one starting inside a chunk), row 1 two samples
    lengths = [[5, 11, seq - 26, 10], [seq // 2 + 3, seq // 2 - 3]]
    segments = torch.cat([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))[None] for r in lengths])
    return [t.to(dtype) for t in (q, k, v, dout)], segments


CASES = [  # (comm, packed, block backend, dtype); "torch-tiled": torch blocks in many query tiles
    ("p2p", False, "torch", torch.float32),
    ("p2p", True, "torch", torch.float32),
    ("p2p", True, "torch-tiled", torch.float32),
    ("a2a", False, "torch", torch.float32),
    ("a2a", True, "torch", torch.float32),
    ("p2p", False, "triton", torch.float32),
    ("p2p", False, "triton", torch.float16),
]
# (..., left window W): query i sees keys i - W .. i. At seq 64 and CP=2 a chunk is 16 tokens: W=5
# cuts the diagonal chunks and skips whole blocks, W=20 reaches one chunk back, W=40 two.
WINDOW_CASES = [
    ("p2p", False, "torch", torch.float32, 5),
    ("p2p", False, "torch", torch.float32, 20),
    ("p2p", True, "torch", torch.float32, 40),
    ("p2p", False, "triton", torch.float32, 20),
    ("a2a", False, "torch", torch.float32, 5),
    ("a2a", True, "torch", torch.float32, 20),
]


def _worker(rank, world, seed, seq, cases):
    from megafast.config import ParallelConfig
    from megafast.parallel import ring_attention as ring
    from megafast.parallel.ring_attention import RingSpec, ring_attention
    from megafast.parallel.state import ParallelState
    from megafast.parallel.ulysses import gather_sequence, ulysses_attention

    state = ParallelState.create(ParallelConfig(context_parallel_size=world))
    assert state.cp_rank == rank and state.cp_size == world
    held = held_positions(seq, world, rank)
    results = []
    for comm, packed, backend, dtype, *rest in cases:
        window = rest[0] if rest else None
        (q, k, v, dout), segments = make_inputs(seed, seq, dtype)
        ql, kl, vl = (t.index_select(2, held).clone().requires_grad_(True) for t in (q, k, v))
        seg = segments if packed else None
        ring.TILE_ELEMENTS = 3 * B * H * seq if backend == "torch-tiled" else 1 << 22  # ~3 query rows per tile
        if comm == "p2p":
            spec = RingSpec(state.cp_group, tuple(state.cp_ranks), rank, backend.replace("-tiled", ""))
            out = ring_attention(ql, kl, vl, spec, seg, window=window)
        else:
            full = gather_sequence(segments.index_select(1, held), state.cp_group, world) if packed else None

            def attend(q_, k_, v_):  # plain SDPA on [b, H/C, s, d] with the whole-sequence mask
                r = q_.shape[1] // k_.shape[1]
                k_, v_ = k_.repeat_interleave(r, 1), v_.repeat_interleave(r, 1)
                mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
                if window is not None:
                    mask = mask & ~torch.ones(seq, seq, dtype=torch.bool).tril(-window - 1)
                if full is not None:
                    mask = mask & (full[:, None, :, None] == full[:, None, None, :])
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)

            out = ulysses_attention(ql, kl, vl, state.cp_group, world, attend)
        out.backward(dout.index_select(2, held))
        results.append((out.detach(), ql.grad, kl.grad, vl.grad))
    return results


def _check(world: int, seq: int, cases) -> None:
    seed = draw_seed("seed")
    per_rank = run_distributed(_worker, world, seed, seq, cases)
    for i, (comm, packed, backend, dtype, *rest) in enumerate(cases):
        window = rest[0] if rest else None
        (q, k, v, dout), segments = make_inputs(seed, seq, dtype)
        q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
        ref = reference_attention(q, k, v, segments if packed else None, window)
        ref.backward(dout.double())
        want = (ref.detach(), q.grad, k.grad, v.grad)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        for rank in range(world):
            held = held_positions(seq, world, rank)
            for name, got, full in zip(("out", "dq", "dk", "dv"), per_rank[rank][i], want):
                expect = full.index_select(2, held)
                err = (got.double() - expect).abs().max().item() / max(expect.abs().max().item(), 1.0)
                assert err <= tol, (f"{comm} packed={packed} {backend} {dtype} window={window} CP={world} "
                                    f"rank {rank} {name}: "
                                    f"error {err:.2e} > {tol:.0e} (seed {seed})")


def test_context_parallel_attention_cp2():
    _check(2, 64, CASES)


def test_context_parallel_attention_cp4():
    _check(4, 64, [c for c in CASES if c[2].startswith("torch")])


def test_context_parallel_sliding_window_cp2():
    _check(2, 64, WINDOW_CASES)


def test_context_parallel_sliding_window_cp4():
    """Chunks of 8 tokens: W=5 leaves most blocks out entirely, W=13 cuts the neighbouring chunk."""
    _check(4, 64, [("p2p", False, "torch", torch.float32, 5), ("p2p", True, "torch", torch.float32, 13)])


def test_the_window_reference_masks_something():
    """The window cases above would pass vacuously if the window changed nothing."""
    (q, k, v, _), _ = make_inputs(draw_seed("seed"), 64, torch.float32)
    assert (reference_attention(q, k, v, None, 20) - reference_attention(q, k, v)).abs().max() > 1e-2


def test_ring_attention_rejects_odd_local_length():
    from megafast.parallel.ring_attention import RingSpec, ring_attention

    x = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="two equal chunks"):
        ring_attention(x, x, x, RingSpec(None, (0, 1), 0))


@pytest.mark.parametrize("cp,window", [(2, 5), (2, 20), (4, 5), (4, 13), (4, 40)])
def test_window_blocks_of_every_rank_merged_in_one_process(cp, window):
    """The ring's per-block window logic without communication: for every CP rank, its blocks
    against every rank's K/V (torch blocks), merged by log-sum-exp, equal plain attention with the
    window written out; blocks entirely outside the window are skipped (at CP=4, W=5 most are)."""
    from megafast.parallel import ring_attention as ring

    seq = 64
    (q, k, v, _), _ = make_inputs(draw_seed("seed"), seq, torch.float32)
    ref = reference_attention(q, k, v, None, window)
    scale, c, skipped = 1.0 / math.sqrt(D), seq // (2 * cp), 0
    for me in range(cp):
        spec = ring.RingSpec(None, tuple(range(cp)), me)
        ql = q.index_select(2, held_positions(seq, cp, me))
        out = lse = None
        for t in range(cp):
            src = (me - t) % cp
            block = ring._Block(spec, src, c, None, window, q.device)
            if block.skip:
                skipped += 1
                continue
            held = held_positions(seq, cp, src)
            o, lb = block.forward(ql, k.index_select(2, held), v.index_select(2, held), scale)
            if out is None:
                out, lse = o.clone(), lb.clone()
            else:
                ring._merge_(out, lse, o, lb, block.q_rows)
        want = ref.index_select(2, held_positions(seq, cp, me))
        assert (out.double() - want).abs().max() <= 1e-5, f"CP={cp} W={window} rank {me}"
    if (cp, window) == (4, 5):
        assert skipped == 6, skipped  # only the diagonal and the chunk neighbours can see each other
