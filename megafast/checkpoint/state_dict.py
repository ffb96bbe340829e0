"""Saving and loading the state dicts of a checkpoint's files.

A ``model_optim_rng.pt`` holds ``model`` (or ``model0``, ``model1``, ... for virtual pipeline
chunks), then whatever the writer adds (``optimizer``, ``opt_param_scheduler``, ``rng_state``,
``lora``: megafast.training.checkpointing), then the entries every writer puts last
(:func:`file_metadata`): ``iteration``, ``consumed_samples`` (``{"train": n, "valid": m}``),
``args`` (a dict, megafast.checkpoint.args), ``checkpoint_version`` (3.0) and
``parallel_layout`` (the tp/pp/dp sizes it was saved with, and whether the optimizer was
DP-sharded). A LoRA run's file holds only the adapter weights under ``model``.

Files are written atomically (temporary name, fsync, rename: never a partial file under the final
name) and read with one-line errors for missing, truncated or foreign files.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Sequence, Union

import torch
from torch import nn

from megafast.atomic_file import atomic_write
from megafast.checkpoint.paths import TRACKER_FILE, model_key, model_keys
from megafast.model.lora import adapter_state_dict, is_adapter_name

CHECKPOINT_VERSION = 3.0

Chunks = Union[nn.Module, Sequence[nn.Module]]


# ------------------------------------------------------------------------------------ files


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def reason(exc: BaseException) -> str:
    """An exception as one short line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def load_file(path: str, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file's dict on CPU (``mmap``: tensors memory-mapped, when the file allows it)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path} is missing: the checkpoint is incomplete")
    try:
        obj = torch.load(path, map_location="cpu", mmap=mmap and zipfile.is_zipfile(path), weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(
            f"cannot read checkpoint file {path} ({reason(exc)}): it is truncated or corrupted; "
            f"restore it or point {TRACKER_FILE} at an earlier iteration"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint file {path} does not hold a dict: not a megafast/Megatron checkpoint")
    return obj


def parallel_layout(tp: int, pp: int, dp: int, distributed_optimizer: bool) -> dict[str, Any]:
    """The ``parallel_layout`` entry of a file saved at (tp, pp, dp)."""
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "data_parallel_size": dp,
        "distributed_optimizer": distributed_optimizer,
    }


def file_metadata(
    iteration: int,
    consumed_samples: int,
    consumed_valid_samples: int,
    args: dict[str, Any],
    layout: dict[str, Any],
) -> dict[str, Any]:
    """The entries every ``model_optim_rng.pt`` ends with, in their order on disk."""
    return {
        "iteration": iteration,
        "consumed_samples": {"train": int(consumed_samples), "valid": int(consumed_valid_samples)},
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "parallel_layout": layout,
    }


# ------------------------------------------------------------------------------ model chunks


def as_chunks(chunks: Chunks) -> list[nn.Module]:
    """A list of model chunks with data-parallel wrappers (anything exposing ``.module``) removed."""
    out = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    if not out:
        raise ValueError("no model chunks given")
    unwrapped = []
    for m in out:
        while isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        unwrapped.append(m)
    return unwrapped


def model_state_dicts(chunks: list[nn.Module], adapters_only: bool = False) -> dict[str, dict[str, Any]]:
    """``{"model": sd}`` or ``{"model0": sd0, ...}``: every chunk's state dict (LoRA adapters only
    when ``adapters_only``; the frozen base is not repeated in every checkpoint)."""
    return {
        model_key(i, len(chunks)): c.state_dict() if not adapters_only else adapter_state_dict(c)
        for i, c in enumerate(chunks)
    }


def _expected_model_keys(chunk: nn.Module, adapters_only: bool) -> tuple[set[str], bool]:
    """The state-dict keys a checkpoint must hold for ``chunk``, and whether they are all of its keys.

    With LoRA adapters on the model (megafast.model.lora): an adapter checkpoint holds exactly the
    adapters; any other checkpoint is the base model, everything but the adapters (which then keep
    their initial values: a fine-tuning run starting from a pretrained model).
    """
    keys = set(chunk.state_dict())
    adapters = {k for k in keys if is_adapter_name(k)}
    if adapters_only:
        return adapters, adapters == keys
    return keys - adapters, not adapters


def load_into(target: Any, sd: Any, what: str, path: str, **kw: Any) -> None:
    """``target.load_state_dict(sd, **kw)`` with its failure as a one-line ValueError."""
    try:
        target.load_state_dict(sd, **kw)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the {what} from {path}: {reason(exc)}") from exc


def load_model_chunks(ckpt: dict[str, Any], chunks: list[nn.Module], path: str, strict: bool = True) -> None:
    """Load the model entries of ``ckpt`` (read from ``path``) into ``chunks``.

    The file must hold one entry per chunk; with ``strict`` each must hold exactly the chunk's
    keys (its adapters only, for a LoRA file; everything but the adapters otherwise).
    """
    keys = [model_key(i, len(chunks)) for i in range(len(chunks))]
    saved_keys = model_keys(ckpt)
    if saved_keys != sorted(keys):
        raise ValueError(
            f"{path} holds model chunk(s) {saved_keys} but the model has {len(chunks)} chunk(s) {keys}: "
            "use the same --num-layers-per-virtual-pipeline-stage as when saving"
        )
    adapters_only = "lora" in ckpt
    for key, chunk in zip(keys, chunks):
        want, complete = _expected_model_keys(chunk, adapters_only)
        if adapters_only and not complete and not want:
            raise ValueError(
                f"{path} holds LoRA adapters only (rank {ckpt['lora'].get('rank')}): load it into a model "
                "with the same --lora-* flags, on top of its --pretrained-checkpoint"
            )
        if strict:
            got = set(ckpt[key])
            missing, unexpected = sorted(want - got), sorted(got - want)
            if missing or unexpected:
                raise ValueError(
                    f"{path}: {key} does not match the model (missing keys {missing[:4]}, unexpected keys "
                    f"{unexpected[:4]}): was it saved with another model configuration?"
                )
        load_into(chunk, ckpt[key], key, path, strict=strict and complete)
