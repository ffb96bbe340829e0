"""Every flag of Megatron-LM's own example training scripts (core_v0.19.0: ``examples/gpt3``,
``examples/llama``, ``examples/mixtral``) is implemented with Megatron's meaning, mapped to
megafast's equivalent, or rejected with one line saying why: never accepted and ignored.

The list is held here (:data:`FLAGS`, so CI without Megatron-LM's sources checks it) and, when the
scripts are on disk (``$MEGATRON_LM_DIR``, default /work/megatron-lm), also read from them: a flag
the scripts use that this list does not classify fails the test. Each flag's case parses it with
``pretrain_gpt.py``'s parser and checks what it does to the arguments / model config (or the
rejection and its reason). At the end the gpt3 example's argument list, sizes shrunk, runs
``pretrain_gpt.py`` for two iterations on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megafast.arguments import model_config, parallel_config, parse_args, validate_args
from megafast.arguments_megatron import MAPPED, REJECTED

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_LM = Path(os.environ.get("MEGATRON_LM_DIR", "/work/megatron-lm"))
SCRIPTS = ("examples/gpt3/train_gpt3_175b_distributed.sh", "examples/llama/train_llama3_8b_h100_fp8.sh",
           "examples/mixtral/train_mixtral_8x7b_distributed.sh")
TORCHRUN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port"}
VOCAB = 64
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", str(VOCAB)]
MOE = ["--num-experts", "4", "--disable-bias-linear"]  # megafast's experts have no biases

# Every flag in the three scripts (and --seed, which the mixtral README adds), sorted.
FLAGS = """
--adam-beta1 --adam-beta2 --apply-layernorm-1p --attention-backend --attention-dropout --bf16
--calculate-per-token-loss --ckpt-format --clip-grad --context-parallel-size --cross-entropy-loss-fusion
--data-cache-path --data-path --decoupled-lr --decoupled-min-lr --disable-bias-linear
--distributed-timeout-minutes --empty-unused-memory-level --eval-interval --eval-iters --exit-duration-in-mins
--expert-model-parallel-size --ffn-hidden-size --fp16 --fp8-amax-compute-algo --fp8-amax-history-len
--fp8-format --fp8-param-gather --global-batch-size --grad-reduce-in-bf16 --group-query-attention
--hidden-dropout --hidden-size --init-method-std --kv-channels --load --log-interval --log-throughput --lr
--lr-decay-iters --lr-decay-samples --lr-decay-style --lr-warmup-fraction --lr-warmup-iters
--lr-warmup-samples --manual-gc --max-position-embeddings --merge-file --micro-batch-size --min-lr
--mock-data --moe-aux-loss-coeff --moe-grouped-gemm --moe-router-load-balancing-type --moe-router-topk
--moe-token-dispatcher-type --no-create-attention-mask-in-dataloader --no-load-optim --no-load-rng
--no-masked-softmax-fusion --no-mmap-bin-files --no-position-embedding --normalization
--num-attention-heads --num-experts --num-layers --num-query-groups --num-workers --overlap-grad-reduce
--overlap-param-gather --pipeline-model-parallel-size --position-embedding-type --profile
--profile-step-end --profile-step-start --rotary-base --rotary-percent --save --save-interval --seed
--seq-length --sequence-parallel --split --step-batch-size-schedule --swiglu --tensor-model-parallel-size
--tensorboard-dir --tiktoken-pattern --tokenizer-model --tokenizer-type --train-iters --train-samples
--untie-embeddings-and-output-weights --use-distributed-optimizer --use-mcore-models --vocab-file
--vocab-size --wandb-exp-name --wandb-project --weight-decay
""".split()


def script_flags(text: str) -> set[str]:
    """The ``--flags`` of a bash launch script (comments and torchrun's own flags left out)."""
    flags = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        flags.update(re.findall(r"(?:^|[\s\"'(])(--[A-Za-z0-9][A-Za-z0-9_-]*)", line))
    return flags - TORCHRUN_FLAGS


def parse(*extra: str):
    """Parsed and validated flags (BASE + extra; a world of TP x PP x CP ranks) and the model config
    they describe."""
    i = BASE.index("--train-iters")
    base = BASE if "--train-samples" not in extra else BASE[:i] + BASE[i + 2:]
    args = parse_args(base + list(extra))
    validate_args(args, args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                  * args.context_parallel_size, None)
    return args, model_config(args, VOCAB)


def scheduler(*extra: str):
    from megafast.training.trainer import _scheduler

    return _scheduler(parse(*extra)[0])


# flag -> (extra argv, check(args, config)) for a flag accepted with Megatron's meaning or mapped
ACCEPTED = {
    "--adam-beta1": (["--adam-beta1", "0.8"], lambda a, c: a.adam_beta1 == 0.8),
    "--adam-beta2": (["--adam-beta2", "0.95"], lambda a, c: a.adam_beta2 == 0.95),
    "--attention-backend": (["--attention-backend", "fused"], lambda a, c: c.attention_backend == "sdpa"),
    "--attention-dropout": (["--attention-dropout", "0.0"], lambda a, c: c.attention_dropout == 0.0),
    "--bf16": (["--bf16"], lambda a, c: a.bf16 and not a.fp16),
    "--calculate-per-token-loss": (["--calculate-per-token-loss"], lambda a, c: a.calculate_per_token_loss),
    "--ckpt-format": (["--ckpt-format", "torch"], lambda a, c: a.ckpt_format == "torch"),
    "--clip-grad": (["--clip-grad", "0.5"], lambda a, c: a.clip_grad == 0.5),
    "--cross-entropy-loss-fusion": (["--cross-entropy-loss-fusion"], lambda a, c: c.kernels == "auto"),
    "--data-cache-path": (["--data-cache-path", "/tmp/c"], lambda a, c: a.data_cache_path == "/tmp/c"),
    "--disable-bias-linear": (["--disable-bias-linear"], lambda a, c: not c.add_bias_linear),
    "--distributed-timeout-minutes": (["--distributed-timeout-minutes", "60"],
                                      lambda a, c: a.distributed_timeout_minutes == 60),
    "--empty-unused-memory-level": (["--empty-unused-memory-level", "1"], lambda a, c: a.empty_unused_memory_level == 1),
    "--eval-interval": (["--eval-interval", "5"], lambda a, c: a.eval_interval == 5),
    "--eval-iters": (["--eval-iters", "3"], lambda a, c: a.eval_iters == 3),
    "--exit-duration-in-mins": (["--exit-duration-in-mins", "235"], lambda a, c: a.exit_duration_in_mins == 235),
    "--expert-model-parallel-size": ([*MOE, "--expert-model-parallel-size", "1"],
                                     lambda a, c: c.num_experts == 4),
    "--ffn-hidden-size": (["--ffn-hidden-size", "48"], lambda a, c: c.ffn_hidden_size == 48),
    "--fp16": (["--fp16"], lambda a, c: a.fp16 and not a.bf16),
    "--global-batch-size": (["--global-batch-size", "4"], lambda a, c: a.num_microbatches == 4),
    "--group-query-attention": (["--group-query-attention", "--num-query-groups", "2"],
                                lambda a, c: c.num_query_groups == 2),
    "--hidden-dropout": (["--hidden-dropout", "0.0"], lambda a, c: c.hidden_dropout == 0.0),
    "--hidden-size": (["--hidden-size", "48"], lambda a, c: c.hidden_size == 48),
    "--init-method-std": (["--init-method-std", "0.0134"], lambda a, c: c.init_method_std == 0.0134),
    "--kv-channels": (["--kv-channels", "16"], lambda a, c: c.kv_channels == 16),
    "--load": (["--load", "/tmp/ck"], lambda a, c: a.load == "/tmp/ck"),
    "--log-interval": (["--log-interval", "7"], lambda a, c: a.log_interval == 7),
    "--log-throughput": (["--log-throughput"], lambda a, c: a.log_throughput),
    "--lr": (["--lr", "0.00015"], lambda a, c: a.lr == 0.00015),
    "--lr-decay-iters": (["--lr-decay-iters", "10", "--global-batch-size", "2"],
                         lambda a, c: scheduler("--lr-decay-iters", "10", "--global-batch-size", "2").decay_steps == 20),
    "--lr-decay-samples": (["--lr-decay-samples", "30"], lambda a, c: scheduler("--lr-decay-samples", "30").decay_steps == 30),
    "--lr-decay-style": (["--lr-decay-style", "cosine"], lambda a, c: scheduler("--lr-decay-style", "cosine").decay_style == "cosine"),
    "--lr-warmup-fraction": (["--lr-warmup-fraction", "0.25", "--lr-decay-iters", "8"],
                             lambda a, c: scheduler("--lr-warmup-fraction", "0.25", "--lr-decay-iters", "8").warmup_steps == 2),
    "--lr-warmup-iters": (["--lr-warmup-iters", "1", "--global-batch-size", "2"],
                          lambda a, c: scheduler("--lr-warmup-iters", "1", "--global-batch-size", "2").warmup_steps == 2),
    "--lr-warmup-samples": (["--lr-warmup-samples", "3", "--lr-decay-samples", "30"],
                            lambda a, c: scheduler("--lr-warmup-samples", "3", "--lr-decay-samples", "30").warmup_steps == 3),
    "--manual-gc": (["--manual-gc"], lambda a, c: a.manual_gc and a.manual_gc_interval == 0),
    "--max-position-embeddings": (["--max-position-embeddings", "32"], lambda a, c: c.max_position_embeddings == 32),
    "--merge-file": (["--vocab-file", "v.json", "--merge-file", "m.txt"],
                     lambda a, c: a.merge_file == "m.txt" and a.tokenizer_type == "GPT2BPETokenizer"),
    "--micro-batch-size": (["--micro-batch-size", "2"], lambda a, c: a.micro_batch_size == 2),
    "--min-lr": (["--min-lr", "1e-5"], lambda a, c: scheduler("--min-lr", "1e-5").min_lr == 1e-5),
    "--mock-data": ([], lambda a, c: a.mock_data),
    "--moe-aux-loss-coeff": ([*MOE, "--moe-aux-loss-coeff", "1e-2"],
                             lambda a, c: c.moe_aux_loss_coeff == 1e-2),
    "--moe-grouped-gemm": ([*MOE, "--moe-grouped-gemm"], lambda a, c: c.moe_grouped_gemm),
    "--moe-router-load-balancing-type": ([*MOE, "--moe-router-load-balancing-type", "aux_loss"],
                                         lambda a, c: c.moe_router_load_balancing_type == "aux_loss"),
    "--moe-router-topk": ([*MOE, "--moe-router-topk", "2"], lambda a, c: c.moe_router_topk == 2),
    "--moe-token-dispatcher-type": ([*MOE, "--moe-token-dispatcher-type", "alltoall"],
                                    lambda a, c: a.moe_token_dispatcher_type == "alltoall"),
    "--no-create-attention-mask-in-dataloader": (["--no-create-attention-mask-in-dataloader"],
                                                 lambda a, c: not a.create_attention_mask_in_dataloader),
    "--no-load-optim": (["--no-load-optim"], lambda a, c: a.no_load_optim),
    "--no-load-rng": (["--no-load-rng"], lambda a, c: a.no_load_rng),
    "--no-masked-softmax-fusion": (["--no-masked-softmax-fusion"], lambda a, c: not a.masked_softmax_fusion),
    "--no-position-embedding": (["--no-position-embedding"], lambda a, c: c.position_embedding_type == "none"),
    "--normalization": (["--normalization", "RMSNorm"], lambda a, c: c.normalization == "RMSNorm"),
    "--num-attention-heads": (["--num-attention-heads", "8"], lambda a, c: c.num_attention_heads == 8),
    "--num-experts": (["--num-experts", "8", "--disable-bias-linear"], lambda a, c: c.num_experts == 8),
    "--num-layers": (["--num-layers", "3"], lambda a, c: c.num_layers == 3),
    "--num-query-groups": (["--group-query-attention", "--num-query-groups", "1"], lambda a, c: c.num_query_groups == 1),
    "--num-workers": (["--num-workers", "1"], lambda a, c: a.num_workers == 1),
    "--overlap-grad-reduce": (["--overlap-grad-reduce"], lambda a, c: a.overlap_grad_reduce),
    "--overlap-param-gather": (["--use-distributed-optimizer", "--overlap-param-gather"],
                               lambda a, c: a.overlap_param_gather and a.data_parallel_sharding_strategy == "optim"),
    "--pipeline-model-parallel-size": (["--pipeline-model-parallel-size", "1"],
                                       lambda a, c: parallel_config(a).pipeline_model_parallel_size == 1),
    "--position-embedding-type": (["--position-embedding-type", "rope"], lambda a, c: c.position_embedding_type == "rope"),
    "--profile": (["--profile"], lambda a, c: a.profile),
    "--profile-step-end": (["--profile", "--profile-step-start", "4", "--profile-step-end", "6"],
                           lambda a, c: a.profile_step_end == 6),
    "--profile-step-start": (["--profile", "--profile-step-start", "4"], lambda a, c: a.profile_step_start == 4),
    "--rotary-base": (["--position-embedding-type", "rope", "--rotary-base", "1000000"],
                      lambda a, c: c.rotary_base == 1e6),
    "--rotary-percent": (["--rotary-percent", "1.0"], lambda a, c: a.rotary_percent == 1.0),
    "--save": (["--save", "/tmp/ck"], lambda a, c: a.save == "/tmp/ck"),
    "--save-interval": (["--save-interval", "10"], lambda a, c: a.save_interval == 10),
    "--seed": (["--seed", "42"], lambda a, c: a.seed == 42),
    "--seq-length": (["--seq-length", "8"], lambda a, c: a.seq_length == 8),
    "--sequence-parallel": (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                            lambda a, c: parallel_config(a).sequence_parallel),
    "--split": (["--split", "99,1,0"], lambda a, c: a.split == "99,1,0"),
    "--swiglu": (["--swiglu"], lambda a, c: c.activation == "swiglu"),
    "--tensor-model-parallel-size": (["--tensor-model-parallel-size", "1"],
                                     lambda a, c: parallel_config(a).tensor_model_parallel_size == 1),
    "--tensorboard-dir": (["--tensorboard-dir", "/tmp/tb"], lambda a, c: a.tensorboard_dir == "/tmp/tb"),
    "--tiktoken-pattern": (["--tiktoken-pattern", "v2"], lambda a, c: a.tiktoken_pattern == "v2"),
    "--tokenizer-model": (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "t.model"],
                          lambda a, c: a.tokenizer_type == "SentencePieceTokenizer" and a.tokenizer_model == "t.model"),
    "--tokenizer-type": (["--tokenizer-type", "NullTokenizer"], lambda a, c: a.tokenizer_type == "NullTokenizer"),
    "--train-iters": (["--train-iters", "5"], lambda a, c: a.train_iters == 5),
    "--train-samples": (["--train-samples", "8", "--global-batch-size", "2"], lambda a, c: a.train_iters == 4),
    "--untie-embeddings-and-output-weights": (["--untie-embeddings-and-output-weights"],
                                              lambda a, c: not c.tie_embeddings),
    "--use-distributed-optimizer": (["--use-distributed-optimizer"],
                                    lambda a, c: a.data_parallel_sharding_strategy == "optim"),
    "--use-mcore-models": (["--use-mcore-models"], lambda a, c: a.use_mcore_models),
    "--vocab-file": (["--vocab-file", "v.json", "--merge-file", "m.txt"], lambda a, c: a.vocab_file == "v.json"),
    "--vocab-size": (["--vocab-size", "100"], lambda a, c: a.vocab_size == 100),
    "--weight-decay": (["--weight-decay", "0.1"], lambda a, c: a.weight_decay == 0.1),
    "--data-path": (None, None),  # needs files: checked by the end-to-end run below
    "--context-parallel-size": (["--context-parallel-size", "2", "--attention-dropout", "0"],
                                lambda a, c: parallel_config(a).context_parallel_size == 2),
}

