"""Batched serving throughput: 8 concurrent requests against tools/serve.py vs the same 8 requests
one at a time, on CPU.

    python benchmarks/bench_serve.py --rounds 3 --write-doc docs/benchmarks.md

Builds a small random Llama (4 layers, hidden 256, 8 heads / 4 query groups, FFN 688) with a tiny
BPE tokenizer, converts it to megafast, starts ``tools/serve.py`` as a subprocess (``--ignore-eos``,
so every request generates exactly ``--max-tokens`` tokens) and, per round, sends the 8 requests
(different prompts of 3-40 tokens, greedy) one after another, then all at once from 8 threads.
Throughput is completion tokens per second of wall time; the figure is the ratio concurrent /
sequential (median over rounds). The server batches statically (megafast/serving/scheduler.py).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from doc_section import write_section  # noqa: E402

SECTION = "bench_serve"
PROMPTS = [
    "def dumps(obj, indent",
    "import",
    "class JSONDecoder(object):\n    def decode(self, s, _w=WHITESPACE.match):\n        obj, end = self.raw_decode(s",
    "return",
    "    if isinstance(o, str):",
    "def loads(s, *, cls=None, object_hook=None, parse_float=None,",
    "try:\n    from _json import encode_basestring_ascii as c_encode_basestring_ascii\nexcept ImportError:",
    "__all__ = [",
]


def build_model(directory: str) -> str:
    """A random Llama + tiny tokenizer, converted to megafast under ``directory``; the checkpoint path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megafast.convert.converter import ConvertOptions, convert_checkpoint

    hf_dir = os.path.join(directory, "hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(inspect.getsource(json).splitlines(), trainer)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(hf_dir)
    ckpt = os.path.join(directory, "bench-llama")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ckpt, progress=False))
    return ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--write-doc", default=None, help="replace this section of a markdown file")
    a = p.parse_args()
    import httpx
    import openai
    import torch

    load_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    ckpt = build_model(tmp)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT}
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools/serve.py"), "--load", ckpt, "--port",
                               str(port), "--ignore-eos", "--device", "cpu"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("error: the server did not start")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(prompt: str) -> tuple[str, int]:
            r = client.completions.create(model="bench-llama", prompt=prompt, max_tokens=a.max_tokens, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        ask(PROMPTS[0])  # warm-up
        rows = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            sequential = [ask(q) for q in PROMPTS]
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                concurrent = list(pool.map(ask, PROMPTS))
            t_con = time.perf_counter() - t0
            if [t for t, _ in concurrent] != [t for t, _ in sequential]:
                raise SystemExit("error: concurrent answers differ from sequential ones")
            tokens = sum(n for _, n in sequential)
            rows.append((tokens / t_seq, tokens / t_con, t_seq, t_con))
            print(f"sequential {tokens / t_seq:7.1f} tok/s ({t_seq:.2f} s)  concurrent {tokens / t_con:7.1f} tok/s "
                  f"({t_con:.2f} s)  ratio {t_seq / t_con:.2f}x", flush=True)
        health = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(60)
    ratio = statistics.median(con / seq for seq, con, _, _ in rows)
    print(json.dumps({"ratio_median": round(ratio, 3), "rounds": len(rows), "health": health}))
    if a.write_doc:
        import fastapi
        import uvicorn

        load_end = os.getloadavg()[0]
        lines = [
            "## Serving: 8 concurrent requests batched vs one at a time (tools/serve.py, CPU)",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()}-core CPU "
            f"({platform.machine()}), 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end; "
            f"server OMP_NUM_THREADS={a.threads}",
            f"- versions: torch {torch.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, "
            f"openai {openai.__version__}, Python {platform.python_version()}",
            f"- command: `python benchmarks/bench_serve.py --rounds {a.rounds} --max-tokens {a.max_tokens}` "
            "(random Llama 4 layers x hidden 256, 8 heads / 4 groups, FFN 688; 8 prompts of 3-40 tokens; "
            f"greedy, `--ignore-eos`, {a.max_tokens} tokens each; static batching, --batch-wait-ms 20: "
            "a batch collects requests until 20 ms pass without a new one, 80 ms at most)",
            "",
            "| round | one at a time | 8 concurrent | ratio |",
            "|---|---:|---:|---:|",
        ]
        for i, (seq, con, t_seq, t_con) in enumerate(rows, 1):
            lines.append(f"| {i} | {seq:.1f} tok/s ({t_seq:.2f} s) | {con:.1f} tok/s ({t_con:.2f} s) | "
                         f"{con / seq:.2f}x |")
        lines += ["", f"Median ratio {ratio:.2f}x (acceptance: >= 2x). The concurrent answers equal the sequential "
                  f"ones (checked each round). Server counters at the end: {health['batches']} batches for "
                  f"{health['sequences']} sequences."]
        write_section(a.write_doc, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
