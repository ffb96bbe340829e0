"""GPT-2 checkpoints (``GPT2LMHeadModel``): Conv1D weights, fused ``c_attn``, learned positions.

Config mapping (HF config.json -> GPTConfig):

| HF                          | megafast                                                    |
|-----------------------------|-------------------------------------------------------------|
| n_layer, n_embd, n_head     | num_layers, hidden_size, num_attention_heads (no GQA)       |
| n_inner (None: 4 n_embd)    | ffn_hidden_size                                             |
| n_positions                 | max_position_embeddings (learned_absolute positions)        |
| layer_norm_epsilon          | norm_epsilon (LayerNorm)                                    |
| activation_function         | gelu_new / gelu_pytorch_tanh / gelu_fast -> "gelu_tanh"; gelu -> "gelu" |
| resid_pdrop, attn_pdrop     | hidden_dropout, attention_dropout                           |
| tie_word_embeddings         | tie_embeddings (GPT-2 ties by default)                      |

HF's GPT-2 linear layers are ``Conv1D``: the weight is [in, out], the transpose of torch's
Linear, so every weight is transposed. ``c_attn`` is one Conv1D producing [q; k; v] (each
H * d, head-major); megafast's fused QKV is grouped per head (q_j, k_j, v_j), so its rows are
regrouped (layout.fuse_qkv with G = H). Tensor map (``m`` = ``decoder.layers.i.``,
``h`` = ``transformer.h.i.``):

    m.input_layernorm.{w,b}           <- h.ln_1.{w,b}
    m.self_attention.linear_qkv.w     <- h.attn.c_attn.w^T, regrouped per head
    m.self_attention.linear_qkv.b     <- h.attn.c_attn.b, regrouped per head
    m.self_attention.linear_proj.w/b  <- h.attn.c_proj.w^T / b
    m.pre_mlp_layernorm.{w,b}         <- h.ln_2.{w,b}
    m.mlp.linear_fc1.w/b              <- h.mlp.c_fc.w^T / b
    m.mlp.linear_fc2.w/b              <- h.mlp.c_proj.w^T / b
    embedding.word_embeddings.weight  <- transformer.wte.weight
    embedding.position_embeddings.w   <- transformer.wpe.weight
    decoder.final_layernorm.{w,b}     <- transformer.ln_f.{w,b}
    output_layer.weight               <- lm_head.weight (untied only)

Checkpoints saved from the bare ``GPT2Model`` (keys without ``transformer.``) are read too.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megafast.checkpoint import layout
from megafast.config import GPTConfig
from megafast.convert.hf_fields import check_known_fields
from megafast.convert.hf_keymap import Rule

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
PASSTHROUGH = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "activation_function",
    "embd_pdrop",
    "reorder_and_upcast_attn",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
)


# Model fields config_from_hf reads or checks (besides PASSTHROUGH and hf_fields.GENERIC_FIELDS);
# n_ctx is old configs' copy of n_positions.
KNOWN_FIELDS = (
    "n_embd", "n_layer", "n_head", "vocab_size", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
    "tie_word_embeddings", "resid_pdrop", "attn_pdrop", "initializer_range", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
) + PASSTHROUGH


def _unsupported(where: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"{where}: config.json sets {key}={value!r} ({why}), which megafast's model does not implement: "
        "it cannot be converted exactly"
    )


def config_from_hf(
    hf: dict[str, Any], architecture: str, make_vocab_size_divisible_by: int, where: str
) -> tuple[GPTConfig, dict[str, Any]]:
    """(GPTConfig, metadata) of an HF GPT-2 config.json dict."""
    check_known_fields(hf, KNOWN_FIELDS, architecture, where)

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"{where}: config.json lacks {key!r}, which a {architecture} config must have")
        return hf[key]

    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise _unsupported(where, "activation_function", activation, f"megafast has {', '.join(ACTIVATIONS)}")
    for key, required in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, required) != required:
            raise _unsupported(where, key, hf[key], "a different attention")
    hidden = need("n_embd")
    config = GPTConfig(
        num_layers=need("n_layer"),
        hidden_size=hidden,
        num_attention_heads=need("n_head"),
        vocab_size=need("vocab_size"),
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=need("n_positions"),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=ACTIVATIONS[activation],
        add_bias_linear=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout=float(hf.get("attn_pdrop", 0.1)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    metadata = {"architecture": architecture, **{k: hf[k] for k in PASSTHROUGH if k in hf}}
    return config, metadata


def architecture_for(config: GPTConfig) -> str | None:
    """``GPT2LMHeadModel`` when it can hold ``config`` exactly, else None."""
    fits = (
        config.position_embedding_type == "learned_absolute"
        and config.normalization == "LayerNorm"
        and config.activation in ("gelu", "gelu_tanh")
        and config.add_bias_linear
        and config.num_query_groups == config.num_attention_heads
        and config.kv_channels * config.num_attention_heads == config.hidden_size
    )
    return "GPT2LMHeadModel" if fits else None


def config_to_hf(config: GPTConfig, metadata: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json dict of the GPT2LMHeadModel holding ``config``."""
    if architecture_for(config) is None:
        raise ValueError(
            "the model cannot be written as GPT2LMHeadModel: it needs learned positions, LayerNorm, GELU, "
            "biases, no GQA and head_dim = hidden/heads"
        )
    activation = metadata.get("activation_function")
    if ACTIVATIONS.get(activation) != config.activation:
        activation = "gelu_new" if config.activation == "gelu_tanh" else "gelu"
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "n_inner": None if config.ffn_hidden_size == 4 * config.hidden_size else config.ffn_hidden_size,
        "n_positions": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_epsilon,
        "resid_pdrop": config.hidden_dropout,
        "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    hf.update({k: metadata[k] for k in PASSTHROUGH if k in metadata})
    hf["activation_function"] = activation
    return hf


