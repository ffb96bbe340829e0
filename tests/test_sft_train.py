"""pretrain_gpt.py on SFT data under torchrun (CPU/gloo): with packing and equal task weighting,
TP=2 x PP=2 and DP=2 train the same model as one process (loss and per-task losses); a LoRA run
resumes exactly from its adapter-only checkpoint; misused fine-tuning flags fail before training."""

from __future__ import annotations

import numpy as np
import pytest
from sft_data import random_records, write_sft_dataset
from pretrain_run import MODEL, TRAIN, data_args, torchrun, train_records

VOCAB = 128
TASKS = ["code", "chat", "math"]


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sft")
    return write_sft_dataset(str(folder / "sft"), random_records(400, VOCAB, len(TASKS), seed=11), TASKS)


def sft_args(prefix: str, tmp) -> list[str]:
    return ["--data-path", prefix, "--split", "98,2,0", "--data-cache-path", str(tmp / "cache"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--dataset-type", "sft",
            "--attention-dropout", "0", "--hidden-dropout", "0"]


LAYOUTS = {  # (TP, PP, DP) -> (processes, flags)
    (1, 1, 1): (1, []),
    (2, 2, 1): (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (1, 1, 2): (2, []),
}


def test_layouts_train_the_same_model_on_packed_sft_data(sft_prefix, tmp_path):
    results = {}
    for layout, (nproc, extra) in LAYOUTS.items():
        log = tmp_path / f"{'x'.join(map(str, layout))}.jsonl"
        torchrun(nproc, MODEL + TRAIN + sft_args(sft_prefix, tmp_path) + extra + [
            "--packing", "--task-loss-weighting", "equal", "--train-iters", "8", "--lr", "1e-2",
            "--log-jsonl", str(log)])
        results[layout] = train_records(log)
    ref = results[(1, 1, 1)]
    assert sorted(ref) == list(range(1, 9))
    losses = np.array([ref[i]["lm_loss"] for i in range(1, 9)])
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    for i in range(1, 9):  # equal weighting: the loss is the mean of the per-task mean losses
        tasks = ref[i]["task_losses"]
        assert set(tasks) == set(TASKS)
        assert abs(np.mean(list(tasks.values())) - ref[i]["lm_loss"]) <= 1e-5 * ref[i]["lm_loss"]
    for layout, recs in results.items():
        for i in range(1, 9):
            err = abs(recs[i]["lm_loss"] - ref[i]["lm_loss"]) / ref[i]["lm_loss"]
            assert err <= 1e-5, f"{layout} iteration {i}: lm_loss relative error {err:.2e}"
            for task, loss in ref[i]["task_losses"].items():
                assert abs(recs[i]["task_losses"][task] - loss) <= 1e-5 * loss, f"{layout} iteration {i} {task}"


def test_lora_resumes_exactly_from_adapter_checkpoints(sft_prefix, tmp_path):
    common = MODEL + TRAIN + sft_args(sft_prefix, tmp_path) + [
        "--packing", "--lora-rank", "4", "--lora-alpha", "8", "--train-iters", "6", "--save-interval", "3",
        "--lr", "1e-2"]
    straight = tmp_path / "straight.jsonl"
    torchrun(1, common + ["--save", str(tmp_path / "a"), "--log-jsonl", str(straight)])
    resumed = tmp_path / "resumed.jsonl"
    torchrun(1, common + ["--save", str(tmp_path / "b"), "--exit-interval", "3", "--log-jsonl", str(resumed)])
    torchrun(1, common + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--log-jsonl", str(resumed)])
    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == list(range(1, 7))
    for i in range(1, 7):
        for key in ("lm_loss", "grad_norm", "task_losses"):
            assert a[i][key] == b[i][key], f"iteration {i} {key}: {a[i][key]} != {b[i][key]}"
    assert a[6]["lm_loss"] < a[1]["lm_loss"]


@pytest.mark.parametrize("flags,message", [
    (["--dataset-type", "gpt", "--packing"], "--packing needs --dataset-type sft"),
    (["--dataset-type", "gpt", "--task-loss-weighting", "equal"], "--task-loss-weighting equal needs --dataset-type sft"),
    (["--lora-rank", "4", "--lora-target-modules", "q_proj"], "choose among linear_qkv"),
    (["--role-markers", "{bad"], "--role-markers is not valid JSON"),
    (["--data-path", "/nonexistent/x_text_document"], "data file /nonexistent/x_text_document.bin does not exist"),
])
def test_bad_finetuning_flags_fail_early(sft_prefix, tmp_path, flags, message):
    from megafast.arguments import parse_args, validate_args

    args = parse_args(MODEL + TRAIN + sft_args(sft_prefix, tmp_path) + ["--train-iters", "2"] + flags)
    with pytest.raises(SystemExit, match=message.replace("-", "\\-")):
        validate_args(args, world_size=1, vocab_size=VOCAB)


def test_sft_flags_need_sft_files(tmp_path):
    from megafast.arguments import parse_args, validate_args

    gpt = write_sft_dataset(str(tmp_path / "g"), random_records(5, VOCAB, 1, seed=0), ["t"])
    (tmp_path / "g_text_loss_mask_document.idx").unlink()
    args = parse_args(MODEL + TRAIN + data_args(gpt, tmp_path) + ["--train-iters", "2", "--dataset-type", "sft"])
    with pytest.raises(SystemExit, match="g_text_loss_mask_document.idx does not exist: --dataset-type sft needs"):
        validate_args(args, world_size=1, vocab_size=VOCAB)
