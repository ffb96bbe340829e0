"""Megatron-LM's legacy ``torch`` checkpoint format: read from and written at any TP/PP.

::

    {root}/latest_checkpointed_iteration.txt          "N" or "release"
    {root}/iter_{N:07d}/mp_rank_{tp:02d}/model_optim_rng.pt            pipeline size 1
    {root}/iter_{N:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   pipeline size > 1

Each file: ``model`` (this rank's shard of every tensor of its stage; layer indices are local to
the stage: stage p's first layer is ``decoder.layers.0``), ``args`` (a pickled
``argparse.Namespace``), ``iteration``, ``checkpoint_version`` (3.0: the fused QKV grouped per
query group, as megafast's), ``rng_state``, and from a training run ``optimizer`` and
``opt_param_scheduler``. The TP splits are megafast's (megafast.checkpoint.layout), the
vocabulary is padded to ``make_vocab_size_divisible_by * tp`` (``padded_vocab_size``). With tied
embeddings and pipelining, the last stage keeps its own ``output_layer.weight`` (a copy).
MoE layers (megatron-core's SequentialMLP) hold one module per expert,
``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``, split over TP like the dense MLP when
``expert_tensor_parallel_size`` is the TP size (Megatron's default) and whole when it is 1;
megafast stacks them as ``mlp.experts.linear_fc{1,2}.weight`` [E, ...]. Expert-parallel files
(``mp_rank_TT[_PPP]_EEE``) and GroupedMLP's ``weight1``/``weight2`` are refused with one line.

:class:`MegatronLegacyReader` yields megafast-named full tensors; :class:`MegatronLegacyWriter`
writes the files Megatron-LM's own ``load_checkpoint`` reads into a GPTModel built with
``--transformer-impl local`` (its state dict: megafast's names plus ``_extra_state`` entries).
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from typing import Any, Optional

import torch

from megafast.checkpoint import layout
from megafast.checkpoint.commit import committed, write_commit
from megafast.checkpoint.megatron_args import (
    args_dict,
    config_from_megatron_args,
    is_megatron_args,
    load_megatron_pickle,
    megatron_layer_counts,
    megatron_vocab_size,
)
from megafast.checkpoint.megatron_format import EXTRA_STATE, MegatronReader, megafast_suffix
from megafast.checkpoint.paths import MODEL_FILE, TRACKER_FILE, iteration_dir, rank_dirs
from megafast.checkpoint.state_dict import atomic_torch_save, reason
from megafast.config import GPTConfig, ParallelConfig, validate_layout

CHECKPOINT_VERSION = 3.0
# Modules of megatron-core's local-implementation GPT layer whose state dict has an _extra_state entry.
LOCAL_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


LOCAL_EXPERTS = ".mlp.experts.local_experts."  # megatron-core's SequentialMLP: one module per expert


def split_expert(name: str) -> Optional[tuple[str, int]]:
    """``decoder.layers.i.mlp.experts.local_experts.{e}.X`` -> (``decoder.layers.i.mlp.experts.X``, e)."""
    if LOCAL_EXPERTS not in name:
        return None
    head, tail = name.split(LOCAL_EXPERTS, 1)
    expert, rest = tail.split(".", 1)
    return f"{head}.mlp.experts.{rest}", int(expert)


def expert_partition(name: str, config: GPTConfig) -> Optional[tuple[int, int]]:
    """(dim, stride) of a stacked expert tensor [E, ...] split over expert-TP ranks as Megatron
    splits each expert's linear (fc1 by rows, [gate; up] strided for SwiGLU; fc2 by columns)."""
    if name.endswith("experts.linear_fc1.weight"):
        return 1, 2 if config.activation == "swiglu" else 1
    if name.endswith("experts.linear_fc2.weight"):
        return 2, 1
    return None


def layer_offsets(counts: list[int]) -> list[int]:
    """The global index of each stage's first layer."""
    return [sum(counts[:p]) for p in range(len(counts))]


