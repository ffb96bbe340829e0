"""Data path: indexed token datasets, GPT sample indices, blends and the train/valid/test builder.

Names are imported on first use, so tools that only tokenize (preprocess_data.py) do not pay for
torch's import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IndexedDataset": "megafast.data.indexed_dataset",
    "IndexedDatasetBuilder": "megafast.data.indexed_dataset",
    "build_gpt_datasets": "megafast.data.builder",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megafast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
