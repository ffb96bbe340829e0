"""Checkpoint save/load with the real training state: the mixed-precision optimizer (bf16 parameters,
fp32 master weights, AdamW, the LR scheduler) and its ZeRO-1 shards over DP=2.

The main check is a resume against an independent expectation: an uninterrupted run of K + N
steps must end with exactly the parameters, master weights and optimizer states of a run that
trained K steps, saved, was rebuilt from another seed with its RNG streams scrambled, loaded the
checkpoint and trained N more steps (dropout is on, so the RNG states matter too). It runs in
one process and at (tp, pp, dp) = (2,1,1), (1,2,1), (1,1,2) with ZeRO-1, through the pipeline
engine as pretrain_gpt.py does. The rest: the on-disk layout, the commit protocol (a failed save
is never loaded), async save, retention and the error messages for damaged or mismatched
checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from dist import run_distributed

from megafast.checkpoint.args import config_from_args
from megafast.checkpoint.commit import read_latest_checkpoint
from megafast.checkpoint.state_dict import atomic_torch_save, atomic_write_text
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.pipeline.engine import Microbatch, PipelineEngine
from megafast.pipeline.partition import build_model_chunks
from megafast.training import checkpointing as ckpt_mod
from megafast.training.checkpointing import Checkpointer, load_checkpoint, save_checkpoint
from megafast.training.data_parallel import DataParallel
from megafast.training.lr_schedule import LRScheduler
from megafast.training.optimizer import MixedPrecisionOptimizer, OptimizerConfig, build_optimizer

VOCAB, SEQ, MICRO_BATCH, NUM_MICROBATCHES = 101, 8, 2, 2
BUCKET_MB = 0.01  # ~2.6k gradient elements per bucket: ZeRO-1 shards cut through parameters
SAVE_AT, RESUMED_STEPS = 2, 3


def tiny_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
        max_position_embeddings=SEQ, hidden_dropout=0.1, attention_dropout=0.1,
    )
    base.update(kw)
    return GPTConfig(**base)


@dataclass
class Trainee:
    """One rank's real training state, as pretrain_gpt.py builds it."""

    state: ParallelState
    chunks: list[GPTModel]
    ddp: DataParallel
    opt: MixedPrecisionOptimizer
    sched: LRScheduler
    engine: PipelineEngine


def setup(state: ParallelState, seed: int = 7, *, bf16: bool = True, zero1: bool = False,
          num_chunks: int = 1, optimizer: str = "adam") -> Trainee:
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = tiny_config(num_layers=2 * num_chunks)
    chunks = build_model_chunks(config, state, seed=seed, num_chunks=num_chunks, params_dtype=dtype)
    ddp = DataParallel(chunks, state, BUCKET_MB, use_distributed_optimizer=zero1)
    opt = build_optimizer(chunks, ddp, state, OptimizerConfig(
        optimizer=optimizer, lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=bf16,
        use_distributed_optimizer=zero1,
    ))
    sched = LRScheduler(max_lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=20)
    engine = PipelineEngine(chunks, state, (SEQ, MICRO_BATCH, config.hidden_size), dtype, torch.device("cpu"))
    return Trainee(state, chunks, ddp, opt, sched, engine)


def batches(iteration: int, dp_rank: int) -> list[Microbatch]:
    """The micro-batches of one DP rank at one iteration: the same in every run."""
    g = torch.Generator().manual_seed(1000 * iteration + dp_rank)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
        out.append(Microbatch(tokens, labels, torch.ones(MICRO_BATCH, SEQ)))
    return out


def train(t: Trainee, iterations: range) -> None:
    """Optimizer steps as the trainer takes them (one global batch each, the loss its token mean)."""
    denominator = float(t.state.dp_size * NUM_MICROBATCHES * MICRO_BATCH * SEQ)
    for c in t.chunks:
        c.train()
    for it in iterations:
        t.opt.set_lr(t.sched.lr)
        t.ddp.set_last_microbatch(False)
        t.engine.run(batches(it, t.state.dp_rank), denominator, loss_scale=t.opt.loss_scale,
                     before_last_backward=lambda c: t.ddp.set_last_microbatch(True, chunk=c))
        assert t.opt.step().success
        t.sched.step()


