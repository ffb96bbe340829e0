"""Top-k router: scores, expert choice, token dropping and the load-balancing / z losses.

For T tokens x [T, h] and E experts, logits = x W^T [T, E] (W: ``router.weight`` [E, h],
replicated over TP) and, per token, the routing weights of its k chosen experts:

| score function | pre-softmax | chosen experts        | weights p of the k chosen                 | HF family             |
|----------------|-------------|-----------------------|-------------------------------------------|-----------------------|
| softmax        | no          | top-k logits          | softmax over the k logits                 | Mixtral; Qwen2-MoE with norm_topk_prob |
| softmax        | yes         | top-k of softmax(all) | softmax(all) at those k (sum < 1)         | Qwen2-MoE without norm_topk_prob |
| sigmoid        | -           | top-k of sigmoid      | sigmoid / (sum of the k sigmoids + 1e-20) (k > 1; k = 1: the sigmoid) | |

(Mixtral's "softmax over all, top-k, renormalise" is the first row: the same weights.)

Capacity (``moe_expert_capacity_factor`` c, else dropless): each expert takes at most
``ceil(T k / E * c)`` tokens. Megatron's default drop policy ("probs"): an expert over capacity
keeps the tokens with the highest routing weight and drops the lowest; a dropped (token, expert)
pair gets weight 0 and the token's other weights are NOT renormalised (a fully dropped token's MLP
output is 0, the residual passes it through).

Losses (Megatron-core's definitions; s: scores over all experts: softmax(logits), or for the
sigmoid router sigmoid(logits) normalised to sum 1 per token; f_e: the number of top-k choices of
expert e, counted before any capacity drop):

    aux_loss     = coeff * E / (k T^2) * sum_e (sum_t s[t, e]) f_e                  (Switch / GShard)
    seq_aux_loss = coeff * mean_b sum_e (E / (k S) f_{b,e}) (mean_{t in b} s[t, e])  (per sequence b of S tokens)
    z_loss       = z_coeff * mean_t logsumexp(logits[t])^2                            (ST-MoE router z-loss)

The losses do not change the layer's output: each is attached to the routing weights by
:func:`megafast.model.moe.aux_loss.attach_loss`, whose backward seeds the loss's gradient with
the model's current loss-gradient scale (see megafast.model.moe.aux_loss.MoELossTracker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast.config import GPTConfig
from megafast.model import init
from megafast.model.moe.aux_loss import MoELossTracker, attach_loss


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    topk: int
    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False
    capacity_factor: Optional[float] = None  # None: dropless
    load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    aux_loss_coeff: float = 0.0
    z_loss_coeff: Optional[float] = None

    @classmethod
    def from_model(cls, config: GPTConfig) -> RouterConfig:
        return cls(
            config.num_experts,
            config.moe_router_topk,
            config.moe_router_score_function,
            config.moe_router_pre_softmax,
            config.moe_expert_capacity_factor,
            config.moe_router_load_balancing_type,
            config.moe_aux_loss_coeff,
            config.moe_z_loss_coeff,
        )


def expert_capacity(num_tokens: int, cfg: RouterConfig) -> int:
    """Megatron's ``get_capacity``: ceil(T k / E * c), at least 1 (and at most T here)."""
    capacity = math.ceil(num_tokens * cfg.topk / cfg.num_experts * cfg.capacity_factor)
    return max(1, min(capacity, num_tokens))


