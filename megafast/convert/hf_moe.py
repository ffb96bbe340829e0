"""Mixture-of-experts checkpoints: ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and
``Qwen3MoeForCausalLM``.

Attention, norms and embeddings are the Llama family's (megafast.convert.hf_llama: Mixtral's as
Mistral's, Qwen2-MoE's as Qwen2's, Qwen3-MoE's as Qwen3's (q/k RMSNorm per head), with their sliding-window and RoPE-scaling refusals); this
module adds the experts.

Config mapping (HF config.json -> GPTConfig):

| HF                                             | megafast                                           |
|------------------------------------------------|----------------------------------------------------|
| num_local_experts (Mixtral, Qwen3), num_experts| num_experts                                        |
| num_experts_per_tok                            | moe_router_topk                                    |
| intermediate_size (Mixtral)                    | moe_ffn_hidden_size (= ffn_hidden_size)            |
| moe_intermediate_size, intermediate_size (Qwen)| moe_ffn_hidden_size, ffn_hidden_size (dense layers)|
| shared_expert_intermediate_size (Qwen)         | moe_shared_expert_intermediate_size, with the gate |
| norm_topk_prob (Qwen; Mixtral: always)         | moe_router_pre_softmax = not norm_topk_prob        |
| decoder_sparse_step, mlp_only_layers (Qwen)    | moe_layer_freq (a 0/1 pattern unless every layer)  |
| (Qwen3-MoE: no shared expert, q_norm/k_norm)   | qk_layernorm (as dense Qwen3)                      |
| router_aux_loss_coef                           | moe_aux_loss_coeff                                 |
| qkv_bias (Qwen, default true)                  | add_qkv_bias                                       |

Mixtral's routing (softmax over all experts, top-k, renormalise) is megafast's default softmax
router (softmax over the k largest logits): the same weights. A nonzero ``router_jitter_noise``
(training-time noise megafast does not implement) is refused.

Tensor map, MoE layer ``i`` (``m`` = ``decoder.layers.i.mlp.``; Mixtral ``h`` =
``model.layers.i.block_sparse_moe.``, Qwen2/3-MoE ``h`` = ``model.layers.i.mlp.``):

    m.router.weight                      <- h.gate.weight
    m.experts.linear_fc1.weight [E,2f,h] <- per expert e: [h.experts.e.w1; h.experts.e.w3]          (Mixtral)
                                            [h.experts.e.gate_proj; h.experts.e.up_proj]            (Qwen2/3-MoE)
    m.experts.linear_fc2.weight [E,h,f]  <- h.experts.e.w2 / h.experts.e.down_proj, stacked
    m.shared_experts.gate_weight         <- h.shared_expert_gate.weight                              (Qwen2-MoE)
    m.shared_experts.linear_fc1.weight   <- [h.shared_expert.gate_proj; h.shared_expert.up_proj]
    m.shared_experts.linear_fc2.weight   <- h.shared_expert.down_proj

Every expert tensor is a rule of the key map, so the converter's checks (every HF tensor consumed,
every megafast tensor produced, shapes) cover the experts too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megafast.checkpoint import layout
from megafast.config import GPTConfig
from megafast.convert import hf_llama
from megafast.convert.hf_fields import check_known_fields
from megafast.convert.hf_keymap import Rule

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe"}
BASE = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
        "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}


def _need(hf: dict[str, Any], key: str, where: str, architecture: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{where}: config.json lacks {key!r}, which a {architecture} config must have")
    return hf[key]


# The expert fields each family reads (its attention fields are hf_llama's; generic ones hf_fields')
MOE_FIELDS = {
    "MixtralForCausalLM": ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                           "router_jitter_noise", "output_router_logits"),
    "Qwen2MoeForCausalLM": ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                            "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                            "mlp_only_layers", "router_aux_loss_coef", "output_router_logits", "qkv_bias"),
    # transformers 5 writes num_local_experts (num_experts is its alias, the name Qwen's own configs use)
    "Qwen3MoeForCausalLM": ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
                            "output_router_logits"),
}


def _layer_pattern(hf: dict[str, Any], num_layers: int, where: str) -> tuple[int, ...]:
    """Qwen's MoE layers: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers (1 = MoE)."""
    step = int(hf.get("decoder_sparse_step") or 1)
    only_dense = set(hf.get("mlp_only_layers") or [])
    pattern = tuple(int(i not in only_dense and (i + 1) % step == 0) for i in range(num_layers))
    if not any(pattern):
        raise hf_llama._unsupported(where, "mlp_only_layers/decoder_sparse_step", pattern, "no MoE layer")
    return pattern


