"""Blend of several GPT datasets in fixed proportions (`--data-path 0.3 A 0.7 B`).

Megatron-core 0.19.2's `BlendedDataset` with a size: the weights are normalised,
`w_d = weight_d / sum(weights)`, and blended sample i is drawn greedily from the dataset furthest
behind its share, `argmax_d w_d * max(i, 1) - n_d` (`n_d`: samples dataset d has given so far),
which gives it that dataset's sample number `n_d` (see `helpers.build_blending_indices`). The two
index arrays, int16[size] and int64[size], are cached like the GPT indices.

Each contributing dataset must hold at least the samples the blend takes from it; the builder
asks each for `ceil(ceil(size * w_d) * 1.005)` samples so that it does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megafast.data.cached_dataset import CachedIndexDataset
from megafast.data.gpt_dataset import GPTDataset
from megafast.data.helpers import build_blending_indices
from megafast.data.index_cache import Arrays, CacheSync


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """w / sum(w) in float64, exactly as Megatron's `normalize` computes it."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


class BlendedDataset(CachedIndexDataset):
    """`size` samples drawn from `datasets` in proportion to `weights`.

    Args:
        datasets: the contributing datasets, all of one split.
        weights: one positive weight per dataset (normalised here).
        size: number of blended samples.
        cache_dir: where the two index arrays are cached; None builds in memory.
        sync: which rank builds the cache and the barrier the others wait on.

    Item i is item `dataset_sample_index[i]` of dataset `dataset_index[i]`, with a `dataset_id`
    entry (int64 scalar tensor) added, as Megatron's blend returns it.
    """

    CACHE_NAME = "BlendedDataset"
    CACHE_FORMAT = "megafast-blend-indices-1"
    INDEX_NAMES = ("dataset_index", "dataset_sample_index")

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Sequence[float],
        size: int,
        cache_dir: str | None = None,
        sync: CacheSync = CacheSync(),
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(weights)} for {len(datasets)}")
        if len(datasets) >= np.iinfo(np.int16).max:
            raise ValueError(f"at most {np.iinfo(np.int16).max - 1} datasets can be blended")
        if not all(np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"blend weights must be finite and > 0, got {list(weights)}")
        if len({d.split for d in datasets}) != 1:
            raise ValueError("all blended datasets must come from the same split")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.split = datasets[0].split
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self._load_indices(cache_dir, sync)

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "datasets": [d.identity for d in self.datasets],
            "split": self.split,
            "weights": self.weights,
            "size": self.size,
        }

    def _build_indices(self) -> Arrays:
        dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        taken = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (count, dataset) in enumerate(zip(taken.tolist(), self.datasets)):
            if count > len(dataset):
                raise RuntimeError(
                    f"the {self.split} blend takes {count} samples from dataset {d} "
                    f"({dataset.indexed.path_prefix}), which holds only {len(dataset)}; build the "
                    "contributing datasets with more samples"
                )
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _check(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        expected = {"dataset_index": np.dtype(np.int16), "dataset_sample_index": np.dtype(np.int64)}
        for name, dtype in expected.items():
            a = arrays[name]
            if a.dtype != dtype or a.shape != (self.size,):
                return f"{name} is {a.dtype}{list(a.shape)}, expected {dtype}[{self.size}]"
        if self.size and not 0 <= int(arrays["dataset_index"][-1]) < len(self.datasets):
            return "dataset_index names a dataset that is not in the blend"
        return None

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for a blend of {n} samples")
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": torch.tensor(d, dtype=torch.int64), **sample}

    def __repr__(self) -> str:
        return (
            f"BlendedDataset(split={self.split}, size={self.size}, weights={self.weights}, "
            f"datasets={[d.indexed.path_prefix for d in self.datasets]})"
        )
