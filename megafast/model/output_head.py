"""The last pipeline stage's output layer and loss: hidden states -> vocabulary-parallel logits or loss.

    logits_i = x W_i^T (+ s B_i A x with a LoRA adapter)     W = [W_1; ...; W_p] split by vocab rows
    loss     = vocab_parallel_cross_entropy(logits, labels)   (megafast.kernels)

With ``--fused-linear-cross-entropy`` (and no adapter on the output layer) the two run as one
kernel that never materialises the [s, b, V/p] logits (``megafast.kernels.fused_linear_cross_entropy``).

Tied embeddings: on a stage that also holds the embedding the output layer has no weight of its
own and multiplies by ``embedding.word_embeddings.weight`` (the caller passes it). With
pipelining the last stage keeps its own copy, initialised from the embedding's generator (so equal
to it) and marked ``shared_embedding``: the trainer sums its gradient with the first stage's over
``ParallelState.embedding_group``, as Megatron does, which keeps the two equal.

The model registers the head as ``output_layer``, so its weight keeps Megatron's key
``output_layer.weight`` (absent when tied on the stage) and a LoRA adapter on it is
``output_layer.adapter.linear_{in,out}.weight``, like the column-parallel layers it behaves as.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megafast.config import GPTConfig
from megafast.kernels import fused_linear_cross_entropy, vocab_parallel_cross_entropy
from megafast.model import init
from megafast.parallel.layers import _make_weight, column_parallel_input, column_parallel_linear
from megafast.parallel.mappings import group_size
from megafast.parallel.state import ParallelState

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


class OutputHead(nn.Module):
    """Output layer (column-parallel by vocabulary, no bias) plus the language-model loss.

    ``tied_on_stage``: the embedding on this same stage provides the weight (no parameter here).
    Otherwise ``weight`` [V_padded/p, h] is this rank's shard, drawn as ``output_layer.weight``
    or, tied across stages, as the embedding's weight.
    """

    partition_stride = 1  # the column-parallel layout LoRA's adapter follows (one block of rows)

    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        seed: int,
        *,
        tied_on_stage: bool,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp_group = state.tp_group
        self.sequence_parallel = state.sequence_parallel and group_size(state.tp_group) > 1
        if tied_on_stage:
            self.register_parameter("weight", None)
        else:
            name = WORD_EMBEDDINGS if config.tie_embeddings else OUTPUT_LAYER
            init_method = init.for_param(config, seed, name, valid_rows=config.vocab_size)
            self.weight = _make_weight(
                (config.padded_vocab_size(state.tp_size), config.hidden_size), 0, state.tp_group, 1,
                init_method, params_dtype, device,
            )
            self.weight.shared_embedding = config.tie_embeddings
        self.adapter: Optional[nn.Module] = None  # LoRA: x -> [s, b, V/p], added to the logits

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        embedding_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [s(/p), b, h] (final-normed) -> per-token loss [b, s] (fp32; 0 where labels == -100)
        when ``labels`` [b, s] are given, else logits [b, s, V_padded/p].

        ``embedding_weight`` [V/p, h]: the tied embedding matrix, needed exactly when the head has
        no weight of its own.
        """
        assert (self.weight is None) == (embedding_weight is not None), "embedding_weight iff tied here"
        weight = self.weight if self.weight is not None else embedding_weight  # [V/p, h]
        kernels = self.config.kernel_config
        # (a LoRA adapter on the output layer needs its logits: the unfused path)
        if labels is not None and self.config.fused_linear_cross_entropy and self.adapter is None:
            # x [s(/p), b, h] -> [s, b, h] on every TP rank; backward all-reduces (reduce-scatters) dx
            x = column_parallel_input(x, self.tp_group, self.sequence_parallel)
            loss = fused_linear_cross_entropy(
                x, weight, labels.t(), tp_group=self.tp_group, vocab_size=self.config.vocab_size,
                backend=kernels.kernels,
            )
            return loss.t()  # [b, s]
        logits = column_parallel_linear(x, weight, None, self.tp_group, self.sequence_parallel)  # [s, b, V/p]
        if self.adapter is not None:
            logits = logits + self.adapter(x)
        if labels is None:
            return logits.transpose(0, 1)
        loss = vocab_parallel_cross_entropy(  # the logits are ours: the loss may overwrite them
            logits, labels.t(), self.tp_group, self.config.vocab_size, backend=kernels.kernels, inplace=True
        )
        return loss.t()  # [b, s]
