"""Megatron-compatible command line for pretrain_gpt.py, mapped onto the per-component configs.

Flag names, defaults and meanings follow Megatron-LM's ``arguments.py`` so that a Megatron user's
launch script runs with few changes. ``parse_args`` validates every cross-flag constraint that can
be checked without a process group (world size, batch sizes, layers vs stages, files) and raises
``SystemExit`` with one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megafast.config import (
    ATTENTION_BACKENDS,
    KERNEL_BACKENDS,
    LONG_CONTEXT_FIELDS,
    LORA_TARGET_MODULES,
    ROPE_BACKENDS,
    ROPE_SCALING_TYPES,
    GPTConfig,
    LoRAConfig,
    ParallelConfig,
    validate_layout,
)
from megafast.data.chat_template import parse_role_markers
from megafast.data.sft_format import sft_paths


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension; default hidden / heads")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximated GELU (GPT-2)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true", help="bias on the QKV projection only (Qwen2)")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: uniform = checkpoint groups of --recompute-num-layers layers "
                        "(default), block = checkpoint only the first --recompute-num-layers layers "
                        "of each pipeline stage (model chunk)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per checkpointed group (uniform) or checkpointed layers per stage (block); "
                        "default 1")
    g.add_argument("--kernels", choices=list(KERNEL_BACKENDS), default="auto",
                   help="fused norms, RoPE, activations, cross-entropy: auto = Triton on CUDA, torch on CPU")
    g.add_argument("--rope-kernel", choices=list(ROPE_BACKENDS), default="auto",
                   help="RoPE implementation; auto follows --kernels, cuda = megafast._C's CUDA kernel")
    g.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                   help="auto = flash-attn when installed (CUDA fp16/bf16) else torch SDPA; triton = our "
                        "Triton flash attention (needs --attention-dropout 0)")
    g.add_argument("--fused-linear-cross-entropy", action="store_true",
                   help="output layer + cross-entropy fused and chunked over tokens: the [tokens, vocab] "
                        "logits are never held in memory (Triton under --kernels; the loss is unchanged)")


def _window_size(text: str) -> tuple[int, int]:
    """Megatron's --window-size "LEFT,RIGHT" (or "(LEFT,RIGHT)"); a single LEFT means (LEFT, 0)."""
    try:
        values = tuple(int(v) for v in text.strip("()").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window-size {text!r}: give LEFT,0 such as 4095,0") from None
    return (values[0], 0) if len(values) == 1 else values


def _add_long_context(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long context (RoPE scaling, sliding window, q/k norm)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="scale RoPE frequencies (Megatron: llama3-style; see --rope-scaling-type)")
    g.add_argument("--rope-scaling-type", choices=list(ROPE_SCALING_TYPES), default="llama3",
                   help="llama3 (Llama 3.1+), linear (positions / factor) or yarn (with its attention "
                        "factor)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--rope-scaling-low-freq-factor", type=float, default=1.0, help="llama3")
    g.add_argument("--rope-scaling-high-freq-factor", type=float, default=4.0, help="llama3")
    g.add_argument("--rope-scaling-original-max-position-embeddings",
                   "--yarn-original-max-position-embeddings", dest="rope_scaling_original_max_position_embeddings", type=int, default=8192,
                   help="llama3 and yarn: the context length the model was pretrained with")
    g.add_argument("--yarn-beta-fast", type=float, default=32.0)
    g.add_argument("--yarn-beta-slow", type=float, default=1.0)
    g.add_argument("--yarn-mscale", type=float, default=None)
    g.add_argument("--yarn-mscale-all-dim", type=float, default=None)
    g.add_argument("--yarn-attention-factor", type=float, default=None,
                   help="cos/sin multiplier; default 0.1 ln(factor) + 1 (or from the mscales)")
    g.add_argument("--no-yarn-correction-range-round-to-int", dest="yarn_correction_range_round_to_int",
                   action="store_false",
                   help="yarn: do not floor/ceil the correction range (HF truncate=false)")
    g.add_argument("--window-size", type=_window_size, default=None,
                   help="sliding-window attention LEFT,0: token i attends to i-LEFT..i "
                        "(HF sliding_window W = W-1,0)")
    g.add_argument("--qk-layernorm", action="store_true", help="per-head norm of q and k before RoPE (Qwen3)")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--pipeline-partition", default="uniform",
                   help="'uniform', 'parameters', or layers per stage such as 3,4,4,3")
    g.add_argument("--pipeline-schedule", choices=["1f1b", "gpipe"], default="1f1b")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false")
    g.add_argument("--ddp-bucket-size-mb", type=float, default=25.0)
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo otherwise")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro batch x DP")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale; default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many consecutive steps with non-finite loss or gradients")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cuda when available")


