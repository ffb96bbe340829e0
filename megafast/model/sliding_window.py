"""Sliding-window causal attention (Mistral v0.1, Qwen2 ``use_sliding_window``, Megatron's
``--window-size``).

With the window ``(left, 0)`` (flash-attn's and Megatron's convention), query position i attends
key position j when

    i - left <= j <= i

so every token sees itself and the ``left`` tokens before it. HF's ``sliding_window`` W is
``(W - 1, 0)`` (``kv_idx > q_idx - W``). Packed rows (megafast.model.packing) additionally keep
each query inside its own sample; positions there are token offsets in the row, which within one
sample differ exactly as the sample's own positions do.

flash-attn takes the window natively (``window_size=(left, 0)``), and so does megafast's Triton
flash attention (``--attention-backend triton``, unpacked rows, no dropout: it skips the key blocks
outside the window); every other case runs SDPA with the boolean mask built here ([s_q, s_k] or
[b, 1, s_q, s_k], True = may attend). Under context parallelism the window applies to global
positions (megafast.parallel.ring_attention; the a2a path calls this on whole sequences).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megafast.kernels.dispatch import resolve_attention
from megafast.kernels.flash_attention_kernel import flash_attention_triton

try:
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - not installable on the CPU machines
    flash_attn_func = None


def window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: tuple[int, int]
) -> torch.Tensor:
    """[s_q, s_k] bool: True where key j is visible from query i (i - left <= j <= i)."""
    left, _ = window
    distance = query_positions[:, None] - key_positions[None, :]  # i - j
    return (distance >= 0) & (distance <= left)


def _expand_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [b, G, s, d] repeated to q's H heads (each group serves H/G consecutive heads)."""
    heads, groups = q.shape[1], k.shape[1]
    if heads == groups:
        return k, v
    return k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)


def _use_flash(q: torch.Tensor, backend: str) -> bool:
    return (
        flash_attn_func is not None
        and backend in ("auto", "flash")
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: tuple[int, int],
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [b, H, s, d], k/v [b, G, s, d] -> [b, H, s, d], causal within the window (and within each
    packed sample when ``segment_ids`` [b, s] is given). Dropout uses the caller's RNG state."""
    s = q.shape[2]
    if segment_ids is None and backend == "triton" and resolve_attention(backend, q, dropout_p) == "triton":
        return flash_attention_triton(q, k, v, causal=True, window=window[0])
    if segment_ids is None and _use_flash(q, backend):
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=dropout_p, causal=True, window_size=window,
        )  # [b, s, H, d]
        return out.transpose(1, 2)
    positions = torch.arange(s, device=q.device)
    mask = window_mask(positions, positions, window)  # [s, s]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
        mask = (mask[None] & same)[:, None]  # [b, 1, s, s]
    k, v = _expand_groups(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


__all__ = ["sliding_window_attention", "window_mask"]
