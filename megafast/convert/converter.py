"""Checkpoint conversion: a loader yields full tensors group by group, a saver writes them.

    loader hf        -> HFSource        (hf_io.HFCheckpoint + the family's key map)
    loader megafast  -> MegafastSource  (megafast.checkpoint.reader.MegafastCheckpointReader)
    loader megatron  -> MegatronSource  (Megatron-LM's legacy or torch_dist format: megafast.checkpoint.megatron_*)
    saver megafast   -> MegafastSink    (megafast_checkpoint.MegafastCheckpointWriter at the target TP/PP/EP)
    saver hf         -> HFSink          (the family's key map + hf_io.SafetensorsShardWriter)
    saver megatron   -> MegatronSink    (Megatron-LM's legacy format at the target TP/PP, a release checkpoint)

megafast -> megafast is re-sharding (unshard every tensor, shard it for the new layout) with no
HF format in between. Groups (embedding, each layer, final) stream through one at a time under
a progress bar, so memory stays near one layer beyond the memory-mapped source files.

Every user error (unknown architecture, missing shard or tensor, shape mismatch, a layout that
cannot shard the model, a non-empty target directory) is a one-line ValueError, raised before
anything is written where it can be.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Optional, Union

import torch

from megafast.checkpoint import layout
from megafast.checkpoint.args import (
    HF_METADATA,
    TOKENIZER_DIR,
    args_from_config,
    model_args,
    precision_args,
    resolve_path,
)
from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.convert import hf_gpt2, hf_keymap, hf_llama, hf_moe
from megafast.convert.hf_io import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    HFCheckpoint,
    SafetensorsShardWriter,
    parse_size,
    write_json,
)
from megafast.convert.hf_tokenizer import copy_hf_tokenizer_files, export_tokenizer
from megafast.convert.megafast_checkpoint import MegafastCheckpointWriter

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES: tuple[ModuleType, ...] = (hf_llama, hf_gpt2, hf_moe)
LOADERS = SAVERS = ("hf", "megafast", "megatron")
TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")


@dataclass
class ConvertOptions:
    """What tools/checkpoint/convert.py asks for (Megatron's flag names, see its --help)."""

    loader: str
    saver: str
    load_dir: str
    save_dir: str
    target_tensor_parallel_size: Optional[int] = None  # default: the source's (1 from HF)
    target_pipeline_parallel_size: Optional[int] = None
    target_expert_parallel_size: Optional[int] = None  # default: the source's (1 from HF)
    target_params_dtype: Optional[str] = None  # fp32 / bf16 / fp16; default: the source's
    make_vocab_size_divisible_by: Optional[int] = None  # default: the source's (128 from HF)
    true_vocab_size: Optional[int] = None  # megafast source whose tokenizer is unavailable
    max_shard_size: str = "5GB"
    tokenizer_type: Optional[str] = None  # hf saver: overrides the checkpoint's tokenizer
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    source_transformer_impl: Optional[str] = None  # megatron loader: must be what the checkpoint was saved with


def architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.ARCHITECTURES]


def family_of(architecture: str) -> ModuleType:
    return next(f for f in FAMILIES if architecture in f.ARCHITECTURES)


def detect_architecture(hf_config: dict[str, Any], where: str) -> str:
    """The supported architecture named by config.json (``architectures``, else ``model_type``)."""
    named = list(hf_config.get("architectures") or [])
    for arch in named:
        if arch in architectures():
            return arch
    model_type = hf_config.get("model_type")
    if not named:
        for family in FAMILIES:
            for arch, kind in family.ARCHITECTURES.items():
                if kind == model_type:
                    return arch
    raise ValueError(
        f"{where}: architecture {named or model_type!r} is not supported; megafast converts "
        f"{', '.join(architectures())}"
    )