# flag -> (extra argv, text the one-line error must contain)
REJECTIONS = {
    "--apply-layernorm-1p": (["--apply-layernorm-1p"], "zero-centred norm weights"),
    "--decoupled-lr": (["--decoupled-lr", "5e-4"], "separate learning rate for the embedding"),
    "--decoupled-min-lr": (["--decoupled-min-lr", "4.5e-5"], "separate learning rate for the embedding"),
    "--fp8-format": (["--fp8-format", "hybrid"], "Transformer Engine"),
    "--fp8-amax-history-len": (["--fp8-amax-history-len", "1024"], "Transformer Engine"),
    "--fp8-amax-compute-algo": (["--fp8-amax-compute-algo", "max"], "Transformer Engine"),
    "--fp8-param-gather": (["--fp8-param-gather"], "Transformer Engine"),
    "--grad-reduce-in-bf16": (["--grad-reduce-in-bf16"], "reduced in fp32"),
    "--no-mmap-bin-files": (["--no-mmap-bin-files"], "always memory-maps"),
    "--step-batch-size-schedule": (["--step-batch-size-schedule", "0:16 2.4B:320"], "ramp-up"),
    "--wandb-project": (["--wandb-project", "Mixtral"], "Weights & Biases"),
    "--wandb-exp-name": (["--wandb-exp-name", "x"], "Weights & Biases"),
}

