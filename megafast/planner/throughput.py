"""Step time, tokens/s and MFU of a layout on a cluster (the search over layouts is in
:mod:`megafast.planner.search`).

Compute. A microbatch on pipeline rank r costs ``tokens * F_r / t`` FLOPs, F_r the hardware
FLOPs per token of r's layers (:func:`~megafast.planner.flops.training_flops_per_token` terms,
recomputation included, the output layer on the last stage: one more forward of it with the fused
linear + cross-entropy, which recomputes the logits in backward), run at
``gpu_tflops * compute_efficiency``. ``compute_efficiency`` (default 0.6) is the fraction of
the dense peak that a whole transformer layer sustains: GEMMs reach 70-80% of peak at good
shapes, flash attention less, and the memory-bound norms, activations and elementwise work add
time without FLOPs; Megatron-LM reports 40-55% MFU on H100 for 7B-175B models.

Communication, with ring algorithms over n ranks at ``bandwidth * comm_efficiency`` (default
0.8 of the link; a group whose ranks fit in one node uses ``intra_node_gbps``, else
``inter_node_gbps`` per GPU), for a tensor of N bytes::

    all-reduce       2 (n - 1) / n * N / bandwidth
    all-gather, reduce-scatter    (n - 1) / n * N / bandwidth
    p2p send             N / bandwidth

- TP, per layer and microbatch (N = e * s * b * h): forward 2 all-reduces (after linear_proj
  and linear_fc2), backward 2 more (the inputs' gradients of linear_qkv and linear_fc1); with
  sequence parallelism each all-reduce becomes an all-gather + a reduce-scatter of the same N,
  the same time. Full recompute repeats the forward's 2 for each recomputed layer. The embedding
  and the output layer add one each on the first and last stage. TP collectives are synchronous
  in megafast: they add to the compute time.
- PP: each chunk boundary sends the activation (N / t with sequence parallelism) forward and
  its gradient backward, per microbatch, blocking in the schedule.
- DP: the fp32 gradient buffer (4 bytes per element, padding included) is all-reduced, or
  reduce-scattered with the distributed optimizer, which then all-gathers the updated
  parameters (e bytes per element). The reduction overlaps the last microbatch's backward
  (bucketed): only ``max(0, t_reduce - t_backward)`` is exposed; the parameter all-gather is not.
  Tied embeddings with pipelining all-reduce their gradient between the first and last stage.
- EP (MoE, ``Layout.ep`` > 1): per MoE layer and microbatch, 4 dispatcher collectives (dispatch
  and combine, forward and backward) of :func:`megafast.planner.moe.dispatch_bytes` over a group
  of tp x ep GPUs, synchronous (they add to the compute time). Expert gradients are reduced over
  the expert-DP ranks (dp x cp / ep), dense ones over DP, each bucketed as above.
- Optimizer: memory-bound, ``(4 grad + 8 master + 2 * 4 * states + e param) * owned elements``
  bytes over ``hbm_gbps``.

Step time: with t_mb the slowest rank's time for one microbatch forward + backward (compute + TP
+ PP communication), the pipeline runs ``M + (p - 1) / v`` of them (bubble fraction
``(p - 1) / (v M + p - 1)``, :func:`~megafast.pipeline.schedules.bubble_fraction`), then the
exposed DP communication and the optimizer step. tokens/s = global batch * s / step time; MFU =
model FLOPs per token * tokens/s / (GPUs * peak), the trainer's definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megafast.config import GPTConfig
from megafast.model.recompute import recomputed_layers
from megafast.pipeline.schedules import bubble_fraction, schedule_name
from megafast.planner.flops import (
    attention_flops_per_token,
    layer_forward_flops_per_token,
    output_forward_flops_per_token,
    training_flops_per_token,
)
from megafast.planner.layout import DTYPE_BYTES, Layout, layout_config, rank_stages
from megafast.planner.memory import GB, RankMemory, peak_memory, rank_parameter_state, resolve_kernels
from megafast.planner.moe import dispatch_bytes, num_moe_layers

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Cluster:
    """GPUs and links. Bandwidths are GB/s (10^9 bytes) per GPU in one direction: NVLink 4 is
    450; one 400 Gb/s NIC per GPU is 50."""

    num_gpus: int
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 989.0
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    hbm_gbps: float = 3350.0
    compute_efficiency: float = 0.6
    comm_efficiency: float = 0.8
    memory_headroom: float = 0.1  # kept free for the CUDA context, NCCL buffers, fragmentation

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"need >= 1 GPU and >= 1 GPU per node, got {self.num_gpus} and {self.gpus_per_node}"
            )
        for name in ("gpu_memory_gb", "gpu_tflops", "intra_node_gbps", "inter_node_gbps", "hbm_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("compute_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom must be in [0, 1), got {self.memory_headroom}")

    @property
    def usable_memory_bytes(self) -> float:
        return self.gpu_memory_gb * (1 - self.memory_headroom) * GB

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks lie within ``span`` consecutive GPUs."""
        gbps = self.intra_node_gbps if span <= self.gpus_per_node else self.inter_node_gbps
        return gbps * 1e9 * self.comm_efficiency