class HFSource:
    """An HF model directory as megafast groups (explicit key map + shape checks)."""

    def __init__(self, directory: str, make_vocab_size_divisible_by: Optional[int]) -> None:
        self.checkpoint = HFCheckpoint(directory)
        where = os.path.join(directory, CONFIG_FILE)
        arch = detect_architecture(self.checkpoint.config, where)
        self.family = family_of(arch)
        self.config, self.metadata = self.family.config_from_hf(
            self.checkpoint.config, arch, make_vocab_size_divisible_by or 128, where
        )
        if self.checkpoint.generation_config is not None:
            self.metadata["generation_config"] = self.checkpoint.generation_config
        names = self.checkpoint.names()
        self.rules = self.family.rule_groups(self.config, names)
        expected = {n for _, rules in self.rules for rule in rules for n in rule.hf}
        missing = sorted(expected - names)
        if missing:
            raise ValueError(
                f"{directory}: tensor {missing[0]} is missing from the weights ({len(missing)} missing): "
                f"the checkpoint is incomplete or not a {arch}"
            )
        unexpected = sorted(n for n in names - expected if not self.family.ignored(n, self.config))
        if unexpected:
            raise ValueError(
                f"{directory}: tensor {unexpected[0]} ({len(unexpected)} such) has no place in megafast's "
                f"{arch}: the checkpoint uses a feature megafast does not implement"
            )
        self.dtype = self.checkpoint.dtype(list(self.rules[0][1][0].hf))  # the word embeddings
        self.directory = directory

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        specs = dict(layout.groups(self.config))
        for label, rules in self.rules:
            yield (
                label,
                hf_keymap.import_group(rules, specs[label], self.checkpoint.get, self.config, self.directory),
            )


class MegafastSource:
    """A megafast checkpoint as groups of full tensors."""

    def __init__(self, directory: str, true_vocab_size: Optional[int]) -> None:
        self.reader = MegafastCheckpointReader(directory, true_vocab_size)
        self.config = self.reader.config
        self.metadata = dict(self.reader.args.get(HF_METADATA) or {})
        self.dtype = self.reader.dtype
        self.directory = directory

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        return self.reader.groups()


class MegatronSource:
    """A Megatron-LM checkpoint (legacy ``torch`` or ``torch_dist``) as groups of full tensors."""

    def __init__(
        self, directory: str, true_vocab_size: Optional[int], transformer_impl: Optional[str] = None
    ) -> None:
        from megafast.checkpoint.megatron_format import open_megatron_checkpoint

        self.reader = open_megatron_checkpoint(directory, true_vocab_size)
        saved = self.reader.args.get("transformer_impl")
        if transformer_impl is not None and saved is not None and saved != transformer_impl:
            raise ValueError(f"{directory} was saved with --transformer-impl {saved}, not "
                             f"--loader-transformer-impl {transformer_impl}: pass {saved} (or drop the flag)")
        self.config = self.reader.config
        self.metadata: dict[str, Any] = {}
        self.dtype = self.reader.dtype
        self.directory = directory

    def tokenizer(self) -> dict[str, Any]:
        """The run's tokenizer entries when its files exist here. A NullTokenizer is left out: the
        vocabulary size stays in the args (its EOD convention changed between Megatron versions)."""
        args = self.reader.args
        kind = args.get("tokenizer_type")
        paths = [args.get(k) for k in ("tokenizer_model", "vocab_file", "merge_file") if args.get(k)]
        if kind in (None, "NullTokenizer") or not all(os.path.exists(p) for p in paths):
            return {}
        return {k: args.get(k) for k in TOKENIZER_ARGS}

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        return self.reader.groups()


Source = Union[HFSource, MegafastSource, MegatronSource]


def _source_tokenizer(opts: ConvertOptions, source: Source) -> dict[str, Any]:
    """Tokenizer entries for a written checkpoint's args (HF files are copied into save_dir/tokenizer)."""
    if isinstance(source, MegatronSource):
        return source.tokenizer()
    if isinstance(source, MegafastSource):
        args = source.reader.args
        return {k: resolve_path(args.get(k), source.directory) if k != "tokenizer_type" else args.get(k)
                for k in TOKENIZER_ARGS if args.get(k) is not None}
    target = os.path.join(opts.save_dir, TOKENIZER_DIR)
    if copy_hf_tokenizer_files(source.directory, target):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER_DIR}
    return {}


