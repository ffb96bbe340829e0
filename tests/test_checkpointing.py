"""Checkpoint save/load: bit-exact round trips at (tp, pp, dp) = (1,1,1), (2,1,1), (1,2,1), (1,1,2),
the on-disk layout, the commit protocol (a failed save is never loaded), async save, retention and
the error messages a user sees for damaged or mismatched checkpoints."""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
import torch

from dist import run_distributed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.training import checkpointing as ckpt_mod
from megafast.checkpoint.commit import read_latest_checkpoint
from megafast.checkpoint.state_dict import atomic_torch_save, atomic_write_text
from megafast.training.checkpointing import Checkpointer, load_checkpoint, save_checkpoint


def tiny_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=101, make_vocab_size_divisible_by=1
    )
    base.update(kw)
    return GPTConfig(**base)


class TinyScheduler:
    """Stand-in LR scheduler: state is a step count and the current lr."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.num_steps, self.lr = optimizer, 0, 1e-3

    def step(self) -> None:
        self.num_steps += 1
        self.lr *= 0.9
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "lr": self.lr}

    def load_state_dict(self, sd: dict) -> None:
        self.num_steps, self.lr = sd["num_steps"], sd["lr"]


def setup(state: ParallelState, seed: int = 7):
    model = GPTModel(tiny_config(), state, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, TinyScheduler(opt)


def train_step(model, opt, sched, seed: int) -> None:
    """Rank-specific fake gradients: every rank's parameters and optimizer state differ."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad()
    sched.step()


def seed_rng(rank: int) -> None:
    random.seed(100 + rank)
    np.random.seed(200 + rank)
    torch.manual_seed(300 + rank)


def draws(model: GPTModel) -> list:
    """One draw from every RNG stream the checkpoint restores."""
    with model.tracker.fork():
        tracked = torch.rand(3)
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def clone_sd(sd: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else clone_sd(v) if isinstance(v, dict) else v
            for k, v in sd.items()}


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


def save_and_reload(state: ParallelState, root: str, rank: int, ckptr: Checkpointer, dist_opt: bool) -> None:
    """Save after one step, perturb everything, load: all state and RNG draws equal the saved ones."""
    model, opt, sched = setup(state)
    train_step(model, opt, sched, seed=state.pp_rank * 10 + state.tp_rank)  # DP replicas stay equal
    if dist_opt:  # each DP rank's optimizer "shard" is its own
        for s in opt.state.values():
            s["exp_avg_sq"] += state.dp_rank
    seed_rng(rank)
    ckptr.save(10, [model], opt, sched, consumed_samples=80, consumed_valid_samples=8, args={"lr": 1e-3},
               distributed_optimizer=dist_opt)
    saved = (clone_sd(model.state_dict()), clone_sd(opt.state_dict()), sched.state_dict())
    rng_tracker = random.getstate(), np.random.get_state(), torch.get_rng_state(), model.tracker.get_states()
    expected = draws(model)

    train_step(model, opt, sched, seed=1000 + rank)  # diverge
    draws(model)
    fresh_model, fresh_opt, fresh_sched = setup(state, seed=99)
    result = load_checkpoint(root, [fresh_model], fresh_opt, fresh_sched, state,
                             distributed_optimizer=dist_opt)
    assert (result.iteration, result.consumed_samples, result.consumed_valid_samples) == (10, 80, 8)
    assert result.args == {"lr": 1e-3}
    assert_same(fresh_model.state_dict(), saved[0], "model")
    assert_same(fresh_opt.state_dict(), saved[1], "optimizer")
    assert fresh_sched.state_dict() == saved[2]
    assert random.getstate() == rng_tracker[0]
    assert torch.equal(torch.get_rng_state(), rng_tracker[2])
    assert_same(draws(fresh_model), expected, "rng draws")


def mp_dirs(tp: int, pp: int) -> list[str]:
    return [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)]


def listing(root: str) -> dict[str, list[str]]:
    out = {}
    for d, _, files in os.walk(root):
        out[os.path.relpath(d, root)] = sorted(files)
    return out


