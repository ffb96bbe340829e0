"""Reading a megafast checkpoint one full tensor at a time, from any TP/PP layout.

:class:`MegafastCheckpointReader` memory-maps every ``mp_rank_*/model_optim_rng.pt`` of the
committed iteration and rebuilds a full tensor from its TP shards only when asked
(:func:`megafast.checkpoint.layout.unshard_parts`); its GPTConfig comes from the checkpoint's own
args (megafast.checkpoint.args). :func:`load_resharded` fills this rank's model chunks, built at
any layout, from such a reader: each rank reads the full tensors of its own layers and keeps its
shard (generation serves a checkpoint at a layout other than the one it was trained with).
Conversion (megafast.convert) streams the same full tensors into HF files or another layout.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from megafast.checkpoint import layout
from megafast.checkpoint.args import config_from_args
from megafast.checkpoint.commit import committed
from megafast.checkpoint.paths import (
    MODEL_FILE,
    TRACKER_FILE,
    model_keys,
    mp_rank_dir,
    saved_expert_parallel_size,
    saved_layout,
)
from megafast.checkpoint.state_dict import load_file
from megafast.config import GPTConfig
from megafast.parallel.state import ParallelState


class MegafastCheckpointReader:
    """The committed iteration of a megafast checkpoint directory, read as full tensors.

    ``true_vocab_size`` overrides the vocabulary that the args (and their tokenizer) imply.
    """

    def __init__(self, root: str, true_vocab_size: Optional[int] = None) -> None:
        if not os.path.isdir(root):
            raise ValueError(f"checkpoint directory {root} does not exist: check --load-dir")
        commit = committed(root)
        if commit is None:
            raise ValueError(
                f"{root} has no {TRACKER_FILE}: not a committed megafast checkpoint "
                "(a Hugging Face directory needs --loader hf)"
            )
        self.root = root
        self.iteration, self.release, self.directory = commit.iteration, commit.release, commit.directory
        self.tp, self.pp = saved_layout(self.directory)
        self.ep = saved_expert_parallel_size(self.directory)  # expert stacks are split over EP files
        self._files: dict[tuple[int, int, int], dict[str, Any]] = {}
        for p in range(self.pp):
            for t in range(self.tp):
                for e in range(self.ep):
                    directory = mp_rank_dir(root, self.iteration, t, p, self.pp, self.release,
                                            ep_rank=e if self.ep > 1 else None)
                    path = os.path.join(directory, MODEL_FILE)
                    if not os.path.isfile(path):
                        raise ValueError(
                            f"checkpoint {self.directory} (tp={self.tp}, pp={self.pp}, ep={self.ep}) is missing "
                            f"{os.path.relpath(path, root)}: the checkpoint is incomplete"
                        )
                    self._files[(t, p, e)] = load_file(path, mmap=True)
        first = self._files[(0, 0, 0)]
        self.args: dict[str, Any] = dict(first.get("args") or {})
        if "num_layers" not in self.args:
            raise ValueError(f"{self.directory}: the checkpoint holds no model args; it cannot be converted")
        self.config: GPTConfig = config_from_args(self.args, true_vocab_size, root, where=self.directory)
        consumed = first.get("consumed_samples") or {"train": 0, "valid": 0}
        self.consumed_samples: dict[str, int] = dict(consumed)
        self._where: dict[str, tuple[int, str]] = {}  # name -> (pp rank, model key)
        for p in range(self.pp):
            ckpt = self._files[(0, p, 0)]
            for key in model_keys(ckpt):
                for name in ckpt[key]:
                    self._where.setdefault(name, (p, key))
        for (t, p, e), ckpt in self._files.items():  # every EP rank's file holds the same tensors
            if e > 0:
                first_names = {n for key in model_keys(self._files[(t, p, 0)]) for n in self._files[(t, p, 0)][key]}
                names = {n for key in model_keys(ckpt) for n in ckpt[key]}
                if names != first_names:
                    odd = sorted(names ^ first_names)[0]
                    raise ValueError(
                        f"{self.directory}: mp_rank_{t:02d}_{p:03d}_{e:03d} and mp_rank_{t:02d}_{p:03d}_000 hold "
                        f"different tensors ({odd}): the checkpoint is inconsistent"
                    )
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
        ranks = range(self.ep) if layout.is_expert(name) else range(1)  # expert stacks: every EP rank's part
        parts = []
        for e in ranks:
            shard = self._files[(tp_rank, p, e)][key]
            if name not in shard:
                raise ValueError(
                    f"{self.directory}: tensor {name} is missing from mp_rank_{tp_rank:02d}_{p:03d}"
                    + (f"_{e:03d}" if self.ep > 1 else "")
                    + ", but the checkpoint args describe a model with it: the checkpoint is incomplete"
                )
            parts.append(shard[name])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # [E, ...] from EP x [E / EP, ...]

    def full(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (vocabulary unpadded), checked against the config's shape."""
        parts = [self._part(name, t) for t in range(self.tp)]
        return layout.unshard_parts(name, parts, self.config)

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(label, {name: full tensor}) of every group, in order (see megafast.checkpoint.layout)."""
        return layout.full_groups(self.config, self.full, self.directory)


@torch.no_grad()
def load_resharded(
    reader: MegafastCheckpointReader, chunks: Sequence[nn.Module], state: ParallelState
) -> None:
    """Copy the checkpoint into this rank's chunks (built for ``reader.config`` at any TP/PP).

    A pipelined model with tied embeddings keeps ``output_layer.weight`` on its last stage: it
    is filled from the embedding, as training keeps the two equal.
    """
    config = reader.config
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            source = layout.WORD_EMBEDDINGS if name == layout.OUTPUT_LAYER and config.tie_embeddings else name
            part = layout.shard_full(name, reader.full(source), config, state.tp_rank, state.tp_size)
            if part.shape != tensor.shape:
                raise ValueError(
                    f"{reader.directory}: tensor {name} gives a shard of shape {list(part.shape)} but "
                    f"the model expects {list(tensor.shape)}: the checkpoint args do not describe its weights"
                )
            tensor.copy_(part)
