"""Rotary position embedding, half-split layout (``rotate_half``, as HF Llama: no q/k permutation).

For head dim d and position t: inv_freq_j = base^(-2j/d), j < d/2; angle = t * inv_freq;
cos/sin are [cos(angle), cos(angle)] concatenated to d; x' = x * cos + rotate_half(x) * sin with
rotate_half([x1, x2]) = [-x2, x1].

RoPE scaling (``GPTConfig.use_rope_scaling``, HF's ``rope_scaling``) only changes inv_freq and,
for YaRN, multiplies cos/sin by an attention factor m (so q.k gets m^2), exactly as HF's
``modeling_rope_utils``; the kernels take cos/sin and need no change. With wavelength
lambda_j = 2 pi / inv_freq_j, factor f and pretraining context L (``original_max_position_embeddings``):

- ``linear``: inv_freq_j / f (positions interpolated by f).
- ``llama3``: lambda_j > L / low_freq_factor: inv_freq_j / f; lambda_j < L / high_freq_factor:
  unchanged; between: (1 - a) inv_freq_j / f + a inv_freq_j with
  a = (L / lambda_j - low_freq_factor) / (high_freq_factor - low_freq_factor).
- ``yarn``: dims r(x) = d ln(L / (2 pi x)) / (2 ln base) for x = beta_fast, beta_slow give the
  range [lo, hi] (floored / ceiled unless not rounding, clipped to [0, d - 1]); the ramp
  g_j = clamp((j - lo) / (hi - lo), 0, 1) blends inv_freq_j (g = 0, extrapolation) with
  inv_freq_j / f (g = 1, interpolation); m = attention_factor, else 0.1 ln(f) + 1 (1 when f <= 1),
  or mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megafast.kernels import apply_rotary as kernel_apply_rotary
from megafast.config import GPTConfig


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """[d/2] fp32: base^(-2j/d)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    factor = config.rope_scaling_factor
    low, high = config.rope_scaling_low_freq_factor, config.rope_scaling_high_freq_factor
    old_context = config.rope_scaling_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(config: GPTConfig) -> float:
    """YaRN's m, by which cos and sin are multiplied."""
    if config.yarn_attention_factor is not None:
        return float(config.yarn_attention_factor)
    factor = config.rope_scaling_factor
    if config.yarn_mscale and config.yarn_mscale_all_dim:
        return _yarn_mscale(factor, config.yarn_mscale) / _yarn_mscale(factor, config.yarn_mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn(config: GPTConfig) -> torch.Tensor:
    d, base, factor = config.head_dim, config.rotary_base, config.rope_scaling_factor
    context = config.rope_scaling_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (d * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(config.yarn_beta_fast), correction_dim(config.yarn_beta_slow)
    if config.yarn_correction_range_round_to_int:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the unscaled frequency
    return interpolation * (1 - keep) + extrapolation * keep


def rope_frequencies(config: GPTConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2] fp32, attention factor on cos/sin) of ``config``'s RoPE and its scaling."""
    if not config.use_rope_scaling:
        return default_inv_freq(config.head_dim, config.rotary_base), 1.0
    kind = config.rope_scaling_type
    if kind == "linear":
        return default_inv_freq(config.head_dim, config.rotary_base) / config.rope_scaling_factor, 1.0
    if kind == "llama3":
        return _llama3(default_inv_freq(config.head_dim, config.rotary_base), config), 1.0
    if kind == "yarn":
        return _yarn(config), yarn_attention_factor(config)
    raise AssertionError(f"unknown RoPE scaling {kind}")  # GPTConfig validates it


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, base: float, inv_freq: torch.Tensor | None = None, scale: float = 1.0
    ) -> None:
        """``inv_freq`` [d/2] (default base^(-2j/d)); ``scale`` multiplies cos and sin (YaRN)."""
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.inv_freq = default_inv_freq(head_dim, base) if inv_freq is None else inv_freq
        self.scale = scale
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, config: GPTConfig) -> RotaryEmbedding:
        inv_freq, scale = rope_frequencies(config)
        return cls(config.head_dim, config.rotary_base, inv_freq, scale)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [s, 1, 1, d] fp32, for positions 0..s-1 (cached per length and device)."""
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, dtype=torch.float32)
            angles = torch.outer(t, self.inv_freq)  # [s, d/2]
            emb = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [s, 1, 1, d]
            cos, sin = emb.cos(), emb.sin()
            if self.scale != 1.0:
                cos, sin = cos * self.scale, sin * self.scale
            self._cache = (seq_len, device, cos.to(device), sin.to(device))
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
