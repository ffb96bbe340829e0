"""The pretraining loop behind ``pretrain_gpt.py``: set-up, train, evaluate, checkpoint.

Order of work, so that every user error is reported before anything heavy starts: parse and
validate flags (tokenizer vocabulary, batch sizes, layout, data files) -> process groups -> seeds
-> model chunks -> data-parallel buffers and optimizer -> checkpoint load -> datasets -> loop.

One iteration consumes one global batch: each DP rank runs ``num_microbatches`` micro-batches
through the pipeline engine, the loss being the mean over the unmasked tokens of the whole global
batch; gradients are summed over DP and the optimizer steps once.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megafast.arguments import (
    lora_config,
    model_config,
    model_vocab_size,
    parallel_config,
    parse_args,
    pipeline_split,
    qlora_config,
    split_data_paths,
    validate_args,
)
from megafast.checkpoint.args import long_context_mismatch
from megafast.config import GPTConfig
from megafast.data.mock_dataset import MockGPTDataset
from megafast.data.prefetch import InlineMicroBatchReader, MicroBatchPrefetcher
from megafast.data.sampler import MicroBatchSampler
from megafast.data.sft_dataset import build_sft_datasets
from megafast.data.tokenizer import build_tokenizer
from megafast.extras import require
from megafast.model.lora import apply_lora
from megafast.model.qlora import quantize_base_, quantized_bytes
from megafast.parallel.context_parallel import slice_microbatch
from megafast.parallel.state import ParallelState
from megafast.pipeline.engine import Microbatch, PipelineEngine
from megafast.pipeline.partition import build_model_chunks
from megafast.planner.flops import device_peak_tflops, training_flops_per_token
from megafast.training.checkpointing import Checkpointer, load_checkpoint
from megafast.training.data_parallel import DataParallel
from megafast.training.early_stopping import EarlyStopping
from megafast.training.hf_weights import HFExporter, check_pretrained_hf, is_hf_model_dir, load_pretrained_hf
from megafast.training.logging import IterationStats, Timer, TrainingLogger
from megafast.training.lr_schedule import LRScheduler, ScheduleSteps, megatron_schedule_steps
from megafast.training.moe_metrics import MoELossMeter
from megafast.training.optimizer import OptimizerConfig, build_optimizer
from megafast.training.task_loss import (
    SelfPacedWeights,
    TaskLossMeter,
    apply_equal_task_weighting,
    apply_task_weights,
    task_token_counts,
)


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

    args: argparse.Namespace
    state: ParallelState
    config: GPTConfig
    device: torch.device
    chunks: list
    ddp: DataParallel
    optimizer: object
    scheduler: LRScheduler
    engine: PipelineEngine
    logger: TrainingLogger
    checkpointer: Optional[Checkpointer]
    train_ds: object
    valid_ds: object
    task_names: list  # fine-tuning: the tasks of the SFT data, by global task id ([] for pretraining)
    iteration: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0
    test_ds: object = None  # --test-data-path: evaluated at the end of training
    samples_per_epoch: Optional[int] = None  # --train-epochs: training samples in one pass over the data
    early_stopping: Optional[EarlyStopping] = None


def _ensure_distributed_env() -> None:
    """``python pretrain_gpt.py`` without torchrun runs as a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _tokenizer_vocab(args: argparse.Namespace) -> tuple[Optional[int], Optional[int]]:
    """(vocabulary size, EOD id) of the tokenizer named by the flags, or (None, None)."""
    if args.tokenizer_type is None:
        return None, None
    try:
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                              args.vocab_size, args.null_tokenizer_eod_id)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return tok.vocab_size, tok.eod


