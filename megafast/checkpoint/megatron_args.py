"""Megatron-LM's saved ``args`` (a pickled ``argparse.Namespace``) <-> megafast's GPTConfig.

Megatron-LM pickles the ``argparse.Namespace`` of its run into every checkpoint, with values that
are megatron-core objects (``AttnBackend`` and other enums). :func:`load_megatron_pickle` reads
such files without megatron-core installed: :class:`StandInUnpickler` replaces every class it
cannot import, and every class of Megatron's own packages (never imported: heavy, and not needed
for the weights), by an inert stand-in that keeps its constructor arguments and state.

:func:`config_from_megatron_args` maps the namespace onto a GPTConfig with Megatron's own names
and traps: the epsilon is ``layernorm_epsilon`` (the dest of ``--norm-epsilon``), biases are
``add_bias_linear``, GQA is ``group_query_attention`` + ``num_query_groups``, the head dim is
``kv_channels``, the tied output is ``untie_embeddings_and_output_weights``, and a GELU MLP with
biases and the default ``bias_gelu_fusion`` runs Megatron's fused tanh-approximated GELU.
``padded_vocab_size`` depends on the TP size of the run that saved it; the real vocabulary is
resolved separately (:func:`megatron_vocab_size`). Every value that would change the model and
that megafast does not implement is a one-line ValueError naming it (never a different model).

:func:`megatron_args_from_config` goes the other way, for ``--saver megatron``: a namespace with
the entries Megatron-LM's ``load_checkpoint`` and its model builder read.
"""

from __future__ import annotations

import argparse
import io
import pickle
import types
from typing import Any, Mapping, Optional

import torch

from megafast.config import GPTConfig


class StandIn:
    """An instance of a class that could not be imported while unpickling (e.g. a megatron-core enum).

    ``StandIn`` subclasses are named after the missing class; they keep what pickle hands them."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in getattr(self, "args", ()))
        return f"<{self.qualname}({inner})>"


STAND_IN_PACKAGES = ("megatron", "transformer_engine", "apex")  # stood in for even when installed


class StandInUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that stands in for classes it cannot import (one stand-in class each)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            if module.split(".")[0] in STAND_IN_PACKAGES:
                raise ImportError(module)  # never import them: heavy, and not needed to read weights
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in self.stand_ins:
                self.stand_ins[key] = type(name, (StandIn,), {"qualname": f"{module}.{name}"})
            return self.stand_ins[key]


# What torch.load accepts as ``pickle_module`` (it subclasses ``Unpickler`` for its own hooks).
STAND_IN_PICKLE = types.SimpleNamespace(
    __name__="megafast_stand_in_pickle",
    Unpickler=StandInUnpickler,
    load=lambda f, **kw: StandInUnpickler(f, **kw).load(),
)


def load_megatron_pickle(source: Any, mmap: bool = False) -> Any:
    """``torch.load`` of a Megatron file (a path or bytes), megatron-core classes stood in for."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=STAND_IN_PICKLE)


