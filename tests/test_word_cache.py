"""The word-cached SentencePiece encoder gives exactly `sp.encode` ids, across model options.

Tiny models (a few hundred pieces) are trained on standard-library source plus random unicode
text; each is then checked on fresh random text built to stress the normalizer and the word
splitting: unicode words, digits, runs of spaces, tabs, newlines, control characters, literal
"▁", full-width and combining characters, emoji, empty and whitespace-only documents.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from megafast.data.tokenizer import SentencePieceTokenizer
from megafast.data.word_cache import (
    WS,
    BatchEncoder,
    WordCacheEncoder,
    analyse_model,
    ascii_charsmap_rules,
    make_encoder,
    word_cache_support,
)

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
    "äöüßéèêçñøåł", "αβγδεζηθλμπσω", "абвгдежзиклмнопрст", "日本語中文字漢", "ＡＢＣ１２３",
    "ﬁﬂ…™①", "e\u0301a\u0308", "😀🚀✨", ".,;:!?()[]{}<>=+-*/\\'\"#@$%^&|~`_",
]
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \t ", "\r\n", "\u3000", "\u00a0", WS, "\x0b",
           "\x01", "\x00", "\x7f"]


def random_text(rng: random.Random, words: int) -> str:
    """Random unicode words joined by random whitespace (and some control characters)."""
    out = []
    for _ in range(words):
        alphabet = rng.choice(_ALPHABETS) if rng.random() < 0.5 else _ALPHABETS[0]
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))))
        out.append(rng.choice(_SPACES) if rng.random() < 0.3 else " ")
    return "".join(out)


def random_docs(seed: int, n: int = 80) -> list[str]:
    rng = random.Random(seed)
    docs = [random_text(rng, rng.randint(0, 60)) for _ in range(n)]
    docs += ["", " ", "\n\t  \n", "x", WS, WS + WS + "a", " lead", "trail ", "a  b", "1234567",
             "\x00", "\x01abc", "tab\there", "ｆｕｌｌ　ｗｉｄｔｈ", "<sep>x<sep>", "a<sep> b",
             textwrap.dedent(inspect.getsource(random_text))]
    return docs


def train(tmp_path, name: str, **options) -> str:
    """A tiny SentencePiece model trained on stdlib source lines plus random text."""
    rng = random.Random(1234)
    lines = [line for line in inspect.getsource(argparse).splitlines() if line.strip()][:1500]
    lines += [random_text(rng, 12).replace("\n", " ") for _ in range(300)]
    prefix = str(tmp_path / name)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=options.pop("vocab_size", 500),
        hard_vocab_limit=False, minloglevel=2, num_threads=1, **options)
    return prefix + ".model"


def check_exact(model: str, docs: list[str], eod: int | None = None) -> None:
    """The encoder's bytes equal sp.encode(doc) (+ eod) per document."""
    sp = spm.SentencePieceProcessor(model_file=model)
    encoder = WordCacheEncoder(model, np.dtype(np.uint16), eod)
    for start in range(0, len(docs), 25):  # several chunks: the cache is reused between them
        batch = docs[start:start + 25]
        blob, lengths = encoder.encode(batch)
        tokens = np.frombuffer(blob, np.uint16).tolist()
        offset = 0
        for doc, n in zip(batch, lengths):
            expected = sp.encode(doc)
            if expected and eod is not None:
                expected = expected + [eod]
            assert tokens[offset:offset + n] == expected, f"{model}: {doc!r}"
            offset += n
        assert offset == len(tokens)


BPE_OPTIONS = {
    "default": {},
    "byte_fallback": {"byte_fallback": True},
    "split_digits": {"split_digits": True},
    "user_defined_symbols": {"user_defined_symbols": ["<sep>", "ab", "foo_bar"]},
    "whitespace_suffix": {"treat_whitespace_as_suffix": True},
    "no_dummy_prefix": {"add_dummy_prefix": False},
    "suffix_no_dummy_prefix": {"treat_whitespace_as_suffix": True, "add_dummy_prefix": False},
    "identity_keep_whitespace": {"normalization_rule_name": "identity",
                                 "remove_extra_whitespaces": False},
    "nfkc_cf": {"normalization_rule_name": "nfkc_cf"},
    "no_unicode_script_split": {"split_by_unicode_script": False, "split_by_number": False,
                                "byte_fallback": True, "character_coverage": 0.98},
}


@pytest.mark.parametrize("option", sorted(BPE_OPTIONS))
def test_bpe_word_cache_is_exact(tmp_path, option):
    model = train(tmp_path, option, model_type="bpe", **BPE_OPTIONS[option])
    support = word_cache_support(model)
    assert support.exact, support.reason
    seed = sorted(BPE_OPTIONS).index(option)
    check_exact(model, random_docs(100 + seed), eod=2)
    check_exact(model, random_docs(200 + seed)[:30])  # no EOD


def test_small_cache_limits_stay_exact(tmp_path):
    """Eviction (cache emptied when full) and uncached long words do not change the ids."""
    model = train(tmp_path, "small", model_type="bpe", byte_fallback=True)
    sp = spm.SentencePieceProcessor(model_file=model)
    encoder = WordCacheEncoder(model, np.dtype(np.int32), None, max_words=20, max_word_chars=3)
    docs = random_docs(7)
    for _ in range(2):
        blob, lengths = encoder.encode(docs)
        assert np.frombuffer(blob, np.int32).tolist() == [i for d in docs for i in sp.encode(d)]
        assert lengths == [len(sp.encode(d)) for d in docs]
    assert len(encoder._cache) <= 20 + len(set(" ".join(docs).split()))


