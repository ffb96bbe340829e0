"""The ``args`` dict of a checkpoint: written from a GPTConfig, read back into one.

A training run saves ``vars(args)`` of ``pretrain_gpt.py`` (Megatron's flag names); a converted
checkpoint saves the model entries (:func:`model_args`), its precision, tokenizer and the HF
fields megafast does not model. Either rebuilds its GPTConfig from the dict alone
(:func:`config_from_args`): every architecture entry must be there (a missing or invalid one is
a one-line ValueError), the run-time options (recompute, kernel backends, fused loss) are taken
when present.

The model's (unpadded) vocabulary is not always an entry: a training run takes it from its
tokenizer. :func:`config_from_args` resolves it as the trainer does (:func:`model_vocab_size`):
the tokenizer named in the args when there is one, else ``vocab_size``. Relative tokenizer paths
are also looked up next to the checkpoint (converted checkpoints keep their tokenizer in
``{checkpoint}/tokenizer``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import torch

from megafast.config import LONG_CONTEXT_FIELDS, GPTConfig

TOKENIZER_DIR = "tokenizer"  # converted checkpoints' copy of the tokenizer files, next to the iterations
HF_METADATA = "hf_metadata"  # HF config fields megafast does not model (token ids, architecture name)

# Architecture entries (Megatron's flag names) a checkpoint's args must hold to rebuild its model.
ARCHITECTURE_ARGS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
    "group_query_attention", "num_query_groups", "max_position_embeddings", "position_embedding_type",
    "rotary_base", "normalization", "norm_epsilon", "swiglu", "openai_gelu",
    "untie_embeddings_and_output_weights", "disable_bias_linear", "add_qkv_bias", "hidden_dropout",
    "attention_dropout", "init_method_std", "make_vocab_size_divisible_by",
)
# Run-time options that are GPTConfig fields under the same name; GPTConfig's default when absent.
RUNTIME_ARGS = (
    "recompute_granularity", "recompute_method", "recompute_num_layers", "kernels", "rope_kernel",
    "attention_backend", "fused_linear_cross_entropy",
)
# MoE entries (GPTConfig fields under Megatron's flag names); absent: a dense model.
MOE_ARGS = (
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_load_balancing_type",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_grouped_gemm", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_expert_capacity_factor", "moe_layer_freq",
)
CHOICES = {
    "position_embedding_type": ("learned_absolute", "rope", "none"),
    "normalization": ("LayerNorm", "RMSNorm"),
}


def model_args(config: GPTConfig, tp: int, pp: int) -> dict[str, Any]:
    """The args entries that describe the model and its (tp, pp) layout (Megatron's names)."""
    return dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        kv_channels=config.kv_channels,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type=config.position_embedding_type,
        rotary_base=config.rotary_base,
        normalization=config.normalization,
        norm_epsilon=config.norm_epsilon,
        swiglu=config.activation == "swiglu",
        openai_gelu=config.activation == "gelu_tanh",
        untie_embeddings_and_output_weights=not config.tie_embeddings,
        disable_bias_linear=not config.add_bias_linear,
        add_qkv_bias=config.add_qkv_bias,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        vocab_size=config.vocab_size,
        padded_vocab_size=config.padded_vocab_size(tp),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=None,
        pipeline_partition="uniform",
        **{name: getattr(config, name) for name in MOE_ARGS},
        **{name: getattr(config, name) for name in LONG_CONTEXT_FIELDS},
    )


def precision_args(params_dtype: torch.dtype) -> dict[str, bool]:
    return {"bf16": params_dtype == torch.bfloat16, "fp16": params_dtype == torch.float16}


