"""IndexedDataset / IndexedDatasetBuilder: round trips, the exact byte format, Megatron parity,
and one clear ValueError (with nothing valid-looking left on disk) for every bad input."""

import os
import pickle
import struct

import numpy as np
import pytest

from megafast.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    code_to_dtype,
    dtype_to_code,
    write_dataset,
)

ALL_CODES = sorted(DTYPE_CODES)


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed: {seed}")  # shown by pytest when the test fails
    return np.random.default_rng(seed)


def random_tokens(rng, dtype, n):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(n).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)


def random_documents(rng, dtype, max_docs=12, max_seqs=3, max_len=40):
    """A list of documents, each a list of token arrays: empty documents and empty sequences
    included, and always at least one token overall."""
    docs = []
    for _ in range(int(rng.integers(1, max_docs + 1))):
        kind = rng.random()
        if kind < 0.2:
            docs.append([])  # a document that tokenized to nothing
        else:
            n_seqs = int(rng.integers(1, max_seqs + 1))
            lengths = rng.integers(0, max_len + 1, size=n_seqs)
            docs.append([random_tokens(rng, dtype, int(n)) for n in lengths])
    docs.append([random_tokens(rng, dtype, int(rng.integers(1, max_len + 1)))])
    return docs


def expected_document_indices(docs):
    out, count = [0], 0
    for doc in docs:
        count += len(doc)
        out.append(count)
    return out


def build_mixed(prefix, docs, dtype):
    """Write with both add_item/end_document and add_document, alternating per document."""
    with IndexedDatasetBuilder(prefix + ".bin", dtype=dtype) as builder:
        for i, doc in enumerate(docs):
            if i % 2 == 0:
                for seq in doc:
                    builder.add_item(seq)
                builder.end_document()
            else:
                tokens = np.concatenate(doc) if doc else np.zeros(0, dtype)
                builder.add_document(tokens, [len(s) for s in doc])
        builder.finalize(prefix + ".idx")


def assert_matches(ds, docs, dtype):
    flat = [seq for doc in docs for seq in doc]
    assert len(ds) == len(flat)
    assert ds.dtype == np.dtype(dtype)
    assert ds.document_indices.tolist() == expected_document_indices(docs)
    assert ds.sequence_lengths.tolist() == [len(s) for s in flat]
    assert ds.num_documents == len(docs)
    for i, seq in enumerate(flat):
        got = ds[i]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, seq)


def files_in(directory):
    return sorted(os.listdir(directory))


# ---- round trip ----


@pytest.mark.parametrize("code", ALL_CODES)
def test_round_trip_every_dtype(tmp_path, rng, code):
    dtype = code_to_dtype(code)
    docs = random_documents(rng, dtype)
    prefix = str(tmp_path / "data")
    build_mixed(prefix, docs, dtype)
    assert files_in(tmp_path) == ["data.bin", "data.idx"]

    ds = IndexedDataset(prefix)
    assert_matches(ds, docs, dtype)
    flat = [seq for doc in docs for seq in doc]
    lengths = np.array([len(s) for s in flat], dtype=np.int64)
    np.testing.assert_array_equal(
        ds.sequence_pointers, np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    )
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64
    assert ds.num_tokens == int(lengths.sum())

    # zero copy: read-only views of the mapped file
    last = ds[-1]
    assert not last.flags.writeable and not last.flags.owndata
    np.testing.assert_array_equal(last, flat[-1])

    # get(offset, length), slices, pickling
    longest = int(np.argmax(lengths))
    n = int(lengths[longest])
    off = n // 3
    np.testing.assert_array_equal(ds.get(longest, offset=off), flat[longest][off:])
    np.testing.assert_array_equal(ds.get(longest, off, n - off - 1), flat[longest][off : n - 1])
    for got, want in zip(ds[1::2], flat[1::2]):
        np.testing.assert_array_equal(got, want)
    assert len(ds[:]) == len(flat)
    clone = pickle.loads(pickle.dumps(ds))
    assert_matches(clone, docs, dtype)


def test_write_dataset_helper_and_empty_datasets(tmp_path):
    # no documents at all: N = 0, D = 1, empty .bin
    write_dataset(str(tmp_path / "none"), [], dtype=np.uint16)
    ds = IndexedDataset(str(tmp_path / "none"))
    assert len(ds) == 0 and ds.document_indices.tolist() == [0] and ds.num_tokens == 0
    # only empty documents: document indices repeat 0
    write_dataset(str(tmp_path / "empty_docs"), [[], [], []], dtype=np.int32)
    ds = IndexedDataset(str(tmp_path / "empty_docs"))
    assert len(ds) == 0 and ds.document_indices.tolist() == [0, 0, 0, 0]
    # zero-length sequences only
    write_dataset(str(tmp_path / "zero_len"), [[[]], [[], []]], dtype=np.int32)
    ds = IndexedDataset(str(tmp_path / "zero_len"))
    assert ds.sequence_lengths.tolist() == [0, 0, 0] and ds.document_indices.tolist() == [0, 1, 3]
    assert ds[2].size == 0


