"""Ring attention (context parallelism, ``--cp-comm-type p2p``): causal attention over a sequence
split across the C ranks of a context-parallel group, K/V blocks passed around the ring.

Layout (megafast.parallel.context_parallel): the sequence is cut into 2C chunks of c tokens and
CP rank i holds chunks (i, 2C-1-i) as one local sequence of 2c tokens. At step t = 0 .. C-1 rank i
holds the K/V of rank j = (i - t) mod C while the next block is already on its way (isend/irecv
to the next rank / from the previous one, overlapped with the block's compute). The causal
structure of the balanced chunks gives three kinds of blocks (Megatron's):

    t = 0   (j = i):  the local 2c x 2c block, causal (local order is increasing position)
    j < i:            every query sees K/V chunk j fully and chunk 2C-1-j not at all
                      -> all 2c queries x the first c keys, no mask
    j > i:            query chunk i sees nothing, query chunk 2C-1-i sees both K/V chunks
                      -> the last c queries x all 2c keys, no mask

Each block yields its output O_b and log-sum-exp L_b = log sum_k exp(q.k * scale) per query;
blocks merge exactly as L = log(e^L_1 + e^L_2), O = O_1 e^(L_1 - L) + O_2 e^(L_2 - L).

Backward runs the same ring: with the final O and L, each block gives dQ (kept), dK and dV (for
the block's owner: they travel around the ring with the K/V accumulating contributions and
arrive home one hop after the last step). Per block, with P = exp(S - L), D = rowsum(dO * O):

    dV = P^T dO,  dS = P * (dO V^T - D),  dQ = dS K * scale,  dK = dS^T Q * scale

Packed samples (segment ids) add "same segment" to every block's mask; every query still sees
itself at t = 0, so merged rows stay finite.

A causal sliding window W (query position i sees keys i - W .. i, megafast.model.sliding_window)
is applied per block with the blocks' global positions, chunk pair by chunk pair (each of the
block's query chunks against each of its key chunks is entirely visible, entirely hidden, or cut
by the window): blocks with no visible pair are skipped (no compute; in backward the K/V gradient
accumulator still travels on), a block is narrowed to the chunks that see anything, and only a
block with a pair cut by the window needs the position mask (torch blocks); blocks the window
leaves whole keep the unmasked (or plain causal) kernel. Blocks are computed in plain torch (any device and
dtype; fp32 accumulation, in query tiles; on CPU without packing, torch's CPU flash-attention
kernel, which returns the LSE and takes the final O and LSE in backward) or by the Triton
flash-attention kernels (their forward returns the
base-2 LSE, their backward takes the final O and LSE), or by flash-attn 2.x (``flash_attn`` on CUDA
fp16/bf16: ``flash_attn_func(..., return_attn_probs=True)`` returns the natural-log LSE [b, H, s]
fp32, ``flash_attn_interface._flash_attn_backward`` takes the final O and LSE); the kernel blocks
need no mask: packed or window-cut blocks use torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megafast.parallel.context_parallel import local_token_index

LN2 = math.log(2.0)
BLOCK_BACKENDS = ("torch", "triton", "flash")


@dataclass(frozen=True)
class RingSpec:
    """The CP ring of this rank: ``ranks`` are the group's global ranks by CP rank."""

    group: Optional[dist.ProcessGroup]
    ranks: tuple[int, ...]
    cp_rank: int
    backend: str = "torch"  # per-block kernel: 'torch', 'triton' or 'flash' (flash-attn 2.x)

    @property
    def size(self) -> int:
        return len(self.ranks)


# -- one block: (out, lse) forward, (dq, dk, dv) backward ----------------------------------------


