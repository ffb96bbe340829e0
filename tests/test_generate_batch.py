"""Batched generation (issue 16): one left-padded batch gives, row for row, what one-at-a-time
generation gives (greedy, token-identical; sampled, the same draws per seed), with prompts of
different lengths, per-row limits, EOS and stop sequences; and tools/generate.py --prompt-file.

The references are the one-sequence path of the generator (prefill without padding), and stop
sequences cut by hand here from the unstopped output.
"""

from __future__ import annotations

import json
import os
import sys

import hf_models
import pytest

from megafast.config import GPTConfig
from megafast.convert.converter import ConvertOptions, convert_checkpoint
from megafast.generation.generator import Generator, SequenceRequest
from megafast.generation.sampling import SamplingConfig
from megafast.generation.stopping import TextTracker
from megafast.model import GPTModel
from megafast.parallel import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [[5, 17, 42], [8, 99, 23, 61, 3, 3, 70, 12, 9], [44], [7, 7, 1, 30, 50, 2]]


def letters(ids):
    """A stand-in detokenizer: token i is the letter i mod 26 (stop strings become predictable)."""
    return "".join(chr(97 + i % 26) for i in ids)


def _model_config(kind: str) -> GPTConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=101,
                max_position_embeddings=64, init_method_std=0.3)
    if kind in ("llama", "window"):
        base.update(num_query_groups=2, position_embedding_type="rope", normalization="RMSNorm",
                    activation="swiglu", add_bias_linear=False)
    if kind == "window":
        base.update(window_size=(3, 0))
    return GPTConfig(**base)


def _model(kind: str) -> GPTModel:
    return GPTModel(_model_config(kind), seed=7).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "window"])
def test_batch_equals_one_at_a_time_greedy(kind):
    gen = Generator(_model(kind), ParallelState.single(), letters)
    limits = [12, 20, 7, 16]
    singles = [gen.generate(p, n, GREEDY) for p, n in zip(PROMPTS, limits)]
    steps: list[tuple[int, int]] = []
    batch = gen.generate_batch(
        [SequenceRequest(p, n) for p, n in zip(PROMPTS, limits)],
        on_step=lambda i, t: steps.append((i, t.token_ids[-1])),
    )
    assert [r.token_ids for r in batch] == singles
    assert all(len(r.token_ids) == n and r.finish_reason == "length" for r, n in zip(batch, limits))
    assert [r.text for r in batch] == [letters(s) for s in singles]
    for i, want in enumerate(singles):  # the callback saw every token of every row, in order
        assert [tok for row, tok in steps if row == i] == want


def test_batch_stops_each_row_at_its_eos_and_stop_sequence():
    gen = Generator(_model("llama"), ParallelState.single(), letters)
    free = [gen.generate(p, 24, GREEDY) for p in PROMPTS]
    # row 0: stop at the EOS id that is its 5th token; row 1: at a 2-letter stop string taken from
    # its text; rows 2-3 unstopped (a stop string that never appears, and none)
    eos = free[0][4]
    text1 = letters(free[1])
    stop1 = text1[6:8]
    cut1 = text1.find(stop1)
    n1 = next(n for n in range(1, 25) if stop1 in letters(free[1][:n]))  # tokens until it appeared
    requests = [
        SequenceRequest(PROMPTS[0], 24, eos_ids=(eos,)),
        SequenceRequest(PROMPTS[1], 24, stop=(stop1, "zzzzzzzz")),
        SequenceRequest(PROMPTS[2], 24, stop=("zzzzzzzz",)),
        SequenceRequest(PROMPTS[3], 24),
    ]
    got = gen.generate_batch(requests)
    first_eos = free[0].index(eos)
    assert got[0].token_ids == free[0][: first_eos + 1] and got[0].finish_reason == "stop"
    assert got[0].text == letters(free[0][:first_eos])  # the EOS is not text
    assert got[1].token_ids == free[1][:n1] and got[1].finish_reason == "stop"
    assert got[1].text == text1[:cut1]
    assert got[2].token_ids == free[2] and got[2].finish_reason == "length"
    assert got[3].token_ids == free[3]


def test_sampled_rows_draw_the_same_tokens_in_any_batch():
    gen = Generator(_model("llama"), ParallelState.single())
    configs = [SamplingConfig(0.8, 20, 0.9), SamplingConfig(1.2), GREEDY, SamplingConfig(0.7, 0, 0.5)]
    requests = [SequenceRequest(p, 10, c, seed=100 + i) for i, (p, c) in enumerate(zip(PROMPTS, configs))]
    alone = [gen.generate_batch([r])[0].token_ids for r in requests]
    together = [r.token_ids for r in gen.generate_batch(requests)]
    assert together == alone
    assert gen.generate_batch(requests)[0].text is None  # no detokenizer, no text


