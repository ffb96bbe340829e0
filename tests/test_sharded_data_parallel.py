"""ZeRO-2/3 sharding (--data-parallel-sharding-strategy), optimizer CPU offload and checkpoints that
reshard, checked on gloo ranks against the ``no_shard`` run of the same layout (the reference:
plain DDP, already checked against a single process in test_data_parallel.py).

Two process launches cover everything (tests/sharded_harness.py runs the training steps):

- 4 ranks: DP=4, TP=2 x DP=2 (tied embeddings, full recompute), PP=2 x DP=2 and PP=2 x DP=2
  interleaved, each with optim_grads and optim_grads_params against no_shard over 10 iterations
  (losses and global grad norms, clipping active); bf16 with fp32 master shards; a DP=4
  optim_grads_params run saves a checkpoint at iteration 5; per-rank tensor bytes.
- 2 ranks: DP=2 equivalence; offload (fraction 1.0 and 0.5) against no offload; LoRA under ZeRO-3;
  exact resume of optim_grads_params (asynchronous save); the DP=4 checkpoint continued at DP=2
  (optim_grads_params and no_shard) against the DP=4 run that never changed size.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dist import run_distributed
from seeding import draw_seed
from sharded_harness import build, tensor_bytes, train
from megafast.config import ParallelConfig
from megafast.parallel import ParallelState
from megafast.planner.layout import Layout
from megafast.planner.memory import static_memory
from megafast.training.checkpointing import Checkpointer, load_checkpoint, save_checkpoint

ITERS, SAVE_AT = 10, 5
STRATEGIES = ("no_shard", "optim_grads", "optim_grads_params")
# name: (tp, pp, virtual chunks, build options)
LAYOUTS_4 = {
    "dp4": (1, 1, 1, {}),
    "tp2_dp2": (2, 1, 1, dict(tie=True, recompute=True)),
    "pp2_dp2": (1, 2, 1, dict(tie=True)),
    "pp2_dp2_interleaved": (1, 2, 2, {}),
}


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


def _world4(rank, world, seed, data_seed, ckpt_dir):
    torch.manual_seed(seed)
    out = {"losses": {}, "bytes": {}}
    for name, (tp, pp, chunks, opts) in LAYOUTS_4.items():
        state = ParallelState.create(ParallelConfig(tp, pp))
        for strategy in STRATEGIES:
            run = build(state, strategy, seed=seed, num_chunks=chunks, **opts)
            if name == "dp4" and strategy == "optim_grads_params":  # save midway, then carry on
                first = train(run, data_seed, 0, SAVE_AT)
                save_checkpoint(ckpt_dir, SAVE_AT, run.chunks, run.opt, None, state, consumed_samples=40, args={},
                                distributed_optimizer=True, ddp=run.ddp)
                out["losses"][name, strategy] = first + train(run, data_seed, SAVE_AT, ITERS)
            else:
                out["losses"][name, strategy] = train(run, data_seed, 0, ITERS)
            if name == "dp4":
                out["bytes"][strategy] = tensor_bytes(run)
                if strategy == "optim_grads_params":  # every full weight freed after the step
                    out["gathered_after_step"] = sum(b.gathered for b in run.ddp.buckets)
    state = ParallelState.create(ParallelConfig(1, 1))
    for strategy in ("no_shard", "optim_grads_params"):
        run = build(state, strategy, seed=seed, dtype=torch.bfloat16)
        out["losses"]["dp4_bf16", strategy] = train(run, data_seed, 0, SAVE_AT)
        out["bytes"][f"bf16_{strategy}"] = tensor_bytes(run)
    return out


def _world2(rank, world, seed, data_seed, dp4_ckpt, tmp):
    torch.manual_seed(seed)
    state = ParallelState.create(ParallelConfig(1, 1))
    out = {"losses": {}}
    for strategy in STRATEGIES:
        out["losses"]["dp2", strategy] = train(build(state, strategy, seed=seed), data_seed, 0, ITERS)
    for strategy, fraction in (("no_shard", 1.0), ("no_shard", 0.5), ("optim_grads_params", 0.5)):
        run = build(state, strategy, seed=seed, offload=fraction)
        out["losses"]["offload", strategy, fraction] = train(run, data_seed, 0, ITERS)
        out.setdefault("offloaded", {})[strategy, fraction] = (
            sum(s.master.numel() for s in run.opt.shards if s.offloaded), sum(s.master.numel() for s in run.opt.shards))
    for strategy in ("no_shard", "optim_grads_params"):
        run = build(state, strategy, seed=seed, lora=True)
        out["losses"]["lora", strategy] = train(run, data_seed, 0, ITERS)
        out.setdefault("lora_masters", {})[strategy] = sorted({s.name for s in run.opt.shards})

    # exact resume of ZeRO-3, saved asynchronously
    whole = build(state, "optim_grads_params", seed=seed)
    save_dir = os.path.join(tmp, "zero3")
    with Checkpointer(save_dir, state, async_save=True) as ckptr:
        first = train(whole, data_seed, 0, SAVE_AT)
        ckptr.save(SAVE_AT, whole.chunks, whole.opt, None, consumed_samples=40, args={}, distributed_optimizer=True,
                   ddp=whole.ddp)
        rest = train(whole, data_seed, SAVE_AT, ITERS)  # runs while the checkpoint is written
    resumed = build(state, "optim_grads_params", seed=seed + 1)  # other initial weights: all must be loaded
    load_checkpoint(save_dir, resumed.chunks, resumed.opt, None, state, distributed_optimizer=True, ddp=resumed.ddp)
    out["resume"] = (first + rest, first + train(resumed, data_seed, SAVE_AT, ITERS))
    shards = lambda r: torch.cat([b.param_shards for b in r.ddp.buffers])  # noqa: E731
    out["resume_params_equal"] = torch.equal(shards(whole), shards(resumed))

    # the DP=4 checkpoint continued at DP=2 (RNG states are per DP rank: not loaded)
    for strategy in ("optim_grads_params", "no_shard"):
        run = build(state, strategy, seed=seed + 1)
        load_checkpoint(dp4_ckpt, run.chunks, run.opt, None, state, no_load_rng=True,
                        distributed_optimizer=strategy != "no_shard", ddp=run.ddp)
        out["losses"]["from_dp4", strategy] = train(run, data_seed, SAVE_AT, ITERS)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    tmp = tmp_path_factory.mktemp("sharded")
    dp4_ckpt = str(tmp / "dp4")
    four = run_distributed(_world4, 4, seed, data_seed, dp4_ckpt, timeout=600)
    two = run_distributed(_world2, 2, seed, data_seed, dp4_ckpt, str(tmp), timeout=600)
    return four, two


def _assert_same_run(got, want, rel, what):
    assert len(got) == len(want)
    for i, ((loss, norm), (loss0, norm0)) in enumerate(zip(got, want)):
        assert _close(loss, loss0, rel), f"{what}: loss at iteration {i} is {loss!r}, reference {loss0!r}"
        assert _close(norm, norm0, rel), f"{what}: grad norm at iteration {i} is {norm!r}, reference {norm0!r}"


@pytest.mark.parametrize("layout", list(LAYOUTS_4))
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_sharded_equals_no_shard_on_4_ranks(runs, layout, strategy):
    four, _ = runs
    for rank, res in enumerate(four):
        want = res["losses"][layout, "no_shard"]
        assert all(math.isfinite(l) for l, _ in want) and want[-1][1] > 0
        _assert_same_run(res["losses"][layout, strategy], want, 1e-5, f"{layout} {strategy} rank {rank}")


def test_clipping_acts(runs):
    """Clip 0.3 below every step's global norm: each update was clipped by the true global norm, which
    the sharded runs (summing their shards' squares over DP) reproduce above."""
    four, _ = runs
    for layout in LAYOUTS_4:
        assert all(norm > 0.3 for _, norm in four[-1]["losses"][layout, "no_shard"]), layout


def test_bf16_with_fp32_master_shards(runs):
    """bf16 weights: the sharded run rounds the same fp32 masters; 1e-2 covers bf16's 8-bit mantissa
    where a different fp32 summation order flips a rounding."""
    four, _ = runs
    for rank, res in enumerate(four):
        _assert_same_run(res["losses"]["dp4_bf16", "optim_grads_params"], res["losses"]["dp4_bf16", "no_shard"],
                         1e-2, f"bf16 rank {rank}")
        b = res["bytes"]
        assert b["bf16_optim_grads_params"]["optimizer"] * 4 == pytest.approx(b["bf16_no_shard"]["optimizer"], rel=0.02)


def test_sharded_equals_no_shard_on_2_ranks(runs):
    _, two = runs
    for rank, res in enumerate(two):
        for strategy in STRATEGIES[1:]:
            _assert_same_run(res["losses"]["dp2", strategy], res["losses"]["dp2", "no_shard"], 1e-5,
                             f"dp2 {strategy} rank {rank}")


def test_offload_equals_no_offload(runs):
    """The host step is the same element-wise update: bit for bit on CPU."""
    _, two = runs
    for res in two:
        for (strategy, fraction), (offloaded, total) in res["offloaded"].items():
            assert res["losses"]["offload", strategy, fraction] == res["losses"]["dp2", strategy], (strategy, fraction)
            assert offloaded == total if fraction == 1.0 else 0.5 * total <= offloaded < 0.75 * total


def test_lora_under_zero3(runs):
    _, two = runs
    for rank, res in enumerate(two):
        _assert_same_run(res["losses"]["lora", "optim_grads_params"], res["losses"]["lora", "no_shard"], 1e-5,
                         f"LoRA rank {rank}")
        names = res["lora_masters"]["optim_grads_params"]
        assert names and all(".adapter." in n for n in names), names[:5]


def test_zero3_resumes_bit_exactly(runs):
    _, two = runs
    for res in two:
        whole, resumed = res["resume"]
        assert whole == resumed
        assert res["resume_params_equal"]


@pytest.mark.parametrize("strategy", ["optim_grads_params", "no_shard"])
def test_dp4_checkpoint_continues_at_dp2(runs, strategy):
    four, two = runs
    want = four[-1]["losses"]["dp4", "optim_grads_params"][SAVE_AT:]  # the run that never changed size
    for rank, res in enumerate(two):
        _assert_same_run(res["losses"]["from_dp4", strategy], want, 1e-5, f"DP=4 -> DP=2 {strategy} rank {rank}")


def test_strategy_names_agree():
    from megafast.planner.layout import SHARDING_STRATEGIES as planner_names
    from megafast.training.data_parallel import SHARDING_STRATEGIES

    assert planner_names == SHARDING_STRATEGIES


def test_tensor_bytes_match_the_planner(runs):
    """Per-rank bytes of parameters, gradients and optimizer state (allocated tensors, after a step)
    within 5% of megafast.planner for each strategy; ZeRO-3 at DP=4 under 30% of no_shard."""
    four, _ = runs
    from sharded_harness import SEQ, gpt_config

    config = gpt_config()
    total = {}
    for strategy in STRATEGIES:
        layout = Layout(dp=4, dtype="fp32", seq_length=SEQ, bucket_size_mb=0.004, sharding_strategy=strategy)
        plan = static_memory(config, layout, 0, 0)
        want = {"params": plan.weights, "grads": plan.gradients, "optimizer": plan.master_weights + plan.optimizer_states}
        for rank, res in enumerate(four):
            plan_r = static_memory(config, layout, 0, rank)
            want = {"params": plan_r.weights, "grads": plan_r.gradients,
                    "optimizer": plan_r.master_weights + plan_r.optimizer_states}
            got = res["bytes"][strategy]
            for kind in want:
                assert got[kind] == pytest.approx(want[kind], rel=0.05), (strategy, rank, kind, got, want)
        total[strategy] = sum(four[0]["bytes"][strategy].values())
    assert total["optim_grads_params"] < 0.3 * total["no_shard"], total
    assert four[0]["gathered_after_step"] == 0


def test_search_picks_zero3_when_nothing_else_fits_and_says_why():
    """A GPU between ZeRO-3's and ZeRO-2's needs: the search chooses optim_grads_params, and the
    explanation names the others as too big."""
    from sharded_harness import SEQ, gpt_config
    from megafast.planner.search import explain, search
    from megafast.planner.throughput import Cluster, estimate

    config = gpt_config()
    need = {s: estimate(config, Layout(dp=4, num_microbatches=2, seq_length=SEQ, sharding_strategy=s),
                        Cluster(4)).memory.total for s in ("no_shard", "optim", "optim_grads", "optim_grads_params")}
    others = min(v for k, v in need.items() if k != "optim_grads_params")
    assert need["optim_grads_params"] < others, need
    gb = (need["optim_grads_params"] + others) / 2 / 1e9
    plan = search(config, Cluster(4, gpu_memory_gb=gb, memory_headroom=0.0), SEQ, 8, tp=1, pp=1,
                  micro_batch_sizes=(1,), recompute=(None,), offload=False)
    assert [e.layout.sharding_strategy for e in plan.feasible] == ["optim_grads_params"]
    lines = explain(plan, gb)
    assert "optim_grads_params (ZeRO-3)" in lines[0]
    for name in ("no_shard (DDP)", "optim (ZeRO-1)", "optim_grads (ZeRO-2)"):
        assert any(line.strip().startswith(f"{name}: needs") for line in lines), (name, lines)
