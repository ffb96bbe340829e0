"""megafast -> megafast at another TP/PP/EP on disk.

:func:`reshard_checkpoint` streams every full tensor (the TP shards unsharded with
``megafast.parallel.layers.unshard``) from the source files into a writer that shards it again
for the target layout (``shard``), one layer at a time. (Loading a checkpoint saved at any layout
straight into a model is :func:`megafast.checkpoint.reader.load_resharded`.)
"""

from __future__ import annotations

from typing import Optional

from megafast.convert.converter import ConvertOptions, convert_checkpoint


def reshard_checkpoint(
    load_dir: str,
    save_dir: str,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    *,
    params_dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    expert_parallel_size: Optional[int] = None,
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
            target_expert_parallel_size=expert_parallel_size,
            target_params_dtype=params_dtype,
            overwrite=overwrite,
            progress=progress,
        )
    )