def args_dict(args: Any) -> dict[str, Any]:
    """A saved ``args`` entry (Namespace, or a dict from an older converter) as a dict."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, StandIn) and isinstance(getattr(args, "state", None), dict):
        return dict(args.state)
    raise ValueError(f"the checkpoint's args are a {type(args).__name__}, not Megatron's argparse.Namespace")


def is_megatron_args(args: Any) -> bool:
    """Megatron-LM saves a Namespace; megafast saves a dict."""
    return isinstance(args, argparse.Namespace)


# (arg, the value that means "off") for every Megatron feature megafast does not implement.
UNSUPPORTED_IF_SET: tuple[tuple[str, Any], ...] = (
    ("multi_latent_attention", False),
    ("apply_residual_connection_post_layernorm", False),
    ("rotary_interleaved", False),
    ("squared_relu", False),
    ("quick_geglu", False),
    ("use_rope_scaling", False),
    ("rotary_seq_len_interpolation_factor", None),
    ("window_size", None),
    ("softmax_scale", None),
    ("mtp_num_layers", None),
    ("heterogeneous_layers_config_path", None),
    ("experimental_attention_variant", None),
    ("hybrid_override_pattern", None),
    ("num_layers_per_virtual_pipeline_stage", None),
    ("virtual_pipeline_model_parallel_size", None),
    ("pipeline_model_parallel_layout", None),
    ("account_for_embedding_in_pipeline_split", False),
    ("account_for_loss_in_pipeline_split", False),
    ("embedding_multiplier_scale", None),
    ("no_rope_freq", None),
    ("mrope_section", None),
)
NONZERO_UNSUPPORTED = ("glu_linear_offset",)
# MoE args (read only when num_experts is set) that change the model and megafast does not implement.
MOE_UNSUPPORTED_IF_SET: tuple[tuple[str, Any], ...] = (
    ("moe_router_topk_scaling_factor", None),
    ("moe_router_num_groups", None),
    ("moe_router_group_topk", None),
    ("moe_router_enable_expert_bias", False),
    ("moe_input_jitter_eps", None),
    ("moe_latent_size", None),
    ("moe_apply_probs_on_input", False),
    ("moe_pad_expert_input_to_capacity", False),
    ("moe_mlp_glu_interleave_size", None),
    ("moe_shared_expert_glu_interleave_size", None),
    ("moe_use_upcycling", False),
    ("moe_router_force_load_balancing", False),
)


def moe_fields(args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """GPTConfig's MoE fields from Megatron's MoE args ({} for a dense model); unknown -> ValueError."""
    if args.get("num_experts") is None:
        return {}
    for name, off in MOE_UNSUPPORTED_IF_SET:
        value = args.get(name, off)
        if value != off and not (off is False and value is None) and not (off is None and value is False):
            raise ValueError(
                f"{where}: Megatron MoE arg {name}={value!r} is not supported by megafast's Megatron loader: "
                "it would change the model; convert a checkpoint without it"
            )
    if args.get("moe_token_drop_policy", "probs") != "probs" and args.get("moe_expert_capacity_factor") is not None:
        raise ValueError(f"{where}: Megatron MoE arg moe_token_drop_policy={args['moe_token_drop_policy']!r} "
                         "is not supported (megafast drops by probability)")
    freq = args.get("moe_layer_freq", 1)
    if isinstance(freq, str):
        raise ValueError(f"{where}: Megatron arg moe_layer_freq={freq!r} (a pattern string) is not supported")
    return dict(
        num_experts=int(args["num_experts"]),
        moe_router_topk=int(args.get("moe_router_topk", 2)),
        moe_ffn_hidden_size=args.get("moe_ffn_hidden_size"),
        moe_router_load_balancing_type=args.get("moe_router_load_balancing_type", "aux_loss"),
        moe_aux_loss_coeff=float(args.get("moe_aux_loss_coeff", 0.0) or 0.0),
        moe_z_loss_coeff=args.get("moe_z_loss_coeff"),
        moe_grouped_gemm=bool(args.get("moe_grouped_gemm", False)),
        moe_shared_expert_intermediate_size=args.get("moe_shared_expert_intermediate_size"),
        moe_shared_expert_gate=bool(args.get("moe_shared_expert_gate", False)),
        moe_router_score_function=args.get("moe_router_score_function", "softmax"),
        moe_router_pre_softmax=bool(args.get("moe_router_pre_softmax", False)),
        moe_expert_capacity_factor=args.get("moe_expert_capacity_factor"),
        moe_layer_freq=tuple(freq) if isinstance(freq, (list, tuple)) else int(freq),
    )  # moe_token_dispatcher_type is how tokens travel at EP > 1, not the model: the run's own flag


def _unsupported(args: Mapping[str, Any], where: str) -> None:
    for name, off in UNSUPPORTED_IF_SET:
        value = args.get(name, off)
        if value != off and not (off is False and value is None) and not (off is None and value is False):
            raise ValueError(
                f"{where}: Megatron arg {name}={value!r} is not supported by megafast's Megatron loader: "
                "it would change the model; convert a checkpoint without it"
            )
    for name in NONZERO_UNSUPPORTED:
        if args.get(name) not in (None, 0, 0.0):
            raise ValueError(f"{where}: Megatron arg {name}={args[name]!r} is not supported by megafast's loader")
    if args.get("rotary_percent", 1.0) != 1.0:
        raise ValueError(
            f"{where}: Megatron arg rotary_percent={args['rotary_percent']!r} (partial RoPE) is not supported"
        )


def _need(args: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in args:
        raise ValueError(f"{where}: its Megatron args lack {name}: not a Megatron-LM GPT checkpoint")
    return args[name]


def megatron_activation(args: Mapping[str, Any], where: str) -> str:
    """swiglu, gelu (exact) or gelu_tanh: Megatron's fused bias-GELU is the tanh approximation."""
    if args.get("swiglu"):
        return "swiglu"
    if args.get("openai_gelu"):
        return "gelu_tanh"
    if args.get("bias_gelu_fusion") and args.get("add_bias_linear", True):
        return "gelu_tanh"  # megatron.core.fusions.fused_bias_gelu: 0.5x(1 + tanh(0.798x(1 + 0.0447x^2)))
    return "gelu"