def to_global(name: str, offset: int) -> str:
    """Megatron's stage-local ``decoder.layers.{i}.X`` -> megafast's ``decoder.layers.{offset + i}.X``."""
    if not name.startswith("decoder.layers."):
        return name
    _, _, index, suffix = name.split(".", 3)
    return f"decoder.layers.{offset + int(index)}.{megafast_suffix(suffix)}"


class MegatronLegacyReader(MegatronReader):
    """The committed iteration of a Megatron-LM legacy checkpoint, as megafast-named full tensors."""

    format = "torch"

    def __init__(self, root: str, true_vocab_size: Optional[int] = None) -> None:
        commit = committed(root)
        if commit is None:
            raise ValueError(f"{root} has no {TRACKER_FILE}: not a committed Megatron-LM checkpoint")
        self.root, self.directory = root, commit.directory
        self.iteration, self.release = commit.iteration, commit.release
        ranks = rank_dirs(self.directory)
        self.tp, self.pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
        self._files: dict[tuple[int, int], dict[str, Any]] = {}
        for t in range(self.tp):
            for p in range(self.pp):
                if (t, p) not in ranks:
                    raise ValueError(
                        f"{self.directory} (tp={self.tp}, pp={self.pp}) has no mp_rank directory for tp rank {t}, "
                        f"pp rank {p}: the checkpoint is incomplete"
                    )
                self._files[(t, p)] = self._load(os.path.join(ranks[(t, p)], MODEL_FILE))
        first = self._files[(0, 0)]
        if not is_megatron_args(first.get("args")):
            raise ValueError(f"{self.directory}: its args are not Megatron-LM's argparse.Namespace")
        self.args: dict[str, Any] = args_dict(first["args"])
        version = first.get("checkpoint_version", 0)
        if version < CHECKPOINT_VERSION:
            raise ValueError(
                f"{self.directory}: Megatron checkpoint_version {version} is older than 3.0 (another QKV "
                "layout): convert it with Megatron-LM's own tools first"
            )
        saved = (
            self.args.get("tensor_model_parallel_size", self.tp),
            self.args.get("pipeline_model_parallel_size", self.pp),
        )
        if saved != (self.tp, self.pp):
            raise ValueError(
                f"{self.directory}: its args say tp={saved[0]}, pp={saved[1]} but it holds files for "
                f"tp={self.tp}, pp={self.pp}: the checkpoint is incomplete or mixed"
            )
        for key in ("model0", "model1"):
            if key in first:
                raise ValueError(f"{self.directory}: virtual pipeline chunks ({key}) are not supported")
        counts = megatron_layer_counts(self.args, self.pp, self.directory)
        offsets = layer_offsets(counts)
        self._where: dict[str, tuple[int, str]] = {}  # megafast name -> (pp rank, Megatron key)
        self._experts: dict[str, dict[int, str]] = {}  # megafast stacked-expert name -> {expert: Megatron key}
        for p in range(self.pp):
            model = self._model(0, p)
            for key in model:
                if key.endswith(EXTRA_STATE):
                    continue
                name = to_global(key, offsets[p])
                expert = split_expert(name)
                if expert is not None:
                    self._experts.setdefault(expert[0], {})[expert[1]] = key
                    name = expert[0]
                self._where.setdefault(name, (p, key))
        if layout.WORD_EMBEDDINGS not in self._where:
            raise ValueError(
                f"{self.directory}: tensor {layout.WORD_EMBEDDINGS} is missing: the checkpoint is incomplete"
            )
        padded = self._part(layout.WORD_EMBEDDINGS, 0).shape[0] * self.tp
        vocab = megatron_vocab_size(self.args, padded, true_vocab_size, self.directory)
        self.config: GPTConfig = config_from_megatron_args(self.args, vocab, self.directory)
        self.check_names(self._where)
        self.expert_tp = self._expert_tp()
        self.dtype = self._part(layout.WORD_EMBEDDINGS, 0).dtype

    def _expert_tp(self) -> int:
        """How many TP ranks split each expert (Megatron's expert_tensor_parallel_size: 1 or tp)."""
        if not self._experts:
            return 1
        if self.args.get("expert_model_parallel_size", 1) != 1:
            raise ValueError(
                f"{self.directory}: expert_model_parallel_size={self.args['expert_model_parallel_size']} "
                "(mp_rank_TT_PPP_EEE files) is not read yet: save it from Megatron with "
                "--expert-model-parallel-size 1, or as torch_dist"
            )
        etp = int(self.args.get("expert_tensor_parallel_size") or self.tp)
        if etp not in (1, self.tp):
            raise ValueError(f"{self.directory}: expert_tensor_parallel_size={etp} with tp={self.tp} is not supported")
        for name, experts in self._experts.items():
            if sorted(experts) != list(range(self.config.num_experts)):
                raise ValueError(
                    f"{self.directory}: {name} has experts {sorted(experts)} but the args say "
                    f"num_experts={self.config.num_experts}: the checkpoint is incomplete"
                )
        return etp

    def _load(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint file {path} is missing: the checkpoint is incomplete")
        try:
            return load_megatron_pickle(path, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise ValueError(
                f"cannot read checkpoint file {path} ({reason(exc)}): it is truncated or corrupted"
            ) from None

    def _model(self, t: int, p: int) -> dict[str, Any]:
        model = self._files[(t, p)].get("model")
        if not isinstance(model, dict):
            raise ValueError(f"{self.directory}: mp_rank {t}/{p} holds no 'model' state dict")
        return model

    def _part(self, name: str, t: int) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(
                f"{self.directory}: tensor {name} is missing, but the checkpoint's Megatron args describe a "
                "model with it: the checkpoint is incomplete"
            )
        p, key = self._where[name]
        model = self._model(t, p)
        if key not in model or not isinstance(model[key], torch.Tensor):
            raise ValueError(f"{self.directory}: tensor {key} is missing from tp rank {t}, pp rank {p}: incomplete")
        return model[key]

    def _expert_part(self, name: str, t: int) -> torch.Tensor:
        """TP rank t's experts of ``name`` stacked: [E, ...]."""
        p, _ = self._where[name]
        model = self._model(t, p)
        parts = []
        for e, key in sorted(self._experts[name].items()):
            if not isinstance(model.get(key), torch.Tensor):
                raise ValueError(f"{self.directory}: tensor {key} is missing from tp rank {t}, pp rank {p}: incomplete")
            parts.append(model[key])
        return torch.stack(parts)

    def _raw(self, name: str) -> torch.Tensor:
        if name in self._experts:
            split = expert_partition(name, self.config)
            if self.expert_tp == 1 or split is None:
                return self._expert_part(name, 0)
            from megafast.parallel.layers import unshard

            return unshard([self._expert_part(name, t) for t in range(self.tp)], split[0], split[1])
        parts = [self._part(name, t) for t in range(self.tp)]
        split = layout.tp_partition(name, self.config)
        if split is None or self.tp == 1:
            return parts[0]
        from megafast.parallel.layers import unshard

        return unshard(parts, split[0], split[1])


class MegatronLegacyWriter:
    """Writes a Megatron-LM legacy checkpoint of ``config`` at (tp, pp) from megafast-named full tensors.

    Feed every tensor of :func:`layout.groups` once with :meth:`add`, then :meth:`commit`.
    ``iteration`` None writes a ``release`` checkpoint (what Megatron's converters write; its
    ``load_checkpoint`` then loads the model only). Files are written atomically and the commit
    file last.
    """

    def __init__(
        self,
        root: str,
        config: GPTConfig,
        tp: int,
        pp: int,
        args: argparse.Namespace,
        *,
        params_dtype: torch.dtype,
        iteration: Optional[int] = None,
    ) -> None:
        validate_layout(config, ParallelConfig(tp, pp))
        self.root, self.config, self.tp, self.pp, self.args = root, config, tp, pp, args
        self.params_dtype, self.iteration = params_dtype, iteration
        counts = megatron_layer_counts(vars(args), pp, "megatron saver")
        self.offsets = layer_offsets(counts)
        self.ranges = [(o, o + c) for o, c in zip(self.offsets, counts)]
        self.specs: layout.Specs = {}
        for _, specs in layout.groups(config):
            self.specs.update(specs)
        self._tensors: dict[tuple[int, int], dict[str, Any]] = {(t, p): {} for t in range(tp) for p in range(pp)}

    def _local(self, name: str, stage: int) -> str:
        if not name.startswith("decoder.layers."):
            return name
        _, _, index, suffix = name.split(".", 3)
        return f"decoder.layers.{int(index) - self.offsets[stage]}.{suffix}"

    def add(self, name: str, full: torch.Tensor) -> None:
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not part of the target model")
        layout.check_shape(name, full, self.specs[name], "source")
        full = full.to(self.params_dtype)
        stage = layout.stage_of(name, self.ranges)
        for t in range(self.tp):
            split = expert_partition(name, self.config) if layout.is_expert(name) else None
            if split is not None and self.tp > 1:  # Megatron's default: experts split over all TP ranks
                from megafast.parallel.layers import shard

                part = shard(full, split[0], t, self.tp, split[1]).clone()
            else:
                part = layout.shard_full(name, full, self.config, t, self.tp).clone()
            self._tensors[(t, stage)][self._local(name, stage)] = part
            if name == layout.WORD_EMBEDDINGS and self.config.tie_embeddings and self.pp > 1:
                self._tensors[(t, self.pp - 1)][layout.OUTPUT_LAYER] = part  # the last stage's copy

    def _model(self, t: int, p: int) -> "OrderedDict[str, Any]":
        """Stage p's state dict in megatron-core's local GPTModel order, ``_extra_state`` entries included."""
        tensors = self._tensors[(t, p)]
        model: OrderedDict[str, Any] = OrderedDict()
        for name in self.specs:
            if layout.stage_of(name, self.ranges) != p:
                continue
            local = self._local(name, p)
            if local not in tensors:
                raise ValueError(f"the source provided no tensor {name}")
            if layout.is_expert(name):  # SequentialMLP: mlp.experts.local_experts.{e}.linear_fc1.weight
                head, rest = local.split(".mlp.experts.", 1)
                for e, weight in enumerate(tensors[local]):
                    key = f"{head}{LOCAL_EXPERTS}{e}.{rest}"
                    model[key] = weight.clone()
                    model[key[: -len("weight")] + EXTRA_STATE] = None
                continue
            model[local] = tensors[local]
            for module in LOCAL_EXTRA_STATE:
                if local.endswith(f"{module}.weight"):
                    model[local[: -len("weight")] + EXTRA_STATE] = None
        if p == self.pp - 1:  # tied without pipelining: the output layer has no weight of its own
            if not self.config.tie_embeddings or self.pp > 1:
                model[layout.OUTPUT_LAYER] = tensors[layout.OUTPUT_LAYER]
            model["output_layer." + EXTRA_STATE] = None
        return model

    def commit(self) -> str:
        """Write every rank's file, then the commit file; returns the iteration directory."""
        release = self.iteration is None
        iteration = 0 if release else self.iteration
        models = {key: self._model(*key) for key in self._tensors}
        base = iteration_dir(self.root, iteration, release)
        for (t, p), model in sorted(models.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            rank = f"mp_rank_{t:02d}" if self.pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            ckpt = {
                "args": self.args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "model": model,
                "num_floating_point_operations_so_far": 0,
            }
            atomic_torch_save(ckpt, os.path.join(base, rank, MODEL_FILE))
        write_commit(self.root, None if release else iteration)
        self._tensors = {}
        return base

    def close(self) -> None:
        self._tensors = {}

