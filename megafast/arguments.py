"""Megatron-compatible command line for pretrain_gpt.py, mapped onto the per-component configs.

Flag names, defaults and meanings follow Megatron-LM's ``arguments.py`` so that a Megatron user's
launch script runs with few changes. ``parse_args`` validates every cross-flag constraint that can
be checked without a process group (world size, batch sizes, layers vs stages, files) and raises
``SystemExit`` with one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import ast
import os
from typing import Optional, Sequence

from megafast.arguments_megatron import add_megatron_flags, apply_megatron_flags
from megafast.config import (
    ATTENTION_BACKENDS,
    CP_COMM_TYPES,
    KERNEL_BACKENDS,
    LONG_CONTEXT_FIELDS,
    LORA_TARGET_MODULES,
    ROPE_BACKENDS,
    ROPE_SCALING_TYPES,
    GPTConfig,
    LoRAConfig,
    ParallelConfig,
    PipelineSplit,
    QLoRAConfig,
    validate_context_parallel,
    validate_layout,
)
from megafast.data.chat_template import parse_role_markers
from megafast.data.sft_format import sft_paths
from megafast.training.data_parallel import SHARDING_STRATEGIES, resolve_sharding_strategy


SAVE_HF_DEFAULT = "{save}/hf"  # --save-hf without a directory

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
    g.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS) + ["fused", "unfused", "local"], default="auto",
                   help="auto = flash-attn when installed (CUDA fp16/bf16) else torch SDPA; triton = our "
                        "Triton flash attention (needs --attention-dropout 0)")
    g.add_argument("--fused-linear-cross-entropy", action="store_true",
                   help="output layer + cross-entropy fused and chunked over tokens: the [tokens, vocab] "
                        "logits are never held in memory (Triton under --kernels; the loss is unchanged)")


def moe_layer_freq(text: str) -> int | tuple[int, ...]:
    """Megatron's --moe-layer-freq: an int N (layers 0, N, 2N, ... are MoE) or a Python list of
    0/1 per layer, literal or built with + and * (e.g. "[1,0,1,0]" or "([1]*3+[0])*2")."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError
    try:
        parsed = value(ast.parse(text.strip(), mode="eval").body)
        if isinstance(parsed, list) and all(isinstance(v, int) for v in parsed):
            return tuple(parsed)
        if isinstance(parsed, int):
            return parsed
    except (SyntaxError, ValueError, TypeError):
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither an int nor a list of 0/1 per layer such as [1,0,1,0] or ([1]*3+[0])*2"
    )


def _add_moe(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (megafast.model.moe)")
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer; default: a dense model")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="each expert's FFN size; default --ffn-hidden-size")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"], default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="all experts in one grouped GEMM (Triton on CUDA) instead of a loop over experts")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="gate the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k (weights not renormalised)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="cap each expert at ceil(tokens * topk / experts * factor) tokens, dropping the "
                        "lowest-probability ones; default: dropless")
    g.add_argument("--moe-layer-freq", type=moe_layer_freq, default=1,
                   help="int N: every Nth layer (0, N, ...) is MoE; or a list of 0/1 per layer, e.g. [1,0,1,0]")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="split each MoE layer's experts over this many data-parallel ranks (must divide the "
                        "data-parallel size and --num-experts); experts are replicated over TP")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather", "flex"], default="alltoall",
                   help="how tokens reach the experts of other expert-parallel ranks: all-to-all of the routed "
                        "tokens, or all-gather of every token + reduce-scatter of the outputs (flex: rejected, "
                        "it needs DeepEP)")


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
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split every sequence over this many ranks (long context); rank i holds chunks i "
                        "and 2C-1-i of 2C")
    g.add_argument("--cp-comm-type", choices=list(CP_COMM_TYPES), default="p2p",
                   help="p2p: ring attention (K/V around the CP ring); a2a: all-to-all over heads (Ulysses)")


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
    g.add_argument("--adam-beta1", type=float, default=None,
                   help="Adam beta1 (default 0.9); with --optimizer lion, Lion's beta1 (default 0.9)")
    g.add_argument("--adam-beta2", type=float, default=None,
                   help="Adam beta2 (default 0.999); with --optimizer lion, Lion's beta2 (default 0.99)")
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--fused-optimizer", choices=["auto", "torch", "cuda", "cpu"], default="auto",
                   help="optimizer step: cuda = megafast._C's multi-tensor AdamW/Lion (fp32 masters and "
                        "states, bf16 weights written in the same pass); cpu = megafast._C's two-pass AdamW "
                        "on CPU (torch's bits, half the memory traffic); auto = cuda on CUDA, cpu for AdamW "
                        "on CPU")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ...")
    g.add_argument("--split", default="969, 30, 1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true", help="random tokens instead of --data-path")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                            "Llama2Tokenizer", "GPTSentencePieceTokenizer"])
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--parquet-column", default=None,
                   help="a --data-path entry that is a directory of parquet files (as Spark writes them) is read "
                        "as is: this column holds each row's token ids (default: the one list<int> column)")