def rule_groups(config: GPTConfig, hf_names: set[str] | None = None) -> list[tuple[str, list[Rule]]]:
    """The explicit key map, group by group; ``hf_names`` picks the key prefix of a source file."""
    p = "transformer."
    if hf_names is not None and "transformer.wte.weight" not in hf_names and "wte.weight" in hf_names:
        p = ""  # saved from the bare GPT2Model
    out = [
        (
            "embedding",
            [
                Rule(layout.WORD_EMBEDDINGS, (f"{p}wte.weight",)),
                Rule(layout.POSITION_EMBEDDINGS, (f"{p}wpe.weight",)),
            ],
        )
    ]
    for i in range(config.num_layers):
        m, h = layout.layer_prefix(i), f"{p}h.{i}."
        out.append(
            (
                f"layer {i}",
                [
                    Rule(f"{m}input_layernorm.weight", (f"{h}ln_1.weight",)),
                    Rule(f"{m}input_layernorm.bias", (f"{h}ln_1.bias",)),
                    Rule(f"{m}self_attention.linear_qkv.weight", (f"{h}attn.c_attn.weight",), "qkv_conv1d"),
                    Rule(f"{m}self_attention.linear_qkv.bias", (f"{h}attn.c_attn.bias",), "qkv_concat"),
                    Rule(f"{m}self_attention.linear_proj.weight", (f"{h}attn.c_proj.weight",), "transpose"),
                    Rule(f"{m}self_attention.linear_proj.bias", (f"{h}attn.c_proj.bias",)),
                    Rule(f"{m}pre_mlp_layernorm.weight", (f"{h}ln_2.weight",)),
                    Rule(f"{m}pre_mlp_layernorm.bias", (f"{h}ln_2.bias",)),
                    Rule(f"{m}mlp.linear_fc1.weight", (f"{h}mlp.c_fc.weight",), "transpose"),
                    Rule(f"{m}mlp.linear_fc1.bias", (f"{h}mlp.c_fc.bias",)),
                    Rule(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.c_proj.weight",), "transpose"),
                    Rule(f"{m}mlp.linear_fc2.bias", (f"{h}mlp.c_proj.bias",)),
                ],
            )
        )
    final = [
        Rule("decoder.final_layernorm.weight", (f"{p}ln_f.weight",)),
        Rule("decoder.final_layernorm.bias", (f"{p}ln_f.bias",)),
    ]
    if not config.tie_embeddings:
        final.append(Rule(layout.OUTPUT_LAYER, ("lm_head.weight",)))
    out.append(("final", final))
    return out


def ignored(name: str, config: GPTConfig) -> bool:
    """HF tensors that carry nothing to convert: attention-mask buffers, the tied lm_head."""
    if re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", name):
        return True
    return config.tie_embeddings and name == "lm_head.weight"
