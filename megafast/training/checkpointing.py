"""Training checkpoints: what a run saves and restores, committed atomically, optionally in the background.

The format (paths, commit marker, file entries, Megatron names, args) is megafast.checkpoint; this
module decides what goes into a training checkpoint and orchestrates writing it over the ranks.

``model_optim_rng.pt`` is written by the data-parallel rank 0 of each (tp, pp) and holds
``model`` (or ``model0``, ``model1``, ... for virtual pipeline chunks), ``optimizer`` (absent
with a DP-sharded optimizer), ``opt_param_scheduler``, ``rng_state``, then ``iteration``,
``consumed_samples``, ``args`` (``vars(args)``), ``checkpoint_version`` and ``parallel_layout``
(megafast.checkpoint.state_dict). A LoRA run's checkpoint holds only the adapter weights under
``model`` and its settings under ``lora``.

RNG states differ on every rank, so ``rng_state`` is Megatron's list with one entry per DP rank
(gathered over a gloo DP group at save time; entry ``d`` is restored on DP rank ``d``); each entry
holds ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``, ``cuda_rng_state`` (None
without CUDA) and ``rng_tracker_states`` (a list: one ``tracker.get_states()`` per model chunk).
With a DP-sharded optimizer every DP rank writes its own ``optimizer.state_dict()`` (its shard)
to ``distrib_optim_dp{dp:03d}.pt`` and reads the same file back. A run with another DP size or
sharding strategy (``parallel_layout`` records both) reads every DP rank's piece (or the plain
``optimizer``) and re-cuts it for its own layout (megafast.training.optimizer_reshard), so the
optimizer state survives a change of DP size; the RNG states, one per DP rank, do not
(``--no-load-rng``). With ZeRO-3 (``optim_grads_params``, pass ``ddp``) the model's parameters are
all-gathered while its state dict is taken or loaded, so the files hold whole weights as usual.

Expert parallelism (EP > 1): each (tp, pp) rank has one directory per EP rank,
``mp_rank_{tp:02d}_{pp:03d}_{ep:03d}`` (Megatron's legacy naming), whose ``model_optim_rng.pt`` is
written by the first rank holding that EP rank's experts (expert-DP rank 0) and holds the dense
weights and that EP rank's experts; its ``rng_state`` lists every DP rank's states, and DP-sharded
optimizer files go to the directory of the writing rank's EP rank. Resuming needs the same EP size
(and, for the optimizer state, the same DP size and sharding); tools/checkpoint/convert.py
re-cuts the model for another layout.

Commit protocol: every file is written atomically; all ranks then agree (a small all-reduce over
a dedicated gloo group held by :class:`Checkpointer`) that their writes succeeded, and only then
rank 0 writes the commit file (megafast.checkpoint.commit). :func:`load_checkpoint` reads only
the committed iteration, so a half-written iteration directory is never loaded; saving that
iteration again first removes it.

A Megatron-LM checkpoint (legacy ``torch`` or ``torch_dist`` format, saved at any TP/PP) given to
``--load`` (with ``--finetune`` or ``--no-load-optim``) or ``--pretrained-checkpoint`` is detected
and its weights converted in memory to this run's layout (megafast.checkpoint.megatron_format).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megafast.checkpoint.args import model_args
from megafast.checkpoint.commit import committed, read_latest_checkpoint, write_commit
from megafast.checkpoint.megatron_format import load_megatron_model, megatron_format
from megafast.checkpoint.paths import (
    MODEL_FILE,
    TRACKER_FILE,
    distrib_optim_name,
    iteration_dir,
    iterations,
    mp_rank_dir,
    saved_expert_parallel_size,
    saved_layout,
)
from megafast.checkpoint.state_dict import (
    Chunks,
    as_chunks,
    atomic_torch_save,
    file_metadata,
    load_file,
    load_into,
    load_model_chunks,
    model_state_dicts,
    parallel_layout,
    reason,
)
from megafast.parallel.state import ParallelState
from megafast.training.data_parallel import DataParallel


class Stateful(Protocol):
    """An optimizer or LR scheduler: anything with ``state_dict`` / ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class LoadResult:
    """What a resumed run continues from (all zero for ``finetune`` or a ``release`` checkpoint)."""

    iteration: int
    consumed_samples: int
    consumed_valid_samples: int
    args: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # the iteration directory that was read


# ------------------------------------------------------------------------ state collection


