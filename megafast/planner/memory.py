"""Memory per GPU of a megafast run: model state (exact) and activations (the tensors autograd keeps).

Model state of pipeline rank r, DP rank j (any TP rank), from the same layout rules as
:class:`~megafast.training.data_parallel.DataParallel` and the optimizer, so the bytes are exact:

- gradients: one fp32 ``main_grad`` buffer per model chunk holding its parameters in reverse
  order, cut into buckets of ``bucket_size_mb`` MiB (a tied embedding gets a bucket of its own);
  with the distributed optimizer every bucket is padded to a multiple of DP. 4 bytes per element.
- weights: the parameters in the model dtype; with the distributed optimizer they move into a
  parameter buffer shaped like the gradient buffer (padding included).
- master weights: fp32 copies of what this rank updates (none when the model is fp32: the
  optimizer then updates the parameters in place). Plain: every parameter. Distributed (ZeRO-1):
  the part of each parameter inside DP rank j's shard ``[start + j n/dp, start + (j+1) n/dp)``
  of each bucket of n elements, so each rank holds about 1/dp of them.
- optimizer states, per master element: Adam ``exp_avg`` + ``exp_avg_sq`` (2 x 4 bytes) plus a
  4-byte ``step`` tensor per master tensor; Lion ``exp_avg`` (4 bytes).

Per sharding strategy (``Layout.sharding_strategy``, Fast-LLM's ZeRO table; B = padded buffer
elements, d = DP, e = model-dtype bytes; :func:`strategy_table` lists them side by side):

    no_shard (DDP)          weights e P     grads 4 B       masters + states of every element
    optim (ZeRO-1)          weights e B     grads 4 B       masters + states of ~1/d of them
    optim_grads (ZeRO-2)    weights e B     grads 4 B / d   masters + states of ~1/d
    optim_grads_params (3)  weights e B / d grads 4 B / d   masters + states of ~1/d

ZeRO-3's buckets never span two sharding units (embedding, each layer, final norm, output head),
as megafast.training.sharded_params builds them. Transient on top (in the activation working
set): ZeRO-2/3 three full fp32 gradient buckets (one filling, two reduce-scatters in flight), ZeRO-3 the gathered
weights of two units (the one computing and the prefetched one). Optimizer CPU offload of a
fraction f moves f of the fp32 masters and optimizer states (and a host copy of their gradients)
to host memory: ``StaticMemory.host``, not counted against the GPU.

Activations of one microbatch in one chunk (T = s * b tokens, e bytes per activation element,
t the TP size, u = t with sequence parallelism else 1, H/G/d heads/groups/head dim, f FFN size,
V the padded vocabulary), counting each storage autograd keeps once, as the model code creates
them (checked byte for byte against ``saved_tensors_hooks`` in the tests, for the torch and the
Triton kernels)::

    norm          torch: 4Th/u fp32 input + 8T/u LayerNorm mean, rstd (+ 8h fp32 weight copies
                  in bf16/fp16) | 4T/u + eTh/u RMSNorm rsqrt, x_hat.  Triton: eTh/u input + stats
    layer         2 norm + 2 eTh (qkv and fc1 inputs, all-gathered under SP) + attention
                  + e T w f / t, w = 4 SwiGLU torch (fc1 out, silu out, product), 3 SwiGLU Triton
                  (fc1 out, product), 2 GELU (fc1 out, gelu out)
                  + 2 m Th/u dropout masks (m = 1 byte on CUDA, e on CPU; none without dropout)
                  + 4 s d e RoPE tables cast to bf16/fp16 per layer (torch RoPE; otherwise the
                  shared fp32 tables, 2 x 4 s d once per chunk)
    attention     e T d / t * (union of the q, k, v storages the kernel keeps: the fused QKV
                  output (H + 2G) when q/k/v are views of it, rotated q (H) and k (G) copies,
                  GQA k/v expanded to H heads for SDPA) + e T H d / t output + 4 T H / t
                  logsumexp (selective recompute: q, k, v before any expansion, and the output)
    full recompute  e Th/u per checkpointed group (its input; megafast.model.recompute): every
                  layer under uniform 1, every N layers under uniform N, the first N under block
    first stage   8T ids (+ T mask with TP) + 8s positions + m Th/u embedding dropout mask
    last stage    norm + eTh + loss: torch 4 T V / t softmax (the cross-entropy gradient) + 10T
                  targets/masks; Triton cross-entropy e T V / t logits + 13T targets, fp32 lse,
                  mask; fused linear + cross-entropy 13T
    pipeline      + eTh/u output kept for backward (all but the last stage) + eTh/u received
                  input (all but the first stage, unless a norm or checkpoint already keeps it)

Attention runs a flash kernel (flash-attn, SDPA's flash/efficient kernels, or megafast's
Triton one); SDPA's math fallback (CPU with attention dropout) would keep s x s probabilities.

A rank holds the activations of the microbatches in flight: ``min(p - r, M)`` under 1F1B, M
under GPipe, and for interleaving the peak found by walking the rank's schedule. On top of them
comes a transient working set (an estimate, checked on GPU): the loss (torch: logits in the model
dtype plus fp32 copies, ``(e + 4) T V / t``; Triton: the logits' gradient; fused: a chunk of
logits and dx), one checkpointed group rematerialised under full recomputation,
the gradients of one layer's largest activations and the largest parameter's gradient before
it is added into ``main_grad``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional

from megafast.config import GPTConfig
from megafast.model.recompute import recompute_plan
from megafast.pipeline.schedules import FORWARD, Action, build_schedule, schedule_name
from megafast.planner.moe import is_expert_parameter, moe_mlp_activation_bytes
from megafast.planner.layout import (
    DTYPE_BYTES,
    SHARDING_STRATEGIES,
    DType,
    Layout,
    Stage,
    layout_config,
    rank_stages,
)
from megafast.planner.parameters import ParamSpec, rank_parameters

Device = Literal["cuda", "cpu"]
GRAD_BYTES = 4  # fp32 main_grad
MASTER_BYTES = 4  # fp32 master weights and optimizer states
GB = 1e9


# ---------------------------------------------------------------------------------- model state


@dataclass(frozen=True)
class Bucket:
    """Buffer offsets ``[start, end)`` (padding included) and each member's ``(start, end)``."""

    start: int
    end: int
    members: tuple[tuple[int, int], ...]


