"""Flags whose effect no other test reaches from the command line: each one, parsed as
``pretrain_gpt.py`` (or tools/plan.py) parses it, changes what it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafast.arguments import model_config, parse_args, pipeline_split, validate_args
from megafast.model.moe import experts as moe_experts
from megafast.model.rotary import RotaryEmbedding
from megafast.pipeline.partition import split_layer_counts
from megafast.training.trainer import _optimizer_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--lr", "1e-3", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "256",
        "--max-position-embeddings", "256", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "1", "--mock-data", "--position-embedding-type", "rope", "--vocab-size", "128"]
LLAMA3 = ["--use-rope-scaling", "--rope-scaling-factor", "8", "--rope-scaling-original-max-position-embeddings", "64"]
YARN = ["--use-rope-scaling", "--rope-scaling-type", "yarn", "--rope-scaling-factor", "4",
        "--rope-scaling-original-max-position-embeddings", "64", "--yarn-beta-fast", "30.5"]


def _config(*flags: str):
    return model_config(parse_args(BASE + list(flags)), 128)


def _rope_table(*flags: str) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding.from_config(_config(*flags))(256, torch.device("cpu"))


@pytest.mark.parametrize("base, extra", [
    (LLAMA3, ["--rope-scaling-low-freq-factor", "2"]),
    (LLAMA3, ["--rope-scaling-high-freq-factor", "8"]),
    (LLAMA3, ["--rope-scaling-original-max-position-embeddings", "32"]),
    (YARN, ["--yarn-beta-slow", "2"]),
    (YARN, ["--yarn-mscale", "2", "--yarn-mscale-all-dim", "1"]),
    (YARN, ["--yarn-mscale", "1", "--yarn-mscale-all-dim", "2"]),
    (YARN, ["--yarn-attention-factor", "1.5"]),
    (YARN, ["--no-yarn-correction-range-round-to-int"]),  # beta_fast 30.5: a non-integer range
])
def test_rope_scaling_flags_change_the_rope_table(base, extra):
    cos, sin = _rope_table(*base)
    cos2, sin2 = _rope_table(*base, *extra)
    assert not (torch.equal(cos, cos2) and torch.equal(sin, sin2)), f"{extra} left the RoPE table unchanged"


def test_yarn_mscale_alone_is_refused():
    for flag in ("--yarn-mscale", "--yarn-mscale-all-dim"):  # either alone changes nothing (transformers' rule)
        with pytest.raises(SystemExit, match="give both or neither"):
            _config(*YARN, flag, "2")


def test_moe_flags_reach_the_model(monkeypatch):
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--disable-bias-linear"]
    assert _config(*moe).moe_shared_expert_intermediate_size is None
    cfg = _config(*moe, "--moe-shared-expert-intermediate-size", "96", "--moe-grouped-gemm")
    assert cfg.moe_shared_expert_intermediate_size == 96 and cfg.moe_grouped_gemm
    layer = moe_experts.Experts(cfg, layer_number=0, seed=1)
    calls = []
    real = moe_experts.kernel_dispatch.grouped_gemm
    monkeypatch.setattr(moe_experts.kernel_dispatch, "grouped_gemm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(torch.randn(6, 256), torch.tensor([2, 1, 0, 3]))
    assert len(calls) == 2  # --moe-grouped-gemm: both products are grouped GEMMs, not the per-expert loop


def _validated(*flags: str):
    args = parse_args(BASE + list(flags))
    validate_args(args, world_size=1)
    return args


def test_offload_flags_reach_the_optimizer():
    cfg = _optimizer_config(_validated("--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"))
    assert cfg.optimizer_cpu_offload and cfg.optimizer_offload_fraction == 0.5
    assert not _optimizer_config(_validated()).optimizer_cpu_offload


def test_account_for_loss_counts_the_loss_as_a_block():
    flags = ["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"]
    loss = ["--account-for-loss-in-pipeline-split"]
    # 7 layers + embedding = 8 blocks: 3 + 4 layers; with the loss 9 blocks do not split over 2 stages
    assert split_layer_counts(7, 2, 1, pipeline_split(parse_args(BASE + flags))) == [3, 4]
    with pytest.raises(ValueError, match="9 blocks"):
        split_layer_counts(7, 2, 1, pipeline_split(parse_args(BASE + flags + loss)))
    assert split_layer_counts(6, 2, 1, pipeline_split(parse_args(BASE + flags + loss))) == [3, 3]


def test_plan_data_parallel_size_sets_the_strategy_table():
    def ram(dp: str) -> float:
        out = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), *BASE[2:10], "--vocab-size", "128",
                              "--data-parallel-size", dp,
                              "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.dumps(json.loads(out.stdout))
    assert ram("2") != ram("8")


def test_self_paced_flags_reach_the_weights():
    from types import SimpleNamespace

    from megafast.training.trainer import _SelfPacedSampler

    args = parse_args(BASE + ["--task-loss-weighting", "self-paced", "--self-paced-scale-factor", "7",
                              "--self-paced-history-length", "3"])
    weights = _SelfPacedSampler(SimpleNamespace(valid_ds=[0], task_names=["a", "b"], args=args)).weights
    assert (weights.scale_factor, weights.history_length) == (7.0, 3)
    bad = parse_args(BASE + ["--task-loss-weighting", "self-paced", "--dataset-type", "sft",
                             "--self-paced-interval", "0"])
    with pytest.raises(SystemExit, match="--self-paced-interval >= 1"):
        validate_args(bad, world_size=1)
