"""GPTModel: GPT-2 and Llama-family decoders built from tensor-parallel layers, one pipeline stage.

A stage holds a contiguous range of layers; the first stage also holds the embedding, the last
the final norm and the output layer. Parameter names are Megatron-core's with global layer indices
(``decoder.layers.7.*`` is layer 7 on whichever stage holds it).

Tied embeddings (``tie_embeddings``): on a single stage the output layer uses
``embedding.word_embeddings.weight``. With pipelining the last stage keeps its own
``output_layer.weight``, initialised from the same generator as the embedding (so equal to it)
and marked ``shared_embedding``: the trainer sums its gradient with the first stage's over
``ParallelState.embedding_group``, as Megatron does, which keeps the two equal.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.kernels import fused_linear_cross_entropy, vocab_parallel_cross_entropy
from megafast.model import init
from megafast.model.kv_cache import InferenceParams
from megafast.model.norm import build_norm
from megafast.model.packing import PackedSeqParams
from megafast.model.rotary import RotaryEmbedding
from megafast.model.recompute import recompute_plan
from megafast.model.transformer import TransformerLayer
from megafast.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    column_parallel_input,
    column_parallel_linear,
)
from megafast.parallel.mappings import scatter_to_sequence_parallel_region
from megafast.parallel.random import checkpointed, model_parallel_rng_tracker
from megafast.parallel.state import ParallelState

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def uniform_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Layers [start, end) of stage ``pp_rank`` when L layers are spread evenly over P stages."""
    return pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size


class Embedding(nn.Module):
    """Word embeddings (vocabulary-parallel) plus learned absolute positions for GPT-2."""

    def __init__(self, config: GPTConfig, state: ParallelState, seed: int, **factory) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size(state.tp_size),
            config.hidden_size,
            tp_group=state.tp_group,
            init_method=init.for_param(config, seed, WORD_EMBEDDINGS, valid_rows=config.vocab_size),
            **factory,
        )
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size, dtype=factory["params_dtype"], device=factory["device"]
            )
            with torch.no_grad():
                full = torch.empty(self.position_embeddings.weight.shape)
                init.for_param(config, seed, "embedding.position_embeddings.weight")(full)
                self.position_embeddings.weight.copy_(full)
        else:
            self.position_embeddings = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """ids, positions [b, s] -> [s, b, h] (replicated on the TP ranks)."""
        x = self.word_embeddings(input_ids.t())  # [s, b, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids.t())
        return x


def _run(layers: list[TransformerLayer], x: torch.Tensor, rope, packed_seq_params, inference_params=None):
    """The layers one after the other (one recompute group)."""
    for layer in layers:
        x = layer(x, rope, packed_seq_params, inference_params)
    return x


