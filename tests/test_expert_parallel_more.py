"""Expert parallelism, the rest of issue 13's acceptance (test_expert_parallel.py has the layers,
groups, the main layouts, exact resume and Mixtral's conversion):

- SIGKILL recovery at EP = 2 (DP = 2) as for dense models: a run whose workers are killed after a
  committed checkpoint resumes from the last commit and logs the uninterrupted run's per-iteration
  losses bit for bit.
- HF -> megafast (TP = 2, PP = 2, EP = 2) -> HF is bit-identical, every tensor present, for tiny
  Qwen2-MoE (gated shared expert, a dense layer) and Qwen3-MoE (q/k norms, dense layers).
- EP composes: at EP = 2 (DP = 2) with full uniform recompute, and at PP = 2 with interleaving,
  lm_loss stays within 1e-5 of the single-process run; bf16 at EP = 2 tracks fp32 within bf16
  precision.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_expert_parallel import MOE, _safetensors, corpus  # noqa: F401  (corpus: a module fixture)
from test_pretrain import _kill_one_worker

from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.convert.converter import ConvertOptions, convert_checkpoint
from pretrain_run import MODEL, ROOT, TRAIN, data_args, torchrun, train_records
from seeding import draw_seed

EP2 = ["--expert-model-parallel-size", "2"]


# ---------------------------------------------------------------------------- SIGKILL recovery

ITERS = 6
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
# (1,1,2,2) with full recompute and the distributed optimizer, saving every iteration: the reference of the
# SIGKILL test and the recompute case of the composition test (one launch fewer on a 2-core machine)
KILLED_LAYOUT = EP2 + RECOMPUTE + ["--use-distributed-optimizer", "--save-interval", "1", "--max-checkpoints", "2"]


def _run(tmp_path, prefix: str, tag: str, nproc: int, extra: list[str]) -> dict[int, dict]:
    log = tmp_path / f"{tag}.jsonl"
    torchrun(nproc, MODEL + MOE + TRAIN + data_args(prefix, tmp_path) + extra + _NO_DROPOUT + ["--log-jsonl", str(log)])
    recs = train_records(log)
    assert sorted(recs) == list(range(1, ITERS + 1)), tag
    return recs


_NO_DROPOUT = ["--train-iters", str(ITERS), "--attention-dropout", "0", "--hidden-dropout", "0"]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, dict[int, dict]]:  # noqa: F811
    """The single-process fp32 run and the EP = 2 recompute run (its checkpoints in tmp/'ref')."""
    tmp = tmp_path_factory.mktemp("ep_runs")
    prefix, _ = corpus
    return {"single": _run(tmp, prefix, "single", 1, []),
            "recompute": _run(tmp, prefix, "recompute", 2, KILLED_LAYOUT + ["--save", str(tmp / "ref")])}


def test_killed_run_at_expert_parallel_2_resumes_from_last_commit(corpus, runs, tmp_path):  # noqa: F811
    prefix, seed = corpus
    common = MODEL + MOE + TRAIN + data_args(prefix, tmp_path) + KILLED_LAYOUT + _NO_DROPOUT
    log, save = tmp_path / "faulty.jsonl", tmp_path / "faulty"
    kills = 0
    for attempt in range(4):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "pretrain_gpt.py"), *common, "--save", str(save), "--load", str(save), "--log-jsonl", str(log)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if kills == 0 and attempt < 2 and _kill_one_worker(proc, log, random.uniform(0.0, 0.5)):
            kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, "the run never completed after being killed"
    assert kills >= 1, "no worker was killed: the test did not exercise a fault"
    ref, got = runs["recompute"], train_records(log)
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        for key in ("lm_loss", "load_balancing_loss", "grad_norm"):
            assert got[it][key] == ref[it][key], (f"iteration {it} {key}: {got[it][key]} != {ref[it][key]} "
                                                  f"(corpus seed {seed})")
    kept = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert kept == [f"iter_{ITERS - 1:07d}", f"iter_{ITERS:07d}"]
    assert sorted(os.listdir(save / f"iter_{ITERS:07d}")) == ["mp_rank_00_000_000", "mp_rank_00_000_001"]


# ---------------------------------------------------------------------------- HF round trips at EP = 2

def _qwen_models() -> list[tuple[str, object]]:
    import test_moe_hf
    import test_qwen3_moe

    seed = draw_seed("hf_seed")
    return [("qwen2_moe", test_moe_hf.build("qwen2_moe", seed)),
            ("qwen3_moe_normed", test_qwen3_moe.build("normed", seed + 1)),
            ("qwen3_moe_pre_softmax", test_qwen3_moe.build("pre_softmax", seed + 2))]


@pytest.mark.parametrize("index", range(3), ids=["qwen2_moe", "qwen3_moe_normed", "qwen3_moe_pre_softmax"])
def test_hf_to_tp2_pp2_ep2_and_back_is_bit_identical(index, tmp_path):
    name, model = _qwen_models()[index]
    hf_dir = str(tmp_path / "hf")
    model.save_pretrained(hf_dir, max_shard_size="40KB")
    ckpt = str(tmp_path / "ep2")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ckpt, target_tensor_parallel_size=2,
                                      target_pipeline_parallel_size=2, target_expert_parallel_size=2, progress=False))
    release = os.path.join(ckpt, "release")
    assert sorted(os.listdir(release)) == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                                           for e in range(2)], name
    reader = MegafastCheckpointReader(ckpt)
    assert reader.ep == 2 and reader.config.num_experts == 4
    moe_layers = [i for i in range(reader.config.num_layers) if reader.config.is_moe_layer(i)]
    last = moe_layers[-1]  # on pipeline stage 1: each EP rank holds 2 of the 4 experts
    for e in range(2):
        part = torch.load(os.path.join(release, f"mp_rank_00_001_{e:03d}", "model_optim_rng.pt"), weights_only=False)
        stack = part["model"][f"decoder.layers.{last}.mlp.experts.linear_fc2.weight"]
        assert stack.shape[0] == 2, (name, tuple(stack.shape))

    back = convert_checkpoint(ConvertOptions("megafast", "hf", ckpt, str(tmp_path / "back"), progress=False))
    got, want = _safetensors(back), _safetensors(hf_dir)
    assert len([k for k in want if ".mlp.experts." in k]) == 3 * 4 * len(moe_layers), name
    if name == "qwen2_moe":
        assert len([k for k in want if "shared_expert" in k]) == 4 * len(moe_layers)  # 3 projections + gate
    assert set(got) == set(want), f"{name}: {sorted(set(got) ^ set(want))[:4]}"
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}: {k} differs after HF -> EP=2 -> HF"


# ---------------------------------------------------------------------------- EP composes

def _lm_loss(recs: dict[int, dict]) -> np.ndarray:
    return np.array([recs[it]["lm_loss"] for it in range(1, ITERS + 1)])


def test_expert_parallel_composes_with_recompute_interleaving_and_bf16(corpus, runs, tmp_path):  # noqa: F811
    prefix, seed = corpus
    ref = _lm_loss(runs["single"])
    composed = {  # (TP, PP, DP, EP) = (1,1,2,2) with full uniform recompute; (1,2,2,2) with 2 chunks per stage
        "recompute": runs["recompute"],
        "interleaved": _run(tmp_path, prefix, "interleaved", 4, EP2 + [
            "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    }
    for tag, recs in composed.items():
        got = _lm_loss(recs)
        err = np.max(np.abs(got - ref) / np.abs(ref))
        assert err <= 1e-5, f"{tag}: lm_loss relative error {err:.2e} (corpus seed {seed})\n{got.tolist()}\n{ref.tolist()}"
    bf16 = _lm_loss(_run(tmp_path, prefix, "bf16", 2, EP2 + ["--bf16"]))
    err = np.max(np.abs(bf16 - ref) / ref)
    assert 0 < err <= 2e-2, f"bf16 at EP=2 vs fp32: relative lm_loss difference {err:.2e} (corpus seed {seed})"
    assert bf16[-1] < bf16[0], f"bf16 loss did not fall: {bf16.tolist()} (corpus seed {seed})"