def seed_rng(rank: int) -> None:
    random.seed(100 + rank)
    np.random.seed(200 + rank)
    torch.manual_seed(300 + rank)


def draws(t: Trainee) -> list:
    """One draw from every RNG stream the checkpoint restores."""
    with t.chunks[0].tracker.fork():
        tracked = torch.rand(3)
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def training_state(t: Trainee) -> dict:
    """Everything a resumed run must reproduce: parameters, fp32 masters, optimizer and scheduler."""
    return {
        "params": [{n: p.detach().clone() for n, p in c.named_parameters()} for c in t.chunks],
        "masters": [s.master.detach().clone() for s in t.opt.shards],
        "adam": [{k: v.clone() for k, v in t.opt.optimizer.state[s.master].items()} for s in t.opt.shards],
        "scaler": t.opt.scaler.state_dict(),
        "sched": t.sched.state_dict(),
        "lr": t.opt.lr,
    }


def assert_same(a, b, what: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), what
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def resume_matches_uninterrupted(
    state: ParallelState, root: str, rank: int, zero1: bool, bf16: bool = True
) -> None:
    """Uninterrupted K + N steps == K steps, save, fresh model from another seed, load, N steps."""
    end = SAVE_AT + RESUMED_STEPS
    seed_rng(rank)
    reference = setup(state, bf16=bf16, zero1=zero1)
    train(reference, range(end))
    want, want_draws = training_state(reference), draws(reference)

    seed_rng(rank)
    t = setup(state, bf16=bf16, zero1=zero1)
    train(t, range(SAVE_AT))
    with Checkpointer(root, state) as ckptr:
        ckptr.save(SAVE_AT, t.chunks, t.opt, t.sched, consumed_samples=80, consumed_valid_samples=8,
                   args={"lr": 1e-2}, distributed_optimizer=zero1)
    seed_rng(1000 + rank)  # the restarted process's streams: the checkpoint must replace them
    resumed = setup(state, seed=99, bf16=bf16, zero1=zero1)
    result = load_checkpoint(root, resumed.chunks, resumed.opt, resumed.sched, state,
                             distributed_optimizer=zero1)
    assert (result.iteration, result.consumed_samples, result.consumed_valid_samples) == (SAVE_AT, 80, 8)
    assert result.args == {"lr": 1e-2}
    train(resumed, range(SAVE_AT, end))
    assert_same(training_state(resumed), want, f"rank {rank}: resumed run vs uninterrupted run")
    assert_same(draws(resumed), want_draws, f"rank {rank}: RNG draws after the resumed run")


def mp_dirs(tp: int, pp: int) -> list[str]:
    return [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)]


def listing(root: str) -> dict[str, list[str]]:
    out = {}
    for d, _, files in os.walk(root):
        out[os.path.relpath(d, root)] = sorted(files)
    return out


def shard_ranges(t: Trainee) -> list[tuple[str, int, int]]:
    return [(s.name, s.lo, s.hi) for s in t.opt.shards]


def worker(rank: int, world: int, root: str, tp: int, pp: int) -> dict:
    config = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    state = ParallelState.create(config)
    zero1 = state.dp_size > 1  # the real ZeRO-1 shards, one file per DP rank
    resume_matches_uninterrupted(state, root, rank, zero1)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        out = {"listing": listing(root), "latest_text": f.read()}
    if zero1:
        out["shards"] = shard_ranges(setup(state, zero1=True))
        name = f"distrib_optim_dp{state.dp_rank:03d}.pt"
        path = os.path.join(root, f"iter_{SAVE_AT:07d}", "mp_rank_00_000", name)
        out["shard_file"] = torch.load(path, weights_only=False)["optimizer"]["layout"]
        out["crash"] = crash_then_resave(state, root, rank)
    if tp > 1:
        out["async"] = async_matches_sync(state, root, rank)
    return out


