"""A plain install runs the README's commands: a fresh virtualenv with ``pip install torch==2.13.0``
(as the Makefile does on a CPU machine) and ``pip install -e .`` of a copy of this checkout, no
extras, nothing from the test environment (no PYTHONPATH, no system site-packages).

In it, the README's data, training, conversion, generation and planning commands run: the demo
corpus, a SentencePiece tokenizer, ``preprocess_data.py`` (which must take the exact word-cache
encoder, silently), ``merge_datasets.py``, two iterations of ``pretrain_gpt.py`` saving a
checkpoint, its HF export with the tokenizer (checked against SentencePiece with ``tokenizers``),
``generate.py`` and ``plan.py --hf-config ... --json`` without ``--num-gpus``. Features behind an
extra fail with one line naming it. pip's cache is reused: about 95 CPU seconds in all, most of
them installing torch and building megafast._C (3.6 minutes of wall time on a busy 2-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's CPU pin
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "176", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
]


def copy_checkout(dst: Path) -> None:
    """The files a fresh clone would have (tracked, plus new ones git does not ignore)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")
        for name in filter(None, listed):
            src = ROOT / name
            if src.is_file() and not name.endswith(".so"):
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / name)
    else:
        shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", "demo"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default", **extra}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(python of the fresh virtualenv, the checkout copy it installed)."""
    base = tmp_path_factory.mktemp("plain")
    src, venv = base / "src", base / "venv"
    copy_checkout(src)
    # the interpreter running the tests, without its virtualenv's packages
    python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([python, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=120)
    py = str(venv / "bin" / "python")
    cmd = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH, "-e", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return py, src


def run(plain, *args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    py, src = plain
    proc = subprocess.run([py, *args], cwd=src, capture_output=True, text=True, timeout=300,
                          env=clean_env(**env))
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_readme_commands_in_a_plain_install(plain, tmp_path):
    py, src = plain
    # nothing of the test environment leaks in: megafast is the copy, extras are absent
    where = run(plain, "-c", "import megafast, importlib.util as u; print(megafast.__file__); "
                "print([m for m in ('pyarrow', 'transformers', 'tensorboard') if u.find_spec(m)])")
    assert where.stdout.splitlines() == [str(src / "megafast" / "__init__.py"), "[]"]

    # data: corpus -> tokenizer -> indexed dataset (word cache, no warning) -> merge
    corpus, tok, data = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "data" / "corpus"
    run(plain, "tools/make_demo_corpus.py", "--output", str(corpus), "--size-mb", "0.5", "--no-progress")
    run(plain, "tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(tok),
        "--vocab-size", "1000")
    pre = run(plain, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(data),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", f"{tok}.model",
              "--append-eod", "--workers", "2")
    assert "Warning" not in pre.stderr and "protobuf" not in pre.stderr, pre.stderr
    uses = run(plain, "-c", "import sys, numpy as np; from megafast.data.tokenizer import "
               "SentencePieceTokenizer; from megafast.data.word_cache import make_encoder; "
               "print(type(make_encoder(SentencePieceTokenizer(sys.argv[1]), np.dtype(np.uint16), 2)).__name__)",
               f"{tok}.model")
    assert uses.stdout.strip() == "WordCacheEncoder"
    prefix = f"{data}_text_document"
    run(plain, "tools/merge_datasets.py", "--input", prefix, prefix, "--output-prefix", str(tmp_path / "twice"))
    assert os.path.getsize(tmp_path / "twice.bin") == 2 * os.path.getsize(f"{prefix}.bin")

    # training: two iterations on the dataset, saved
    ckpt = tmp_path / "ckpt"
    run(plain, "pretrain_gpt.py", *TINY_MODEL, "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
        "--data-path", prefix, "--split", "98,2,0", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", f"{tok}.model", "--save", str(ckpt), "--save-interval", "2",
        "--eval-iters", "0", "--log-interval", "1", "--device", "cpu")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    # conversion: HF export with the SentencePiece tokenizer as tokenizer.json
    hf = tmp_path / "hf"
    run(plain, "tools/checkpoint/convert.py", "--model-type", "GPT", "--loader", "megafast", "--saver", "hf",
        "--load-dir", str(ckpt), "--save-dir", str(hf))
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    text = "def main(argv):\n    return sorted(set(argv)) or None  # ok"
    same = run(plain, "-c", "import sys, sentencepiece as spm, tokenizers; "
               "a = tokenizers.Tokenizer.from_file(sys.argv[1]).encode(sys.argv[3], add_special_tokens=False).ids; "
               "b = spm.SentencePieceProcessor(model_file=sys.argv[2]).encode(sys.argv[3]); print(a == b, len(b))",
               str(hf / "tokenizer.json"), f"{tok}.model", text)
    assert same.stdout.split()[0] == "True", same.stdout

    # generation
    gen = run(plain, "tools/generate.py", "--load", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "4",
              "--temperature", "0", "--device", "cpu")
    assert len(json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"]) == 4

    # planning, without --num-gpus
    plan = json.loads(run(plain, "tools/plan.py", "--hf-config", str(hf / "config.json"), "--json").stdout)
    hf_config = json.loads((hf / "config.json").read_text())
    h, v, f = hf_config["hidden_size"], hf_config["vocab_size"], hf_config["intermediate_size"]
    kv = hf_config["num_key_value_heads"] * h // hf_config["num_attention_heads"]
    layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    assert plan["model"]["parameters"] == 2 * v * h + 2 * layer + h
    assert {m["module"] for m in plan["modules"]} == {"embedding", "attention", "mlp", "norms", "final_norm",
                                                      "output_layer"}
    single = [s for s in plan["strategies"] if s["layout"]["tp"] == s["layout"]["pp"] == 1]
    assert single and all(s["memory_gb"]["total"] > 0 and s["fits"] for s in single)
    assert all(("memory_gb" in s) != bool(s["reason"]) for s in plan["strategies"])

    # features behind an extra: one line naming it
    parquet = tmp_path / "in.parquet"
    parquet.write_bytes(b"")
    out = run(plain, "tools/preprocess_data.py", "--input", str(parquet), "--output-prefix", str(tmp_path / "p"),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", f"{tok}.model", ok=False)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1] == (
        "error: parquet input needs the pyarrow package: pip install 'megafast[data]'"), out.stderr
    out = run(plain, "pretrain_gpt.py", *TINY_MODEL, "--seq-length", "32", "--micro-batch-size", "1",
              "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "128",
              "--tensorboard-dir", str(tmp_path / "tb"), "--device", "cpu", ok=False)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1] == (
        "error: --tensorboard-dir needs the tensorboard package: pip install 'megafast[tensorboard]'"), out.stderr
