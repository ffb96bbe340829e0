"""Writing a megafast checkpoint from full tensors, at any TP/PP/EP layout.

With expert parallelism (``ep`` > 1) each (tp, pp) rank gets one file per EP rank
(``mp_rank_{tp:02d}_{pp:03d}_{ep:03d}``), holding the dense tensors and that EP rank's slice of
every expert stack (megafast.checkpoint.layout.is_expert), as training saves them.

The writer shards each full tensor for the target layout as it arrives
(:func:`megafast.checkpoint.layout.shard_full`) and parks the shards in memory-mapped temporary
files (``torch.from_file``), so the data of the layers already done lives in the page cache, which
the kernel can write back and drop, not in process memory; the per-rank files are then written
atomically and the iteration is committed by ``latest_checkpointed_iteration.txt`` last, exactly
as training does (megafast.checkpoint, DESIGN.md). Reading is
:class:`megafast.checkpoint.reader.MegafastCheckpointReader`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Any, Optional

import torch

from megafast.checkpoint import layout
from megafast.checkpoint.commit import write_commit
from megafast.checkpoint.paths import MODEL_FILE, iteration_dir, mp_rank_dir
from megafast.checkpoint.state_dict import atomic_torch_save, file_metadata, parallel_layout
from megafast.config import GPTConfig, ParallelConfig, validate_layout
from megafast.pipeline.partition import uniform_partition


class MegafastCheckpointWriter:
    """Writes a megafast checkpoint of ``config`` at layout (tp, pp, ep) from full tensors.

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
        ep: int = 1,
    ) -> None:
        validate_layout(config, ParallelConfig(tp, pp, expert_model_parallel_size=ep))
        self.root, self.config, self.tp, self.pp, self.ep = root, config, tp, pp, ep
        self.args, self.params_dtype = dict(args), params_dtype
        if ep > 1:
            self.args["expert_model_parallel_size"] = ep
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
        self._tensors: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {
            (t, p, e): {} for t in range(tp) for p in range(pp) for e in range(ep)
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
            tp_part = layout.shard_full(name, full, self.config, t, self.tp)
            shared = None if layout.is_expert(name) else self._spill(tp_part)  # dense: one copy for every EP rank
            for e in range(self.ep):
                part = shared if shared is not None else self._spill(layout.expert_slice(tp_part, e, self.ep))
                self._tensors[(t, stage, e)][name] = part
                if name == layout.WORD_EMBEDDINGS and layout.OUTPUT_LAYER in self.expected[-1] and self.pp > 1:
                    self._tensors[(t, self.pp - 1, e)][layout.OUTPUT_LAYER] = part

    def commit(self, progress: bool = False) -> str:
        """Write every rank's file, then the commit file; returns the iteration directory."""
        from tqdm import tqdm

        for (t, p, e), tensors in self._tensors.items():
            missing = [n for n in self.expected[p] if n not in tensors]
            if missing:
                raise ValueError(f"the source provided no tensor {missing[0]} (and {len(missing) - 1} more)")
        release = self.iteration is None
        iteration = 0 if release else self.iteration
        layout_info = parallel_layout(self.tp, self.pp, 1, False)
        if self.ep > 1:
            layout_info["expert_model_parallel_size"] = self.ep
        keys = sorted(self._tensors, key=lambda tpe: (tpe[1], tpe[0], tpe[2]))
        for t, p, e in tqdm(keys, desc="writing megafast files", unit="file", disable=not progress):
            tensors = self._tensors.pop((t, p, e))
            ckpt = {
                "model": OrderedDict((n, tensors[n]) for n in self.expected[p]),
                **file_metadata(
                    iteration, self.consumed_samples.get("train", 0), self.consumed_samples.get("valid", 0),
                    dict(self.args),
                    layout_info,
                ),
            }
            directory = mp_rank_dir(self.root, iteration, t, p, self.pp, release,
                                    ep_rank=e if self.ep > 1 else None)
            atomic_torch_save(ckpt, os.path.join(directory, MODEL_FILE))
        write_commit(self.root, None if release else iteration)
        self.close()
        return iteration_dir(self.root, iteration, release)

    def close(self) -> None:
        """Drop the parked shards and the temporary directory (after commit, or on failure)."""
        self._tensors = {}
        shutil.rmtree(self._spill_dir, ignore_errors=True)
