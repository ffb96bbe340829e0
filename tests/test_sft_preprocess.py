"""tools/preprocess_data.py --dataset-type sft: for every input format and template, the tokens with
loss mask 1 decode to exactly the answers plus EOS; bad records are counted and reported with
their line numbers; the truncation policy is applied and counted; workers do not change the output."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megafast.data.chat_template import ChatTemplate, parse_role_markers
from megafast.data.indexed_dataset import IndexedDataset
from megafast.data.sft_format import BadRecord, parse_record, read_info, sft_paths
from megafast.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft
from megafast.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [line for line in inspect.getsource(argparse).splitlines() if line.strip()][:800]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# (record, its answers): one of each input format of the issue
RECORDS = [
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                   {"role": "assistant", "content": " Six, of course.\n"}], "task": "math"},
     ["It is 4.", " Six, of course.\n"]),
    ({"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello there"}],
      "data_name": "chat"}, ["hello there"]),
    ({"messages": [{"system": "You code."}, {"user": "a list?"}, {"assistant": "[1, 2]"}]}, ["[1, 2]"]),
    ([{"User": "top-level list"}, {"Assistant": "works too"}], ["works too"]),
    ({"instruction": "Translate to French", "input": "cat", "output": "chat", "task": "translate"}, ["chat"]),
    ({"instruction": "Say yes", "output": "yes"}, ["yes"]),
    ({"text": "def f(x):\n    return x\n", "task": "code"}, ["def f(x):\n    return x\n"]),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """HF tokenizer directories: EOS <|endoftext|> and EOS <|im_end|>, both with a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=500, min_frequency=2, special_tokens=SPECIAL, show_progress=False)
    trainer.save(str(folder / "tokenizer.json"))
    out = {}
    for eos in ("<|endoftext|>", "<|im_end|>"):
        fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=eos)
        fast.chat_template = TEMPLATE
        path = folder / eos.strip("<|>")
        fast.save_pretrained(str(path))
        out[eos] = str(path)
    return out


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def masked_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for token, learn in zip(ids.tolist(), mask.tolist()):
        if learn:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def run(tmp_path: Path, tokenizer: str, rows: list, name: str = "out", **options) -> tuple:
    config = SFTPreprocessConfig(input=write_jsonl(tmp_path / f"{name}.jsonl", rows), output_prefix=str(tmp_path / name),
                                 tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer, **options)
    stats = preprocess_sft(config)
    paths = sft_paths(str(tmp_path / f"{name}_text_document"))
    return stats, paths, IndexedDataset(paths.tokens), IndexedDataset(paths.loss_mask)


MARKERS = json.dumps({"user": ["### Question:\n", "\n"], "assistant": ["### Answer:\n", "\n\n"],
                      "system": ["", "\n"]})


@pytest.mark.parametrize("eos,options", [
    ("<|endoftext|>", {"chat_template": "default"}),
    ("<|endoftext|>", {"chat_template": "tokenizer"}),  # the template's <|im_end|> is not the EOS: inserted
    ("<|im_end|>", {"chat_template": "auto"}),  # the template's <|im_end|> is the EOS: taken as it
    ("<|endoftext|>", {"role_markers": MARKERS}),
])
def test_learned_tokens_are_the_answers_plus_eos(tokenizers, tmp_path, eos, options):
    stats, paths, tokens, masks = run(tmp_path, tokenizers[eos], [r for r, _ in RECORDS], **options)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizers[eos])
    assert stats.records == len(RECORDS) == len(tokens) and stats.bad_records == 0
    for i, (record, answers) in enumerate(RECORDS):
        runs = [tok.detokenize(r) for r in masked_runs(tokens[i], masks[i])]
        assert runs == [a + eos for a in answers], f"record {i}"
        assert tokens[i][masks[i].astype(bool)].tolist().count(tok.eod) == len(answers)
    if options.get("chat_template") == "default":  # the ChatML-like default, EOS ending each answer
        assert tok.detokenize(tokens[1]) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|endoftext|>\n")
    info = read_info(paths.tokens)
    assert info["tasks"] == ["math", "chat", "default", "translate", "code"]
    task_ids = IndexedDataset(paths.task_ids)
    assert [int(task_ids[i][0]) for i in range(len(RECORDS))] == [0, 1, 2, 2, 3, 2, 4]
    assert info["answer_tokens"] == stats.answer_tokens == sum(int(masks[i].sum()) for i in range(len(RECORDS)))


