"""The pipeline engine on gloo (1F1B, GPipe, interleaved) equals one process running the whole model."""

from __future__ import annotations


import pytest
import torch

from dist import run_distributed
from seeding import draw_seed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.pipeline.engine import Microbatch, PipelineEngine
from megafast.pipeline.partition import (
    build_model_chunks,
    explicit_partition,
    layer_parameter_counts,
    parameter_balanced_partition,
    partition_layers,
)

B, S = 2, 8


def config(tied: bool) -> GPTConfig:
    return GPTConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=97,
        ffn_hidden_size=64, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
        add_bias_linear=False, tie_embeddings=tied, make_vocab_size_divisible_by=1, init_method_std=0.1,
    )


def microbatches(seed: int, n: int) -> list[Microbatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 97, (B, S), generator=g)
        labels = torch.randint(0, 97, (B, S), generator=g)
        mask = (torch.rand(B, S, generator=g) > 0.2).float()
        out.append(Microbatch(tokens, labels, mask))
    return out


def worker(rank, world, tied, chunks_per_rank, schedule, n_mb, seed, data_seed):
    state = ParallelState.create(ParallelConfig(pipeline_model_parallel_size=world))
    cfg = config(tied)
    chunks = build_model_chunks(cfg, state, seed=seed, num_chunks=chunks_per_rank)
    engine = PipelineEngine(chunks, state, (S, B, cfg.hidden_size), torch.float32, torch.device("cpu"), schedule)
    mbs = microbatches(data_seed, n_mb)
    denominator = float(sum(mb.loss_mask.sum() for mb in mbs))
    result = engine.run(mbs, denominator)
    grads = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            grads[name] = grads.get(name, 0) + p.grad
    fwd = engine.run(mbs, denominator, forward_only=True)
    return {"loss_sum": result.loss_sum, "fwd_loss_sum": fwd.loss_sum, "grads": grads}


@pytest.mark.parametrize(
    "world,tied,chunks,schedule,n_mb",
    [(2, True, 1, "1f1b", 3), (2, False, 1, "gpipe", 2), (2, True, 2, "1f1b", 4), (4, False, 1, "1f1b", 5)],
)
def test_pipeline_equals_single_process(world, tied, chunks, schedule, n_mb):
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    results = run_distributed(worker, world, tied, chunks, schedule, n_mb, seed, data_seed)

    model = GPTModel(config(tied), seed=seed)
    mbs = microbatches(data_seed, n_mb)
    denominator = float(sum(mb.loss_mask.sum() for mb in mbs))
    total = 0.0
    for mb in mbs:
        loss = (model(mb.tokens, labels=mb.labels) * mb.loss_mask).sum()
        (loss / denominator).backward()
        total += loss.item()
    last = results[-1]
    assert abs(last["loss_sum"].item() - total) <= 1e-5 * abs(total)
    assert abs(last["fwd_loss_sum"].item() - total) <= 1e-5 * abs(total)
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        for name, g in r["grads"].items():
            key = "embedding.word_embeddings.weight" if name == "output_layer.weight" and tied else name
            merged[key] = merged.get(key, 0) + g
    want = {n: p.grad for n, p in model.named_parameters()}
    assert set(merged) == set(want)
    for name, g in want.items():
        err = ((merged[name] - g).abs().max() / g.abs().max()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_partitions():
    cfg = config(False)
    assert partition_layers(cfg, 2) == [(0, 2), (2, 4)]
    assert partition_layers(cfg, 3, "1,2,1") == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(ValueError, match="summing to --num-layers 4"):
        partition_layers(cfg, 2, "1,2")
    with pytest.raises(ValueError, match="exceed the 4 layers"):
        partition_layers(cfg, 5)
    with pytest.raises(ValueError, match="comma-separated"):
        partition_layers(cfg, 2, "balanced")
    # a large vocabulary makes the first and last stages heavy: they get fewer layers
    big = GPTConfig(num_layers=16, hidden_size=64, num_attention_heads=4, vocab_size=6000)
    layer, first, last = layer_parameter_counts(big)

    def worst(bounds):
        return max((e - s) * layer + (first if i == 0 else 0) + (last if i == len(bounds) - 1 else 0)
                   for i, (s, e) in enumerate(bounds))

    bounds = parameter_balanced_partition(big, 4)
    sizes = [e - s for s, e in bounds]
    assert sum(sizes) == 16 and sizes[0] < max(sizes) and sizes[-1] < max(sizes), bounds
    assert worst(bounds) < worst(partition_layers(big, 4))
    # exhaustive check of optimality on a small case
    import itertools
    best = min(worst(explicit_partition(c, 16, 4)) for c in itertools.product(range(1, 14), repeat=4) if sum(c) == 16)
    assert worst(bounds) == best