def _samples_per_epoch(args: argparse.Namespace, eod: Optional[int], group) -> int:
    """``--train-epochs``: samples in one pass over the training data (every dataset of the blend)."""
    from megafast.data.builder import build_gpt_datasets, build_gpt_split_datasets, samples_per_epoch

    if args.mock_data:
        raise SystemExit("error: --train-epochs needs real data (--mock-data has no epochs): give --train-iters")
    paths = split_data_paths(args)
    once = [None, 0, 0]
    kw = dict(group=group)

    def one(prefix: str):
        if args.dataset_type == "sft":
            split_paths = [[prefix], None, None] if paths is not None else None
            return build_sft_datasets(None if paths is not None else [prefix], args.split, args.seq_length, once,
                                      args.seed, args.data_cache_path, packing=args.packing,
                                      split_paths=split_paths, **kw)[0][0]
        if paths is not None:
            return build_gpt_split_datasets([[prefix], None, None], args.seq_length, once, args.seed,
                                            args.data_cache_path, eod_mask_loss=args.eod_mask_loss,
                                            eod_token_id=eod, parquet_column=args.parquet_column, **kw)[0]
        return build_gpt_datasets([prefix], args.split, args.seq_length, once, args.seed, args.data_cache_path,
                                  eod_mask_loss=args.eod_mask_loss, eod_token_id=eod,
                                  parquet_column=args.parquet_column, **kw)[0]

    try:
        return samples_per_epoch(one, paths[0] if paths is not None else args.data_path)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None


