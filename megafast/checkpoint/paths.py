"""Megatron's names on disk: iteration and per-rank directories, file names, model entries.

::

    {root}/latest_checkpointed_iteration.txt                        the commit (megafast.checkpoint.commit)
    {root}/iter_{iteration:07d}/                                   ({root}/release for a release checkpoint)
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt               one per (tp, pp) rank; Megatron-LM's
                                                                   pp == 1 name mp_rank_{tp:02d} is read too
        mp_rank_{tp:02d}_{pp:03d}/distrib_optim_dp{dp:03d}.pt      DP-sharded optimizer only
        mp_rank_{tp:02d}_{pp:03d}_{ep:03d}/...                     with expert parallelism (EP > 1):
                                                                   one per (tp, pp, ep) rank, each
                                                                   with the dense weights and its
                                                                   EP rank's experts (Megatron's
                                                                   legacy naming)

Inside ``model_optim_rng.pt`` the model is ``model`` (one chunk) or ``model0``, ``model1``, ...
(virtual pipeline chunks), as Megatron names them.
"""

from __future__ import annotations

import os
import re
from typing import Optional

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
RELEASE = "release"
MP_DIR = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?")
ITER_DIR = re.compile(r"iter_(\d{7,})")
MODEL_KEY = re.compile(r"model\d*")


def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    """``{root}/iter_{iteration:07d}`` (``{root}/release`` for a release checkpoint)."""
    return os.path.join(root, RELEASE if release else f"iter_{iteration:07d}")


def mp_rank_dir(
    root: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int, release: bool = False,
    ep_rank: Optional[int] = None,
) -> str:
    """The per-(tp, pp) directory ``mp_rank_{tp:02d}_{pp:03d}`` (DESIGN.md), or with expert
    parallelism (``ep_rank`` given) the per-(tp, pp, ep) one ``mp_rank_{tp:02d}_{pp:03d}_{ep:03d}``.

    A checkpoint written by Megatron-LM without pipelining names it ``mp_rank_{tp:02d}``; that
    directory is used when it is the one that exists.
    """
    base = iteration_dir(root, iteration, release)
    if ep_rank is not None:
        return os.path.join(base, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_{ep_rank:03d}")
    path = os.path.join(base, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")
    megatron = os.path.join(base, f"mp_rank_{tp_rank:02d}")
    if pp_size == 1 and not os.path.isdir(path) and os.path.isdir(megatron):
        return megatron
    return path


def distrib_optim_name(dp_rank: int) -> str:
    """The file of DP rank ``dp_rank``'s optimizer shard, next to ``model_optim_rng.pt``."""
    return f"distrib_optim_dp{dp_rank:03d}.pt"


def expert_rank_dirs(directory: str) -> dict[tuple[int, int, int], str]:
    """(tp rank, pp rank, ep rank) -> path of every ``mp_rank_*`` directory of an iteration
    directory (ep rank 0 for directories without one)."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if m := MP_DIR.fullmatch(name):
            found[(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))] = os.path.join(directory, name)
    if not found:
        raise ValueError(f"{directory} holds no mp_rank_* directories: the checkpoint is incomplete")
    return found


def saved_expert_parallel_size(directory: str) -> int:
    """The expert-parallel size an iteration directory was saved with (1 without EP directories)."""
    return max(e for _, _, e in expert_rank_dirs(directory)) + 1


def rank_dirs(directory: str) -> dict[tuple[int, int], str]:
    """(tp rank, pp rank) -> path of every ``mp_rank_*`` directory of an iteration directory
    (with expert parallelism, that of EP rank 0)."""
    found = {}
    for (t, p, e), path in expert_rank_dirs(directory).items():
        if e == 0:
            found[(t, p)] = path
    if not found:
        raise ValueError(f"{directory} holds no mp_rank_* directories: the checkpoint is incomplete")
    return found


def saved_layout(directory: str) -> tuple[int, int]:
    """(tp, pp) sizes an iteration directory was saved with, from its ``mp_rank_*`` names."""
    ranks = rank_dirs(directory)
    return max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1


def iterations(root: str) -> list[int]:
    """Every ``iter_*`` directory of ``root`` (committed or not), as sorted iteration numbers."""
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := ITER_DIR.fullmatch(name)))


def model_key(chunk: int, num_chunks: int) -> str:
    """``model`` for a single chunk, else ``model{chunk}`` (Megatron's virtual-pipeline names)."""
    return "model" if num_chunks == 1 else f"model{chunk}"


def model_keys(ckpt: dict) -> list[str]:
    """The model entries of a loaded ``model_optim_rng.pt``, sorted."""
    return sorted(k for k in ckpt if MODEL_KEY.fullmatch(k))