def _add_optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam", "lion"], default="adam")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"],
                   default="exponential")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--fused-optimizer", choices=["auto", "torch", "cuda"], default="auto",
                   help="optimizer step: cuda = megafast._C's multi-tensor AdamW/Lion (fp32 masters and "
                        "states, bf16 weights written in the same pass); auto = cuda when built and on CUDA")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ...")
    g.add_argument("--split", default="969, 30, 1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true", help="random tokens instead of --data-path")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"])
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)


def _add_finetuning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (SFT data, packing, multi-task loss, LoRA)")
    g.add_argument("--dataset-type", choices=["gpt", "sft"], default="gpt",
                   help="gpt: pretraining documents; sft: tools/preprocess_data.py --dataset-type sft output "
                        "(loss only on answers)")
    g.add_argument("--packing", action="store_true",
                   help="sft: pack several samples into each --seq-length row, attention confined to each "
                        "sample and positions restarting per sample (default: one sample per row, padded)")
    g.add_argument("--task-loss-weighting", choices=["none", "equal"], default="none",
                   help="sft: none = mean over all answer tokens; equal = mean of the per-task mean losses "
                        "of each global batch (MFTCoder-style)")
    g.add_argument("--role-markers", default=None,
                   help="JSON chat role markers the data was made with (see tools/preprocess_data.py); "
                        "validated and recorded in the checkpoint's args for generation and export")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r; 0 (default) trains all weights")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale alpha (update = alpha/r * BA)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-target-modules", nargs="+", default=list(LORA_TARGET_MODULES),
                   help=f"layers that get adapters (default all: {' '.join(LORA_TARGET_MODULES)})")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="model weights to start from (model only, loaded before --load); with LoRA, the "
                        "frozen base a run's adapter checkpoints belong to")


def _add_checkpoint_and_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--async-save", action="store_true")
    g.add_argument("--max-checkpoints", type=int, default=None, help="keep only the newest K checkpoints")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-jsonl", default=None, help="one JSON object per logged iteration")
    g.add_argument("--gpu-peak-tflops", "--peak-tflops", dest="gpu_peak_tflops", type=float, default=None,
                   help="MFU denominator, TFLOP/s per GPU; default: the vendor peak of a known GPU "
                        "(megafast.planner.PEAK_BF16_TFLOPS, e.g. H100 bf16 989), else measured")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a GPT/Llama model with tensor, pipeline and data parallelism (Megatron flags).",
        allow_abbrev=False,
    )
    for add in (_add_model, _add_long_context, _add_parallel, _add_training, _add_optimizer, _add_data,
                _add_finetuning, _add_checkpoint_and_logging):
        add(p)
    return p


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    activation = "swiglu" if args.swiglu else ("gelu_tanh" if args.openai_gelu else "gelu")
    return GPTConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        normalization=args.normalization,
        norm_epsilon=args.norm_epsilon,
        activation=activation,
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        kernels=args.kernels,
        rope_kernel=args.rope_kernel,
        attention_backend=args.attention_backend,
        fused_linear_cross_entropy=args.fused_linear_cross_entropy,
        **{name: getattr(args, name) for name in LONG_CONTEXT_FIELDS},
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )


def model_vocab_size(args: argparse.Namespace, tokenizer_vocab: Optional[int]) -> int:
    """The model's (unpadded) vocabulary: the tokenizer's, or a larger ``--vocab-size``."""
    if tokenizer_vocab is None:
        return args.vocab_size
    if args.tokenizer_type == "NullTokenizer" or args.vocab_size is None:
        return tokenizer_vocab
    return max(args.vocab_size, tokenizer_vocab)


def lora_config(args: argparse.Namespace) -> Optional[LoRAConfig]:
    """The LoRA settings of the flags, or None when ``--lora-rank`` is 0."""
    if not args.lora_rank:
        return None
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_target_modules))


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _check_finetuning(args: argparse.Namespace) -> None:
    """Fine-tuning flags (after the data files were checked): SFT-only flags, SFT files, LoRA."""
    if args.dataset_type != "sft":
        weighting = args.task_loss_weighting != "none"
        for flag, on in (("--packing", args.packing), ("--task-loss-weighting equal", weighting)):
            if on:
                _fail(f"{flag} needs --dataset-type sft (data made by tools/preprocess_data.py --dataset-type sft)")
    elif args.mock_data:
        _fail("--mock-data makes pretraining samples: use --dataset-type gpt with it, or give SFT --data-path")
    else:
        for prefix in (args.data_path[1::2] if len(args.data_path) > 1 else args.data_path):
            paths = sft_paths(prefix)
            for path in (paths.loss_mask + ".idx", paths.task_ids + ".idx", paths.info):
                if not os.path.isfile(path):
                    _fail(f"{path} does not exist: --dataset-type sft needs data made by "
                          "tools/preprocess_data.py --dataset-type sft")
    if args.role_markers is not None:
        try:
            parse_role_markers(args.role_markers)
        except ValueError as e:
            _fail(str(e))
    if args.lora_rank < 0:
        _fail(f"--lora-rank must be >= 0, got {args.lora_rank}")
    try:
        lora_config(args)
    except ValueError as e:
        _fail(str(e))
    if args.pretrained_checkpoint is not None and not os.path.isdir(args.pretrained_checkpoint):
        _fail(f"--pretrained-checkpoint {args.pretrained_checkpoint} is not a directory: give a checkpoint directory")


