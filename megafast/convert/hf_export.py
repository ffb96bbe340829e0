"""A megafast checkpoint as a Hugging Face model directory, LoRA runs included.

:func:`export_hf_checkpoint` is what ``tools/checkpoint/convert.py --loader megafast --saver hf``
runs, and what ``pretrain_gpt.py --save-hf`` runs after each committed save, so both give the
same files bit for bit:

- a full model: :func:`megafast.convert.converter.convert_checkpoint` (megafast -> hf);
- a LoRA run's checkpoint (adapters only), ``lora_format="merged"`` (the default, ``--merge-lora``):
  the adapters merged into their base (megafast.convert.lora_merge, into a temporary checkpoint
  next to ``save_dir``), then converted;
- ``lora_format="peft"``: PEFT's adapter files plus the unmerged base (megafast.convert.peft_export).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Optional

from megafast.checkpoint.commit import committed
from megafast.checkpoint.paths import MODEL_FILE, rank_dirs
from megafast.checkpoint.state_dict import load_file
from megafast.convert.converter import ConvertOptions, convert_checkpoint

LORA_FORMATS = ("merged", "peft")


def is_lora_checkpoint(directory: str) -> bool:
    """Whether the committed iteration of ``directory`` holds LoRA adapters only (a ``lora`` entry)."""
    commit = committed(directory) if os.path.isdir(directory) else None
    if commit is None:
        return False
    first = next(iter(rank_dirs(commit.directory).values()))
    return "lora" in load_file(os.path.join(first, MODEL_FILE), mmap=True)


def export_hf_checkpoint(
    opts: ConvertOptions, lora_format: Optional[str] = None, lora_base_dir: Optional[str] = None
) -> str:
    """megafast checkpoint ``opts.load_dir`` -> HF ``opts.save_dir``; returns the directory written.

    ``lora_format`` None exports a full model as is and a LoRA checkpoint merged.
    """
    if lora_format is not None and lora_format not in LORA_FORMATS:
        raise ValueError(f"--lora-format must be one of {', '.join(LORA_FORMATS)}, got {lora_format!r}")
    if lora_format is not None and (not os.path.isdir(opts.load_dir) or committed(opts.load_dir) is None):
        raise ValueError(f"--load-dir {opts.load_dir} holds no committed megafast checkpoint "
                         "(latest_checkpointed_iteration.txt): give a LoRA run's --save directory")
    lora = is_lora_checkpoint(opts.load_dir)
    if lora_format is not None and not lora:
        raise ValueError(f"--lora-format {lora_format}: {opts.load_dir} holds no LoRA adapters (a full model): "
                         "drop the flag")
    if not lora:
        return convert_checkpoint(opts)
    if lora_format == "peft":
        from megafast.convert.peft_export import export_peft

        return export_peft(opts, lora_base_dir)
    from megafast.convert.lora_merge import merge_lora_checkpoint

    parent = os.path.dirname(os.path.abspath(opts.save_dir))
    os.makedirs(parent, exist_ok=True)
    merged = tempfile.mkdtemp(prefix=".merged-lora-", dir=parent)
    try:
        merge_lora_checkpoint(opts.load_dir, merged, lora_base_dir)
        return convert_checkpoint(dataclasses.replace(opts, load_dir=merged))
    finally:
        shutil.rmtree(merged, ignore_errors=True)


__all__ = ["LORA_FORMATS", "export_hf_checkpoint", "is_lora_checkpoint"]
