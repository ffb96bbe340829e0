"""Megatron-LM flags that megafast maps onto its own equivalent or rejects with the reason.

Every flag of Megatron-LM's example training scripts (``examples/gpt3``, ``examples/llama``,
``examples/mixtral`` at core_v0.19.0) is parsed by ``pretrain_gpt.py``: most have their Megatron
meaning in :mod:`megafast.arguments` and the trainer; the ones added here either

* are implemented by the trainer with Megatron's meaning (``--manual-gc``,
  ``--exit-duration-in-mins``, ``--empty-unused-memory-level``, ``--profile``,
  ``--lr-warmup-samples`` / ``--lr-decay-samples``, ``--no-position-embedding``),
* map to megafast's equivalent (:data:`MAPPED`: e.g. ``--use-flash-attn`` selects the flash
  attention backend, ``--attention-backend fused`` torch SDPA), or
* are rejected with one line saying why (:data:`REJECTED`: FP8 needs Transformer Engine, ...).

No flag is accepted and then ignored: a mapped flag states in :data:`MAPPED` which megafast
behaviour gives its meaning. :func:`apply_megatron_flags` runs right after parsing, before any
other validation.
"""

from __future__ import annotations

import argparse
from typing import Optional

# flag -> how megafast gives it Megatron's meaning (README "Flags and tokenizers" shows this table)
MAPPED = {
    "--use-mcore-models": "accepted: megafast's model is megatron-core's layout (mcore names, fused QKV); "
                          "deprecated and ignored by Megatron itself",
    "--transformer-impl": "transformer_engine and local accepted: megafast uses its own layers "
                          "(neither Transformer Engine nor Megatron's local ones), same maths and parameter names",
    "--use-flash-attn": "--attention-backend flash: the flash-attn package's kernels (it must be installed, as for "
                        "Megatron)",
    "--attention-backend": "auto/flash as Megatron; fused -> torch SDPA (cuDNN / FlashAttention kernels)",
    "--overlap-grad-reduce": "megafast's default: each bucket's gradient all-reduce starts when its "
                             "gradients are ready (--no-overlap-grad-reduce turns it off)",
    "--overlap-param-gather": "with --use-distributed-optimizer: the parameter all-gathers of every bucket are "
                              "issued asynchronously at once after the step",
    "--calculate-per-token-loss": "megafast's only loss: the sum over the global batch's unmasked tokens "
                                  "divided by their number",
    "--log-throughput": "always logged: tokens/s, TFLOP/s per GPU and MFU per logged iteration",
    "--cross-entropy-loss-fusion": "megafast's fused cross-entropy kernel (Triton under --kernels auto on CUDA)",
    "--no-create-attention-mask-in-dataloader": "megafast's data loader never builds attention masks "
                                                "(causal masking happens in the attention kernel)",
    "--no-masked-softmax-fusion": "megafast has no fused scale-mask-softmax kernel: attention is SDPA / "
                                  "flash / Triton flash attention",
    "--tiktoken-pattern": "accepted as in Megatron, where it only affects TikTokenizer (which megafast does "
                          "not have: any other --tokenizer-type ignores it there too)",
    "--num-workers": "0: micro-batches are read in the training loop's thread; N >= 1: in one background "
                     "prefetch thread that reads, collates and pins them (the .bin files are memory-mapped)",
    "--tokenizer-type Llama2Tokenizer": "SentencePieceTokenizer (megatron-core 0.19 builds it with the "
                                        "sentencepiece library, eod = eos_id)",
    "--vocab-file/--merge-file without --tokenizer-type": "GPT2BPETokenizer (Megatron's pretrain_gpt.py default)",
}

