"""Cost model of a megafast run: where every parameter lives, and how many FLOPs a token costs.

This is the single source of the numbers that the trainer logs (TFLOP/s, MFU) and that
``tools/plan.py`` predicts, so prediction and measurement can be compared line by line. Memory
per device is in :mod:`megafast.planner_memory`, step time and the layout search in
:mod:`megafast.planner_throughput`.

Parameters (h hidden, H heads, G query groups, d head dim, f FFN size, V vocabulary, padded to
a multiple of ``make_vocab_size_divisible_by * tp``), per transformer layer::

    norms       2 * h * (2 if LayerNorm else 1)                        (weight [+ bias])
    linear_qkv  (H + 2G) d * h  [+ (H + 2G) d bias with add_bias_linear or add_qkv_bias]
    linear_proj h * H d         [+ h]
    linear_fc1  f_1 * h         [+ f_1],   f_1 = 2f for SwiGLU ([gate; up]) else f
    linear_fc2  h * f           [+ h]

plus ``V * h`` word embeddings (and ``max_position_embeddings * h`` learned positions) on the
first stage, and the final norm and ``V * h`` output layer on the last. With tied embeddings the
output layer reuses the word embeddings on a single stage; with pipelining the last stage keeps
its own copy (``output_layer.weight``, summed with the first stage's gradient, as Megatron does).
:func:`total_parameter_count` counts the model's *unique* parameters, so that copy is excluded
unless ``include_tied_copy``; per-rank counts (:func:`rank_parameter_count`) include it, since it
occupies memory there.

FLOPs per token (2 per multiply-accumulate; s sequence length)::

    forward  = L * (2 * (qkv + proj + fc1 + fc2 weights) + attention) + 2 * h * V_padded
    attention = 2 * 2 * s * H * d / 2   (QK^T and PV; the causal mask halves them: on average a
                                         token attends to s/2 positions, as flash attention skips
                                         the masked blocks)
    training = 3 * forward              (backward = 2 * forward: input and weight gradients)

The trainer's TFLOP/s and MFU use :func:`training_flops_per_token` (model FLOPs, as Megatron-LM
reports them: recomputation is not counted, so MFU does not reward recomputing). The step-time
model counts what the device really executes (``include_recompute=True``): full recompute adds
one forward of every recomputed transformer layer (all of them with the uniform method, the first
N of each model chunk with block), selective recompute one forward of the attention core.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from megafast.config import GPTConfig, ParallelConfig, Recompute, RecomputeMethod, validate_layout
from megafast.model.recompute import recomputed_layers
from megafast.pipeline.partition import partition_layers

# Dense bf16 peak of known accelerators, TFLOP/s (vendor figures, no sparsity). Matched against
# torch.cuda.get_device_name in order, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}

DType = Literal["bf16", "fp16", "fp32"]
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# --------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """How one run is laid out: parallel sizes, micro-batching, recompute, precision, sharding.

    ``num_microbatches`` is per DP rank per step, so the global batch is
    ``micro_batch_size * num_microbatches * dp`` sequences of ``seq_length`` tokens.
    ``num_model_chunks`` > 1 is interleaved pipelining (virtual stages); ``partition`` is
    ``--pipeline-partition``; ``bucket_size_mb`` is ``--ddp-bucket-size-mb`` (None: one bucket).
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

    def __post_init__(self) -> None:
        positive = ("tp", "pp", "dp", "micro_batch_size", "num_microbatches", "seq_length", "num_model_chunks")
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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def check(self, config: GPTConfig) -> None:
        """Raise ValueError (one line) when ``config`` cannot be laid out this way."""
        validate_layout(config, ParallelConfig(self.tp, self.pp, self.sequence_parallel))
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


# ----------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of one rank: Megatron name (global layer index) and this TP rank's shape."""

    name: str
    shape: tuple[int, ...]
    tensor_parallel: bool  # sharded over TP (else replicated on every TP rank)
    shared_embedding: bool = False  # tied embedding whose gradient is summed over first+last stage

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


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