def args_from_config(
    config: GPTConfig,
    tp: int,
    pp: int,
    *,
    params_dtype: torch.dtype = torch.float32,
    tokenizer: Optional[dict[str, Optional[str]]] = None,
    hf_metadata: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``args`` dict of a converted checkpoint with layout (tp, pp) holding ``config``: the
    model entries and run-time options, sequence length, precision, tokenizer (default none) and
    the HF fields megafast does not model."""
    args = model_args(config, tp, pp)
    args.update({name: getattr(config, name) for name in RUNTIME_ARGS})
    args.update(
        seq_length=config.max_position_embeddings,
        data_parallel_size=1,
        tokenizer_type=None,
        tokenizer_model=None,
    )
    args.update(precision_args(params_dtype))
    if tokenizer:
        args.update(tokenizer)
    if args.get("tokenizer_type") == "NullTokenizer":  # megatron-core 0.19's convention (EOD V-1)
        args.setdefault("null_tokenizer_eod_id", None)
    if hf_metadata:
        args[HF_METADATA] = dict(hf_metadata)
    if config_from_args(args, config.vocab_size) != config:  # internal invariant: args describe this model
        raise AssertionError("converted checkpoint args do not rebuild the model config")
    return args


def long_context_mismatch(args: Mapping[str, Any], config: GPTConfig) -> Optional[str]:
    """One line naming the first RoPE-scaling / window / q/k-norm field in which a checkpoint's
    ``args`` (absent: GPTConfig's default) differ from ``config``; None when they agree."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    for name in LONG_CONTEXT_FIELDS:
        saved = args.get(name, defaults[name])
        saved = tuple(saved) if name == "window_size" and saved is not None else saved
        if saved != getattr(config, name):
            return (
                f"the checkpoint was saved with {name}={saved!r} but this run has "
                f"{getattr(config, name)!r}: pass the checkpoint's --{name.replace('_', '-')} "
                "(tools/checkpoint/convert.py's model flags)"
            )
    return None


def resolve_path(path: Optional[str], root: Optional[str]) -> Optional[str]:
    """``path`` as given when it exists, else relative to the checkpoint directory ``root``."""
    if not path or os.path.exists(path) or root is None or os.path.isabs(path):
        return path
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def tokenizer_from_args(args: Mapping[str, Any], root: Optional[str] = None):
    """The tokenizer a checkpoint's args name (paths resolved next to ``root``), or None."""
    from megafast.data.tokenizer import build_tokenizer

    kind = args.get("tokenizer_type")
    if kind is None:
        return None
    vocab_size = args.get("vocab_size")
    if kind == "NullTokenizer" and "null_tokenizer_eod_id" not in args and vocab_size is not None:
        vocab_size += 1  # args from before megatron-core 0.19's NullTokenizer: V + 1 ids, EOD V
    return build_tokenizer(
        kind,
        resolve_path(args.get("tokenizer_model"), root),
        resolve_path(args.get("vocab_file"), root),
        resolve_path(args.get("merge_file"), root),
        vocab_size,
        args.get("null_tokenizer_eod_id"),
    )


def model_vocab_size(args: Mapping[str, Any], tokenizer_vocab: Optional[int]) -> Optional[int]:
    """The model's (unpadded) vocabulary: the tokenizer's, or a larger ``vocab_size``."""
    vocab_size = args.get("vocab_size")
    if tokenizer_vocab is None:
        return vocab_size
    if args.get("tokenizer_type") == "NullTokenizer" or vocab_size is None:
        return tokenizer_vocab
    return max(vocab_size, tokenizer_vocab)


def model_config(args: Mapping[str, Any], vocab_size: int, where: str = "checkpoint") -> GPTConfig:
    """The GPTConfig that Megatron-named ``args`` describe, with vocabulary ``vocab_size``.

    Every :data:`ARCHITECTURE_ARGS` entry must be present; ``max_position_embeddings`` None means
    ``seq_length`` (Megatron's default).
    """
    missing = [name for name in ARCHITECTURE_ARGS if name not in args]
    if missing:
        raise ValueError(
            f"{where}: its args lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
            "they do not describe a megafast model; convert it with tools/checkpoint/convert.py"
        )
    for name, choices in CHOICES.items():
        if args[name] not in choices:
            raise ValueError(
                f"{where}: its args have unknown {name}={args[name]!r}: megafast knows {', '.join(choices)}"
            )
    max_positions = args["max_position_embeddings"]
    if max_positions is None:
        max_positions = args.get("seq_length")
        if max_positions is None:
            raise ValueError(f"{where}: its args hold neither max_position_embeddings nor seq_length")
    activation = "swiglu" if args["swiglu"] else ("gelu_tanh" if args["openai_gelu"] else "gelu")
    try:
        return GPTConfig(
            num_layers=args["num_layers"],
            hidden_size=args["hidden_size"],
            num_attention_heads=args["num_attention_heads"],
            vocab_size=vocab_size,
            ffn_hidden_size=args["ffn_hidden_size"],
            num_query_groups=args["num_query_groups"] if args["group_query_attention"] else None,
            kv_channels=args["kv_channels"],
            max_position_embeddings=max_positions,
            position_embedding_type=args["position_embedding_type"],
            rotary_base=args["rotary_base"],
            normalization=args["normalization"],
            norm_epsilon=args["norm_epsilon"],
            activation=activation,
            add_bias_linear=not args["disable_bias_linear"],
            add_qkv_bias=args["add_qkv_bias"],
            tie_embeddings=not args["untie_embeddings_and_output_weights"],
            hidden_dropout=args["hidden_dropout"],
            attention_dropout=args["attention_dropout"],
            init_method_std=args["init_method_std"],
            make_vocab_size_divisible_by=args["make_vocab_size_divisible_by"],
            **{name: args[name] for name in RUNTIME_ARGS if name in args},
            **({name: args[name] for name in MOE_ARGS if name in args} if args.get("num_experts") else {}),
            **{name: args[name] for name in LONG_CONTEXT_FIELDS if name in args},  # older: defaults
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: its args describe no valid model: {' '.join(str(exc).split())}") from None


def config_from_args(
    args: Mapping[str, Any],
    vocab_size: Optional[int] = None,
    root: Optional[str] = None,
    where: str = "checkpoint",
) -> GPTConfig:
    """The GPTConfig a checkpoint's args describe; ``vocab_size`` overrides the resolved vocabulary."""
    if vocab_size is None:
        try:
            tokenizer = tokenizer_from_args(args, root)
        except ValueError as exc:
            raise ValueError(
                f"{where}: cannot determine the model's vocabulary size: its tokenizer does not load "
                f"({exc}); pass --true-vocab-size"
            ) from None
        vocab_size = model_vocab_size(args, tokenizer.vocab_size if tokenizer is not None else None)
        if vocab_size is None:
            raise ValueError(f"{where}: its args name no tokenizer and no vocab_size: pass --true-vocab-size")
    return model_config(args, vocab_size, where)
