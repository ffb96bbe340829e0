"""SFT records in the schemas of the systems users come from (megafast.data.sft_format, sft_inputs).

The test data under tests/data/ reproduce the systems' own README examples: gdGPT/jllm's typed
records (a JSON array file: pretrain, instruct, conversation, conver_has_api, ref_qa), MFTCoder's
``chat_rounds`` (JSON Lines), Alpaca's ``instruction``/``input``/``output`` (a JSON array file) and
OpenAI ``messages`` / lists of {role: text}. Each record must become the messages written out
here, and, after tools/preprocess_data.py --dataset-type sft, the token ids and loss mask built
independently here from the documented ChatML markers: the loss covers exactly the answers and
their EOS. Bad records are skipped and counted with their line numbers, or fatal with --strict;
MFTCoder-style task directories name the tasks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megafast.data.indexed_dataset import IndexedDataset
from megafast.data.sft_format import BadRecord, Message, parse_record, read_info, sft_paths
from megafast.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CORPUS = [line for line in inspect.getsource(argparse).splitlines() if line.strip()][:800]
EOS = "<|endoftext|>"
SPECIAL = [EOS, "<|im_start|>", "<|im_end|>"]

S, U, A, T = "system", "user", "assistant", "tool"
XIAO = json.loads((DATA / "gdgpt_typed_records.json").read_text())[4]["api_desc"]  # long: read, not retyped
RES = json.loads((DATA / "gdgpt_typed_records.json").read_text())[4]["rounds"][3][1]["actions"][0]["api_res"]
CALL1 = '{"api_name": "search", "api_param": "{\\"query\\": \\"XiaoHuangShu\\", \\"version\\": \\"King James Version\\"}"}'
CALL2 = '{"api_name": "search", "api_param": "{\\"query\\": \\"GuoChanQu\\", \\"version\\": \\"King James Version\\"}"}'
KUN = ("Cai Xukun (born August 2, 1998), better known by the mononym Kun (stylized as KUN), is a Chinese "
       "singer-songwriter, dancer and rapper. He debuted as a member of SWIN and its sub-unit SWIN-S on October 18, "
       "2016, after participating in the first and second seasons of the Chinese reality show Super Idol.[1] After "
       "leaving the group and its company Yihai Entertainment, he participated in iQiyi's reality survival show Idol "
       "Producer, finishing first and debuting as the leader/center of temporary Chinese boy group Nine Percent, on "
       "April 6, 2018.[2][3] He was a cast member of variety show Keep Running from 2020 to 2022.")
REFERENCE = ("On January 10, 2019, Kun was officially named China's and Jamaica's Goodwill Ambassador and Outstanding "
             "Young Leader by the Jamaican Embassy in Shanghai, China. In February, Kun announced his first solo tour, "
             "'Kun ONE North America/U.K. Tour 2019', coming in early April 2019.")

# The messages each record of the test files must become (role, text), written out.
EXPECTED_TYPED = [
    [("text", KUN)],
    [(U, "Fill out the blank in the following sentence\n\nCai Xukun loves singing, dancing, rapping and ______"),
     (A, "playing basketball")],
    [(U, "Write a peom associated with rain."),
     (A, "Rain is falling all around, \nIt falls on field and tree,  \nIt rains on the umbrella here, \n"
         "And on the ships at sea. ")],
    [(U, "Hello"), (A, "Hello, what can I do for you ?"), (U, "Tell me what day it is today."),
     (A, "Today is Wednesday."), (U, "Who is caixukun?"),
     (U, "caixukun is a Chinese idol, who loves singing, dancing, rapping and playing basketball"),
     (U, "When was caixukun born?"), (A, "In the year of 1998.")],
    [(S, XIAO), (U, "Hello"), (A, "Hi, what can I do for you ?"),
     (U, "can you search the Bible for the phrase \"love your neighbor\"? Please include the book, chapter, and "
         "verse where it's found."),
     (A, "I need to use the search tool to find the phrase in the Bible.\n" + CALL1), (T, RES),
     (A, "Let me search again with another key word\n" + CALL2), (T, RES),
     (A, "The search tool returned three results, all from the King James Version of the Bible.\nThe phrase \"love "
         "your neighbor\" can be found in Mark 12:31, Matthew 22:39, and Luke 10:27 in the King James Version of the "
         "Bible."),
     (U, "I do not think you are correct."), (A, "Then you should ask others, not me.")],
    [(S, REFERENCE), (U, "When was Kun officially named China's and Jamaica's Goodwill Ambassador?"),
     (A, "On January 10, 2019"), (U, "What happened to Kun in February of 2019?"),
     (A, "He announced his first solo tour, 'Kun ONE North America/U.K. Tour 2019', coming in early April 2019.")],
]
EXPECTED_MFTCODER = [
    ("code-helper", [(S, "You are a expert in coding and help answer code questions"),
                     (U, "Write a python function of quick sort"), (A, "Below is the function of quick sort: ..."),
                     (U, "Explain the code"), (A, "OK, this code ...")]),
    ("codealpaca_20k", [(S, "Below is an instruction that describes a task.Write a response that appropriately "
                            "completes the request."),
                        (U, "Write a code to parse a URL and return the domain name.\nhttps://example.com/page"),
                        (A, "def get_domain_name(url):\n    parsed_url = urlparse(url)\n    return parsed_url.netloc")]),
]
EXPECTED_ALPACA = [
    [(U, "Give three tips for staying healthy."),
     (A, "1.Eat a balanced diet and make sure to include plenty of fruits and vegetables. \n2. Exercise regularly to "
         "keep your body active and strong. \n3. Get enough sleep and maintain a consistent sleep schedule.")],
    [(U, "Translate the following sentence into French.\n\nI like to eat apples."), (A, "J'aime manger des pommes.")],
]
EXPECTED_OPENAI = [
    [(S, "Marv is a factual chatbot that is also sarcastic."), (U, "What's the capital of France?"),
     (A, "Paris, as if everyone doesn't know that already.")],
    [(S, "You are a helpful assistant."), (U, "Who wrote 'Romeo and Juliet'?"), (A, "William Shakespeare wrote it.")],
]


def _messages(conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages]


def test_typed_records_become_the_expected_messages():
    records = json.loads((DATA / "gdgpt_typed_records.json").read_text())
    assert [r["type"] for r in records] == ["pretrain", "instruct", "instruct", "conversation", "conver_has_api",
                                            "ref_qa"]
    for record, expected in zip(records, EXPECTED_TYPED):
        assert _messages(parse_record(record)) == expected, record["type"]


def test_mftcoder_alpaca_openai_records_become_the_expected_messages():
    for line, (task, expected) in zip((DATA / "mftcoder_chat_rounds.jsonl").read_text().splitlines(),
                                      EXPECTED_MFTCODER):
        conversation = parse_record(json.loads(line))
        assert (conversation.task, _messages(conversation)) == (task, expected)
    for record, expected in zip(json.loads((DATA / "alpaca.json").read_text()), EXPECTED_ALPACA):
        assert _messages(parse_record(record)) == expected
    for line, expected in zip((DATA / "openai_messages.jsonl").read_text().splitlines(), EXPECTED_OPENAI):
        assert _messages(parse_record(json.loads(line))) == expected


@pytest.mark.parametrize("record, reason", [
    ({"type": "chat", "text": "x"}, "unknown record type"),
    ({"type": "pretrain", "text": "  "}, "non-empty"),
    ({"type": "instruct", "instruct": "q"}, "'output'"),
    ({"type": "conversation", "rounds": [["ask", "only a question"]]}, "no answer"),
    ({"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "q2"]]}, "does not end with an answer"),
    ({"type": "conversation", "rounds": [["ask", "q"], ["reply", "a"]]}, "unknown role"),
    ({"type": "conversation", "rounds": [["ask"]]}, "[role, text] pair"),
    ({"type": "conver_has_api", "api_desc": "d", "rounds": [["ask", "q"], ["ans-api", {"actions": []}]]}, "'ans'"),
    ({"type": "conver_has_api", "api_desc": "d", "rounds": [["ask", "q"], ["ans-api", {"actions": [{"x": 1}],
                                                                                      "ans": "a"}]]}, "api_name"),
    ({"type": "conver_has_api", "rounds": [["ask", "q"], ["ans", "a"]]}, "'api_desc'"),
    ({"type": "ref_qa", "rounds": [["ask", "q"], ["ans", "a"]]}, "'reference'"),
])
def test_bad_typed_records(record, reason):
    with pytest.raises(BadRecord, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_record(record)


# ---- through tools/preprocess_data.py's code: token ids and loss masks ----


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A byte-level BPE HF tokenizer directory (no chat template: the default ChatML markers apply)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, special_tokens=SPECIAL, show_progress=False)
    trainer.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=EOS)
    fast.save_pretrained(str(folder / "hf"))
    return str(folder / "hf"), fast


def reference_encoding(messages: list[tuple[str, str]], fast) -> tuple[list[int], list[int]]:
    """Ids and loss mask of the documented default markers, built here: each non-answer turn is
    ``<|im_start|>ROLE\\n TEXT <|im_end|>\\n``, an answer ``<|im_start|>assistant\\n`` + ANSWER + EOS +
    ``\\n``; the text between two answers is tokenized as one piece, each answer on its own."""
    eos = fast.convert_tokens_to_ids(EOS)
    if messages[0][0] == "text":
        return fast.encode(messages[0][1], add_special_tokens=False) + [eos], [1] * (
            len(fast.encode(messages[0][1], add_special_tokens=False)) + 1)
    ids: list[int] = []
    mask: list[int] = []
    prompt = ""
    for role, text in messages:
        if role != A:
            prompt += f"<|im_start|>{role}\n{text}<|im_end|>\n"
            continue
        prompt += "<|im_start|>assistant\n"
        piece = fast.encode(prompt, add_special_tokens=False)
        answer = fast.encode(text, add_special_tokens=False)
        ids += piece + answer + [eos]
        mask += [0] * len(piece) + [1] * (len(answer) + 1)
        prompt = "\n"
    piece = fast.encode(prompt, add_special_tokens=False)
    return ids + piece, mask + [0] * len(piece)


def _records(prefix: str) -> list[tuple[list[int], list[int], int]]:
    paths = sft_paths(f"{prefix}_text_document")
    tokens, masks, tasks = (IndexedDataset(p) for p in (paths.tokens, paths.loss_mask, paths.task_ids))
    return [(tokens[i].tolist(), masks[i].tolist(), int(tasks[i][0])) for i in range(len(tokens))]


def _preprocess(inputs, prefix: str, tokenizer: str, **kw):
    return preprocess_sft(SFTPreprocessConfig(input=inputs, output_prefix=prefix, tokenizer_type="HuggingFaceTokenizer",
                                              tokenizer_model=tokenizer, chat_template="default", **kw))


@pytest.mark.parametrize("name, expected", [
    ("gdgpt_typed_records.json", EXPECTED_TYPED),
    ("mftcoder_chat_rounds.jsonl", [m for _, m in EXPECTED_MFTCODER]),
    ("alpaca.json", EXPECTED_ALPACA),
    ("openai_messages.jsonl", EXPECTED_OPENAI),
])
def test_each_schema_gives_the_expected_tokens_and_loss_mask(name, expected, hf_tokenizer, tmp_path):
    directory, fast = hf_tokenizer
    stats = _preprocess(str(DATA / name), str(tmp_path / "out"), directory)
    assert stats.records == len(expected) and stats.bad_records == 0
    got = _records(str(tmp_path / "out"))
    for (ids, mask, _), messages in zip(got, expected):
        ref_ids, ref_mask = reference_encoding(messages, fast)
        assert (ids, mask) == (ref_ids, ref_mask), messages[0]
        learned = fast.decode([t for t, m in zip(ids, mask) if m])  # exactly the answers, each + EOS
        answers = [text for role, text in messages if role in (A, "text")]
        assert learned == "".join(a + EOS for a in answers)


def test_bad_records_are_counted_with_line_numbers_or_fatal_with_strict(hf_tokenizer, tmp_path):
    directory, _ = hf_tokenizer
    lines = [
        {"type": "instruct", "instruct": "q", "output": "a"},
        {"type": "chat", "text": "x"},  # line 2: unknown type
        "not json",  # line 3
        {"type": "conversation", "rounds": [["ask", "q"]]},  # line 4: no answer
        {"type": "ref_qa", "reference": "r", "rounds": [["ask", "q"], ["ans", "a"]]},
    ]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    stats = _preprocess(str(jsonl), str(tmp_path / "a"), directory)
    assert stats.records == 2 and stats.bad_records == 3
    assert [n for n, _ in stats.bad_examples] == [2, 3, 4]
    assert "unknown record type" in stats.bad_examples[0][1] and "no answer" in stats.bad_examples[2][1]
    assert read_info(str(tmp_path / "a_text_document"))["bad_records"] == 3
    # a JSON array file: the element's position is its line number
    array = tmp_path / "array.json"
    array.write_text(json.dumps([lines[0], lines[1], lines[4]], indent=2))
    stats = _preprocess(str(array), str(tmp_path / "b"), directory)
    assert stats.records == 2 and [n for n, _ in stats.bad_examples] == [2]
    with pytest.raises(ValueError, match=r"array\.json line 2: unknown record type"):
        _preprocess(str(array), str(tmp_path / "c"), directory, strict=True)


def test_task_directories_name_the_tasks(hf_tokenizer, tmp_path):
    """MFTCoder's data_paths: each directory a task with one or more JSONL files (recursively)."""
    directory, fast = hf_tokenizer
    root = tmp_path / "tasks"
    (root / "code" / "more").mkdir(parents=True)
    (root / "chat").mkdir()
    one = {"instruction": "say {}", "output": "{}", "task": "ignored"}

    def write(path: Path, words: list[str]) -> None:
        path.write_text("".join(json.dumps({k: v.format(w) for k, v in one.items()}) + "\n" for w in words))

    write(root / "code" / "a.jsonl", ["def", "class"])
    write(root / "code" / "more" / "b.jsonl", ["import"])
    write(root / "chat" / "c.jsonl", ["hi"])
    (root / "chat" / "c2.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")  # bad, line 1
    stats = _preprocess(str(root), str(tmp_path / "d"), directory)
    info = read_info(str(tmp_path / "d_text_document"))
    assert info["tasks"] == ["chat", "code"]
    assert {t: c["records"] for t, c in info["per_task"].items()} == {"chat": 1, "code": 3}
    assert stats.bad_examples == [(1, "message 1 (user) has no text content (in tasks/chat/c2.jsonl)")]
    got = _records(str(tmp_path / "d"))
    eos = fast.convert_tokens_to_ids(EOS)
    answers = [fast.decode([t for t, m in zip(ids, mask) if m and t != eos]) for ids, mask, _ in got]
    assert answers == ["hi", "def", "class", "import"] and [task for *_, task in got] == [0, 1, 1, 1]
    # several task directories given to the command line, in the order given
    out = tmp_path / "e"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--dataset-type", "sft",
                           "--input", str(root / "code"), str(root / "chat" / "c.jsonl"), "--output-prefix", str(out),
                           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", directory,
                           "--chat-template", "default"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = read_info(f"{out}_text_document")
    assert info["tasks"] == ["code", "ignored"] and info["records"] == 4