def _add_finetuning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (SFT data, packing, multi-task loss, LoRA)")
    g.add_argument("--dataset-type", choices=["gpt", "sft"], default="gpt",
                   help="gpt: pretraining documents; sft: tools/preprocess_data.py --dataset-type sft output "
                        "(loss only on answers)")
    g.add_argument("--packing", action="store_true",
                   help="sft: pack several samples into each --seq-length row, attention confined to each "
                        "sample and positions restarting per sample (default: one sample per row, padded)")
    g.add_argument("--task-loss-weighting", choices=["none", "equal", "self-paced"], default="none",
                   help="sft: none = mean over all answer tokens; equal = mean of the per-task mean losses "
                        "of each global batch (MFTCoder-style); self-paced = MFTCoder's self-paced weights "
                        "from the slopes of the per-task validation losses (megafast.training.task_loss)")
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
    g.add_argument("--qlora", action="store_true",
                   help="QLoRA: keep the frozen base weights of the LoRA layers in NF4 (4-bit NormalFloat, "
                        "~4.5 bits per weight), dequantized layer by layer on the fly; needs --lora-rank")
    g.add_argument("--qlora-block-size", type=int, default=64, help="elements per NF4 absmax block (QLoRA: 64)")
    g.add_argument("--qlora-double-quant", action="store_true",
                   help="QLoRA double quantization: the block absmax values in 8 bits too (~4.13 bits per weight)")


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
    g.add_argument("--save-hf", nargs="?", const=SAVE_HF_DEFAULT, default=None, metavar="DIR",
                   help="after each committed checkpoint also write Hugging Face weights (merged for LoRA) to "
                        "DIR/iter_NNNNNNN, DIR/latest linking the newest (DIR default: {save}/hf); "
                        "megafast.training.hf_weights")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-jsonl", default=None, help="one JSON object per logged iteration")
    g.add_argument("--gpu-peak-tflops", "--peak-tflops", dest="gpu_peak_tflops", type=float, default=None,
                   help="MFU denominator, TFLOP/s per GPU; default: the vendor peak of a known GPU "
                        "(megafast.planner.PEAK_BF16_TFLOPS, e.g. H100 bf16 989), else measured")


def _add_workflow(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training workflow (epochs, early stopping, separate eval sets, pipeline split)")
    g.add_argument("--train-epochs", type=float, default=None,
                   help="train for N passes over the training data: iterations = ceil(N x samples per epoch / "
                        "global batch); --train-iters / --train-samples take precedence when given")
    g.add_argument("--early-stopping-patience", type=int, default=None,
                   help="stop (and save) after K evaluations (--eval-interval) without the validation loss "
                        "improving by more than --early-stopping-min-delta")
    g.add_argument("--early-stopping-min-delta", type=float, default=0.0,
                   help="smallest decrease of the validation loss that counts as an improvement")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=None,
                       help=f"{split} data only (PREFIX, or WEIGHT PREFIX ...), instead of --data-path + --split"
                            + ("; evaluated at the end of training" if split == "test" else ""))
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="transformer layers on the first pipeline rank (the others share the rest evenly); "
                        "0 = the embedding alone")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="transformer layers on the last pipeline rank; 0 = the output layer alone")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="count the embedding as one layer when splitting layers over pipeline stages")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="count the output layer and loss as one layer when splitting layers over pipeline stages")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved pipelining: model chunks per pipeline rank (Megatron's; needed with "
                        "--decoder-first/last-pipeline-num-layers)")
    g.add_argument("--self-paced-history-length", type=int, default=100,
                   help="self-paced: validation losses kept per task to fit their slope; weights are equal "
                        "until this many steps are done")
    g.add_argument("--self-paced-interval", type=int, default=1,
                   help="self-paced: steps between validation samples (and weight updates)")
    g.add_argument("--self-paced-scale-factor", type=float, default=50.0,
                   help="self-paced: scale of the scores before the softmax that gives the weights")


