"""Tensor-parallel building blocks and the process-group state they are given explicitly."""

from megafast.parallel.cross_entropy import vocab_parallel_cross_entropy
from megafast.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    sync_sequence_parallel_grads,
)
from megafast.parallel.random import RNGStatesTracker, model_parallel_rng_tracker
from megafast.parallel.state import ParallelState

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "model_parallel_rng_tracker",
    "sync_sequence_parallel_grads",
    "vocab_parallel_cross_entropy",
]
