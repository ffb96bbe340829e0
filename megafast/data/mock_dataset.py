"""Random token sequences for ``--mock-data`` runs (no files), deterministic per sample index."""

from __future__ import annotations

import numpy as np
import torch


class MockGPTDataset(torch.utils.data.Dataset):
    """Sample i is ``seq_length + 1`` tokens drawn from RandomState(seed + i), as a GPTDataset item."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.RandomState((self.seed + int(idx)) % (2**32))
        sample = torch.from_numpy(rng.randint(0, self.vocab_size, self.seq_length + 1).astype(np.int64))
        return {
            "tokens": sample[:-1],
            "labels": sample[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