def crash_then_resave(state: ParallelState, root: str, rank: int) -> dict:
    """Rank 1 fails while writing iteration 20: nothing is committed, load falls back to the last
    commit, and saving 20 again replaces the half-written directory."""
    t = setup(state, zero1=True)
    good_save = ckpt_mod.atomic_torch_save

    def failing_save(obj, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".partial", "wb") as f:
            f.write(b"half")
        raise OSError("disk full (simulated)")

    ckptr = Checkpointer(root, state)
    if rank == 1:
        ckpt_mod.atomic_torch_save = failing_save
    with pytest.raises(RuntimeError, match=r"was not committed: writing failed on rank\(s\) \[1\]"):
        ckptr.save(20, t.chunks, t.opt, t.sched, consumed_samples=160, args={}, distributed_optimizer=True)
    ckpt_mod.atomic_torch_save = good_save
    half_written = sorted(os.listdir(os.path.join(root, "iter_0000020", "mp_rank_00_000")))
    ckptr._barrier()
    committed = read_latest_checkpoint(root)
    loaded = load_checkpoint(root, t.chunks, t.opt, t.sched, state, distributed_optimizer=True).iteration
    ckptr.save(20, t.chunks, t.opt, t.sched, consumed_samples=160, args={}, distributed_optimizer=True)
    ckptr.close()
    return {
        "half_written": half_written,
        "committed": committed,
        "loaded": loaded,
        "after": sorted(os.listdir(os.path.join(root, "iter_0000020", "mp_rank_00_000"))),
        "latest": read_latest_checkpoint(root),
    }


