"""Cost model of a megafast run: where every parameter lives, how many FLOPs a token costs, how
much memory each GPU needs, how long a step takes, and which layout is fastest.

This is the single source of the numbers that the trainer logs (TFLOP/s, MFU) and that
``tools/plan.py`` predicts, so prediction and measurement can be compared line by line. One
concept per module:

- :mod:`~megafast.planner.layout`: ``Layout`` (parallel sizes, micro-batching, recompute,
  precision, sharding) and the model chunks of each pipeline rank;
- :mod:`~megafast.planner.parameters`: every parameter's name and shape per rank, and counts;
- :mod:`~megafast.planner.flops`: FLOPs per token and the device peak that MFU divides by;
- :mod:`~megafast.planner.memory`: bytes per GPU, model state (exact) and activations;
- :mod:`~megafast.planner.throughput`: step time, tokens/s and MFU on a ``Cluster``;
- :mod:`~megafast.planner.search`: every layout of a cluster estimated and ranked;
- :mod:`~megafast.planner.context`: context parallelism's attention work and ring / all-to-all
  traffic per rank, and the longest sequence that fits a GPU.

The planner is pure arithmetic over configs: it reads the pipeline schedules (pure action lists)
but never the runtime engine, and builds no model.
"""

from megafast.planner.context import (
    ContextParallelCost,
    context_parallel_cost,
    longest_sequence,
    sequence_multiple,
)
from megafast.planner.flops import (
    PEAK_BF16_TFLOPS,
    attention_flops_per_token,
    device_peak_tflops,
    forward_flops_per_token,
    known_peak_tflops,
    layer_forward_flops_per_token,
    matmul_params_per_layer,
    output_forward_flops_per_token,
    recompute_flops_per_token,
    training_flops_per_token,
)
from megafast.planner.layout import DTYPE_BYTES, DType, Layout, Stage, layout_config, rank_stages
from megafast.planner.memory import (
    GB,
    ActivationMemory,
    Bucket,
    Kernels,
    ModuleMemory,
    RankMemory,
    RankParameters,
    StaticMemory,
    activation_memory,
    attention_bytes,
    chunk_activation_bytes,
    gradient_buffer,
    layer_activation_bytes,
    module_memory,
    peak_memory,
    rank_memory,
    rank_parameter_state,
    resolve_kernels,
    static_memory,
)
from megafast.planner.parameters import (
    ParamSpec,
    active_parameter_count,
    layer_parameters,
    rank_parameter_count,
    rank_parameters,
    stage_parameters,
    total_parameter_count,
)
from megafast.planner.qlora import QLoRAMemory, nf4_bytes, qlora_memory
from megafast.planner.search import Plan, search
from megafast.planner.throughput import (
    Cluster,
    Estimate,
    StepTime,
    all_gather_seconds,
    all_reduce_seconds,
    estimate,
    step_time,
)

__all__ = [
    "ContextParallelCost",
    "context_parallel_cost",
    "longest_sequence",
    "sequence_multiple",
    "DTYPE_BYTES",
    "GB",
    "PEAK_BF16_TFLOPS",
    "ActivationMemory",
    "Bucket",
    "Cluster",
    "DType",
    "Estimate",
    "Kernels",
    "Layout",
    "ModuleMemory",
    "ParamSpec",
    "Plan",
    "QLoRAMemory",
    "RankMemory",
    "RankParameters",
    "Stage",
    "StaticMemory",
    "StepTime",
    "activation_memory",
    "all_gather_seconds",
    "all_reduce_seconds",
    "attention_bytes",
    "attention_flops_per_token",
    "chunk_activation_bytes",
    "device_peak_tflops",
    "estimate",
    "forward_flops_per_token",
    "gradient_buffer",
    "known_peak_tflops",
    "layer_activation_bytes",
    "layer_forward_flops_per_token",
    "layer_parameters",
    "layout_config",
    "matmul_params_per_layer",
    "module_memory",
    "nf4_bytes",
    "output_forward_flops_per_token",
    "peak_memory",
    "qlora_memory",
    "rank_memory",
    "rank_parameter_count",
    "rank_parameter_state",
    "rank_parameters",
    "rank_stages",
    "recompute_flops_per_token",
    "resolve_kernels",
    "search",
    "stage_parameters",
    "static_memory",
    "step_time",
    "total_parameter_count",
    "active_parameter_count",
    "training_flops_per_token",
]
