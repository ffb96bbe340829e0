"""megafast -> megafast at another TP/PP, on disk or straight into a model.

On disk, :func:`reshard_checkpoint` streams every full tensor (the TP shards unsharded with
``megafast.parallel.layers.unshard``) from the source files into a writer that shards it again
for the target layout (``shard``), one layer at a time. In memory, :func:`load_resharded` fills
this rank's model chunks from a checkpoint saved at any layout: each rank reads the full
tensors of its own layers and keeps its shard (used by tools/generate.py, so a checkpoint can be
served at a layout other than the one it was trained with).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from megafast.convert import layout
from megafast.convert.converter import ConvertOptions, convert_checkpoint
from megafast.convert.megafast_checkpoint import MegafastCheckpointReader
from megafast.parallel.state import ParallelState


def reshard_checkpoint(
    load_dir: str,
    save_dir: str,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    *,
    params_dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write ``load_dir``'s committed iteration to ``save_dir`` at the given layout; returns its directory."""
    return convert_checkpoint(
        ConvertOptions(
            loader="megafast",
            saver="megafast",
            load_dir=load_dir,
            save_dir=save_dir,
            target_tensor_parallel_size=tensor_parallel_size,
            target_pipeline_parallel_size=pipeline_parallel_size,
            target_params_dtype=params_dtype,
            overwrite=overwrite,
            progress=progress,
        )
    )


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
