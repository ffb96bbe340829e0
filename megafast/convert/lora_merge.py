"""Merge a LoRA run's adapters into its base model: a plain megafast checkpoint, ready to export.

A LoRA checkpoint (``pretrain_gpt.py --lora-rank ...``) holds only the adapters (``model``) and
their settings (``lora``); the frozen base weights are in the checkpoint the run started from
(``--pretrained-checkpoint``, or ``--load`` with ``--finetune``), at the same TP/PP layout. Each
rank's file is merged on its own, W_i + (alpha / r) * B_i A_i (megafast.model.lora.merge_state_dict:
adapters are sharded like their base layer, so the shards of the merged weight are exactly the
merged shards), and written as a ``release`` checkpoint::

    merge_lora_checkpoint("ckpt/lora_run", "ckpt/merged")          # base found in the run's args
    tools/checkpoint/convert.py --loader megafast --saver hf --load-dir ckpt/merged --save-dir hf_out

(``tools/checkpoint/convert.py --merge-lora`` does both in one go.) The merged checkpoint keeps the
run's args without the LoRA flags, so it loads as an ordinary model.

A QLoRA run (``--qlora``) trained its adapters on the NF4 round trip of the base, so that is what
they are merged into: each rank's base shard is quantized and dequantized exactly as the run did
(megafast.model.qlora.dequantize_base_state, in the run's model dtype) before W_hat + s B A.

The base may be a Hugging Face model directory (a run started with ``--pretrained-checkpoint
HF_DIR``): it is converted first (``convert.py --loader hf --saver megafast`` at the LoRA run's
TP/PP and vocabulary padding, into a temporary directory), exactly the weights that run loaded.
``merge=False`` writes the base alone (dequantized for QLoRA): the unmerged base a PEFT export
needs (megafast.convert.peft_export).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch

from megafast.checkpoint.args import HF_METADATA, TOKENIZER_DIR
from megafast.checkpoint.commit import committed, write_commit
from megafast.checkpoint.paths import MODEL_FILE, TRACKER_FILE, iteration_dir, model_keys, rank_dirs
from megafast.checkpoint.state_dict import atomic_torch_save, file_metadata, load_file
from megafast.config import LoRAConfig, QLoRAConfig
from megafast.model.lora import is_adapter_name, merge_state_dict
from megafast.model.qlora import dequantize_base_state

LORA_ARGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "qlora", "qlora_block_size",
             "qlora_double_quant")


def _committed_dir(root: str, what: str) -> str:
    if not os.path.isdir(root):
        raise ValueError(f"{what} {root} does not exist")
    commit = committed(root)
    if commit is None:
        raise ValueError(f"{what} {root} has no {TRACKER_FILE}: not a committed megafast checkpoint")
    return commit.directory


def _rank_files(directory: str) -> dict[tuple[int, int], str]:
    """(tp, pp) -> model file of every ``mp_rank_*`` directory of an iteration directory."""
    return {rank: os.path.join(path, MODEL_FILE) for rank, path in rank_dirs(directory).items()}


def base_checkpoint_of(lora_args: dict[str, Any], lora_dir: str) -> str | None:
    """The base checkpoint a LoRA run started from, from its args (None when they do not say)."""
    if lora_args.get("pretrained_checkpoint"):
        return lora_args["pretrained_checkpoint"]
    load = lora_args.get("load")
    if lora_args.get("finetune") and load and os.path.realpath(load) != os.path.realpath(lora_dir):
        return load
    return None


@contextlib.contextmanager
def megafast_base(base_dir: str, tp: int, pp: int, run_args: dict[str, Any], next_to: str) -> Iterator[str]:
    """``base_dir`` itself when it is a megafast checkpoint; an HF model directory converted to a
    temporary megafast checkpoint at (tp, pp) with the run's vocabulary padding (removed after)."""
    from megafast.convert.hf_pretrained import is_hf_model_dir

    if not is_hf_model_dir(base_dir):
        yield base_dir
        return
    from megafast.convert.converter import ConvertOptions, convert_checkpoint

    parent = os.path.dirname(os.path.abspath(next_to))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-base-", dir=parent)
    try:
        convert_checkpoint(ConvertOptions(
            loader="hf", saver="megafast", load_dir=base_dir, save_dir=tmp, target_tensor_parallel_size=tp,
            target_pipeline_parallel_size=pp, overwrite=True, progress=False,
            make_vocab_size_divisible_by=run_args.get("make_vocab_size_divisible_by"),
        ))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_lora_checkpoint(lora_dir: str, save_dir: str, base_dir: str | None = None, merge: bool = True) -> str:
    """Write ``save_dir`` (a ``release`` checkpoint): the base with the adapters of ``lora_dir`` merged
    (``merge=False``: the base alone, dequantized for a QLoRA run).

    ``base_dir`` defaults to the run's ``--pretrained-checkpoint`` (or its ``--load`` with
    ``--finetune``); a megafast checkpoint or an HF model directory. Returns the written iteration
    directory. ValueError (one line) when the checkpoint holds no adapters, the base is unknown or
    its layout or weights do not match.
    """
    lora_iter = _committed_dir(lora_dir, "LoRA checkpoint")
    lora_files = _rank_files(lora_iter)
    first = load_file(next(iter(lora_files.values())))
    if "lora" not in first:
        raise ValueError(f"{lora_iter} holds no LoRA adapters (no 'lora' entry): it is already a full model")
    lora = LoRAConfig.from_dict(first["lora"])
    run_args = dict(first.get("args") or {})
    base_dir = base_dir or base_checkpoint_of(run_args, lora_dir)
    if base_dir is None:
        raise ValueError(f"{lora_dir}: its args name no base checkpoint (--pretrained-checkpoint): pass the "
                         "checkpoint the LoRA run started from")
    if os.path.realpath(save_dir) in (os.path.realpath(lora_dir), os.path.realpath(base_dir)):
        raise ValueError(f"--save-dir {save_dir} must differ from the LoRA and base checkpoints")
    tp, pp = max(t for t, _ in lora_files) + 1, max(p for _, p in lora_files) + 1
    with megafast_base(base_dir, tp, pp, run_args, save_dir) as base:
        return _merge(lora_files, lora_iter, base, save_dir, lora, run_args, merge)


