"""QLoRA (--qlora): the adapted layers' frozen base weights held in NF4 and dequantized on the fly.

In process: a QLoRA model equals a plain LoRA model (written here) whose base weights were replaced
by their NF4 round trip, in loss and adapter gradients (also double-quantized); no full-precision
base weight is left as a parameter or in the state dict; TP = 2 equals TP = 1 (gloo); merging
adapters into the dequantized base reproduces the QLoRA logits.

End to end (pretrain_gpt.py under torchrun, learnable corpus): QLoRA lowers the loss from a saved
base; TP = 2 and PP = 2 equal TP = 1 to 1e-5 per iteration, the TP = 1 run resumed from its
adapters-only checkpoint; ``convert.py --merge-lora`` of the TP = 2 run exports an HF model whose
logits equal the QLoRA model's (1e-5, fp32).
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import run_distributed
from pretrain_run import torchrun, train_records
from seeding import draw_seed

from megafast.config import GPTConfig, LoRAConfig, ParallelConfig, QLoRAConfig
from megafast.data.indexed_dataset import IndexedDatasetBuilder
from megafast.model import GPTModel
from megafast.model.lora import LINEAR_OUT, apply_lora, is_adapter_name, merge_lora_
from megafast.model.qlora import quantize_base_, quantized_bytes
from megafast.parallel import ParallelState
from megafast.parallel.layers import gather_full
from megafast.parallel.mappings import gather_from_tensor_parallel_region
from megafast.quant import NF4Weight, nf4_dequantize, nf4_quantize

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
LORA = LoRAConfig(rank=4, alpha=8.0)
ADAPTED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def config() -> GPTConfig:
    # every TP = 2 shard row is a multiple of 64 long (128 / 2 inputs for the row-parallel layers),
    # so each shard's NF4 blocks are blocks of the full weight: TP = 2 equals TP = 1
    return GPTConfig(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=VOCAB, max_position_embeddings=32, position_embedding_type="rope", normalization="RMSNorm",
        activation="swiglu", add_bias_linear=False, tie_embeddings=False, init_method_std=0.05,
        make_vocab_size_divisible_by=1,
    )


def fill_b(model: torch.nn.Module, tp_rank: int, tp: int) -> None:
    """B starts at zero: give it TP-invariant random values (the full B drawn per name, then sliced)."""
    from tp_shards import chunk_shard

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(LINEAR_OUT):
                sharded = getattr(p, "tensor_model_parallel", False)
                shape = (p.shape[0] * tp, p.shape[1]) if sharded else tuple(p.shape)
                full = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.1
                p.copy_(chunk_shard(full, 0, tp_rank, tp, p.partition_stride) if sharded else full)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (2, 16), generator=g), torch.randint(0, VOCAB, (2, 16), generator=g)


def run_model(state: ParallelState, seed: int, qlora: QLoRAConfig | None, round_trip: QLoRAConfig | None = None) -> dict:
    """Loss, logits and gathered adapter gradients of a (Q)LoRA model on this rank.

    ``qlora``: quantize the base with megafast.model.qlora; ``round_trip``: the reference, a plain
    LoRA model whose base parameters are overwritten (here) with nf4_dequantize(nf4_quantize(W)).
    """
    model = GPTModel(config(), state, seed=seed)
    apply_lora(model, LORA, seed)
    fill_b(model, state.tp_rank, state.tp_size)
    if round_trip is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".weight") and name.rsplit(".", 2)[-2] in ADAPTED:
                    q = nf4_quantize(p, round_trip.block_size, round_trip.double_quant)
                    p.copy_(nf4_dequantize(q, backend="torch"))
    quantized = quantize_base_(model, qlora, backend="torch") if qlora is not None else 0
    nbytes = quantized_bytes(model)
    ids, labels = batch()
    loss = model(ids, labels=labels)
    (loss.sum() / loss.numel()).backward()
    params = dict(model.named_parameters())
    grads = {n: gather_full(p.grad, p, state.tp_group).clone() for n, p in params.items() if is_adapter_name(n)}
    with torch.no_grad():
        logits = gather_from_tensor_parallel_region(model(ids), state.tp_group)[..., :VOCAB]
        merge_lora_(model, LORA.scale)  # QLoRA: into the dequantized base
        merged_logits = gather_from_tensor_parallel_region(model(ids), state.tp_group)[..., :VOCAB]
    return {"loss": loss.detach(), "grads": grads, "logits": logits, "merged_logits": merged_logits,
            "params": sorted(params), "state_keys": sorted(model.state_dict()), "quantized": quantized,
            "nbytes": nbytes}


def tp_worker(rank: int, world: int, seed: int, qlora: QLoRAConfig) -> dict:
    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world))
    return run_model(state, seed, qlora)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_model_equals_lora_on_the_nf4_round_trip(double_quant):
    seed = draw_seed()
    qcfg = QLoRAConfig(double_quant=double_quant)
    got = run_model(ParallelState.single(), seed, qcfg)
    ref = run_model(ParallelState.single(), seed, None, round_trip=qcfg)
    plain = run_model(ParallelState.single(), seed, None)
    assert rel_err(got["loss"], ref["loss"]) <= 1e-6, f"seed={seed}"
    for name, g in ref["grads"].items():
        assert rel_err(got["grads"][name], g) <= 1e-5, f"seed={seed}: {name}"
    assert rel_err(got["merged_logits"], got["logits"]) <= 1e-5, f"seed={seed}"
    # the quantization is real: the loss moved off the full-precision model's, but not far
    shift = abs(got["loss"].mean() / plain["loss"].mean() - 1).item()
    assert 0 < shift < 0.02, f"seed={seed}: mean loss moved by {shift:.4f}"
    # the adapted layers' base weights are gone from the parameters and the state dict
    bases = [n for n in got["params"] if n.endswith(".weight") and n.rsplit(".", 2)[-2] in ADAPTED]
    assert bases == [] and all(k in ref["state_keys"] for k in got["state_keys"])
    assert not any(".weight.codes" in k or "absmax" in k for k in got["state_keys"])
    # storage: 4.5 bits per element (4.127 with double quantization; these weights are small, so the
    # fp32 second-level scales and offset of each weight add a little)
    bits = 8 * got["nbytes"] / got["quantized"]
    assert (bits == 4.5) if not double_quant else (4.127 < bits < 4.2), bits


def test_qlora_tp2_equals_tp1():
    seed = draw_seed()
    qcfg = QLoRAConfig()
    tp1 = run_model(ParallelState.single(), seed, qcfg)
    tp2 = run_distributed(tp_worker, 2, seed, qcfg)
    for r in tp2:
        assert rel_err(r["loss"], tp1["loss"]) <= 1e-5, f"seed={seed}"
        assert rel_err(r["logits"], tp1["logits"]) <= 1e-5, f"seed={seed}"
        for name, g in tp1["grads"].items():
            assert rel_err(r["grads"][name], g) <= 1e-5, f"seed={seed}: {name}"
    assert sum(r["quantized"] for r in tp2) == tp1["quantized"]  # each rank quantized its own shard


def test_flags_need_lora_and_quantization_keeps_trainable_weights_out():
    from megafast.arguments import parse_args, validate_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64"]
    with pytest.raises(SystemExit, match="--lora-rank"):
        validate_args(parse_args(base + ["--qlora"]), 1, 64)
    with pytest.raises(SystemExit, match="needs --qlora"):
        validate_args(parse_args(base + ["--lora-rank", "2", "--qlora-double-quant"]), 1, 64)
    with pytest.raises(SystemExit, match="block-size"):
        validate_args(parse_args(base + ["--lora-rank", "2", "--qlora", "--qlora-block-size", "63"]), 1, 64)
    model = GPTModel(config(), ParallelState.single(), seed=1)
    apply_lora(model, LORA, 1)
    model.decoder.layers["0"].mlp.linear_fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable weight"):
        quantize_base_(model, QLoRAConfig())
    assert isinstance(model.decoder.layers["0"].self_attention.linear_qkv.weight, torch.nn.Parameter)  # untouched
    model.decoder.layers["0"].mlp.linear_fc1.weight.requires_grad_(False)
    assert quantize_base_(model, QLoRAConfig()) > 0
    assert isinstance(model.decoder.layers["0"].self_attention.linear_qkv.weight, NF4Weight)


@pytest.mark.parametrize("dtype,double_quant", [(torch.bfloat16, False), (torch.float32, True)])
def test_planner_qlora_row_equals_a_real_step(dtype, double_quant):
    """Allocated bytes of a QLoRA model after one optimizer step == megafast.planner.qlora_memory."""
    from megafast.planner import Layout, qlora_memory
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    def storage_bytes(tensors) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    lora, qcfg = LoRAConfig(rank=4, alpha=8.0, target_modules=("linear_qkv", "linear_fc2")), QLoRAConfig(double_quant=double_quant)
    state = ParallelState.single()
    model = GPTModel(config(), state, seed=1, params_dtype=dtype)
    apply_lora(model, lora, 1)
    quantize_base_(model, qcfg)
    ddp = DataParallel([model], state)
    opt = build_optimizer([model], ddp, state, OptimizerConfig(bf16=dtype == torch.bfloat16))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(draw_seed()))
    model(ids, labels=ids).sum().backward()
    assert opt.step().success
    states = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    params = list(model.parameters())
    got = {
        "base_nf4": quantized_bytes(model),
        "frozen": storage_bytes(p for p in params if not p.requires_grad),
        "adapters": storage_bytes(p for p in params if p.requires_grad),
        "gradients": storage_bytes(b.grad_data for b in ddp.buffers),
        "master_weights": storage_bytes(s.master for s in opt.shards if not s.alias),
        "optimizer_states": storage_bytes(states),
    }
    plan = qlora_memory(config(), Layout(dtype="bf16" if dtype == torch.bfloat16 else "fp32"), lora, qcfg)
    assert got == {k: getattr(plan, k) for k in got}
    bits = 8 * plan.base_nf4 / plan.base_elements
    assert bits == 4.5 if not double_quant else 4.127 < bits < 4.2


# ---- end to end: pretrain_gpt.py --qlora, TP / PP / resume, merged HF export ----

MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
         "--num-query-groups", "2", "--ffn-hidden-size", "128", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--make-vocab-size-divisible-by", "1", "--init-method-std", "0.05"]
TRAIN = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
         "--min-lr", "1e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "0", "--seed", "77", "--device", "cpu", "--attention-dropout", "0", "--hidden-dropout", "0"]
QLORA = ["--lora-rank", "8", "--lora-alpha", "16", "--qlora"]


def corpus(tmp: Path, seed: int) -> list[str]:
    """Learnable documents (each counts up from a random start with a random stride), EOD = VOCAB - 1."""
    prefix = str(tmp / "corpus_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(300):
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return ["--data-path", prefix, "--split", "98,2,0", "--data-cache-path", str(tmp / "cache"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]


def corpus_sequences(seed: int, count: int = 32, length: int = 16) -> torch.Tensor:
    """[count, length] ids: the first documents :func:`corpus` writes for ``seed``, padded with EOD."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        start, stride, n = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(n)) % (VOCAB - 1)).tolist() + [VOCAB - 1] * length
        rows.append(doc[:length])
    return torch.tensor(rows)


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``logits`` [b, s, V] on ``ids`` [b, s]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def convert(args: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "tools/checkpoint/convert.py"), "--model-type", "GPT", "--loader", "megafast",
           "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def qlora_logits_worker(rank: int, world: int, base: str, adapters: str, ids: torch.Tensor) -> torch.Tensor:
    """The QLoRA model as the run had it: base loaded, adapters loaded, then quantized."""
    from megafast.training.checkpointing import load_checkpoint

    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world))
    cfg = GPTConfig(**{**config().__dict__, "vocab_size": VOCAB})
    model = GPTModel(cfg, state, seed=5)
    apply_lora(model, LoRAConfig(rank=8, alpha=16.0), 5)
    assert load_checkpoint(base, model, None, None, state, finetune=True) is not None
    assert load_checkpoint(adapters, model, None, None, state, finetune=True) is not None
    assert quantize_base_(model, QLoRAConfig()) > 0
    with torch.no_grad():
        return gather_from_tensor_parallel_region(model.eval()(ids), state.tp_group)[..., :VOCAB]


