"""Packed sequences: a packed batch gives exactly the loss (and gradients) of its samples run one by
one, no token attends across a sample boundary (checked on the attention weights), positions
restart per sample, and the flash-attn varlen description (cu_seqlens) matches the segments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megafast.config import GPTConfig
from megafast.model import GPTModel
from megafast.model.packing import PackedSeqParams, segment_ids_from_lengths
from megafast.model.rotary import RotaryEmbedding

VOCAB = 101
S = 24
LENGTHS = [[5, 9, 3], [12, 7], [24]]  # samples per row; rows 0 and 1 end with padding

CONFIGS = {
    "llama": dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                  add_bias_linear=False, num_query_groups=2, tie_embeddings=False),
    "gpt2": dict(position_embedding_type="learned_absolute"),
}


def config(name: str) -> GPTConfig:
    return GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
                     max_position_embeddings=S, init_method_std=0.1, make_vocab_size_divisible_by=1,
                     **CONFIGS[name])


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    segments = segment_ids_from_lengths(LENGTHS, S)
    positions = torch.zeros(b, S, dtype=torch.int64)
    for r in range(b):
        for seg in segments[r].unique():
            where = segments[r] == seg
            positions[r, where] = torch.arange(int(where.sum()))
    mask = (torch.rand(b, S, generator=g) > 0.3).float()
    for r, lengths in enumerate(LENGTHS):
        mask[r, sum(lengths):] = 0.0  # padding is never learned from
    return {"ids": torch.randint(0, VOCAB, (b, S), generator=g), "labels": torch.randint(0, VOCAB, (b, S), generator=g),
            "segments": segments, "positions": positions, "mask": mask}


def spans() -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample."""
    out = []
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            out.append((r, start, start + n))
            start += n
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_loss_and_grads_equal_samples_one_by_one(name):
    data = packed_batch()
    model = GPTModel(config(name), seed=11)
    token_loss = model(data["ids"], position_ids=data["positions"], labels=data["labels"],
                       packed_seq_params=PackedSeqParams(data["segments"]))  # [b, s]
    packed = (token_loss * data["mask"]).sum() / data["mask"].sum()
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total, count = torch.zeros((), dtype=torch.float64), 0.0
    per_sample = []
    for r, a, b in spans():
        loss = model(data["ids"][r:r + 1, a:b], labels=data["labels"][r:r + 1, a:b])  # positions 0..n-1
        per_sample.append(loss[0])
        total = total + (loss[0] * data["mask"][r, a:b]).sum().double()
        count += float(data["mask"][r, a:b].sum())
    (total / count).float().backward()
    weighted = (total / count).item()
    assert abs(packed.item() - weighted) <= 1e-5 * abs(weighted), (packed.item(), weighted)
    for (r, a, b), loss in zip(spans(), per_sample):
        assert torch.allclose(token_loss[r, a:b], loss, rtol=1e-5, atol=1e-6), f"sample at row {r} [{a}, {b})"
    for n, p in model.named_parameters():
        err = ((p.grad - packed_grads[n]).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, f"{name} grad {n}: relative error {err:.2e}"


def test_no_token_attends_across_a_sample_boundary(monkeypatch):
    """Every attention call's weights (recomputed explicitly from what SDPA received) are zero across
    samples and in the future, and changing one sample leaves the others' logits unchanged."""
    data = packed_batch(1)
    model = GPTModel(config("llama"), seed=5).eval()
    packed = PackedSeqParams(data["segments"])
    with torch.no_grad():
        plain = model(data["ids"], position_ids=data["positions"], packed_seq_params=packed)
    recorded: list[torch.Tensor] = []
    original = F.scaled_dot_product_attention

    def explicit(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        assert attn_mask is not None and not is_causal, "packed attention must pass its block mask"
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, heads, s, s]
        weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
        recorded.append(weights.detach())
        return weights @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit)
    with torch.no_grad():
        via_weights = model(data["ids"], position_ids=data["positions"], packed_seq_params=packed)
    monkeypatch.setattr(F, "scaled_dot_product_attention", original)
    assert len(recorded) == 2  # one per layer
    assert torch.allclose(via_weights, plain, rtol=1e-5, atol=1e-5)  # the recorded weights are the computation
    # Allowed: the earlier tokens of the same sample, from LENGTHS by hand (not from the segment ids
    # given to the model); a padding token may attend only to earlier padding.
    allowed = torch.zeros(len(LENGTHS), S, S, dtype=torch.bool)  # [b, s, s]
    for r, start, end in spans() + [(r, sum(lengths), S) for r, lengths in enumerate(LENGTHS)]:
        allowed[r, start:end, start:end] = True
    allowed &= torch.ones(S, S, dtype=torch.bool).tril()
    for weights in recorded:
        assert torch.all(weights.masked_select(~allowed[:, None]) == 0), "attention crosses a sample boundary"
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)

    changed = data["ids"].clone()
    changed[0, 5:14] = (changed[0, 5:14] + 1) % VOCAB  # sample 2 of row 0
    with torch.no_grad():
        other = model(changed, position_ids=data["positions"], packed_seq_params=packed)
    keep = torch.ones(S, dtype=torch.bool)
    keep[5:14] = False
    assert torch.allclose(other[0, keep], plain[0, keep], rtol=0, atol=1e-6)
    assert not torch.allclose(other[0, 5:14], plain[0, 5:14])


def test_cu_seqlens_and_mask_describe_the_segments():
    seg = segment_ids_from_lengths([[2, 3], [4]], 6)
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    packed = PackedSeqParams(seg)
    assert packed.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 4
    mask = packed.attention_mask()
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="exceed the sequence length"):
        segment_ids_from_lengths([[4, 4]], 6)


def test_rope_honours_position_ids():
    rope = RotaryEmbedding(8, 10000.0)
    cos, sin = rope(6, torch.device("cpu"))  # [s, 1, 1, d]
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    pcos, psin = rope.for_positions(positions, 6)  # [s, b, 1, d]
    assert pcos.shape == (6, 2, 1, 8)
    assert torch.equal(pcos[:, 1], cos[:, 0]) and torch.equal(psin[:, 1], sin[:, 0])
    assert torch.equal(pcos[3, 0], cos[0, 0]) and torch.equal(psin[4, 0], sin[1, 0])


def packed_tp_worker(rank: int, world: int) -> torch.Tensor:
    from megafast.config import ParallelConfig
    from megafast.parallel import ParallelState

    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True))
    data = packed_batch(2)
    model = GPTModel(config("llama"), state, seed=9)
    with torch.no_grad():
        return model(data["ids"], position_ids=data["positions"], labels=data["labels"],
                     packed_seq_params=PackedSeqParams(data["segments"]))


def test_packing_under_tensor_and_sequence_parallelism():
    from dist import run_distributed

    data = packed_batch(2)
    with torch.no_grad():
        want = GPTModel(config("llama"), seed=9)(data["ids"], position_ids=data["positions"], labels=data["labels"],
                                                   packed_seq_params=PackedSeqParams(data["segments"]))
    got = run_distributed(packed_tp_worker, 2)[0]
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
