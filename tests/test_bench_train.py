"""benchmarks/bench_train.py end to end on CPU with a tiny Llama (fp32): both sides train, report
positive throughput, and - sharing megafast's initial weights and batches - give the same loss as
the transformers baseline at every iteration; without the shared weights they do not."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")  # the baseline side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")
VOCAB = 256
TINY = [
    "--device", "cpu", "--dtype", "fp32", "--num-layers", "2", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--vocab-size", str(VOCAB), "--seq-length", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--warmup-iters", "1",
    # wide enough an init that the first loss depends on the weights (not ~ln V for any of them)
    "--init-method-std", "0.2",
]


def bench(out, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--out", str(out), *extra], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "bench_train.json")) as f:
        return json.load(f)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """(bench_train.json, output folder) of one run sharing megafast's weights with the baseline."""
    out = tmp_path_factory.mktemp("bench_train")
    return bench(out, "--timed-iters", "2"), out


def test_both_sides_train_the_same_model_and_report(shared_run):
    result, out = shared_run
    sides = result["sides"]
    assert set(sides) == {"megafast", "hf"}
    for side in sides.values():
        assert side["error"] is None
        assert side["tokens_per_s"] > 0 and side["tflops_per_gpu"] > 0 and 0 < side["mfu"]
        assert len(side["step_times_s"]) == 3 and len(side["losses"]) == 3
    ours, base = sides["megafast"], sides["hf"]
    assert ours["implementation"]["backend"] == "gloo" and base["implementation"]["attention"] == "sdpa"
    assert base["weights"] == "megafast's initial weights"
    # The same weights and batches: the first losses agree, and since the recipe (AdamW, decay
    # groups, clipping, accumulation) is the same, so do the later ones.
    assert abs(base["first_loss"] - math.log(VOCAB)) > 0.05, "the loss would not tell the weights apart"
    assert rel(ours["first_loss"], base["first_loss"]) < 1e-5
    for m, h in zip(ours["losses"], base["losses"]):
        assert rel(m, h) < 1e-5
    # Same FLOP model on both sides, the trainer's logged TFLOP/s computed from it too.
    flops, tokens = result["flops_per_token"], result["config"]["tokens_per_step"]
    for side in sides.values():
        assert math.isclose(side["tflops_per_gpu"], flops * tokens / side["step_time_s"] / 1e12, rel_tol=1e-9)
    assert result["ratios"]["tokens_per_s"] > 0
    planner = result["planner"]
    assert planner["predicted_step_time_s"] > 0 and planner["measured_step_time_s"] == ours["step_time_s"]
    assert planner["predicted_memory_gb"]["total"] > 0
    md = (out / "bench_train.md").read_text()
    assert "| megafast |" in md and "| PyTorch + transformers |" in md


def test_without_shared_weights_the_losses_differ(tmp_path):
    result = bench(tmp_path, "--timed-iters", "1", "--no-share-weights")
    ours, base = result["sides"]["megafast"], result["sides"]["hf"]
    assert base["weights"] == "HF init"
    assert rel(ours["first_loss"], base["first_loss"]) > 1e-3


def test_write_doc_replaces_only_its_section(shared_run, tmp_path, capsys):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_train

    _, out = shared_run
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# megafast benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n\n"
                   "<!-- bench_train:start -->\nold figures\n<!-- bench_train:end -->\n\n## tail\n")
    for _ in range(2):  # idempotent: rendering twice leaves one section
        assert bench_train.main(["--from-json", str(out / "bench_train.json"), "--write-doc", str(doc)]) == 0
    text = doc.read_text()
    assert "keep me" in text and "## tail" in text and "old figures" not in text
    assert text.count("<!-- bench_train:start -->") == 1 and "| megafast |" in text
    assert "| megafast |" in capsys.readouterr().out
