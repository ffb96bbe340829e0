"""tools/serve.py (issue 16): the official ``openai`` client against the OpenAI-compatible server on a
tiny converted model.

A random HF Llama (tied, GQA) with a tiny BPE tokenizer is converted to megafast, served, and
exported back to HF with the converter (``--saver hf``); transformers' greedy ``generate`` on the
exported model is the reference for completions and chat completions, streamed and not, one at a
time and 8 at once. Errors must have OpenAI's shape and a 4xx status, and leave the server up. A
TP=2 server under torchrun (gloo) answers the same. Greedy decoding has no seed; the model's seed
is fixed (4) so that the reference stays the same run to run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hf_models
import pytest
import torch

from megafast.convert.converter import ConvertOptions, convert_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
NAME = "tiny-llama"
EOS = 2
PROMPTS = ["def dumps(obj, indent", "import", "class JSONDecoder(object):\n    def decode(self, s", "return"]
CHAT = [
    [{"role": "user", "content": "encode a dict"}],
    [{"role": "user", "content": "json"}, {"role": "assistant", "content": "a format"},
     {"role": "user", "content": "dumps"}],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_pieces(messages) -> list:
    """The default role markers written out by hand (megafast.data.chat_template's defaults):
    texts, and EOS (None) after an earlier answer; each text is tokenized on its own, as in
    fine-tuning (the answer apart from the markers around it)."""
    pieces, text = [], ""
    for m in messages:
        if m["role"] == "assistant":
            pieces += [text + "<|im_start|>assistant\n", m["content"], None]
            text = "\n"
        else:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return pieces + [text + "<|im_start|>assistant\n"]


class Reference:
    """transformers' greedy continuation of the exported HF model."""

    def __init__(self, hf_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        self.model.generation_config.pad_token_id = EOS
        self.model.generation_config.eos_token_id = EOS

    def ids(self, prompt, new: int) -> list[int]:
        """Greedy continuation of a text, or of chat pieces (chat_pieces)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        prompt = [t for p in prompt for t in ([EOS] if p is None else self.tok.encode(p, add_special_tokens=False))]
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      do_sample=False, max_new_tokens=new)
        return out[0, len(prompt):].tolist()

    def completion(self, text, new: int) -> tuple[str, list[int], str]:
        ids = self.ids(text, new)
        finish = "stop" if ids and ids[-1] == EOS else "length"
        return self.tok.decode([t for t in ids if t != EOS]), ids, finish


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from test_generate import _tiny_tokenizer

    tmp = tmp_path_factory.mktemp("serve")
    hf_in = str(tmp / "hf_in")
    hf_models.save(hf_models.build("llama_tied", seed=4), "llama_tied", hf_in)
    _tiny_tokenizer(hf_in)
    ckpt = str(tmp / NAME)
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_in, ckpt, progress=False))
    hf_out = str(tmp / "hf_out")
    subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--model-type", "GPT", "--loader", "megafast",
                    "--saver", "hf", "--load-dir", ckpt, "--save-dir", hf_out], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return ckpt, hf_out


@pytest.fixture(scope="module")
def reference(model_dirs):
    return Reference(model_dirs[1])


@pytest.fixture(scope="module")
def server(model_dirs):
    import serve as serve_tool

    port = free_port()
    _, _, app = serve_tool.prepare(["--load", model_dirs[0], "--port", str(port), "--batch-wait-ms", "50"])
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.served
    srv.should_exit = True
    thread.join(30)
    app.state.served.scheduler.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_completions_equal_transformers(client, reference):
    for text, new in zip(PROMPTS, (12, 20, 6, 16)):
        want_text, want_ids, finish = reference.completion(text, new)
        got = client.completions.create(model=NAME, prompt=text, max_tokens=new, temperature=0,
                                        extra_body={"return_token_ids": True})
        choice = got.choices[0]
        assert choice.text == want_text and choice.token_ids == want_ids and choice.finish_reason == finish, text
        assert got.usage.completion_tokens == len(want_ids)
        stream = client.completions.create(model=NAME, prompt=text, max_tokens=new, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == want_text
        assert [c.choices[0].finish_reason for c in chunks][-1] == finish
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completions_equal_transformers(client, reference):
    for messages, new in zip(CHAT, (24, 10)):
        want_text, _, finish = reference.completion(chat_pieces(messages), new)
        got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=new, temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want_text and got.choices[0].finish_reason == finish
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=new, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_eight_concurrent_requests_are_batched_and_correct(client, reference, server):
    served = server[1]
    jobs = [(PROMPTS[i % 4] + " " * (i // 4), 8 + i) for i in range(8)]  # 8 different prompts and limits
    want = [reference.completion(text, new)[0] for text, new in jobs]
    before = served.scheduler.stats.batches

    def ask(job):
        text, new = job
        return client.completions.create(model=NAME, prompt=text, max_tokens=new, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    assert got == want
    batches = served.scheduler.stats.batches - before
    assert batches < 8 and served.scheduler.stats.largest_batch >= 2, served.scheduler.stats


def test_stop_sequences(client, reference):
    text = PROMPTS[0]
    full, ids, _ = reference.completion(text, 20)
    # a 2-character stop sequence straddling a token boundary (its first occurrence), so that
    # streaming must hold back its first character until the next token shows whether it follows
    ends = [len(reference.tok.decode(ids[:j])) for j in range(1, len(ids))]
    stop = next(full[k - 1 : k + 1] for k in ends if 2 < k < len(full) and full.find(full[k - 1 : k + 1]) == k - 1)
    got = client.completions.create(model=NAME, prompt=text, max_tokens=20, temperature=0, stop=[stop, "@@@"])
    assert got.choices[0].text == full[: full.find(stop)] != "" and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=text, max_tokens=20, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]


def _error(response, status: int, param, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_request_errors_have_openai_shape(server, client):
    url = server[0]
    post = lambda path, body: httpx.post(url + path, json=body, timeout=60)  # noqa: E731
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 400, None, "invalid_json")
    _error(post("/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    err = _error(post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 500}), 400, "max_tokens",
                 "context_length_exceeded")
    assert "maximum context length is 128" in err["message"]
    _error(post("/v1/chat/completions", {"model": NAME, "messages": CHAT[0], "max_tokens": 0}), 400, "max_tokens")
    _error(post("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 7}), 400, "temperature")
    _error(post("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}), 400, "n", "unsupported_parameter")
    _error(post("/v1/completions", {"model": NAME, "prompt": [5, 500]}), 400, "prompt")
    _error(post("/v1/chat/completions", {"model": NAME}), 400, "messages")
    _error(post("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}), 400,
           "messages")
    _error(httpx.get(url + "/v1/nothing"), 404, None)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", top_p=3)
    assert info.value.status_code == 400 and info.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT[0])
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still serving


def test_plain_install_names_the_extra(model_dirs, monkeypatch):
    import serve as serve_tool

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ModuleNotFoundError
    with pytest.raises(SystemExit, match=r"pip install 'megafast\[serve\]'"):
        serve_tool.main(["--load", model_dirs[0]])


def test_tp2_server_under_torchrun(model_dirs, reference):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "tools/serve.py",
           "--load", model_dirs[0], "--port", str(port), "--tensor-model-parallel-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the TP=2 server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        want = [reference.completion(text, 10)[0] for text in PROMPTS[:3]]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda t: client.completions.create(model=NAME, prompt=t, max_tokens=10,
                                                                    temperature=0).choices[0].text, PROMPTS[:3]))
        assert got == want
        chat_want = reference.completion(chat_pieces(CHAT[0]), 12)[0]
        chunks = client.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_want
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert 'serve.py", line' not in out, out[-3000:]  # no rank failed in the tool (torchrun's own SIGTERM trace aside)