# Optimizer CPU offload: device<->host copies over PCIe gen4 x16 and the host update's memory traffic
HOST_LINK_GBPS = 25.0
HOST_MEMORY_GBPS = 50.0


def all_reduce_seconds(nbytes: float, n: int, bandwidth: float) -> float:
    """Ring all-reduce: 2 (n - 1) / n * N / bandwidth."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bandwidth


def all_gather_seconds(nbytes: float, n: int, bandwidth: float) -> float:
    """Ring all-gather or reduce-scatter of an N-byte result: (n - 1) / n * N / bandwidth."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes / bandwidth


@dataclass(frozen=True)
class StepTime:
    """Seconds of one training step, by cause (they add up to ``total``)."""

    compute: float  # the slowest rank's microbatches, bubble excluded
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float  # exposed DP reduction + parameter all-gather + tied-embedding sync
    optimizer: float
    ep_comm: float = 0.0  # MoE token dispatch and combine over the expert-parallel group

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.optimizer
                + self.ep_comm)


def step_time(config: GPTConfig, layout: Layout, cluster: Cluster) -> StepTime:
    """The step-time model of the module docstring."""
    c, t, p, d = config, layout.tp, layout.pp, layout.dp
    e, v, m = DTYPE_BYTES[layout.dtype], layout.num_model_chunks, layout.num_microbatches
    cfg = layout_config(c, layout)
    tokens = layout.local_seq_length * layout.micro_batch_size  # this rank's (seq / CP per sequence)
    rate = cluster.gpu_tflops * 1e12 * cluster.compute_efficiency
    layer_forward = layer_forward_flops_per_token(cfg, layout.seq_length)
    layer_flops = 3 * layer_forward
    if layout.recompute == "selective":
        layer_flops += attention_flops_per_token(cfg, layout.seq_length)
    # the fused linear + cross-entropy recomputes the logits in backward: 4 output-layer matmuls
    output_passes = 4 if resolve_kernels(c, layout, "cuda").loss == "fused" else 3
    activation = e * tokens * c.hidden_size  # one [s, b, h] tensor
    tp_bw, dp_bw, pp_bw = cluster.bandwidth(t), cluster.bandwidth(t * d), cluster.bandwidth(t * d * p)
    tp_per_layer = 4 * all_reduce_seconds(activation, t, tp_bw)
    p2p = activation / (t if layout.sequence_parallel else 1) / pp_bw if p > 1 else 0.0

    ep_bw = cluster.bandwidth(t * layout.ep)
    # one dispatcher collective of one MoE layer (the layer routes every token of the micro-batch)
    ep_collective = dispatch_bytes(c, layout.local_seq_length * layout.micro_batch_size, e, layout.ep,
                                   layout.moe_token_dispatcher_type) / ep_bw
    slowest = (0.0, 0.0, 0.0, 0.0)  # (compute, tp, pp, ep) of one microbatch on the slowest rank
    backward = 0.0
    for r in range(p):
        stages = rank_stages(cfg, layout, r)
        layers = sum(st.num_layers for st in stages)
        again = sum(recomputed_layers(cfg, st.num_layers) for st in stages)  # full recompute
        pre, post = sum(st.pre_process for st in stages), sum(st.post_process for st in stages)
        flops = layers * layer_flops + again * layer_forward
        flops += post * output_passes * output_forward_flops_per_token(c, t)
        compute = tokens * flops / t / rate
        tp = (layers * tp_per_layer + again * 2 * all_reduce_seconds(activation, t, tp_bw)
              + (pre + post) * all_reduce_seconds(activation, t, tp_bw))
        boundaries = 2 * v - pre - post  # chunk inputs received + chunk outputs sent
        moe_layers = sum(num_moe_layers(c, *st.layer_range) for st in stages)
        times = (compute, tp, boundaries * 2 * p2p,  # each boundary: activation out, gradient back
                 4 * moe_layers * ep_collective)
        if sum(times) > sum(slowest):
            slowest, backward = times, compute * 2 / 3
    name = schedule_name(p, v, layout.pipeline_schedule)
    bubble = float(bubble_fraction(name, p, m, v))
    busy = m * sum(slowest)
    bubble_s = busy * bubble / (1 - bubble)

    distributed = layout.distributed_optimizer and d > 1
    stage = layout.zero_stage
    worst_dp, worst_opt = 0.0, 0.0
    groups = [("all", d)] if layout.ep == 1 else [("dense", d), ("expert", d // layout.ep)]
    for r in range(p):
        reduce = gather = owned = 0.0
        for part, n in groups:  # expert parallelism: dense buffers over DP, expert buffers over expert-DP
            state = rank_parameter_state(cfg, layout, r, part=part)
            numel, owned = state.buffer, owned + state.masters
            if distributed and n > 1:
                reduce += all_gather_seconds(4 * numel, n, dp_bw)
                gather += all_gather_seconds(e * numel, n, dp_bw)
            else:
                reduce += all_reduce_seconds(4 * numel, n, dp_bw)
        if stage == 3:  # per microbatch: gather for forward and for backward, reduce-scatter in backward
            exposed = m * (max(0.0, gather - backward / 2) + max(0.0, gather + reduce - backward))
        elif stage == 2:  # a reduce-scatter after every microbatch's backward, the gather after the step
            exposed = m * max(0.0, reduce - backward) + gather
        else:
            exposed = max(0.0, reduce - backward) + gather
        if c.tie_embeddings and p > 1 and r in (0, p - 1):
            exposed += all_reduce_seconds(4 * c.padded_vocab_size(t) // t * c.hidden_size, 2, pp_bw)
        touched = (4 + 8 + (16 if layout.optimizer == "adam" else 8) + e) * owned
        f = layout.optimizer_offload_fraction
        opt = (1 - f) * touched / (cluster.hbm_gbps * 1e9)
        if f > 0:  # gradients down and weights up over PCIe, the update in host memory
            opt += f * owned * ((4 + e) / (HOST_LINK_GBPS * 1e9) + touched / owned / (HOST_MEMORY_GBPS * 1e9))
        worst_dp, worst_opt = max(worst_dp, exposed), max(worst_opt, opt)
    compute, tp, pp, ep = (m * x for x in slowest)
    return StepTime(compute, tp, pp, bubble_s, worst_dp, worst_opt, ep)


@dataclass(frozen=True)
class Estimate:
    """A layout's predicted memory (most loaded GPU), speed, and whether it fits (else why not)."""

    layout: Layout
    memory: Optional[RankMemory]
    time: Optional[StepTime]
    tokens_per_s: float
    tflops_per_gpu: float  # model TFLOP/s per GPU, as the trainer logs them
    mfu: float
    reason: Optional[str] = None  # why the layout is rejected; None when it fits

    @property
    def fits(self) -> bool:
        return self.reason is None

    @classmethod
    def rejected(cls, layout: Layout, reason: str) -> "Estimate":
        """A layout that cannot run, with nothing estimated."""
        return cls(layout, None, None, 0.0, 0.0, 0.0, reason)

    def days(self, tokens: float) -> float:
        """Days to train on ``tokens`` tokens at this layout's speed."""
        return tokens / self.tokens_per_s / SECONDS_PER_DAY if self.tokens_per_s > 0 else float("inf")


def estimate(config: GPTConfig, layout: Layout, cluster: Cluster) -> Estimate:
    """Memory and speed of ``layout``; ``reason`` says why it cannot run, if it cannot."""
    if layout.world_size != cluster.num_gpus:
        return Estimate.rejected(layout, f"uses {layout.world_size} GPUs, not the {cluster.num_gpus} given")
    try:
        layout.check(config)
    except ValueError as err:
        return Estimate.rejected(layout, str(err))
    if layout.tp > cluster.gpus_per_node:
        return Estimate.rejected(layout, f"TP={layout.tp} spans more than a node of {cluster.gpus_per_node} GPUs")
    memory = peak_memory(config, layout)
    time = step_time(config, layout, cluster)
    tokens_per_s = layout.tokens_per_step / time.total
    flops = training_flops_per_token(config, layout.seq_length, layout.tp)
    tflops = flops * tokens_per_s / cluster.num_gpus / 1e12
    mfu = tflops / cluster.gpu_tflops
    reason = None
    if memory.total > cluster.usable_memory_bytes:
        parts = ", ".join(
            f"{k.replace('_', ' ')} {v:.1f}" for k, v in memory.breakdown_gb().items() if k != "total"
        )
        reason = (
            f"needs {memory.total / GB:.1f} GB on pipeline rank {memory.pp_rank} ({parts}) > "
            f"{cluster.usable_memory_bytes / GB:.1f} GB usable of {cluster.gpu_memory_gb:g} GB"
        )
    return Estimate(layout, memory, time, tokens_per_s, tflops, mfu, reason)


__all__ = [
    "Cluster",
    "Estimate",
    "StepTime",
    "all_gather_seconds",
    "all_reduce_seconds",
    "estimate",
    "step_time",
]