def async_matches_sync(state: ParallelState, root: str, rank: int) -> dict:
    """An async save (its writer held back until training has moved on) equals a sync save."""
    t = setup(state)
    train(t, range(1))
    sync_root, async_root = os.path.join(root, "sync"), os.path.join(root, "async")
    seed_rng(rank)
    save_checkpoint(sync_root, 5, t.chunks, t.opt, t.sched, state, consumed_samples=40, args={"x": 1})
    seed_rng(rank)
    release = threading.Event()
    good_save = ckpt_mod.atomic_torch_save

    def held_save(obj, path):
        assert release.wait(60)
        good_save(obj, path)

    ckpt_mod.atomic_torch_save = held_save
    args = {"x": 1}
    ckptr = Checkpointer(async_root, state, async_save=True)
    ckptr.save(5, t.chunks, t.opt, t.sched, consumed_samples=40, args=args)
    not_committed_yet = ckptr.maybe_finalize() is False and read_latest_checkpoint(async_root) is None
    train(t, range(1, 2))  # mutates params, masters, optimizer state and lr in place
    args["x"] = 2
    release.set()
    ckptr.finalize()
    ckpt_mod.atomic_torch_save = good_save
    ckptr.close()
    name = os.path.join("iter_0000005", f"mp_rank_{state.tp_rank:02d}_000", "model_optim_rng.pt")
    a = torch.load(os.path.join(sync_root, name), weights_only=False)
    b = torch.load(os.path.join(async_root, name), weights_only=False)
    assert_same(a, b, "async vs sync file")
    return {"not_committed_yet": not_committed_yet, "latest": read_latest_checkpoint(async_root)}


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2_zero1"])
def test_distributed_resume_is_bit_exact_layout_and_commit(tmp_path, tp, pp, dp):
    root = str(tmp_path / "ckpt")
    results = run_distributed(worker, tp * pp * dp, root, tp, pp)
    files = results[0]["listing"]
    shards = [f"distrib_optim_dp{d:03d}.pt" for d in range(dp)] if dp > 1 else []
    it_dir = f"iter_{SAVE_AT:07d}"
    assert files["."] == ["latest_checkpointed_iteration.txt"]
    assert files[it_dir] == []
    assert {k for k in files if k.startswith(it_dir + "/")} == {f"{it_dir}/{d}" for d in mp_dirs(tp, pp)}
    for d in mp_dirs(tp, pp):
        assert files[f"{it_dir}/{d}"] == sorted(["model_optim_rng.pt", *shards])
    assert results[0]["latest_text"] == str(SAVE_AT)  # Megatron's format: the number, no newline
    if dp > 1:
        # Real ZeRO-1 shards: each DP rank's file holds its own part, and the parts tile the model.
        for r in results:
            assert [tuple(x)[:1] + tuple(x)[2:] for x in r["shard_file"]] == r["shards"]
        covered: dict[str, list[tuple[int, int]]] = {}
        for r in results:
            for name, lo, hi in r["shards"]:
                covered.setdefault(name, []).append((lo, hi))
        assert results[0]["shards"] != results[1]["shards"]
        assert any(lo > 0 for ranges in covered.values() for lo, _ in ranges)  # a cut inside a parameter
        for name, ranges in covered.items():
            ranges.sort()
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), name
        for r in results:
            crash = r["crash"]
            assert crash["committed"] == (SAVE_AT, False) and crash["loaded"] == SAVE_AT
            assert crash["latest"] == (20, False)
            assert crash["after"] == [*shards, "model_optim_rng.pt"]
        assert results[0]["crash"]["half_written"] == [
            "distrib_optim_dp000.pt", "distrib_optim_dp001.pt.partial", "model_optim_rng.pt",
        ]
    if tp > 1:
        for r in results:
            assert r["async"] == {"not_committed_yet": True, "latest": (5, False)}


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16_fp32_masters", "fp32"])
def test_single_process_resume_is_bit_exact_and_file_contents(tmp_path, bf16):
    root = str(tmp_path)
    resume_matches_uninterrupted(ParallelState.single(), root, 0, zero1=False, bf16=bf16)
    it_dir = f"iter_{SAVE_AT:07d}"
    assert listing(root) == {
        ".": ["latest_checkpointed_iteration.txt"],
        it_dir: [],
        f"{it_dir}/mp_rank_00_000": ["model_optim_rng.pt"],
    }
    sd = torch.load(os.path.join(root, it_dir, "mp_rank_00_000/model_optim_rng.pt"), weights_only=False)
    assert list(sd) == [
        "model", "optimizer", "opt_param_scheduler", "rng_state", "iteration", "consumed_samples", "args",
        "checkpoint_version", "parallel_layout",
    ]
    assert sd["checkpoint_version"] == 3.0 and sd["consumed_samples"] == {"train": 80, "valid": 8}
    assert sd["parallel_layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                     "data_parallel_size": 1, "distributed_optimizer": False}
    weight = sd["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
    assert weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    masters = sd["optimizer"]["master_params"]
    if bf16:  # fp32 masters saved next to the bf16 weights, and not their rounding
        assert all(m is not None and m.dtype == torch.float32 for m in masters)
        assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)
    else:  # the masters are the parameters themselves
        assert all(m is None for m in masters)
    assert sd["opt_param_scheduler"]["num_steps"] == SAVE_AT
    assert set(sd["rng_state"][0]) == {
        "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states",
    }


def test_megatron_directory_name_without_pipelining_is_read(tmp_path):
    """Megatron-LM names the pp == 1 directory mp_rank_00; such a checkpoint loads."""
    state = ParallelState.single()
    t = setup(state)
    with Checkpointer(str(tmp_path), state) as ckptr:
        ckptr.save(3, t.chunks, t.opt, t.sched, consumed_samples=24, args={})
    os.rename(tmp_path / "iter_0000003/mp_rank_00_000", tmp_path / "iter_0000003/mp_rank_00")
    fresh = setup(state, seed=99)
    assert load_checkpoint(str(tmp_path), fresh.chunks, fresh.opt, fresh.sched, state).iteration == 3
    assert_same(fresh.chunks[0].state_dict(), t.chunks[0].state_dict(), "model")


def test_virtual_chunks_finetune_and_release(tmp_path):
    state = ParallelState.single()
    t = setup(state, seed=1, num_chunks=2)
    save_checkpoint(str(tmp_path), 30, t.chunks, t.opt, t.sched, state, consumed_samples=3, args={})
    sd = torch.load(tmp_path / "iter_0000030/mp_rank_00_000/model_optim_rng.pt", weights_only=False)
    assert {"model0", "model1"} <= set(sd) and "model" not in sd
    fresh = setup(state, seed=5, num_chunks=2)
    result = load_checkpoint(str(tmp_path), fresh.chunks, fresh.opt, fresh.sched, state, finetune=True)
    assert (result.iteration, result.consumed_samples) == (0, 0)
    assert fresh.sched.num_steps == 0  # finetune: model only
    for a, b in zip(t.chunks, fresh.chunks):
        assert_same(a.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match=r"chunk\(s\) \['model0', 'model1'\] but the model has 1 chunk"):
        load_checkpoint(str(tmp_path), fresh.chunks[0], None, None, state)

    # A release checkpoint: model only, iteration 0, even without finetune.
    model = GPTModel(tiny_config(), state, seed=1)
    release_file = tmp_path / "rel/release/mp_rank_00_000/model_optim_rng.pt"
    atomic_torch_save({"model": model.state_dict()}, str(release_file))
    atomic_write_text(str(tmp_path / "rel/latest_checkpointed_iteration.txt"), "release")
    other = setup(state, seed=4, bf16=False)
    assert load_checkpoint(str(tmp_path / "rel"), other.chunks, other.opt, other.sched, state).iteration == 0
    assert_same(other.chunks[0].state_dict(), model.state_dict())


def test_max_checkpoints_keeps_newest_and_skips_uncommitted(tmp_path):
    state = ParallelState.single()
    t = setup(state)
    os.makedirs(tmp_path / "iter_0000099/mp_rank_00_000")  # a newer, uncommitted (crashed) save
    with Checkpointer(str(tmp_path), state, max_checkpoints=2) as ckptr:
        for it in (1, 2, 3, 4):
            ckptr.save(it, t.chunks, t.opt, t.sched, consumed_samples=it, args={})
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000003", "iter_0000004", "iter_0000099", "latest_checkpointed_iteration.txt",
    ]
    assert load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, state).iteration == 4
    with pytest.raises(ValueError, match="max_checkpoints must be >= 1"):
        Checkpointer(str(tmp_path), state, max_checkpoints=0)


