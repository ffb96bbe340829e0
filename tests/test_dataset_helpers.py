"""megafast._C dataset helpers vs their NumPy references (and vs Megatron's helpers_cpp)."""

from __future__ import annotations

import numpy as np
import pytest

from megafast import _C
from megafast.data import helpers
from megafast.data.helpers import (
    build_blending_indices,
    build_blending_indices_reference,
    build_sample_idx,
    build_sample_idx_reference,
    num_samples_in_stream,
    sample_idx_dtype,
)


def _random_stream(rng: np.random.Generator, allow_empty_docs: bool):
    """Random sizes int32[D], document_index int32[E * D] (tiled, shuffled), L, E, T."""
    num_sizes = int(rng.integers(1, 40))
    sizes = rng.integers(0 if allow_empty_docs else 1, 60, num_sizes).astype(np.int32)
    if sizes.sum() == 0:
        sizes[0] = 1
    epochs = int(rng.integers(1, 4))
    document_index = np.tile(np.arange(num_sizes, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    seq_length = int(rng.integers(1, 50))
    return sizes, document_index, seq_length, epochs, int(sizes.sum())


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [0, 1])
def test_sample_idx_matches_reference(drop_last: bool, extra: int) -> None:
    rng = np.random.default_rng(1000 + 2 * int(drop_last) + extra)
    for trial in range(300):
        sizes, doc_index, seq_length, epochs, tokens = _random_stream(rng, allow_empty_docs=trial % 3 == 0)
        args = (sizes, doc_index, seq_length, epochs, tokens, drop_last, extra)
        ref = build_sample_idx_reference(*args)
        got32 = build_sample_idx(*args)
        got64 = _C.build_sample_idx_int64(*args)
        assert got32.dtype == np.int32 and got64.dtype == np.int64
        n = num_samples_in_stream(epochs * tokens, seq_length, drop_last, bool(extra))
        assert ref.shape == (n + 1, 2)
        np.testing.assert_array_equal(got32, ref, err_msg=f"int32 path, trial {trial}")
        np.testing.assert_array_equal(got64, ref, err_msg=f"int64 path, trial {trial}")


@pytest.mark.parametrize("extra", [0, 1])
def test_sample_idx_degenerate_lengths(extra: int) -> None:
    # Megatron's asserts (seq_length > 1, tokens_per_epoch > 1) are compiled out; these work there.
    cases = [
        (np.array([3, 5, 2], np.int32), np.array([0, 1, 2, 0, 1, 2], np.int32), 1, 2, 10),
        (np.array([1], np.int32), np.array([0, 0, 0], np.int32), 1, 3, 1),
        (np.array([1, 4], np.int32), np.array([0], np.int32), 2, 1, 1),
    ]
    for sizes, doc_index, seq_length, epochs, tokens in cases:
        for drop_last in (True, False):
            args = (sizes, doc_index, seq_length, epochs, tokens, drop_last, extra)
            np.testing.assert_array_equal(build_sample_idx(*args), build_sample_idx_reference(*args))


def test_sample_idx_large_stream_matches_reference() -> None:
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 3000, 20_000).astype(np.int32)
    doc_index = np.tile(np.arange(sizes.size, dtype=np.int32), 2)
    rng.shuffle(doc_index)
    args = (sizes, doc_index, 2048, 2, int(sizes.sum()))
    np.testing.assert_array_equal(build_sample_idx(*args), build_sample_idx_reference(*args))
    np.testing.assert_array_equal(
        build_sample_idx(*args, drop_last_partial_sequence=False),
        build_sample_idx_reference(*args, drop_last_partial_sequence=False),
    )


def test_sample_idx_dtype_follows_megatron_rule() -> None:
    int32_max = np.iinfo(np.int32).max
    assert sample_idx_dtype(10, int32_max) == np.int32
    assert sample_idx_dtype(int32_max, 5) == np.int32
    assert sample_idx_dtype(int32_max + 1, 5) == np.int64