# flag -> the one-line reason it is rejected (and what to do instead)
REJECTED = {
    "--fp8-format": "FP8 training needs NVIDIA Transformer Engine, which megafast does not use: drop the "
                    "--fp8-* flags and train in --bf16",
    "--fp8-amax-history-len": "FP8 training needs NVIDIA Transformer Engine, which megafast does not use: drop "
                              "the --fp8-* flags and train in --bf16",
    "--fp8-amax-compute-algo": "FP8 training needs NVIDIA Transformer Engine, which megafast does not use: drop "
                               "the --fp8-* flags and train in --bf16",
    "--fp8-param-gather": "FP8 parameters need NVIDIA Transformer Engine, which megafast does not use: drop the "
                          "--fp8-* flags and train in --bf16",
    "--apply-layernorm-1p": "zero-centred norm weights (1 + gamma) are not implemented: drop it (norm weights are "
                            "stored and decayed as gamma)",
    "--decoupled-lr": "a separate learning rate for the embedding and output layer is not implemented: drop "
                      "--decoupled-lr/--decoupled-min-lr (every parameter follows --lr)",
    "--decoupled-min-lr": "a separate learning rate for the embedding and output layer is not implemented: drop "
                          "--decoupled-lr/--decoupled-min-lr (every parameter follows --lr)",
    "--grad-reduce-in-bf16": "gradients are accumulated and reduced in fp32 main-grad buffers; reducing them in "
                             "bf16 is not implemented: drop it",
    "--no-mmap-bin-files": "megafast always memory-maps the .bin files; reading them with file reads instead is "
                           "not implemented: drop it",
    "--rotary-percent": "partial rotary embeddings are not implemented: only --rotary-percent 1.0 (the whole "
                        "head dimension)",
    "--step-batch-size-schedule": "batch-size ramp-up schedules are not implemented: drop it and set "
                                  "--global-batch-size (Megatron 0.19 also refuses it together with "
                                  "--global-batch-size)",
    "--wandb-project": "Weights & Biases logging is not built in: use --tensorboard-dir or --log-jsonl",
    "--wandb-exp-name": "Weights & Biases logging is not built in: use --tensorboard-dir or --log-jsonl",
    "--ckpt-format": "megafast writes Megatron's legacy 'torch' layout (iter_N/mp_rank_TT_PPP/"
                     "model_optim_rng.pt, which Megatron-LM loads with --ckpt-format torch): use --ckpt-format "
                     "torch",
    "--moe-token-dispatcher-type flex": "the flex dispatcher needs DeepEP/HybridEP, which megafast does not use: "
                                        "use alltoall or allgather",
    "--attention-backend unfused/local": "megafast has no unfused attention path: use auto, flash, fused (torch "
                                         "SDPA) or triton",
    "--transformer-impl inference_optimized": "megafast has no inference-optimized layers: use local or "
                                              "transformer_engine (both mean megafast's own layers)",
}

# Megatron's --attention-backend values -> megafast's (None: rejected)
_ATTENTION_BACKENDS = {"auto": "auto", "flash": "flash", "fused": "sdpa", "unfused": None, "local": None,
                       "sdpa": "sdpa", "triton": "triton"}


def add_megatron_flags(p: argparse.ArgumentParser) -> None:
    """Megatron-LM example-script flags not defined in :mod:`megafast.arguments` (see the module doc)."""
    g = p.add_argument_group("Megatron-LM compatibility (mapped or rejected; README 'Coming from Megatron-LM')")
    g.add_argument("--use-mcore-models", action="store_true", help=MAPPED["--use-mcore-models"])
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local", "inference_optimized"],
                   default=None, help=MAPPED["--transformer-impl"])
    g.add_argument("--use-flash-attn", action="store_true", help=MAPPED["--use-flash-attn"])
    g.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true", default=True,
                   help=MAPPED["--overlap-grad-reduce"])
    g.add_argument("--overlap-param-gather", action="store_true", help=MAPPED["--overlap-param-gather"])
    g.add_argument("--calculate-per-token-loss", action="store_true", help=MAPPED["--calculate-per-token-loss"])
    g.add_argument("--log-throughput", action="store_true", help=MAPPED["--log-throughput"])
    g.add_argument("--cross-entropy-loss-fusion", action="store_true", help=MAPPED["--cross-entropy-loss-fusion"])
    g.add_argument("--no-create-attention-mask-in-dataloader", dest="create_attention_mask_in_dataloader",
                   action="store_false", help=MAPPED["--no-create-attention-mask-in-dataloader"])
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                   help=MAPPED["--no-masked-softmax-fusion"])
    g.add_argument("--tiktoken-pattern", choices=["v1", "v2"], default=None, help=MAPPED["--tiktoken-pattern"])
    g.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                   help="NullTokenizer's end-of-document id (megatron-core 0.19; default --vocab-size - 1)")
    g.add_argument("--num-workers", type=int, default=2, help=MAPPED["--num-workers"])
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="no position embedding: with learned_absolute positions the model gets none "
                        "(--position-embedding-type none); RoPE models are unaffected (Megatron's deprecated flag)")
    # implemented by the trainer (megafast.training.trainer)
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's threshold garbage collector (gc.disable) and collect at the start, "
                        "every --manual-gc-interval iterations and around evaluations")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: gc.collect() every N training iterations (0: only around evaluations)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection at the start and end of evaluations")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving a checkpoint with --save) after this many minutes of training")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="torch.cuda.empty_cache() after each forward/backward (1) and also after the optimizer "
                        "step (2); on CPU there is no cache to empty")
    g.add_argument("--profile", action="store_true",
                   help="bracket iterations [--profile-step-start, --profile-step-end) with cudaProfilerStart/Stop "
                        "for Nsight Systems (nsys profile -c cudaProfilerApi); needs CUDA")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--lr-warmup-samples", type=int, default=0,
                   help="linear warm-up over this many samples (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="decay over this many samples (instead of --lr-decay-iters; default: all training samples)")
    # rejected (REJECTED says why)
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None, help="rejected: " + REJECTED["--fp8-format"])
    g.add_argument("--fp8-amax-history-len", type=int, default=None, help="rejected (FP8)")
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default=None, help="rejected (FP8)")
    g.add_argument("--fp8-param-gather", action="store_true", help="rejected (FP8)")
    g.add_argument("--apply-layernorm-1p", action="store_true", help="rejected: " + REJECTED["--apply-layernorm-1p"])
    g.add_argument("--decoupled-lr", type=float, default=None, help="rejected: " + REJECTED["--decoupled-lr"])
    g.add_argument("--decoupled-min-lr", type=float, default=None, help="rejected (see --decoupled-lr)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true", help="rejected: " + REJECTED["--grad-reduce-in-bf16"])
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="rejected: " + REJECTED["--no-mmap-bin-files"])
    g.add_argument("--rotary-percent", type=float, default=1.0, help="only 1.0: " + REJECTED["--rotary-percent"])
    g.add_argument("--step-batch-size-schedule", default=None, help="rejected: " + REJECTED["--step-batch-size-schedule"])
    g.add_argument("--wandb-project", default=None, help="rejected: " + REJECTED["--wandb-project"])
    g.add_argument("--wandb-exp-name", default=None, help="rejected (see --wandb-project)")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"], default="torch",
                   help="only torch: " + REJECTED["--ckpt-format"])


