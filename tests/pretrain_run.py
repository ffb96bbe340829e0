"""Running pretrain_gpt.py under torchrun from tests: a tiny Llama-style model's flags, the training
flags, the data flags for an indexed dataset of ``VOCAB`` token ids (EOD ``VOCAB - 1``), and reading back the
``--log-jsonl`` records. Shared by test_pretrain.py, test_sft_train.py and test_evaluate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128

MODEL = [
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--make-vocab-size-divisible-by", "1", "--init-method-std", "0.05",
]
TRAIN = [
    "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
    "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--log-interval", "1",
    "--eval-interval", "1000", "--eval-iters", "0", "--seed", "4321", "--device", "cpu",
]


def torchrun(nproc: int, args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "pretrain_gpt.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_records(path: Path) -> dict[int, dict]:
    """The last record per iteration (a resumed run rewrites the iterations after its checkpoint)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "train":
            out[rec["iteration"]] = rec
    return out


def data_args(prefix: str, tmp: Path) -> list[str]:
    return ["--data-path", prefix, "--split", "98,2,0", "--data-cache-path", str(tmp / "cache"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]


def pretrain_in_process(argv: list[str]) -> None:
    """``pretrain_gpt.py argv`` in this process as a world of one (the environment restored after)."""
    import socket

    import pytest

    from megafast.training import trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            mp.setenv(k, v)
        trainer.pretrain(argv)


def convert_tool(argv: list[str]) -> None:
    """``tools/checkpoint/convert.py --model-type GPT --no-progress argv`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools/checkpoint/convert.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--model-type", "GPT", "--no-progress", *argv])
