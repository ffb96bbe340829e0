"""Megatron-LM checkpoints: which format a directory holds, Megatron's tensor names, one reader API.

Megatron-LM writes two formats (``--ckpt-format``), both committed by
``{root}/latest_checkpointed_iteration.txt`` (an iteration number or ``release``):

- ``torch`` (legacy): ``iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tp, pp) rank, holding
  ``model``, ``args`` (a pickled ``argparse.Namespace``), ``iteration``, ``checkpoint_version``
  and ``rng_state`` (plus ``optimizer``, ``opt_param_scheduler`` from a training run); layer
  indices in ``model`` are local to the pipeline stage (megafast.checkpoint.megatron_legacy);
- ``torch_dist`` (its default): ``iter_N/`` holds ``torch.distributed.checkpoint`` files
  (``__R_K.distcp``, ``.metadata``) and ``metadata.json``; every tensor is saved whole (global
  shape), the layers stacked along a leading dimension (megafast.checkpoint.megatron_dist).

Both readers expose what megafast's own :class:`~megafast.checkpoint.reader.MegafastCheckpointReader`
does (``config``, ``args``, ``dtype``, ``tp``, ``pp``, ``iteration``, ``release``, ``directory``,
``full(name)`` and ``groups()`` in megafast's names), so conversion and
:func:`~megafast.checkpoint.reader.load_resharded` take either. Names: Transformer Engine folds
each norm into the next linear (``linear_qkv.layer_norm_weight`` is ``input_layernorm.weight``,
``linear_fc1.layer_norm_weight`` is ``pre_mlp_layernorm.weight``); ``_extra_state`` entries (TE's
FP8 metadata, None for the local implementation) hold no weights and are skipped.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Iterator, Optional

import torch

from megafast.checkpoint import layout
from megafast.checkpoint.commit import committed
from megafast.checkpoint.paths import MODEL_FILE, rank_dirs
from megafast.config import GPTConfig

DIST_METADATA = "metadata.json"  # megatron-core's dist-checkpointing marker: {"sharded_backend": ...}
EXTRA_STATE = "_extra_state"
TE_NORMS = {  # Transformer Engine's fused norm + linear names -> megafast's norm names
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

DIST_EXPERTS = "mlp.experts.experts."  # torch_dist's stacked experts [L, E, ...] (SequentialMLP and GroupedMLP)


def megafast_suffix(suffix: str) -> str:
    """A layer-relative Megatron name (``self_attention.linear_qkv.layer_norm_weight``) in megafast's names."""
    if suffix.startswith(DIST_EXPERTS):
        return "mlp.experts." + suffix[len(DIST_EXPERTS):]
    return TE_NORMS.get(suffix, suffix)


def megatron_format(root: str) -> Optional[str]:
    """``"torch"`` or ``"torch_dist"`` when ``root`` is a committed Megatron-LM checkpoint, else None
    (a megafast checkpoint, an uncommitted or missing directory). A legacy file whose ``args`` are
    an ``argparse.Namespace`` is Megatron's; megafast saves a dict."""
    if not os.path.isdir(root):
        return None
    try:
        commit = committed(root)
    except ValueError:
        return None
    if commit is None:
        return None
    if os.path.isfile(os.path.join(commit.directory, DIST_METADATA)):
        return "torch_dist"
    try:
        ranks = rank_dirs(commit.directory)
    except ValueError:
        return None
    path = os.path.join(ranks[min(ranks)], MODEL_FILE)
    return "torch" if _has_namespace_args(path) else None


def _has_namespace_args(path: str) -> bool:
    from megafast.checkpoint.megatron_args import is_megatron_args, load_megatron_pickle

    try:
        return is_megatron_args(load_megatron_pickle(path, mmap=True).get("args"))
    except Exception:  # noqa: BLE001 - unreadable: not recognisably Megatron's; the reader reports it
        return False