def _layer_pattern_to_hf(config: GPTConfig) -> dict[str, Any]:
    """decoder_sparse_step and mlp_only_layers giving ``config``'s MoE layers: the step that needs the
    fewest listed dense layers (the largest such), so a config written with a step reads back as written."""
    moe = [config.is_moe_layer(i) for i in range(config.num_layers)]
    best = None
    for step in range(1, config.num_layers + 1):
        if all((i + 1) % step == 0 for i in range(config.num_layers) if moe[i]):
            dense = [i for i in range(config.num_layers) if (i + 1) % step == 0 and not moe[i]]
            if best is None or len(dense) <= len(best[1]):
                best = (step, dense)
    assert best is not None  # step 1 always fits
    return {"decoder_sparse_step": best[0], "mlp_only_layers": best[1]}


def config_from_hf(
    hf: dict[str, Any], architecture: str, make_vocab_size_divisible_by: int, where: str
) -> tuple[GPTConfig, dict[str, Any]]:
    """(GPTConfig, metadata) of an HF Mixtral/Qwen2-MoE/Qwen3-MoE config.json dict."""
    base_type = hf_llama.ARCHITECTURES[BASE[architecture]]  # the error names the MoE architecture
    check_known_fields(hf, hf_llama.KNOWN_FIELDS[base_type] + MOE_FIELDS[architecture], architecture, where)
    if hf.get("router_jitter_noise"):
        raise hf_llama._unsupported(where, "router_jitter_noise", hf["router_jitter_noise"], "router jitter")
    if architecture == "MixtralForCausalLM":
        dense, metadata = hf_llama.config_from_hf(hf, BASE[architecture], make_vocab_size_divisible_by, where,
                                                  MOE_FIELDS[architecture])
        moe = dict(
            num_experts=_need(hf, "num_local_experts", where, architecture),
            moe_ffn_hidden_size=dense.ffn_hidden_size,
        )
    elif architecture == "Qwen3MoeForCausalLM":
        base = dict(hf, use_sliding_window=hf.get("use_sliding_window", False))
        dense, metadata = hf_llama.config_from_hf(
            base, BASE[architecture], make_vocab_size_divisible_by, where, MOE_FIELDS[architecture]
        )
        pattern = _layer_pattern(hf, dense.num_layers, where)
        experts = hf.get("num_experts") if hf.get("num_experts") is not None else hf.get("num_local_experts")
        moe = dict(
            num_experts=experts if experts is not None else _need(hf, "num_experts", where, architecture),
            moe_ffn_hidden_size=_need(hf, "moe_intermediate_size", where, architecture),
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
            moe_layer_freq=1 if all(pattern) else pattern,
        )
    else:
        base = dict(hf, use_sliding_window=hf.get("use_sliding_window", False))
        dense, metadata = hf_llama.config_from_hf(
            base, BASE[architecture], make_vocab_size_divisible_by, where, MOE_FIELDS[architecture]
        )
        pattern = _layer_pattern(hf, dense.num_layers, where)
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        if shared < 1:
            raise hf_llama._unsupported(where, "shared_expert_intermediate_size", shared, "no shared expert")
        moe = dict(
            num_experts=_need(hf, "num_experts", where, architecture),
            moe_ffn_hidden_size=_need(hf, "moe_intermediate_size", where, architecture),
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=True,
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
            moe_layer_freq=1 if all(pattern) else pattern,
            add_qkv_bias=bool(hf.get("qkv_bias", True)),
        )
    config = dataclasses.replace(
        dense,
        moe_router_topk=_need(hf, "num_experts_per_tok", where, architecture),
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
        **moe,
    )
    metadata["architecture"] = architecture
    return config, metadata


def architecture_for(config: GPTConfig) -> str | None:
    """The MoE architecture that can hold ``config`` exactly, or None."""
    if (
        not config.is_moe
        or config.moe_router_score_function != "softmax"
        or config.moe_expert_capacity_factor
    ):
        return None
    dense = hf_llama.architecture_for(dataclasses.replace(config, num_experts=None))
    if dense is None or config.activation != "swiglu":
        return None
    every_layer = all(config.is_moe_layer(i) for i in range(config.num_layers))
    if (
        dense == "LlamaForCausalLM"
        and not config.add_bias_linear
        and not config.moe_shared_expert_intermediate_size
        and not config.moe_router_pre_softmax
        and every_layer
        and config.moe_ffn_hidden_size == config.ffn_hidden_size
    ):
        return "MixtralForCausalLM"
    if dense == "Qwen3ForCausalLM" and not config.moe_shared_expert_intermediate_size:
        return "Qwen3MoeForCausalLM"  # q/k norms; any layer pattern, either top-k normalisation
    if config.moe_shared_expert_intermediate_size and config.moe_shared_expert_gate:
        # Qwen2-MoE's layer pattern: MoE where (i + 1) % step == 0 and not listed dense
        plain_heads = config.kv_channels * config.num_attention_heads == config.hidden_size
        if dense == "Qwen2ForCausalLM" or (not config.add_qkv_bias and plain_heads):
            return "Qwen2MoeForCausalLM"
    return None