def test_tool_turns_are_not_learned(hf_tokenizer, tmp_path):
    """conver_has_api: API outputs (tool turns) and the API description are prompt, never answers."""
    directory, fast = hf_tokenizer
    record = {"type": "conver_has_api", "api_desc": "add(a, b)", "rounds": [
        ["ask", "1+2?"], ["ans-api", {"actions": [{"inner_thought": "use add", "api_name": "add",
                                                   "api_param": {"a": 1, "b": 2}, "api_res": {"sum": 3}}],
                                      "ans": "3"}]]}
    path = tmp_path / "api.jsonl"
    path.write_text(json.dumps(record) + "\n")
    _preprocess(str(path), str(tmp_path / "f"), directory)
    (ids, mask, _), = _records(str(tmp_path / "f"))
    call = 'use add\n{"api_name": "add", "api_param": {"a": 1, "b": 2}}'
    assert fast.decode([t for t, m in zip(ids, mask) if m]) == call + EOS + "3" + EOS
    prompt = fast.decode([t for t, m in zip(ids, mask) if not m])
    assert "<|im_start|>system\nadd(a, b)<|im_end|>" in prompt and '<|im_start|>tool\n{"sum": 3}<|im_end|>' in prompt
    assert np.array(mask).sum() == len(fast.encode(call, add_special_tokens=False)) + 1 + len(
        fast.encode("3", add_special_tokens=False)) + 1
    assert Message("tool", '{"sum": 3}') in parse_record(record).messages