def test_index_errors_and_bounds(tmp_path):
    write_dataset(str(tmp_path / "d"), [[[1, 2, 3]], [[4]]], dtype=np.int32)
    ds = IndexedDataset(str(tmp_path / "d"))
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)
    with pytest.raises(TypeError):
        ds["0"]
    assert ds[-2].tolist() == [1, 2, 3] and ds[np.int64(1)].tolist() == [4]
    assert "sequences=2" in repr(ds)


# ---- exact bytes, independent of our writer ----


@pytest.mark.parametrize("code", ALL_CODES)
def test_idx_bytes_exact(tmp_path, rng, code):
    dtype = code_to_dtype(code)
    docs = random_documents(rng, dtype)
    prefix = str(tmp_path / "data")
    build_mixed(prefix, docs, dtype)

    lengths = [len(seq) for doc in docs for seq in doc]
    pointers, position = [], 0
    for n in lengths:
        pointers.append(position)
        position += n * dtype.itemsize
    doc_idx = expected_document_indices(docs)
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(doc_idx))
        + struct.pack(f"<{len(lengths)}i", *lengths)
        + struct.pack(f"<{len(pointers)}q", *pointers)
        + struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    )
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == expected
    with open(prefix + ".bin", "rb") as f:
        expected_bin = b"".join(seq.astype(dtype.newbyteorder("<")).tobytes() for d in docs for seq in d)
        assert f.read() == expected_bin


def test_dtype_helpers():
    names = {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"
    }
    for code, name in names.items():
        assert code_to_dtype(code) == np.dtype(name)
        assert dtype_to_code(np.dtype(name)) == code
        assert dtype_to_code(getattr(np, name)) == code
    assert best_fitting_dtype(32000) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(128256) == np.int32
    assert best_fitting_dtype(None) == np.int32
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        code_to_dtype(9)
    with pytest.raises(ValueError, match="uint32 has no code"):
        dtype_to_code(np.uint32)


# ---- builder robustness ----


def test_builder_writes_only_temporaries_until_finalize(tmp_path):
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_item(np.arange(10))
    builder.end_document()
    assert files_in(tmp_path) == ["data.bin.tmp"]
    builder.finalize(prefix + ".idx")
    assert files_in(tmp_path) == ["data.bin", "data.idx"]
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_item([1])


def test_builder_aborted_by_exception_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "data")
    with pytest.raises(KeyError):
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
            builder.add_item(np.arange(100))
            builder.end_document()
            raise KeyError("crash mid-way")
    assert files_in(tmp_path) == []
    # leaving the block without finalize also discards the output
    with IndexedDatasetBuilder(prefix + ".bin") as builder:
        builder.add_item([1, 2])
    assert files_in(tmp_path) == []
    # explicit abort
    builder = IndexedDatasetBuilder(prefix + ".bin")
    builder.add_item([1, 2])
    builder.abort()
    assert files_in(tmp_path) == []


def test_builder_overwrites_an_existing_dataset_atomically(tmp_path):
    prefix = str(tmp_path / "data")
    write_dataset(prefix, [[[1, 2, 3]]], dtype=np.int32)
    with pytest.raises(ValueError):
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
            builder.add_item([7, 8])
            builder.add_item([2**40])  # overflow: refused
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]  # the old dataset is untouched
    write_dataset(prefix, [[[4, 5]], []], dtype=np.int32)
    ds = IndexedDataset(prefix)
    assert ds[0].tolist() == [4, 5] and ds.document_indices.tolist() == [0, 1, 1]
    assert files_in(tmp_path) == ["data.bin", "data.idx"]


@pytest.mark.parametrize(
    "dtype, tokens, match",
    [
        (np.uint16, [1, 65536], "token id 65536 does not fit the dataset dtype uint16"),
        (np.uint8, [-1, 3], "token id -1 does not fit the dataset dtype uint8"),
        (np.int32, [2**31], "token id 2147483648 does not fit the dataset dtype int32"),
    ],
)
def test_builder_refuses_token_overflow(tmp_path, dtype, tokens, match):
    prefix = str(tmp_path / "data")
    with pytest.raises(ValueError, match=match):
        with IndexedDatasetBuilder(prefix + ".bin", dtype=dtype) as builder:
            builder.add_item(np.array(tokens, dtype=np.int64))
            builder.finalize(prefix + ".idx")
    assert files_in(tmp_path) == []


def test_builder_argument_errors(tmp_path):
    prefix = str(tmp_path / "data")
    with pytest.raises(ValueError, match="has no code in the indexed dataset format"):
        IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint32)
    with pytest.raises(ValueError, match="must be non-negative and sum to the number of tokens"):
        with IndexedDatasetBuilder(prefix + ".bin") as builder:
            builder.add_document([1, 2, 3], [2])
    assert files_in(tmp_path) == []


# ---- reader validation: one clear line per bad input ----


def _valid(tmp_path, name="data"):
    prefix = str(tmp_path / name)
    write_dataset(prefix, [[[1, 2, 3], [4]], [], [[5, 6]]], dtype=np.int32)  # N=3, D=4
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


