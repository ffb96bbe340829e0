"""Megatron-LM's ``torch_dist`` checkpoint format, read with ``torch.distributed.checkpoint`` alone.

::

    {root}/latest_checkpointed_iteration.txt
    {root}/iter_{N:07d}/metadata.json      {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    {root}/iter_{N:07d}/.metadata          torch.distributed.checkpoint's index of every entry
    {root}/iter_{N:07d}/__{R}_{K}.distcp   the data, written by each rank R

Every tensor entry has its global (unsharded) shape whatever TP/PP saved it; the transformer layers
are stacked along a leading layer dimension (``decoder.layers.self_attention.linear_qkv.weight`` is
[L, (H + 2G) d, h]) and the norms carry Transformer Engine's names
(``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` [L, h] is every layer's
``input_layernorm.weight``); MoE experts are stacked twice
(``decoder.layers.mlp.experts.experts.linear_fc1.weight`` [L, E, 2F, h] is every layer's
``mlp.experts.linear_fc1.weight``). Byte entries hold pickles: ``common_state/shard_0_1`` is a one-item
list of {``args``, ``iteration``, ``checkpoint_version``, ...} (megatron-core 0.19; older versions
wrote ``common.pt`` next to the data), ``*._extra_state/shard_*`` are TE's FP8 metadata (skipped)
and ``rng_state/*`` the RNG states. The word embedding and output layer keep the padded vocabulary
of the saving run (``padded_vocab_size``). megatron-core is not needed to read any of it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

from megafast.checkpoint import layout
from megafast.checkpoint.commit import committed
from megafast.checkpoint.megatron_args import (
    args_dict,
    config_from_megatron_args,
    load_megatron_pickle,
    megatron_vocab_size,
)
from megafast.checkpoint.megatron_format import EXTRA_STATE, MegatronReader, megafast_suffix
from megafast.checkpoint.paths import TRACKER_FILE
from megafast.checkpoint.state_dict import reason
from megafast.config import GPTConfig

STACKED = "decoder.layers."
COMMON_STATE = "common_state"
COMMON_FILE = "common.pt"


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    return dcp, DefaultLoadPlanner


class MegatronDistReader(MegatronReader):
    """The committed iteration of a Megatron-LM ``torch_dist`` checkpoint, as megafast-named full tensors.

    Stacked layer tensors are read whole on first use and kept (the model's size at most)."""

    format = "torch_dist"

    def __init__(self, root: str, true_vocab_size: Optional[int] = None) -> None:
        dcp, _ = _dcp()
        commit = committed(root)
        if commit is None:
            raise ValueError(f"{root} has no {TRACKER_FILE}: not a committed Megatron-LM checkpoint")
        self.root, self.directory = root, commit.directory
        self.iteration, self.release = commit.iteration, commit.release
        try:
            self._storage = dcp.FileSystemReader(self.directory)
            metadata = self._storage.read_metadata()
        except Exception as exc:  # noqa: BLE001 - a missing or damaged .metadata
            raise ValueError(
                f"cannot read the torch_dist index {os.path.join(self.directory, '.metadata')} ({reason(exc)}): "
                "the checkpoint is truncated or corrupted"
            ) from None
        self._entries = metadata.state_dict_metadata  # key -> TensorStorageMetadata | BytesStorageMetadata
        common = self._common_state()
        if not isinstance(common, dict) or "args" not in common:
            raise ValueError(f"{self.directory}: its common state holds no Megatron args")
        self.args: dict[str, Any] = args_dict(common["args"])
        self.checkpoint_iteration = common.get("iteration")
        self.tp = int(self.args.get("tensor_model_parallel_size", 1))
        self.pp = int(self.args.get("pipeline_model_parallel_size", 1))
        self._names: dict[str, tuple[str, Optional[int]]] = {}  # megafast name -> (entry, layer or None)
        num_layers = int(self.args.get("num_layers", 0))
        for key, entry in self._entries.items():
            if not hasattr(entry, "size") or key.rsplit("/", 1)[0].endswith(EXTRA_STATE):
                continue  # byte entries: common state, RNG, TE extra state
            if not key.startswith(("embedding.", "decoder.", "output_layer.")):
                continue  # optimizer state of a training run
            if key.startswith(STACKED):
                if entry.size[0] != num_layers:
                    raise ValueError(
                        f"{self.directory}: entry {key} stacks {entry.size[0]} layers but the args say {num_layers}"
                    )
                suffix = megafast_suffix(key[len(STACKED):])
                for i in range(num_layers):
                    self._names[f"{layout.layer_prefix(i)}{suffix}"] = (key, i)
            else:
                self._names[key] = (key, None)
        if layout.WORD_EMBEDDINGS not in self._names:
            raise ValueError(
                f"{self.directory}: tensor {layout.WORD_EMBEDDINGS} is missing: the checkpoint is incomplete"
            )
        embedding = self._entries[layout.WORD_EMBEDDINGS]
        vocab = megatron_vocab_size(self.args, embedding.size[0], true_vocab_size, self.directory)
        self.config: GPTConfig = config_from_megatron_args(self.args, vocab, self.directory)
        self.check_names(self._names)
        self.dtype = embedding.properties.dtype
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self, state_dict: dict[str, Any], planner: Any = None) -> None:
        dcp, _ = _dcp()
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": single process, on purpose
                warnings.simplefilter("ignore")
                dcp.load(state_dict, storage_reader=self._storage, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - missing or truncated .distcp files
            raise ValueError(
                f"cannot read {', '.join(list(state_dict)[:2])} from {self.directory} ({reason(exc)}): "
                "the checkpoint is truncated or corrupted"
            ) from None

    def _common_state(self) -> Any:
        path = os.path.join(self.directory, COMMON_FILE)
        if os.path.isfile(path):
            try:
                return load_megatron_pickle(path)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot read {path} ({reason(exc)}): it is truncated or corrupted") from None
        keys = [k for k in self._entries if k.split("/", 1)[0] == COMMON_STATE]
        if not keys:
            raise ValueError(f"{self.directory}: no {COMMON_STATE} entry: not a Megatron-LM torch_dist checkpoint")
        _, default_planner = _dcp()

        class KeepBytes(default_planner):  # the raw pickle: unpickled below with stand-ins
            def load_bytes(self, read_item: Any, value: Any) -> None:
                got[read_item.dest_index.fqn] = value.read()

        got: dict[str, bytes] = {}
        import io

        self._load({keys[0]: io.BytesIO()}, KeepBytes())
        try:
            common = load_megatron_pickle(got[keys[0]])
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{self.directory}: cannot unpickle its {COMMON_STATE} ({reason(exc)})") from None
        return common[0] if isinstance(common, list) and common else common

    def _entry(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            meta = self._entries[key]
            target = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            self._load(target)
            if not key.startswith(STACKED):
                return target[key]
            self._cache[key] = target[key]
        return self._cache[key]

    def _raw(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise ValueError(
                f"{self.directory}: tensor {name} is missing, but the checkpoint's Megatron args describe a "
                "model with it: the checkpoint is incomplete"
            )
        key, layer = self._names[name]
        tensor = self._entry(key)
        return tensor if layer is None else tensor[layer]
