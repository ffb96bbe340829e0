"""tools/preprocess_data.py and megafast.data.preprocess: formats, exactness, bad input.

Every output is read back through IndexedDataset and compared with `sp.encode(doc) + [eos]` per
non-empty document; one small case is compared byte for byte with an .idx built by hand.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import inspect
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from megafast.data.indexed_dataset import IndexedDataset
from megafast.data.preprocess import PreprocessConfig, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = inspect.getsource(argparse)
DOCS = [SOURCE[i:i + 700] for i in range(0, 14000, 700)] + [
    "", "   ", "naïve café ünïcode 日本語 😀", "tabs\tand\nnewlines\r\n", "x", "a" * 300]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("sp") / "bpe")
    lines = [line for line in SOURCE.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix,
                                   vocab_size=500, model_type="bpe", minloglevel=2, num_threads=1)
    return prefix + ".model"


def write_jsonl(path, docs, key="text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "other": 1}) + "\n")
    return str(path)


def run(sp_model, input_path, prefix, **options):
    options.setdefault("append_eod", True)
    return preprocess(PreprocessConfig(input=str(input_path), output_prefix=str(prefix),
                                       tokenizer_type="SentencePieceTokenizer",
                                       tokenizer_model=sp_model, progress=False, **options))


def check_dataset(prefix: str, docs: list[str], sp_model: str, eod: bool = True) -> None:
    """The dataset holds sp.encode(doc) (+ EOD) per non-empty doc; empty docs have no sequence."""
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    expected = [sp.encode(d) + ([sp.eos_id()] if eod else []) for d in docs if sp.encode(d)]
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    counts = np.cumsum([0] + [1 if sp.encode(d) else 0 for d in docs])
    assert ds.document_indices.tolist() == counts.tolist()


def files_of(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_jsonl_one_and_two_workers(sp_model, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", DOCS)
    stats = run(sp_model, data, tmp_path / "one", workers=1)
    check_dataset(str(tmp_path / "one_text_document"), DOCS, sp_model)
    assert stats.documents == len(DOCS) and stats.bad_lines == 0
    assert stats.empty_documents == {"text": 2}
    run(sp_model, data, tmp_path / "two", workers=2, chunk_bytes=2000)
    for ext in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{ext}").read_bytes()
        assert one == (tmp_path / f"two_text_document{ext}").read_bytes()
    run(sp_model, data, tmp_path / "plain", word_cache=False, chunk_bytes=50)
    assert (tmp_path / "plain_text_document.bin").read_bytes() == (
        tmp_path / "one_text_document.bin").read_bytes()
    assert not [f for f in files_of(tmp_path) if f.endswith(".tmp")]


def test_idx_bytes_match_the_format_table(sp_model, tmp_path):
    docs = ["hello world", "", "abc def"]
    run(sp_model, write_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "small")
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    first, second = sp.encode(docs[0]) + [sp.eos_id()], sp.encode(docs[2]) + [sp.eos_id()]
    lengths = [len(first), len(second)]
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                + struct.pack("<Q", 2) + struct.pack("<Q", 4)
                + struct.pack("<2i", *lengths) + struct.pack("<2q", 0, 2 * lengths[0])
                + struct.pack("<4q", 0, 1, 1, 2))
    assert (tmp_path / "small_text_document.idx").read_bytes() == expected
    assert (tmp_path / "small_text_document.bin").read_bytes() == np.array(
        first + second, dtype="<u2").tobytes()


def test_gzip_and_text_inputs(sp_model, tmp_path):
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"text": doc}) + "\n")
    run(sp_model, tmp_path / "in.jsonl.gz", tmp_path / "gz", chunk_bytes=300)
    check_dataset(str(tmp_path / "gz_text_document"), DOCS, sp_model)

    text = ("first document\nline two\n\n\n  \nsecond one\r\nwith CRLF\r\n\r\n"
            "third\n  indented line\n\t\nlast line without newline")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    expected = ["first document\nline two", "second one\nwith CRLF", "third\n  indented line",
                "last line without newline"]
    check_dataset_of = None
    for chunk_bytes in [1 << 20, *range(1, len(text) + 1)]:  # every cut of the input
        prefix = tmp_path / f"txt{chunk_bytes}"
        stats = run(sp_model, tmp_path / "in.txt", prefix, chunk_bytes=chunk_bytes)
        assert stats.documents == 4, chunk_bytes
        if check_dataset_of is None:
            check_dataset(f"{prefix}_text_document", expected, sp_model)
            check_dataset_of = (tmp_path / f"txt{chunk_bytes}_text_document.bin").read_bytes()
        assert (tmp_path / f"{prefix}_text_document.bin").read_bytes() == check_dataset_of


def test_parquet_text_and_token_id_columns(sp_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["hello world", None, "", "more text here", "last"]
    ids = [[5, 6, 7], [1], [], None, [9]]
    table = pa.table({"text": pa.array(texts, pa.string()),
                      "ids": pa.array(ids, pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    stats = run(sp_model, tmp_path / "in.parquet", tmp_path / "pq", json_keys=["text", "ids"],
                chunk_bytes=16)
    assert stats.documents == 3 and stats.bad_lines == 2
    assert stats.bad_examples == [(2, "null value"), (4, "null value")]
    assert "row 2: null value" in capsys.readouterr().err
    check_dataset(str(tmp_path / "pq_text_document"), ["hello world", "", "last"], sp_model)
    tokens = IndexedDataset(str(tmp_path / "pq_ids_document"))  # written as-is, no EOD
    assert [tokens[i].tolist() for i in range(len(tokens))] == [[5, 6, 7], [9]]
    assert tokens.document_indices.tolist() == [0, 1, 1, 2]


def test_failure_midway_removes_temporaries(sp_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a b", "c d", "e f", "g h"], "ids": [[1], [2], [3], [70000]]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1)
    with pytest.raises(ValueError, match=r"row 4 column 'ids': token id 70000 is outside the "
                                         r"vocabulary \[0, 500\)"):
        run(sp_model, tmp_path / "in.parquet", tmp_path / "out", json_keys=["text", "ids"],
            chunk_bytes=1)
    assert files_of(tmp_path) == ["in.parquet"]


def test_multiple_keys_and_bad_lines(sp_model, tmp_path, capsys):
    lines = [json.dumps({"text": "good one", "title": "T1"}), "{not json",
             json.dumps({"text": "good two", "title": ""}), json.dumps({"title": "no text"})]
    raw = "\n".join(lines).encode() + b'\n{"text": "bad \xff byte", "title": "x"}\n'
    raw += b'{"text": 5, "title": "x"}\n' + b'{"text": "\\ud800", "title": "x"}\n\n'
    raw += json.dumps({"text": "good three", "title": "T3"}).encode() + b"\n"
    (tmp_path / "in.jsonl").write_bytes(raw)
    stats = run(sp_model, tmp_path / "in.jsonl", tmp_path / "multi", json_keys=["text", "title"])
    assert stats.documents == 3 and stats.bad_lines == 5
    assert [n for n, _ in stats.bad_examples] == [2, 4, 5, 6, 7]
    reasons = [r for _, r in stats.bad_examples]
    assert reasons[0].startswith("invalid JSON") and reasons[1] == "missing key 'text'"
    assert reasons[2] == "not valid UTF-8" and reasons[3] == "key 'text' is a int, not a string"
    assert "lone surrogate" in reasons[4]
    err = capsys.readouterr().err
    assert "skipped 5 bad input lines (line 2: invalid JSON" in err
    check_dataset(str(tmp_path / "multi_text_document"), ["good one", "good two", "good three"],
                  sp_model)
    check_dataset(str(tmp_path / "multi_title_document"), ["T1", "", "T3"], sp_model)


def test_strict_and_user_errors_leave_no_output(sp_model, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"in.jsonl line 2: invalid JSON .*--strict"):
        run(sp_model, tmp_path / "in.jsonl", tmp_path / "s", strict=True)
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'Foo'"):
        preprocess(PreprocessConfig(input=str(tmp_path / "in.jsonl"), output_prefix="x",
                                    tokenizer_type="Foo"))
    with pytest.raises(ValueError, match="nope.model: file not found"):
        run(str(tmp_path / "nope.model"), tmp_path / "in.jsonl", tmp_path / "m")
    with pytest.raises(ValueError, match="cannot tell the format"):
        PreprocessConfig(input=sp_model, output_prefix="x", tokenizer_type="NullTokenizer")
    assert files_of(tmp_path) == ["in.jsonl"]


def test_null_tokenizer_rejected_documents(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ["1 2 3", "4 x 5", "", "7"])
    stats = preprocess(PreprocessConfig(input=str(tmp_path / "in.jsonl"),
                                        output_prefix=str(tmp_path / "null"),
                                        tokenizer_type="NullTokenizer", vocab_size=10,
                                        append_eod=True, progress=False))
    assert stats.bad_lines == 1 and stats.bad_examples[0][0] == 2
    assert "rejected by the tokenizer" in stats.bad_examples[0][1]
    ds = IndexedDataset(str(tmp_path / "null_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, 9], [7, 9]]  # EOD = V - 1
    assert ds.document_indices.tolist() == [0, 1, 1, 2]


def test_command_line(sp_model, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", DOCS[:8] + ["", "end"])
    tool = os.path.join(ROOT, "tools", "preprocess_data.py")
    ok = subprocess.run([sys.executable, tool, "--input", data, "--output-prefix",
                         str(tmp_path / "cli"), "--tokenizer-type", "SentencePieceTokenizer",
                         "--tokenizer-model", sp_model, "--append-eod", "--workers", "2",
                         "--json-keys", "text"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stderr and "docs/s" in ok.stderr
    check_dataset(str(tmp_path / "cli_text_document"), DOCS[:8] + ["", "end"], sp_model)

    with open(data, "ab") as f:
        f.write(b'{"text": "\xff"}\n')
    bad = subprocess.run([sys.executable, tool, "--input", data, "--output-prefix",
                          str(tmp_path / "strict"), "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", sp_model, "--strict", "--workers", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "line 11: not valid UTF-8" in last
    assert not [f for f in files_of(tmp_path) if f.startswith("strict")]


def test_demo_corpus_tool_is_deterministic(sp_model, tmp_path):
    path = os.path.join(ROOT, "tools", "make_demo_corpus.py")
    spec = importlib.util.spec_from_file_location("make_demo_corpus", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    docs, size = tool.make_demo_corpus(str(tmp_path / "a.jsonl"), size_mb=0.05, progress=False)
    tool.make_demo_corpus(str(tmp_path / "b.jsonl"), size_mb=0.05, progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert size >= 50_000 and docs == len((tmp_path / "a.jsonl").read_text().splitlines())
    texts = [json.loads(line)["text"] for line in open(tmp_path / "a.jsonl", encoding="utf-8")]
    assert all(texts) and files_of(tmp_path) == ["a.jsonl", "b.jsonl"]
    run(sp_model, tmp_path / "a.jsonl", tmp_path / "demo", workers=2)
    check_dataset(str(tmp_path / "demo_text_document"), texts, sp_model)