def worker(rank: int, world: int, root: str, tp: int, pp: int) -> dict:
    config = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    state = ParallelState.create(config)
    dist_opt = state.dp_size > 1  # exercise the per-DP-rank optimizer shards
    with Checkpointer(root, state) as ckptr:
        save_and_reload(state, root, rank, ckptr, dist_opt)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        out = {"listing": listing(root), "latest_text": f.read()}
    if state.dp_size > 1:
        out["crash"] = crash_then_resave(state, root, rank)
    if tp > 1:
        out["async"] = async_matches_sync(state, root, rank)
    return out


def crash_then_resave(state: ParallelState, root: str, rank: int) -> dict:
    """Rank 1 fails while writing iteration 20: nothing is committed, load falls back to 10, and
    saving 20 again replaces the half-written directory."""
    model, opt, sched = setup(state)
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
        ckptr.save(20, model, opt, sched, consumed_samples=160, args={}, distributed_optimizer=True)
    ckpt_mod.atomic_torch_save = good_save
    half_written = sorted(os.listdir(os.path.join(root, "iter_0000020", "mp_rank_00_000")))
    ckptr._barrier()
    committed = read_latest_checkpoint(root)
    loaded = load_checkpoint(root, model, opt, sched, state, distributed_optimizer=True).iteration
    ckptr.save(20, model, opt, sched, consumed_samples=160, args={}, distributed_optimizer=True)
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
    model, opt, sched = setup(state)
    train_step(model, opt, sched, seed=rank)
    sync_root, async_root = os.path.join(root, "sync"), os.path.join(root, "async")
    seed_rng(rank)
    save_checkpoint(sync_root, 5, model, opt, sched, state, consumed_samples=40, args={"x": 1})
    seed_rng(rank)
    release = threading.Event()
    good_save = ckpt_mod.atomic_torch_save

    def held_save(obj, path):
        assert release.wait(60)
        good_save(obj, path)

    ckpt_mod.atomic_torch_save = held_save
    args = {"x": 1}
    ckptr = Checkpointer(async_root, state, async_save=True)
    ckptr.save(5, model, opt, sched, consumed_samples=40, args=args)
    not_committed_yet = ckptr.maybe_finalize() is False and read_latest_checkpoint(async_root) is None
    train_step(model, opt, sched, seed=500 + rank)  # mutates params, optimizer state and lr in place
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


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_distributed_round_trip_layout_and_commit(tmp_path, tp, pp, dp):
    root = str(tmp_path / "ckpt")
    results = run_distributed(worker, tp * pp * dp, root, tp, pp)
    files = results[0]["listing"]
    shards = [f"distrib_optim_dp{d:03d}.pt" for d in range(dp)] if dp > 1 else []
    assert files["."] == ["latest_checkpointed_iteration.txt"]
    assert files["iter_0000010"] == []
    subdirs = {k for k in files if k.startswith("iter_0000010/")}
    assert subdirs == {f"iter_0000010/{d}" for d in mp_dirs(tp, pp)}
    for d in mp_dirs(tp, pp):
        assert files[f"iter_0000010/{d}"] == sorted(["model_optim_rng.pt", *shards])
    assert results[0]["latest_text"] == "10"  # Megatron's format: the number, no newline
    if dp > 1:
        for r in results:
            crash = r["crash"]
            assert crash["committed"] == (10, False) and crash["loaded"] == 10
            assert crash["latest"] == (20, False)
            assert crash["after"] == [*shards, "model_optim_rng.pt"]
        assert results[0]["crash"]["half_written"] == [
            "distrib_optim_dp000.pt", "distrib_optim_dp001.pt.partial", "model_optim_rng.pt",
        ]
    if tp > 1:
        for r in results:
            assert r["async"] == {"not_committed_yet": True, "latest": (5, False)}


