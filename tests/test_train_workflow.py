"""Training workflow flags (issue 16): --train-epochs, early stopping, Megatron's separate
--train/valid/test-data-path, Lion's betas from --adam-beta1/2, and Megatron's uneven pipeline
splits (--decoder-first/last-pipeline-num-layers, --account-for-embedding/loss-in-pipeline-split).

References: the iteration count and the logged epoch from the record counts written here; the
validation and test losses recomputed by a plain-torch model (tests/reference_model.py) over every
record of the validation and test files (one evaluation reads each file's records exactly once,
so their order does not matter); the early stop against a scripted validation-loss sequence; one
Lion step against the Lion update written out here; the split layer counts as literals.
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_run import MODEL, TRAIN, torchrun
from reference_model import RefGPT
from seeding import draw_seed
from sft_data import random_records, write_sft_dataset

from megafast.arguments import parse_args, validate_args
from megafast.config import GPTConfig, PipelineSplit
from megafast.model.gpt import GPTModel
from megafast.parallel.state import ParallelState
from megafast.pipeline.partition import partition_layers, split_layer_counts
from megafast.training import trainer
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer import build_optimizer

VOCAB, SEQ, GBS = 128, 16, 8
TASKS = ["code", "chat"]
N_TRAIN, N_VALID, N_TEST = 20, 8, 8  # one evaluation (--eval-iters 1) = GBS records = a whole file


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("workflow")
    seed = draw_seed("data_seed")
    out = {"dir": folder}
    for i, (name, n) in enumerate((("train", N_TRAIN), ("valid", N_VALID), ("test", N_TEST))):
        records = random_records(n, VOCAB, len(TASKS), seed=seed + i)
        out[name] = write_sft_dataset(str(folder / name), records, TASKS)
        out[name + "_records"] = records
    return out


def sft_flags(files: dict, tmp: Path) -> list[str]:
    return ["--train-data-path", files["train"], "--valid-data-path", files["valid"], "--test-data-path",
            files["test"], "--dataset-type", "sft", "--data-cache-path", str(tmp / "cache"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]


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


def reference_loss(model: RefGPT, records) -> float:
    """Token-weighted mean loss over every record: inputs t[:-1], labels t[1:], loss mask m[1:]."""
    total, tokens = 0.0, 0.0
    for ids, mask, _ in records:
        t = torch.tensor(ids)
        with torch.no_grad():
            losses = model.loss(t[None, :-1], t[None, 1:]).double()[0]
        m = torch.tensor(mask[1:], dtype=torch.float64)
        total += float((losses * m).sum())
        tokens += float(m.sum())
    return total / tokens


def test_epochs_and_separate_valid_and_test_sets(files, tmp_path):
    """--train-epochs 2 over 20 records with a global batch of 8: ceil(40 / 8) = 5 iterations, epoch
    8k/20 at iteration k; the validation (iteration 5) and test (end) losses are the plain-torch
    token-mean losses over the records of their own files; --task-loss-weighting self-paced runs."""
    log, save, tb = tmp_path / "log.jsonl", tmp_path / "ckpt", tmp_path / "tb"
    proc = torchrun(1, MODEL + TRAIN + sft_flags(files, tmp_path) + [
        "--train-epochs", "2", "--eval-interval", "5", "--eval-iters", "1", "--save", str(save),
        "--log-jsonl", str(log), "--tensorboard-dir", str(tb), "--task-loss-weighting", "self-paced",
        "--self-paced-history-length", "2"])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in train] == pytest.approx([8 * k / 20 for k in range(1, 6)])
    assert all(math.isfinite(r["lm_loss"]) for r in train)
    assert " iteration        2/       5 | epoch: 0.800 |" in proc.stdout
    assert "--train-epochs 2: 20 samples per epoch, global batch 8: 5 iterations" in proc.stdout
    (valid,) = [r for r in records if r["type"] == "validation"]
    (test,) = [r for r in records if r["type"] == "test"]
    assert valid["iteration"] == test["iteration"] == 5
    model = reference_model(save / "iter_0000005")
    assert valid["lm_loss"] == pytest.approx(reference_loss(model, files["valid_records"]), rel=1e-5)
    assert test["lm_loss"] == pytest.approx(reference_loss(model, files["test_records"]), rel=1e-5)
    assert test["ppl"] == pytest.approx(math.exp(test["lm_loss"]), rel=1e-9)
    assert re.search(r"test loss at iteration 5 \| lm loss value: ", proc.stdout)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("test/lm_loss")[0].value == pytest.approx(test["lm_loss"], rel=1e-6)
    assert acc.Scalars("validation/lm_loss")[0].value == pytest.approx(valid["lm_loss"], rel=1e-6)


def _in_process(monkeypatch, argv: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    trainer.pretrain(argv)


def test_early_stopping_stops_at_the_right_evaluation_and_saves(files, tmp_path, monkeypatch, capsys):
    """Scripted validation losses 5.0, 4.0, 3.95, 3.99 with patience 2 and min delta 0.1: evaluation
    3 (3.95 > 4.0 - 0.1) and 4 do not improve, so training stops after iteration 4 of 10 and saves."""
    losses = iter([5.0, 4.0, 3.95, 3.99, 1.0, 1.0])
    monkeypatch.setattr(trainer, "evaluate", lambda run: next(losses))
    save = tmp_path / "ckpt"
    _in_process(monkeypatch, MODEL + TRAIN + sft_flags(files, tmp_path) + [
        "--train-iters", "10", "--eval-interval", "1", "--eval-iters", "1", "--early-stopping-patience", "2",
        "--early-stopping-min-delta", "0.1", "--save", str(save), "--log-interval", "100"])
    out = capsys.readouterr().out
    stops = [line for line in out.splitlines() if line.startswith("early stopping")]
    assert stops == ["early stopping at iteration 4: the validation loss has not improved by more than 0.1 for 2 "
                     "evaluations (--early-stopping-patience 2; best 4.000000E+00 at iteration 2)"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004"]
    sd = torch.load(save / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt", map_location="cpu",
                    weights_only=False)
    assert sd["args"]["early_stopping_state"] == {"best": 4.0, "best_iteration": 2, "bad_evaluations": 2}
    assert "iteration       10/" not in out


def test_lion_uses_adam_betas(monkeypatch):
    """--optimizer lion --adam-beta1 0.7 --adam-beta2 0.9: one step equals the Lion update
    c = b1 m + (1 - b1) g, w <- w - lr sign(c), m <- b2 m + (1 - b2) g, written out here; without the
    flags Lion keeps its 0.9/0.99 and Adam its 0.9/0.999."""
    base = MODEL + TRAIN + ["--mock-data", "--vocab-size", "127", "--train-iters", "1", "--weight-decay", "0",
                           "--clip-grad", "0"]
    args = parse_args(base + ["--optimizer", "lion", "--adam-beta1", "0.7", "--adam-beta2", "0.9"])
    validate_args(args, 1)
    config = trainer._optimizer_config(args)
    assert (config.lion_beta1, config.lion_beta2) == (0.7, 0.9)
    for extra, betas in ((["--optimizer", "lion"], (0.9, 0.99)), ([], (0.9, 0.999))):
        a = parse_args(base + extra)
        validate_args(a, 1)
        c = trainer._optimizer_config(a)
        assert ((c.lion_beta1, c.lion_beta2) if extra else (c.adam_beta1, c.adam_beta2)) == betas

    gpt = GPTConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=40, max_position_embeddings=8)
    model = GPTModel(gpt, seed=draw_seed("seed"))
    ddp = DataParallel([model], ParallelState.single())
    opt = build_optimizer([model], ddp, ParallelState.single(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.randn_like(p) for n, p in before.items()}  # a non-zero momentum makes beta1 matter
    masters = {shard.name: shard.master for shard in opt.shards}  # what the optimizer updates (fp32: aliases)
    for n, master in masters.items():
        opt.optimizer.state[master]["exp_avg"] = m[n].clone()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).mean().backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    assert opt.step().success
    lr, b1, b2 = args.lr, 0.7, 0.9
    for n, p in model.named_parameters():
        want = before[n] - lr * torch.sign(b1 * m[n] + (1 - b1) * grads[n])
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7, msg=f"lion weights {n}")
        torch.testing.assert_close(opt.optimizer.state[masters[n]]["exp_avg"], b2 * m[n] + (1 - b2) * grads[n],
                                   rtol=1e-6, atol=1e-7, msg=f"lion momentum {n}")


# ---- Megatron's uneven pipeline splits: layer counts per (virtual) stage ----


@pytest.mark.parametrize("layers, pp, vpp, split, blocks, want", [
    # DeepSpeed-pipeline parts [1, 5, 5, 5, 5, 5, 5, 1] over 30 layers: the embedding and the output alone
    (30, 8, 1, PipelineSplit(0, 0), None, [0, 5, 5, 5, 5, 5, 5, 0]),
    (30, 8, 1, PipelineSplit(account_for_embedding=True, account_for_loss=True), [1, 5, 5, 5, 5, 5, 5, 1],
     [0, 5, 5, 5, 5, 5, 5, 0]),
    (30, 8, 1, PipelineSplit(account_for_embedding=True, account_for_loss=True), None, [3, 4, 4, 4, 4, 4, 4, 3]),
    (31, 8, 1, PipelineSplit(account_for_embedding=True), None, [3, 4, 4, 4, 4, 4, 4, 4]),
    (30, 4, 1, PipelineSplit(6, 6), None, [6, 9, 9, 6]),
    (30, 4, 1, PipelineSplit(first_stage_layers=3), None, [3, 9, 9, 9]),
    (30, 4, 1, PipelineSplit(2, 4), None, [2, 12, 12, 4]),
    (30, 4, 1, PipelineSplit(last_stage_layers=0), None, [10, 10, 10, 0]),
    # interleaved: virtual stage s = chunk * pp + rank
    (16, 4, 2, PipelineSplit(2, 2), None, [1, 3, 3, 1, 1, 3, 3, 1]),
    (14, 2, 2, PipelineSplit(account_for_embedding=True, account_for_loss=True), None, [3, 4, 4, 3]),
])
def test_split_layer_counts(layers, pp, vpp, split, blocks, want):
    assert split_layer_counts(layers, pp, vpp, split, blocks) == want
    config = GPTConfig(num_layers=layers, hidden_size=8, num_attention_heads=2, vocab_size=16)
    method = ",".join(map(str, blocks)) if blocks else "uniform"
    ranges = partition_layers(config, pp * vpp, method, split, pp)
    assert [e - s for s, e in ranges] == want and ranges[0][0] == 0 and ranges[-1][1] == layers


@pytest.mark.parametrize("layers, pp, vpp, split, blocks, message", [
    (30, 8, 1, PipelineSplit(5, 5), None, "20 remaining layers do not divide evenly over 6 middle pipeline ranks"),
    (30, 8, 1, PipelineSplit(20, 20), None, "exceed --num-layers 30"),
    (30, 8, 1, PipelineSplit(account_for_embedding=True), None, "31 blocks do not divide evenly over 8"),
    (30, 8, 1, PipelineSplit(account_for_loss=True, account_for_embedding=True), [1, 5, 5, 5, 5, 5, 6, 1],
     "must list 8 block counts summing to 32"),
    (30, 8, 1, PipelineSplit(account_for_loss=True, account_for_embedding=True), [2, 5, 5, 5, 5, 5, 5, 0],
     "stage 7 would hold -1 layers"),
    (16, 4, 2, PipelineSplit(0, 2), None, "must be a positive multiple of the 2 virtual stages"),
    (8, 1, 1, PipelineSplit(0, None), None, "need --pipeline-model-parallel-size > 1"),
])
def test_impossible_splits_are_one_line_errors(layers, pp, vpp, split, blocks, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        split_layer_counts(layers, pp, vpp, split, blocks)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--decoder-first-pipeline-num-layers", "1", "--account-for-embedding-in-pipeline-split"], "exclude each other"),
    (["--decoder-first-pipeline-num-layers", "1", "--num-layers-per-virtual-pipeline-stage", "1"],
     "--num-virtual-stages-per-pipeline-rank"),
    (["--decoder-first-pipeline-num-layers", "3"], "the 1 remaining layers do not divide evenly over 3 middle"),
    (["--account-for-embedding-in-pipeline-split", "--pipeline-partition", "parameters"], "exclude each other"),
])
def test_bad_split_flags_fail_before_training(flags, message):
    args = parse_args(MODEL + TRAIN + ["--mock-data", "--vocab-size", "127", "--train-iters", "1",
                                       "--pipeline-model-parallel-size", "4", "--num-layers", "4"] + flags)
    with pytest.raises(SystemExit, match=re.escape(message)) as err:
        validate_args(args, 4)
    assert "\n" not in str(err.value)


def test_first_and_last_stage_without_layers_train_like_one_process(tmp_path):
    """PP=3 with the embedding alone on the first stage and the output layer alone on the last
    (--decoder-first/last-pipeline-num-layers 0) trains the same model as one process."""
    flags = MODEL + TRAIN + ["--mock-data", "--vocab-size", "127", "--train-iters", "3", "--attention-dropout", "0",
                             "--hidden-dropout", "0"]
    logs = {}
    for name, nproc, extra in (("pp1", 1, []), ("pp3", 3, ["--pipeline-model-parallel-size", "3",
                                                           "--decoder-first-pipeline-num-layers", "0",
                                                           "--decoder-last-pipeline-num-layers", "0"])):
        logs[name] = tmp_path / f"{name}.jsonl"
        torchrun(nproc, flags + extra + ["--log-jsonl", str(logs[name])])
    losses = {k: [json.loads(line)["lm_loss"] for line in p.read_text().splitlines()] for k, p in logs.items()}
    assert len(losses["pp3"]) == 3
    np.testing.assert_allclose(losses["pp3"], losses["pp1"], rtol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--data-path", "{train}"], "exclude each other"),
    (["--split", "90,10,0"], "--split applies to --data-path"),
    (["--train-iters", "2", "--train-samples", "16"], "exactly one of --train-iters and --train-samples"),
    (["--train-epochs", "0"], "--train-epochs must be > 0"),
    (["--early-stopping-patience", "2", "--eval-iters", "0"], "needs evaluations"),
])
def test_bad_workflow_flags_are_one_line_errors(files, tmp_path, flags, message):
    flags = [f.format(train=files["train"]) for f in flags]
    args = parse_args(MODEL + TRAIN + sft_flags(files, tmp_path) + ["--train-epochs", "1"] + flags)
    with pytest.raises(SystemExit, match=re.escape(message)) as err:
        validate_args(args, 1)
    assert "\n" not in str(err.value)