N, D = 3, 4
DOCS_AT = 34 + 12 * N


CORRUPTIONS = {
    "missing idx": (lambda p: os.remove(p + ".idx"), r"data\.idx: file not found"),
    "missing bin": (lambda p: os.remove(p + ".bin"), r"data\.bin: file not found"),
    "wrong magic": (lambda p: _patch(p + ".idx", 0, b"NOTANIDX\x00"), "not a Megatron indexed dataset index"),
    "unknown version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "unknown index version 2"),
    "unknown dtype code": (lambda p: _patch(p + ".idx", 17, b"\x0c"), "unknown dtype code 12"),
    "idx shorter than header": (
        lambda p: _truncate(p + ".idx", 20),
        "truncated index, 20 bytes but the header",
    ),
    "idx arrays truncated": (
        lambda p: _truncate(p + ".idx", DOCS_AT + 8),
        r"truncated index, 78 bytes but its header \(N=3 sequences, D=4 document entries\) needs 102",
    ),
    "idx too long": (lambda p: _append(p + ".idx", b"\x00" * 3), "index longer than expected"),
    "bin shorter": (lambda p: _truncate(p + ".bin", 20), "data file shorter than its index says"),
    "bin longer": (lambda p: _append(p + ".bin", b"\x00" * 4), "data file longer than its index says"),
    "docs not starting at 0": (
        lambda p: _patch(p + ".idx", DOCS_AT, struct.pack("<q", 1)),
        "document indices start at 1, not 0",
    ),
    "docs not ending at N": (
        lambda p: _patch(p + ".idx", DOCS_AT + 8 * (D - 1), struct.pack("<q", 2)),
        "document indices end at 2, not at the sequence count 3",
    ),
    "docs not sorted": (
        lambda p: _patch(p + ".idx", DOCS_AT + 8, struct.pack("<q", 3)),  # 0, 3, 2, 3
        "document indices are not sorted",
    ),
    "pointer not starting at 0": (
        lambda p: _patch(p + ".idx", 34 + 4 * N, struct.pack("<q", 4)),
        "first sequence pointer is 4, not 0",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_reader_rejects_bad_files_with_one_clear_line(tmp_path, case):
    corrupt, match = CORRUPTIONS[case]
    prefix = _valid(tmp_path)
    IndexedDataset(prefix)  # valid before
    corrupt(prefix)
    with pytest.raises(ValueError, match=match) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert "\n" not in message
    assert prefix in message  # names the file
    assert "regenerate" in message or "create the dataset" in message or "pass the prefix" in message


def test_add_index_of_a_bad_or_mismatched_dataset_leaves_nothing(tmp_path):
    good = _valid(tmp_path, "good")
    bad = _valid(tmp_path, "bad")
    _truncate(bad + ".bin", 4)
    small = str(tmp_path / "small")
    write_dataset(small, [[[1, 2]]], dtype=np.uint16)
    out = str(tmp_path / "out")
    before = files_in(tmp_path)
    with pytest.raises(ValueError, match="data file shorter than its index says"):
        with IndexedDatasetBuilder(out + ".bin", dtype=np.int32) as builder:
            builder.add_index(good)
            builder.add_index(bad)
            builder.finalize(out + ".idx")
    assert files_in(tmp_path) == before
    with pytest.raises(ValueError, match="token dtype uint16 differs from this dataset's int32"):
        with IndexedDatasetBuilder(out + ".bin", dtype=np.int32) as builder:
            builder.add_index(good)
            builder.add_index(small)
            builder.finalize(out + ".idx")
    assert files_in(tmp_path) == before


# ---- Megatron compatibility ----


def _megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _megatron_build(mod, prefix, docs, dtype):
    import torch

    # Megatron's DType looks dtypes up by the numpy type's name.
    builder = mod.IndexedDatasetBuilder(prefix + ".bin", dtype=np.dtype(dtype).type)
    for i, doc in enumerate(docs):
        wide = [s.astype(np.float64 if s.dtype.kind == "f" else np.int64) for s in doc]
        if i % 2 == 0:
            for seq in wide:
                builder.add_item(torch.from_numpy(seq))
            builder.end_document()
        else:
            tokens = np.concatenate(wide) if wide else np.zeros(0, np.int64)
            builder.add_document(torch.from_numpy(tokens), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")


@pytest.mark.megatron
@pytest.mark.parametrize("code", ALL_CODES)
def test_megatron_byte_identical_and_cross_readable(tmp_path, rng, code):
    mod = _megatron()
    dtype = code_to_dtype(code)
    docs = random_documents(rng, dtype)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    build_mixed(ours, docs, dtype)
    _megatron_build(mod, theirs, docs, dtype)

    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), f"{ext} differs from Megatron's"

    # Megatron reads ours
    meg = mod.IndexedDataset(ours)
    flat = [seq for doc in docs for seq in doc]
    assert len(meg) == len(flat)
    np.testing.assert_array_equal(meg.document_indices, expected_document_indices(docs))
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(meg[i], seq)
    # ours reads Megatron's
    assert_matches(IndexedDataset(theirs), docs, dtype)