def _check_data_files(args: argparse.Namespace) -> None:
    if args.mock_data:
        return
    if not args.data_path:
        _fail("no training data: give --data-path PREFIX (made by tools/preprocess_data.py) or --mock-data")
    paths = args.data_path
    if len(paths) > 1:
        if len(paths) % 2:
            _fail("--data-path with several datasets takes WEIGHT PREFIX pairs, e.g. --data-path 0.3 A 0.7 B")
        prefixes = paths[1::2]
    else:
        prefixes = paths
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                _fail(f"data file {prefix + ext} does not exist: check --data-path (give the prefix without .bin/.idx)")


def validate_args(args: argparse.Namespace, world_size: int, vocab_size: Optional[int] = None) -> None:
    """Cross-flag checks; sets derived values (dp size, global batch, virtual chunks, ...)."""
    try:
        pconf = parallel_config(args)
        args.data_parallel_size = pconf.data_parallel_size(world_size)
    except ValueError as e:
        _fail(str(e))
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.micro_batch_size < 1 or args.global_batch_size % (args.micro_batch_size * dp):
        _fail(
            f"global batch size {args.global_batch_size} is not a multiple of micro batch size "
            f"{args.micro_batch_size} x data-parallel size {dp}: change --global-batch-size or --micro-batch-size"
        )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if (args.train_iters is None) == (args.train_samples is None):
        _fail("give exactly one of --train-iters and --train-samples")
    if args.train_samples is not None:
        args.train_iters = args.train_samples // args.global_batch_size
    if args.train_iters < 1:
        _fail(f"training would run {args.train_iters} iterations: raise --train-iters/--train-samples")
    if args.lr is None:
        _fail("--lr is required")
    if args.bf16 and args.fp16:
        _fail("--bf16 and --fp16 are exclusive: choose one")
    if args.recompute_granularity != "full" and (args.recompute_method or args.recompute_num_layers):
        _fail("--recompute-method and --recompute-num-layers apply to full recomputation: "
              "add --recompute-granularity full or drop them")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > args.max_position_embeddings:
        _fail(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings} "
            "of the learned position embeddings: raise --max-position-embeddings"
        )
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        _fail(
            f"--seq-length {args.seq_length} is not divisible by the tensor parallel size "
            f"{args.tensor_model_parallel_size}, which sequence parallelism needs"
        )
    pp = args.pipeline_model_parallel_size
    args.num_model_chunks = 1
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        if pp < 2:
            _fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if per < 1 or args.num_layers % (per * pp):
            _fail(
                f"--num-layers {args.num_layers} is not divisible by --num-layers-per-virtual-pipeline-stage "
                f"{per} x pipeline size {pp}"
            )
        args.num_model_chunks = args.num_layers // (per * pp)
        if args.num_model_chunks > 1 and args.num_microbatches % pp:
            _fail(
                f"interleaved pipelining needs the number of microbatches ({args.num_microbatches}) to be a multiple "
                f"of the pipeline size {pp}: change --global-batch-size"
            )
    if pp * args.num_model_chunks > args.num_layers:
        _fail(f"{pp * args.num_model_chunks} pipeline stages exceed the {args.num_layers} layers: use fewer stages")
    if args.save_interval is not None and args.save_interval < 1:
        _fail("--save-interval must be >= 1")
    if args.mock_data and vocab_size is None and args.vocab_size is None:
        _fail("--mock-data needs --vocab-size (or a tokenizer)")
    null_tokenizer = args.tokenizer_type == "NullTokenizer"  # there --vocab-size defines the tokenizer
    if vocab_size is not None and args.vocab_size is not None and not null_tokenizer and args.vocab_size < vocab_size:
        _fail(
            f"the tokenizer has {vocab_size} tokens but --vocab-size is {args.vocab_size}: "
            f"raise --vocab-size to at least {vocab_size} or drop it"
        )
    _check_data_files(args)
    _check_finetuning(args)
    try:
        config = model_config(args, model_vocab_size(args, vocab_size))
        validate_layout(config, pconf, world_size)
    except ValueError as e:
        _fail(str(e))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