def _check_parquet_dirs(args: argparse.Namespace, vocab_size: int) -> None:
    """Parquet directories among the data paths: files, column and id range from the footers, before
    any process group or model exists (megafast.data.parquet_dataset.check_parquet_dir)."""
    blends = [args.data_path, args.train_data_path, args.valid_data_path, args.test_data_path]
    paths = [p for blend in blends if blend for p in (blend[1::2] if len(blend) > 1 else blend)]
    if args.parquet_column is not None and not any(os.path.isdir(p) for p in paths):
        raise SystemExit(f"error: --parquet-column {args.parquet_column} names the token column of parquet "
                         "directories, but no data path is a directory: drop it, or give the directory")
    if args.mock_data or args.dataset_type == "sft" or not any(os.path.isdir(p) for p in paths):
        return
    from megafast.data.parquet_dataset import check_parquet_dir

    try:
        for path in dict.fromkeys(p for p in paths if os.path.isdir(p)):
            check_parquet_dir(path, args.parquet_column, vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _build_datasets(args: argparse.Namespace, vocab_size: int, eod: Optional[int], state: ParallelState):
    """(train, valid, test, task names): GPT/mock data (no tasks) or SFT data (``--dataset-type sft``);
    the test set only with ``--test-data-path`` (evaluated at the end)."""
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_iters > 0 else 0
    num_samples = [args.train_iters * gbs, evals * gbs, args.eval_iters * gbs]
    if args.mock_data:
        return MockGPTDataset(num_samples[0], args.seq_length, vocab_size, args.seed), (
            MockGPTDataset(num_samples[1], args.seq_length, vocab_size, args.seed + 1) if num_samples[1] else None
        ), None, []
    paths = split_data_paths(args)
    group = None if state.world_size == 1 else dist.group.WORLD
    if args.dataset_type == "sft":
        try:
            (train, valid, test), tasks = build_sft_datasets(
                None if paths is not None else args.data_path, args.split, args.seq_length, num_samples, args.seed,
                args.data_cache_path, packing=args.packing, group=group, split_paths=paths,
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if train is None:
            raise SystemExit("error: the training split is empty: give it a share in --split (e.g. 969,30,1)")
        return train, valid, test if paths is not None else None, tasks
    from megafast.data.builder import build_gpt_datasets, build_gpt_split_datasets

    try:
        if paths is not None:
            train, valid, test = build_gpt_split_datasets(
                paths, args.seq_length, num_samples, args.seed, args.data_cache_path,
                eod_mask_loss=args.eod_mask_loss, eod_token_id=eod, group=group,
                parquet_column=args.parquet_column, vocab_size=vocab_size)
        else:
            train, valid, test = build_gpt_datasets(
                args.data_path, args.split, args.seq_length, num_samples, args.seed, args.data_cache_path,
                eod_mask_loss=args.eod_mask_loss, eod_token_id=eod, group=group,
                parquet_column=args.parquet_column, vocab_size=vocab_size,
            )
            test = None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if train is None:
        raise SystemExit("error: the training split is empty: give it a share in --split (e.g. 969,30,1)")
    return train, valid, test, []


def _optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer, max_skipped_steps=args.max_skipped_steps,
        fused_optimizer=args.fused_optimizer,
        # Lion's betas are --adam-beta1/2 (Megatron has no Lion flags; the defaults become 0.9/0.99)
        **({"lion_beta1": args.adam_beta1, "lion_beta2": args.adam_beta2} if args.optimizer == "lion" else {}),
        optimizer_cpu_offload=args.optimizer_cpu_offload, optimizer_offload_fraction=args.optimizer_offload_fraction,
    )


def _scheduler(args: argparse.Namespace) -> LRScheduler:
    steps = megatron_schedule_steps(args.train_iters, args.lr_decay_iters, args.lr_warmup_iters,
                                    args.lr_warmup_fraction, args.lr_wsd_decay_iters, args.global_batch_size)
    if args.lr_decay_samples is not None or args.lr_warmup_samples:  # Megatron's sample-counted flags
        decay = steps.decay_steps if args.lr_decay_samples is None else args.lr_decay_samples
        warmup = (args.lr_warmup_fraction * decay if args.lr_warmup_fraction is not None
                  else args.lr_warmup_samples or steps.warmup_steps)
        steps = ScheduleSteps(warmup, decay, steps.wsd_decay_steps)
    return LRScheduler(args.lr, args.min_lr, steps.warmup_steps, steps.decay_steps, args.lr_decay_style,
                        steps.wsd_decay_steps, args.lr_wsd_decay_style)


def setup(argv: Optional[Sequence[str]] = None) -> Run:
    args = parse_args(argv)
    _ensure_distributed_env()
    tok_vocab, eod = _tokenizer_vocab(args)
    validate_args(args, int(os.environ["WORLD_SIZE"]), tok_vocab)
    vocab_size = model_vocab_size(args, tok_vocab)
    config = model_config(args, vocab_size)
    _check_parquet_dirs(args, vocab_size)
    hf_notes = check_pretrained_hf(args.pretrained_checkpoint, config)  # an HF start: config.json vs the flags

    try:  # pure configuration: fail here, before any process group exists (--train-epochs: after the data)
        opt_config = _optimizer_config(args)
        scheduler = _scheduler(args) if args.train_iters is not None else None
        if args.tensorboard_dir:
            require("tensorboard", "tensorboard", "--tensorboard-dir")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if args.profile and not use_cuda:
        raise SystemExit("error: --profile brackets iterations with cudaProfilerStart/Stop for Nsight Systems and "
                         "needs a CUDA device: drop it on CPU")
    backend = args.distributed_backend or ("nccl" if use_cuda else "gloo")  # --device cpu on a GPU host: gloo
    state = ParallelState.from_env(parallel_config(args), backend, args.distributed_timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    # Megatron's seeding: pipeline stages differ, TP and DP ranks share the default stream.
    _set_seeds(args.seed + 100 * state.pp_rank)
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)

    chunks = build_model_chunks(config, state, seed=args.seed, num_chunks=args.num_model_chunks,
                                method=args.pipeline_partition, params_dtype=dtype, device=device,
                                split=pipeline_split(args))
    lora = lora_config(args)
    if lora is not None:  # adapters on the TP layers, everything else frozen (before DP wraps them)
        for chunk in chunks:
            apply_lora(chunk, lora, args.seed)
    # context-parallel ranks are replicas for gradients, optimizer shards and checkpoints: DP x CP
    replicas = state.with_context_in_data()
    ddp = DataParallel(chunks, replicas, args.ddp_bucket_size_mb, args.use_distributed_optimizer,
                       args.overlap_grad_reduce, sharding_strategy=args.data_parallel_sharding_strategy)
    optimizer = build_optimizer(chunks, ddp, replicas, opt_config)
    logger = TrainingLogger(state.rank == state.world_size - 1, args.tensorboard_dir, args.log_jsonl)
    hf_exporter = (HFExporter(args.save, args.save_hf, state, args.max_checkpoints)
                   if args.save and args.save_hf else None)  # --save-hf: after each commit
    checkpointer = (Checkpointer(args.save, replicas, async_save=args.async_save, max_checkpoints=args.max_checkpoints,
                                 on_commit=hf_exporter)
                    if args.save else None)
    seq_local = args.seq_length // state.cp_size // (state.tp_size if state.sequence_parallel else 1)
    engine = PipelineEngine(chunks, state, (seq_local, args.micro_batch_size, config.hidden_size), dtype, device,
                            args.pipeline_schedule)
    samples_per_epoch = None
    if args.train_epochs is not None:
        samples_per_epoch = _samples_per_epoch(args, eod, None if state.world_size == 1 else dist.group.WORLD)
        if args.train_iters is None:  # --train-iters / --train-samples take precedence
            args.train_iters = max(1, math.ceil(args.train_epochs * samples_per_epoch / args.global_batch_size))
            logger.info(f"> --train-epochs {args.train_epochs:g}: {samples_per_epoch} samples per epoch, global batch "
                        f"{args.global_batch_size}: {args.train_iters} iterations")
        if scheduler is None:
            try:
                scheduler = _scheduler(args)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
    train_ds, valid_ds, test_ds, tasks = _build_datasets(args, vocab_size, eod, state)
    run = Run(args, state, config, device, chunks, ddp, optimizer, scheduler, engine, logger, checkpointer,
              train_ds, valid_ds, tasks, test_ds=test_ds, samples_per_epoch=samples_per_epoch)
    if args.early_stopping_patience is not None:
        run.early_stopping = EarlyStopping(args.early_stopping_patience, args.early_stopping_min_delta)
    if args.pretrained_checkpoint:
        _load_pretrained(run)
    for note in hf_notes or []:
        logger.info(f"note: --pretrained-checkpoint: {note}")
    if args.load:
        loaded = load_checkpoint(args.load, chunks, optimizer, scheduler, replicas, no_load_optim=args.no_load_optim,
                                 no_load_rng=args.no_load_rng, finetune=args.finetune,
                                 distributed_optimizer=args.use_distributed_optimizer,
                                 missing_ok=args.load == args.save, ddp=ddp)
        if loaded is None:
            logger.info(f"no committed checkpoint in {args.load}: starting from scratch")
        else:
            saved = loaded.args  # a LoRA run's checkpoint holds adapters only: its base must be loaded too
            mismatch = long_context_mismatch(saved, config)  # RoPE scaling / window / q/k norm
            if mismatch and not args.finetune:  # a resumed run must be the same model
                raise SystemExit(f"error: {loaded.path}: {mismatch}")
            if mismatch:  # fine-tuning may change them on purpose (context extension)
                logger.info(f"note: {mismatch.split(': pass')[0]}: fine-tuning with this run's setting")
            base = saved.get("pretrained_checkpoint") or (saved.get("load") if saved.get("finetune") else None)
            if saved.get("lora_rank") and base and not args.pretrained_checkpoint and (
                    os.path.realpath(base) != os.path.realpath(args.load)):
                raise SystemExit(f"error: {loaded.path} holds LoRA adapters of the base model {base}: "
                                 f"pass --pretrained-checkpoint {base}")
            if args.finetune or args.no_load_optim:
                optimizer.reload_model_params()
            run.iteration, run.consumed_samples = loaded.iteration, loaded.consumed_samples
            run.consumed_valid_samples = loaded.consumed_valid_samples
            if run.early_stopping is not None:  # continue counting evaluations without improvement
                run.early_stopping.load_state_dict(saved.get("early_stopping_state"))
                args.early_stopping_state = run.early_stopping.state_dict()
            logger.info(f"loaded checkpoint {loaded.path} at iteration {loaded.iteration}")
    qlora = qlora_config(args)
    if qlora is not None:  # quantize on load: the base weights are final once the checkpoints are read
        quantized = sum(quantize_base_(chunk, qlora, args.kernels) for chunk in chunks)
        mib = sum(quantized_bytes(c) for c in chunks) / 2**20
        logger.info(f"> QLoRA: {quantized:,} base weights of the LoRA layers in NF4 on the last rank, "
                    f"{mib:.1f} MiB ({qlora.bits_per_element:.3f} bits each)")
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if lora is not None:
        trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        logger.info(f"> LoRA rank {lora.rank} on {', '.join(lora.target_modules)}: {trainable:,} trainable "
                    f"parameters on the last rank, the other {n_params - trainable:,} frozen")
    cp_info = f", CP={state.cp_size} {state.cp_comm_type}" if state.cp_size > 1 else ""
    logger.info(f"> {state.world_size} ranks (TP={state.tp_size}, PP={state.pp_size}, DP={state.dp_size}{cp_info}); "
                f"parameters on the last rank: {n_params:,}; {args.num_microbatches} micro-batches per step")
    return run


def _load_pretrained(run: Run) -> None:
    """``--pretrained-checkpoint``: model weights only (the frozen base of a LoRA run, or a start point)."""
    path = run.args.pretrained_checkpoint
    if is_hf_model_dir(path):  # converted in memory to this run's layout (megafast.training.hf_weights)
        run.args.hf_metadata, _ = load_pretrained_hf(path, run.chunks, run.config, run.state, run.ddp)
        run.optimizer.reload_model_params()
        run.logger.info(f"loaded pretrained weights from the Hugging Face model {path}")
        return
    try:
        loaded = load_checkpoint(path, run.chunks, None, None, run.state.with_context_in_data(), finetune=True,
                                 ddp=run.ddp)
    except ValueError as e:
        raise SystemExit(f"error: --pretrained-checkpoint: {e}") from None
    if loaded is None:
        raise SystemExit(f"error: --pretrained-checkpoint {path} holds no committed checkpoint "
                         "(latest_checkpointed_iteration.txt): give a checkpoint directory")
    run.optimizer.reload_model_params()
    run.logger.info(f"loaded pretrained weights from {loaded.path}")


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
    """Samples -> one micro-batch of CPU tensors, each [b, s]. Position ids that are just 0..s-1 in
    every row are dropped (None): the model then uses its cached default positions, the same values
    without a per-step gather (packed samples keep theirs)."""
    batch: dict[str, Optional[torch.Tensor]] = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    pos = batch.get("position_ids")
    if pos is not None and torch.equal(pos, torch.arange(pos.shape[1], dtype=pos.dtype).expand_as(pos)):
        batch["position_ids"] = None
    return batch


def _as_microbatch(batch: dict[str, Optional[torch.Tensor]], state: ParallelState) -> Microbatch:
    """One micro-batch; with context parallelism, this CP rank's tokens of it (and their positions)."""
    mb = Microbatch(batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("position_ids"),
                    batch.get("segment_ids"), batch.get("task_ids"))
    return slice_microbatch(mb, state.cp_size, state.cp_rank)


def _microbatches(dataset, sampler: Iterator[list[int]], count: int, device: torch.device,
                  state: ParallelState) -> list[Microbatch]:
    """``count`` micro-batches read inline (evaluation; training reads through the prefetcher)."""
    out = []
    for _ in range(count):
        batch = _collate([dataset[i] for i in next(sampler)])
        out.append(_as_microbatch({k: None if t is None else t.to(device) for k, t in batch.items()}, state))
    return out


def _dp_sum_(t: torch.Tensor, run: Run) -> torch.Tensor:
    """``t`` summed over DP (x CP: every rank's share of the sequences) in place, on the device (no
    host synchronisation)."""
    group = run.state.with_context_in_data().dp_group
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def evaluate(run: Run) -> Optional[float]:
    """Mean lm loss over ``--eval-iters`` global batches of the validation split (continuing)."""
    args = run.args
    if run.valid_ds is None or args.eval_iters == 0:
        return None
    manual_gc = args.manual_gc and args.manual_gc_eval
    if manual_gc:  # Megatron's --manual-gc: collect everything before, evaluation's garbage after
        gc.collect()
    loss = _evaluate_dataset(run, run.valid_ds, run.consumed_valid_samples)
    if manual_gc:
        gc.collect(generation=0)
    run.consumed_valid_samples += args.eval_iters * args.global_batch_size
    return loss


def evaluate_test(run: Run) -> Optional[float]:
    """Mean lm loss over ``--eval-iters`` global batches of the test set, from its first sample."""
    if run.test_ds is None or run.args.eval_iters == 0:
        return None
    return _evaluate_dataset(run, run.test_ds, 0)


def _evaluate_dataset(run: Run, dataset, first_sample: int) -> float:
    """Token-mean lm loss of ``--eval-iters`` global batches of ``dataset`` from ``first_sample``."""
    args, state = run.args, run.state
    for c in run.chunks:
        c.eval()
    sampler = iter(MicroBatchSampler(len(dataset), first_sample, args.micro_batch_size,
                                     state.dp_rank, state.dp_size))
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # (loss sum, tokens), read once at the end
    for _ in range(args.eval_iters):
        mbs = _microbatches(dataset, sampler, args.num_microbatches, run.device, state)
        result = run.engine.run(mbs, 1.0, forward_only=True)
        totals += _dp_sum_(torch.stack([result.loss_sum, result.num_tokens]), run)
    for c in run.chunks:
        c.train()
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0)


