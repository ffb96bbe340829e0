"""The ``args`` dict of a megafast checkpoint: written from a GPTConfig, read back into one.

Checkpoints written by ``pretrain_gpt.py`` store ``vars(args)`` (Megatron's flag names); a
converted checkpoint stores the same dict, built by running megafast's own parser on the model
flags, so ``megafast.arguments.model_config`` rebuilds the identical GPTConfig from either.

The model's (unpadded) vocabulary is not always a flag: a training run takes it from its
tokenizer. :func:`config_from_args` therefore resolves it as the trainer does
(``model_vocab_size``): the tokenizer named in the args, when there is one, else ``vocab_size``.
Tokenizer paths that are relative are looked up next to the checkpoint too (converted checkpoints
keep their tokenizer in ``{checkpoint}/tokenizer``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch

from megafast.arguments import build_parser, model_config, model_vocab_size
from megafast.config import GPTConfig

TOKENIZER_DIR = "tokenizer"  # converted checkpoints' copy of the tokenizer files, next to the iterations
HF_METADATA = "hf_metadata"  # HF config fields megafast does not model (token ids, architecture name)

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _default_args(config_like: dict[str, Any]) -> argparse.Namespace:
    """megafast's parser defaults, with the required model flags filled in."""
    argv = [
        "--num-layers",
        str(config_like.get("num_layers") or 1),
        "--hidden-size",
        str(config_like.get("hidden_size") or 1),
        "--num-attention-heads",
        str(config_like.get("num_attention_heads") or 1),
        "--seq-length",
        str(config_like.get("seq_length") or config_like.get("max_position_embeddings") or 1),
        "--micro-batch-size",
        "1",
    ]
    return build_parser().parse_args(argv)


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
    """The ``args`` dict of a converted checkpoint with layout (tp, pp) holding ``config``:
    megafast's flag defaults, the model flags, precision, tokenizer (default none) and the HF
    fields megafast does not model."""
    args = vars(
        _default_args(
            {
                "num_layers": config.num_layers,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "max_position_embeddings": config.max_position_embeddings,
            }
        )
    )
    args.update(model_args(config, tp, pp), data_parallel_size=1, tokenizer_type=None, tokenizer_model=None)
    args.update(precision_args(params_dtype))
    if tokenizer:
        args.update(tokenizer)
    if hf_metadata:
        args[HF_METADATA] = dict(hf_metadata)
    if (
        config_from_args(args, config.vocab_size) != config
    ):  # internal invariant: the args describe this model
        raise AssertionError("converted checkpoint args do not rebuild the model config")
    return args


def resolve_path(path: Optional[str], root: Optional[str]) -> Optional[str]:
    """``path`` as given when it exists, else relative to the checkpoint directory ``root``."""
    if not path or os.path.exists(path) or root is None or os.path.isabs(path):
        return path
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def tokenizer_from_args(args: dict[str, Any], root: Optional[str] = None):
    """The tokenizer a checkpoint's args name (paths resolved next to ``root``), or None."""
    from megafast.data.tokenizer import build_tokenizer

    kind = args.get("tokenizer_type")
    if kind is None:
        return None
    return build_tokenizer(
        kind,
        resolve_path(args.get("tokenizer_model"), root),
        resolve_path(args.get("vocab_file"), root),
        resolve_path(args.get("merge_file"), root),
        args.get("vocab_size"),
    )


def config_from_args(
    args: dict[str, Any],
    vocab_size: Optional[int] = None,
    root: Optional[str] = None,
    where: str = "checkpoint",
) -> GPTConfig:
    """The GPTConfig a checkpoint's args describe; ``vocab_size`` overrides the resolved vocabulary."""
    ns = _default_args(args)
    for key, value in args.items():
        setattr(ns, key, value)
    if ns.max_position_embeddings is None:
        ns.max_position_embeddings = ns.seq_length
    if vocab_size is None:
        try:
            tokenizer = tokenizer_from_args(args, root)
        except ValueError as exc:
            raise ValueError(
                f"{where}: cannot determine the model's vocabulary size: its tokenizer does not load "
                f"({exc}); pass --true-vocab-size"
            ) from None
        vocab_size = model_vocab_size(ns, tokenizer.vocab_size if tokenizer is not None else None)
        if vocab_size is None:
            raise ValueError(f"{where}: its args name no tokenizer and no vocab_size: pass --true-vocab-size")
    return model_config(ns, vocab_size)


def model_flags(config: GPTConfig) -> list[str]:
    """The ``pretrain_gpt.py`` model flags that build ``config`` (for ``--load DIR --finetune``)."""
    flags = [
        "--num-layers",
        str(config.num_layers),
        "--hidden-size",
        str(config.hidden_size),
        "--num-attention-heads",
        str(config.num_attention_heads),
        "--ffn-hidden-size",
        str(config.ffn_hidden_size),
        "--kv-channels",
        str(config.kv_channels),
        "--max-position-embeddings",
        str(config.max_position_embeddings),
        "--position-embedding-type",
        config.position_embedding_type,
        "--normalization",
        config.normalization,
        "--norm-epsilon",
        repr(config.norm_epsilon),
        "--make-vocab-size-divisible-by",
        str(config.make_vocab_size_divisible_by),
        "--attention-dropout",
        repr(config.attention_dropout),
        "--hidden-dropout",
        repr(config.hidden_dropout),
        "--init-method-std",
        repr(config.init_method_std),
    ]
    if config.num_query_groups != config.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(config.num_query_groups)]
    if config.position_embedding_type == "rope":
        flags += ["--rotary-base", repr(config.rotary_base)]
    flags += {"swiglu": ["--swiglu"], "gelu_tanh": ["--openai-gelu"], "gelu": []}[config.activation]
    if not config.tie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if not config.add_bias_linear:
        flags.append("--disable-bias-linear")
    if config.add_qkv_bias:
        flags.append("--add-qkv-bias")
    return flags