def test_single_process_round_trip_and_file_contents(tmp_path):
    root = str(tmp_path)
    state = ParallelState.single()
    with Checkpointer(root, state) as ckptr:
        save_and_reload(state, root, 0, ckptr, dist_opt=False)
    assert listing(root) == {
        ".": ["latest_checkpointed_iteration.txt"],
        "iter_0000010": [],
        "iter_0000010/mp_rank_00_000": ["model_optim_rng.pt"],
    }
    sd = torch.load(os.path.join(root, "iter_0000010/mp_rank_00_000/model_optim_rng.pt"), weights_only=False)
    assert set(sd) == {
        "model", "optimizer", "opt_param_scheduler", "rng_state", "iteration", "consumed_samples", "args",
        "checkpoint_version", "parallel_layout",
    }
    assert sd["checkpoint_version"] == 3.0 and sd["consumed_samples"] == {"train": 80, "valid": 8}
    assert "decoder.layers.1.mlp.linear_fc2.weight" in sd["model"]
    assert set(sd["rng_state"][0]) == {
        "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states",
    }


def test_megatron_directory_name_without_pipelining_is_read(tmp_path):
    """Megatron-LM names the pp == 1 directory mp_rank_00; such a checkpoint loads."""
    state = ParallelState.single()
    model, opt, sched = setup(state)
    with Checkpointer(str(tmp_path), state) as ckptr:
        ckptr.save(3, [model], opt, sched, consumed_samples=24, args={})
    os.rename(tmp_path / "iter_0000003/mp_rank_00_000", tmp_path / "iter_0000003/mp_rank_00")
    fresh, fresh_opt, fresh_sched = setup(state, seed=99)
    assert load_checkpoint(str(tmp_path), [fresh], fresh_opt, fresh_sched, state).iteration == 3
    assert_same(fresh.state_dict(), model.state_dict(), "model")


def test_virtual_chunks_finetune_and_release(tmp_path):
    state = ParallelState.single()
    chunks = [GPTModel(tiny_config(), state, seed=1, layer_range=(0, 1)),
              GPTModel(tiny_config(), state, seed=2, layer_range=(1, 2))]
    save_checkpoint(str(tmp_path), 30, chunks, None, None, state, consumed_samples=3, args={})
    sd = torch.load(tmp_path / "iter_0000030/mp_rank_00_000/model_optim_rng.pt", weights_only=False)
    assert {"model0", "model1"} <= set(sd) and "model" not in sd
    fresh = [GPTModel(tiny_config(), state, seed=5, layer_range=(0, 1)),
             GPTModel(tiny_config(), state, seed=6, layer_range=(1, 2))]
    result = load_checkpoint(str(tmp_path), fresh, None, None, state, finetune=True)
    assert (result.iteration, result.consumed_samples) == (0, 0)
    for a, b in zip(chunks, fresh):
        assert_same(a.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match=r"chunk\(s\) \['model0', 'model1'\] but the model has 1 chunk"):
        load_checkpoint(str(tmp_path), fresh[0], None, None, state)

    # A release checkpoint: model only, iteration 0, even without finetune.
    model = GPTModel(tiny_config(), state, seed=1)
    release_file = tmp_path / "rel/release/mp_rank_00_000/model_optim_rng.pt"
    atomic_torch_save({"model": model.state_dict()}, str(release_file))
    atomic_write_text(str(tmp_path / "rel/latest_checkpointed_iteration.txt"), "release")
    other = GPTModel(tiny_config(), state, seed=4)
    opt = torch.optim.AdamW(other.parameters())
    assert load_checkpoint(str(tmp_path / "rel"), other, opt, TinyScheduler(opt), state).iteration == 0
    assert_same(other.state_dict(), model.state_dict())


def test_max_checkpoints_keeps_newest_and_skips_uncommitted(tmp_path):
    state = ParallelState.single()
    model, opt, sched = setup(state)
    os.makedirs(tmp_path / "iter_0000099/mp_rank_00_000")  # a newer, uncommitted (crashed) save
    with Checkpointer(str(tmp_path), state, max_checkpoints=2) as ckptr:
        for it in (1, 2, 3, 4):
            ckptr.save(it, model, opt, sched, consumed_samples=it, args={})
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000003", "iter_0000004", "iter_0000099", "latest_checkpointed_iteration.txt",
    ]
    assert load_checkpoint(str(tmp_path), model, opt, sched, state).iteration == 4
    with pytest.raises(ValueError, match="max_checkpoints must be >= 1"):
        Checkpointer(str(tmp_path), state, max_checkpoints=0)