# values of otherwise accepted flags that are rejected (or contradict another flag)
REJECTED_VALUES = [
    (["--ckpt-format", "torch_dist"], "legacy 'torch' layout"),
    (["--attention-backend", "unfused"], "no unfused attention path"),
    (["--attention-backend", "local"], "no unfused attention path"),
    ([*MOE, "--moe-token-dispatcher-type", "flex"], "DeepEP"),
    (["--transformer-impl", "inference_optimized"], "no inference-optimized layers"),
    (["--rotary-percent", "0.5"], "partial rotary"),
    (["--overlap-param-gather"], "add --use-distributed-optimizer"),
    (["--use-distributed-optimizer", "--overlap-param-gather", "--no-overlap-grad-reduce"],
     "needs overlapped gradient reduction"),
    (["--cross-entropy-loss-fusion", "--kernels", "torch"], "drop one of them"),
    (["--use-flash-attn", "--attention-backend", "fused"], "give one of them"),
    ([*MOE, "--expert-model-parallel-size", "8"], "does not divide --num-experts 4"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--lr-warmup-samples", "3", "--lr-warmup-iters", "1"], "exclude each other"),
    (["--lr-decay-samples", "30", "--lr-decay-iters", "3"], "exclude each other"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval must be >= 0"),
    (["--profile", "--profile-step-start", "6", "--profile-step-end", "4"], "--profile-step-start"),
]


def test_the_list_covers_the_scripts_and_every_flag_has_one_disposition():
    assert sorted(FLAGS) == sorted(set(FLAGS))
    assert set(ACCEPTED) | set(REJECTIONS) == set(FLAGS)
    assert not set(ACCEPTED) & set(REJECTIONS)
    # the README's table is the parser's: every rejected flag's reason is in REJECTED
    for flag in REJECTIONS:
        assert flag in REJECTED, flag
    scripts = [MEGATRON_LM / s for s in SCRIPTS]
    if not all(p.is_file() for p in scripts):
        pytest.skip(f"Megatron-LM's example scripts are not at {MEGATRON_LM} (set MEGATRON_LM_DIR); the "
                    "hard-coded list was checked")
    found = set().union(*(script_flags(p.read_text()) for p in scripts))
    assert found - set(FLAGS) == set(), "flags in Megatron-LM's example scripts that this test does not classify"
    assert set(FLAGS) - found == {"--seed"}  # the mixtral README's flag


@pytest.mark.parametrize("flag", sorted(f for f, (argv, _) in ACCEPTED.items() if argv is not None))
def test_accepted_flag_has_megatron_meaning(flag):
    argv, check = ACCEPTED[flag]
    if flag not in argv and argv:
        pytest.fail(f"{flag}'s case does not use it")
    args, config = parse(*argv)
    assert check(args, config), f"{flag}: {argv} parsed to an unexpected value"


@pytest.mark.parametrize("flag", sorted(REJECTIONS))
def test_rejected_flag_says_why(flag):
    argv, reason = REJECTIONS[flag]
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    message = str(info.value)
    assert reason in message and flag in message and "\n" not in message, message


@pytest.mark.parametrize("argv,reason", REJECTED_VALUES, ids=[" ".join(a) for a, _ in REJECTED_VALUES])
def test_rejected_value_says_why(argv, reason):
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert reason in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_mapped_and_rejected_flag_is_documented():
    readme = (ROOT / "README.md").read_text()
    for flag in list(MAPPED) + list(REJECTED):
        assert f"`{flag}`" in readme, f"README's 'Flags and tokenizers' table lacks {flag}"


def test_parallel_sizes_validate_against_world():
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--sequence-parallel"])
    validate_args(args, 4, None)
    assert args.data_parallel_size == 1 and parallel_config(args).sequence_parallel


def test_use_flash_attn_selects_the_flash_backend():
    args = parse_args(BASE + ["--use-flash-attn"])
    assert args.attention_backend == "flash"
    try:
        import flash_attn  # noqa: F401
    except ImportError:  # the flash backend needs the package, as Megatron's --use-flash-attn does
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            model_config(args, VOCAB).kernel_config
    else:
        assert model_config(args, VOCAB).kernel_config.attention_backend == "flash"


def test_transformer_impl_and_megatron_tokenizer_defaults():
    for impl in ("transformer_engine", "local"):
        args, config = parse("--transformer-impl", impl)
        assert args.transformer_impl == impl and config == parse()[1]  # the same model either way
    assert parse_args(BASE).tokenizer_type is None  # no tokenizer files: no tokenizer
    args, config = parse("--position-embedding-type", "rope", "--no-position-embedding")
    assert config.position_embedding_type == "rope"  # Megatron: RoPE models ignore it


# ---- flags the trainer implements, run in-process on a tiny model ----

def _train_in_process(tmp_path: Path, monkeypatch, extra: list[str]) -> dict[int, dict]:
    from megafast.training.trainer import pretrain

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "log.jsonl"
    pretrain(BASE[:-2] + ["--vocab-size", str(VOCAB), "--device", "cpu", "--log-interval", "1", "--eval-iters", "0",
                          "--log-jsonl", str(log)] + extra)
    return {r["iteration"]: r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "train"}


def test_manual_gc_disables_the_collector_and_collects_every_interval(tmp_path, monkeypatch):
    import megafast.training.trainer as trainer

    calls = []
    fake = SimpleNamespace(disable=lambda: calls.append("disable"), enable=lambda: calls.append("enable"),
                           collect=lambda generation=2: calls.append(f"collect{generation}"))
    monkeypatch.setattr(trainer, "gc", fake)
    records = _train_in_process(tmp_path, monkeypatch, ["--train-iters", "4", "--manual-gc", "--manual-gc-interval", "2"])
    assert sorted(records) == [1, 2, 3, 4]
    # Megatron: gc.disable() + gc.collect() before training, gc.collect() every interval
    assert calls == ["disable", "collect2", "collect2", "collect2", "enable"]


def test_num_workers_zero_reads_inline_with_the_same_batches(tmp_path, monkeypatch):
    import megafast.training.trainer as trainer

    threaded = _train_in_process(tmp_path / "a", monkeypatch, ["--train-iters", "3", "--num-workers", "2"])

    def no_thread(*a, **k):
        raise AssertionError("--num-workers 0 started the prefetch thread")

    monkeypatch.setattr(trainer, "MicroBatchPrefetcher", no_thread)
    inline = _train_in_process(tmp_path / "b", monkeypatch, ["--train-iters", "3", "--num-workers", "0"])
    assert [inline[i]["lm_loss"] for i in (1, 2, 3)] == [threaded[i]["lm_loss"] for i in (1, 2, 3)]


def test_exit_duration_in_mins_stops_and_saves(tmp_path, monkeypatch):
    records = _train_in_process(tmp_path, monkeypatch, ["--train-iters", "5", "--exit-duration-in-mins", "1e-9",
                                                        "--save", str(tmp_path / "ck")])
    assert sorted(records) == [1]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_lr_samples_flags_drive_the_schedule():
    # Megatron's sample-counted schedule: warm-up over 3 samples then cosine to min_lr over 30 samples
    s = scheduler("--lr-warmup-samples", "3", "--lr-decay-samples", "30", "--lr-decay-style", "cosine",
                  "--min-lr", "1e-4")
    assert (s.warmup_steps, s.decay_steps) == (3, 30)


def test_profile_needs_cuda_on_cpu(monkeypatch):
    from megafast.training.trainer import setup

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--profile .* needs a CUDA device"):
        setup(BASE + ["--profile", "--device", "cpu"])


# ---- the gpt3 example end to end ----

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gpt3_example_argv(tmp: Path) -> list[str]:
    """examples/gpt3/train_gpt3_175b_distributed.sh's arguments, in its order, sizes shrunk to a tiny
    model on one CPU process; --step-batch-size-schedule is dropped (megafast rejects it, and Megatron
    0.19 itself refuses it together with --global-batch-size)."""
    from megafast.data.indexed_dataset import IndexedDatasetBuilder

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    vocab["th"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp / "gpt2-vocab.json").write_text(json.dumps(vocab))
    (tmp / "gpt2-merges.txt").write_text("#version: 0.2\nt h\n")
    rng = np.random.default_rng(0)
    prefix = str(tmp / "my-gpt3_00_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(1000):  # the test split's 1/1000 share has a document
        doc = rng.integers(0, len(vocab) - 1, int(rng.integers(5, 20))).tolist() + [vocab["<|endoftext|>"]]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    ckpt, tb = str(tmp / "ckpt"), str(tmp / "tb")
    return [
        # GPT_MODEL_ARGS
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--attention-backend", "auto",
        # TRAINING_ARGS
        "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16",
        "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001",
        "--lr-decay-iters", "430000",
        # MODEL_PARALLEL_ARGS
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        # DATA_ARGS
        "--data-path", prefix, "--vocab-file", str(tmp / "gpt2-vocab.json"), "--merge-file",
        str(tmp / "gpt2-merges.txt"), "--split", "949,50,1",
        # EVAL_AND_LOGGING_ARGS
        "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1", "--save", ckpt, "--load", ckpt,
        "--eval-iters", "1", "--tensorboard-dir", tb,
    ]


def test_gpt3_example_runs_pretrain_gpt(tmp_path):
    argv = _gpt3_example_argv(tmp_path)
    pytest.importorskip("tensorboard")
    script = (MEGATRON_LM / SCRIPTS[0])
    if script.is_file():  # the same flags as the script, in the same order (values aside)
        names = [a for a in argv if a.startswith("--")]
        in_script = [f for f in re.findall(r"(--[a-z][a-z0-9-]*)", script.read_text().split("GPT_MODEL_ARGS=(")[1])
                     if f in set(FLAGS) and f != "--step-batch-size-schedule"]
        assert names == list(dict.fromkeys(in_script)), names
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py"), *argv], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "iteration        2/       2" in out or "iteration 2" in out, out[-3000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert any((tmp_path / "tb").iterdir())  # --tensorboard-dir got events


# ---- the llama and mixtral examples: what stops them ----

LLAMA_REJECTED = ["--apply-layernorm-1p", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5",
                  "--grad-reduce-in-bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                  "--fp8-amax-compute-algo", "max", "--fp8-param-gather", "--no-mmap-bin-files",
                  "--ckpt-format", "torch_dist"]


def _llama_example_argv(tmp: Path) -> list[str]:
    """examples/llama/train_llama3_8b_h100_fp8.sh (mock data), sizes shrunk, its rejected flags removed."""
    return [
        "--use-mcore-models", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
        "--seq-length", "16", "--max-position-embeddings", "16", "--position-embedding-type", "rope",
        "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
        "--swiglu", "--normalization", "RMSNorm", "--init-method-std", "0.0134", "--attention-backend", "fused",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--micro-batch-size", "1", "--global-batch-size", "2", "--train-samples", "20", "--lr-decay-samples", "18",
        "--lr-warmup-samples", "4", "--lr", "0.00015", "--min-lr", "0.00001", "--lr-decay-style", "cosine",
        "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16",
        "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
        "--exit-duration-in-mins", "235",
        "--tensor-model-parallel-size", "1", "--context-parallel-size", "1", "--sequence-parallel",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--data-cache-path",
        str(tmp / "cache"), "--tiktoken-pattern", "v2", "--split", "99,1,0", "--no-create-attention-mask-in-dataloader",
        "--num-workers", "1",
        "--log-interval", "1", "--eval-iters", "32", "--eval-interval", "100", "--save-interval", "1000",
        "--log-throughput", "--profile", "--profile-step-start", "4", "--profile-step-end", "6",
        "--distributed-timeout-minutes", "60", "--save", str(tmp / "ck"), "--load", str(tmp / "ck"),
        "--tensorboard-dir", str(tmp / "tb"),
    ]


def test_llama_example_validates_without_its_rejected_flags(tmp_path):
    argv = _llama_example_argv(tmp_path)
    script = MEGATRON_LM / SCRIPTS[1]
    if script.is_file():  # every flag of the script is here or among the rejected ones
        used = {a for a in argv + LLAMA_REJECTED if a.startswith("--")}
        assert script_flags(script.read_text()) - used == {"--data-path", "--tokenizer-model"}  # the real-data branch
    args = parse_args(argv)
    validate_args(args, 1, None)
    config = model_config(args, 128)
    assert (config.num_query_groups, config.kv_channels, config.attention_backend) == (2, 16, "sdpa")
    assert args.train_iters == 10 and scheduler_of(args).decay_steps == 18
    for i in range(0, len(LLAMA_REJECTED)):
        if LLAMA_REJECTED[i].startswith("--"):
            j = i + 1
            while j < len(LLAMA_REJECTED) and not LLAMA_REJECTED[j].startswith("--"):
                j += 1
            with pytest.raises(SystemExit, match=re.escape(LLAMA_REJECTED[i])):
                parse_args(argv + LLAMA_REJECTED[i:j])


def scheduler_of(args):
    from megafast.training.trainer import _scheduler

    return _scheduler(args)


def test_mixtral_example_runs_at_its_expert_parallel_layout():
    argv = ["--use-mcore-models", "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "64",
            "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
            "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
            "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
            "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
            "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000",
            "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
            "--overlap-param-gather", "--overlap-grad-reduce", "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", "tokenizer.model", "--mock-data", "--split", "99990,8,2",
            "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "1e-4", "--train-iters", "500000",
            "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
            "--lr-warmup-iters", "500", "--clip-grad", "1.0", "--bf16",
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4",
            "--expert-model-parallel-size", "8", "--use-distributed-optimizer", "--sequence-parallel",
            "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000", "--eval-iters", "10",
            "--save", "ck", "--load", "ck", "--tensorboard-dir", "ck/tensorboard", "--no-load-optim", "--no-load-rng"]
    args = parse_args(argv)
    assert args.tokenizer_type == "SentencePieceTokenizer" and args.position_embedding_type == "rope"
    # the example's 64 GPUs would be PP 4 x DP 16; 32 ranks give DP 8, which EP 8 divides
    validate_args(args, 32, 128)
    config = model_config(args, 128)
    assert config.num_experts == 8 and args.data_parallel_size == 8 and args.expert_model_parallel_size == 8
    assert args.moe_token_dispatcher_type == "alltoall"
    with pytest.raises(SystemExit, match="--expert-model-parallel-size 8 does not divide the data-parallel size 2"):
        validate_args(args, 8, 128)
