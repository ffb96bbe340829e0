"""Data-parallel micro-batch sampler, in Megatron's `MegatronPretrainingSampler` order.

Sample indices `consumed_samples, ..., total_samples - 1` are taken in order, in global
micro-batches of `micro_batch_size * dp_size` consecutive indices; data-parallel rank r gets the
slice `[r * micro_batch_size, (r + 1) * micro_batch_size)` of each:

    dp_size=2, micro_batch_size=3, consumed_samples=0:
        global micro-batch 0 = [0 1 2 | 3 4 5]   rank 0 -> [0, 1, 2], rank 1 -> [3, 4, 5]
        global micro-batch 1 = [6 7 8 | 9 10 11] rank 0 -> [6, 7, 8], rank 1 -> [9, 10, 11]

Resuming from a checkpoint with `consumed_samples = k` gives exactly the tail of a fresh run,
because the order depends on nothing else (shuffling lives in the dataset's shuffle index).
Use it as a `torch.utils.data.DataLoader(dataset, batch_sampler=sampler)`.
"""

from __future__ import annotations

from typing import Iterator


class MicroBatchSampler:
    """Yields this data-parallel rank's list of sample indices for each micro-batch.

    Args:
        total_samples: number of samples in the dataset (indices `0 .. total_samples - 1`).
        consumed_samples: samples already consumed by all ranks together (from the checkpoint);
            a multiple of `micro_batch_size * dp_size` and smaller than `total_samples`.
        micro_batch_size: samples per micro-batch on one rank.
        dp_rank, dp_size: this rank and the number of data-parallel ranks.
        drop_last: drop a last global micro-batch that is not full (Megatron's default). With
            False it is split the same way, so this rank's last list may be shorter or even
            empty: every rank yields the same number of lists, which keeps collectives in step.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}: no sample to consume")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size <= 0:
            raise ValueError(f"dp_size must be positive, got {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}) for dp_size={dp_size}, got {dp_rank}")
        global_micro = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % global_micro != 0:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * dp_size = {global_micro}; resume from a checkpoint saved "
                "with the same micro-batch size and data-parallel size"
            )
        if consumed_samples >= total_samples:
            raise ValueError(
                f"no samples left to consume: consumed_samples={consumed_samples} >= "
                f"total_samples={total_samples}; raise --train-samples/--train-iters or "
                "start from an earlier checkpoint"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    @property
    def global_micro_batch_size(self) -> int:
        """Samples per micro-batch over all data-parallel ranks: `micro_batch_size * dp_size`."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Number of lists `__iter__` yields (Megatron's sampler returns total_samples instead)."""
        remaining = self.total_samples - self.consumed_samples
        full, partial = divmod(remaining, self.global_micro_batch_size)
        return full + (1 if partial and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.dp_rank * self.micro_batch_size
        for batch_start in range(self.consumed_samples, self.total_samples, self.global_micro_batch_size):
            batch_end = batch_start + self.global_micro_batch_size
            if batch_end > self.total_samples and self.drop_last:
                return
            lo = min(batch_start + start, self.total_samples)
            hi = min(batch_start + start + self.micro_batch_size, self.total_samples)
            yield list(range(lo, hi))

    def __repr__(self) -> str:
        return (
            f"MicroBatchSampler(total_samples={self.total_samples}, "
            f"consumed_samples={self.consumed_samples}, micro_batch_size={self.micro_batch_size}, "
            f"dp_rank={self.dp_rank}, dp_size={self.dp_size}, drop_last={self.drop_last})"
        )
