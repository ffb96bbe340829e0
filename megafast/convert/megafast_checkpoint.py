"""Reading and writing megafast checkpoints one full tensor at a time, at any TP/PP layout.

The reader memory-maps every ``mp_rank_*/model_optim_rng.pt`` of the committed iteration and
rebuilds a full tensor from its TP shards only when asked (:func:`layout.unshard_parts`). The
writer shards each full tensor for the target layout as it arrives and parks the shards in
memory-mapped temporary files (``torch.from_file``), so the data of the layers already done
lives in the page cache, which the kernel can write back and drop, not in process memory; the
per-rank files are then written with ``torch.save`` (atomically) and the iteration is committed
by ``latest_checkpointed_iteration.txt`` last, exactly as training does (DESIGN.md).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Iterator, Optional

import torch

from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.convert import layout
from megafast.convert.checkpoint_args import config_from_args
from megafast.pipeline.partition import uniform_partition
from megafast.training.checkpointing import (
    CHECKPOINT_VERSION,
    MODEL_FILE,
    RELEASE,
    TRACKER_FILE,
    atomic_torch_save,
    atomic_write_text,
    iteration_dir,
    mp_rank_dir,
    read_latest_checkpoint,
)

_MP_DIR = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?")


def _saved_layout(directory: str) -> tuple[int, int]:
    """(tp, pp) of an iteration directory, from its ``mp_rank_*`` names."""
    tps, pps = set(), set()
    for name in os.listdir(directory):
        if m := _MP_DIR.fullmatch(name):
            tps.add(int(m.group(1)))
            pps.add(int(m.group(2) or 0))
    if not tps:
        raise ValueError(f"{directory} holds no mp_rank_* directories: the checkpoint is incomplete")
    return max(tps) + 1, max(pps) + 1


def _load_mmap(path: str) -> dict[str, Any]:
    """A checkpoint file memory-mapped (read fully when in the legacy non-zip format)."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(
            f"cannot read {path} ({type(exc).__name__}): the file is truncated or corrupted"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a dict: not a megafast/Megatron checkpoint")
    return obj