def topk_routing(logits: torch.Tensor, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, indices [T, k] int64, topk_map [T, E] bool).

    ``indices[t, j]`` is token t's j-th expert, or -1 when capacity dropped that choice (its weight
    is then 0); ``topk_map`` marks the top-k choices before dropping (for the balancing losses).
    """
    logits = logits.float()
    if cfg.score_function == "softmax":
        if cfg.pre_softmax:
            weights, index = torch.topk(torch.softmax(logits, dim=-1), cfg.topk, dim=-1)  # [T, k]
        else:
            top_logits, index = torch.topk(logits, cfg.topk, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
    else:
        weights, index = torch.topk(torch.sigmoid(logits), cfg.topk, dim=-1)
        if cfg.topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)  # [T, E]
    if cfg.capacity_factor is None:
        return weights, index, topk_map
    capacity = expert_capacity(logits.shape[0], cfg)
    # per expert (column), the `capacity` tokens of highest weight; non-routed tokens have weight 0
    probs = torch.zeros_like(logits).scatter(1, index, weights.detach())  # [T, E]
    _, keep = torch.topk(probs, capacity, dim=0, sorted=False)  # [capacity, E]
    capacity_mask = torch.zeros_like(topk_map).scatter(0, keep, True)
    kept = capacity_mask.gather(1, index)  # [T, k]
    return weights * kept, torch.where(kept, index, -1), topk_map


def balancing_scores(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Scores over all experts for the load-balancing losses, [T, E] fp32 (each row sums to 1)."""
    logits = logits.float()
    if cfg.score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def aux_loss(scores: torch.Tensor, topk_map: torch.Tensor, topk: int, coeff: float) -> torch.Tensor:
    """Switch/GShard load-balancing loss over all T tokens (formula in the module docstring)."""
    num_tokens, num_experts = scores.shape
    tokens_per_expert = topk_map.sum(dim=0).float()  # f_e [E]
    scale = coeff * num_experts / (topk * num_tokens * num_tokens)
    return (scores.sum(dim=0) * tokens_per_expert).sum() * scale


def seq_aux_loss(
    scores: torch.Tensor, topk_map: torch.Tensor, topk: int, coeff: float, seq_length: int, batch_size: int
) -> torch.Tensor:
    """Per-sequence load-balancing loss; tokens are ordered [s, b] (sequence-major), as the layer's."""
    num_experts = scores.shape[1]
    scores = scores.reshape(seq_length, batch_size, num_experts)
    counts = topk_map.reshape(seq_length, batch_size, num_experts).sum(dim=0).float()  # f_{b,e} [b, E]
    cost = counts / (seq_length * topk / num_experts)
    return (cost * scores.mean(dim=0)).sum(dim=1).mean() * coeff


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """Router z-loss: coeff * mean of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean() * coeff


class TopKRouter(nn.Module):
    """``router.weight`` [E, h] (replicated over TP, initialised N(0, init_method_std) from the seed).

    forward(x [T, h], (s, b)) -> (weights [T, k] in x's dtype, expert indices [T, k], -1 where
    dropped), with the configured losses recorded in ``tracker`` and attached to the weights for
    the backward pass.
    """

    def __init__(
        self,
        config: GPTConfig,
        layer_number: int,
        seed: int,
        tracker: Optional[MoELossTracker],
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.cfg = RouterConfig.from_model(config)
        self.layer_number = layer_number
        self.tracker = tracker
        name = f"decoder.layers.{layer_number}.mlp.router.weight"
        full = torch.empty(config.num_experts, config.hidden_size)
        init.for_param(config, seed, name)(full)
        self.weight = nn.Parameter(full.to(dtype=params_dtype, device=device))

    def forward(self, x: torch.Tensor, seq_batch: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x, self.weight)  # [T, E]
        probs, indices, topk_map = topk_routing(logits, cfg)
        if self.training and torch.is_grad_enabled():
            losses = {}
            if cfg.load_balancing_type != "none" and cfg.aux_loss_coeff > 0:
                scores = balancing_scores(logits, cfg)
                if cfg.load_balancing_type == "aux_loss":
                    loss = aux_loss(scores, topk_map, cfg.topk, cfg.aux_loss_coeff)
                else:
                    loss = seq_aux_loss(scores, topk_map, cfg.topk, cfg.aux_loss_coeff, *seq_batch)
                losses["load_balancing_loss"] = loss
            if cfg.z_loss_coeff:
                losses["z_loss"] = z_loss(logits, cfg.z_loss_coeff)
            for name, loss in losses.items():
                probs = attach_loss(probs, loss, self.tracker)
                if self.tracker is not None:
                    self.tracker.record(name, self.layer_number, loss)
            if self.tracker is not None:
                self.tracker.record_tokens(self.layer_number, indices, cfg.num_experts)
        return probs.to(x.dtype), indices
