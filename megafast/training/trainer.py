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
import os
import random
import socket
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
    validate_args,
)
from megafast.checkpoint.args import long_context_mismatch
from megafast.config import GPTConfig
from megafast.data.mock_dataset import MockGPTDataset
from megafast.data.prefetch import MicroBatchPrefetcher
from megafast.data.sampler import MicroBatchSampler
from megafast.data.sft_dataset import build_sft_datasets
from megafast.data.tokenizer import build_tokenizer
from megafast.extras import require
from megafast.model.lora import apply_lora
from megafast.parallel.state import ParallelState
from megafast.pipeline.engine import Microbatch, PipelineEngine
from megafast.pipeline.partition import build_model_chunks
from megafast.planner.flops import device_peak_tflops, training_flops_per_token
from megafast.training.checkpointing import Checkpointer, load_checkpoint
from megafast.training.data_parallel import DataParallel
from megafast.training.logging import IterationStats, Timer, TrainingLogger
from megafast.training.lr_schedule import LRScheduler, megatron_schedule_steps
from megafast.training.optimizer import OptimizerConfig, build_optimizer
from megafast.training.task_loss import TaskLossMeter, apply_equal_task_weighting, task_token_counts


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
                              args.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return tok.vocab_size, tok.eod


def _build_datasets(args: argparse.Namespace, vocab_size: int, eod: Optional[int], state: ParallelState):
    """(train, valid, task names): GPT/mock data (no tasks) or SFT data (``--dataset-type sft``)."""
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_iters > 0 else 0
    num_samples = [args.train_iters * gbs, evals * gbs, args.eval_iters * gbs]
    if args.mock_data:
        return MockGPTDataset(num_samples[0], args.seq_length, vocab_size, args.seed), (
            MockGPTDataset(num_samples[1], args.seq_length, vocab_size, args.seed + 1) if num_samples[1] else None
        ), []
    if args.dataset_type == "sft":
        try:
            (train, valid, _), tasks = build_sft_datasets(
                args.data_path, args.split, args.seq_length, num_samples, args.seed, args.data_cache_path,
                packing=args.packing, group=None if state.world_size == 1 else dist.group.WORLD,
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if train is None:
            raise SystemExit("error: the training split is empty: give it a share in --split (e.g. 969,30,1)")
        return train, valid, tasks
    from megafast.data.builder import build_gpt_datasets

    try:
        train, valid, _ = build_gpt_datasets(
            args.data_path, args.split, args.seq_length, num_samples, args.seed, args.data_cache_path,
            eod_mask_loss=args.eod_mask_loss, eod_token_id=eod,
            group=None if state.world_size == 1 else dist.group.WORLD,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if train is None:
        raise SystemExit("error: the training split is empty: give it a share in --split (e.g. 969,30,1)")
    return train, valid, []


def _optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer, max_skipped_steps=args.max_skipped_steps,
        fused_optimizer=args.fused_optimizer,
    )


def _scheduler(args: argparse.Namespace) -> LRScheduler:
    steps = megatron_schedule_steps(args.train_iters, args.lr_decay_iters, args.lr_warmup_iters,
                                    args.lr_warmup_fraction, args.lr_wsd_decay_iters, args.global_batch_size)
    return LRScheduler(args.lr, args.min_lr, steps.warmup_steps, steps.decay_steps, args.lr_decay_style,
                        steps.wsd_decay_steps, args.lr_wsd_decay_style)


def setup(argv: Optional[Sequence[str]] = None) -> Run:
    args = parse_args(argv)
    _ensure_distributed_env()
    tok_vocab, eod = _tokenizer_vocab(args)
    validate_args(args, int(os.environ["WORLD_SIZE"]), tok_vocab)
    vocab_size = model_vocab_size(args, tok_vocab)
    config = model_config(args, vocab_size)

    try:  # pure configuration: fail here, before any process group exists
        opt_config, scheduler = _optimizer_config(args), _scheduler(args)
        if args.tensorboard_dir:
            require("tensorboard", "tensorboard", "--tensorboard-dir")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    backend = args.distributed_backend or ("nccl" if use_cuda else "gloo")  # --device cpu on a GPU host: gloo
    state = ParallelState.from_env(parallel_config(args), backend, args.distributed_timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    # Megatron's seeding: pipeline stages differ, TP and DP ranks share the default stream.
    _set_seeds(args.seed + 100 * state.pp_rank)
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)

    chunks = build_model_chunks(config, state, seed=args.seed, num_chunks=args.num_model_chunks,
                                method=args.pipeline_partition, params_dtype=dtype, device=device)
    lora = lora_config(args)
    if lora is not None:  # adapters on the TP layers, everything else frozen (before DP wraps them)
        for chunk in chunks:
            apply_lora(chunk, lora, args.seed)
    ddp = DataParallel(chunks, state, args.ddp_bucket_size_mb, args.use_distributed_optimizer,
                       args.overlap_grad_reduce)
    optimizer = build_optimizer(chunks, ddp, state, opt_config)
    logger = TrainingLogger(state.rank == state.world_size - 1, args.tensorboard_dir, args.log_jsonl)
    checkpointer = (Checkpointer(args.save, state, async_save=args.async_save, max_checkpoints=args.max_checkpoints)
                    if args.save else None)
    seq_local = args.seq_length // (state.tp_size if state.sequence_parallel else 1)
    engine = PipelineEngine(chunks, state, (seq_local, args.micro_batch_size, config.hidden_size), dtype, device,
                            args.pipeline_schedule)
    run = Run(args, state, config, device, chunks, ddp, optimizer, scheduler, engine, logger, checkpointer,
              *_build_datasets(args, vocab_size, eod, state))
    if args.pretrained_checkpoint:
        _load_pretrained(run)
    if args.load:
        loaded = load_checkpoint(args.load, chunks, optimizer, scheduler, state, no_load_optim=args.no_load_optim,
                                 no_load_rng=args.no_load_rng, finetune=args.finetune,
                                 distributed_optimizer=args.use_distributed_optimizer,
                                 missing_ok=args.load == args.save)
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
            logger.info(f"loaded checkpoint {loaded.path} at iteration {loaded.iteration}")
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if lora is not None:
        trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        logger.info(f"> LoRA rank {lora.rank} on {', '.join(lora.target_modules)}: {trainable:,} trainable "
                    f"parameters on the last rank, the other {n_params - trainable:,} frozen")
    logger.info(f"> {state.world_size} ranks (TP={state.tp_size}, PP={state.pp_size}, DP={state.dp_size}); "
                f"parameters on the last rank: {n_params:,}; {args.num_microbatches} micro-batches per step")
    return run


def _load_pretrained(run: Run) -> None:
    """``--pretrained-checkpoint``: model weights only (the frozen base of a LoRA run, or a start point)."""
    path = run.args.pretrained_checkpoint
    try:
        loaded = load_checkpoint(path, run.chunks, None, None, run.state, finetune=True)
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


def _as_microbatch(batch: dict[str, Optional[torch.Tensor]]) -> Microbatch:
    return Microbatch(batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("position_ids"),
                      batch.get("segment_ids"), batch.get("task_ids"))


def _microbatches(dataset, sampler: Iterator[list[int]], count: int, device: torch.device) -> list[Microbatch]:
    """``count`` micro-batches read inline (evaluation; training reads through the prefetcher)."""
    out = []
    for _ in range(count):
        batch = _collate([dataset[i] for i in next(sampler)])
        out.append(_as_microbatch({k: None if t is None else t.to(device) for k, t in batch.items()}))
    return out


def _dp_sum_(t: torch.Tensor, run: Run) -> torch.Tensor:
    """``t`` summed over DP in place, on the device (no host synchronisation)."""
    if run.state.dp_group is not None:
        dist.all_reduce(t, group=run.state.dp_group)
    return t


def evaluate(run: Run) -> Optional[float]:
    """Mean lm loss over ``--eval-iters`` global batches of the validation split (continuing)."""
    args, state = run.args, run.state
    if run.valid_ds is None or args.eval_iters == 0:
        return None
    for c in run.chunks:
        c.eval()
    sampler = iter(MicroBatchSampler(len(run.valid_ds), run.consumed_valid_samples, args.micro_batch_size,
                                     state.dp_rank, state.dp_size))
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # (loss sum, tokens), read once at the end
    for _ in range(args.eval_iters):
        mbs = _microbatches(run.valid_ds, sampler, args.num_microbatches, run.device)
        result = run.engine.run(mbs, 1.0, forward_only=True)
        totals += _dp_sum_(torch.stack([result.loss_sum, result.num_tokens]), run)
        run.consumed_valid_samples += args.global_batch_size
    for c in run.chunks:
        c.train()
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0)


