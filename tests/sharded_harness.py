"""A tiny in-process training loop over megafast's own pieces (model chunks, DataParallel, optimizer,
pipeline engine) for the sharded data-parallel tests: the same global batches at any layout, so a
sharded run can be compared with a ``no_shard`` one, and its tensors measured.

``step`` returns (loss of the global batch, global grad norm); the loss is only meaningful on the
last pipeline stage (other stages return 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megafast.config import GPTConfig, LoRAConfig
from megafast.model.lora import apply_lora
from megafast.parallel import ParallelState
from megafast.pipeline.engine import Microbatch, PipelineEngine
from megafast.pipeline.partition import build_model_chunks
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer import OptimizerConfig, build_optimizer

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 67, 8, 8, 1
# Adam's eps large enough that fp32 reduction-order noise in near-zero gradients stays noise, and a
# clip threshold below the gradient norm so that clipping (by the global norm) acts every step.
OPTIM = dict(lr=1e-2, weight_decay=0.1, adam_eps=1e-3, clip_grad=0.3)


def gpt_config(recompute: bool = False, tie: bool = False, **kw) -> GPTConfig:
    return GPTConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=VOCAB, max_position_embeddings=SEQ, make_vocab_size_divisible_by=1, init_method_std=0.05,
        position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        tie_embeddings=tie, recompute_granularity="full" if recompute else None, **kw,
    )


@dataclass
class Run:
    state: ParallelState
    config: GPTConfig
    chunks: list
    ddp: DataParallel
    opt: object
    engine: PipelineEngine
    dtype: torch.dtype


def build(
    state: ParallelState,
    strategy: str,
    *,
    seed: int,
    num_chunks: int = 1,
    recompute: bool = False,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    offload: Optional[float] = None,
    lora: bool = False,
    bucket_mb: Optional[float] = 0.004,
) -> Run:
    config = gpt_config(recompute, tie)
    chunks = build_model_chunks(config, state, seed=seed, num_chunks=num_chunks, params_dtype=dtype)
    if lora:
        for c in chunks:
            apply_lora(c, LoRAConfig(rank=4, alpha=8.0), seed)
    ddp = DataParallel(chunks, state, bucket_mb, sharding_strategy=strategy)
    cfg = OptimizerConfig(**OPTIM, use_distributed_optimizer=strategy != "no_shard", bf16=dtype == torch.bfloat16,
                          optimizer_cpu_offload=offload is not None,
                          optimizer_offload_fraction=1.0 if offload is None else offload)
    opt = build_optimizer(chunks, ddp, state, cfg)
    engine = PipelineEngine(chunks, state, (SEQ, MICRO_BATCH, config.hidden_size), dtype, torch.device("cpu"))
    return Run(state, config, chunks, ddp, opt, engine, dtype)


def global_batch(data_seed: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(data_seed * 1000 + iteration)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.1).float()
    return ids, labels, mask


def step(run: Run, data_seed: int, iteration: int) -> tuple[float, float]:
    """One global batch (this DP rank's share), one optimizer step."""
    st = run.state
    ids, labels, mask = global_batch(data_seed, iteration)
    per = GLOBAL_BATCH // st.dp_size
    rows = slice(st.dp_rank * per, (st.dp_rank + 1) * per)
    mbs = [Microbatch(t, y, m) for t, y, m in zip(ids[rows].split(MICRO_BATCH), labels[rows].split(MICRO_BATCH),
                                                   mask[rows].split(MICRO_BATCH))]
    denom = float(mask.sum())
    run.ddp.set_last_microbatch(False)
    result = run.engine.run(mbs, denom, before_last_backward=lambda c: run.ddp.set_last_microbatch(True, chunk=c))
    res = run.opt.step()
    loss = result.loss_sum.clone().reshape(1)
    if st.dp_group is not None:
        dist.all_reduce(loss, group=st.dp_group)
    return float(loss) / denom, res.grad_norm


def train(run: Run, data_seed: int, start: int, stop: int) -> list[tuple[float, float]]:
    return [step(run, data_seed, i) for i in range(start, stop)]


def tensor_bytes(run: Run) -> dict[str, int]:
    """Bytes of the allocated tensors of this rank's training state, by kind (each storage once):
    parameters (model weights, ZeRO-1/2 parameter buffers, ZeRO-3 shards and any gathered units),
    gradients (fp32 gradient buffers or shards) and optimizer (non-aliased fp32 masters and
    optimizer states)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        return total

    grads = size(b.grad_data for b in run.ddp.buffers)
    params = size([p for c in run.chunks for p in c.parameters()] + [b.param_data for b in run.ddp.buffers]
                  + [b.param_shards for b in run.ddp.buffers])
    states = [t for st in run.opt.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    optim = size([s.master for s in run.opt.shards if not s.alias] + [t for t in states if t.dim() > 0])
    return {"params": params, "grads": grads, "optimizer": optim}
