"""benchmarks/bench_kernels.py --smoke runs end to end on CPU (tiny shapes, Triton interpreter):
every kernel section runs, checks its output against the reference and writes its tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_mode(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the real benchmark runs (benchmarks/run_gpu.sh), not the smoke mode")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_kernels.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert not result["failures"]
    ours = [r for r in result["rows"] if r["impl"].startswith("megafast")]
    kernels = {r["kernel"] for r in ours}
    assert {
        "rms_norm",
        "add_rms_norm",
        "layer_norm",
        "swiglu",
        "gelu_tanh",
        "rope",
        "attention",
        "cross_entropy",
        "fused_linear_cross_entropy",
    } <= kernels
    assert all(r["error"] is None and r["fwd_ms"] is not None for r in ours)
    assert "| rms_norm |" in (tmp_path / "bench_kernels.md").read_text()
