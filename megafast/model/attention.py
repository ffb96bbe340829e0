"""Causal self-attention with grouped-query attention over tensor-parallel heads.

Fused QKV layout (DESIGN.md): for each of the G query groups, its H/G query heads, then its k
head, then its v head, each ``d`` rows. TP splits the rows contiguously, so each rank holds whole
groups: G/p groups, H/p query heads.

With context parallelism (``state.cp_size`` C > 1) a rank holds s/C tokens of each sequence
(megafast.parallel.context_parallel) and the core attention spans the CP group: ring attention
(megafast.parallel.ring_attention) or all-to-all over heads (megafast.parallel.ulysses).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast import kernels
from megafast.config import GPTConfig
from megafast.model import init
from megafast.model.kv_cache import InferenceParams
from megafast.model.norm import build_head_norm
from megafast.model.packing import PackedSeqParams
from megafast.model.rotary import apply_rotary
from megafast.model.sliding_window import sliding_window_attention
from megafast.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megafast.parallel.random import RNGStatesTracker, checkpointed
from megafast.parallel.ring_attention import RingSpec, ring_attention
from megafast.parallel.state import ParallelState
from megafast.parallel.ulysses import gather_sequence, ulysses_attention

try:  # flash-attn's variable-length form, for packed samples (the dense form: megafast.kernels)
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - not installable on the CPU machines
    flash_attn_varlen_func = None


class SelfAttention(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        layer_number: int,
        tracker: RNGStatesTracker,
        seed: int,
        **factory,
    ) -> None:
        super().__init__()
        self.config = config
        self.tracker = tracker
        tp = state.tp_size
        self.heads = config.num_attention_heads // tp  # query heads on this rank
        self.groups = config.num_query_groups // tp  # query groups on this rank
        self.head_dim = config.head_dim
        self.layer_number = layer_number  # keys this layer's KV cache in InferenceParams
        self.state = state  # context parallelism: this rank's CP group, ring and communication type
        prefix = f"decoder.layers.{layer_number}.self_attention"
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size,
            config.qkv_size,
            tp_group=state.tp_group,
            bias=config.qkv_bias,
            sequence_parallel=state.sequence_parallel,
            init_method=init.for_param(config, seed, f"{prefix}.linear_qkv.weight"),
            **factory,
        )
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            tp_group=state.tp_group,
            bias=config.add_bias_linear,
            sequence_parallel=state.sequence_parallel,
            init_method=init.for_param(config, seed, f"{prefix}.linear_proj.weight"),
            **factory,
        )
        if config.qk_layernorm:  # Megatron's q_layernorm / k_layernorm (Qwen3's q_norm / k_norm)
            self.q_layernorm = build_head_norm(config, tp, **factory)
            self.k_layernorm = build_head_norm(config, tp, **factory)

    def core_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """q [b, H/p, s, d], k/v [b, G/p, s, d] -> [b, H/p, s, d], causal (within each packed sample).
        With context parallelism s is this rank's share of the sequence (s_total / C)."""
        if self.state.cp_size > 1:
            return self.context_parallel_attention(q, k, v, packed_seq_params)
        if self.config.window_size is not None:  # sliding window (megafast.model.sliding_window)
            return self.windowed_attention(q, k, v, packed_seq_params)
        if packed_seq_params is not None:
            return self.packed_attention(q, k, v, packed_seq_params)
        dropout = self.config.attention_dropout if self.training else 0.0
        # Heads are split across TP ranks: their dropout masks come from the per-rank stream.
        with self.tracker.fork():  # flash-attn / SDPA / Triton flash attention (--attention-backend)
            backend = self.config.attention_backend
            return kernels.attention(q, k, v, causal=True, dropout_p=dropout, backend=backend)

    def context_parallel_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Optional[PackedSeqParams]
    ) -> torch.Tensor:
        """Causal attention of this CP rank's tokens over the whole sequence: q [b, H/p, s/C, d],
        k/v [b, G/p, s/C, d] -> [b, H/p, s/C, d]. 'p2p': ring attention (per-block kernel: the
        Triton flash attention where --attention-backend resolves to triton, flash-attn where it
        resolves to flash, else torch; packed or window-cut blocks use torch);
        'a2a': all-to-all over heads around the ordinary attention of the whole sequence. A sliding
        window applies to the global positions either way."""
        st = self.state
        segments = gather_sequence(packed.segment_ids, st.cp_group, st.cp_size) if packed is not None else None
        if st.cp_comm_type == "a2a":
            full = PackedSeqParams(segments) if segments is not None else None
            return ulysses_attention(q, k, v, st.cp_group, st.cp_size,
                                     lambda q_, k_, v_: self._attend(q_, k_, v_, full))
        chosen = kernels.resolve_attention(self.config.attention_backend, q)
        block_backend = chosen if chosen in ("triton", "flash") else "torch"  # flash: flash-attn 2.x per block
        spec = RingSpec(st.cp_group, tuple(st.cp_ranks), st.cp_rank, block_backend)
        window = self.config.window_size[0] if self.config.window_size is not None else None
        return ring_attention(q, k, v, spec, segments, window=window)

    def _attend(self, q, k, v, packed: Optional[PackedSeqParams]) -> torch.Tensor:
        """Causal attention of whole sequences (the a2a path's inner attention)."""
        if self.config.window_size is not None:
            return self.windowed_attention(q, k, v, packed)
        if packed is not None:
            return self.packed_attention(q, k, v, packed)
        return kernels.attention(q, k, v, causal=True, dropout_p=0.0, backend=self.config.attention_backend)

    def windowed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Optional[PackedSeqParams]
    ) -> torch.Tensor:
        """Causal attention within ``config.window_size`` (and each packed sample): q [b, H/p, s, d],
        k/v [b, G/p, s, d] -> [b, H/p, s, d]."""
        dropout = self.config.attention_dropout if self.training else 0.0
        segments = packed.segment_ids if packed is not None else None
        with self.tracker.fork():
            return sliding_window_attention(
                q, k, v, self.config.window_size, dropout_p=dropout,
                backend=self.config.attention_backend, segment_ids=segments,
            )

    def packed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSeqParams
    ) -> torch.Tensor:
        """Attention confined to each packed sample (megafast.model.packing): q [b, H/p, s, d],
        k/v [b, G/p, s, d] -> [b, H/p, s, d]. flash-attn's varlen kernel over ``cu_seqlens`` on CUDA
        (fp16/bf16) when installed, else SDPA with the block-diagonal causal mask."""
        dropout = self.config.attention_dropout if self.training else 0.0
        b, _, s, d = q.shape
        with self.tracker.fork():
            if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
                cu, longest = packed.cu_seqlens, packed.max_seqlen
                q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))  # [b*s, heads, d]
                out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout, causal=True)
                return out.view(b, s, q.shape[1], d).transpose(1, 2)  # [b, H/p, s, d]
            heads, groups = q.shape[1], k.shape[1]  # (H/C, G/C under all-to-all context parallelism)
            if groups != heads:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
            mask = packed.attention_mask()  # [b, 1, s, s]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> torch.Tensor:
        """x [s, b, h] (or [s/p, b, h] with sequence parallelism) -> same shape. ``rope``: (cos, sin)
        [s, 1, 1, d] or per position [s, b, 1, d]; ``packed_seq_params``: samples packed in a row;
        ``inference_params``: KV cache for incremental decoding (megafast.model.kv_cache)."""
        qkv = self.linear_qkv(x)  # [s, b, (H/p + 2G/p) d]
        s, b, _ = qkv.shape
        per_group = self.heads // self.groups
        qkv = qkv.view(s, b, self.groups, per_group + 2, self.head_dim)
        # one split (its backward is one cat) rather than three slices (three zero-filled grads summed)
        q, k, v = torch.split(qkv, [per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.heads, self.head_dim)  # [s, b, H/p, d]
        k, v = k.squeeze(3), v.squeeze(3)  # [s, b, G/p, d]
        if self.config.qk_layernorm:  # per head, before RoPE
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rope is not None:
            q, k = (apply_rotary(t, *rope, backend=self.config.kernel_config.rope_backend) for t in (q, k))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if inference_params is not None:  # incremental decoding: attend over the cached positions too
            out = inference_params.attend(self.layer_number, q, k, v, window=self.config.window_size)
        elif self.config.recompute_granularity == "selective" and self.training:
            out = checkpointed(self.core_attention, self.tracker, q, k, v, packed_seq_params)
        else:
            out = self.core_attention(q, k, v, packed_seq_params)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)  # [s, b, H/p * d]
        return self.linear_proj(out)
