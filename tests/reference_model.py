"""A plain-torch, single-process GPT/Llama reference, written independently of megafast's layers.

Separate q/k/v/o and gate/up/down projections in the usual (HF-like) layout, attention as an
explicit masked softmax, RoPE from its formula. ``load_megafast`` maps megafast's full (gathered,
unpadded) weights in, and ``grads_in_megafast_layout`` maps gradients back for comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megafast.config import GPTConfig


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [b, heads, s, d]: rotate pairs (i, i + d/2) by angle t * base^(-2i/d)."""
    b, nh, s, d = x.shape
    i = torch.arange(d // 2, dtype=torch.float64)
    theta = torch.outer(torch.arange(s, dtype=torch.float64), base ** (-2.0 * i / d))  # [s, d/2]
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RefBlock(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c = c
        h, d = c.hidden_size, c.head_dim
        Norm = nn.LayerNorm if c.normalization == "LayerNorm" else nn.RMSNorm
        self.ln1, self.ln2 = Norm(h, eps=c.norm_epsilon), Norm(h, eps=c.norm_epsilon)
        qkv_bias = c.add_bias_linear or c.add_qkv_bias
        self.q = nn.Linear(h, c.num_attention_heads * d, bias=qkv_bias)
        self.k = nn.Linear(h, c.num_query_groups * d, bias=qkv_bias)
        self.v = nn.Linear(h, c.num_query_groups * d, bias=qkv_bias)
        self.o = nn.Linear(c.num_attention_heads * d, h, bias=c.add_bias_linear)
        if c.qk_layernorm:  # one norm over d shared by every head (Qwen3's q_norm / k_norm)
            self.q_norm, self.k_norm = Norm(d, eps=c.norm_epsilon), Norm(d, eps=c.norm_epsilon)
        if c.activation == "swiglu":
            self.gate = nn.Linear(h, c.ffn_hidden_size, bias=c.add_bias_linear)
        self.up = nn.Linear(h, c.ffn_hidden_size, bias=c.add_bias_linear)
        self.down = nn.Linear(c.ffn_hidden_size, h, bias=c.add_bias_linear)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        b, s, _ = x.shape
        H, G, d = c.num_attention_heads, c.num_query_groups, c.head_dim
        q = self.q(x).view(b, s, H, d).transpose(1, 2)
        k = self.k(x).view(b, s, G, d).transpose(1, 2)
        v = self.v(x).view(b, s, G, d).transpose(1, 2)
        if c.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.position_embedding_type == "rope":
            q, k = _rope(q, c.rotary_base), _rope(k, c.rotary_base)
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        if c.window_size is not None:  # sliding window: key j visible from query i when i - j <= left
            causal = causal & ~torch.ones(s, s, dtype=torch.bool).tril(-c.window_size[0] - 1)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, H * d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        act = self.c.activation
        if act == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh" if act == "gelu_tanh" else "none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RefGPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c = c
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size) if c.position_embedding_type == "learned_absolute" else None
        self.blocks = nn.ModuleList(RefBlock(c) for _ in range(c.num_layers))
        Norm = nn.LayerNorm if c.normalization == "LayerNorm" else nn.RMSNorm
        self.ln_f = Norm(c.hidden_size, eps=c.norm_epsilon)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] -> logits [b, s, V]."""
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        return x @ (self.wte.weight if self.lm_head is None else self.lm_head.weight).t()

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s], 0 where labels == -100."""
        logits = self(ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)

    # ---- weight mapping -------------------------------------------------------------------
    def _pairs(self):
        """(megafast name, reference tensor or fused list) for every megafast parameter."""
        c = self.c
        yield "embedding.word_embeddings.weight", self.wte.weight
        if self.wpe is not None:
            yield "embedding.position_embeddings.weight", self.wpe.weight
        for i, blk in enumerate(self.blocks):
            p = f"decoder.layers.{i}."
            yield p + "input_layernorm.weight", blk.ln1.weight
            yield p + "pre_mlp_layernorm.weight", blk.ln2.weight
            if c.normalization == "LayerNorm":
                yield p + "input_layernorm.bias", blk.ln1.bias
                yield p + "pre_mlp_layernorm.bias", blk.ln2.bias
            yield p + "self_attention.linear_qkv.weight", ("qkv", blk.q.weight, blk.k.weight, blk.v.weight)
            if blk.q.bias is not None:
                yield p + "self_attention.linear_qkv.bias", ("qkv", blk.q.bias, blk.k.bias, blk.v.bias)
            yield p + "self_attention.linear_proj.weight", blk.o.weight
            if c.qk_layernorm:
                yield p + "self_attention.q_layernorm.weight", blk.q_norm.weight
                yield p + "self_attention.k_layernorm.weight", blk.k_norm.weight
                if c.normalization == "LayerNorm":
                    yield p + "self_attention.q_layernorm.bias", blk.q_norm.bias
                    yield p + "self_attention.k_layernorm.bias", blk.k_norm.bias
            if c.activation == "swiglu":
                yield p + "mlp.linear_fc1.weight", ("cat", blk.gate.weight, blk.up.weight)
                if blk.up.bias is not None:
                    yield p + "mlp.linear_fc1.bias", ("cat", blk.gate.bias, blk.up.bias)
            else:
                yield p + "mlp.linear_fc1.weight", blk.up.weight
                if blk.up.bias is not None:
                    yield p + "mlp.linear_fc1.bias", blk.up.bias
            yield p + "mlp.linear_fc2.weight", blk.down.weight
            if blk.down.bias is not None:
                yield p + "self_attention.linear_proj.bias", blk.o.bias
                yield p + "mlp.linear_fc2.bias", blk.down.bias
        yield "decoder.final_layernorm.weight", self.ln_f.weight
        if c.normalization == "LayerNorm":
            yield "decoder.final_layernorm.bias", self.ln_f.bias
        if self.lm_head is not None:
            yield "output_layer.weight", self.lm_head.weight

    def _split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.c
        G, per, d = c.num_query_groups, c.num_attention_heads // c.num_query_groups, c.head_dim
        grouped = fused.reshape(G, per + 2, d, *fused.shape[1:])
        q = grouped[:, :per].reshape(G * per * d, *fused.shape[1:])
        return q, grouped[:, per].reshape(G * d, *fused.shape[1:]), grouped[:, per + 1].reshape(G * d, *fused.shape[1:])

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.c
        G, per, d = c.num_query_groups, c.num_attention_heads // c.num_query_groups, c.head_dim
        rest = q.shape[1:]
        parts = [q.reshape(G, per, d, *rest), k.reshape(G, 1, d, *rest), v.reshape(G, 1, d, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    @torch.no_grad()
    def load_megafast(self, full: dict[str, torch.Tensor]) -> None:
        names = set()
        for name, target in self._pairs():
            names.add(name)
            src = full[name]
            if isinstance(target, tuple) and target[0] == "qkv":
                for dst, part in zip(target[1:], self._split_qkv(src)):
                    dst.copy_(part)
            elif isinstance(target, tuple):
                for dst, part in zip(target[1:], src.chunk(2, dim=0)):
                    dst.copy_(part)
            else:
                target.copy_(src)
        assert names == set(full), f"unmapped parameters: {set(full) ^ names}"

    def grads_in_megafast_layout(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, target in self._pairs():
            if isinstance(target, tuple) and target[0] == "qkv":
                out[name] = self._fuse_qkv(*(t.grad for t in target[1:]))
            elif isinstance(target, tuple):
                out[name] = torch.cat([t.grad for t in target[1:]], dim=0)
            else:
                out[name] = target.grad.clone()
        return out