def sharding_unit(name: str) -> str:
    """The ZeRO-3 sharding unit of a parameter name (megafast.training.sharded_params.sharding_units)."""
    if name.startswith("decoder.layers."):
        return ".".join(name.split(".")[:3])
    return name.split(".")[0] if not name.startswith("decoder.") else ".".join(name.split(".")[:2])


def gradient_buffer(
    params: list[ParamSpec], dp: int, distributed: bool, bucket_size_mb: Optional[float], split_units: bool = False
) -> tuple[int, list[Bucket]]:
    """(elements, buckets) of one chunk's gradient buffer, as ``DataParallel._build_buffer`` lays it out.

    Parameters go in reverse order; a bucket closes once it holds ``bucket_size_mb`` MiB of fp32
    gradients, and a tied embedding sits alone in its bucket. Each bucket ends padded to a
    multiple of ``dp`` when the optimizer is distributed; ``split_units`` (ZeRO-3) also closes a
    bucket where the sharding unit changes.
    """
    pad_to = dp if distributed else 1
    bucket_numel = None if bucket_size_mb is None else max(1, int(bucket_size_mb * 2**20 / GRAD_BYTES))
    buckets: list[Bucket] = []
    offset = bucket_start = 0
    members: list[tuple[int, int]] = []

    def close() -> None:
        nonlocal offset, bucket_start, members
        if members:
            offset = -(-offset // pad_to) * pad_to
            buckets.append(Bucket(bucket_start, offset, tuple(members)))
        bucket_start, members = offset, []

    previous = None
    for p in reversed(params):
        unit = sharding_unit(p.name) if split_units else None
        if p.shared_embedding or (members and unit != previous):
            close()
        previous = unit
        members.append((offset, offset + p.numel))
        offset += p.numel
        if p.shared_embedding or (bucket_numel is not None and offset - bucket_start >= bucket_numel):
            close()
    close()
    return offset, buckets


@dataclass(frozen=True)
class StaticMemory:
    """Bytes of model state on one GPU."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    host: int = 0  # offloaded masters, optimizer states and host gradient copies (host memory, not the GPU)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_states


@dataclass(frozen=True)
class RankParameters:
    """Element counts of one GPU's model state (see :func:`rank_parameter_state`)."""

    params: int  # parameter elements
    buffer: int  # gradient-buffer elements, padding included
    masters: int  # master elements this rank updates
    num_masters: int  # master tensors (the optimizer keeps a ``step`` per tensor)
    largest: int  # elements of the largest parameter
    largest_bucket: int = 0  # elements of the largest gradient bucket (padding included)
    largest_unit: int = 0  # elements of the largest sharding unit (ZeRO-3 gathers a unit at a time)


def rank_parameter_state(
    config: GPTConfig, layout: Layout, pp_rank: int, dp_rank: int = 0, part: str = "all"
) -> RankParameters:
    """Parameter, gradient-buffer and master element counts of one GPU.

    With expert parallelism (``layout.ep`` > 1) the routed experts (1/ep of each expert tensor on
    this rank) have buffers of their own, sharded over the expert-DP ranks, the rest over DP;
    ``part`` "dense" / "expert" counts one of them, "all" both.

    Plain optimizer: one master per parameter. Distributed: one per parameter piece inside this
    DP rank's shard of each bucket. Memoised on the (frozen) config and the layout fields that
    matter: a search asks for the same ranks under many micro-batch and recompute choices.
    """
    shards = layout.dp * layout.cp  # context-parallel ranks are optimizer-shard replicas too (DP x CP)
    if not 0 <= dp_rank < shards:
        raise ValueError(f"data-parallel rank {dp_rank} is outside 0..{shards - 1}")
    distributed = layout.distributed_optimizer and shards > 1
    key = Layout(
        tp=layout.tp,
        pp=layout.pp,
        dp=shards,
        num_model_chunks=layout.num_model_chunks,
        distributed_optimizer=distributed,
        partition=layout.partition,
        bucket_size_mb=layout.bucket_size_mb,
        sharding_strategy="optim_grads_params" if layout.zero_stage == 3 else None,
        ep=layout.ep,
    )
    if layout.ep == 1 and part == "all":
        return _count_rank_parameter_state(config, key, pp_rank, dp_rank)
    parts = ("dense", "expert") if part == "all" else (part,)
    counts = [_count_rank_parameter_state(config, key, pp_rank, dp_rank, p) for p in parts]
    total = [sum(getattr(n, f.name) for n in counts) for f in dataclasses.fields(RankParameters)]
    total[4:] = [max(getattr(n, f.name) for n in counts) for f in dataclasses.fields(RankParameters)[4:]]
    return RankParameters(*total)


@functools.lru_cache(maxsize=4096)  # keyed on the frozen (hashable) GPTConfig and Layout
def _count_rank_parameter_state(
    config: GPTConfig, layout: Layout, pp_rank: int, dp_rank: int, part: str = "all"
) -> RankParameters:
    param_numel = buffer_numel = master_numel = num_masters = largest = largest_bucket = largest_unit = 0
    shards = layout.dp if part != "expert" else layout.dp // layout.ep  # layout.dp is DP x CP here
    distributed = layout.distributed_optimizer and shards > 1
    dp_rank %= shards
    for params in rank_parameters(config, layout, pp_rank):
        if part == "dense":
            params = [p for p in params if not is_expert_parameter(p.name)]
        elif part == "expert":  # this rank's E / ep experts
            params = [dataclasses.replace(p, shape=(p.shape[0] // layout.ep, *p.shape[1:]))
                      for p in params if is_expert_parameter(p.name)]
        numel, buckets = gradient_buffer(
            params, shards, distributed, layout.bucket_size_mb, layout.zero_stage == 3
        )
        buffer_numel += numel
        param_numel += sum(p.numel for p in params)
        largest = max([largest] + [p.numel for p in params])
        largest_bucket = max([largest_bucket] + [b.end - b.start for b in buckets])
        units: dict[str, int] = {}
        for p in params:
            units[sharding_unit(p.name)] = units.get(sharding_unit(p.name), 0) + p.numel
        largest_unit = max([largest_unit, *units.values()])
        if not distributed:
            master_numel, num_masters = master_numel + sum(p.numel for p in params), num_masters + len(params)
            continue
        for b in buckets:
            n = (b.end - b.start) // shards
            lo, hi = b.start + dp_rank * n, b.start + (dp_rank + 1) * n
            for start, end in b.members:
                owned = min(hi, end) - max(lo, start)
                if owned > 0:
                    master_numel, num_masters = master_numel + owned, num_masters + 1
    return RankParameters(param_numel, buffer_numel, master_numel, num_masters, largest, largest_bucket, largest_unit)


def static_memory(config: GPTConfig, layout: Layout, pp_rank: int, dp_rank: int = 0) -> StaticMemory:
    """Weights, fp32 gradient buffers, fp32 masters and optimizer states of one GPU, in bytes
    (with expert parallelism: the dense part over DP x CP plus the experts' over expert-DP)."""
    if layout.ep == 1:
        return _static_memory(rank_parameter_state(config, layout, pp_rank, dp_rank), layout, layout.dp * layout.cp)
    dense = _static_memory(rank_parameter_state(config, layout, pp_rank, dp_rank, "dense"), layout,
                           layout.dp * layout.cp)
    expert = _static_memory(rank_parameter_state(config, layout, pp_rank, dp_rank, "expert"), layout,
                            layout.expert_dp)
    return StaticMemory(*(getattr(dense, f.name) + getattr(expert, f.name) for f in dataclasses.fields(StaticMemory)))


def _static_memory(n: RankParameters, layout: Layout, shards: int) -> StaticMemory:
    distributed = layout.distributed_optimizer and shards > 1
    stage = layout.zero_stage
    per_element = MASTER_BYTES * (2 if layout.optimizer == "adam" else 1)
    states = n.masters * per_element
    if layout.optimizer == "adam":
        states += 4 * n.num_masters  # the fp32 scalar ``step`` of every master tensor
    masters = 0 if layout.dtype == "fp32" else n.masters * MASTER_BYTES
    weights = (n.buffer if distributed else n.params) * DTYPE_BYTES[layout.dtype]
    host = 0
    f = layout.optimizer_offload_fraction
    if f > 0:  # offloaded masters are always fp32 host copies, with a host copy of their gradients
        moved = int(f * n.masters)
        host = moved * (MASTER_BYTES + per_element + GRAD_BYTES)
        masters = 0 if layout.dtype == "fp32" else (n.masters - moved) * MASTER_BYTES
        states = int(states * (1 - f))
    return StaticMemory(
        weights=weights // shards if stage == 3 else weights,
        gradients=n.buffer * GRAD_BYTES // (shards if stage >= 2 else 1),
        master_weights=masters,
        optimizer_states=states,
        host=host,
    )


def strategy_table(config: GPTConfig, layout: Layout, pp_rank: int = 0) -> dict[str, StaticMemory]:
    """Model state of one GPU under each sharding strategy (no offload, and ZeRO-3 with full
    optimizer offload), side by side: {"no_shard": ..., ..., "optim_grads_params+offload": ...}."""
    out = {s: static_memory(config, dataclasses.replace(layout, sharding_strategy=s, distributed_optimizer=False,
                                                        optimizer_offload_fraction=0.0), pp_rank)
           for s in SHARDING_STRATEGIES}
    out["optim_grads_params+offload"] = static_memory(
        config, dataclasses.replace(layout, sharding_strategy="optim_grads_params", distributed_optimizer=False,
                                    optimizer_offload_fraction=1.0), pp_rank)
    return out


@dataclass(frozen=True)
class ModuleMemory:
    """Model state of one module of the unsharded model, all ``count`` instances together."""

    name: str  # embedding, attention, mlp, norms (one per transformer layer), final_norm, output_layer
    count: int  # instances: the number of layers for a transformer layer's parts, else 1
    parameters: int
    static: StaticMemory


def _module_of(name: str) -> str:
    """The :class:`ModuleMemory` group of a parameter name."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("decoder.layers."):
        part = name.split(".")[3]
        return {"self_attention": "attention", "mlp": "mlp"}.get(part, "norms")
    return "final_norm" if name.startswith("decoder.final_layernorm") else "output_layer"


def module_memory(config: GPTConfig, dtype: DType = "bf16", optimizer: str = "adam") -> list[ModuleMemory]:
    """Weights, fp32 gradients, fp32 masters and optimizer states of each module, unsharded.

    The same byte rules as :func:`static_memory` on one GPU with the plain optimizer (no padding),
    so the modules add up to ``static_memory(config, Layout(dtype=dtype, optimizer=optimizer), 0)``.
    TP and PP divide the modules among GPUs; the distributed optimizer divides the masters and
    optimizer states by DP.
    """
    layout = Layout(dtype=dtype, optimizer=optimizer)
    groups: dict[str, list[ParamSpec]] = {}
    for spec in rank_parameters(config, layout, 0)[0]:
        groups.setdefault(_module_of(spec.name), []).append(spec)
    out = []
    for name, specs in groups.items():
        numel = sum(p.numel for p in specs)
        states = numel * MASTER_BYTES * (2 if optimizer == "adam" else 1)
        states += 4 * len(specs) if optimizer == "adam" else 0  # each master tensor's ``step``
        static = StaticMemory(
            weights=numel * DTYPE_BYTES[dtype],
            gradients=numel * GRAD_BYTES,
            master_weights=0 if dtype == "fp32" else numel * MASTER_BYTES,
            optimizer_states=states,
        )
        layered = name in ("attention", "mlp", "norms")
        out.append(ModuleMemory(name, config.num_layers if layered else 1, numel, static))
    return out


# ---------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Kernels:
    """The implementations whose saved tensors differ (``megafast.kernels.dispatch`` picks them):
    element-wise ops ``torch`` (the references) or ``triton``, RoPE ``torch``/``triton``/``cuda``,
    attention ``sdpa``, ``flash`` (flash-attn) or ``triton``, and the loss ``torch``, ``triton``
    (cross-entropy kernel) or ``fused`` (Triton fused linear + cross-entropy)."""

    ops: str
    rope: str
    attention: str
    loss: str


def resolve_kernels(config: GPTConfig, layout: Layout, device: Device) -> Kernels:
    """Dispatch's ``auto`` rules: Triton ops on CUDA (torch on CPU), flash-attn for CUDA fp16/bf16
    when importable here, else SDPA (on a planning machine without flash-attn: SDPA, which keeps
    GQA's expanded k/v, so the prediction errs on the safe side)."""
    ops = config.kernels if config.kernels != "auto" else ("triton" if device == "cuda" else "torch")
    rope = ops if config.rope_kernel == "auto" else config.rope_kernel
    attention = config.attention_backend
    if attention == "auto":
        half = layout.dtype in ("bf16", "fp16")
        attention = (
            "flash" if device == "cuda" and half and importlib.util.find_spec("flash_attn") else "sdpa"
        )
    loss = "fused" if ops == "triton" and config.fused_linear_cross_entropy else ops
    return Kernels(ops, rope, attention, loss)


def _mask_bytes(config: GPTConfig, e: int, device: Device) -> int:
    """Bytes per element of a dropout mask: bool on CUDA (fused dropout), the input dtype on CPU."""
    if config.hidden_dropout == 0.0:
        return 0
    return 1 if device == "cuda" else e


def _norm_bytes(config: GPTConfig, tokens: float, e: int, ops: str) -> float:
    """What a norm keeps. torch: its fp32 input and statistics (+ the normalised x in dtype for
    RMSNorm; LayerNorm in bf16/fp16 also keeps fp32 copies of its weight and bias). Triton: its
    input in dtype and the fp32 statistics."""
    h = config.hidden_size
    stats = 8 * tokens if config.normalization == "LayerNorm" else 4 * tokens
    if ops == "triton":
        return e * tokens * h + stats
    if config.normalization == "LayerNorm":
        return 4 * tokens * h + stats + (8 * h if e != 4 else 0)
    return 4 * tokens * h + stats + e * tokens * h


def attention_bytes(config: GPTConfig, layout: Layout, tokens: int, attention: str = "sdpa") -> int:
    """Storages the attention block keeps for backward (see the module docstring), one TP rank.

    Context parallelism: ``tokens`` are this rank's. Ring attention (p2p) keeps what a flash kernel
    keeps (q, k, v unexpanded, its output and the fp32 log-sum-exp). All-to-all (a2a) keeps the
    re-laid-out q [H], k and v [G, or H when the groups do not split over C] (GQA-expanded to H for
    SDPA), the inner attention's output and the output laid back (two H storages) and the lse."""
    c, t, e = config, layout.tp, DTYPE_BYTES[layout.dtype]
    heads, groups, d = c.num_attention_heads // t, c.num_query_groups // t, c.head_dim
    rope = c.position_embedding_type == "rope"
    selective = layout.recompute == "selective"
    if layout.cp > 1 and layout.cp_comm_type == "a2a" and not selective:
        kv = groups if groups % layout.cp == 0 else heads
        kv = heads if attention == "sdpa" else kv  # SDPA keeps k/v repeated to every query head
        return e * tokens * d * (heads + 2 * kv + 2 * heads) + 4 * tokens * heads
    ring = layout.cp > 1  # p2p blocks take k/v unexpanded
    expand = heads != groups and not selective and attention == "sdpa" and not ring  # GQA k/v repeated for SDPA
    sizes = {}  # storage name -> heads it spans
    sizes["q_rot" if rope else ("qkv" if heads == groups else "q_copy")] = heads
    sizes["k_rep" if expand else ("k_rot" if rope else "qkv")] = heads if expand else groups
    sizes["v_rep" if expand else "qkv"] = heads
    if "qkv" in sizes:
        sizes["qkv"] = heads + 2 * groups  # a view of the fused QKV output keeps all of it
    kept = sum(sizes.values()) + heads  # + the attention output (also linear_proj's input)
    lse = 0 if selective else 4 * tokens * heads
    return e * tokens * d * kept + lse


def layer_activation_bytes(config: GPTConfig, layout: Layout, device: Device = "cuda", layer: int = 0) -> int:
    """Transformer layer ``layer``, one microbatch, one GPU, without full recompute (an MoE layer's
    MLP: megafast.planner.moe)."""
    c, t, e = config, layout.tp, DTYPE_BYTES[layout.dtype]
    k = resolve_kernels(c, layout, device)
    s, tokens = layout.local_seq_length, layout.local_seq_length * layout.micro_batch_size
    u = t if layout.sequence_parallel else 1
    h = c.hidden_size
    widths = 2 if c.activation != "swiglu" else (3 if k.ops == "triton" else 4)  # in units of f
    rows = _rope_rows(layout)
    rope = (
        4 * rows * c.head_dim * e if c.position_embedding_type == "rope" and k.rope == "torch" and e != 4 else 0
    )
    return int(
        2 * _norm_bytes(c, tokens / u, e, k.ops)
        + 2 * e * tokens * h
        + attention_bytes(c, layout, tokens, k.attention)
        + (moe_mlp_activation_bytes(c, tokens, e, k.ops, layout.micro_batch_size) if c.is_moe_layer(layer)
           else e * tokens * widths * c.ffn_hidden_size // t)
        + 2 * _mask_bytes(c, e, device) * tokens * h / u
        + rope
    )


def _rope_rows(layout: Layout) -> int:
    """Rows of the RoPE cos/sin tables: one per position (s), or one per token with context
    parallelism, whose micro-batches carry explicit [b, s/C] position ids."""
    return layout.local_seq_length * (layout.micro_batch_size if layout.cp > 1 else 1)


def chunk_activation_bytes(config: GPTConfig, layout: Layout, stage: Stage, device: Device = "cuda") -> int:
    """Activations one microbatch keeps alive in one model chunk until its backward."""
    c, t, e = config, layout.tp, DTYPE_BYTES[layout.dtype]
    k = resolve_kernels(c, layout, device)
    s, tokens = layout.local_seq_length, layout.local_seq_length * layout.micro_batch_size
    u = t if layout.sequence_parallel else 1
    h, hidden = c.hidden_size, e * tokens * c.hidden_size / u  # one [s/u, b, h] tensor
    plan = recompute_plan(layout_config(c, layout), stage.num_layers)
    first = stage.layer_range[0]
    if c.is_moe:  # MoE and dense layers differ
        layers = [layer_activation_bytes(c, layout, device, first + i) for i in range(stage.num_layers)]
    else:
        layers = [layer_activation_bytes(c, layout, device)] * stage.num_layers
    # a checkpointed group keeps only its input; the other layers keep everything
    total = sum(hidden if ckpt else sum(layers[start:end]) for start, end, ckpt in plan)
    plain = not all(ckpt for _, _, ckpt in plan)
    if c.position_embedding_type == "rope" and plain and (k.rope != "torch" or e == 4):
        total += 2 * 4 * _rope_rows(layout) * c.head_dim  # the fp32 cos/sin tables, shared by the layers
    if stage.pre_process:
        total += 8 * tokens + (tokens if t > 1 else 0)  # (local) token ids, out-of-shard mask
        total += 8 * (tokens if layout.cp > 1 else s) if c.position_embedding_type == "learned_absolute" else 0
        total += _mask_bytes(c, e, device) * tokens * h / u
    elif k.ops == "torch" and e != 4 and not plan[0][2]:
        total += hidden  # the received input, kept besides the fp32 copy its norm saved
    if stage.post_process:
        total += _norm_bytes(c, tokens / u, e, k.ops) + e * tokens * h
        total += _loss_bytes(c, k.loss, tokens, e, t)
    else:
        total += hidden  # the output, kept for the backward started by the next stage's gradient
    return int(total)


def _loss_bytes(config: GPTConfig, loss: str, tokens: int, e: int, t: int) -> int:
    """What the loss keeps besides the output layer's input. torch: the fp32 softmax (its
    gradient), local targets and two masks; Triton: the logits, targets, fp32 log-sum-exp and the
    ignore mask; fused linear + cross-entropy: only the last three."""
    vocab = config.padded_vocab_size(t) // t
    if loss == "torch":
        return 4 * tokens * vocab + 10 * tokens
    return (0 if loss == "fused" else e * tokens * vocab) + 13 * tokens


def _loss_transient_bytes(config: GPTConfig, loss: str, tokens: int, e: int, t: int) -> int:
    """The loss's working set. torch: the logits' fp32 copy besides them (when they are not fp32 or
    are padded); Triton: the logits' gradient; fused: one chunk of logits and dx (dW, like any
    parameter's gradient before it reaches ``main_grad``, is counted by the caller)."""
    vocab, h = config.padded_vocab_size(t) // t, config.hidden_size
    if loss == "torch":
        return (e + (4 if e != 4 or vocab * t != config.vocab_size else 0)) * tokens * vocab
    if loss == "triton":
        return e * tokens * vocab
    from megafast.kernels.fused_linear_cross_entropy_kernel import default_chunk_size

    return e * (default_chunk_size(tokens, vocab, h) * vocab + tokens * h)


def _in_flight(layout: Layout, pp_rank: int, per_chunk: list[int]) -> tuple[int, int]:
    """(microbatch-chunks alive at the peak, their bytes) on ``pp_rank`` over one step."""
    p, m = layout.pp, layout.num_microbatches
    name = schedule_name(p, layout.num_model_chunks, layout.pipeline_schedule)
    if layout.num_model_chunks == 1:
        count = {"none": 1, "gpipe": m}.get(name, min(p - pp_rank, m))
        return count, count * per_chunk[0]
    live: dict[tuple[int, int], int] = {}
    best = (0, 0)
    for step in build_schedule(name, p, pp_rank, m, layout.num_model_chunks):
        if not isinstance(step, Action) or not step.is_compute:
            continue
        key = (step.microbatch, step.chunk)
        if step.kind == FORWARD:
            live[key] = per_chunk[step.chunk]
            best = max(best, (sum(live.values()), len(live)), key=lambda x: x[0])
        else:
            live.pop(key, None)
    return best[1], best[0]


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one GPU: per microbatch per chunk, the in-flight peak, the transient."""

    per_microbatch: tuple[int, ...]
    in_flight: int
    stored: int
    transient: int

    @property
    def peak(self) -> int:
        return self.stored + self.transient


def activation_memory(
    config: GPTConfig, layout: Layout, pp_rank: int, device: Device = "cuda"
) -> ActivationMemory:
    """Peak activation bytes of pipeline rank ``pp_rank`` during one training step."""
    c, t, e = config, layout.tp, DTYPE_BYTES[layout.dtype]
    tokens = layout.local_seq_length * layout.micro_batch_size
    stages = rank_stages(c, layout, pp_rank)
    per_chunk = [chunk_activation_bytes(c, layout, st, device) for st in stages]
    count, stored = _in_flight(layout, pp_rank, per_chunk)
    layer = layer_activation_bytes(c, layout, device)
    if c.is_moe:  # the largest layer (MoE and dense layers differ)
        layer = max(layer_activation_bytes(c, layout, device, i) for i in range(c.num_layers))
    fc1 = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1) // t
    backward = e * tokens * (fc1 + 2 * c.hidden_size)  # gradients of a layer's widest activations
    if layout.recompute == "full":  # the longest checkpointed group, rematerialised at once
        groups = [recompute_plan(layout_config(c, layout), st.num_layers) for st in stages]
        backward += max(end - start for plan in groups for start, end, ckpt in plan if ckpt) * layer
    elif layout.recompute == "selective":
        backward += (
            e * tokens * c.num_attention_heads // t * c.head_dim * 3 + 4 * tokens * c.num_attention_heads // t
        )
    transient = backward
    if any(st.post_process for st in stages):
        loss = resolve_kernels(c, layout, device).loss
        transient = max(transient, _loss_transient_bytes(c, loss, tokens, e, t))
    n = rank_parameter_state(c, layout, pp_rank)
    sharded = 0  # ZeRO-2/3: full fp32 buckets being filled or reduce-scattered; ZeRO-3: two gathered units
    if layout.zero_stage >= 2:
        sharded += 3 * GRAD_BYTES * n.largest_bucket  # data_parallel.IN_FLIGHT + 1
    if layout.zero_stage == 3:
        sharded += 2 * e * n.largest_unit
    return ActivationMemory(tuple(per_chunk), count, stored, int(transient + e * n.largest + sharded))


# ---------------------------------------------------------------------------------------- total


@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes on one GPU of pipeline rank ``pp_rank``."""

    pp_rank: int
    static: StaticMemory
    activations: ActivationMemory

    @property
    def total(self) -> int:
        return self.static.total + self.activations.peak

    def breakdown_gb(self) -> dict[str, float]:
        s, a = self.static, self.activations
        return {
            "weights": s.weights / GB,
            "gradients": s.gradients / GB,
            "master_weights": s.master_weights / GB,
            "optimizer_states": s.optimizer_states / GB,
            "activations": a.peak / GB,
            "total": self.total / GB,
        }


def rank_memory(
    config: GPTConfig, layout: Layout, pp_rank: int, dp_rank: int = 0, device: Device = "cuda"
) -> RankMemory:
    return RankMemory(
        pp_rank,
        static_memory(config, layout, pp_rank, dp_rank),
        activation_memory(config, layout, pp_rank, device),
    )


def peak_memory(config: GPTConfig, layout: Layout, device: Device = "cuda") -> RankMemory:
    """The most loaded GPU: the maximum over pipeline ranks (DP rank 0 owns the largest shard)."""
    return max((rank_memory(config, layout, r, 0, device) for r in range(layout.pp)), key=lambda m: m.total)


__all__ = [
    "ActivationMemory",
    "Bucket",
    "Kernels",
    "ModuleMemory",
    "RankMemory",
    "RankParameters",
    "StaticMemory",
    "activation_memory",
    "attention_bytes",
    "chunk_activation_bytes",
    "gradient_buffer",
    "layer_activation_bytes",
    "module_memory",
    "peak_memory",
    "rank_memory",
    "rank_parameter_state",
    "resolve_kernels",
    "sharding_unit",
    "static_memory",
    "strategy_table",
]
