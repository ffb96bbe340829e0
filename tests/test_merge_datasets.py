"""tools/merge_datasets.py and IndexedDatasetBuilder.add_index: content, Megatron byte parity,
atomic failure on bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megafast.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import merge_datasets  # noqa: E402  (tools/ is not a package)


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def random_docs(rng, vocab, max_docs=10):
    """Documents as lists of sequences, with empty documents and empty sequences."""
    docs = []
    for _ in range(int(rng.integers(0, max_docs + 1))):
        if rng.random() < 0.2:
            docs.append([])
        else:
            lengths = rng.integers(0, 30, size=int(rng.integers(1, 4)))
            docs.append([rng.integers(0, vocab, size=int(n)) for n in lengths])
    return docs


def make_inputs(tmp_path, rng, count, dtype=np.uint16, vocab=60000):
    prefixes, all_docs = [], []
    for k in range(count):
        docs = random_docs(rng, vocab)
        if k == 0:
            docs.append([rng.integers(0, vocab, size=5)])  # at least one token overall
        prefix = str(tmp_path / f"in_{k:02d}")
        write_dataset(prefix, docs, dtype=dtype)
        prefixes.append(prefix)
        all_docs.append(docs)
    return prefixes, all_docs


def assert_is_concatenation(merged, all_docs):
    docs = [doc for docs in all_docs for doc in docs]
    flat = [seq for doc in docs for seq in doc]
    assert len(merged) == len(flat)
    expected_doc_idx = np.cumsum([0] + [len(doc) for doc in docs])
    np.testing.assert_array_equal(merged.document_indices, expected_doc_idx)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(merged[i], seq)


def read_bytes(prefix):
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


def test_add_index_merge_is_the_concatenation(tmp_path, rng):
    prefixes, all_docs = make_inputs(tmp_path, rng, count=int(rng.integers(2, 5)))
    out = str(tmp_path / "merged")
    with IndexedDatasetBuilder(out + ".bin", dtype=np.uint16) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(out + ".idx")
    assert_is_concatenation(IndexedDataset(out), all_docs)


def test_add_index_mixed_with_items(tmp_path, rng):
    prefixes, all_docs = make_inputs(tmp_path, rng, count=2, dtype=np.int32, vocab=100000)
    out = str(tmp_path / "mixed")
    own = [[np.array([7, 8, 9])], []]
    with IndexedDatasetBuilder(out + ".bin", dtype=np.int32) as builder:
        builder.add_index(prefixes[0])
        builder.add_item(own[0][0])
        builder.end_document()
        builder.end_document()
        builder.add_index(prefixes[1])
        builder.finalize(out + ".idx")
    assert_is_concatenation(IndexedDataset(out), [all_docs[0], own, all_docs[1]])


def test_tool_input_list_and_input_dir(tmp_path, rng, capsys):
    inputs = tmp_path / "shards"
    inputs.mkdir()
    prefixes, all_docs = make_inputs(inputs, rng, count=3)
    (inputs / "README.txt").write_text("not a dataset")  # ignored

    out_list = str(tmp_path / "by_list")
    merge_datasets.main(["--input", *prefixes, "--output-prefix", out_list])
    assert "merged 3 datasets" in capsys.readouterr().out
    assert_is_concatenation(IndexedDataset(out_list), all_docs)

    out_dir = str(tmp_path / "by_dir")
    merge_datasets.main(["--input-dir", str(inputs), "--output-prefix", out_dir])
    assert read_bytes(out_dir) == read_bytes(out_list)  # sorted by name = the order given above

    # order is honoured for --input
    out_rev = str(tmp_path / "rev")
    merge_datasets.main(["--input", *prefixes[::-1], "--output-prefix", out_rev])
    assert_is_concatenation(IndexedDataset(out_rev), all_docs[::-1])


def _outputs(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("out"))


def test_tool_mismatched_dtypes_leave_no_output(tmp_path, rng):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    write_dataset(a, [[[1, 2, 3]]], dtype=np.uint16)
    write_dataset(b, [[[4, 5]]], dtype=np.int32)
    dtypes_differ = r"inputs have different token dtypes: .*a \(uint16\), .*b \(int32\)"
    with pytest.raises(ValueError, match=dtypes_differ):
        merge_datasets.merge([a, b], str(tmp_path / "out"))
    assert _outputs(tmp_path) == []
    with pytest.raises(SystemExit, match="merge_datasets.py: error: inputs have different token dtypes"):
        merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "out")])
    assert _outputs(tmp_path) == []


def test_tool_bad_inputs(tmp_path):
    a = str(tmp_path / "a")
    write_dataset(a, [[[1, 2, 3]]], dtype=np.uint16)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"missing\.idx: file not found"):
        merge_datasets.merge([a, str(tmp_path / "missing")], out)
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets.merge([a], a)
    assert _outputs(tmp_path) == []

    shards = tmp_path / "shards"
    shards.mkdir()
    with pytest.raises(ValueError, match="no .bin/.idx pairs found"):
        merge_datasets.prefixes_in_dir(str(shards))
    (shards / "lonely.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"lonely\.idx: missing"):
        merge_datasets.prefixes_in_dir(str(shards))
    with pytest.raises(ValueError, match="not a directory"):
        merge_datasets.prefixes_in_dir(str(tmp_path / "nope"))

    # a corrupt input found while checking: nothing written
    write_dataset(str(tmp_path / "c"), [[[1, 2, 3]]], dtype=np.uint16)
    with open(str(tmp_path / "c.idx"), "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="truncated index"):
        merge_datasets.merge([a, str(tmp_path / "c")], out)
    assert _outputs(tmp_path) == []


def test_tool_as_a_subprocess(tmp_path, rng):
    prefixes, all_docs = make_inputs(tmp_path, rng, count=2)
    script = os.path.join("tools", "merge_datasets.py")
    ok = subprocess.run(
        [sys.executable, script, "--input", *prefixes, "--output-prefix", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert_is_concatenation(IndexedDataset(str(tmp_path / "out")), all_docs)

    bad = subprocess.run(
        [sys.executable, script, "--input", prefixes[0], str(tmp_path / "nope"), "--output-prefix",
         str(tmp_path / "out2")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("merge_datasets.py: error: ") and "nope.idx: file not found" in lines[0]
    assert not any(name.startswith("out2") for name in os.listdir(tmp_path))


@pytest.mark.megatron
def test_merge_equals_megatron_add_index_byte_for_byte(tmp_path, rng):
    mod = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    for dtype, vocab in ((np.uint16, 60000), (np.int32, 200000)):
        sub = tmp_path / np.dtype(dtype).name
        sub.mkdir()
        prefixes, _ = make_inputs(sub, rng, count=int(rng.integers(2, 5)), dtype=dtype, vocab=vocab)
        ours, theirs = str(sub / "ours"), str(sub / "theirs")
        merge_datasets.merge(prefixes, ours)
        builder = mod.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(theirs + ".idx")
        assert read_bytes(ours) == read_bytes(theirs)