def pipeline_split(args: argparse.Namespace) -> Optional[PipelineSplit]:
    """Megatron's uneven pipeline split flags, or None when none is given."""
    try:
        split = PipelineSplit(args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers,
                              args.account_for_embedding_in_pipeline_split, args.account_for_loss_in_pipeline_split)
    except ValueError as e:
        _fail(str(e))
    return split if split.active else None


def split_data_paths(args: argparse.Namespace) -> Optional[list]:
    """[train, valid, test] blends of --train/valid/test-data-path (None entries when absent), or None
    when the data comes from --data-path + --split."""
    paths = [args.train_data_path, args.valid_data_path, args.test_data_path]
    return paths if any(p is not None for p in paths) else None


def _check_blend(flag: str, paths: list) -> list:
    if not paths:
        _fail(f"{flag} needs a PREFIX (or WEIGHT PREFIX pairs)")
    if len(paths) > 1 and len(paths) % 2:
        _fail(f"{flag} with several datasets takes WEIGHT PREFIX pairs, e.g. {flag} 0.3 A 0.7 B")
    return paths[1::2] if len(paths) > 1 else paths


def _check_workflow(args: argparse.Namespace) -> None:
    """Epochs, early stopping, separate data paths, Lion betas, pipeline split (before the data checks)."""
    lion = args.optimizer == "lion"
    if args.adam_beta1 is None:
        args.adam_beta1 = 0.9
    if args.adam_beta2 is None:
        args.adam_beta2 = 0.99 if lion else 0.999
    if args.train_epochs is not None and args.train_epochs <= 0:
        _fail(f"--train-epochs must be > 0, got {args.train_epochs}")
    if args.early_stopping_patience is not None:
        if args.early_stopping_patience < 1:
            _fail(f"--early-stopping-patience must be >= 1, got {args.early_stopping_patience}")
        if not args.eval_interval or args.eval_iters < 1:
            _fail("--early-stopping-patience needs evaluations: set --eval-interval and --eval-iters >= 1")
    if args.early_stopping_min_delta < 0:
        _fail(f"--early-stopping-min-delta must be >= 0, got {args.early_stopping_min_delta}")
    paths = split_data_paths(args)
    if paths is not None:
        if args.data_path is not None or args.mock_data:
            _fail("--train/valid/test-data-path and --data-path (or --mock-data) exclude each other: give the "
                  "splits' files or one --data-path with --split")
        if args.split != "969, 30, 1":
            _fail("--split applies to --data-path: drop it with --train/valid/test-data-path")
        if args.train_data_path is None:
            _fail("--valid/test-data-path need --train-data-path too")
        for flag, blend in zip(("--train-data-path", "--valid-data-path", "--test-data-path"), paths):
            if blend is None:
                continue
            for prefix in _check_blend(flag, blend):
                if os.path.isdir(prefix) and args.dataset_type != "sft":  # parquet: checked when opened
                    continue
                for ext in (".bin", ".idx"):
                    if not os.path.isfile(prefix + ext):
                        _fail(f"data file {prefix + ext} does not exist: check {flag} (the prefix without .bin/.idx)")
                if args.dataset_type == "sft":
                    sft = sft_paths(prefix)
                    for path in (sft.loss_mask + ".idx", sft.task_ids + ".idx", sft.info):
                        if not os.path.isfile(path):
                            _fail(f"{path} does not exist: --dataset-type sft needs data made by "
                                  "tools/preprocess_data.py --dataset-type sft")
    if args.task_loss_weighting == "self-paced":
        if args.dataset_type != "sft":
            _fail("--task-loss-weighting self-paced needs --dataset-type sft")
        if args.self_paced_history_length < 2 or args.self_paced_interval < 1:
            _fail("--self-paced-history-length must be >= 2 and --self-paced-interval >= 1")
        if args.eval_iters < 1:
            _fail("--task-loss-weighting self-paced samples validation batches: set --eval-iters >= 1 and give "
                  "a validation set")


