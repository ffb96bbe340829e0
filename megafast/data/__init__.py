"""Data path: indexed token datasets, GPT sample indices, blends and the train/valid/test builder."""

from megafast.data.builder import build_gpt_datasets
from megafast.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "build_gpt_datasets"]