def _snapshot(obj: Any, clone: bool) -> Any:
    """Tensors moved to CPU (copied when ``clone``) inside rebuilt dicts/lists/tuples.

    With ``clone`` the result shares nothing with training state: other leaves are deep-copied,
    so the background writer sees the values of the moment of the call.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if clone else t.cpu()
    if isinstance(obj, dict):
        items = {k: _snapshot(v, clone) for k, v in obj.items()}
        out = type(obj)(items) if isinstance(obj, OrderedDict) else items  # keeps nn.Module's OrderedDict
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() versions, used by load_state_dict
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [_snapshot(v, clone) for v in obj]
    if isinstance(obj, tuple):
        items = [_snapshot(v, clone) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj) if clone else obj


def _rng_state(chunks: list[nn.Module]) -> dict[str, Any]:
    """This rank's RNG streams: python, numpy, torch CPU, CUDA, and each chunk's TP tracker."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": [c.tracker.get_states() if hasattr(c, "tracker") else {} for c in chunks],
    }


def _restore_rng(entry: dict[str, Any], chunks: list[nn.Module], path: str) -> None:
    trackers = entry["rng_tracker_states"]
    if len(trackers) != len(chunks):
        raise ValueError(f"{path} holds RNG states of {len(trackers)} chunks, the model has {len(chunks)}")
    random.setstate(entry["random_rng_state"])
    np.random.set_state(entry["np_rng_state"])
    torch.set_rng_state(entry["torch_rng_state"])
    if entry["cuda_rng_state"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(entry["cuda_rng_state"])
    for chunk, states in zip(chunks, trackers):
        if hasattr(chunk, "tracker"):
            chunk.tracker.set_states(states)


# ----------------------------------------------------------------------------------- saving


@dataclass
class _PendingSave:
    """This rank's files of one iteration, written here or by a background thread."""

    iteration: int
    files: list[tuple[Any, str]]
    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            for obj, path in self.files:
                atomic_torch_save(obj, path)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank by the status all-reduce
            self.error = exc
        self.files = []  # drop the snapshot as soon as it is on disk

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class Checkpointer:
    """Saves checkpoints of one run into ``save_dir`` and commits each once every rank has written.

    Construction is collective (it creates a gloo group over all ranks, and gloo DP groups for the
    RNG gather), as are :meth:`save`, :meth:`maybe_finalize` and :meth:`finalize`: call them on
    every rank at the same points. Without an initialised multi-rank process group it works alone.

    With ``async_save`` :meth:`save` snapshots everything to CPU and returns while a thread
    writes; call :meth:`maybe_finalize` every iteration (it commits once all ranks are done) and
    :meth:`finalize` at the end. ``max_checkpoints`` keeps only the newest K committed iterations.
    ``on_commit(iteration)`` runs on every rank once an iteration is committed (``--save-hf``).
    """

    def __init__(
        self,
        save_dir: str,
        state: ParallelState,
        *,
        async_save: bool = False,
        max_checkpoints: Optional[int] = None,
        on_commit: Optional[Callable[[int], None]] = None,
    ) -> None:
        if max_checkpoints is not None and max_checkpoints < 1:
            raise ValueError(f"max_checkpoints must be >= 1 (or None to keep all), got {max_checkpoints}")
        self.save_dir = save_dir
        self.state = state
        self.async_save = async_save
        self.max_checkpoints = max_checkpoints
        self.on_commit = on_commit  # called on every rank with each committed iteration (--save-hf)
        self._pending: Optional[_PendingSave] = None
        self._group: Optional[dist.ProcessGroup] = None  # None only when running as a single process
        self._dp_group: Optional[dist.ProcessGroup] = None  # None when dp == 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            if world != state.world_size or dist.get_rank() != state.rank:
                raise ValueError(
                    f"ParallelState (rank {state.rank} of {state.world_size}) does not match the process "
                    f"group (rank {dist.get_rank()} of {world}): build it with ParallelState.create"
                )
            self._group = dist.new_group(list(range(world)), backend="gloo")
            tp, dp = state.tp_size, state.dp_size
            for p in range(state.pp_size):
                for t in range(tp):
                    ranks = [p * dp * tp + d * tp + t for d in range(dp)]
                    group = dist.new_group(ranks, backend="gloo") if dp > 1 else None
                    if state.rank in ranks:
                        self._dp_group = group

    # -- collectives over the coordination group (identity when single-process)

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def _all_status(self, mine: int) -> list[int]:
        """Every rank's status code (0 pending, 1 ok, 2 failed), by a SUM all-reduce of one-hot slots."""
        if self._group is None:
            return [mine]
        t = torch.zeros(self.state.world_size, dtype=torch.int32)
        t[self.state.rank] = mine
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._group)
        return t.tolist()

    def _gather_rng(self, mine: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
        """Every DP rank's RNG states on DP rank 0 (None elsewhere), indexed by DP rank; with
        expert parallelism on every DP rank (each EP rank's file holds them all)."""
        if self._dp_group is None:
            return [mine]
        st = self.state
        if st.ep_size > 1:
            out = [None] * st.dp_size
            dist.all_gather_object(out, mine, group=self._dp_group)
            return out
        dst = st.pp_rank * st.dp_size * st.tp_size + st.tp_rank
        out: Optional[list[Any]] = [None] * st.dp_size if st.dp_rank == 0 else None
        dist.gather_object(mine, out, dst=dst, group=self._dp_group)
        return out

    # -- saving

    def save(
        self,
        iteration: int,
        chunks: Chunks,
        optimizer: Optional[Stateful],
        scheduler: Optional[Stateful],
        *,
        consumed_samples: int,
        args: dict[str, Any],
        consumed_valid_samples: int = 0,
        distributed_optimizer: bool = False,
        lora: Optional[dict[str, Any]] = None,
        ddp: Optional[DataParallel] = None,
    ) -> None:
        """Write iteration ``iteration`` (then commit it, unless ``async_save`` defers that).

        ``ddp``: the run's DataParallel (needed with ZeRO-3, whose parameters are gathered to be saved).

        ``lora`` (the LoRA settings, with ``rank`` and ``alpha``): the model entries hold only the
        adapter weights (the frozen base is not repeated in every checkpoint) and ``ckpt["lora"]``
        records the settings.

        ``distributed_optimizer``: ``optimizer.state_dict()`` is this DP rank's shard and goes to
        ``distrib_optim_dp{dp:03d}.pt`` (written by every rank) instead of ``model_optim_rng.pt``.
        A previous asynchronous save is finalized first.
        """
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if distributed_optimizer and optimizer is None:
            raise ValueError("distributed_optimizer=True needs the optimizer whose shard to save")
        self.finalize()
        chunks = as_chunks(chunks)
        st = self.state
        if st.rank == 0:
            self._remove_stale(iteration)
        self._barrier()  # nobody writes into a directory that is being removed
        rng = self._gather_rng(_rng_state(chunks))
        clone = self.async_save
        ep_rank = st.ep_rank if st.ep_size > 1 else None  # EP: one directory per EP rank
        directory = mp_rank_dir(self.save_dir, iteration, st.tp_rank, st.pp_rank, st.pp_size, ep_rank=ep_rank)
        layout = parallel_layout(st.tp_size, st.pp_size, st.dp_size, distributed_optimizer)
        if st.ep_size > 1:
            layout["expert_model_parallel_size"] = st.ep_size
        # the model's writers: DP rank 0, or with EP the first rank holding each EP rank's experts
        writer = st.expert_dp_rank == 0 if st.ep_size > 1 else st.dp_rank == 0
        if ddp is not None:
            layout["data_parallel_sharding_strategy"] = ddp.sharding_strategy
        files: list[tuple[Any, str]] = []
        gathered = ddp is not None and ddp.shard_params  # whole weights exist only inside the context
        with ddp.unsharded_params() if ddp is not None else contextlib.nullcontext():
            model = model_state_dicts(chunks, adapters_only=lora is not None) if writer else {}
            model = _snapshot(model, clone or gathered)
        if writer:
            ckpt: dict[str, Any] = model
            if lora is not None:
                ckpt["lora"] = dict(lora)
            if optimizer is not None and not distributed_optimizer:
                ckpt["optimizer"] = _snapshot(optimizer.state_dict(), clone)
            if scheduler is not None:
                ckpt["opt_param_scheduler"] = _snapshot(scheduler.state_dict(), clone)
            ckpt["rng_state"] = _snapshot(rng, clone)
            ckpt.update(file_metadata(iteration, consumed_samples, consumed_valid_samples,
                                      _snapshot(dict(args), clone), layout))
            files.append((ckpt, os.path.join(directory, MODEL_FILE)))
        if distributed_optimizer:
            shard = {"optimizer": _snapshot(optimizer.state_dict(), clone), "parallel_layout": layout}
            files.append((shard, os.path.join(directory, distrib_optim_name(st.dp_rank))))
        pending = _PendingSave(iteration, files)
        self._pending = pending
        if self.async_save:
            pending.thread = threading.Thread(target=pending.run, name="checkpoint-writer", daemon=True)
            pending.thread.start()
        else:
            pending.run()
            self.finalize()

    def maybe_finalize(self, blocking: bool = False) -> bool:
        """Commit the pending save if every rank has finished writing it; True when none is pending.

        Collective when a save is pending. Raises RuntimeError on every rank (and commits nothing)
        when writing failed on any rank.
        """
        pending = self._pending
        if pending is None:
            return True
        if blocking and pending.thread is not None:
            pending.thread.join()
        status = self._all_status(0 if not pending.done else 2 if pending.error is not None else 1)
        if 0 in status:
            return False
        self._pending = None
        where = iteration_dir(self.save_dir, pending.iteration)
        failed = [r for r, s in enumerate(status) if s == 2]
        if failed:
            raise RuntimeError(
                f"checkpoint {where} was not committed: writing failed on rank(s) {failed}"
                + (f" ({type(pending.error).__name__}: {pending.error})" if pending.error is not None else "")
            ) from pending.error
        commit_error: Optional[BaseException] = None
        if self.state.rank == 0:
            try:
                write_commit(self.save_dir, pending.iteration)
            except OSError as exc:
                commit_error = exc
            else:
                self._delete_old_checkpoints(pending.iteration)
        if 2 in self._all_status(2 if commit_error is not None else 1):
            raise RuntimeError(
                f"checkpoint {where} was written but rank 0 could not commit it to "
                f"{os.path.join(self.save_dir, TRACKER_FILE)}" + (f": {commit_error}" if commit_error else "")
            ) from commit_error
        if self.on_commit is not None:
            self.on_commit(pending.iteration)
        return True

    def finalize(self) -> None:
        """Wait for the pending save (if any) on every rank and commit it."""
        self.maybe_finalize(blocking=True)

    def close(self) -> None:
        """Finalize, then release the coordination process groups."""
        self.finalize()
        for group in (self._dp_group, self._group):
            if group is not None:
                dist.destroy_process_group(group)
        self._group = self._dp_group = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()

    # -- housekeeping (rank 0 only)

    def _committed_iteration(self) -> Optional[int]:
        latest = read_latest_checkpoint(self.save_dir)
        return None if latest is None or latest[1] else latest[0]

    def _remove_stale(self, iteration: int) -> None:
        """Remove ``iter_{iteration}`` left uncommitted by a crashed save, so it is rewritten cleanly."""
        path = iteration_dir(self.save_dir, iteration)
        newest = self._committed_iteration()
        if os.path.isdir(path) and (newest is None or iteration > newest):
            shutil.rmtree(path)

    def _delete_old_checkpoints(self, newest: int) -> None:
        """Keep the newest ``max_checkpoints`` committed iterations; never touch uncommitted newer ones."""
        if self.max_checkpoints is None:
            return
        done = [it for it in iterations(self.save_dir) if it <= newest]
        for it in done[: -self.max_checkpoints]:
            try:
                shutil.rmtree(iteration_dir(self.save_dir, it))
            except OSError as exc:
                warnings.warn(f"could not delete old checkpoint {iteration_dir(self.save_dir, it)}: {exc}")


def save_checkpoint(
    save_dir: str,
    iteration: int,
    chunks: Chunks,
    optimizer: Optional[Stateful],
    scheduler: Optional[Stateful],
    state: ParallelState,
    *,
    consumed_samples: int,
    args: dict[str, Any],
    consumed_valid_samples: int = 0,
    distributed_optimizer: bool = False,
    async_save: bool = False,
    max_checkpoints: Optional[int] = None,
    checkpointer: Optional[Checkpointer] = None,
    lora: Optional[dict[str, Any]] = None,
    ddp: Optional[DataParallel] = None,
) -> None:
    """Save one checkpoint (collective) with ``checkpointer``, whose settings must match the arguments;
    without one, a one-off Checkpointer commits before returning (so ``async_save`` needs one)."""
    own = checkpointer is None
    if own and async_save:
        raise ValueError("async_save needs a Checkpointer that outlives the call: pass checkpointer=")
    checkpointer = checkpointer or Checkpointer(save_dir, state, max_checkpoints=max_checkpoints)
    if (checkpointer.save_dir, checkpointer.async_save, checkpointer.max_checkpoints) != (
        save_dir, async_save, max_checkpoints
    ):
        raise ValueError("save_dir/async_save/max_checkpoints differ from the checkpointer's settings")
    try:
        checkpointer.save(
            iteration, chunks, optimizer, scheduler, consumed_samples=consumed_samples, args=args,
            consumed_valid_samples=consumed_valid_samples, distributed_optimizer=distributed_optimizer,
            lora=lora, ddp=ddp,
        )
    finally:
        if own:
            checkpointer.close()


# ---------------------------------------------------------------------------------- loading


def load_checkpoint(
    load_dir: str,
    chunks: Chunks,
    optimizer: Optional[Stateful],
    scheduler: Optional[Stateful],
    state: ParallelState,
    *,
    no_load_optim: bool = False,
    no_load_rng: bool = False,
    finetune: bool = False,
    strict: bool = True,
    distributed_optimizer: bool = False,
    missing_ok: bool = False,
    ddp: Optional[DataParallel] = None,
) -> Optional[LoadResult]:
    """Load the committed checkpoint of ``load_dir`` into this rank's chunks, optimizer and scheduler.

    Returns None (start from scratch, as Megatron does) when ``load_dir`` has no commit file, or
    does not exist and ``missing_ok`` (for ``--load`` equal to ``--save`` on a first run).
    ``finetune`` or a ``release`` commit loads the model only and starts at iteration 0 with no
    consumed samples. The tensor/pipeline layout must equal the saved one, and the data-parallel
    size too when the RNG states are loaded (the optimizer state is re-cut for another DP size or
    sharding strategy). ``ddp``: the run's DataParallel (needed with ZeRO-3). Errors are ValueError.
    """
    if not os.path.isdir(load_dir):
        if missing_ok:
            return None
        raise ValueError(f"checkpoint directory {load_dir} does not exist: check --load")
    commit = committed(load_dir)
    if commit is None:
        return None
    megatron = megatron_format(load_dir)
    if megatron is not None:
        return _load_megatron(load_dir, megatron, as_chunks(chunks), state, finetune, no_load_optim, ddp)
    iteration, release, directory = commit.iteration, commit.release, commit.directory
    here = f"tp={state.tp_size}, pp={state.pp_size}, dp={state.dp_size}"
    saved_tp, saved_pp = saved_layout(directory)
    if (saved_tp, saved_pp) != (state.tp_size, state.pp_size):
        raise ValueError(
            f"checkpoint {directory} was saved with tp={saved_tp}, pp={saved_pp} but this run uses {here}: "
            "use the same --tensor/--pipeline-model-parallel-size or reshard with tools/checkpoint/convert.py"
        )
    saved_ep = saved_expert_parallel_size(directory)
    if saved_ep != state.ep_size:
        raise ValueError(
            f"checkpoint {directory} was saved with expert-parallel size {saved_ep} but this run uses "
            f"{state.ep_size}: use the same --expert-model-parallel-size or reshard with "
            "tools/checkpoint/convert.py --target-expert-parallel-size"
        )
    model_only = finetune or release
    load_optim = not model_only and not no_load_optim
    load_rng = not model_only and not no_load_rng
    chunks = as_chunks(chunks)
    mp_dir = mp_rank_dir(load_dir, iteration, state.tp_rank, state.pp_rank, state.pp_size, release,
                         ep_rank=state.ep_rank if state.ep_size > 1 else None)
    path = os.path.join(mp_dir, MODEL_FILE)
    ckpt = load_file(path)
    layout = ckpt.get("parallel_layout", {})
    saved_dp = layout.get("data_parallel_size", state.dp_size)
    if saved_dp != state.dp_size and load_rng:
        raise ValueError(
            f"checkpoint {directory} was saved with tp={saved_tp}, pp={saved_pp}, dp={saved_dp} but this run "
            f"uses {here}: resume with as many ranks, or pass --no-load-rng (its RNG states are per DP rank; "
            "the optimizer state is resharded) or --finetune"
        )

    with ddp.unsharded_params(write_back=True) if ddp is not None else contextlib.nullcontext():
        load_model_chunks(ckpt, chunks, path, strict)

    # Megatron loads the optimizer and the LR scheduler together unless --finetune/--no-load-optim.
    if load_optim and optimizer is not None and state.ep_size > 1 and (
        saved_dp != state.dp_size or layout.get("distributed_optimizer", False) != distributed_optimizer
    ):
        raise ValueError(
            f"checkpoint {directory} was saved with dp={saved_dp} and expert parallelism: its optimizer state "
            "loads only at the same data-parallel size and --use-distributed-optimizer setting; "
            "resume that way or pass --no-load-optim"
        )
    if load_optim and optimizer is not None:
        _load_optimizer(optimizer, ckpt, layout, mp_dir, path, saved_dp, state.dp_rank, distributed_optimizer)
    if load_optim and scheduler is not None:
        if "opt_param_scheduler" not in ckpt:
            raise ValueError(f"{path} holds no 'opt_param_scheduler': pass --no-load-optim")
        load_into(scheduler, ckpt["opt_param_scheduler"], "LR scheduler", path)

    if load_rng:
        rng = ckpt.get("rng_state")
        if not isinstance(rng, list) or len(rng) <= state.dp_rank:
            raise ValueError(f"{path} holds no RNG state for DP rank {state.dp_rank}: pass --no-load-rng")
        _restore_rng(rng[state.dp_rank], chunks, path)

    if model_only:
        return LoadResult(0, 0, 0, ckpt.get("args", {}), directory)
    if "iteration" not in ckpt or "consumed_samples" not in ckpt:
        raise ValueError(f"{path} holds no iteration/consumed_samples: load it with --finetune")
    consumed = ckpt["consumed_samples"]
    args = ckpt.get("args", {})
    return LoadResult(ckpt["iteration"], consumed["train"], consumed["valid"], args, directory)


def _load_megatron(
    load_dir: str,
    fmt: str,
    chunks: list[nn.Module],
    state: ParallelState,
    finetune: bool,
    no_load_optim: bool,
    ddp: Optional[DataParallel],
) -> LoadResult:
    """A Megatron-LM checkpoint (legacy or torch_dist, any TP/PP) loaded straight into this run's
    chunks: the model only (its optimizer and RNG states are Megatron's own), converted in memory."""
    if not finetune and not no_load_optim:
        raise ValueError(
            f"{load_dir} is a Megatron-LM checkpoint ({fmt} format): megafast loads its model weights only; "
            "pass --finetune (start at iteration 0) or --no-load-optim (continue its iteration count)"
        )
    with ddp.unsharded_params(write_back=True) if ddp is not None else contextlib.nullcontext():
        reader = load_megatron_model(load_dir, chunks, state)
    args = model_args(reader.config, state.tp_size, state.pp_size)
    if finetune or reader.release:
        return LoadResult(0, 0, 0, args, reader.directory)
    saved = reader.args
    return LoadResult(reader.iteration, int(saved.get("consumed_train_samples") or 0),
                      int(saved.get("consumed_valid_samples") or 0), args, reader.directory)


def _load_optimizer(
    optimizer: Stateful,
    ckpt: dict[str, Any],
    layout: dict[str, Any],
    mp_dir: str,
    path: str,
    saved_dp: int,
    dp_rank: int,
    distributed_optimizer: bool,
) -> None:
    """This rank's optimizer state: its own saved piece when the layout is unchanged, else every DP
    rank's pieces re-cut for this optimizer (``load_resharded``)."""
    sharded = layout.get("distributed_optimizer", False)
    if sharded:
        names = [os.path.join(mp_dir, distrib_optim_name(d)) for d in range(saved_dp)]
        mine = names[dp_rank] if dp_rank < saved_dp else None
    elif "optimizer" not in ckpt:
        raise ValueError(f"{path} holds no 'optimizer' (saved with no optimizer): pass --no-load-optim")
    else:
        names, mine = [path], path
    first = (load_file(mine)["optimizer"] if sharded else ckpt["optimizer"]) if mine is not None else None
    reshardable = hasattr(optimizer, "load_resharded")
    if first is not None and (not reshardable or optimizer.matches(first)):
        if sharded != distributed_optimizer and not reshardable:
            raise ValueError(f"{path} was saved {'with' if sharded else 'without'} --use-distributed-optimizer: "
                             "resume the same way or pass --no-load-optim")
        load_into(optimizer, first, "optimizer shard" if sharded else "optimizer", mine)
        return
    if not reshardable:
        raise ValueError(f"{path}: the optimizer state was saved with dp={saved_dp}: resume with as many ranks "
                         "or pass --no-load-optim")
    pieces = [load_file(n)["optimizer"] for n in names] if sharded else [ckpt["optimizer"]]
    try:
        optimizer.load_resharded(pieces)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the optimizer from {mp_dir} (resharding from dp={saved_dp}): "
                         f"{reason(exc)}") from exc