def _linear(name: str, rows: int, cols: int, bias: bool, tp: int, column: bool) -> list[ParamSpec]:
    """A column-parallel ([rows/tp, cols], bias [rows/tp]) or row-parallel ([rows, cols/tp]) linear."""
    if column:
        specs = [ParamSpec(f"{name}.weight", (rows // tp, cols), True)]
        return specs + ([ParamSpec(f"{name}.bias", (rows // tp,), True)] if bias else [])
    specs = [ParamSpec(f"{name}.weight", (rows, cols // tp), True)]
    return specs + ([ParamSpec(f"{name}.bias", (rows,), False)] if bias else [])


def _norm(name: str, config: GPTConfig) -> list[ParamSpec]:
    h = config.hidden_size
    specs = [ParamSpec(f"{name}.weight", (h,), False)]
    return specs + ([ParamSpec(f"{name}.bias", (h,), False)] if config.normalization == "LayerNorm" else [])


def layer_parameters(config: GPTConfig, layer: int, tp: int = 1) -> list[ParamSpec]:
    """Transformer layer ``layer`` on one TP rank, in ``named_parameters()`` order."""
    c, h, p = config, config.hidden_size, f"decoder.layers.{layer}"
    fc1_rows = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1)
    return (
        _norm(f"{p}.input_layernorm", c)
        + _linear(f"{p}.self_attention.linear_qkv", c.qkv_size, h, c.qkv_bias, tp, column=True)
        + _linear(
            f"{p}.self_attention.linear_proj",
            h,
            c.num_attention_heads * c.head_dim,
            c.add_bias_linear,
            tp,
            False,
        )
        + _norm(f"{p}.pre_mlp_layernorm", c)
        + _linear(f"{p}.mlp.linear_fc1", fc1_rows, h, c.add_bias_linear, tp, column=True)
        + _linear(f"{p}.mlp.linear_fc2", h, c.ffn_hidden_size, c.add_bias_linear, tp, column=False)
    )


def stage_parameters(config: GPTConfig, stage: Stage, tp: int = 1) -> list[ParamSpec]:
    """Every parameter of one chunk on one TP rank, in ``GPTModel.parameters()`` order (the order
    the gradient buffers are built from)."""
    h, vocab = config.hidden_size, config.padded_vocab_size(tp)
    single = stage.pre_process and stage.post_process
    shared = config.tie_embeddings and not single
    specs: list[ParamSpec] = []
    if stage.pre_process:
        specs.append(ParamSpec("embedding.word_embeddings.weight", (vocab // tp, h), True, shared))
        if config.position_embedding_type == "learned_absolute":
            specs.append(
                ParamSpec("embedding.position_embeddings.weight", (config.max_position_embeddings, h), False)
            )
    for layer in range(*stage.layer_range):
        specs += layer_parameters(config, layer, tp)
    if stage.post_process:
        specs += _norm("decoder.final_layernorm", config)
        if not (config.tie_embeddings and stage.pre_process):
            specs.append(ParamSpec("output_layer.weight", (vocab // tp, h), True, shared))
    return specs


def rank_parameters(config: GPTConfig, layout: Layout, pp_rank: int) -> list[list[ParamSpec]]:
    """Parameters of each model chunk of pipeline rank ``pp_rank`` (any TP rank: shards are equal)."""
    return [stage_parameters(config, s, layout.tp) for s in rank_stages(config, layout, pp_rank)]


def rank_parameter_count(config: GPTConfig, layout: Layout, pp_rank: int) -> int:
    """Parameters held by one GPU of pipeline rank ``pp_rank`` (tied output-layer copy included)."""
    return sum(p.numel for chunk in rank_parameters(config, layout, pp_rank) for p in chunk)


def total_parameter_count(
    config: GPTConfig, tp: int = 1, *, padded: bool = True, include_tied_copy: bool = False
) -> int:
    """Unique parameters of the model: TP shards summed, replicated parameters counted once.

    ``padded``: the vocabulary padded for TP size ``tp`` (what megafast allocates), else the
    tokenizer's (what an HF checkpoint holds). ``include_tied_copy`` adds the last stage's copy of
    tied embeddings, which exists only with pipelining.
    """
    c = config
    vocab = c.padded_vocab_size(tp) if padded else c.vocab_size
    layer = sum(p.numel for p in layer_parameters(c, 0))
    norm = c.hidden_size * (2 if c.normalization == "LayerNorm" else 1)
    positions = (
        c.max_position_embeddings * c.hidden_size if c.position_embedding_type == "learned_absolute" else 0
    )
    outputs = 1 if not c.tie_embeddings or include_tied_copy else 0
    return c.num_layers * layer + (1 + outputs) * vocab * c.hidden_size + positions + norm


# ---------------------------------------------------------------------------------------- FLOPs


def matmul_params_per_layer(c: GPTConfig) -> int:
    """Weights a token multiplies through in one layer: qkv + proj + fc1 + fc2 (unsharded)."""
    fc1_rows = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1)
    return (
        c.hidden_size * (c.qkv_size + c.num_attention_heads * c.head_dim + fc1_rows)
        + c.ffn_hidden_size * c.hidden_size
    )


def attention_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    """Forward QK^T and PV of one layer, causal: 2 * 2 * s * H * d / 2."""
    return 2.0 * 2.0 * seq_length * c.num_attention_heads * c.head_dim / 2.0


def layer_forward_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    return 2.0 * matmul_params_per_layer(c) + attention_flops_per_token(c, seq_length)


def output_forward_flops_per_token(c: GPTConfig, tp_size: int = 1) -> float:
    """The output layer (logits), 2 * h * V_padded; padding columns are computed too."""
    return 2.0 * c.hidden_size * c.padded_vocab_size(tp_size)


def forward_flops_per_token(c: GPTConfig, seq_length: int, tp_size: int = 1) -> float:
    return c.num_layers * layer_forward_flops_per_token(c, seq_length) + output_forward_flops_per_token(
        c, tp_size
    )


def recompute_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    """Extra forward work of recomputation, all layers in one model chunk: the recomputed layers
    (full) or every attention core (selective)."""
    if c.recompute_granularity == "full":
        return recomputed_layers(c, c.num_layers) * layer_forward_flops_per_token(c, seq_length)
    if c.recompute_granularity == "selective":
        return c.num_layers * attention_flops_per_token(c, seq_length)
    return 0.0


def training_flops_per_token(
    c: GPTConfig, seq_length: int, tp_size: int = 1, include_recompute: bool = False
) -> float:
    """Forward + backward FLOPs per token: 3 * forward (+ recomputation when asked).

    Without recomputation these are model FLOPs, the MFU numerator; with it, the work the
    device executes (hardware FLOPs), which the step-time model uses.
    """
    flops = 3.0 * forward_flops_per_token(c, seq_length, tp_size)
    return flops + (recompute_flops_per_token(c, seq_length) if include_recompute else 0.0)


def known_peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Vendor dense peak of a known GPU name (bf16/fp16; half of it for fp32/TF32), else None."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
    return None


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak TFLOP/s for MFU: the vendor figure of a known GPU, else a quick matmul measurement."""
    if device.type == "cuda":
        peak = known_peak_tflops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    n = 512
    g = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    reps, start = 8, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start) / 1e12


__all__ = [
    "DTYPE_BYTES",
    "PEAK_BF16_TFLOPS",
    "Layout",
    "ParamSpec",
    "Stage",
    "device_peak_tflops",
    "layout_config",
    "forward_flops_per_token",
    "known_peak_tflops",
    "layer_parameters",
    "rank_parameter_count",
    "rank_parameters",
    "rank_stages",
    "stage_parameters",
    "total_parameter_count",
    "training_flops_per_token",
]