class _SelfPacedSampler:
    """``--task-loss-weighting self-paced``: per-task mean losses of one validation global batch at a
    time, cycling through the validation set from its first sample (apart from ``evaluate``'s)."""

    def __init__(self, run: Run) -> None:
        if run.valid_ds is None:
            raise SystemExit("error: --task-loss-weighting self-paced needs a validation set: give the "
                             "validation split a share in --split or --valid-data-path")
        self.run, self.consumed = run, 0
        self.weights = SelfPacedWeights(len(run.task_names), run.args.self_paced_history_length,
                                        run.args.self_paced_scale_factor)

    def sample(self) -> None:
        run, args = self.run, self.run.args
        per_epoch = len(run.valid_ds) - len(run.valid_ds) % args.global_batch_size
        if per_epoch == 0:
            raise SystemExit(f"error: the validation set has fewer than --global-batch-size "
                             f"{args.global_batch_size} samples, which self-paced weighting needs")
        start = self.consumed % per_epoch
        sampler = iter(MicroBatchSampler(len(run.valid_ds), start, args.micro_batch_size,
                                         run.state.dp_rank, run.state.dp_size))
        for c in run.chunks:
            c.eval()
        mbs = _microbatches(run.valid_ds, sampler, args.num_microbatches, run.device, run.state)
        counts = _dp_sum_(task_token_counts(mbs, len(run.task_names)).to(run.device), run)
        result = run.engine.run(mbs, 1.0, forward_only=True, num_tasks=len(run.task_names))
        for c in run.chunks:
            c.train()
        sums = _dp_sum_(result.task_loss_sums.clone(), run)
        self.weights.add(torch.where(counts > 0, sums / counts.clamp_min(1.0), 0.0))
        self.consumed += args.global_batch_size