class Decoder(nn.Module):
    def __init__(self, layers: dict[str, TransformerLayer], final_layernorm: Optional[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)  # keys are global layer indices
        self.final_layernorm = final_layernorm


class GPTModel(nn.Module):
    """One pipeline stage of a GPT/Llama model on this rank's TP shard.

    ``layer_range`` defaults to an even split over the pipeline stages; ``pre_process`` (holds
    the embedding) and ``post_process`` (final norm, output layer, loss) default to being the
    first and last stage. ``seed`` fixes the initial weights (identical at any TP/PP) and the
    tensor-parallel dropout stream.
    """

    def __init__(
        self,
        config: GPTConfig,
        state: Optional[ParallelState] = None,
        *,
        seed: int = 1234,
        layer_range: Optional[tuple[int, int]] = None,
        pre_process: Optional[bool] = None,
        post_process: Optional[bool] = None,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        state = state or ParallelState.single()
        validate_layout(
            config,
            ParallelConfig(state.tp_size, state.pp_size, state.sequence_parallel),
        )
        self.config = config
        self.state = state
        device = torch.device(device) if device is not None else None
        factory = dict(params_dtype=params_dtype, device=device)
        self.tracker = model_parallel_rng_tracker(seed, state.tp_rank, device or "cpu")
        # Defaults: this rank's pipeline stage; interleaved virtual chunks pass both explicitly.
        self.pre_process = state.is_first_stage if pre_process is None else pre_process
        self.post_process = state.is_last_stage if post_process is None else post_process
        start, end = layer_range or uniform_layer_range(config.num_layers, state.pp_size, state.pp_rank)
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is empty or outside the {config.num_layers} layers")
        self.layer_range = (start, end)

        self.embedding = Embedding(config, state, seed, **factory) if self.pre_process else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rotary_base) if config.position_embedding_type == "rope" else None
        )
        layers = {str(i): TransformerLayer(config, state, i, self.tracker, seed, **factory) for i in range(start, end)}
        final_norm = build_norm(config, state.sequence_parallel, **factory) if self.post_process else None
        self.decoder = Decoder(layers, final_norm)

        self.output_layer = None
        if self.post_process and not (config.tie_embeddings and self.pre_process):
            name = WORD_EMBEDDINGS if config.tie_embeddings else "output_layer.weight"
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                config.padded_vocab_size(state.tp_size),
                tp_group=state.tp_group,
                bias=False,
                sequence_parallel=state.sequence_parallel,
                init_method=init.for_param(config, seed, name, valid_rows=config.vocab_size),
                **factory,
            )
            self.output_layer.weight.shared_embedding = config.tie_embeddings

    def shared_embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient is summed over ``embedding_group`` (tied, pipelined)."""
        if not self.config.tie_embeddings or (self.pre_process and self.post_process):
            return []
        if self.pre_process:
            return [self.embedding.word_embeddings.weight]
        return [self.output_layer.weight] if self.post_process else []

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        hidden_states: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> torch.Tensor:
        """First stage: ``input_ids`` [b, s]; later stages: ``hidden_states`` from the previous one.

        ``position_ids`` [b, s] (any stage; default 0..s-1) feed the learned position embedding or
        RoPE; ``packed_seq_params`` confines attention to each sample of packed rows (with
        positions restarting per sample, see megafast.model.packing). ``inference_params`` holds
        this stage's KV cache for incremental decoding: pass ``position_ids`` offset .. offset + s - 1
        (offset = ``inference_params.sequence_len_offset``) on every stage.

        Returns, on the last stage, the per-token loss [b, s] (fp32; 0 where labels == -100) when
        ``labels`` [b, s] are given, else vocabulary-parallel logits [b, s, V_padded/p]; on other
        stages the hidden states [s, b, h] ([s/p, b, h] with sequence parallelism) for the next.
        """
        if inference_params is not None and (position_ids is None or self.state.sequence_parallel):
            raise ValueError(
                "incremental decoding needs position_ids on every stage and no sequence parallelism"
            )
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            b, s = input_ids.shape
            positions = position_ids
            if positions is None:
                positions = torch.arange(s, device=input_ids.device).expand(b, s)
            x = self.embedding(input_ids, positions)
            if self.state.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x, self.state.tp_group)  # [s/p, b, h]
            x = self._embedding_dropout(x)
        else:
            if hidden_states is None:
                raise ValueError("a pipeline stage after the first needs hidden_states")
            x = hidden_states
        seq_len = x.shape[0] * (self.state.tp_size if self.state.sequence_parallel else 1)
        rope = None
        if self.rotary is not None and position_ids is not None:
            offset = inference_params.sequence_len_offset if inference_params is not None else 0
            rope = self.rotary.for_positions(position_ids, seq_len + offset)  # [s, b, 1, d] each
        elif self.rotary is not None:
            rope = self.rotary(seq_len, x.device)  # [s, 1, 1, d] each

        layers = list(self.decoder.layers.values())
        plan = recompute_plan(self.config, len(layers)) if self.training else [(0, len(layers), False)]
        for start, end, recompute in plan:
            if recompute:  # keeps only x; backward reruns layers[start:end] with the same dropout
                group = functools.partial(_run, layers[start:end])
                x = checkpointed(group, self.tracker, x, rope, packed_seq_params)
            else:
                x = _run(layers[start:end], x, rope, packed_seq_params, inference_params)
        if not self.post_process:
            return x

        x = self.decoder.final_layernorm(x)
        state, kernels = self.state, self.config.kernel_config
        owner = self.output_layer if self.output_layer is not None else self.embedding.word_embeddings
        weight = owner.weight  # [V/p, h]
        # (a LoRA adapter on the output layer needs its logits: the unfused path)
        if labels is not None and self.config.fused_linear_cross_entropy and self._output_adapter() is None:
            # x [s(/p), b, h] -> [s, b, h] on every TP rank; backward all-reduces (reduce-scatters) dx
            x = column_parallel_input(x, state.tp_group, state.sequence_parallel)
            loss = fused_linear_cross_entropy(
                x, weight, labels.t(), tp_group=state.tp_group, vocab_size=self.config.vocab_size,
                backend=kernels.kernels,
            )
            return loss.t()  # [b, s]
        if self.output_layer is not None:
            logits = self.output_layer(x)  # [s, b, V/p]
        else:  # tied on this stage: the embedding matrix is the output layer's weight
            logits = column_parallel_linear(x, weight, None, state.tp_group, state.sequence_parallel)
        if labels is None:
            return logits.transpose(0, 1)
        loss = vocab_parallel_cross_entropy(
            logits, labels.t(), state.tp_group, self.config.vocab_size, backend=kernels.kernels
        )
        return loss.t()  # [b, s]

    def _output_adapter(self) -> Optional[nn.Module]:
        return self.output_layer.adapter if self.output_layer is not None else None

    def _embedding_dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.hidden_dropout
        if not self.training or p == 0.0:
            return x
        if self.state.sequence_parallel:
            with self.tracker.fork():
                return F.dropout(x, p, training=True)
        return F.dropout(x, p, training=True)