def _grouped(q: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, H, s, d] -> [b, G, H/G, s, d] (query head h uses kv head h // (H/G))."""
    b, h, s, d = q.shape
    return q.reshape(b, groups, h // groups, s, d)


TILE_ELEMENTS = 1 << 22  # score elements per query tile of a torch block (16 MiB in fp32)


@dataclass(frozen=True)
class BlockMask:
    """Which keys each query of a block may see: ``causal`` (same local positions: key <= query),
    and/or the sliding window over global positions ``q_pos`` [sq], ``k_pos`` [sk] (0 <= q - k <=
    ``window``), and/or ``q_seg`` [b, sq] == ``k_seg`` [b, sk] (packed samples); built per query
    tile, so that no [sq, sk] mask is ever materialised whole."""

    causal: bool = False
    q_seg: Optional[torch.Tensor] = None
    k_seg: Optional[torch.Tensor] = None
    window: Optional[int] = None
    q_pos: Optional[torch.Tensor] = None
    k_pos: Optional[torch.Tensor] = None

    def tile(self, rows: slice, sk: int, device) -> Optional[torch.Tensor]:
        """[rows, sk] or [b, rows, sk] bool (True = may attend), or None (everything)."""
        m = None
        if self.causal:
            m = torch.arange(sk, device=device)[None, :] <= torch.arange(rows.start, rows.stop, device=device)[:, None]
        if self.window is not None:
            distance = self.q_pos[rows, None] - self.k_pos[None, :]  # [rows, sk]
            near = (distance >= 0) & (distance <= self.window)
            m = near if m is None else near & m
        if self.q_seg is not None:
            same = self.q_seg[:, rows, None] == self.k_seg[:, None, :]
            m = same if m is None else same & m
        return m


def _tiles(q: torch.Tensor, sk: int) -> list[slice]:
    """Query-row tiles of q [b, H, sq, d] with at most TILE_ELEMENTS scores each."""
    b, heads, sq, _ = q.shape
    rows = max(1, TILE_ELEMENTS // max(1, b * heads * sk))
    return [slice(i, min(i + rows, sq)) for i in range(0, sq, rows)]


def _scores(q, k, scale, mask):
    """fp32 scores [b, G, r, sq, sk], -inf where ``mask`` ([sq, sk] or [b, sq, sk], True = keep) is False."""
    s = torch.matmul(_grouped(q, k.shape[1]).float(), k.float()[:, :, None].transpose(-1, -2)) * scale
    if mask is not None:
        m = mask if mask.dim() == 2 else mask[:, None, None]
        s = s.masked_fill(~m, float("-inf"))
    return s


def _torch_block_forward(q, k, v, scale, mask: BlockMask):
    """q [b, H, sq, d], k/v [b, G, sk, d] -> out [b, H, sq, d] fp32, lse [b, H, sq] fp32 (-inf: no key)."""
    b, h, sq, d = q.shape
    out = torch.empty(b, h, sq, d, dtype=torch.float32, device=q.device)
    lse_all = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    for rows in _tiles(q, k.shape[2]):
        s = _scores(q[:, :, rows], k, scale, mask.tile(rows, k.shape[2], q.device))  # [b, G, r, n, sk]
        lse = torch.logsumexp(s, dim=-1)  # [b, G, r, n]
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        n = rows.stop - rows.start
        out[:, :, rows] = torch.matmul(p, v.float()[:, :, None]).reshape(b, h, n, d)
        lse_all[:, :, rows] = lse.reshape(b, h, n)
    return out, lse_all


def _torch_block_backward(do, q, k, v, o, lse, scale, mask: BlockMask):
    """Gradients of one block given the final out ``o`` and ``lse`` of its queries: fp32 dq [b, H, sq, d],
    dk, dv [b, G, sk, d]."""
    groups = k.shape[1]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [b, G, 1, sk, d]
    for rows in _tiles(q, k.shape[2]):
        qt = q[:, :, rows]
        s = _scores(qt, k, scale, mask.tile(rows, k.shape[2], q.device))
        lg = _grouped(lse[:, :, rows, None], groups)  # [b, G, r, n, 1]
        p = torch.exp(s - torch.where(torch.isinf(lg), 0.0, lg))  # [b, G, r, n, sk]
        dog, og = _grouped(do[:, :, rows], groups).float(), _grouped(o[:, :, rows], groups).float()
        delta = (dog * og).sum(-1, keepdim=True)  # [b, G, r, n, 1]
        ds = p * (torch.matmul(dog, vf.transpose(-1, -2)) - delta)
        dq[:, :, rows] = (torch.matmul(ds, kf) * scale).reshape(qt.shape)
        dk += (torch.matmul(ds.transpose(-1, -2), _grouped(qt, groups).float()) * scale).sum(2)  # [b, G, sk, d]
        dv += torch.matmul(p.transpose(-1, -2), dog).sum(2)
    return dq, dk, dv


def _cpu_flash_forward(q, k, v, scale, causal):
    """torch's CPU flash-attention kernel (O(tile) memory, returns the natural-log LSE); GQA k/v
    repeated to every query head."""
    r = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(r, dim=1) if r > 1 else t for t in (k, v))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o.float(), lse.float()


def _cpu_flash_backward(do, q, k, v, o, lse, scale, causal):
    groups, r = k.shape[1], q.shape[1] // k.shape[1]
    ke, ve = (t.repeat_interleave(r, dim=1) if r > 1 else t for t in (k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(), o.to(q.dtype).contiguous(),
        lse.contiguous(), 0.0, causal, scale=scale)
    b, _, sk, d = k.shape
    return dq.float(), dk.float().view(b, groups, r, sk, d).sum(2), dv.float().view(b, groups, r, sk, d).sum(2)


def _triton_equal_forward(q, k, v, scale, causal):
    from megafast.kernels.flash_attention_kernel import flash_attention_forward

    o, lse2 = flash_attention_forward(q, k, v, causal, scale)
    return o.float(), lse2 * LN2


def _triton_equal_backward(do, q, k, v, o, lse, scale, causal):
    from megafast.kernels.flash_attention_kernel import flash_attention_backward

    dq, dk, dv = flash_attention_backward(do, q, k, v, o.to(q.dtype), (lse / LN2).contiguous(), causal, scale)
    return dq.float(), dk.float(), dv.float()


def _flash_forward(q, k, v, scale, causal):
    """flash-attn 2.x on one block: q [b, H, sq, d], k/v [b, G, sk, d] (GQA native) -> out [b, H, sq, d]
    fp32, natural-log lse [b, H, sq] fp32. Called without autograd (inside the ring's forward)."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                                  softmax_scale=scale, causal=causal, return_attn_probs=True)  # [b, sq, H, d]
    return out.transpose(1, 2).float(), lse[:, :, : q.shape[2]].float()


def _flash_backward_kwargs(fn) -> dict:
    """The arguments of flash-attn's ``_flash_attn_backward`` beyond the ones every 2.x release has,
    by its signature: a full window (``window_size`` up to 2.5, ``window_size_left/right`` from
    2.6), no softcap, no ALiBi, the deterministic flag off, no RNG state (no dropout)."""
    fn = getattr(fn, "_init_fn", fn)  # 2.6+ wraps it in torch.library.custom_op
    names = inspect.signature(fn).parameters
    extra = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
             "alibi_slopes": None, "deterministic": False, "rng_state": None}
    return {key: value for key, value in extra.items() if key in names}


def _flash_backward(do, q, k, v, o, lse, scale, causal):
    """Gradients of one block by flash-attn 2.x given the final ``o`` and ``lse`` (natural log) of its
    queries: fp32 dq [b, H, sq, d], dk, dv [b, G, sk, d]."""
    from flash_attn.flash_attn_interface import _flash_attn_backward

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, s, heads, d]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (qt, kt, vt))
    _flash_attn_backward(
        dout=do.to(q.dtype).transpose(1, 2), q=qt, k=kt, v=vt, out=o.to(q.dtype).transpose(1, 2),
        softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
        causal=causal, **_flash_backward_kwargs(_flash_attn_backward))
    return dq.transpose(1, 2).float(), dk.transpose(1, 2).float(), dv.transpose(1, 2).float()


def _merge_(out, lse, blk_out, blk_lse, rows: slice) -> None:
    """Merge a block's (out, lse) for query rows ``rows`` into the running (out, lse), in place."""
    o, l = out[:, :, rows], lse[:, :, rows]
    new = torch.logaddexp(l, blk_lse)
    out[:, :, rows] = o * torch.exp(l - new)[..., None] + blk_out * torch.exp(blk_lse - new)[..., None]
    lse[:, :, rows] = new


def _pair_visibility(a: int, b: int, c: int, window: int) -> str:
    """How query chunk ``a`` sees key chunk ``b`` (chunks of ``c`` tokens) under the causal window:
    'all', 'none', 'causal' (a == b, the window wider than a chunk: just the triangle) or 'cut'."""
    lo, hi = (a - b) * c - (c - 1), (a - b) * c + (c - 1)  # the range of query - key positions
    if hi < 0 or lo > window:
        return "none"
    if lo >= 0 and hi <= window:
        return "all"
    return "causal" if a == b and hi <= window else "cut"


class _Block:
    """The attention of local queries against the K/V of CP rank ``src`` at one ring step
    (``window``: the left width of a causal sliding window, or None)."""

    def __init__(self, spec: RingSpec, src: int, c: int, segments: Optional[torch.Tensor],
                 window: Optional[int] = None, device=None):
        me = spec.cp_rank
        self.diagonal = src == me
        self.q_rows = slice(0, 2 * c) if src <= me else slice(c, 2 * c)  # queries that see anything
        self.kv_cols = slice(0, 2 * c) if src == me or src > me else slice(0, c)  # keys seen
        self.skip = False
        windowed = window is not None and self._apply_window(spec, src, c, window)
        self.mask = BlockMask(causal=self.diagonal and not windowed)
        if windowed:
            total = 2 * c * spec.size
            q_pos = local_token_index(total, spec.size, me, device)[self.q_rows]
            k_pos = local_token_index(total, spec.size, src, device)[self.kv_cols]
            self.mask = BlockMask(window=window, q_pos=q_pos, k_pos=k_pos)
        if segments is not None:  # packed: same segment (and causal on the diagonal, or the window)
            sq = segments.index_select(1, local_token_index(segments.shape[1], spec.size, me, segments.device))
            sk = segments.index_select(1, local_token_index(segments.shape[1], spec.size, src, segments.device))
            self.mask = dataclasses.replace(self.mask, q_seg=sq[:, self.q_rows], k_seg=sk[:, self.kv_cols])
        self.use_triton = spec.backend == "triton" and segments is None and not windowed
        self.use_flash = spec.backend == "flash" and segments is None and not windowed

    def _apply_window(self, spec: RingSpec, src: int, c: int, window: int) -> bool:
        """Narrow ``q_rows``/``kv_cols`` to the chunks that see anything in the window (``skip``
        when none does); True when a position mask is needed beyond the unwindowed block's."""
        me, size = spec.cp_rank, spec.size
        q_chunks, k_chunks = (me, 2 * size - 1 - me), (src, 2 * size - 1 - src)
        q_slots = [i for i in (0, 1) if self.q_rows.start <= i * c < self.q_rows.stop]
        k_slots = [j for j in (0, 1) if self.kv_cols.start <= j * c < self.kv_cols.stop]
        seen = {(i, j): _pair_visibility(q_chunks[i], k_chunks[j], c, window) for i in q_slots for j in k_slots}
        rows = [i for i in q_slots if any(seen[i, j] != "none" for j in k_slots)]
        cols = [j for j in k_slots if any(seen[i, j] != "none" for i in q_slots)]
        if not rows:
            self.skip = True
            return False
        self.q_rows, self.kv_cols = slice(rows[0] * c, (rows[-1] + 1) * c), slice(cols[0] * c, (cols[-1] + 1) * c)
        # what the unwindowed kernel computes for each kept chunk pair: everything, or (diagonal) causal
        plain = {(0, 0): "causal", (1, 1): "causal", (1, 0): "all", (0, 1): "none"} if self.diagonal else {}
        return any(seen[i, j] != plain.get((i, j), "all") for i in rows for j in cols)

    def cpu_flash(self, q: torch.Tensor) -> bool:
        """torch backend, CPU, no packed or window mask: torch's CPU flash-attention kernel (causal or none)."""
        return q.device.type == "cpu" and self.mask.q_seg is None and self.mask.window is None and hasattr(
            torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    def forward(self, q, k, v, scale):
        q, k, v = q[:, :, self.q_rows], k[:, :, self.kv_cols], v[:, :, self.kv_cols]
        if self.use_flash:  # any block shape: the diagonal is square and causal, the others unmasked
            return _flash_forward(q, k, v, scale, self.diagonal)
        if not self.use_triton and self.cpu_flash(q):
            return _cpu_flash_forward(q, k, v, scale, self.diagonal)
        if not self.use_triton:
            return _torch_block_forward(q, k, v, scale, self.mask)
        sq, sk = q.shape[2], k.shape[2]
        if sq == sk:
            return _triton_equal_forward(q, k, v, scale, self.diagonal)
        if sq > sk:  # two query halves against the same keys
            parts = [_triton_equal_forward(qh, k, v, scale, False) for qh in q.chunk(2, dim=2)]
            return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
        (o1, l1), (o2, l2) = (_triton_equal_forward(q, kh, vh, scale, False)
                              for kh, vh in zip(k.chunk(2, dim=2), v.chunk(2, dim=2)))
        lse = torch.logaddexp(l1, l2)
        return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse

    def backward(self, do, q, k, v, o, lse, scale):
        """-> dq for ``q_rows``, dk and dv for ``kv_cols`` (fp32)."""
        r, cols = self.q_rows, self.kv_cols
        do, q, o, lse = do[:, :, r], q[:, :, r], o[:, :, r], lse[:, :, r]
        k, v = k[:, :, cols], v[:, :, cols]
        if self.use_flash:
            return _flash_backward(do, q, k, v, o, lse, scale, self.diagonal)
        if not self.use_triton and self.cpu_flash(q):
            return _cpu_flash_backward(do, q, k, v, o, lse, scale, self.diagonal)
        if not self.use_triton:
            return _torch_block_backward(do, q, k, v, o, lse, scale, self.mask)
        sq, sk = q.shape[2], k.shape[2]
        if sq == sk:
            return _triton_equal_backward(do, q, k, v, o, lse, scale, self.diagonal)
        if sq > sk:
            parts = [_triton_equal_backward(*t, k, v, *u, scale, False)
                     for t, u in zip(zip(do.chunk(2, 2), q.chunk(2, 2)), zip(o.chunk(2, 2), lse.chunk(2, 2)))]
            return torch.cat([p[0] for p in parts], 2), parts[0][1] + parts[1][1], parts[0][2] + parts[1][2]
        parts = [_triton_equal_backward(do, q, kh, vh, o, lse, scale, False)
                 for kh, vh in zip(k.chunk(2, dim=2), v.chunk(2, dim=2))]
        return parts[0][0] + parts[1][0], torch.cat([p[1] for p in parts], 2), torch.cat([p[2] for p in parts], 2)


# -- the ring ------------------------------------------------------------------------------------


def _start_ring_shift(spec: RingSpec, send: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Send ``send`` to the next CP rank and receive the previous rank's into a new tensor (async)."""
    recv = torch.empty_like(send)
    nxt, prv = spec.ranks[(spec.cp_rank + 1) % spec.size], spec.ranks[(spec.cp_rank - 1) % spec.size]
    ops = [dist.P2POp(dist.isend, send, nxt, spec.group), dist.P2POp(dist.irecv, recv, prv, spec.group)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class RingAttentionFunction(torch.autograd.Function):
    """q [b, H, 2c, d], k/v [b, G, 2c, d] (this rank's two chunks) -> out [b, H, 2c, d], causal over
    the whole sequence. ``segments``: packed segment ids of the WHOLE sequence [b, 2cC] (natural
    order), or None."""

    @staticmethod
    def forward(ctx, q, k, v, segments, spec: RingSpec, scale: float, window: Optional[int] = None):
        b, heads, s_local, d = q.shape
        c = s_local // 2
        kv = torch.stack([k, v]).contiguous()  # [2, b, G, 2c, d]
        out = torch.zeros(b, heads, s_local, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, heads, s_local), float("-inf"), dtype=torch.float32, device=q.device)
        for t in range(spec.size):
            nxt = _start_ring_shift(spec, kv) if t < spec.size - 1 else None  # overlapped with compute
            block = _Block(spec, (spec.cp_rank - t) % spec.size, c, segments, window, q.device)
            if block.skip:  # entirely outside the window
                pass
            elif t == 0:
                out, lse = block.forward(q, kv[0], kv[1], scale)  # the diagonal covers every query
                out, lse = out.clone(), lse.clone()
            else:
                blk_out, blk_lse = block.forward(q, kv[0], kv[1], scale)
                _merge_(out, lse, blk_out, blk_lse, block.q_rows)
            if nxt is not None:
                kv, works = nxt
                _wait(works)
        # laid out as [2c, b, H, d] in memory, so that the caller's [s, b, H * d] view is free
        out = torch.empty(s_local, b, heads, d, dtype=q.dtype, device=q.device).permute(1, 2, 0, 3).copy_(out)
        ctx.save_for_backward(q, k, v, out, lse, segments)
        ctx.spec, ctx.scale, ctx.window = spec, scale, window
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, segments = ctx.saved_tensors
        spec, scale = ctx.spec, ctx.scale
        c = q.shape[2] // 2
        do = do.contiguous()
        kv = torch.stack([k, v]).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = None  # the accumulator of the K/V block currently held (arrives from the previous rank)
        pending = None  # (tensor, works) of the accumulator in flight
        for t in range(spec.size):
            nxt = _start_ring_shift(spec, kv) if t < spec.size - 1 else None
            block = _Block(spec, (spec.cp_rank - t) % spec.size, c, segments, ctx.window, q.device)
            if not block.skip:
                bdq, bdk, bdv = block.backward(do, q, kv[0], kv[1], out, lse, scale)
                dq[:, :, block.q_rows] += bdq
            if pending is None:
                dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
            else:
                dkv, works = pending
                _wait(works)
            if not block.skip:
                dkv[0][:, :, block.kv_cols] += bdk
                dkv[1][:, :, block.kv_cols] += bdv
            pending = _start_ring_shift(spec, dkv)  # on to the next rank (home after the last step)
            if nxt is not None:
                kv, works = nxt
                _wait(works)
        dkv, works = pending
        _wait(works)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: RingSpec,
    segments: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence (see the module docstring).

    q [b, H, 2c, d], k/v [b, G, 2c, d] (GQA: query head h uses kv head h // (H/G)) -> [b, H, 2c, d].
    ``segments`` [b, 2cC]: segment ids of the whole packed sequence in natural order, or None.
    ``window``: the left width W of a causal sliding window (position i sees i - W .. i), or None.
    """
    if spec.backend not in BLOCK_BACKENDS:
        raise ValueError(f"ring attention block backend {spec.backend!r}: choose one of {', '.join(BLOCK_BACKENDS)}")
    if q.shape[2] % 2:
        raise ValueError(f"a context-parallel rank holds two equal chunks, got {q.shape[2]} tokens")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if window is not None and window < 0:
        raise ValueError(f"a sliding window's left width must be >= 0, got {window}")
    return RingAttentionFunction.apply(q, k, v, segments, spec, scale, window)


__all__ = ["BLOCK_BACKENDS", "RingAttentionFunction", "RingSpec", "ring_attention"]