def test_sample_idx_wrapper_dispatches_int64(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inputs big enough for the int64 path need > 2**31 documents; force the choice instead.
    monkeypatch.setattr(helpers, "sample_idx_dtype", lambda *_: np.int64)
    rng = np.random.default_rng(3)
    sizes, doc_index, seq_length, epochs, tokens = _random_stream(rng, allow_empty_docs=True)
    got = build_sample_idx(sizes, doc_index, seq_length, epochs, tokens)
    assert got.dtype == np.int64
    ref = build_sample_idx_reference(sizes, doc_index, seq_length, epochs, tokens)
    np.testing.assert_array_equal(got, ref)


def test_sample_idx_accepts_other_integer_dtypes() -> None:
    sizes = np.array([5, 3, 9], dtype=np.int64)
    doc_index = np.array([2, 0, 1], dtype=np.int64)
    got = build_sample_idx(sizes, doc_index, 4, 1, 17)
    np.testing.assert_array_equal(got, build_sample_idx_reference(sizes, doc_index, 4, 1, 17))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_length": 0}, "seq_length"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"tokens_per_epoch": 0}, "tokens_per_epoch"),
        ({"document_index": np.zeros(0, np.int32)}, "empty"),
        ({"sizes": np.array([1.5, 2.0])}, "integers"),
        ({"sizes": np.array([2**40], dtype=np.int64)}, "outside"),
    ],
)
def test_sample_idx_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {
        "sizes": np.array([4, 4], np.int32),
        "document_index": np.array([0, 1], np.int32),
        "seq_length": 3,
        "num_epochs": 1,
        "tokens_per_epoch": 8,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_sample_idx(**args)


def test_blending_matches_reference() -> None:
    rng = np.random.default_rng(11)
    cases = [([0.5, 0.5], 101), ([1.0], 17), ([0.25, 0.25, 0.25, 0.25], 64), ([3.0, 1.0], 0)]
    for _ in range(40):
        n = int(rng.integers(1, 7))
        w = rng.random(n) + 1e-3
        cases.append(((w / w.sum()).tolist(), int(rng.integers(0, 800))))
    for weights, size in cases:
        got = build_blending_indices(weights, size)
        ref = build_blending_indices_reference(weights, size)
        assert got[0].dtype == np.int16 and got[1].dtype == np.int64
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        # Each dataset's samples are numbered 0, 1, 2, ... in blend order.
        for d in range(len(weights)):
            np.testing.assert_array_equal(got[1][got[0] == d], np.arange(np.sum(got[0] == d)))


def test_blending_follows_weights() -> None:
    dataset_index, _ = build_blending_indices([0.3, 0.7], 10_000)
    counts = np.bincount(dataset_index, minlength=2)
    assert abs(counts[0] - 3000) <= 1 and abs(counts[1] - 7000) <= 1


@pytest.mark.parametrize("weights", [[0.5, -0.5], [0.0, 1.0], [float("nan")], []])
def test_blending_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        build_blending_indices(weights, 10)


@pytest.mark.megatron
def test_helpers_match_megatron_helpers_cpp() -> None:
    mh = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    rng = np.random.default_rng(5)
    for trial in range(200):
        sizes, doc_index, seq_length, epochs, tokens = _random_stream(rng, allow_empty_docs=trial % 2 == 0)
        seq_length = 1 if trial % 10 == 0 else seq_length
        for drop_last in (True, False):
            for extra in (0, 1):
                args = (sizes, doc_index, seq_length, epochs, tokens, drop_last, extra)
                np.testing.assert_array_equal(build_sample_idx(*args), mh.build_sample_idx_int32(*args))
                np.testing.assert_array_equal(
                    _C.build_sample_idx_int64(*args), mh.build_sample_idx_int64(*args)
                )
    for _ in range(30):
        n = int(rng.integers(1, 6))
        w = rng.random(n) + 1e-3
        w = w / w.sum()
        size = int(rng.integers(0, 2000))
        dataset_index = np.zeros(size, np.int16)
        dataset_sample_index = np.zeros(size, np.int64)
        mh.build_blending_indices(dataset_index, dataset_sample_index, w, n, size, False)
        got = build_blending_indices(w, size)
        np.testing.assert_array_equal(got[0], dataset_index)
        np.testing.assert_array_equal(got[1], dataset_sample_index)