class MegafastSink:
    """Writes the groups as a megafast checkpoint at (tp, pp)."""

    def __init__(
        self,
        opts: ConvertOptions,
        source: Source,
        config: GPTConfig,
        tp: int,
        pp: int,
        dtype: torch.dtype,
        ep: int = 1,
    ) -> None:
        if isinstance(source, MegafastSource):  # re-shard: keep the run's args, change model layout entries
            args = dict(source.reader.args)
            args.update(model_args(config, tp, pp))
            if args.get("tokenizer_type") == "NullTokenizer":  # vocab_size is now the model's: EOD V-1
                args.setdefault("null_tokenizer_eod_id", None)
            if opts.target_params_dtype:
                args.update(precision_args(dtype))
            iteration = None if source.reader.release else source.reader.iteration
            consumed = source.reader.consumed_samples
            tokenizer_src = os.path.join(source.directory, TOKENIZER_DIR)
            if os.path.isdir(tokenizer_src):
                shutil.copytree(tokenizer_src, os.path.join(opts.save_dir, TOKENIZER_DIR))
        else:
            tokenizer = _source_tokenizer(opts, source)
            args = args_from_config(
                config, tp, pp, params_dtype=dtype, tokenizer=tokenizer, hf_metadata=source.metadata
            )
            iteration, consumed = None, None
        self.writer = MegafastCheckpointWriter(
            opts.save_dir,
            config,
            tp,
            pp,
            args,
            params_dtype=dtype,
            iteration=iteration,
            consumed_samples=consumed,
            ep=ep,
        )
        self.progress = opts.progress

    def add_group(self, label: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.writer.add(name, tensor)

    def finish(self) -> str:
        return self.writer.commit(self.progress)

    def abort(self) -> None:
        self.writer.close()


def export_family(config: GPTConfig, metadata: dict[str, Any]) -> ModuleType:
    """The HF family a model exports as: the one it was converted from when it still fits, else the
    first that fits; ValueError when none does."""
    arch = metadata.get("architecture")
    fitting = [f for f in FAMILIES if f.architecture_for(config) is not None]
    if arch in architectures() and family_of(arch) in fitting:
        return family_of(arch)
    if fitting:
        return fitting[0]
    raise ValueError(
        "the model has no Hugging Face equivalent among "
        f"{', '.join(architectures())} (position embedding {config.position_embedding_type}, "
        f"{config.normalization}, {config.activation}): it cannot be exported"
    )


class MegatronSink:
    """Writes the groups as a Megatron-LM legacy (``torch`` format) release checkpoint at (tp, pp)."""

    def __init__(self, opts: ConvertOptions, source: Source, config: GPTConfig, tp: int, pp: int,
                 dtype: torch.dtype) -> None:
        from megafast.checkpoint.megatron_args import megatron_args_from_config
        from megafast.checkpoint.megatron_legacy import MegatronLegacyWriter

        tokenizer = _source_tokenizer(opts, source)
        model = tokenizer.get("tokenizer_model")
        if model and not os.path.isabs(model) and os.path.exists(os.path.join(opts.save_dir, model)):
            tokenizer["tokenizer_model"] = os.path.abspath(os.path.join(opts.save_dir, model))  # Megatron: a path
        args = megatron_args_from_config(config, tp, pp, params_dtype=dtype, tokenizer=tokenizer)
        self.writer = MegatronLegacyWriter(opts.save_dir, config, tp, pp, args, params_dtype=dtype)

    def add_group(self, label: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.writer.add(name, tensor)

    def finish(self) -> str:
        return self.writer.commit()

    def abort(self) -> None:
        self.writer.close()


class HFSink:
    """Writes the groups as an HF model directory (config, generation config, shards, tokenizer)."""

    def __init__(
        self, opts: ConvertOptions, source: MegafastSource | MegatronSource, config: GPTConfig, dtype: torch.dtype
    ) -> None:
        self.opts, self.source, self.config, self.dtype = opts, source, config, dtype
        self.family = export_family(config, source.metadata)
        self.hf_config = self.family.config_to_hf(config, source.metadata, dtype)  # raises if it cannot
        self.rules = dict(self.family.rule_groups(config))
        specs = hf_keymap.hf_specs(list(self.rules.items()), config)
        self.writer = SafetensorsShardWriter(opts.save_dir, specs, dtype, parse_size(opts.max_shard_size))
        for key, value in self._export_tokenizer().items():  # first: a tokenizer problem stops us early
            self.hf_config.setdefault(key, value)

    def _export_tokenizer(self) -> dict[str, int]:
        """The flags' tokenizer (when --tokenizer-type is given), else the checkpoint's, into save_dir."""
        opts, args, root = self.opts, self.source.reader.args, self.source.directory

        def path(flag: Optional[str], key: str) -> Optional[str]:
            return flag if flag or opts.tokenizer_type else resolve_path(args.get(key), root)

        return export_tokenizer(
            opts.tokenizer_type or args.get("tokenizer_type"),
            path(opts.tokenizer_model, "tokenizer_model"),
            path(opts.vocab_file, "vocab_file"),
            path(opts.merge_file, "merge_file"),
            opts.save_dir,
            self.config.max_position_embeddings,
        )

    def add_group(self, label: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in hf_keymap.export_group(self.rules[label], tensors, self.config).items():
            self.writer.write(name, tensor)

    def finish(self) -> str:
        self.writer.finish()
        opts = self.opts
        generation = self.source.metadata.get("generation_config") or {
            "_from_model_config": True,
            **{
                k: self.hf_config[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if self.hf_config.get(k) is not None
            },
        }
        write_json(os.path.join(opts.save_dir, GENERATION_CONFIG_FILE), generation)
        # config.json last: transformers sees a model directory only once it is complete
        write_json(os.path.join(opts.save_dir, CONFIG_FILE), self.hf_config)
        return opts.save_dir

    def abort(self) -> None:
        self.writer.abort()


def _check_target(opts: ConvertOptions) -> None:
    save, load = os.path.realpath(opts.save_dir), os.path.realpath(opts.load_dir)
    if save == load or load.startswith(save + os.sep):
        raise ValueError(
            f"--save-dir {opts.save_dir} must not be --load-dir or contain it: choose another directory"
        )
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save-dir {opts.save_dir} is a file: choose a directory")
    if os.path.isdir(save) and os.listdir(save) and not opts.overwrite:
        raise ValueError(
            f"--save-dir {opts.save_dir} is not empty: choose a new or empty directory, or pass --overwrite "
            "to replace its contents"
        )


def _clear_target(save_dir: str) -> None:
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            path = os.path.join(save_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(save_dir, exist_ok=True)


def convert_checkpoint(opts: ConvertOptions) -> str:
    """Run one conversion; returns the directory written (the iteration directory for megafast)."""
    from tqdm import tqdm

    if opts.loader not in LOADERS or opts.saver not in SAVERS:
        raise ValueError(
            f"--loader/--saver must be one of {', '.join(LOADERS)}, got {opts.loader}/{opts.saver}"
        )
    if opts.loader == "hf" and opts.saver == "hf":
        raise ValueError(
            "--loader hf --saver hf converts nothing: save to megafast, or load a megafast checkpoint"
        )
    if opts.target_params_dtype is not None and opts.target_params_dtype not in DTYPE_NAMES:
        raise ValueError(f"--target-params-dtype must be one of {', '.join(DTYPE_NAMES)}")
    _check_target(opts)
    if opts.loader == "hf":
        source: Source = HFSource(opts.load_dir, opts.make_vocab_size_divisible_by)
        default_tp = default_pp = default_ep = 1
    elif opts.loader == "megatron":
        source = MegatronSource(opts.load_dir, opts.true_vocab_size, opts.source_transformer_impl)
        default_tp, default_pp, default_ep = source.reader.tp, source.reader.pp, 1
    else:
        source = MegafastSource(opts.load_dir, opts.true_vocab_size)
        default_tp, default_pp, default_ep = source.reader.tp, source.reader.pp, source.reader.ep
    config = source.config
    if opts.make_vocab_size_divisible_by is not None:
        config = dataclasses.replace(config, make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by)
    dtype = DTYPE_NAMES[opts.target_params_dtype] if opts.target_params_dtype else source.dtype
    tp = opts.target_tensor_parallel_size or default_tp
    pp = opts.target_pipeline_parallel_size or default_pp
    ep = opts.target_expert_parallel_size or (default_ep if config.num_experts is not None else 1)
    if opts.saver == "megatron" and ep > 1:
        raise ValueError("--target-expert-parallel-size applies to --saver megafast; --saver megatron writes dense models")
    if opts.saver in ("megafast", "megatron"):
        validate_layout(config, ParallelConfig(tp, pp, expert_model_parallel_size=ep))
    elif max(opts.target_tensor_parallel_size or 1, opts.target_pipeline_parallel_size or 1,
             opts.target_expert_parallel_size or 1) > 1:
        raise ValueError(
            "--target-tensor/pipeline/expert-parallel-size apply to --saver megafast (TP/PP also to --saver "
            "megatron); HF checkpoints are unsharded"
        )
    _clear_target(opts.save_dir)
    if opts.saver == "megafast":
        sink: MegafastSink | MegatronSink | HFSink = MegafastSink(opts, source, config, tp, pp, dtype, ep)
    elif opts.saver == "megatron":
        sink = MegatronSink(opts, source, config, tp, pp, dtype)
    else:
        sink = HFSink(opts, source, config, dtype)
    try:
        groups = tqdm(
            source.groups(),
            total=config.num_layers + 2,
            desc=f"{opts.loader} -> {opts.saver}",
            unit="group",
            disable=not opts.progress,
        )
        for label, tensors in groups:
            sink.add_group(label, tensors)
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


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
    if config.is_moe:
        flags += moe_flags(config)
    return flags + long_context_flags(config)


def moe_flags(config: GPTConfig) -> list[str]:
    """The ``pretrain_gpt.py`` --moe-* flags that build ``config``'s experts."""
    flags = ["--num-experts", str(config.num_experts), "--moe-router-topk", str(config.moe_router_topk),
             "--moe-ffn-hidden-size", str(config.moe_ffn_hidden_size),
             "--moe-router-score-function", config.moe_router_score_function,
             "--moe-router-load-balancing-type", config.moe_router_load_balancing_type,
             "--moe-aux-loss-coeff", repr(config.moe_aux_loss_coeff)]
    freq = config.moe_layer_freq
    flags += ["--moe-layer-freq", str(freq) if isinstance(freq, int) else str(list(freq)).replace(" ", "")]
    if config.moe_z_loss_coeff is not None:
        flags += ["--moe-z-loss-coeff", repr(config.moe_z_loss_coeff)]
    if config.moe_shared_expert_intermediate_size:
        flags += ["--moe-shared-expert-intermediate-size", str(config.moe_shared_expert_intermediate_size)]
    if config.moe_shared_expert_gate:
        flags.append("--moe-shared-expert-gate")
    if config.moe_router_pre_softmax:
        flags.append("--moe-router-pre-softmax")
    if config.moe_expert_capacity_factor is not None:
        flags += ["--moe-expert-capacity-factor", repr(config.moe_expert_capacity_factor)]
    if config.moe_grouped_gemm:
        flags.append("--moe-grouped-gemm")
    return flags


def long_context_flags(config: GPTConfig) -> list[str]:
    """The RoPE scaling, sliding-window and q/k-norm flags of ``config`` (none for a plain model)."""
    flags = []
    if config.use_rope_scaling:
        flags += ["--use-rope-scaling", "--rope-scaling-type", config.rope_scaling_type,
                  "--rope-scaling-factor", repr(config.rope_scaling_factor),
                  "--rope-scaling-low-freq-factor", repr(config.rope_scaling_low_freq_factor),
                  "--rope-scaling-high-freq-factor", repr(config.rope_scaling_high_freq_factor),
                  "--rope-scaling-original-max-position-embeddings",
                  str(config.rope_scaling_original_max_position_embeddings),
                  "--yarn-beta-fast", repr(config.yarn_beta_fast),
                  "--yarn-beta-slow", repr(config.yarn_beta_slow)]
        if config.yarn_mscale is not None and config.yarn_mscale_all_dim is not None:  # one alone acts not
            flags += ["--yarn-mscale", repr(config.yarn_mscale), "--yarn-mscale-all-dim", repr(config.yarn_mscale_all_dim)]
        if config.yarn_attention_factor is not None:
            flags += ["--yarn-attention-factor", repr(config.yarn_attention_factor)]
        if not config.yarn_correction_range_round_to_int:
            flags.append("--no-yarn-correction-range-round-to-int")
    if config.window_size is not None:
        flags += ["--window-size", f"{config.window_size[0]},{config.window_size[1]}"]
    if config.qk_layernorm:
        flags.append("--qk-layernorm")
    return flags


def finetune_flags(checkpoint_dir: str) -> list[str]:
    """``pretrain_gpt.py`` flags that load a (converted) checkpoint to start a new run from it."""
    reader = MegafastCheckpointReader(checkpoint_dir)
    return [
        "--load",
        checkpoint_dir,
        "--finetune",
        "--tensor-model-parallel-size",
        str(reader.tp),
        "--pipeline-model-parallel-size",
        str(reader.pp),
        *model_flags(reader.config),
        "--vocab-size",
        str(reader.config.vocab_size),
    ]
