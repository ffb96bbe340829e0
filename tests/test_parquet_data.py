"""Parquet token data (megafast.data.parquet_dataset) and parquet directories in preprocess_data.py.

The reference is always the same documents written as `.bin`/`.idx` by `IndexedDatasetBuilder`
(the format Megatron reads): a directory in Spark's layout must give the same sequence and
document indices, the same document/sample/shuffle indices for every split, the same blends,
and `pretrain_gpt.py` the same losses bit for bit. The corpus is drawn from a fresh seed each run,
named in the failure messages (and in the corpus's directory name).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import types
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_run import MODEL, ROOT, TRAIN, VOCAB, data_args, train_records  # noqa: E402

from megafast.data.builder import build_gpt_datasets  # noqa: E402
from megafast.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from megafast.data.parquet_dataset import ParquetTokenDataset, check_parquet_dir  # noqa: E402

INDICES = ("document_index", "sample_index", "shuffle_index")


class Corpus(NamedTuple):
    docs: list[list[int]]  # token ids per document (some empty)
    spark: str  # Spark-layout directory of the docs
    prefix: str  # the same docs as .bin/.idx
    other: str  # a second .bin/.idx dataset (other documents) for blends
    seed: int


def make_docs(rng: np.random.Generator, n: int) -> list[list[int]]:
    """Learnable documents (count up from a random start with a random stride, then EOD), every
    ~13th one empty, as a row with an empty list."""
    docs = []
    for i in range(n):
        if i % 13 == 5:
            docs.append([])
            continue
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        docs.append(((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1])
    return docs


def write_bin(prefix: str, docs: list[list[int]]) -> str:
    """The reference: each non-empty doc one sequence, an empty one a document without sequence."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)] if doc else [])
    builder.finalize(prefix + ".idx")
    return prefix