def _save(run: Run) -> None:
    if run.checkpointer is None:
        return
    lora = lora_config(run.args)  # a LoRA checkpoint holds the adapters only
    run.checkpointer.save(run.iteration, run.chunks, run.optimizer, run.scheduler,
                          consumed_samples=run.consumed_samples, args=vars(run.args),
                          consumed_valid_samples=run.consumed_valid_samples,
                          distributed_optimizer=run.args.use_distributed_optimizer,
                          lora=lora.to_dict() if lora is not None else None, ddp=run.ddp)
    run.logger.info(f"saved checkpoint at iteration {run.iteration} to {run.args.save}")


def train(run: Run) -> None:
    """The training loop. Host synchronisation, as Megatron's: the loss, its non-finite count and the
    per-task losses are reduced over DP and accumulated on the device every iteration, and read on
    the host only at ``--log-interval`` iterations; the optimizer reads the global gradient norm
    each step (it decides whether the step is skipped). A non-finite loss does not stop training:
    such iterations are counted ("number of nan iterations" in the log, from the device counter);
    non-finite gradients skip the step, and too many in a row end the run (optimizer.step)."""
    args = run.args
    sampler = iter(MicroBatchSampler(len(run.train_ds), run.consumed_samples, args.micro_batch_size,
                                     run.state.dp_rank, run.state.dp_size))
    # the next step's micro-batches are read, collated and pinned while this one runs
    if args.num_workers == 0:  # Megatron's --num-workers 0: read in the training loop's own thread
        prefetcher = InlineMicroBatchReader(run.train_ds, sampler, _collate, run.device)
    else:
        prefetcher = MicroBatchPrefetcher(run.train_ds, sampler, _collate, run.device,
                                          depth=args.num_microbatches + 1)
    if args.manual_gc:  # Megatron's --manual-gc: no threshold collections, collect at chosen points
        gc.disable()
        gc.collect()
    try:
        _train_loop(run, prefetcher)
    finally:
        prefetcher.close()
        if args.manual_gc:
            gc.enable()


