"""Mixture-of-experts in the cost model: what an MoE MLP keeps for backward, how expert
parallelism divides the experts' model state, and what its token dispatcher moves.

Activations of one MoE MLP, one microbatch (T = s b tokens: the layer all-gathers the sequence
under sequence parallelism and routes every token on every TP rank; k top-k, E experts, h
hidden, f expert FFN, S shared-expert FFN, e bytes per activation element; R the rows the
experts compute: T k dropless, at most min(T k, E ceil(T k / E c)) with a capacity factor c, an
upper bound since drops depend on the data). Each storage autograd keeps is counted once, as the
torch code creates it (checked against ``saved_tensors_hooks`` in tests/test_moe_planner.py,
fp32 on CPU, dropless and with a capacity factor that drops nothing); the router input is the
layer's MLP input, already counted by the dense layer formula::

    router     softmax over the top-k logits: 8 T k indices + 4 T k weights
               pre-softmax: 4 T E softmax + 8 T k;  sigmoid: 4 T E + 8 T k + 4 T k + 4 T (k > 1)
               capacity: + T k kept mask;  aux_loss: + 4 T E scores + 4 E counts
               seq_aux_loss (b sequences): + 4 T E + 4 b E per-sequence counts + 4 (their scalar mean)
               z_loss: + 4 T E logits (fp32 model) + 4 T log-sum-exp + 8 (two scalars)
    permute    8 T k sort order + e T k h permuted rows (+ T k drop mask when R < T k: a bound)
    experts    e R w f, w = 4 SwiGLU torch, 3 SwiGLU Triton, 2 GELU (as the dense MLP's widths)
    unpermute  8 T k + T k mask + e T k h gathered expert outputs + e T k weights
    shared     e T w S (+ gate: e T sigmoid + e T h gated output)

Expert parallelism (``Layout.ep``, EP ranks drawn from the DP ranks): each rank holds E / ep
experts; expert gradients are reduced (and, with the distributed optimizer, their optimizer state
sharded) over the expert-data-parallel group of dp x cp / ep ranks, dense ones over dp x cp.
Activations assume balanced routing: a rank's local experts receive T k rows in all.

Dispatcher traffic per MoE layer and microbatch, n = ep, N = e T h (one rank's tokens), each
direction of forward and backward (4 collectives in all; bandwidth of a group spanning
tp x ep GPUs)::

    alltoall   all-to-all of the T k routed rows: (n - 1) / n * k N bytes leave each rank
    allgather  all-gather of the n ranks' tokens, then reduce-scatter of the outputs:
               (n - 1) / n * n N = (n - 1) N bytes each
"""

from __future__ import annotations

import math

from megafast.config import GPTConfig

DISPATCHERS = ("alltoall", "allgather")


def is_expert_parameter(name: str) -> bool:
    """Routed-expert weights (``decoder.layers.i.mlp.experts.*``): split over EP, reduced over expert-DP."""
    return ".mlp.experts." in name


def expert_rows(config: GPTConfig, tokens: int) -> int:
    """Rows the experts compute for ``tokens`` routed tokens (an upper bound with a capacity factor)."""
    k = config.moe_router_topk
    if config.moe_expert_capacity_factor is None:
        return tokens * k
    capacity = max(1, min(math.ceil(tokens * k / config.num_experts * config.moe_expert_capacity_factor), tokens))
    return min(tokens * k, config.num_experts * capacity)


def moe_mlp_activation_bytes(config: GPTConfig, tokens: int, e: int, ops: str, batch: int = 1) -> int:
    """What one MoE MLP keeps for backward besides its input (module docstring), ``tokens`` = T of
    ``batch`` sequences."""
    c, T, k, E, h = config, tokens, config.moe_router_topk, config.num_experts, config.hidden_size
    capacity = c.moe_expert_capacity_factor is not None
    if c.moe_router_score_function == "sigmoid":
        router = 4 * T * E + 8 * T * k + (4 * T * k + 4 * T if k > 1 else 0)
    elif c.moe_router_pre_softmax:
        router = 4 * T * E + 8 * T * k
    else:
        router = 8 * T * k + 4 * T * k
    router += T * k if capacity else 0
    if c.moe_router_load_balancing_type == "aux_loss" and c.moe_aux_loss_coeff > 0:
        router += 4 * T * E + 4 * E
    elif c.moe_router_load_balancing_type == "seq_aux_loss" and c.moe_aux_loss_coeff > 0:
        router += 4 * T * E + 4 * batch * E + 4
    if c.moe_z_loss_coeff:
        router += (4 * T * E if e == 4 else 0) + 4 * T + 8
    widths = 2 if c.activation != "swiglu" else (3 if ops == "triton" else 4)
    can_drop = expert_rows(c, T) < T * k  # the torch permute keeps a drop mask only when something dropped
    permute = 8 * T * k + e * T * k * h + (T * k if can_drop else 0)
    experts = e * expert_rows(c, T) * widths * c.moe_ffn_hidden_size
    unpermute = 8 * T * k + T * k + e * T * k * h + e * T * k
    shared = 0
    if c.moe_shared_expert_intermediate_size:
        shared = e * T * widths * c.moe_shared_expert_intermediate_size
        shared += e * T + e * T * h if c.moe_shared_expert_gate else 0
    return router + permute + experts + unpermute + shared


def dispatch_bytes(config: GPTConfig, tokens: int, e: int, ep: int, dispatcher: str) -> float:
    """Bytes one rank sends in ONE dispatcher collective of one MoE layer (module docstring)."""
    if ep == 1:
        return 0.0
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"unknown token dispatcher {dispatcher!r}: use alltoall or allgather")
    n, N = ep, e * tokens * config.hidden_size
    return (n - 1) / n * config.moe_router_topk * N if dispatcher == "alltoall" else (n - 1) * N


def num_moe_layers(config: GPTConfig, start: int = 0, end: int | None = None) -> int:
    end = config.num_layers if end is None else end
    return sum(config.is_moe_layer(i) for i in range(start, end)) if config.is_moe else 0


__all__ = [
    "DISPATCHERS",
    "dispatch_bytes",
    "expert_rows",
    "is_expert_parameter",
    "moe_mlp_activation_bytes",
    "num_moe_layers",
]
