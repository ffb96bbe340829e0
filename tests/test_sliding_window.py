"""Sliding-window attention (``--window-size LEFT,0``): training losses against a plain-torch
reference with an explicit masked softmax (tests/reference_model.py), packed rows against their
samples one by one, KV-cached decoding against the full forward, and pretrain_gpt.py end to end
(TP=1 and TP=2 with sequence parallelism give the same per-iteration losses; the window changes
them). HF Mistral/Qwen2 windows: tests/test_hf_families.py."""

from __future__ import annotations

import dataclasses

import torch
from pretrain_run import MODEL, TRAIN, torchrun, train_records
from reference_model import RefGPT
from seeding import draw_seed

from megafast.config import GPTConfig
from megafast.model import GPTModel
from megafast.model.kv_cache import InferenceParams
from megafast.model.packing import PackedSeqParams, segment_ids_from_lengths
from megafast.model.sliding_window import window_mask

VOCAB, S = 97, 16


def llama(**kw) -> GPTConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=VOCAB, max_position_embeddings=64, position_embedding_type="rope", normalization="RMSNorm",
                activation="swiglu", add_bias_linear=False, tie_embeddings=False, init_method_std=0.1,
                make_vocab_size_divisible_by=1, window_size=(4, 0))
    base.update(kw)
    return GPTConfig(**base)


def test_window_mask_is_the_band_below_the_diagonal():
    pos = torch.arange(6)
    mask = window_mask(pos, pos, (2, 0))
    want = [[int(0 <= i - j <= 2) for j in range(6)] for i in range(6)]
    assert mask.int().tolist() == want


def test_training_losses_equal_the_masked_reference():
    """Six AdamW steps on random batches: the per-iteration loss of megafast's model with a window
    of 4 equals the reference's (same initial weights, same optimizer) within 1e-5."""
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    config = llama()
    model = GPTModel(config, seed=seed)
    ref = RefGPT(config)
    ref.load_megafast({n: p.detach().clone() for n, p in model.named_parameters()})
    no_window = GPTModel(dataclasses.replace(config, window_size=None), seed=seed)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01) for m in (model, ref)]
    g = torch.Generator().manual_seed(data_seed)
    for it in range(6):
        ids, labels = torch.randint(0, VOCAB, (2, S), generator=g), torch.randint(0, VOCAB, (2, S), generator=g)
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = (m(ids, labels=labels) if m is model else m.loss(ids, labels)).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        got, want = losses
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {it}: {got} != {want} (seeds {seed}, {data_seed})"
        if it == 0:
            with torch.no_grad():
                plain = no_window(ids, labels=labels).mean().item()
            assert abs(plain - want) > 1e-3, "the window changed nothing: test too weak"


def test_packed_rows_with_a_window_equal_their_samples_one_by_one():
    lengths = [[5, 9, 2], [16]]
    segments = segment_ids_from_lengths(lengths, S)
    positions = torch.zeros(2, S, dtype=torch.int64)
    for r in range(2):
        for seg in segments[r].unique():
            where = segments[r] == seg
            positions[r, where] = torch.arange(int(where.sum()))
    g = torch.Generator().manual_seed(draw_seed("data_seed"))
    ids, labels = torch.randint(0, VOCAB, (2, S), generator=g), torch.randint(0, VOCAB, (2, S), generator=g)
    model = GPTModel(llama(window_size=(3, 0)), seed=draw_seed("seed"))
    packed = model(ids, position_ids=positions, labels=labels, packed_seq_params=PackedSeqParams(segments))
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = model(ids[r:r + 1, start:start + n], labels=labels[r:r + 1, start:start + n])[0]
            torch.testing.assert_close(packed[r, start:start + n], alone, rtol=1e-5, atol=1e-6)
            start += n


def test_triton_backend_window_equals_the_sdpa_mask():
    """--attention-backend triton with a window (the flash-attention kernel's window, in the
    interpreter) gives the loss and gradients of the SDPA masked path."""
    seed = draw_seed("seed")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(draw_seed("data_seed")))
    grads = []
    for backend in ("triton", "sdpa"):
        model = GPTModel(llama(window_size=(5, 0), attention_backend=backend, max_position_embeddings=64), seed=seed)
        loss = model(ids, labels=ids).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (lt, gt), (ls, gs) = grads
    torch.testing.assert_close(lt, ls, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")
    for a, b in zip(gt, gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"seed={seed}")


def test_kv_cache_decoding_with_a_window_equals_the_full_forward():
    model = GPTModel(llama(window_size=(3, 0)), seed=draw_seed("seed")).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(draw_seed("data_seed")))
    with torch.no_grad():
        want = model(ids)
        cache = InferenceParams(2, 20)
        got = []
        for start, end in [(0, 7), (7, 8), (8, 12)] + [(t, t + 1) for t in range(12, 20)]:
            positions = torch.arange(start, end).expand(2, end - start)
            got.append(model(ids[:, start:end], position_ids=positions, inference_params=cache))
            cache.advance(end - start)
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)


def test_pretrain_gpt_window_size_is_layout_invariant(tmp_path):
    mock = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--attention-dropout", "0", "--hidden-dropout", "0"]
    runs = {
        "tp1": (1, ["--window-size", "3,0", "--save", str(tmp_path / "ckpt"), "--save-interval", "5"]),
        "tp2_sp": (2, ["--window-size", "3,0", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        "no_window": (1, []),
    }
    losses = {}
    for name, (nproc, extra) in runs.items():
        log = tmp_path / f"{name}.jsonl"
        torchrun(nproc, MODEL + TRAIN + mock + extra + ["--train-iters", "5", "--log-jsonl", str(log)])
        records = train_records(log)
        losses[name] = [records[i]["lm_loss"] for i in range(1, 6)]
    for a, b in zip(losses["tp1"], losses["tp2_sp"]):
        assert abs(a - b) <= 1e-5 * abs(a), (losses["tp1"], losses["tp2_sp"])
    assert max(abs(a - b) for a, b in zip(losses["tp1"], losses["no_window"])) > 1e-4, losses
    # resuming with another window would silently train a different model: refused in one line
    resumed = MODEL + TRAIN + mock + ["--train-iters", "5", "--window-size", "2,0", "--load", str(tmp_path / "ckpt")]
    proc = torchrun(1, resumed, check=False)
    assert proc.returncode != 0
    assert "window_size=(3, 0) but this run has (2, 0)" in proc.stderr + proc.stdout, proc.stderr[-2000:]
