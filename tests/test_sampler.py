"""MicroBatchSampler: Megatron's MegatronPretrainingSampler order, resume, validation."""

import numpy as np
import pytest

from megafast.data.sampler import MicroBatchSampler


def reference(total, consumed, mbs, rank, dp, drop_last):
    """Independent statement of Megatron's order: global micro-batches of mbs*dp consecutive
    indices from `consumed`, rank r taking [r*mbs, (r+1)*mbs) of each."""
    gbs = mbs * dp
    return [
        [i for i in range(start + rank * mbs, start + (rank + 1) * mbs) if i < total]
        for start in range(consumed, total, gbs)
        if start + gbs <= total or not drop_last
    ]


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def test_worked_example():
    ranks = [list(MicroBatchSampler(14, 0, 3, r, 2)) for r in range(2)]
    assert ranks[0] == [[0, 1, 2], [6, 7, 8]]
    assert ranks[1] == [[3, 4, 5], [9, 10, 11]]
    # drop_last=False: the last partial global micro-batch is split the same way (Megatron)
    ranks = [list(MicroBatchSampler(14, 0, 3, r, 2, drop_last=False)) for r in range(2)]
    assert ranks[0] == [[0, 1, 2], [6, 7, 8], [12, 13]]
    assert ranks[1] == [[3, 4, 5], [9, 10, 11], []]


def test_matches_reference_for_random_sizes(rng):
    for _ in range(200):
        mbs = int(rng.integers(1, 6))
        dp = int(rng.integers(1, 6))
        total = int(rng.integers(1, 120))
        consumed = mbs * dp * int(rng.integers(0, max(1, (total - 1) // (mbs * dp) + 1)))
        drop_last = bool(rng.integers(0, 2))
        per_rank = []
        for rank in range(dp):
            sampler = MicroBatchSampler(total, consumed, mbs, rank, dp, drop_last)
            got = list(sampler)
            assert got == reference(total, consumed, mbs, rank, dp, drop_last)
            assert len(sampler) == len(got)
            per_rank.append(got)
        # every rank takes the same number of steps; together they cover the range once, in order
        assert len({len(batches) for batches in per_rank}) == 1
        covered = [i for step in zip(*per_rank) for batch in step for i in batch]
        end = total if not drop_last else consumed + (total - consumed) // (mbs * dp) * mbs * dp
        assert covered == list(range(consumed, end))


def test_resume_is_the_tail_of_a_fresh_run(rng):
    for _ in range(50):
        mbs, dp = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        gbs = mbs * dp
        total = int(rng.integers(gbs, 200))
        drop_last = bool(rng.integers(0, 2))
        for rank in range(dp):
            fresh = list(MicroBatchSampler(total, 0, mbs, rank, dp, drop_last))
            steps = int(rng.integers(0, (total - 1) // gbs + 1))
            resumed = list(MicroBatchSampler(total, steps * gbs, mbs, rank, dp, drop_last))
            assert resumed == fresh[steps:]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_samples=0), "total_samples must be positive"),
        (dict(micro_batch_size=0), "micro_batch_size must be positive"),
        (dict(dp_size=0), "dp_size must be positive"),
        (dict(dp_rank=2), r"dp_rank must be in \[0, 2\)"),
        (dict(dp_rank=-1), r"dp_rank must be in \[0, 2\)"),
        (dict(consumed_samples=5), "consumed_samples=5 must be a non-negative multiple of .* = 8"),
        (dict(consumed_samples=-8), "consumed_samples=-8 must be a non-negative multiple"),
        (dict(consumed_samples=104), "no samples left to consume: consumed_samples=104 >= total_samples=100"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(total_samples=100, consumed_samples=0, micro_batch_size=4, dp_rank=0, dp_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MicroBatchSampler(**args)