class MegafastCheckpointReader:
    """The committed iteration of a megafast checkpoint directory, read as full tensors.

    ``true_vocab_size`` overrides the vocabulary that the args (and their tokenizer) imply.
    """

    def __init__(self, root: str, true_vocab_size: Optional[int] = None) -> None:
        if not os.path.isdir(root):
            raise ValueError(f"checkpoint directory {root} does not exist: check --load-dir")
        latest = read_latest_checkpoint(root)
        if latest is None:
            raise ValueError(
                f"{root} has no {TRACKER_FILE}: not a committed megafast checkpoint "
                "(a Hugging Face directory needs --loader hf)"
            )
        self.root = root
        self.iteration, self.release = latest
        self.directory = iteration_dir(root, self.iteration, self.release)
        if not os.path.isdir(self.directory):
            raise ValueError(f"{TRACKER_FILE} of {root} commits {self.directory}, which does not exist")
        self.tp, self.pp = _saved_layout(self.directory)
        self._files: dict[tuple[int, int], dict[str, Any]] = {}
        for p in range(self.pp):
            for t in range(self.tp):
                path = os.path.join(
                    mp_rank_dir(root, self.iteration, t, p, self.pp, self.release), MODEL_FILE
                )
                if not os.path.isfile(path):
                    raise ValueError(
                        f"checkpoint {self.directory} (tp={self.tp}, pp={self.pp}) is missing "
                        f"{os.path.relpath(path, root)}: the checkpoint is incomplete"
                    )
                self._files[(t, p)] = _load_mmap(path)
        first = self._files[(0, 0)]
        self.args: dict[str, Any] = dict(first.get("args") or {})
        if "num_layers" not in self.args:
            raise ValueError(f"{self.directory}: the checkpoint holds no model args; it cannot be converted")
        self.config: GPTConfig = config_from_args(self.args, true_vocab_size, root, where=self.directory)
        self.consumed_samples: dict[str, int] = dict(
            first.get("consumed_samples") or {"train": 0, "valid": 0}
        )
        self._where: dict[str, tuple[int, str]] = {}  # name -> (pp rank, model key)
        for p in range(self.pp):
            for key, value in self._files[(0, p)].items():
                if re.fullmatch(r"model\d*", key):
                    for name in value:
                        self._where.setdefault(name, (p, key))
        known = {name for _, specs in layout.groups(self.config) for name in specs} | {layout.OUTPUT_LAYER}
        unknown = sorted(name for name in self._where if name not in known)
        if unknown:
            raise ValueError(
                f"{self.directory}: tensor {unknown[0]} ({len(unknown)} such) is not part of the model "
                "its args describe (adapters or extra modules?): merge or remove them before converting"
            )
        self.dtype = self._part(layout.WORD_EMBEDDINGS, 0).dtype

    def _part(self, name: str, tp_rank: int) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(
                f"{self.directory}: tensor {name} is missing, but the checkpoint args describe a model "
                "with it"
            )
        p, key = self._where[name]
        return self._files[(tp_rank, p)][key][name]

    def full(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (vocabulary unpadded), checked against the config's shape."""
        parts = [self._part(name, t) for t in range(self.tp)]
        full = layout.unshard_parts(name, parts, self.config)
        return full

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(label, {name: full tensor}) of every group, in order (see megafast.convert.layout)."""
        for label, specs in layout.groups(self.config):
            tensors = {}
            for name, shape in specs.items():
                tensors[name] = self.full(name)
                layout.check_shape(name, tensors[name], shape, self.directory)
            yield label, tensors


class MegafastCheckpointWriter:
    """Writes a megafast checkpoint of ``config`` at layout (tp, pp) from full tensors.

    Feed every tensor of :func:`layout.groups` once with :meth:`add`, then :meth:`commit`.
    ``iteration`` None writes Megatron's ``release`` checkpoint (loaded as model weights only).
    """

    def __init__(
        self,
        root: str,
        config: GPTConfig,
        tp: int,
        pp: int,
        args: dict[str, Any],
        *,
        params_dtype: torch.dtype,
        iteration: Optional[int] = None,
        consumed_samples: Optional[dict[str, int]] = None,
    ) -> None:
        validate_layout(config, ParallelConfig(tp, pp))
        self.root, self.config, self.tp, self.pp = root, config, tp, pp
        self.args, self.params_dtype = args, params_dtype
        self.iteration = iteration
        self.consumed_samples = consumed_samples or {"train": 0, "valid": 0}
        self.ranges = uniform_partition(config.num_layers, pp)
        self.specs: layout.Specs = {}
        for _, specs in layout.groups(config):
            self.specs.update(specs)
        self.expected: list[list[str]] = [[] for _ in range(pp)]  # state-dict keys of each stage, in order
        for name in self.specs:
            self.expected[layout.stage_of(name, self.ranges)].append(name)
        if config.tie_embeddings and pp > 1:  # the last stage keeps its own copy of the tied embedding
            self.expected[-1].append(layout.OUTPUT_LAYER)
        self._tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {
            (t, p): {} for t in range(tp) for p in range(pp)
        }
        os.makedirs(root, exist_ok=True)
        self._spill_dir = tempfile.mkdtemp(prefix=".convert-spill-", dir=root)
        self._spilled = 0

    def _spill(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` backed by a memory-mapped temporary file (unlinked at once)."""
        if tensor.numel() == 0:
            return tensor.clone()
        path = os.path.join(self._spill_dir, f"{self._spilled}.bin")
        self._spilled += 1
        out = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        os.remove(path)  # the mapping keeps the data; nothing is left behind if we crash
        out.copy_(tensor)
        return out

    def add(self, name: str, full: torch.Tensor) -> None:
        """Shard one full (unpadded) tensor for every TP rank of the stage holding it."""
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not part of the target model")
        layout.check_shape(name, full, self.specs[name], "source")
        full = full.to(self.params_dtype)
        stage = layout.stage_of(name, self.ranges)
        for t in range(self.tp):
            part = self._spill(layout.shard_full(name, full, self.config, t, self.tp))
            self._tensors[(t, stage)][name] = part
            if name == layout.WORD_EMBEDDINGS and layout.OUTPUT_LAYER in self.expected[-1] and self.pp > 1:
                self._tensors[(t, self.pp - 1)][layout.OUTPUT_LAYER] = part

    def commit(self, progress: bool = False) -> str:
        """Write every rank's file, then the commit file; returns the iteration directory."""
        from tqdm import tqdm

        for (t, p), tensors in self._tensors.items():
            missing = [n for n in self.expected[p] if n not in tensors]
            if missing:
                raise ValueError(f"the source provided no tensor {missing[0]} (and {len(missing) - 1} more)")
        release = self.iteration is None
        iteration = 0 if release else self.iteration
        layout_info = {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "data_parallel_size": 1,
            "distributed_optimizer": False,
        }
        keys = sorted(self._tensors, key=lambda tp_pp: (tp_pp[1], tp_pp[0]))
        for t, p in tqdm(keys, desc="writing megafast files", unit="file", disable=not progress):
            tensors = self._tensors.pop((t, p))
            ckpt = {
                "model": OrderedDict((n, tensors[n]) for n in self.expected[p]),
                "iteration": iteration,
                "consumed_samples": dict(self.consumed_samples),
                "args": dict(self.args),
                "checkpoint_version": CHECKPOINT_VERSION,
                "parallel_layout": layout_info,
            }
            directory = mp_rank_dir(self.root, iteration, t, p, self.pp, release)
            atomic_torch_save(ckpt, os.path.join(directory, MODEL_FILE))
        atomic_write_text(os.path.join(self.root, TRACKER_FILE), RELEASE if release else str(iteration))
        self.close()
        return iteration_dir(self.root, iteration, release)

    def close(self) -> None:
        """Drop the parked shards and the temporary directory (after commit, or on failure)."""
        self._tensors = {}
        shutil.rmtree(self._spill_dir, ignore_errors=True)
