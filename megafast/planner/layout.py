"""How a run is laid out (parallel sizes, micro-batching, recompute, precision, sharding) and which
model chunks each pipeline rank holds under that layout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

from megafast.config import (
    GPTConfig,
    ParallelConfig,
    Recompute,
    RecomputeMethod,
    validate_context_parallel,
    validate_layout,
)
from megafast.pipeline.partition import partition_layers

DType = Literal["bf16", "fp16", "fp32"]
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# megafast.training.data_parallel.SHARDING_STRATEGIES (ZeRO stage = index; test_sharded_data_parallel checks they agree)
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclass(frozen=True)
class Layout:
    """How one run is laid out: parallel sizes, micro-batching, recompute, precision, sharding.

    ``num_microbatches`` is per DP rank per step, so the global batch is
    ``micro_batch_size * num_microbatches * dp`` sequences of ``seq_length`` tokens.
    ``num_model_chunks`` > 1 is interleaved pipelining (virtual stages); ``partition`` is
    ``--pipeline-partition``; ``bucket_size_mb`` is ``--ddp-bucket-size-mb`` (None: one bucket).
    ``cp`` is ``--context-parallel-size`` (each rank holds ``seq_length / cp`` tokens of every
    sequence; ``cp_comm_type`` 'p2p' ring attention or 'a2a' all-to-all).
    ``ep`` is ``--expert-model-parallel-size`` (MoE: the experts split over ``ep`` of the DP ranks)
    and ``moe_token_dispatcher_type`` its ``--moe-token-dispatcher-type`` (megafast.planner.moe).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    seq_length: int = 2048
    num_model_chunks: int = 1
    sequence_parallel: bool = False
    recompute: Recompute = None
    recompute_method: RecomputeMethod = "uniform"  # full recompute only (megafast.model.recompute)
    recompute_num_layers: int = 1
    distributed_optimizer: bool = False
    dtype: DType = "bf16"
    optimizer: Literal["adam", "lion"] = "adam"
    partition: Union[str, tuple[int, ...]] = "uniform"
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    bucket_size_mb: Optional[float] = 25.0
    # --data-parallel-sharding-strategy (None: "optim" with distributed_optimizer, else "no_shard"; any
    # sharded strategy implies distributed_optimizer) and --optimizer-offload-fraction (0: no offload)
    sharding_strategy: Optional[str] = None
    optimizer_offload_fraction: float = 0.0
    cp: int = 1
    cp_comm_type: Literal["p2p", "a2a"] = "p2p"
    ep: int = 1
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"

    def __post_init__(self) -> None:
        positive = ("tp", "pp", "dp", "micro_batch_size", "num_microbatches", "seq_length", "num_model_chunks", "cp",
                    "ep")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use bf16, fp16 or fp32")
        if self.optimizer not in ("adam", "lion"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use adam or lion")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"unknown recompute {self.recompute!r}: use None, 'selective' or 'full'")
        if self.recompute_method not in ("uniform", "block") or self.recompute_num_layers < 1:
            raise ValueError(
                f"bad recompute method {self.recompute_method!r} x {self.recompute_num_layers} layers: "
                "use 'uniform' or 'block' with >= 1 layers"
            )
        if self.num_model_chunks > 1 and self.pp < 2:
            raise ValueError("interleaved pipelining (num_model_chunks > 1) needs pp > 1")
        if self.sequence_parallel and self.tp == 1:
            object.__setattr__(self, "sequence_parallel", False)  # as ParallelConfig: nothing to shard
        strategy = self.sharding_strategy or ("optim" if self.distributed_optimizer else "no_shard")
        if strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"unknown sharding strategy {strategy!r}: use one of {', '.join(SHARDING_STRATEGIES)}")
        if self.sharding_strategy == "no_shard" and self.distributed_optimizer:
            raise ValueError("distributed_optimizer contradicts sharding_strategy no_shard: drop one")
        object.__setattr__(self, "sharding_strategy", strategy)
        object.__setattr__(self, "distributed_optimizer", strategy != "no_shard")
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ValueError(f"unknown token dispatcher {self.moe_token_dispatcher_type!r}: use alltoall or allgather")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(f"optimizer offload fraction must be in [0, 1], got {self.optimizer_offload_fraction}")

    @property
    def zero_stage(self) -> int:
        """0 (no_shard), 1 (optim), 2 (optim_grads) or 3 (optim_grads_params); 0-1 only shard with dp > 1."""
        return SHARDING_STRATEGIES.index(self.sharding_strategy) if self.dp > 1 else 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size: the ranks holding the same experts (DP x CP / EP)."""
        return self.dp * self.cp // self.ep

    @property
    def local_seq_length(self) -> int:
        """Tokens of each sequence on one rank (context parallelism splits the sequence)."""
        return self.seq_length // self.cp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def check(self, config: GPTConfig) -> None:
        """Raise ValueError (one line) when ``config`` cannot be laid out this way."""
        parallel = ParallelConfig(self.tp, self.pp, self.sequence_parallel, self.cp, self.cp_comm_type)
        validate_layout(config, parallel)
        validate_context_parallel(config, parallel, self.seq_length)
        if self.ep > 1 and not config.is_moe:
            raise ValueError(f"expert parallelism {self.ep} needs an MoE model (--num-experts)")
        if self.ep > 1 and (self.dp % self.ep or config.num_experts % self.ep):
            raise ValueError(
                f"EP {self.ep} must divide DP {self.dp} and the {config.num_experts} experts "
                "(expert-parallel ranks are drawn from the data-parallel ones)"
            )
        if self.sequence_parallel and self.seq_length % self.tp:
            raise ValueError(
                f"sequence length {self.seq_length} is not divisible by TP {self.tp} (sequence parallel)"
            )
        if self.pp * self.num_model_chunks > config.num_layers:
            raise ValueError(
                f"{self.pp} x {self.num_model_chunks} pipeline stages exceed the {config.num_layers} layers"
            )
        if self.num_model_chunks > 1 and self.num_microbatches % self.pp:
            raise ValueError(
                f"interleaving needs the {self.num_microbatches} microbatches to be a multiple of "
                f"PP {self.pp}"
            )
        if (
            config.position_embedding_type == "learned_absolute"
            and self.seq_length > config.max_position_embeddings
        ):
            raise ValueError(
                f"sequence length {self.seq_length} exceeds the {config.max_position_embeddings} "
                "learned positions"
            )


@dataclass(frozen=True)
class Stage:
    """One model chunk: layers ``[start, end)``, with the embedding and/or the output layer."""

    layer_range: tuple[int, int]
    pre_process: bool
    post_process: bool

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


def layout_config(config: GPTConfig, layout: Layout) -> GPTConfig:
    """``config`` with the layout's recomputation (the planner varies it; the model reads the config)."""
    return dataclasses.replace(
        config,
        recompute_granularity=layout.recompute,
        recompute_method=layout.recompute_method,
        recompute_num_layers=layout.recompute_num_layers,
    )


def rank_stages(config: GPTConfig, layout: Layout, pp_rank: int) -> list[Stage]:
    """The model chunks of pipeline rank ``pp_rank``: chunk c is virtual stage ``c * pp + pp_rank``."""
    if not 0 <= pp_rank < layout.pp:
        raise ValueError(f"pipeline rank {pp_rank} is outside 0..{layout.pp - 1}")
    num_stages = layout.pp * layout.num_model_chunks
    ranges = partition_layers(config, num_stages, layout.partition)
    out = []
    for c in range(layout.num_model_chunks):
        s = c * layout.pp + pp_rank
        out.append(Stage(ranges[s], s == 0, s == num_stages - 1))
    return out


__all__ = ["DTYPE_BYTES", "DType", "Layout", "Stage", "layout_config", "rank_stages"]