def test_qlora_runs_lower_the_loss_agree_across_layouts_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    seed = draw_seed("corpus_seed")
    data = corpus(tmp_path, seed)
    base = tmp_path / "base"
    torchrun(1, MODEL + TRAIN + data + ["--train-iters", "2", "--save", str(base)])
    for name, flag in (("tp2", "--target-tensor-parallel-size"), ("pp2", "--target-pipeline-parallel-size")):
        convert(["--saver", "megafast", "--load-dir", str(base), "--save-dir", str(tmp_path / f"base_{name}"), flag, "2"])
    common = MODEL + TRAIN + data + QLORA
    losses = {}
    for name, nproc, extra in (("tp1", 1, ["--train-iters", "8", "--exit-interval", "4"]),  # resumed below
                               ("tp2", 2, ["--train-iters", "8", "--tensor-model-parallel-size", "2"]),
                               ("pp2", 2, ["--train-iters", "8", "--pipeline-model-parallel-size", "2"])):
        start = base if name == "tp1" else tmp_path / f"base_{name}"  # the same base, resharded
        torchrun(nproc, common + extra + ["--pretrained-checkpoint", str(start), "--save", str(tmp_path / name),
                                          "--log-jsonl", str(tmp_path / f"{name}.jsonl")])
    torchrun(1, common + ["--pretrained-checkpoint", str(base), "--train-iters", "8", "--load", str(tmp_path / "tp1"),
                          "--save", str(tmp_path / "tp1"), "--log-jsonl", str(tmp_path / "tp1.jsonl")])
    for name in ("tp1", "tp2", "pp2"):
        recs = train_records(tmp_path / f"{name}.jsonl")
        assert sorted(recs) == list(range(1, 9)), name
        losses[name] = np.array([recs[i]["lm_loss"] for i in range(1, 9)])
    ref = losses["tp1"]
    # the loss falls: on fixed sequences of the corpus (8 iterations of single batches are too noisy to
    # compare), the trained adapters against the start (the base's checkpoint: adapters at their init)
    held = corpus_sequences(seed)
    before, after = (token_loss(run_distributed(qlora_logits_worker, 1, str(base), str(a), held)[0], held)
                     for a in (base, tmp_path / "tp1"))
    assert after < before - 0.1, f"QLoRA did not lower the loss: {before:.4f} -> {after:.4f} (corpus_seed={seed})"
    for name in ("tp2", "pp2"):
        err = np.max(np.abs(losses[name] - ref) / np.abs(ref))
        assert err <= 1e-5, f"{name}: lm_loss relative error {err:.2e} (corpus_seed={seed})\n{losses[name]}\n{ref}"

    ckpt = torch.load(tmp_path / "tp2" / "iter_0000008" / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=False)
    assert ckpt["model"] and all(is_adapter_name(k) for k in ckpt["model"])  # adapters only, no NF4 buffers
    hf = tmp_path / "hf"
    convert(["--saver", "hf", "--merge-lora", "--load-dir", str(tmp_path / "tp2"), "--save-dir", str(hf)])
    ids = batch()[0] % (VOCAB - 1)
    want = run_distributed(qlora_logits_worker, 2, str(tmp_path / "base_tp2"), str(tmp_path / "tp2"), ids)[0]
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf_model(ids).logits[..., :VOCAB]
    assert rel_err(got, want) <= 1e-5, f"corpus_seed={seed}"
