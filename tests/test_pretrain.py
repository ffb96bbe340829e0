"""pretrain_gpt.py end to end under torchrun on CPU/gloo: every layout trains the same model,
resume is exact, a killed run resumes from its last committed checkpoint, bad flags fail early."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from megafast.data.indexed_dataset import IndexedDatasetBuilder
from pretrain_run import MODEL, ROOT, TRAIN, VOCAB, data_args, torchrun, train_records

class Corpus(NamedTuple):
    prefix: str
    seed: int  # drawn afresh each run; failure messages (and the corpus's path) name it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Corpus:
    """A small indexed dataset of learnable documents (uint16 tokens, EOD = VOCAB - 1): each counts
    up from a random start with a random stride, so the loss falls within a few iterations."""
    seed = random.SystemRandom().randrange(1 << 31)
    prefix = str(tmp_path_factory.mktemp(f"corpus_seed{seed}_") / "corpus_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(300):
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return Corpus(prefix, seed)


LAYOUTS = [  # (nproc, extra flags)
    (1, []),
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, []),  # DP = 2
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    # recomputation and the fused output layer + loss change memory, not the losses
    (2, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method",
         "block", "--recompute-num-layers", "1", "--fused-linear-cross-entropy"]),
]


def test_every_layout_trains_the_same_model(dataset, tmp_path):
    losses = []
    for i, (nproc, extra) in enumerate(LAYOUTS):
        log = tmp_path / f"layout{i}.jsonl"
        torchrun(nproc, MODEL + TRAIN + data_args(dataset.prefix, tmp_path) + extra +
                 ["--train-iters", "10", "--attention-dropout", "0", "--hidden-dropout", "0", "--log-jsonl", str(log)])
        recs = train_records(log)
        assert sorted(recs) == list(range(1, 11))
        losses.append([recs[it]["lm_loss"] for it in range(1, 11)])
    ref = np.array(losses[0])
    assert ref[-1] < ref[0], f"loss did not fall: {ref} (corpus seed {dataset.seed})"
    for (nproc, extra), got in zip(LAYOUTS[1:], losses[1:]):
        err = np.max(np.abs(np.array(got) - ref) / np.abs(ref))
        assert err <= 1e-5, (f"layout {nproc} procs {extra}: lm_loss relative error {err:.2e} (corpus seed "
                             f"{dataset.seed})\n{got}\n{ref.tolist()}")


@pytest.mark.parametrize("nproc,extra", [
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer", "--async-save"]),
])
def test_resume_is_bit_exact(dataset, tmp_path, nproc, extra):
    common = MODEL + TRAIN + data_args(dataset.prefix, tmp_path) + extra + ["--train-iters", "20", "--save-interval", "10"]
    straight = tmp_path / "straight.jsonl"
    torchrun(nproc, common + ["--save", str(tmp_path / "a"), "--log-jsonl", str(straight)])
    resumed = tmp_path / "resumed.jsonl"
    torchrun(nproc, common + ["--save", str(tmp_path / "b"), "--exit-interval", "10", "--log-jsonl", str(resumed)])
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    torchrun(nproc, common + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--log-jsonl", str(resumed)])
    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == list(range(1, 21))
    for it in range(1, 21):  # dropout is on (default 0.1): RNG states must be restored too
        for key in ("lm_loss", "grad_norm", "lr", "consumed_samples"):
            assert a[it][key] == b[it][key], (f"iteration {it} {key}: {a[it][key]} != {b[it][key]} "
                                              f"(corpus seed {dataset.seed})")


def test_bf16_tracks_fp32(dataset, tmp_path):
    """bf16 compute with fp32 master weights follows the fp32 run within bf16 precision."""
    common = MODEL + TRAIN + data_args(dataset.prefix, tmp_path) + [
        "--pipeline-model-parallel-size", "2", "--train-iters", "10", "--hidden-dropout", "0", "--attention-dropout", "0"]
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        log = tmp_path / f"{name}.jsonl"
        torchrun(2, common + extra + ["--log-jsonl", str(log)])
        recs = train_records(log)
        losses[name] = np.array([recs[it]["lm_loss"] for it in range(1, 11)])
    err = np.max(np.abs(losses["bf16"] - losses["fp32"]) / losses["fp32"])
    assert 0 < err <= 2e-2, f"bf16 vs fp32 relative loss difference {err:.2e} (corpus seed {dataset.seed})"
    assert losses["bf16"][-1] < losses["bf16"][0], f"bf16 loss did not fall (corpus seed {dataset.seed})"


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_one_worker(proc: subprocess.Popen, log: Path, delay: float) -> bool:
    """Once the run has logged a new iteration, wait ``delay`` s more and SIGKILL one random
    torchrun worker (saves happen every iteration, so this often lands inside one). False if the
    run ended first."""
    start = _line_count(log)
    while _line_count(log) <= start:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    time.sleep(delay)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    if proc.poll() is not None or not children:
        return False
    os.kill(int(random.choice(children)), signal.SIGKILL)
    return True


def test_killed_run_resumes_from_last_commit(dataset, tmp_path):
    common = MODEL + TRAIN + data_args(dataset.prefix, tmp_path) + [
        "--tensor-model-parallel-size", "2", "--train-iters", "12", "--save-interval", "1", "--max-checkpoints", "2"]
    ref_log = tmp_path / "ref.jsonl"
    torchrun(2, common + ["--save", str(tmp_path / "ref"), "--log-jsonl", str(ref_log)])
    log, save = tmp_path / "faulty.jsonl", tmp_path / "faulty"
    rng = random.Random()
    kills = 0
    for attempt in range(6):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "pretrain_gpt.py"), *common, "--save", str(save), "--load", str(save), "--log-jsonl", str(log)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if attempt < 3 and _kill_one_worker(proc, log, rng.uniform(0.0, 1.0)):
            kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, "the run never completed after being killed"
    assert kills >= 1, "no worker was killed: the test did not exercise a fault"
    ref, got = train_records(ref_log), train_records(log)
    for it in range(1, 13):
        assert got[it]["lm_loss"] == ref[it]["lm_loss"], (f"iteration {it}: {got[it]['lm_loss']} != "
                                                          f"{ref[it]['lm_loss']} (corpus seed {dataset.seed})")
    kept = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000011", "iter_0000012"]


@pytest.mark.parametrize("flags,message", [
    (["--global-batch-size", "6"], "global batch size 6 is not a multiple of micro batch size 2 x data-parallel size 2"),
    (["--tensor-model-parallel-size", "2", "--num-query-groups", "1"], "does not divide 1 query groups"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "1"], "exceed"),
    (["--data-path", "/nonexistent/prefix"], "data file /nonexistent/prefix.bin does not exist"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/nonexistent/sp.model"], "/nonexistent/sp.model"),
])
def test_bad_configuration_fails_before_training(dataset, tmp_path, flags, message):
    args = MODEL + TRAIN + data_args(dataset.prefix, tmp_path) + ["--train-iters", "2"]
    for i in range(0, len(flags), 2):  # replace or append
        if flags[i] in args:
            args[args.index(flags[i]) + 1] = flags[i + 1]
        else:
            args += flags[i:i + 2]
    proc = torchrun(2, args, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "cache").exists()  # failed before building any index


def test_tokenizer_vocabulary_must_fit_vocab_size(tmp_path):
    from megafast.arguments import parse_args, validate_args

    args = parse_args(MODEL + TRAIN + ["--train-iters", "2", "--mock-data", "--tokenizer-type",
                                       "SentencePieceTokenizer", "--vocab-size", "100"])
    with pytest.raises(SystemExit, match="the tokenizer has 8000 tokens but --vocab-size is 100"):
        validate_args(args, world_size=1, vocab_size=8000)