def test_missing_directories_and_no_commit(tmp_path):
    state = ParallelState.single()
    t = setup(state)
    args = (t.chunks, t.opt, t.sched, state)
    with pytest.raises(ValueError, match=r"checkpoint directory .*nowhere does not exist: check --load"):
        load_checkpoint(str(tmp_path / "nowhere"), *args)
    assert load_checkpoint(str(tmp_path / "nowhere"), *args, missing_ok=True) is None
    os.makedirs(tmp_path / "iter_0000005/mp_rank_00_000")  # written but never committed
    assert load_checkpoint(str(tmp_path), *args) is None
    atomic_write_text(str(tmp_path / "latest_checkpointed_iteration.txt"), "7")
    with pytest.raises(ValueError, match=r"commits iteration 7 but .*iter_0000007 does not exist"):
        load_checkpoint(str(tmp_path), *args)
    atomic_write_text(str(tmp_path / "latest_checkpointed_iteration.txt"), "seven")
    with pytest.raises(ValueError, match="expected an iteration number or 'release'"):
        load_checkpoint(str(tmp_path), *args)


def test_layout_mismatch_and_damaged_files(tmp_path):
    single = ParallelState.single()
    t = setup(single)
    train(t, range(1))
    save_checkpoint(str(tmp_path), 3, t.chunks, t.opt, t.sched, single, consumed_samples=1, args={})
    tp2 = ParallelState(tp_size=2, tp_rank=1)
    with pytest.raises(ValueError, match=r"saved with tp=1, pp=1 but this run uses tp=2, pp=1, dp=1: use"):
        load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, tp2)
    dp2 = ParallelState(dp_size=2, dp_rank=1)
    with pytest.raises(ValueError, match=r"saved with tp=1, pp=1, dp=1 but this run uses tp=1, pp=1, dp=2"):
        load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, dp2)
    assert load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, dp2, no_load_rng=True).iteration == 3

    other = GPTModel(tiny_config(num_layers=3), single)
    with pytest.raises(ValueError, match=r"model does not match the model \(missing keys \['decoder.lay"):
        load_checkpoint(str(tmp_path), other, None, None, single)
    # a plain optimizer state loads into any sharding (megafast.training.optimizer_reshard)
    assert load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, single, distributed_optimizer=True).iteration == 3
    lion = setup(single, optimizer="lion")
    with pytest.raises(ValueError, match=r"cannot load the optimizer from .*the same --optimizer"):
        load_checkpoint(str(tmp_path), lion.chunks, lion.opt, lion.sched, single)

    path = tmp_path / "iter_0000003/mp_rank_00_000/model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*00/model_optim_rng.pt .*truncated"):
        load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, single)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*model_optim_rng.pt"):
        load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, single)
    path.unlink()
    with pytest.raises(ValueError, match=r"model_optim_rng.pt is missing: the checkpoint is incomplete"):
        load_checkpoint(str(tmp_path), t.chunks, t.opt, t.sched, single)


