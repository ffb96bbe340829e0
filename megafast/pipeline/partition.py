"""Which layers each (virtual) pipeline stage holds.

Three methods, as ``--pipeline-partition``:
- ``uniform`` (default): L layers over S stages as evenly as possible, stage i gets
  ``[i*L//S, (i+1)*L//S)``;
- ``parameters``: contiguous ranges minimising the largest stage's parameter count, counting the
  embedding on the first stage and the final norm + output layer on the last;
- an explicit list of layers per stage, e.g. ``3,4,4,3`` (must sum to L, each >= 1).

With interleaving, stage index s = chunk * pp + pp_rank (Megatron's virtual stage order).

Megatron's uneven splits (:class:`megafast.config.PipelineSplit`, :func:`split_layer_counts`):
``--decoder-first-pipeline-num-layers F`` / ``--decoder-last-pipeline-num-layers T`` put F / T
layers on the first / last pipeline rank and spread the rest evenly over the other ranks (each
rank's layers split evenly over its V virtual chunks); ``--account-for-embedding-in-pipeline-split``
and ``--account-for-loss-in-pipeline-split`` count the embedding and the output layer as one layer
each: the L + e + l "blocks" are split evenly over the P x V virtual stages and the first / last
stage holds one decoder layer fewer. With an explicit ``--pipeline-partition`` list, those flags
make the list count blocks too (DeepSpeed-pipeline ``parts``): 30 layers, PP=8,
``--pipeline-partition 1,5,5,5,5,5,5,1`` with both flags puts the embedding alone on the first
stage and the output layer alone on the last.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megafast.config import GPTConfig, PipelineSplit
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


def _fail_split(message: str) -> None:
    raise ValueError(f"impossible pipeline split: {message}")


def _uneven_counts(num_layers: int, pp: int, vpp: int, split: PipelineSplit) -> list[int]:
    first, last = split.first_stage_layers, split.last_stage_layers
    if pp < 2:
        _fail_split("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    if vpp > 1:
        for flag, value in (("first", first), ("last", last)):
            if value is not None and (value < 1 or value % vpp):
                _fail_split(f"--decoder-{flag}-pipeline-num-layers {value} must be a positive multiple of the "
                            f"{vpp} virtual stages per pipeline rank")
    middle_ranks = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0:
        _fail_split(f"the first and last stages' {num_layers - rest} layers exceed --num-layers {num_layers}")
    if bool(rest) != bool(middle_ranks):
        _fail_split(f"{rest} layers are left for {middle_ranks} middle pipeline ranks: change "
                    "--decoder-first/last-pipeline-num-layers")
    if middle_ranks and rest % (middle_ranks * vpp):
        _fail_split(f"the {rest} remaining layers do not divide evenly over {middle_ranks} middle pipeline ranks"
                    + (f" x {vpp} virtual stages" if vpp > 1 else "") + ": change --decoder-first/last-pipeline-"
                    "num-layers or --num-layers")
    per_middle = rest // max(middle_ranks, 1) // vpp
    counts = []
    for stage in range(pp * vpp):
        rank = stage % pp
        if rank == 0 and first is not None:
            counts.append(first // vpp)
        elif rank == pp - 1 and last is not None:
            counts.append(last // vpp)
        else:
            counts.append(per_middle)
    return counts


def _accounted_counts(num_layers: int, num_stages: int, split: PipelineSplit,
                      blocks: Optional[Sequence[int]]) -> list[int]:
    extra_first, extra_last = int(split.account_for_embedding), int(split.account_for_loss)
    total = num_layers + extra_first + extra_last
    if blocks is None:
        if total % num_stages:
            _fail_split(f"{num_layers} layers + {extra_first + extra_last} (embedding/loss) = {total} blocks do not "
                        f"divide evenly over {num_stages} pipeline stages: change --num-layers, the pipeline size "
                        "or give --pipeline-partition")
        blocks = [total // num_stages] * num_stages
    blocks = list(blocks)
    if len(blocks) != num_stages or sum(blocks) != total:
        _fail_split(f"--pipeline-partition {','.join(map(str, blocks))} must list {num_stages} block counts summing "
                    f"to {total} (--num-layers {num_layers} plus the embedding/loss blocks counted)")
    counts = list(blocks)
    counts[0] -= extra_first
    counts[-1] -= extra_last
    return counts


def split_layer_counts(num_layers: int, pp: int, vpp: int, split: PipelineSplit,
                       blocks: Optional[Sequence[int]] = None) -> list[int]:
    """Decoder layers of each virtual stage s = chunk * pp + pp_rank under Megatron's uneven flags.

    ``blocks``: an explicit ``--pipeline-partition`` list, counting the embedding / loss blocks when
    ``split`` accounts for them. ValueError (one line) for a split that cannot be made. A middle
    stage always holds at least one layer; only the first / last stage may hold none (it then
    holds just the embedding / the output layer).
    """
    num_stages = pp * vpp
    if split.uneven:
        if blocks is not None:
            _fail_split("--pipeline-partition lists and --decoder-first/last-pipeline-num-layers exclude each other")
        counts = _uneven_counts(num_layers, pp, vpp, split)
    else:
        counts = _accounted_counts(num_layers, num_stages, split, blocks)
    for s, c in enumerate(counts):
        if c < (0 if s in (0, num_stages - 1) else 1):
            _fail_split(f"pipeline stage {s} would hold {c} layers (counts {','.join(map(str, counts))}): "
                        "change the split flags or --num-layers")
    if num_stages == 1 and counts[0] < 1:
        _fail_split("a single pipeline stage needs at least one layer")
    return counts


def _ranges(counts: Sequence[int]) -> Partition:
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def partition_layers(config: GPTConfig, num_stages: int, method: Union[str, Sequence[int]] = "uniform",
                     split: Optional[PipelineSplit] = None, pp_size: Optional[int] = None) -> Partition:
    """Layer range [start, end) of every stage, for ``method`` 'uniform', 'parameters' or counts;
    with an active ``split`` (Megatron's uneven flags; ``pp_size`` ranks x ``num_stages / pp_size``
    virtual chunks) the ranges of :func:`split_layer_counts`."""
    if split is not None and split.active:
        pp = pp_size or num_stages
        if isinstance(method, str) and method == "parameters":
            raise ValueError("--pipeline-partition parameters and Megatron's uneven split flags exclude each other")
        blocks = None
        if isinstance(method, str) and method != "uniform":
            try:
                blocks = [int(x) for x in method.split(",")]
            except ValueError:
                raise ValueError(f"--pipeline-partition {method!r} is not 'uniform' or a list of counts") from None
        elif not isinstance(method, str):
            blocks = list(method)
        return _ranges(split_layer_counts(config.num_layers, pp, num_stages // pp, split, blocks))
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
    split: Optional[PipelineSplit] = None,
) -> list[GPTModel]:
    """This rank's model chunks: chunk c is virtual stage ``c * pp + pp_rank`` of the partition."""
    stages = partition_layers(config, state.pp_size * num_chunks, method, split, state.pp_size)
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
