"""Hugging Face weights in and out of a training run (jllm's engine does both).

In: ``--pretrained-checkpoint HF_DIR``. :func:`check_pretrained_hf` compares config.json with the
run's model before any process group or model exists (one-line errors); :func:`load_pretrained_hf`
converts the weights in memory straight into this rank's shards (megafast.convert.hf_pretrained),
the same values as ``convert.py --loader hf --saver megafast`` at the run's TP/PP followed by
``--pretrained-checkpoint`` of that. The HF fields megafast does not model (architecture name,
token ids, generation config) go into the run's args, so its checkpoints export as the same family.

Out: ``--save-hf [DIR]`` (DIR defaults to ``{save}/hf``). After each megafast checkpoint is
committed (every rank has written it), rank 0 converts that committed iteration with the offline
converter's own code (megafast.convert.hf_export: ``convert.py --loader megafast --saver hf``; a
LoRA run's adapters merged into their base, as ``--merge-lora``), gathering the TP/PP shards from
the files one layer at a time, into a temporary directory renamed to ``DIR/iter_{N:07d}`` when
complete (config.json, safetensors shards and index, generation_config.json, the run's tokenizer
files); ``DIR/latest`` then links to it. So each export equals the offline conversion of that
checkpoint bit for bit. With ``--max-checkpoints K`` only the newest K exports are kept. The other
ranks wait for rank 0's result and every rank stops with the same one-line error if it failed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megafast.atomic_file import fsync_dir
from megafast.checkpoint.paths import ITER_DIR
from megafast.config import GPTConfig
from megafast.convert.converter import ConvertOptions
from megafast.convert.hf_export import export_hf_checkpoint
from megafast.convert.hf_pretrained import is_hf_model_dir, load_hf_into_chunks, open_hf_pretrained
from megafast.parallel.state import ParallelState

LATEST = "latest"


def check_pretrained_hf(path: Optional[str], config: GPTConfig) -> Optional[list[str]]:
    """None when ``path`` is not an HF model directory; else the notes of :func:`open_hf_pretrained`
    (SystemExit with one line when config.json does not fit the run's model)."""
    if not path or not is_hf_model_dir(path):
        return None
    try:
        return open_hf_pretrained(path, config)[1]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def load_pretrained_hf(
    path: str, chunks: Sequence[nn.Module], config: GPTConfig, state: ParallelState, ddp
) -> tuple[dict[str, Any], list[str]]:
    """Fill this rank's chunks from HF model directory ``path``; returns (HF metadata, notes).

    ``ddp``: the run's DataParallel (with ZeRO-3 the parameters are whole while they are filled).
    """
    try:
        source, notes = open_hf_pretrained(path, config)
        with ddp.unsharded_params(write_back=True):
            load_hf_into_chunks(source, chunks, config, state.tp_rank, state.tp_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return dict(source.metadata), notes


class HFExporter:
    """``--save-hf``: call with the committed iteration on every rank (Checkpointer's ``on_commit``).

    Construction is collective (a gloo group over all ranks, for the result of rank 0's export).
    """

    def __init__(self, save_dir: str, hf_dir: str, state: ParallelState, max_checkpoints: Optional[int] = None,
                 progress: bool = False) -> None:
        self.save_dir, self.hf_dir, self.state = save_dir, hf_dir, state
        self.max_checkpoints, self.progress = max_checkpoints, progress
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")

    def directory(self, iteration: int) -> str:
        return os.path.join(self.hf_dir, f"iter_{iteration:07d}")

    def __call__(self, iteration: int) -> None:
        error = ""
        if self.state.rank == 0:
            try:
                self._export(iteration)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, or they would wait forever
                error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        failed = torch.tensor([1 if error else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(failed, group=self._group)
        if failed.item():
            where = self.directory(iteration)
            raise SystemExit(f"error: --save-hf: the HF export {where} failed on rank 0"
                             + (f": {error}" if error else " (see its log)"))

    def _export(self, iteration: int) -> None:
        os.makedirs(self.hf_dir, exist_ok=True)
        final = self.directory(iteration)
        tmp = tempfile.mkdtemp(prefix=f".iter_{iteration:07d}.tmp-", dir=self.hf_dir)
        try:
            export_hf_checkpoint(ConvertOptions(loader="megafast", saver="hf", load_dir=self.save_dir, save_dir=tmp,
                                                overwrite=True, progress=self.progress))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from other users
            if os.path.isdir(final):  # the same iteration saved again (a resumed run)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        link = os.path.join(self.hf_dir, LATEST)
        tmp_link = f"{link}.tmp-{os.getpid()}"
        os.symlink(os.path.basename(final), tmp_link)
        os.replace(tmp_link, link)
        fsync_dir(self.hf_dir)
        self._prune()

    def _prune(self) -> None:
        if self.max_checkpoints is None:
            return
        done = sorted(n for n in os.listdir(self.hf_dir) if ITER_DIR.fullmatch(n))
        for name in done[: -self.max_checkpoints]:
            shutil.rmtree(os.path.join(self.hf_dir, name), ignore_errors=True)

    def close(self) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


__all__ = ["HFExporter", "check_pretrained_hf", "load_pretrained_hf"]
