"""The four tokenizer types and `build_tokenizer`'s errors.

Models are trained here on local text: a tiny SentencePiece BPE, and a tiny byte-level BPE
(vocab.json + merges.txt, also saved as tokenizer.json and as a transformers directory). GPT-2
BPE results are checked against a small reference implementation of OpenAI's algorithm.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os

import pytest
import regex
import sentencepiece as spm

from megafast.data.tokenizer import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

CORPUS = [line for line in inspect.getsource(argparse).splitlines() if line.strip()][:1200]
SAMPLES = ["Hello world!", "", "  leading and   inner  spaces\n\tand a tab", "naïve café — ünïcödé",
           "x = {'a': [1, 2, 3]}  # comment", "12345 678.9", "emoji 😀 and 日本語",
           "ends with <|endoftext|> marker", "'s 're 've it's"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("sp") / "bpe")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix,
                                   vocab_size=400, model_type="bpe", minloglevel=2,
                                   num_threads=1)
    return prefix + ".model"


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> dict[str, str]:
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS + SAMPLES, vocab_size=600, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    vocab, merges = trainer.save_model(str(folder))
    trainer.save(str(folder / "tokenizer.json"))
    return {"vocab": vocab, "merges": merges, "json": str(folder / "tokenizer.json")}


# ---- a reference GPT-2 BPE (OpenAI's algorithm), to check GPT2BPETokenizer against ----

_GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def reference_gpt2(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    alphabet = _byte_alphabet()
    ids = []
    for chunk in _GPT2_PATTERN.findall(text):
        word = [alphabet[b] for b in chunk.encode("utf-8")]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[piece] for piece in word)
    return ids


def test_sentencepiece(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 400 and tok.eod == sp.eos_id() == 2
    assert [tok.tokenize(s) for s in SAMPLES] == tok.tokenize_batch(SAMPLES)
    assert tok.tokenize(SAMPLES[0]) == sp.encode(SAMPLES[0])
    assert tok.detokenize(tok.tokenize("Hello world!")) == "Hello world!"
    alias = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert alias.tokenize(SAMPLES[4]) == tok.tokenize(SAMPLES[4])


def test_gpt2_bpe_matches_reference(gpt2_files):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files["vocab"],
                          merge_file=gpt2_files["merges"])
    assert isinstance(tok, GPT2BPETokenizer)
    vocab = json.load(open(gpt2_files["vocab"], encoding="utf-8"))
    merges = [tuple(line.split()) for line in open(gpt2_files["merges"], encoding="utf-8")
              if line.strip() and not line.startswith("#version")]
    ranks = {pair: i for i, pair in enumerate(merges)}
    assert tok.vocab_size == len(vocab)
    assert tok.eod == vocab["<|endoftext|>"]
    texts = SAMPLES + CORPUS[:60]
    assert tok.tokenize_batch(texts) == [reference_gpt2(t, vocab, ranks) for t in texts]
    # The end-of-text marker inside text is ordinary text, as in Megatron's GPT-2 BPE.
    assert tok.eod not in tok.tokenize("a <|endoftext|> b")
    assert tok.detokenize(tok.tokenize(SAMPLES[3])) == SAMPLES[3]


def test_huggingface_tokenizer_json_and_directory(gpt2_files, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from_json = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=gpt2_files["json"])
    assert isinstance(from_json, HuggingFaceTokenizer)
    reference = Tokenizer.from_file(gpt2_files["json"])
    assert from_json.tokenize_batch(SAMPLES) == [
        reference.encode(s, add_special_tokens=False).ids for s in SAMPLES]
    assert from_json.eod == reference.token_to_id("<|endoftext|>")
    assert from_json.vocab_size == reference.get_vocab_size(with_added_tokens=True)

    fast = PreTrainedTokenizerFast(tokenizer_file=gpt2_files["json"], eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path / "hf"))
    from_dir = HuggingFaceTokenizer(str(tmp_path / "hf"))
    assert from_dir.eod == fast.eos_token_id and from_dir.vocab_size == len(fast)
    assert from_dir.tokenize_batch(SAMPLES) == from_json.tokenize_batch(SAMPLES)
    assert from_dir.tokenize(SAMPLES[4]) == from_json.tokenize(SAMPLES[4])
    assert from_dir.detokenize(from_dir.tokenize("Hello world!")) == "Hello world!"


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 100 and tok.eod == 99  # megatron-core 0.19: eod = vocab_size - 1
    assert tok.tokenize("1 2  3\n99") == [1, 2, 3, 99]
    assert tok.tokenize("") == []
    assert tok.detokenize([4, 5]) == "4 5"
    with pytest.raises(ValueError, match="'x1' is not an integer"):
        tok.tokenize("1 x1 2")
    with pytest.raises(ValueError, match="token id 500 is outside"):
        tok.tokenize("1 500")


def test_build_tokenizer_errors(sp_model, tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'BertTokenizer'; choose one of"):
        build_tokenizer("BertTokenizer")
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=f"--tokenizer-model {missing}: file not found"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=missing)
    not_a_model = tmp_path / "bad.model"
    not_a_model.write_text("hello")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(not_a_model))
    with pytest.raises(ValueError, match="needs --vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="v.json")
    with pytest.raises(ValueError, match="--merge-file .*file not found"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=sp_model, merge_file=missing)
    with pytest.raises(ValueError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="not found; pass a local tokenizer"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError) as info:
        build_tokenizer("x")
    assert "\n" not in str(info.value)  # one line
    assert os.listdir(tmp_path) == ["bad.model"]


def _load_tool(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tokenizer_tool(tmp_path):
    tool = _load_tool("train_tokenizer")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": "\n".join(CORPUS[i:i + 20])}) + "\n"
                            for i in range(0, len(CORPUS), 20)) + "{broken\n")
    with pytest.raises(ValueError, match=r"^--vocab-size 300 is too small: .* need \d+; raise"):
        tool.train_sentencepiece([str(data)], str(tmp_path / "small"), 300, byte_fallback=True)
    model = tool.train_sentencepiece([str(data)], str(tmp_path / "out" / "m"), 700,
                                     model_type="unigram", byte_fallback=True, split_digits=True,
                                     user_defined_symbols=["<sep>"], input_sentence_size=500)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.vocab_size() == 700 and sp.piece_to_id("<sep>") > 2
    assert sorted(os.listdir(tmp_path / "out")) == ["m.model", "m.vocab"]
    with pytest.raises(ValueError, match=r"^--vocab-size 100000 is too large for this corpus: "
                                         r"SentencePiece can learn at most \d+ pieces"):
        tool.train_sentencepiece([str(data)], str(tmp_path / "big"), 100000)
    with pytest.raises(ValueError, match="file not found"):
        tool.train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "x"), 300)
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".train", "big", "x", "small"))]


@pytest.mark.parametrize("vocab_size", [2, 100, 128256])
def test_null_tokenizer_is_megatron_cores(vocab_size):
    """megatron-core 0.19's NullTokenizer, built as Megatron-LM's build_tokenizer builds it: vocabulary
    V, EOD V - 1, the same ids both ways."""
    pytest.importorskip("megatron.core.tokenizers")
    from megatron.core.tokenizers import MegatronTokenizer

    theirs = MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=vocab_size)
    ours = build_tokenizer("NullTokenizer", vocab_size=vocab_size)
    assert (ours.vocab_size, ours.eod) == (theirs.vocab_size, theirs.eod) == (vocab_size, vocab_size - 1)
    text = " ".join(str(i) for i in (0, vocab_size - 1, vocab_size // 2, 1 % vocab_size))
    assert ours.tokenize(text) == theirs.tokenize(text)
    ids = [vocab_size - 1, 0, vocab_size // 3]
    assert ours.detokenize(ids) == theirs.detokenize(ids)
    with pytest.raises(ValueError, match=f"token id {vocab_size} is outside"):
        ours.tokenize(f"0 {vocab_size}")


def test_null_tokenizer_eod_id_and_checkpoint_args_of_both_conventions():
    from megafast.checkpoint.args import tokenizer_from_args

    tok = build_tokenizer("NullTokenizer", vocab_size=100, null_eod_id=0)  # --null-tokenizer-eod-id 0
    assert (tok.vocab_size, tok.eod) == (100, 0)
    with pytest.raises(ValueError, match="--null-tokenizer-eod-id 100 is outside"):
        build_tokenizer("NullTokenizer", vocab_size=100, null_eod_id=100)
    # args saved since megatron-core 0.19's convention hold null_tokenizer_eod_id (None = V - 1)
    new = tokenizer_from_args({"tokenizer_type": "NullTokenizer", "vocab_size": 100, "null_tokenizer_eod_id": None})
    assert (new.vocab_size, new.eod) == (100, 99)
    # older args (no such entry) meant V + 1 ids with EOD V: the same model as before
    old = tokenizer_from_args({"tokenizer_type": "NullTokenizer", "vocab_size": 100})
    assert (old.vocab_size, old.eod) == (101, 100)