def test_missing_directories_and_no_commit(tmp_path):
    state = ParallelState.single()
    model, opt, sched = setup(state)
    with pytest.raises(ValueError, match=r"checkpoint directory .*nowhere does not exist: check --load"):
        load_checkpoint(str(tmp_path / "nowhere"), model, opt, sched, state)
    assert load_checkpoint(str(tmp_path / "nowhere"), model, opt, sched, state, missing_ok=True) is None
    os.makedirs(tmp_path / "iter_0000005/mp_rank_00_000")  # written but never committed
    assert load_checkpoint(str(tmp_path), model, opt, sched, state) is None
    atomic_write_text(str(tmp_path / "latest_checkpointed_iteration.txt"), "7")
    with pytest.raises(ValueError, match=r"commits iteration 7 but .*iter_0000007 does not exist"):
        load_checkpoint(str(tmp_path), model, opt, sched, state)
    atomic_write_text(str(tmp_path / "latest_checkpointed_iteration.txt"), "seven")
    with pytest.raises(ValueError, match="expected an iteration number or 'release'"):
        load_checkpoint(str(tmp_path), model, opt, sched, state)


def test_layout_mismatch_and_damaged_files(tmp_path):
    single = ParallelState.single()
    model, opt, sched = setup(single)
    save_checkpoint(str(tmp_path), 3, model, opt, sched, single, consumed_samples=1, args={})
    tp2 = ParallelState(tp_size=2, tp_rank=1)
    with pytest.raises(ValueError, match=r"saved with tp=1, pp=1 but this run uses tp=2, pp=1, dp=1: use"):
        load_checkpoint(str(tmp_path), model, opt, sched, tp2)
    dp2 = ParallelState(dp_size=2, dp_rank=1)
    with pytest.raises(ValueError, match=r"saved with tp=1, pp=1, dp=1 but this run uses tp=1, pp=1, dp=2"):
        load_checkpoint(str(tmp_path), model, opt, sched, dp2)
    assert load_checkpoint(str(tmp_path), model, opt, sched, dp2, no_load_rng=True).iteration == 3

    other = GPTModel(tiny_config(num_layers=3), single)
    with pytest.raises(ValueError, match=r"model does not match the model \(missing keys \['decoder.lay"):
        load_checkpoint(str(tmp_path), other, None, None, single)
    with pytest.raises(ValueError, match="was saved without --use-distributed-optimizer"):
        load_checkpoint(str(tmp_path), model, opt, sched, single, distributed_optimizer=True)

    path = tmp_path / "iter_0000003/mp_rank_00_000/model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*00/model_optim_rng.pt .*truncated"):
        load_checkpoint(str(tmp_path), model, opt, sched, single)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*model_optim_rng.pt"):
        load_checkpoint(str(tmp_path), model, opt, sched, single)
    path.unlink()
    with pytest.raises(ValueError, match=r"model_optim_rng.pt is missing: the checkpoint is incomplete"):
        load_checkpoint(str(tmp_path), model, opt, sched, single)


def test_stale_uncommitted_iteration_is_replaced(tmp_path):
    state = ParallelState.single()
    model, opt, sched = setup(state)
    save_checkpoint(str(tmp_path), 1, model, opt, sched, state, consumed_samples=1, args={})
    stale = tmp_path / "iter_0000002/mp_rank_00_000"
    os.makedirs(stale)
    (stale / "distrib_optim_dp007.pt").write_bytes(b"junk")
    (stale / ".model_optim_rng.pt.tmp123").write_bytes(b"junk")
    save_checkpoint(str(tmp_path), 2, model, opt, sched, state, consumed_samples=2, args={})
    assert os.listdir(stale) == ["model_optim_rng.pt"]
    assert read_latest_checkpoint(str(tmp_path)) == (2, False)
    with pytest.raises(ValueError, match="async_save needs a Checkpointer"):
        save_checkpoint(str(tmp_path), 3, model, opt, sched, state, consumed_samples=3, args={},
                        async_save=True)