def test_stale_uncommitted_iteration_is_replaced(tmp_path):
    state = ParallelState.single()
    t = setup(state)
    save_checkpoint(str(tmp_path), 1, t.chunks, t.opt, t.sched, state, consumed_samples=1, args={})
    stale = tmp_path / "iter_0000002/mp_rank_00_000"
    os.makedirs(stale)
    (stale / "distrib_optim_dp007.pt").write_bytes(b"junk")
    (stale / ".model_optim_rng.pt.tmp123").write_bytes(b"junk")
    save_checkpoint(str(tmp_path), 2, t.chunks, t.opt, t.sched, state, consumed_samples=2, args={})
    assert os.listdir(stale) == ["model_optim_rng.pt"]
    assert read_latest_checkpoint(str(tmp_path)) == (2, False)
    with pytest.raises(ValueError, match="async_save needs a Checkpointer"):
        save_checkpoint(str(tmp_path), 3, t.chunks, t.opt, t.sched, state, consumed_samples=3, args={},
                        async_save=True)


def test_config_is_rebuilt_from_the_saved_args_alone():
    """A training run's saved ``vars(args)`` rebuilds its GPTConfig without the CLI parser; missing
    or unknown entries are one-line errors."""
    from megafast.arguments import parse_args

    ns = parse_args([
        "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--micro-batch-size", "1", "--mock-data", "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "96",
        "--recompute-granularity", "selective", "--kernels", "torch", "--vocab-size", "250",
    ])
    args = dict(vars(ns))
    want = GPTConfig(
        num_layers=3, hidden_size=64, num_attention_heads=8, vocab_size=250, ffn_hidden_size=96,
        num_query_groups=2, max_position_embeddings=32, position_embedding_type="rope",
        normalization="RMSNorm", activation="swiglu",
        add_bias_linear=False, tie_embeddings=False, hidden_dropout=0.1, attention_dropout=0.1,
        recompute_granularity="selective", kernels="torch",
    )
    assert config_from_args(args) == want  # max_position_embeddings None -> seq_length, vocab from vocab_size
    assert config_from_args(args, vocab_size=300) == dataclasses.replace(want, vocab_size=300)

    with pytest.raises(ValueError, match=r"^ckpt/iter_1: its args lack ffn_hidden_size, rotary_base: they"):
        config_from_args({k: v for k, v in args.items() if k not in ("ffn_hidden_size", "rotary_base")},
                         where="ckpt/iter_1")
    with pytest.raises(ValueError, match=r"unknown normalization='ScaleNorm': megafast knows LayerNorm, RMS"):
        config_from_args({**args, "normalization": "ScaleNorm"})
    with pytest.raises(ValueError, match=r"no valid model: 8 attention heads are not divisible by 3"):
        config_from_args({**args, "num_query_groups": 3})
    with pytest.raises(ValueError, match="name no tokenizer and no vocab_size: pass --true-vocab-size"):
        config_from_args({**args, "vocab_size": None})


def test_checkpoint_format_sits_below_training_convert_and_generation():
    """megafast.checkpoint imports nothing above it; convert and generation build on it, not on
    training or the training CLI (every import statement, lazy ones included)."""
    import ast

    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megafast")
    forbidden = {
        "checkpoint": ("megafast.training", "megafast.convert", "megafast.generation", "megafast.arguments"),
        "convert": ("megafast.training", "megafast.arguments"),
        "generation": ("megafast.training", "megafast.arguments"),
    }
    found = []
    for sub, bad in forbidden.items():
        for name in sorted(os.listdir(os.path.join(package, sub))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(package, sub, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{sub}/{name} imports {m}" for m in modules if m.startswith(bad)]
    assert not found, found