def _check_pipeline_split(args: argparse.Namespace) -> None:
    """Megatron's uneven split flags and --num-virtual-stages-per-pipeline-rank (sets num_model_chunks)."""
    split = pipeline_split(args)
    pp = args.pipeline_model_parallel_size
    vstages = args.num_virtual_stages_per_pipeline_rank
    if vstages is not None:
        if args.num_layers_per_virtual_pipeline_stage is not None:
            _fail("--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank exclude each "
                  "other: give one")
        if vstages < 1 or (vstages > 1 and pp < 2):
            _fail("--num-virtual-stages-per-pipeline-rank must be >= 1 and needs --pipeline-model-parallel-size > 1")
        args.num_model_chunks = vstages
        if vstages > 1 and args.num_microbatches % pp:
            _fail(f"interleaved pipelining needs the number of microbatches ({args.num_microbatches}) to be a "
                  f"multiple of the pipeline size {pp}: change --global-batch-size")
    if split is None:
        return
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if split.uneven:
            _fail("with --decoder-first/last-pipeline-num-layers give interleaving as "
                  "--num-virtual-stages-per-pipeline-rank (as Megatron asks)")
        per = args.num_layers_per_virtual_pipeline_stage
        blocks = args.num_layers + int(split.account_for_embedding) + int(split.account_for_loss)
        if per < 1 or blocks % (per * pp):
            _fail(f"{blocks} blocks (layers + embedding/loss) are not divisible by "
                  f"--num-layers-per-virtual-pipeline-stage {per} x pipeline size {pp}")
        args.num_model_chunks = blocks // (per * pp)
    if args.pipeline_partition == "parameters":
        _fail("--pipeline-partition parameters and the uneven split flags exclude each other")
    from megafast.pipeline.partition import split_layer_counts

    blocks_list = None
    if args.pipeline_partition != "uniform":
        try:
            blocks_list = [int(x) for x in args.pipeline_partition.split(",")]
        except ValueError:
            _fail(f"--pipeline-partition {args.pipeline_partition!r} is not 'uniform' or a list of counts")
    try:
        split_layer_counts(args.num_layers, pp, args.num_model_chunks, split, blocks_list)
    except ValueError as e:
        _fail(str(e))
    if args.num_model_chunks > 1 and args.num_microbatches % pp:
        _fail(f"interleaved pipelining needs the number of microbatches ({args.num_microbatches}) to be a multiple "
              f"of the pipeline size {pp}: change --global-batch-size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a GPT/Llama model with tensor, pipeline and data parallelism (Megatron flags).",
        allow_abbrev=False,
    )
    for add in (_add_model, _add_long_context, _add_parallel, _add_training, _add_optimizer, _add_data,
                _add_finetuning, _add_checkpoint_and_logging, _add_moe, _add_workflow):
        add(p)
    _add_sharding(p)
    add_megatron_flags(p)
    return p


def _add_sharding(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data-parallel sharding and optimizer offload")
    g.add_argument("--data-parallel-sharding-strategy", choices=list(SHARDING_STRATEGIES), default=None,
                   help="no_shard (plain DDP, the default), optim (ZeRO-1 = --use-distributed-optimizer), "
                        "optim_grads (ZeRO-2: gradients reduce-scattered), optim_grads_params (ZeRO-3: "
                        "parameters sharded too, gathered per layer)")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="fp32 master weights and optimizer states in host memory, the step on the CPU")
    g.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                   help="the share of the optimizer state offloaded with --optimizer-cpu-offload (0..1)")