def _reject(flag: str, key: Optional[str] = None) -> None:
    raise SystemExit(f"error: {flag}: {REJECTED[key or flag]}")


def apply_megatron_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Reject what megafast does not implement and map the rest onto megafast's own flags (in place)."""
    for flag in ("--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--decoupled-lr",
                 "--decoupled-min-lr", "--step-batch-size-schedule", "--wandb-project", "--wandb-exp-name"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            _reject(flag)
    for flag in ("--fp8-param-gather", "--apply-layernorm-1p", "--grad-reduce-in-bf16"):
        if getattr(args, flag[2:].replace("-", "_")):
            _reject(flag)
    if not args.mmap_bin_files:
        _reject("--no-mmap-bin-files")
    if args.rotary_percent != 1.0:
        _reject(f"--rotary-percent {args.rotary_percent:g}", "--rotary-percent")
    if args.ckpt_format != "torch":
        _reject(f"--ckpt-format {args.ckpt_format}", "--ckpt-format")
    if args.moe_token_dispatcher_type == "flex":
        _reject("--moe-token-dispatcher-type flex")
    if args.transformer_impl == "inference_optimized":
        _reject("--transformer-impl inference_optimized")

    backend = _ATTENTION_BACKENDS.get(args.attention_backend)
    if backend is None:
        _reject(f"--attention-backend {args.attention_backend}", "--attention-backend unfused/local")
    if args.use_flash_attn:
        if args.attention_backend not in ("auto", "flash"):
            raise SystemExit(f"error: --use-flash-attn selects the flash attention backend but --attention-backend "
                             f"is {args.attention_backend}: give one of them")
        backend = "flash"
    args.attention_backend = backend
    if args.cross_entropy_loss_fusion and args.kernels == "torch":
        raise SystemExit("error: --cross-entropy-loss-fusion asks for the fused cross-entropy kernel but --kernels "
                         "torch selects plain torch ops: drop one of them")
    if args.overlap_param_gather:
        if not args.use_distributed_optimizer and args.data_parallel_sharding_strategy in (None, "no_shard"):
            raise SystemExit("error: --overlap-param-gather overlaps the distributed optimizer's parameter "
                             "all-gather: add --use-distributed-optimizer (as Megatron requires)")
        if not args.overlap_grad_reduce:
            raise SystemExit("error: --overlap-param-gather needs overlapped gradient reduction: drop "
                             "--no-overlap-grad-reduce (Megatron requires --overlap-grad-reduce with it)")
    if args.num_workers < 0:
        raise SystemExit(f"error: --num-workers must be >= 0, got {args.num_workers}")
    if not args.add_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"
    if args.tokenizer_type == "Llama2Tokenizer":
        args.tokenizer_type = "SentencePieceTokenizer"
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"  # Megatron's pretrain_gpt.py default tokenizer
    if args.manual_gc_interval < 0:
        raise SystemExit(f"error: --manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise SystemExit(f"error: --exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        raise SystemExit(f"error: --profile-step-start {args.profile_step_start} must be >= 0 and below "
                         f"--profile-step-end {args.profile_step_end}")
    if args.lr_warmup_samples and (args.lr_warmup_iters or args.lr_warmup_fraction is not None):
        raise SystemExit("error: --lr-warmup-samples, --lr-warmup-iters and --lr-warmup-fraction exclude each "
                         "other: give one")
    if args.lr_decay_samples is not None and args.lr_decay_iters is not None:
        raise SystemExit("error: --lr-decay-samples and --lr-decay-iters exclude each other: give one")
    if args.lr_warmup_samples < 0 or (args.lr_decay_samples is not None and args.lr_decay_samples < 1):
        raise SystemExit("error: --lr-warmup-samples must be >= 0 and --lr-decay-samples >= 1")
    return args


__all__ = ["MAPPED", "REJECTED", "add_megatron_flags", "apply_megatron_flags"]