def config_to_hf(config: GPTConfig, metadata: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json dict of the HF MoE model holding ``config``."""
    architecture = architecture_for(config)
    if architecture is None:
        raise ValueError(
            "the MoE model cannot be written as MixtralForCausalLM (SwiGLU experts, softmax top-k router "
            "renormalised, every layer MoE, no shared experts, no biases), Qwen2MoeForCausalLM (gated "
            "shared experts, softmax router) or Qwen3MoeForCausalLM (q/k norms, no shared experts, no "
            "biases, softmax router): change the router or export another way"
        )
    dense = dataclasses.replace(config, num_experts=None, add_qkv_bias=architecture == "Qwen2MoeForCausalLM")
    base = BASE[architecture]
    hf = hf_llama.config_to_hf(dense, {**metadata, "architecture": base}, dtype)
    hf.update(architectures=[architecture], model_type=ARCHITECTURES[architecture],
              num_experts_per_tok=config.moe_router_topk, router_aux_loss_coef=config.moe_aux_loss_coeff,
              output_router_logits=False)
    if architecture == "MixtralForCausalLM":
        hf.update(num_local_experts=config.num_experts, router_jitter_noise=0.0)
    elif architecture == "Qwen3MoeForCausalLM":
        hf.update(
            num_experts=config.num_experts,
            moe_intermediate_size=config.moe_ffn_hidden_size,
            norm_topk_prob=not config.moe_router_pre_softmax,
            **_layer_pattern_to_hf(config),
        )
        if "max_window_layers" not in metadata:  # Qwen3-MoE's config has none of its own
            hf.pop("max_window_layers", None)
    else:
        dense_layers = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
        hf.update(
            num_experts=config.num_experts,
            moe_intermediate_size=config.moe_ffn_hidden_size,
            shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
            norm_topk_prob=not config.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=dense_layers,
            qkv_bias=config.add_qkv_bias,
        )
    return hf


def _moe_rules(config: GPTConfig, architecture: str, i: int) -> list[Rule]:
    m, E = f"{layout.layer_prefix(i)}mlp.", config.num_experts
    if architecture == "MixtralForCausalLM":
        h = f"model.layers.{i}.block_sparse_moe."
        gate_up = tuple(f"{h}experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w3"))
        down = tuple(f"{h}experts.{e}.w2.weight" for e in range(E))
    else:
        h = f"model.layers.{i}.mlp."
        gate_up = tuple(f"{h}experts.{e}.{w}_proj.weight" for e in range(E) for w in ("gate", "up"))
        down = tuple(f"{h}experts.{e}.down_proj.weight" for e in range(E))
    rules = [
        Rule(f"{m}router.weight", (f"{h}gate.weight",)),
        Rule(f"{m}experts.linear_fc1.weight", gate_up, "experts_gate_up"),
        Rule(f"{m}experts.linear_fc2.weight", down, "experts"),
    ]
    if config.moe_shared_expert_intermediate_size:
        s = f"{h}shared_expert."
        rules += [
            Rule(f"{m}shared_experts.gate_weight", (f"{h}shared_expert_gate.weight",)),
            Rule(
                f"{m}shared_experts.linear_fc1.weight", (f"{s}gate_proj.weight", f"{s}up_proj.weight"), "gate_up"
            ),
            Rule(f"{m}shared_experts.linear_fc2.weight", (f"{s}down_proj.weight",)),
        ]
    return rules


def rule_groups(config: GPTConfig, hf_names: set[str] | None = None) -> list[tuple[str, list[Rule]]]:
    """The Llama-family key map with each MoE layer's MLP rules replaced by the experts' rules."""
    architecture = architecture_for(config) or (
        "MixtralForCausalLM" if not config.moe_shared_expert_intermediate_size else "Qwen2MoeForCausalLM"
    )
    out = []
    for label, rules in hf_llama.rule_groups(dataclasses.replace(config, num_experts=None), hf_names):
        if label.startswith("layer "):
            i = int(label.split()[1])
            if config.is_moe_layer(i):
                rules = [r for r in rules if ".mlp." not in r.megafast] + _moe_rules(config, architecture, i)
        out.append((label, rules))
    return out


def ignored(name: str, config: GPTConfig) -> bool:
    return hf_llama.ignored(name, config)