BAD = [
    (RECORDS[1][0], None),
    ({"messages": [{"content": "who am I"}, {"role": "assistant", "content": "x"}]}, "message 1 has no role"),
    ({"messages": [{"role": "wizard", "content": "hm"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "does not end with an answer"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no answer"),
    ("{not json", "invalid JSON"),
    ({"instruction": "do it"}, "without a string 'output'"),
    ({"instruction": "do it", "output": ""}, "empty answer"),
    ({"text": ""}, "non-empty string"),
    (17, "not a JSON object"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}, "no text content"),
    (RECORDS[4][0], None),
]


def test_bad_records_are_counted_and_reported_with_line_numbers(tokenizers, tmp_path):
    rows = [r for r, _ in BAD]
    stats, paths, tokens, _ = run(tmp_path, tokenizers["<|endoftext|>"], rows)
    expected = [(line, why) for line, (_, why) in enumerate(BAD, 1) if why is not None]
    assert stats.records == 2 == len(tokens)
    assert stats.bad_records == len(expected)
    assert [line for line, _ in stats.bad_examples] == [line for line, _ in expected]
    for (line, reason), (_, why) in zip(stats.bad_examples, expected):
        assert why in reason, f"line {line}: {reason!r} does not say {why!r}"
    info = read_info(paths.tokens)
    assert info["bad_records"] == len(expected) and [b[0] for b in info["bad_examples"]] == [e[0] for e in expected]

    # The command line reports them on stderr; strict mode stops at the first.
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--dataset-type", "sft", "--input",
           str(tmp_path / "out.jsonl"), "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type",
           "HuggingFaceTokenizer", "--tokenizer-model", tokenizers["<|endoftext|>"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {len(expected)} bad records (line 2: message 1 has no role; line 3: " in proc.stderr
    with pytest.raises(ValueError, match="out.jsonl line 2: message 1 has no role"):
        preprocess_sft(SFTPreprocessConfig(input=str(tmp_path / "out.jsonl"), output_prefix=str(tmp_path / "strict"),
                                           tokenizer_type="HuggingFaceTokenizer",
                                           tokenizer_model=tokenizers["<|endoftext|>"], strict=True))
    assert not list(tmp_path.glob("strict*")), "a failed run left files behind"


def default_template_by_hand(hf, user: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a user question and its answer under the default ChatML-like template,
    written out from its definition (megafast.data.chat_template's docstring) and tokenized piece by
    piece by the Hugging Face tokenizer itself: prompt text, answer, EOS id, closing newline."""
    prompt = hf.encode(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    learned = hf.encode(answer, add_special_tokens=False) + [hf.eos_token_id]
    tail = hf.encode("\n", add_special_tokens=False)
    return prompt + learned + tail, [0] * len(prompt) + [1] * len(learned) + [0] * len(tail)


def test_truncation_policy_is_applied_and_counted(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizers["<|endoftext|>"])
    long_answer = {"messages": [{"role": "user", "content": "short"},
                                {"role": "assistant", "content": "word " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    rows = [RECORDS[5][0], long_answer, long_prompt, RECORDS[1][0]]
    turns = [("Say yes", "yes"), ("short", "word " * 40), ("word " * 40, "ok"), ("hi", "hello there")]  # of rows
    full = [default_template_by_hand(hf, user, answer) for user, answer in turns]
    limit = 30
    assert [len(ids) > limit for ids, _ in full] == [False, True, True, False]
    assert any(full[1][1][:limit]) and not any(full[2][1][:limit])  # only the long prompt loses its answer
    stats, _, tokens, masks = run(tmp_path, tokenizers["<|endoftext|>"], rows, "cut", max_seq_length=limit,
                                  chat_template="default")
    assert (stats.records, stats.truncated, stats.dropped_no_answer, stats.dropped_too_long) == (3, 1, 1, 0)
    kept = [full[0], (full[1][0][:limit], full[1][1][:limit]), full[3]]  # the first `limit` tokens of row 1
    for i, (ids, mask) in enumerate(kept):
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask, f"truncate: record {i}"
    stats, _, tokens, masks = run(tmp_path, tokenizers["<|endoftext|>"], rows, "drop", max_seq_length=limit,
                                  truncation="drop", chat_template="default")
    assert (stats.records, stats.truncated, stats.dropped_no_answer, stats.dropped_too_long) == (2, 0, 0, 2)
    for i, (ids, mask) in enumerate([full[0], full[3]]):
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask, f"drop: record {i}"
    assert "2 dropped as too long" in stats.report()[1]


def test_two_workers_write_the_same_files(tokenizers, tmp_path):
    rows = [r for r, _ in BAD] * 30
    one = run(tmp_path, tokenizers["<|im_end|>"], rows, "w1")[1]
    two = run(tmp_path, tokenizers["<|im_end|>"], rows, "w2", workers=2, chunk_bytes=2048)[1]
    for a, b in zip((one.tokens, one.loss_mask, one.task_ids), (two.tokens, two.loss_mask, two.task_ids)):
        for ext in (".bin", ".idx"):
            assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes()


def test_role_markers_and_template_errors(tokenizers):
    assert parse_role_markers('{"user": {"prefix": "U:", "suffix": "\\n"}}')["user"] == ("U:", "\n")
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        parse_role_markers('{"robot": ["a", "b"]}')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_role_markers("{user: 1}")
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizers["<|endoftext|>"] + "/tokenizer.json")
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatTemplate.build(tok, "tokenizer")
    with pytest.raises(BadRecord, match="no .*instruction/output or text field"):
        parse_record({"prompt": "x"})