def open_megatron_checkpoint(root: str, true_vocab_size: Optional[int] = None) -> "MegatronReader":
    """The reader of the Megatron checkpoint in ``root`` (either format); ValueError when it is none."""
    from megafast.checkpoint.megatron_dist import MegatronDistReader
    from megafast.checkpoint.megatron_legacy import MegatronLegacyReader

    if not os.path.isdir(root):
        raise ValueError(f"checkpoint directory {root} does not exist: check --load-dir")
    commit = committed(root)
    if commit is None:
        raise ValueError(f"{root} has no latest_checkpointed_iteration.txt: not a committed Megatron-LM checkpoint")
    if os.path.isfile(os.path.join(commit.directory, DIST_METADATA)):
        with open(os.path.join(commit.directory, DIST_METADATA)) as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(
                f"{commit.directory}: Megatron checkpoint format {backend!r} is not supported: megafast reads "
                "torch_dist and the legacy torch format"
            )
        return MegatronDistReader(root, true_vocab_size)
    return MegatronLegacyReader(root, true_vocab_size)


class MegatronReader(abc.ABC):
    """What both Megatron readers share: megafast-named full tensors from ``_raw(name)``."""

    config: GPTConfig
    directory: str
    tp: int
    pp: int

    @abc.abstractmethod
    def _raw(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (megafast's name), vocabulary rows still padded."""

    def full(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (megafast's name, vocabulary unpadded)."""
        tensor = self._raw(name)
        return tensor[: self.config.vocab_size] if name in layout.VOCAB_TENSORS else tensor

    def groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(label, {name: full tensor}) of every group, in order (see megafast.checkpoint.layout)."""
        return layout.full_groups(self.config, self.full, self.directory)

    def check_names(self, names: Any) -> None:
        """Every megafast name the files hold must belong to the model the args describe."""
        known = {n for _, specs in layout.groups(self.config) for n in specs} | {layout.OUTPUT_LAYER}
        unknown = sorted(n for n in names if n not in known)
        if unknown:
            raise ValueError(
                f"{self.directory}: tensor {unknown[0]} ({len(unknown)} such) is not part of the model its "
                "Megatron args describe: the checkpoint uses a feature megafast does not read"
            )


# Fields that define the weights; a run loading a Megatron checkpoint must agree on each.
MODEL_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size", "num_query_groups",
    "kv_channels", "position_embedding_type", "normalization", "activation", "add_bias_linear", "add_qkv_bias",
    "tie_embeddings", "qk_layernorm",
)
# Fields that change the function the weights compute (warned about by the caller when they differ).
FUNCTION_FIELDS = ("rotary_base", "norm_epsilon", "max_position_embeddings")


def config_mismatch(saved: GPTConfig, run: GPTConfig) -> Optional[str]:
    """One line naming the first model field in which a Megatron checkpoint and this run differ."""
    for name in MODEL_FIELDS + FUNCTION_FIELDS:
        if getattr(saved, name) != getattr(run, name):
            return (
                f"the Megatron checkpoint has {name}={getattr(saved, name)!r} but this run has "
                f"{getattr(run, name)!r}: pass the checkpoint's model flags (tools/checkpoint/convert.py "
                "--loader megatron --saver megafast prints them)"
            )
    return None


@torch.no_grad()
def load_megatron_model(root: str, chunks: list, state: Any) -> "MegatronReader":
    """Fill this rank's model chunks (any TP/PP, built for the checkpoint's model) from the Megatron
    checkpoint in ``root``; LoRA adapters are left as they are. Returns the reader."""
    from megafast.model.lora import is_adapter_name

    run = chunks[0].config
    reader = open_megatron_checkpoint(root, None)
    if reader.config.vocab_size != run.vocab_size and reader.config.vocab_size >= run.vocab_size:
        if "vocab_size" not in reader.args or reader.args.get("vocab_size") is None:
            reader = open_megatron_checkpoint(root, run.vocab_size)  # the vocabulary was unknown: the run's
    mismatch = config_mismatch(reader.config, run)
    if mismatch:
        raise ValueError(f"{reader.directory}: {mismatch}")
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            if is_adapter_name(name):
                continue
            source = layout.WORD_EMBEDDINGS if name == layout.OUTPUT_LAYER and run.tie_embeddings else name
            part = layout.shard_full(name, reader.full(source), run, state.tp_rank, state.tp_size)
            if part.shape != tensor.shape:
                raise ValueError(
                    f"{reader.directory}: tensor {name} gives a shard of shape {list(part.shape)} but the model "
                    f"expects {list(tensor.shape)}: the checkpoint's args do not describe its weights"
                )
            tensor.copy_(part)
    return reader