def _save(run: Run) -> None:
    if run.checkpointer is None:
        return
    lora = lora_config(run.args)  # a LoRA checkpoint holds the adapters only
    run.checkpointer.save(run.iteration, run.chunks, run.optimizer, run.scheduler,
                          consumed_samples=run.consumed_samples, args=vars(run.args),
                          consumed_valid_samples=run.consumed_valid_samples,
                          distributed_optimizer=run.args.use_distributed_optimizer,
                          lora=lora.to_dict() if lora is not None else None)
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
    prefetcher = MicroBatchPrefetcher(run.train_ds, sampler, _collate, run.device, depth=args.num_microbatches + 1)
    try:
        _train_loop(run, prefetcher)
    finally:
        prefetcher.close()


def _train_loop(run: Run, prefetcher: MicroBatchPrefetcher) -> None:
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
    for c in run.chunks:
        c.train()
    while run.iteration < args.train_iters and run.consumed_samples < total:
        mbs = [_as_microbatch(prefetcher.next()) for _ in range(args.num_microbatches)]
        task_counts = _dp_sum_(task_token_counts(mbs, num_tasks).to(run.device), run) if num_tasks else None
        if args.task_loss_weighting == "equal":  # the per-task weights make the loss mask sum to 1
            apply_equal_task_weighting(mbs, task_counts)
            denominator = torch.ones((), dtype=torch.float64, device=run.device)
        else:  # unmasked tokens of the global batch, kept on the device
            local = sum(mb.loss_mask.sum() for mb in mbs).double().reshape(1)
            denominator = _dp_sum_(local, run)[0].clamp_min(1.0)
        run.optimizer.set_lr(run.scheduler.lr)
        run.ddp.set_last_microbatch(False)
        result = run.engine.run(mbs, denominator, loss_scale=run.optimizer.loss_scale,
                                before_last_backward=lambda c: run.ddp.set_last_microbatch(True, chunk=c),
                                num_tasks=num_tasks)
        try:
            step = run.optimizer.step()
        except RuntimeError as e:  # too many non-finite steps in a row
            raise SystemExit(f"error: {e}") from None
        if step.success:
            run.scheduler.step(gbs)
        run.iteration += 1
        run.consumed_samples += gbs
        loss = _dp_sum_(result.loss_sum.reshape(1).clone(), run)[0] / denominator
        if num_tasks:
            task_meter.add(_dp_sum_(result.task_loss_sums.clone(), run), task_counts)
        nan_iterations += ~torch.isfinite(loss)
        interval_loss += loss
        interval_iters += 1
        if run.checkpointer is not None:
            run.checkpointer.maybe_finalize()

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
            ))
            interval_loss.zero_()
            interval_iters = 0
            task_meter.reset()
        if args.eval_interval and run.iteration % args.eval_interval == 0:
            val = evaluate(run)
            if val is not None:
                run.logger.log_validation(run.iteration, val)
        if args.save_interval and run.iteration % args.save_interval == 0:
            _save(run)
        if args.exit_interval and run.iteration % args.exit_interval == 0:
            break
    if args.save and (not args.save_interval or run.iteration % args.save_interval):
        _save(run)


def pretrain(argv: Optional[Sequence[str]] = None) -> None:
    run = setup(argv)
    try:
        train(run)
    finally:
        if run.checkpointer is not None:
            run.checkpointer.close()
        run.logger.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