def test_streamed_deltas_hold_back_a_possible_stop_sequence():
    tracker = TextTracker(letters, stop=("cde",))
    pieces = []
    for token in (0, 1, 2, 3):  # a b c d: "cd" may still become "cde"
        tracker.add(token)
        pieces.append(tracker.delta())
    assert pieces == ["a", "b", "", ""] and tracker.finish_reason is None
    tracker.add(4)  # e: "abcde" -> stop, text "ab"
    assert tracker.finish_reason == "stop" and tracker.text == "ab" and tracker.delta() == ""
    tracker = TextTracker(letters, stop=("cde",))
    for token in (0, 2, 3, 5):
        tracker.add(token)
    tracker.finish("length")
    assert tracker.delta() == "acdf"


def test_generate_tool_prompt_file(tmp_path):
    """tools/generate.py --prompt-file: token prompts, chat messages through the default role
    markers, per-record limits and stop, compared with transformers' greedy output."""
    from test_generate import _hf_greedy, _tiny_tokenizer
    from transformers import AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import generate as generate_tool

    model = hf_models.build("llama_tied", seed=4)
    hf_dir = str(tmp_path / "hf")
    hf_models.save(model, "llama_tied", hf_dir)
    _tiny_tokenizer(hf_dir)
    ckpt = str(tmp_path / "ckpt")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ckpt, progress=False))
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    records = [
        {"prompt": "def dumps(obj, indent", "max_tokens": 12},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "encode a dict"}]},
        {"prompt": "import", "max_tokens": 9},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    generate_tool.main(["--load", ckpt, "--prompt-file", str(prompts), "--output-file", str(out),
                        "--max-new-tokens", "16", "--temperature", "0", "--batch-size", "2", "--no-progress"])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    chat = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nencode a dict<|im_end|>\n"
            "<|im_start|>assistant\n")
    texts = [records[0]["prompt"], chat, records[2]["prompt"]]
    for rec, text, limit in zip(got, texts, (12, 16, 9)):
        prompt = hf_tok.encode(text, add_special_tokens=False)
        want = _hf_greedy(model, prompt, limit, eos=True)
        assert rec["prompt_token_ids"] == prompt and rec["token_ids"] == want, rec
        assert rec["text"] == hf_tok.decode([t for t in want if t != 2])
        assert rec["finish_reason"] == ("stop" if want[-1] == 2 else "length")
    # a stop sequence taken from the first record's text cuts it there
    stop = got[0]["text"][3:6]
    prompts.write_text(json.dumps({**records[0], "stop": stop}) + "\n")
    generate_tool.main(["--load", ckpt, "--prompt-file", str(prompts), "--output-file", str(out),
                        "--temperature", "0", "--no-progress"])
    rec = json.loads(out.read_text())
    assert rec["text"] == got[0]["text"][: got[0]["text"].find(stop)] and rec["finish_reason"] == "stop"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"nothing": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl line 2: give exactly one of"):
        generate_tool.main(["--load", ckpt, "--prompt-file", str(bad), "--output-file", str(tmp_path / "never.jsonl")])
    assert not (tmp_path / "never.jsonl").exists()


def _pp_batch(rank, world_size, requests):
    from megafast.config import ParallelConfig
    from megafast.pipeline.partition import build_model_chunks

    state = ParallelState.create(ParallelConfig(1, world_size))
    chunks = build_model_chunks(_model_config("llama"), state, seed=7)
    return [(r.token_ids, r.finish_reason, r.text) for r in Generator(chunks[0], state, letters).generate_batch(requests)]


def test_batch_at_pp2_equals_single_process():
    """Two pipeline stages (gloo): padded prefill, per-row stops and rows leaving the batch stay in
    step on both stages; the tokens equal the single-process batch's."""
    from dist import run_distributed

    from megafast.pipeline.partition import build_model_chunks

    single = Generator(build_model_chunks(_model_config("llama"), ParallelState.single(), seed=7)[0],
                       ParallelState.single(), letters)
    free = [single.generate(p, 16, GREEDY) for p in PROMPTS]
    requests = [SequenceRequest(PROMPTS[0], 16, eos_ids=(free[0][3],)), SequenceRequest(PROMPTS[1], 5),
                SequenceRequest(PROMPTS[2], 16, stop=(letters(free[2])[8:10],)), SequenceRequest(PROMPTS[3], 12)]
    want = [(r.token_ids, r.finish_reason, r.text) for r in single.generate_batch(requests)]
    assert [len(w[0]) for w in want] != [16] * 4  # rows leave at different steps
    for got in run_distributed(_pp_batch, 2, requests):
        assert got == want