def test_fast_ascii_path_equals_normalizer(tmp_path):
    """For ASCII text the str.split() shortcut yields the keys of the exact normalizer path."""
    model = train(tmp_path, "fast", model_type="bpe")
    encoder = WordCacheEncoder(model, np.dtype(np.uint16))
    assert encoder.support.ascii_fast_path
    rng = random.Random(5)
    chars = [chr(c) for c in range(128)] + [" "] * 20 + ["ab", "x1"] * 10
    docs = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    slow = WordCacheEncoder(model, np.dtype(np.uint16))
    slow._fast = False
    for doc in docs:  # the slow path may add the empty bare word "▁", which has no tokens
        fast_keys = [k for k in encoder.keys(doc) if k != WS]
        assert fast_keys == [k for k in slow.keys(doc) if k != WS], repr(doc)


def test_ascii_charsmap_rules_of_nmt_nfkc(tmp_path):
    model = train(tmp_path, "rules", model_type="bpe")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(model, "rb").read())
    rules = ascii_charsmap_rules(proto.normalizer_spec.precompiled_charsmap)
    assert rules[b"\t"] == b" " and rules[b"\n"] == b" " and rules[b"\x01"] == b""
    assert b"a" not in rules and b" " not in rules
    sp = spm.SentencePieceProcessor(model_file=model)
    for key, value in rules.items():  # the decoded trie agrees with the normalizer itself
        assert sp.normalize("a" + key.decode() + "b") == WS + "a" + value.decode() + "b" or (
            value == b" " and sp.normalize("a" + key.decode() + "b") == WS + "a" + WS + "b")


def test_unigram_and_whitespace_pieces_fall_back(tmp_path):
    """Models where word-by-word encoding is not provably exact use the plain batch encoder."""
    unigram = train(tmp_path, "unigram", model_type="unigram")
    support = word_cache_support(unigram)
    assert not support.exact and "unigram" in support.reason
    tokenizer = SentencePieceTokenizer(unigram)
    assert isinstance(make_encoder(tokenizer, np.dtype(np.uint16)), BatchEncoder)
    with pytest.raises(ValueError, match="not exact"):
        WordCacheEncoder(unigram, np.dtype(np.uint16))

    spaces = train(tmp_path, "spaces", model_type="bpe", remove_extra_whitespaces=False,
                   allow_whitespace_only_pieces=True, normalization_rule_name="identity")
    support = word_cache_support(spaces)
    assert not support.exact and "inner ▁" in support.reason
    spaced_symbol = train(tmp_path, "spaced", model_type="bpe", user_defined_symbols=["a b"])
    assert "contains a space" in word_cache_support(spaced_symbol).reason
    encoder = make_encoder(SentencePieceTokenizer(spaces), np.dtype(np.uint16), eod=2)
    assert isinstance(encoder, BatchEncoder)
    docs = random_docs(3)[:20]
    blob, lengths = encoder.encode(docs)
    sp = spm.SentencePieceProcessor(model_file=spaces)
    expected = [i for d in docs for i in (sp.encode(d) + [2] if sp.encode(d) else [])]
    assert np.frombuffer(blob, np.uint16).tolist() == expected


def test_bpe_model_is_used_with_word_cache(tmp_path):
    model = train(tmp_path, "bpe", model_type="bpe")
    encoder = make_encoder(SentencePieceTokenizer(model), np.dtype(np.uint16), eod=2)
    assert isinstance(encoder, WordCacheEncoder)
    assert isinstance(make_encoder(SentencePieceTokenizer(model), np.dtype(np.uint16),
                                   word_cache=False), BatchEncoder)
    assert analyse_model(open(model, "rb").read()).exact
    # A json round trip of the stress documents (what preprocessing feeds) stays exact too.
    check_exact(model, [json.loads(json.dumps(d)) for d in random_docs(11)], eod=2)


def test_missing_protobuf_warns_once_and_stays_exact(tmp_path):
    """Without protobuf the word cache cannot read the model: preprocessing says so once (not
    once per worker), names the fix, and writes what SentencePiece alone would."""
    import os
    import subprocess
    import sys

    model = train(tmp_path, "bpe", model_type="bpe")
    corpus = tmp_path / "corpus.jsonl"
    docs = random_docs(5, 200)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        import sys
        sys.modules["sentencepiece.sentencepiece_model_pb2"] = None  # what a missing protobuf does
        from megafast.data.preprocess import PreprocessConfig, preprocess
        preprocess(PreprocessConfig(input=sys.argv[1], output_prefix=sys.argv[2], workers=2,
                                    tokenizer_type="SentencePieceTokenizer", tokenizer_model=sys.argv[3],
                                    append_eod=True, progress=False, chunk_bytes=4096))
    """)
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", script, str(corpus), out, model], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the protobuf package is missing") == 1, proc.stderr
    assert "pip install protobuf" in proc.stderr
    sp = spm.SentencePieceProcessor(model_file=model)
    expected = [i for d in docs for i in (sp.encode(d) + [sp.eos_id()] if sp.encode(d) else [])]
    assert np.fromfile(out + "_text_document.bin", np.uint16).tolist() == expected