def write_spark(directory: Path, docs: list[list[int]], parts: int, extra: dict | None = None,
                value_type=None, **options) -> str:
    """What Spark's `df.write.parquet(dir)` leaves: snappy part files named by partition and job
    uuid, `_SUCCESS`, and a hidden `.crc` per file; an id and a text column next to the tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    job = uuid.UUID(int=len(docs) * 7919 + parts)
    bounds = np.linspace(0, len(docs), parts + 1).astype(int)
    for p in range(parts):
        rows = docs[bounds[p]:bounds[p + 1]]
        columns = {
            "id": pa.array(range(bounds[p], bounds[p + 1]), pa.int64()),
            "input_ids": pa.array(rows, pa.list_(value_type or pa.int32())),
            "source": pa.array([f"doc {i}" for i in range(len(rows))], pa.string()),
            **(extra or {}),
        }
        name = f"part-{p:05d}-{job}-c000.snappy.parquet"
        pq.write_table(pa.table(columns), directory / name, compression="snappy", row_group_size=7, **options)
        (directory / f".{name}.crc").write_bytes(b"crc\x00\x01")
    (directory / "_SUCCESS").write_bytes(b"")
    (directory / "._SUCCESS.crc").write_bytes(b"crc")
    return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    seed = random.SystemRandom().randrange(1 << 31)
    root = tmp_path_factory.mktemp(f"parquet_seed{seed}_")
    rng = np.random.default_rng(seed)
    docs = make_docs(rng, 260)
    return Corpus(docs, write_spark(root / "spark", docs, parts=4), write_bin(str(root / "ref"), docs),
                  write_bin(str(root / "other"), make_docs(rng, 150)), seed)


def assert_same_datasets(got, want, seed: int) -> None:
    """Same splits (None or not), same index arrays, same items."""
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), (k, seed)
        if a is None:
            continue
        parts = [(a, b)] if not hasattr(a, "datasets") else list(zip(a.datasets, b.datasets))
        if hasattr(a, "datasets"):
            for name in ("dataset_index", "dataset_sample_index"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"seed {seed}")
        for x, y in parts:
            for name in INDICES:
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{name} seed {seed}")
        assert len(a) == len(b), seed
        for i in range(len(a)):
            for key, value in b[i].items():
                assert a[i][key].equal(value), (k, i, key, seed)


# ---- (a) the dataset is the .bin/.idx one ----


def test_spark_directory_reads_as_the_indexed_dataset(corpus):
    got, want = ParquetTokenDataset(corpus.spark), IndexedDataset(corpus.prefix)
    assert got.column == "input_ids" and len(got.files) == 4  # _SUCCESS, .crc ignored; column detected
    assert len(got) == len(want) and got.num_documents == want.num_documents == len(corpus.docs)
    np.testing.assert_array_equal(got.sequence_lengths, want.sequence_lengths, err_msg=f"seed {corpus.seed}")
    np.testing.assert_array_equal(got.document_indices, want.document_indices, err_msg=f"seed {corpus.seed}")
    for i in range(len(want)):
        assert got[i].tolist() == want[i].tolist(), (i, corpus.seed)
    assert got.get(3, 2, 4).tolist() == want.get(3, 2, 4).tolist()
    assert got.get(-1).tolist() == want.get(-1).tolist()
    assert got.num_tokens == want.num_tokens
    with pytest.raises(IndexError):
        got.get(0, 1, int(got.sequence_lengths[0]))
    # pickled (DataLoader workers): the same reads
    import pickle

    again = pickle.loads(pickle.dumps(got))
    assert [again[i].tolist() for i in range(0, len(want), 17)] == [want[i].tolist() for i in range(0, len(want), 17)]


@pytest.mark.parametrize("split", ["90,8,2", "80,15,5"])
def test_indices_splits_and_blends_are_the_indexed_ones(corpus, tmp_path, split):
    counts = [120, 24, 8]
    kw = dict(seed=1234 + corpus.seed % 1000, cache_dir=str(tmp_path / "cache"))
    assert_same_datasets(build_gpt_datasets([corpus.spark], split, 16, counts, **kw),
                         build_gpt_datasets([corpus.prefix], split, 16, counts, **kw), corpus.seed)
    blend = build_gpt_datasets(["0.6", corpus.spark, "0.4", corpus.other], split, 16, counts, **kw)
    assert_same_datasets(blend, build_gpt_datasets(["0.6", corpus.prefix, "0.4", corpus.other], split, 16,
                                                   counts, **kw), corpus.seed)
    # from the cache: the same arrays again, loaded
    again = build_gpt_datasets(["0.6", corpus.spark, "0.4", corpus.other], split, 16, counts, **kw)
    assert all(d.cache_hit for d in again[0].datasets)
    assert_same_datasets(again, blend, corpus.seed)


def test_cache_tells_directories_apart(corpus, tmp_path):
    """Two directories at the same path one after the other (other files) never share indices."""
    data = tmp_path / "data"
    kw = dict(seed=7, cache_dir=str(tmp_path / "cache"))
    write_spark(data, corpus.docs, parts=4)
    first = build_gpt_datasets([str(data)], "1,0,0", 16, [50, 0, 0], **kw)[0]
    assert not first.cache_hit and build_gpt_datasets([str(data)], "1,0,0", 16, [50, 0, 0], **kw)[0].cache_hit
    shutil.rmtree(data)
    write_spark(data, corpus.docs[:-20] + corpus.docs[-20:][::-1], parts=4)  # same rows, other order
    second = build_gpt_datasets([str(data)], "1,0,0", 16, [50, 0, 0], **kw)[0]
    assert not second.cache_hit
    reference = build_gpt_datasets([write_bin(str(tmp_path / "r"), corpus.docs[:-20] + corpus.docs[-20:][::-1])],
                                   "1,0,0", 16, [50, 0, 0], seed=7)[0]
    assert_same_datasets([second], [reference], corpus.seed)


# ---- (b), (c) training: the same losses as .bin/.idx, blends of both kinds ----


def _losses(log: Path) -> list[float]:
    records = train_records(log)
    assert sorted(records) == list(range(1, 11))
    return [records[i]["lm_loss"] for i in range(1, 11)]


def test_pretrain_on_parquet_has_the_indexed_losses(corpus, tmp_path):
    """10 iterations from the Spark directory and from .bin/.idx: bit-identical losses; and a blend
    of the directory and a prefix, whose samples are those of the same blend of the two prefixes.
    The three single-process runs go side by side (one thread each)."""
    base = MODEL + TRAIN + ["--train-iters", "10"]
    runs = {"pq": [corpus.spark], "bin": [corpus.prefix], "blend": ["0.7", corpus.spark, "0.3", corpus.other]}
    procs = {}
    for name, data in runs.items():
        args = base + data_args(corpus.prefix, tmp_path / name) + ["--log-jsonl", str(tmp_path / f"{name}.jsonl")]
        args[args.index("--data-path") + 1: args.index("--data-path") + 2] = data
        procs[name] = subprocess.Popen([sys.executable, str(ROOT / "pretrain_gpt.py"), *args], text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} (seed {corpus.seed}):\n{out[-4000:]}"
    parquet, indexed, blend = (_losses(tmp_path / f"{name}.jsonl") for name in runs)
    assert parquet == indexed, f"seed {corpus.seed}: {parquet} vs {indexed}"
    assert parquet[-1] < parquet[0]
    reference = build_gpt_datasets(["0.7", corpus.prefix, "0.3", corpus.other], "98,2,0", 16, [80, 0, 0], seed=4321)[0]
    got = build_gpt_datasets(["0.7", corpus.spark, "0.3", corpus.other], "98,2,0", 16, [80, 0, 0], seed=4321)[0]
    assert_same_datasets([got], [reference], corpus.seed)  # the blend trained on is the prefixes' one
    assert all(np.isfinite(blend)) and blend != parquet


# ---- (d) jllm's nested per-dataset folders ----


def test_nested_folders(corpus, tmp_path):
    """`root/wiki/...` and `root/code/2024/...`: the tree is one dataset (files in sorted path
    order), and each folder is a dataset of its own to blend."""
    rng = np.random.default_rng(corpus.seed + 1)
    wiki, code = make_docs(rng, 40), make_docs(rng, 55)
    root = tmp_path / "jllm"
    write_spark(root / "wiki", wiki, parts=2)
    write_spark(root / "code" / "2024", code, parts=3)
    write_spark(root / "_temporary" / "0", wiki[:5], parts=1)  # an unfinished job attempt: ignored
    (root / "README.txt").write_text("not data")
    tree = ParquetTokenDataset(str(root))
    assert [os.path.relpath(f, root).split(os.sep)[0] for f in tree.files] == ["code"] * 3 + ["wiki"] * 2
    reference = IndexedDataset(write_bin(str(tmp_path / "tree"), code + wiki))
    np.testing.assert_array_equal(tree.document_indices, reference.document_indices)
    assert [tree[i].tolist() for i in range(len(tree))] == [reference[i].tolist() for i in range(len(reference))]
    refs = [write_bin(str(tmp_path / "wiki"), wiki), write_bin(str(tmp_path / "code"), code)]
    assert_same_datasets(
        build_gpt_datasets(["0.5", str(root / "wiki"), "0.5", str(root / "code")], "90,10,0", 8, [40, 8, 0], 3),
        build_gpt_datasets(["0.5", refs[0], "0.5", refs[1]], "90,10,0", 8, [40, 8, 0], 3), corpus.seed)


# ---- (e) preprocess_data.py --input DIR ----


def _preprocess_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", ROOT / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    import inspect

    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path_factory.mktemp("sp") / "bpe")
    lines = [line for line in inspect.getsource(shutil).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=300,
                                   model_type="bpe", minloglevel=2, num_threads=1)
    return prefix + ".model"


def test_preprocess_directory_of_text_parquet(sp_model, tmp_path):
    import inspect

    source = inspect.getsource(shutil)
    texts = [source[i:i + 400] for i in range(0, 16000, 400)] + ["", "ünïcode 日本語", "x"]
    directory = tmp_path / "text"
    directory.mkdir()
    bounds = [0, 9, 9, 25, len(texts)]  # one file with no rows
    for p in range(4):
        table = pa.table({"text": pa.array(texts[bounds[p]:bounds[p + 1]], pa.string()),
                          "n": pa.array(range(bounds[p], bounds[p + 1]), pa.int64())})
        name = f"part-{p:05d}-0b9e-c000.snappy.parquet"
        pq.write_table(table, directory / name, compression="snappy", row_group_size=4)
        (directory / f".{name}.crc").write_bytes(b"c")
    (directory / "_SUCCESS").write_bytes(b"")
    pq.write_table(pa.table({"text": texts}), tmp_path / "all.parquet")
    tool = _preprocess_tool()
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
              "--no-progress-bar"]
    tool.main(["--input", str(tmp_path / "all.parquet"), "--output-prefix", str(tmp_path / "file"), *common])
    for workers in ("1", "2"):
        tool.main(["--input", str(directory), "--output-prefix", str(tmp_path / f"dir{workers}"),
                   "--workers", workers, "--dataset-impl", "mmap", *common])
    for ext in (".bin", ".idx"):
        want = (tmp_path / f"file_text_document{ext}").read_bytes()
        for workers in ("1", "2"):
            assert (tmp_path / f"dir{workers}_text_document{ext}").read_bytes() == want, (workers, ext)
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ds = IndexedDataset(str(tmp_path / "dir2_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()] for t in texts if sp.encode(t)]


def test_preprocess_bad_inputs(sp_model, tmp_path, capsys):
    tool = _preprocess_tool()
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    cases = [
        (["--input", str(empty)], "no parquet files in this directory"),
        (["--input", str(tmp_path / "d"), "--dataset-impl", "lazy"], "--dataset-impl lazy: only mmap"),
        (["--input", str(tmp_path / "d"), "--json-keys", "body"], "has no column 'body'"),
    ]
    write_spark(tmp_path / "d", [[1, 2], [3]], parts=2)
    for flags, message in cases:
        with pytest.raises(SystemExit) as info:
            tool.main([*flags, "--output-prefix", str(tmp_path / "out"), *common])
        assert message in str(info.value) and "\n" not in str(info.value), info.value
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]


# ---- (f) bad input when training ----


def test_bad_directories_are_one_line_errors(corpus, tmp_path, monkeypatch):
    def fails(path: str, message: str, column: str | None = None, vocab: int | None = None) -> None:
        with pytest.raises(ValueError) as info:
            build_gpt_datasets([path], "1,0,0", 8, [10, 0, 0], 1, parquet_column=column, vocab_size=vocab)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    (empty / "._SUCCESS.crc").write_bytes(b"")
    fails(str(empty), "no parquet files in this directory")
    fails(corpus.spark, "no column 'tokens' (columns: id: int64, input_ids: list<", column="tokens")
    fails(corpus.spark, "column 'source' is string, not a list of integer token ids", column="source")
    floats = write_spark(tmp_path / "floats", [[1.5, 2.0]], parts=1, value_type=pa.float32())
    fails(floats, "no column holds lists of integer token ids")
    fails(floats, ": float>, not a list of integer token ids", column="input_ids")
    two = write_spark(tmp_path / "two", [[1, 2]], parts=1, extra={"labels": pa.array([[2, 3]])})
    fails(two, "several columns hold lists of integers (input_ids, labels)")
    fails(corpus.spark, f"token id {VOCAB - 1} in column 'input_ids' is outside the model's vocabulary "
                        f"[0, {VOCAB - 1})", vocab=VOCAB - 1)
    fails(write_spark(tmp_path / "negative", [[1, -4, 2]], parts=1), "negative token id -4")
    fails(write_spark(tmp_path / "blank", [[], []], parts=1), "holds no tokens")
    assert build_gpt_datasets([two], "1,0,0", 8, [4, 0, 0], 1, parquet_column="labels")[0][0]["tokens"][:2].tolist() == [2, 3]
    # from the footers' statistics, before any heavy work; without statistics, when opened
    with pytest.raises(ValueError, match=r"token id 127 in column 'input_ids' is outside the model's vocabulary"):
        check_parquet_dir(corpus.spark, None, VOCAB - 1)
    blind = write_spark(tmp_path / "blind", [[1, 2], [3, 40]], parts=1, write_statistics=False)
    check_parquet_dir(blind, None, 10)
    fails(blind, "token id 40 in column 'input_ids' is outside the model's vocabulary [0, 10)", vocab=10)
    # the trainer checks with the model's padded vocabulary and the column: one line, before the
    # process group and the model exist; and again when the datasets are built
    from megafast.arguments import parse_args, validate_args
    from megafast.training import trainer

    argv = MODEL + TRAIN + ["--train-iters", "2", "--data-path", corpus.spark, "--tokenizer-type", "NullTokenizer",
                            "--vocab-size", "100", "--split", "1,0,0"]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    message = r"^error: .*token id 127 in column 'input_ids' is outside the model's vocabulary \[0, 100\)"
    with pytest.raises(SystemExit, match=message):
        trainer.setup(argv)
    assert not torch.distributed.is_initialized()
    prefix_argv = argv[:]
    prefix_argv[prefix_argv.index(corpus.spark)] = corpus.prefix
    with pytest.raises(SystemExit, match=r"^error: --parquet-column ids names .* no data path is a directory"):
        trainer.setup(prefix_argv + ["--parquet-column", "ids"])
    args = parse_args(argv)
    validate_args(args, world_size=1, vocab_size=100)
    with pytest.raises(SystemExit, match=message):
        trainer._build_datasets(args, 100, 99, types.SimpleNamespace(world_size=1))
    # without pyarrow: one line naming the extra
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    fails(corpus.spark, "needs the pyarrow package: pip install 'megafast[data]'")