def megatron_layer_counts(args: Mapping[str, Any], pp: int, where: str) -> list[int]:
    """Layers of each pipeline stage (uniform, or Megatron's uneven first/last stage sizes)."""
    num_layers = int(_need(args, "num_layers", where))
    first, last = args.get("decoder_first_pipeline_num_layers"), args.get("decoder_last_pipeline_num_layers")
    counts: list[Optional[int]] = [None] * pp
    if pp > 1 and first is not None:
        counts[0] = first
    if pp > 1 and last is not None:
        counts[-1] = last
    rest = num_layers - sum(c for c in counts if c is not None)
    free = sum(c is None for c in counts)
    if free == 0 and rest == 0:
        return [int(c) for c in counts]  # type: ignore[arg-type]
    if free == 0 or rest % free or rest < 0:
        raise ValueError(f"{where}: {num_layers} layers do not split over {pp} pipeline stages as its args say")
    return [int(c) if c is not None else rest // free for c in counts]


def config_from_megatron_args(
    args: Mapping[str, Any], vocab_size: int, where: str = "Megatron checkpoint"
) -> GPTConfig:
    """The GPTConfig of the model that Megatron-LM's ``args`` build, with vocabulary ``vocab_size``."""
    _unsupported(args, where)
    position = args.get("position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope", "none"):
        raise ValueError(f"{where}: Megatron arg position_embedding_type={position!r} is not supported")
    normalization = args.get("normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"{where}: Megatron arg normalization={normalization!r} is not supported")
    heads = int(_need(args, "num_attention_heads", where))
    hidden = int(_need(args, "hidden_size", where))
    groups = args.get("num_query_groups") if args.get("group_query_attention") else None
    max_positions = args.get("max_position_embeddings") or args.get("seq_length")
    if max_positions is None:
        raise ValueError(f"{where}: its Megatron args hold neither max_position_embeddings nor seq_length")
    epsilon = args.get("layernorm_epsilon", args.get("norm_epsilon", 1e-5))
    add_bias = args.get("add_bias_linear", not args.get("disable_bias_linear", False))
    try:
        return GPTConfig(
            num_layers=int(_need(args, "num_layers", where)),
            hidden_size=hidden,
            num_attention_heads=heads,
            vocab_size=vocab_size,
            ffn_hidden_size=args.get("ffn_hidden_size") or 4 * hidden,
            num_query_groups=groups,
            kv_channels=args.get("kv_channels") or hidden // heads,
            max_position_embeddings=int(max_positions),
            position_embedding_type=position,
            rotary_base=float(args.get("rotary_base", 10000)),
            normalization=normalization,
            norm_epsilon=float(epsilon),
            activation=megatron_activation(args, where),
            add_bias_linear=bool(add_bias),
            add_qkv_bias=bool(args.get("add_qkv_bias", False)) and not add_bias,  # Megatron sets it with biases
            tie_embeddings=not args.get("untie_embeddings_and_output_weights", False),
            hidden_dropout=float(args.get("hidden_dropout", 0.1)),
            attention_dropout=float(args.get("attention_dropout", 0.1)),
            init_method_std=float(args.get("init_method_std", 0.02)),
            make_vocab_size_divisible_by=int(args.get("make_vocab_size_divisible_by", 128)),
            qk_layernorm=bool(args.get("qk_layernorm", False)),
            **moe_fields(args, where),
        )
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{where}: its Megatron args describe no valid model: {reason}") from None


def megatron_vocab_size(
    args: Mapping[str, Any], padded_rows: int, true_vocab_size: Optional[int], where: str
) -> int:
    """The real (unpadded) vocabulary of a Megatron checkpoint whose embedding has ``padded_rows``.

    ``--true-vocab-size`` first; then ``vocab_size`` (NullTokenizer: V tokens, end of document
    V - 1, megatron-core 0.19's convention; also set by ``--vocab-size``); then the tokenizer the
    args name, when it loads here; else the padded rows (the padding then stays in the vocabulary:
    same logits on every real token)."""
    vocab = true_vocab_size or args.get("vocab_size")
    if vocab is None and args.get("tokenizer_type"):
        from megafast.checkpoint.args import tokenizer_from_args

        try:
            tokenizer = tokenizer_from_args({**args, "vocab_size": None})
            vocab = tokenizer.vocab_size if tokenizer is not None else None
        except (ValueError, OSError):
            vocab = None
    vocab = int(vocab) if vocab is not None else padded_rows
    if vocab > padded_rows:
        raise ValueError(
            f"{where}: the vocabulary has {vocab} tokens but the embedding only {padded_rows} rows: "
            "pass the right --true-vocab-size"
        )
    return vocab


def megatron_args_from_config(
    config: GPTConfig,
    tp: int,
    pp: int,
    *,
    params_dtype: torch.dtype = torch.float32,
    tokenizer: Optional[Mapping[str, Any]] = None,
    iteration: int = 0,
) -> argparse.Namespace:
    """The ``args`` Namespace of a Megatron-LM checkpoint of ``config`` at (tp, pp): the names its
    ``load_checkpoint`` compares and its GPT model builder reads (megatron-core 0.19)."""
    padded = config.padded_vocab_size(tp)
    tokenizer = dict(tokenizer or {})
    ns = argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        kv_channels=config.kv_channels,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=config.max_position_embeddings,
        position_embedding_type=config.position_embedding_type,
        add_position_embedding=config.position_embedding_type == "learned_absolute",
        rotary_base=int(config.rotary_base) if float(config.rotary_base).is_integer() else config.rotary_base,
        rotary_percent=1.0,
        rotary_interleaved=False,
        normalization=config.normalization,
        layernorm_epsilon=config.norm_epsilon,
        swiglu=config.activation == "swiglu",
        openai_gelu=config.activation == "gelu_tanh",
        bias_gelu_fusion=False,  # the activation is openai_gelu's or exact GELU, never the fused one
        bias_swiglu_fusion=True,
        add_bias_linear=config.add_bias_linear,
        add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        untie_embeddings_and_output_weights=not config.tie_embeddings,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        padded_vocab_size=padded,
        vocab_size=tokenizer.pop("vocab_size", config.vocab_size),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=tp,  # Megatron's default: its experts split like the dense MLP
        **megatron_moe_args(config),
        apply_residual_connection_post_layernorm=False,
        transformer_impl="local",
        ckpt_format="torch",
        use_dist_ckpt=False,
        fp16=params_dtype == torch.float16,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        iteration=iteration,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        tokenizer_type=tokenizer.pop("tokenizer_type", None),
        tokenizer_model=tokenizer.pop("tokenizer_model", None),
        vocab_file=tokenizer.pop("vocab_file", None),
        merge_file=tokenizer.pop("merge_file", None),
    )
    return ns


def megatron_moe_args(config: GPTConfig) -> dict[str, Any]:
    """Megatron's MoE args of ``config`` (``num_experts=None`` for a dense model)."""
    if not config.is_moe:
        return {"num_experts": None}
    freq = config.moe_layer_freq
    return dict(
        num_experts=config.num_experts,
        moe_router_topk=config.moe_router_topk,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_router_load_balancing_type=config.moe_router_load_balancing_type,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        moe_z_loss_coeff=config.moe_z_loss_coeff,
        moe_grouped_gemm=False,  # written as SequentialMLP's local_experts (megafast.checkpoint.megatron_legacy)
        moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=config.moe_shared_expert_gate,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_expert_capacity_factor=config.moe_expert_capacity_factor,
        moe_layer_freq=list(freq) if isinstance(freq, tuple) else freq,
        moe_token_dispatcher_type=config.moe_token_dispatcher_type,
        moe_router_topk_scaling_factor=None,
        moe_router_dtype=None,
    )
