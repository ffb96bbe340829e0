"""Which layers each (virtual) pipeline stage holds.

Three methods, as ``--pipeline-partition``:
- ``uniform`` (default): L layers over S stages as evenly as possible, stage i gets
  ``[i*L//S, (i+1)*L//S)``;
- ``parameters``: contiguous ranges minimising the largest stage's parameter count, counting the
  embedding on the first stage and the final norm + output layer on the last;
- an explicit list of layers per stage, e.g. ``3,4,4,3`` (must sum to L, each >= 1).

With interleaving, stage index s = chunk * pp + pp_rank (Megatron's virtual stage order).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megafast.config import GPTConfig
from megafast.model.gpt import GPTModel, uniform_layer_range
from megafast.parallel.state import ParallelState

Partition = list[tuple[int, int]]


def _check(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"number of pipeline stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages (pipeline size x virtual chunks) exceed the {num_layers} layers: "
            "use fewer stages or more layers"
        )


def uniform_partition(num_layers: int, num_stages: int) -> Partition:
    _check(num_layers, num_stages)
    return [uniform_layer_range(num_layers, num_stages, i) for i in range(num_stages)]


def explicit_partition(layers_per_stage: Sequence[int], num_layers: int, num_stages: int) -> Partition:
    _check(num_layers, num_stages)
    counts = list(layers_per_stage)
    if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"--pipeline-partition {','.join(map(str, counts))} must list {num_stages} positive layer counts "
            f"summing to --num-layers {num_layers}"
        )
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def layer_parameter_counts(config: GPTConfig) -> tuple[int, int, int]:
    """(parameters per transformer layer, embedding stage extra, output stage extra), unsharded."""
    h, d = config.hidden_size, config.head_dim
    bias = 1 if config.add_bias_linear else 0
    norm = h * (2 if config.normalization == "LayerNorm" else 1)
    qkv = config.qkv_size * (h + (1 if config.qkv_bias else 0))
    proj = config.num_attention_heads * d * h + bias * h
    fc1_rows = config.ffn_hidden_size * (2 if config.activation == "swiglu" else 1)
    mlp = fc1_rows * (h + bias) + config.ffn_hidden_size * h + bias * h
    layer = 2 * norm + qkv + proj + mlp
    embedding = config.vocab_size * h
    if config.position_embedding_type == "learned_absolute":
        embedding += config.max_position_embeddings * h
    output = norm + config.vocab_size * h  # the tied case still computes with a [V, h] matrix there
    return layer, embedding, output


def parameter_balanced_partition(config: GPTConfig, num_stages: int) -> Partition:
    """Contiguous ranges minimising the maximum stage parameter count (exact dynamic programme)."""
    L = config.num_layers
    _check(L, num_stages)
    layer, first_extra, last_extra = layer_parameter_counts(config)

    def cost(stage: int, start: int, end: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return (end - start) * layer + extra

    inf = float("inf")
    # best[s][e]: minimal max-cost of putting layers [0, e) on stages [0, s); choice[s][e]: start of stage s-1
    best = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (L + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for e in range(s, L - (num_stages - s) + 1):
            for b in range(s - 1, e):
                value = max(best[s - 1][b], cost(s - 1, b, e))
                if value < best[s][e]:
                    best[s][e], choice[s][e] = value, b
    bounds, end = [], L
    for s in range(num_stages, 0, -1):
        start = choice[s][end]
        bounds.append((start, end))
        end = start
    return bounds[::-1]


def partition_layers(config: GPTConfig, num_stages: int, method: Union[str, Sequence[int]] = "uniform") -> Partition:
    """Layer range [start, end) of every stage, for ``method`` 'uniform', 'parameters' or counts."""
    if isinstance(method, str) and method == "uniform":
        return uniform_partition(config.num_layers, num_stages)
    if isinstance(method, str) and method == "parameters":
        return parameter_balanced_partition(config, num_stages)
    if isinstance(method, str):
        try:
            method = [int(x) for x in method.split(",")]
        except ValueError:
            raise ValueError(
                f"--pipeline-partition {method!r} is not 'uniform', 'parameters' or a comma-separated list of "
                "layer counts such as 3,4,4,3"
            ) from None
    return explicit_partition(method, config.num_layers, num_stages)


def build_model_chunks(
    config: GPTConfig,
    state: ParallelState,
    *,
    seed: int,
    num_chunks: int = 1,
    method: Union[str, Sequence[int]] = "uniform",
    params_dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> list[GPTModel]:
    """This rank's model chunks: chunk c is virtual stage ``c * pp + pp_rank`` of the partition."""
    stages = partition_layers(config, state.pp_size * num_chunks, method)
    chunks = []
    for c in range(num_chunks):
        stage = c * state.pp_size + state.pp_rank
        chunks.append(
            GPTModel(
                config,
                state,
                seed=seed,
                layer_range=stages[stage],
                pre_process=stage == 0,
                post_process=stage == len(stages) - 1,
                params_dtype=params_dtype,
                device=device,
            )
        )
    return chunks
