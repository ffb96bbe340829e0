"""Validation at ``--eval-interval`` and the TensorBoard scalars of a pretrain_gpt.py run (CPU/gloo, DP=2).

The validation loss logged at iterations 2 and 4 is recomputed here by a plain-torch model
(tests/reference_model.py) loaded from the checkpoints saved at those iterations, on the validation
samples each evaluation consumes (``--eval-iters`` global batches, continuing from the previous
evaluation): the token-weighted mean cross-entropy over the loss mask, and its exponential as the
perplexity. The TensorBoard event files, read back with tensorboard's EventAccumulator, hold the
same values as the --log-jsonl records, under Megatron-style tags.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_run import MODEL, TRAIN, VOCAB, data_args, torchrun
from reference_model import RefGPT
from seeding import draw_seed

from megafast.config import GPTConfig
from megafast.data.builder import build_gpt_datasets
from megafast.data.indexed_dataset import IndexedDatasetBuilder

GBS, SEQ, TRAIN_ITERS, EVAL_INTERVAL, EVAL_ITERS = 8, 16, 4, 2, 2
SEED = 4321  # TRAIN's --seed: the dataset's shuffling


def write_corpus(prefix: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(300):
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("eval")
    prefix = str(tmp / "corpus_text_document")
    write_corpus(prefix, draw_seed("corpus_seed"))
    log, tb, save = tmp / "log.jsonl", tmp / "tb", tmp / "ckpt"
    flags = [*MODEL, *TRAIN, *data_args(prefix, tmp), "--train-iters", str(TRAIN_ITERS),
             "--eval-interval", str(EVAL_INTERVAL), "--eval-iters", str(EVAL_ITERS),
             "--save-interval", str(EVAL_INTERVAL), "--save", str(save), "--log-jsonl", str(log),
             "--tensorboard-dir", str(tb)]
    torchrun(2, flags)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {"prefix": prefix, "tmp": tmp, "records": records, "tb": tb, "save": save}


def reference_model(checkpoint: Path) -> RefGPT:
    sd = torch.load(checkpoint / "mp_rank_00_000" / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    weights = {k: v for k, v in sd["model"].items() if k.endswith((".weight", ".bias"))}
    config = GPTConfig(  # MODEL's flags, written out
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=weights["embedding.word_embeddings.weight"].shape[0], max_position_embeddings=SEQ,
        position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        tie_embeddings=False, make_vocab_size_divisible_by=1,
    )
    ref = RefGPT(config)
    with torch.no_grad():
        ref.load_megafast(weights)
    return ref.eval()


def reference_validation_loss(run: dict, iteration: int) -> float:
    """Token-weighted mean loss over the samples of the evaluation at ``iteration`` (the k-th
    evaluation reads samples [(k-1) n, k n) of the validation split, n = eval iters x global batch)."""
    evals = (TRAIN_ITERS // EVAL_INTERVAL + 1) * EVAL_ITERS
    _, valid, _ = build_gpt_datasets(
        [run["prefix"]], "98,2,0", SEQ, [TRAIN_ITERS * GBS, evals * GBS, EVAL_ITERS * GBS], SEED,
        str(run["tmp"] / "cache"), eod_token_id=VOCAB - 1,
    )
    n = EVAL_ITERS * GBS
    first = (iteration // EVAL_INTERVAL - 1) * n
    samples = [valid[i] for i in range(first, first + n)]
    ids = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).double()
    model = reference_model(run["save"] / f"iter_{iteration:07d}")
    with torch.no_grad():
        losses = model.loss(ids, labels).double()
    return ((losses * mask).sum() / mask.sum()).item()


def test_validation_loss_and_perplexity_match_a_plain_torch_evaluation(run):
    valid = {r["iteration"]: r for r in run["records"] if r["type"] == "validation"}
    assert sorted(valid) == [2, 4]
    for iteration, record in valid.items():
        want = reference_validation_loss(run, iteration)
        assert record["lm_loss"] == pytest.approx(want, rel=1e-5), f"validation loss at iteration {iteration}"
        assert record["ppl"] == pytest.approx(math.exp(want), rel=1e-5), f"perplexity at iteration {iteration}"


def scalars(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_jsonl_records(run):
    got = scalars(run["tb"])
    train = [r for r in run["records"] if r["type"] == "train"]
    valid = [r for r in run["records"] if r["type"] == "validation"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    want: dict[str, dict[int, float]] = {}
    for r in train:
        for key in ("consumed_samples", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_gpu", "mfu",
                    "elapsed_ms_per_iteration", "global_batch_size", "loss_scale", "skipped_iterations",
                    "nan_iterations"):
            want.setdefault(f"train/{key}", {})[r["iteration"]] = r[key]
    for r in valid:
        want.setdefault("validation/lm_loss", {})[r["iteration"]] = r["lm_loss"]
        want.setdefault("validation/lm_loss_ppl", {})[r["iteration"]] = r["ppl"]
    assert set(got) == set(want)
    for tag, steps in want.items():
        assert set(got[tag]) == set(steps), f"{tag}: steps"
        for step, value in steps.items():  # event files store float32
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), f"{tag} at step {step}"
    assert want["train/consumed_samples"] == {i: i * GBS for i in range(1, 5)}
