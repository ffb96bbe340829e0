"""Rotary position embedding, half-split layout (``rotate_half``, as HF Llama: no q/k permutation).

For head dim d and position t: inv_freq_j = base^(-2j/d), j < d/2; angle = t * inv_freq;
cos/sin are [cos(angle), cos(angle)] concatenated to d; x' = x * cos + rotate_half(x) * sin with
rotate_half([x1, x2]) = [-x2, x1].
"""

from __future__ import annotations

import torch
from torch import nn

from megafast.kernels import apply_rotary as kernel_apply_rotary


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [s, 1, 1, d] fp32, for positions 0..s-1 (cached per length and device)."""
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            inv_freq = 1.0 / (
                self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim)
            )
            t = torch.arange(seq_len, dtype=torch.float32)
            angles = torch.outer(t, inv_freq)  # [s, d/2]
            emb = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [s, 1, 1, d]
            self._cache = (seq_len, device, emb.cos().to(device), emb.sin().to(device))
        _, _, cos, sin = self._cache
        return cos[:seq_len], sin[:seq_len]

    def for_positions(self, position_ids: torch.Tensor, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [s, b, 1, d] fp32, for explicit positions [b, s] (< ``num_positions``).

        Rows of the same table as :meth:`forward`, so positions 0..s-1 give identical values; packed
        samples (positions restarting at 0 in each) get their own positions.
        """
        cos, sin = self.forward(max(num_positions, position_ids.shape[1]), position_ids.device)
        index = position_ids.t()  # [s, b]
        return cos[:, 0, 0][index][:, :, None], sin[:, 0, 0][index][:, :, None]  # [s, b, 1, d]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "torch"
) -> torch.Tensor:
    """x [s, b, heads, d]; cos/sin broadcastable [s, 1, 1, d] (or [s, b, 1, d]).

    ``backend``: 'torch' (``x * cos + rotate_half(x) * sin`` in x's dtype), or 'auto' / 'triton' /
    'cuda' for the fused kernels (:func:`megafast.kernels.apply_rotary` picks by ``backend``).
    """
    return kernel_apply_rotary(x, cos, sin, backend=backend)
