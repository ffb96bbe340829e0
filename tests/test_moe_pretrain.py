"""A tiny MoE Llama (4 experts, top-2, aux and z losses, one dense layer) trained by pretrain_gpt.py
under torchrun: per-iteration lm_loss and router losses at TP=2 (with and without sequence
parallelism) and at PP=2 x DP=2 equal TP=1's within 1e-5, and the loss falls."""

from __future__ import annotations

import random

import numpy as np
import pytest

from megafast.data.indexed_dataset import IndexedDatasetBuilder
from pretrain_run import MODEL, TRAIN, VOCAB, data_args, torchrun, train_records

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
       "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--moe-layer-freq", "[1,1,0,1]"]
LAYOUTS = [  # (nproc, extra flags)
    (1, []),
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--pipeline-model-parallel-size", "2"]),  # DP = 2
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int]:
    """Learnable documents (each counts up from a random start with a random stride)."""
    seed = random.SystemRandom().randrange(1 << 31)
    prefix = str(tmp_path_factory.mktemp(f"moe_corpus_seed{seed}_") / "corpus_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix, seed


def test_moe_trains_the_same_at_every_layout(corpus, tmp_path):
    prefix, seed = corpus
    runs = []
    for i, (nproc, extra) in enumerate(LAYOUTS):
        log = tmp_path / f"layout{i}.jsonl"
        proc = torchrun(nproc, MODEL + MOE + TRAIN + data_args(prefix, tmp_path) + extra +
                        ["--train-iters", "8", "--attention-dropout", "0", "--hidden-dropout", "0",
                         "--log-jsonl", str(log)])
        if i == 0:
            assert "load_balancing_loss:" in proc.stdout and "z_loss:" in proc.stdout, proc.stdout[-2000:]
        recs = train_records(log)
        assert sorted(recs) == list(range(1, 9))
        runs.append({key: np.array([recs[it][key] for it in range(1, 9)])
                     for key in ("lm_loss", "load_balancing_loss", "z_loss")})
    ref = runs[0]
    assert ref["lm_loss"][-1] < ref["lm_loss"][0], f"loss did not fall: {ref['lm_loss']} (corpus seed {seed})"
    assert (ref["load_balancing_loss"] > 0).all() and (ref["z_loss"] > 0).all()
    for (nproc, extra), got in zip(LAYOUTS[1:], runs[1:]):
        for key, want in ref.items():
            err = np.max(np.abs(got[key] - want) / np.abs(want))
            assert err <= 1e-5, (f"{nproc} procs {extra}: {key} relative error {err:.2e} (corpus seed {seed})\n"
                                 f"{got[key].tolist()}\n{want.tolist()}")


def test_moe_flag_errors_are_one_line():
    from megafast.arguments import parse_args, validate_args

    flags = [f for f in MOE if f not in ("--moe-layer-freq", "[1,1,0,1]")]
    for extra, message in (
        (["--moe-router-topk", "5"], "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (["--expert-model-parallel-size", "3"], "--expert-model-parallel-size 3 does not divide --num-experts 4"),
        (["--moe-layer-freq", "[1,0]"], "must list 0 (dense) or 1 (MoE) for each of the 4 layers"),
        (["--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"], "--moe-router-pre-softmax"),
    ):
        args = parse_args(MODEL + flags + extra + TRAIN + ["--mock-data", "--vocab-size", "100", "--train-iters", "1"])
        with pytest.raises(SystemExit) as err:
            validate_args(args, 1)
        assert message in str(err.value) and "\n" not in str(err.value)
    assert parse_args(MODEL + TRAIN + ["--moe-layer-freq", "([1]*3+[0])*2"]).moe_layer_freq == (1, 1, 1, 0, 1, 1, 1, 0)
    assert parse_args(MODEL + TRAIN + ["--moe-layer-freq", "2"]).moe_layer_freq == 2
    with pytest.raises(SystemExit):
        parse_args(MODEL + TRAIN + ["--moe-layer-freq", "__import__('os')"])