def _train_loop(run: Run, prefetcher: MicroBatchPrefetcher | InlineMicroBatchReader) -> None:
    args, state = run.args, run.state
    gbs, seq = args.global_batch_size, args.seq_length
    total = args.train_iters * gbs
    flops_per_token = training_flops_per_token(run.config, seq, state.tp_size)  # model FLOPs (MFU numerator)
    peak = args.gpu_peak_tflops or device_peak_tflops(run.device, torch.bfloat16 if args.bf16 else torch.float32)
    timer, interval_iters = Timer(), 0
    interval_loss = torch.zeros((), dtype=torch.float64, device=run.device)  # sum of the interval's losses
    nan_iterations = torch.zeros((), dtype=torch.int64, device=run.device)  # since the start of this run
    num_tasks = len(run.task_names)
    task_meter = TaskLossMeter(run.task_names)
    moe_meter = MoELossMeter(run.chunks, run.config, state, run.device)  # router losses (MoE models)
    self_paced = _SelfPacedSampler(run) if args.task_loss_weighting == "self-paced" else None
    if self_paced is not None:
        self_paced.sample()  # MFTCoder samples once before the first step
    for c in run.chunks:
        c.train()
    start_time = time.time()  # --exit-duration-in-mins counts from here
    cuda = run.device.type == "cuda"
    while run.iteration < args.train_iters and run.consumed_samples < total:
        if args.profile and run.iteration == args.profile_step_start:  # Megatron's nsys window
            torch.cuda.cudart().cudaProfilerStart()
        mbs = [_as_microbatch(prefetcher.next(), state) for _ in range(args.num_microbatches)]
        task_counts = _dp_sum_(task_token_counts(mbs, num_tasks).to(run.device), run) if num_tasks else None
        if args.task_loss_weighting == "equal":  # the per-task weights make the loss mask sum to 1
            apply_equal_task_weighting(mbs, task_counts)
            denominator = torch.ones((), dtype=torch.float64, device=run.device)
        elif self_paced is not None:  # MFTCoder's self-paced task weights (megafast.training.task_loss)
            interval = args.self_paced_interval
            if run.iteration >= args.self_paced_history_length and run.iteration % interval == 0:
                self_paced.weights.update()
            apply_task_weights(mbs, task_counts.cpu(), self_paced.weights.weights)
            denominator = torch.ones((), dtype=torch.float64, device=run.device)
        else:  # unmasked tokens of the global batch, kept on the device
            local = sum(mb.loss_mask.sum() for mb in mbs).double().reshape(1)
            denominator = _dp_sum_(local, run)[0].clamp_min(1.0)
        run.optimizer.set_lr(run.scheduler.lr)
        run.ddp.set_last_microbatch(False)
        result = run.engine.run(mbs, denominator, loss_scale=run.optimizer.loss_scale,
                                before_last_backward=lambda c: run.ddp.set_last_microbatch(True, chunk=c),
                                num_tasks=num_tasks)
        if cuda and args.empty_unused_memory_level >= 1:
            torch.cuda.empty_cache()
        moe_meter.after_step()
        try:
            step = run.optimizer.step()
        except RuntimeError as e:  # too many non-finite steps in a row
            raise SystemExit(f"error: {e}") from None
        if cuda and args.empty_unused_memory_level >= 2:
            torch.cuda.empty_cache()
        if step.success:
            run.scheduler.step(gbs)
        run.iteration += 1
        run.consumed_samples += gbs
        if args.profile and run.iteration == args.profile_step_end:
            torch.cuda.cudart().cudaProfilerStop()
        if args.manual_gc and args.manual_gc_interval and run.iteration % args.manual_gc_interval == 0:
            gc.collect()
        loss = _dp_sum_(result.loss_sum.reshape(1).clone(), run)[0] / denominator
        if num_tasks:
            task_meter.add(_dp_sum_(result.task_loss_sums.clone(), run), task_counts)
        nan_iterations += ~torch.isfinite(loss)
        interval_loss += loss
        interval_iters += 1
        if run.checkpointer is not None:
            run.checkpointer.maybe_finalize()
        if self_paced is not None and run.iteration % args.self_paced_interval == 0:
            self_paced.sample()

        if run.iteration % args.log_interval == 0 or run.iteration == args.train_iters:
            lm_loss = interval_loss.item() / interval_iters  # the host reads (and waits) here only
            elapsed = timer.reset() / interval_iters
            tokens_per_sec = gbs * seq / elapsed
            tflops = flops_per_token * tokens_per_sec / state.world_size / 1e12
            run.logger.log_iteration(IterationStats(
                iteration=run.iteration, train_iters=args.train_iters, consumed_samples=run.consumed_samples,
                elapsed_ms=1000 * elapsed, tokens_per_sec=tokens_per_sec, tflops_per_gpu=tflops, mfu=tflops / peak,
                lr=run.optimizer.lr, global_batch_size=gbs, lm_loss=lm_loss,
                loss_scale=step.loss_scale, grad_norm=step.grad_norm if step.success else None,
                skipped_iterations=step.num_skipped, nan_iterations=int(nan_iterations.item()),
                task_losses=task_meter.means() if num_tasks else None,
                moe_losses=moe_meter.means() or None,
                tokens_per_expert=moe_meter.tokens_per_expert() or None,
                epoch=run.consumed_samples / run.samples_per_epoch if run.samples_per_epoch else None,
            ))
            interval_loss.zero_()
            interval_iters = 0
            task_meter.reset()
        stop = False
        if args.eval_interval and run.iteration % args.eval_interval == 0:
            val = evaluate(run)
            if val is not None:
                run.logger.log_validation(run.iteration, val)
                if run.early_stopping is not None:
                    stop = run.early_stopping.update(run.iteration, val)
                    args.early_stopping_state = run.early_stopping.state_dict()  # saved with the arguments
                    if stop:
                        run.logger.info(run.early_stopping.reason(run.iteration))
        if args.save_interval and run.iteration % args.save_interval == 0:
            _save(run)
        if stop or (args.exit_interval and run.iteration % args.exit_interval == 0):
            break
        if args.exit_duration_in_mins is not None and _past_duration(run, start_time):
            run.logger.info(f"exiting after {args.exit_duration_in_mins:g} minutes (--exit-duration-in-mins) at "
                            f"iteration {run.iteration}")
            break
    if args.save and (not args.save_interval or run.iteration % args.save_interval):
        _save(run)
    test = evaluate_test(run)
    if test is not None:
        run.logger.log_validation(run.iteration, test, split="test")


def _past_duration(run: Run, start_time: float) -> bool:
    """``--exit-duration-in-mins``: whether any rank has trained that long (so all stop together)."""
    done = torch.tensor([(time.time() - start_time) / 60.0 > run.args.exit_duration_in_mins], dtype=torch.int32,
                        device=run.device)
    if run.state.world_size > 1:
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
    return bool(done.item())


def pretrain(argv: Optional[Sequence[str]] = None) -> None:
    run = setup(argv)
    try:
        train(run)
    finally:
        if run.checkpointer is not None:
            run.checkpointer.close()
            if run.checkpointer.on_commit is not None:
                run.checkpointer.on_commit.close()
        run.logger.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
