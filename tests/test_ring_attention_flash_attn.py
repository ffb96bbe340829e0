"""Ring attention with flash-attn 2.x as the per-block kernel, on CPU: a fake ``flash_attn`` package
(installed in sys.modules of each gloo rank) implements flash-attn 2.x's documented API in plain
torch here -- ``flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, ..., return_attn_probs)``
on [b, s, heads, d] (GQA native) returning (out, softmax_lse [b, H, s] fp32 natural log, S_dmask),
and ``flash_attn_interface._flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, ...)``
writing the gradients into dq/dk/dv -- in both backward signatures (2.6+: window_size_left/right,
softcap; up to 2.5: window_size). CP=2 ring attention with it equals plain attention of the whole
sequence, forward and backward, fp32 1e-5, causal, GQA. This proves the plumbing (layout, LSE
convention, causal per block, the final O/LSE in backward); the real CUDA package is not run here."""

from __future__ import annotations

import sys
import types

import torch

from dist import run_distributed
from seeding import draw_seed
from test_ring_attention import held_positions, make_inputs, reference_attention

SEQ = 64


def _scores(q, k, scale, causal):
    """q [b, sq, H, d], k [b, sk, G, d] -> fp64 scores [b, H, sq, sk]; flash-attn's causal mask is
    aligned to the bottom right (query i sees key j <= i + sk - sq)."""
    r = q.shape[2] // k.shape[2]
    qd, kd = q.double().transpose(1, 2), k.double().repeat_interleave(r, dim=2).transpose(1, 2)
    s = qd @ kd.transpose(-1, -2) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _fake_flash_attn(calls: dict, old_signature: bool) -> dict[str, types.ModuleType]:
    """The modules ``flash_attn`` and ``flash_attn.flash_attn_interface`` of a fake flash-attn 2.x."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.shape[0] == k.shape[0]
        assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and alibi_slopes is None
        calls["forward"] += 1
        calls["causal"] += bool(causal)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        s = _scores(q, k, scale, causal)
        lse = torch.logsumexp(s, dim=-1)  # [b, H, sq]
        r = q.shape[2] // k.shape[2]
        vd = v.double().repeat_interleave(r, dim=2).transpose(1, 2)  # [b, H, sk, d]
        out = (torch.exp(s - lse[..., None]) @ vd).transpose(1, 2).to(q.dtype)  # [b, sq, H, d]
        return (out, lse.float(), None) if return_attn_probs else out

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal):
        assert softmax_lse.dtype == torch.float32 and softmax_lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dropout_p == 0.0
        calls["backward"] += 1
        b, sk, g, d = k.shape
        r = q.shape[2] // g
        p = torch.exp(_scores(q, k, softmax_scale, causal) - softmax_lse.double()[..., None])  # [b, H, sq, sk]
        do, o = dout.double().transpose(1, 2), out.double().transpose(1, 2)  # [b, H, sq, d]
        kd, vd = (t.double().repeat_interleave(r, dim=2).transpose(1, 2) for t in (k, v))
        delta = (do * o).sum(-1, keepdim=True)
        ds = p * (do @ vd.transpose(-1, -2) - delta)
        dq.copy_((ds @ kd * softmax_scale).transpose(1, 2))
        dk_h = (ds.transpose(-1, -2) @ q.double().transpose(1, 2) * softmax_scale)  # [b, H, sk, d]
        dv_h = p.transpose(-1, -2) @ do
        dk.copy_(dk_h.view(b, g, r, sk, d).sum(2).transpose(1, 2))
        dv.copy_(dv_h.view(b, g, r, sk, d).sum(2).transpose(1, 2))
        return delta.squeeze(-1).float()

    if old_signature:  # flash-attn <= 2.5
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, alibi_slopes, deterministic, rng_state=None):
            assert tuple(window_size) == (-1, -1) and alibi_slopes is None
            return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal)
    else:  # flash-attn 2.6+
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0) and alibi_slopes is None
            return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal)

    package = types.ModuleType("flash_attn")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    package.flash_attn_func = interface.flash_attn_func = flash_attn_func
    interface._flash_attn_backward = _flash_attn_backward
    package.flash_attn_interface = interface
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}


CASES = [("2.6+ backward signature", False, False), ("<=2.5 backward signature", True, False),
         ("packed (torch blocks)", False, True)]  # (name, old signature, packed)


def _worker(rank, world, seed):
    from megafast.config import ParallelConfig
    from megafast.parallel.ring_attention import RingSpec, ring_attention
    from megafast.parallel.state import ParallelState

    state = ParallelState.create(ParallelConfig(context_parallel_size=world))
    held = held_positions(SEQ, world, rank)
    results = []
    for _, old_signature, packed in CASES:
        calls = {"forward": 0, "backward": 0, "causal": 0}
        saved = {name: sys.modules.get(name) for name in ("flash_attn", "flash_attn.flash_attn_interface")}
        sys.modules.update(_fake_flash_attn(calls, old_signature))
        try:
            (q, k, v, dout), segments = make_inputs(seed, SEQ, torch.float32)
            ql, kl, vl = (t.index_select(2, held).clone().requires_grad_(True) for t in (q, k, v))
            spec = RingSpec(state.cp_group, tuple(state.cp_ranks), rank, "flash")
            out = ring_attention(ql, kl, vl, spec, segments if packed else None)
            out.backward(dout.index_select(2, held))
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        results.append(((out.detach(), ql.grad, kl.grad, vl.grad), calls))
    return results


def test_ring_attention_with_flash_attn_blocks_cp2():
    seed = draw_seed("seed")
    per_rank = run_distributed(_worker, 2, seed)
    for i, (name, _, packed) in enumerate(CASES):
        (q, k, v, dout), segments = make_inputs(seed, SEQ, torch.float32)
        q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
        ref = reference_attention(q, k, v, segments if packed else None)
        ref.backward(dout.double())
        want = (ref.detach(), q.grad, k.grad, v.grad)
        for rank in range(2):
            got, calls = per_rank[rank][i]
            # two ring steps: the diagonal block (causal) and one unmasked block, each once per pass
            expected = {"forward": 0, "backward": 0, "causal": 0} if packed else {"forward": 2, "backward": 2,
                                                                                  "causal": 1}
            assert calls == expected, f"{name} rank {rank}: flash-attn calls {calls}, expected {expected}"
            held = held_positions(SEQ, 2, rank)
            for part, g_, full in zip(("out", "dq", "dk", "dv"), got, want):
                expect = full.index_select(2, held)
                err = (g_.double() - expect).abs().max().item() / max(expect.abs().max().item(), 1.0)
                assert err <= 1e-5, f"{name} CP=2 rank {rank} {part}: error {err:.2e} > 1e-05 (seed {seed})"


def test_flash_backward_arguments_follow_the_signature():
    """The version-dependent arguments of ``_flash_attn_backward`` are chosen by its signature, also
    through torch.library.custom_op's wrapper (``_init_fn``, flash-attn 2.6+)."""
    from megafast.parallel.ring_attention import _flash_backward_kwargs

    calls = {"forward": 0, "backward": 0, "causal": 0}
    new = _fake_flash_attn(calls, False)["flash_attn.flash_attn_interface"]._flash_attn_backward
    old = _fake_flash_attn(calls, True)["flash_attn.flash_attn_interface"]._flash_attn_backward
    assert _flash_backward_kwargs(new) == {"window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
                                           "alibi_slopes": None, "deterministic": False, "rng_state": None}
    assert _flash_backward_kwargs(old) == {"window_size": (-1, -1), "alibi_slopes": None, "deterministic": False,
                                           "rng_state": None}
    wrapped = types.SimpleNamespace(_init_fn=new)
    assert _flash_backward_kwargs(wrapped) == _flash_backward_kwargs(new)
