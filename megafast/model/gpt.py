"""GPTModel: GPT-2 and Llama-family decoders built from tensor-parallel layers, one pipeline stage.

A stage holds a contiguous range of layers; the first stage also holds the embedding, the last
the final norm and the output head. The forward pass is three modules in a row:

    embedding (first stage)  ids [b, s] -> [s(/p), b, h]          Embedding, below
    decoder                  [s(/p), b, h] -> [s(/p), b, h]       Decoder: layers + final norm
    output head (last stage) -> loss [b, s] or logits [b, s, V/p]  megafast.model.output_head

Parameter names are Megatron-core's with global layer indices (``decoder.layers.7.*`` is layer 7
on whichever stage holds it); the output head is registered as ``output_layer``, so its weight is
``output_layer.weight``. Tied embeddings: see megafast.model.output_head.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.model import init
from megafast.model.kv_cache import InferenceParams
from megafast.model.moe import MoELossTracker
from megafast.model.norm import build_norm
from megafast.model.output_head import WORD_EMBEDDINGS, OutputHead
from megafast.model.packing import PackedSeqParams
from megafast.model.rotary import RotaryEmbedding
from megafast.model.recompute import recompute_plan
from megafast.model.transformer import TransformerLayer
from megafast.parallel.context_parallel import local_token_index
from megafast.parallel.layers import VocabParallelEmbedding
from megafast.parallel.mappings import scatter_to_sequence_parallel_region
from megafast.parallel.random import (
    RNGStatesTracker,
    checkpointed,
    model_parallel_rng_tracker,
    tensor_parallel_dropout,
)
from megafast.parallel.state import ParallelState


def uniform_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Layers [start, end) of stage ``pp_rank`` when L layers are spread evenly over P stages."""
    return pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size