def _validate_sharding(args: argparse.Namespace) -> None:
    """--data-parallel-sharding-strategy and its alias --use-distributed-optimizer (= optim)."""
    try:
        args.data_parallel_sharding_strategy = resolve_sharding_strategy(
            args.data_parallel_sharding_strategy, args.use_distributed_optimizer)
    except ValueError as e:
        _fail(str(e))
    args.use_distributed_optimizer = args.data_parallel_sharding_strategy != "no_shard"
    if not 0.0 <= args.optimizer_offload_fraction <= 1.0:
        _fail(f"--optimizer-offload-fraction must be in [0, 1], got {args.optimizer_offload_fraction}")


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    if (getattr(args, "yarn_mscale", None) is None) != (getattr(args, "yarn_mscale_all_dim", None) is None):
        _fail("--yarn-mscale and --yarn-mscale-all-dim act only together (YaRN's attention factor is "
              "mscale(factor, mscale) / mscale(factor, mscale_all_dim)): give both or neither")
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
        **moe_fields(args),
    )


def moe_fields(args: argparse.Namespace) -> dict:
    """The GPTConfig MoE fields of the --moe-* flags (none without --num-experts)."""
    if getattr(args, "num_experts", None) is None:
        return {}
    return dict(
        num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_layer_freq=args.moe_layer_freq,
        moe_token_dispatcher_type=getattr(args, "moe_token_dispatcher_type", "alltoall"),
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        cp_comm_type=args.cp_comm_type,
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
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


def qlora_config(args: argparse.Namespace) -> Optional[QLoRAConfig]:
    """The QLoRA settings of the flags, or None without ``--qlora``."""
    return QLoRAConfig.from_args(vars(args))


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
    elif args.data_path is not None:
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
    if (args.qlora or args.qlora_double_quant) and not args.lora_rank:
        _fail("--qlora quantizes the frozen base of a LoRA run: add --lora-rank R "
              "(and --qlora with --qlora-double-quant)")
    if args.qlora_double_quant and not args.qlora:
        _fail("--qlora-double-quant needs --qlora")
    try:
        qlora_config(args)
    except ValueError as e:
        _fail(str(e))
    if args.pretrained_checkpoint is not None and not os.path.isdir(args.pretrained_checkpoint):
        _fail(f"--pretrained-checkpoint {args.pretrained_checkpoint} is not a directory: give a checkpoint directory")


def _check_data_files(args: argparse.Namespace) -> None:
    if args.mock_data or split_data_paths(args) is not None:  # the split paths are checked by _check_workflow
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
        if os.path.isdir(prefix) and args.dataset_type != "sft":  # parquet: checked when opened
            continue
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
    _check_workflow(args)
    if args.train_iters is not None and args.train_samples is not None:
        _fail("give exactly one of --train-iters and --train-samples")
    if args.train_iters is None and args.train_samples is None and args.train_epochs is None:
        _fail("give one of --train-iters, --train-samples and --train-epochs")
    if args.train_samples is not None:
        args.train_iters = args.train_samples // args.global_batch_size
    # with only --train-epochs, train_iters stays None here: the trainer sets it from the data's size
    if args.train_iters is not None and args.train_iters < 1:
        _fail(f"training would run {args.train_iters} iterations: raise --train-iters/--train-samples")
    if args.lr is None:
        _fail("--lr is required")
    if args.bf16 and args.fp16:
        _fail("--bf16 and --fp16 are exclusive: choose one")
    _validate_sharding(args)
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
    if args.num_layers_per_virtual_pipeline_stage is not None and pipeline_split(args) is None:
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
    _check_pipeline_split(args)
    if pipeline_split(args) is None and pp * args.num_model_chunks > args.num_layers:
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
    _check_save_hf(args)
    try:
        config = model_config(args, model_vocab_size(args, vocab_size))
        validate_layout(config, pconf, world_size)
        validate_context_parallel(config, pconf, args.seq_length)
    except ValueError as e:
        _fail(str(e))


def _check_save_hf(args: argparse.Namespace) -> None:
    """--save-hf [DIR]: needs --save (the export follows each committed checkpoint); DIR defaults to {save}/hf."""
    if args.save_hf is None:
        return
    if not args.save:
        _fail("--save-hf writes HF weights after each committed checkpoint: add --save DIR")
    if args.save_hf == SAVE_HF_DEFAULT:
        args.save_hf = os.path.join(args.save, "hf")
    if os.path.realpath(args.save_hf) == os.path.realpath(args.save):
        _fail(f"--save-hf {args.save_hf} must differ from --save: give a directory of its own (default {{save}}/hf)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return apply_megatron_flags(build_parser().parse_args(argv))