def _merge(lora_files: dict[tuple[int, int], str], lora_iter: str, base_dir: str, save_dir: str, lora: LoRAConfig,
           run_args: dict[str, Any], merge: bool) -> str:
    base_files = _rank_files(_committed_dir(base_dir, "base checkpoint"))
    if set(base_files) != set(lora_files):
        raise ValueError(f"base checkpoint {base_dir} has (tp, pp) ranks {sorted(base_files)} but the LoRA "
                         f"checkpoint {sorted(lora_files)}: reshard the base with tools/checkpoint/convert.py")
    qlora = QLoRAConfig.from_args(run_args)  # a QLoRA run trained on the NF4 round trip of the base
    run_dtype = (torch.bfloat16 if run_args.get("bf16") else
                 torch.float16 if run_args.get("fp16") else torch.float32)
    args = {k: v for k, v in run_args.items() if k not in LORA_ARGS}
    args.update(lora_rank=0, merged_lora=lora.to_dict())
    if not merge:
        args.pop("merged_lora")
    elif qlora is not None:
        args["merged_lora"]["qlora"] = {"block_size": qlora.block_size, "double_quant": qlora.double_quant}
    base_args = dict(load_file(next(iter(base_files.values()))).get("args") or {})
    if base_args.get(HF_METADATA):  # a base converted from HF: keep what its export needs
        args[HF_METADATA] = base_args[HF_METADATA]
    out_dir = iteration_dir(save_dir, 0, release=True)
    for (tp, pp), lora_path in lora_files.items():
        adapters, base = load_file(lora_path), load_file(base_files[(tp, pp)])
        keys = model_keys(adapters)
        if keys != model_keys(base):
            raise ValueError(f"{lora_path} and {base_files[(tp, pp)]} hold different model chunks: not the same model")
        merged = {}
        for key in keys:
            state = {k: v for k, v in base[key].items() if not is_adapter_name(k)}
            missing = [k for k in adapters[key] if not is_adapter_name(k)]
            if missing:
                raise ValueError(f"{lora_path}: {missing[0]} is not an adapter weight: not a LoRA checkpoint")
            state.update(adapters[key])
            if qlora is not None:
                state = dequantize_base_state(state, qlora, run_dtype)
            merged[key] = (merge_state_dict(state, lora.scale) if merge else
                           {k: v for k, v in state.items() if not is_adapter_name(k)})
        rel = os.path.relpath(os.path.dirname(lora_path), lora_iter)
        layout = dict(adapters.get("parallel_layout") or {}, distributed_optimizer=False)
        path = os.path.join(out_dir, rel, MODEL_FILE)
        atomic_torch_save({**merged, **file_metadata(0, 0, 0, args, layout)}, path)
    tokenizer = os.path.join(base_dir, TOKENIZER_DIR)
    if os.path.isdir(tokenizer) and not os.path.exists(os.path.join(save_dir, TOKENIZER_DIR)):
        shutil.copytree(tokenizer, os.path.join(save_dir, TOKENIZER_DIR))
    write_commit(save_dir, None)
    return out_dir


__all__ = ["base_checkpoint_of", "megafast_base", "merge_lora_checkpoint"]