class Embedding(nn.Module):
    """Word embeddings (vocabulary-parallel) plus learned absolute positions for GPT-2, then (with
    sequence parallelism) this rank's sequence shard, then hidden dropout."""

    def __init__(
        self, config: GPTConfig, state: ParallelState, seed: int, tracker: RNGStatesTracker, **factory
    ) -> None:
        super().__init__()
        self.state = state
        self.hidden_dropout = config.hidden_dropout
        self.tracker = tracker
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

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ids, positions [b, s] (default 0..s-1) -> [s, b, h], or this rank's [s/p, b, h] with
        sequence parallelism."""
        x = self.word_embeddings(input_ids.t())  # [s, b, h] (replicated on the TP ranks)
        if self.position_embeddings is not None:
            if position_ids is None:
                b, s = input_ids.shape
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
            x = x + self.position_embeddings(position_ids.t())
        if self.state.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.state.tp_group)  # [s/p, b, h]
        # a sequence shard differs per TP rank: independent masks; replicated x: the same mask
        return tensor_parallel_dropout(
            x, self.hidden_dropout, training=self.training, tracker=self.tracker, sharded=self.state.sequence_parallel
        )


def _run(layers: list[TransformerLayer], x: torch.Tensor, rope, packed_seq_params, inference_params=None):
    """The layers one after the other (one recompute group)."""
    for layer in layers:
        x = layer(x, rope, packed_seq_params, inference_params)
    return x


class Decoder(nn.Module):
    """This stage's transformer layers (keys are global layer indices), under the activation
    recompute plan when training, then the final norm on the last stage."""

    def __init__(
        self,
        config: GPTConfig,
        tracker: RNGStatesTracker,
        layers: dict[str, TransformerLayer],
        final_layernorm: Optional[nn.Module],
    ) -> None:
        super().__init__()
        self.config = config
        self.tracker = tracker
        self.layers = nn.ModuleDict(layers)
        self.final_layernorm = final_layernorm

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> torch.Tensor:
        """[s(/p), b, h] -> [s(/p), b, h]."""
        layers = list(self.layers.values())
        plan = recompute_plan(self.config, len(layers)) if self.training else [(0, len(layers), False)]
        for start, end, recompute in plan:
            if recompute:  # keeps only x; backward reruns layers[start:end] with the same dropout
                group = functools.partial(_run, layers[start:end])
                x = checkpointed(group, self.tracker, x, rope, packed_seq_params)
            else:
                x = _run(layers[start:end], x, rope, packed_seq_params, inference_params)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x


class GPTModel(nn.Module):
    """One pipeline stage of a GPT/Llama model on this rank's TP shard.

    ``layer_range`` defaults to an even split over the pipeline stages; ``pre_process`` (holds
    the embedding) and ``post_process`` (final norm, output head) default to being the
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
            ParallelConfig(state.tp_size, state.pp_size, state.sequence_parallel, state.cp_size, state.cp_comm_type,
                           state.ep_size),
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
        # an empty range only on a stage holding the embedding or the output layer (uneven pipeline splits)
        if not 0 <= start <= end <= config.num_layers or (start == end and not (self.pre_process or self.post_process)):
            raise ValueError(f"layer range [{start}, {end}) is empty or outside the {config.num_layers} layers")
        self.layer_range = (start, end)

        self.embedding = Embedding(config, state, seed, self.tracker, **factory) if self.pre_process else None
        self.rotary = (
            RotaryEmbedding.from_config(config) if config.position_embedding_type == "rope" else None
        )
        # MoE: the router losses' gradient scale and logged values (megafast.model.moe.aux_loss)
        self.moe_loss_tracker = MoELossTracker() if config.is_moe else None
        layers = {
            str(i): TransformerLayer(config, state, i, self.tracker, seed, self.moe_loss_tracker, **factory)
            for i in range(start, end)
        }
        final_norm = build_norm(config, state.sequence_parallel, **factory) if self.post_process else None
        self.decoder = Decoder(config, self.tracker, layers, final_norm)
        # registered as ``output_layer``: Megatron's key output_layer.weight (no weight when tied on this stage)
        self.output_layer = (
            OutputHead(config, state, seed, tied_on_stage=config.tie_embeddings and self.pre_process, **factory)
            if self.post_process
            else None
        )

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
        if inference_params is not None and self.state.cp_size > 1:
            raise ValueError("incremental decoding runs without context parallelism: use context parallel size 1")
        if position_ids is None and self.state.cp_size > 1:  # this CP rank's chunks of 0..s-1
            b, s_local = input_ids.shape if input_ids is not None else (
                hidden_states.shape[1], hidden_states.shape[0] * (self.state.tp_size if self.state.sequence_parallel else 1))
            device = (input_ids if input_ids is not None else hidden_states).device
            held = local_token_index(s_local * self.state.cp_size, self.state.cp_size, self.state.cp_rank, device)
            position_ids = held.expand(b, s_local)
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            x = self.embedding(input_ids, position_ids)  # [s(/p), b, h]
        else:
            if hidden_states is None:
                raise ValueError("a pipeline stage after the first needs hidden_states")
            x = hidden_states
        rope = self._rope(x, position_ids, inference_params)
        x = self.decoder(x, rope, packed_seq_params, inference_params)
        if not self.post_process:
            return x
        tied = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        return self.output_layer(x, labels, tied)

    def _rope(
        self,
        x: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        inference_params: Optional[InferenceParams],
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """RoPE cos, sin for the positions of x [s(/p), b, h]: [s, b, 1, d] each for explicit
        ``position_ids``, else [s, 1, 1, d] for 0..s-1; None without RoPE."""
        if self.rotary is None:
            return None
        seq_len = x.shape[0] * (self.state.tp_size if self.state.sequence_parallel else 1)
        seq_len *= self.state.cp_size  # context parallelism: positions of the whole sequence
        if position_ids is not None:
            offset = inference_params.sequence_len_offset if inference_params is not None else 0
            return self.rotary.for_positions(position_ids, seq_len + offset)
        return self.rotary(seq_len, x.device)
