"""QLoRA (--qlora): the adapted layers' frozen base weights held in NF4 and dequantized on the fly.

In process: a QLoRA model equals a plain LoRA model (written here) whose base weights were replaced
by their NF4 round trip, in loss and adapter gradients (also double-quantized); no full-precision
base weight is left as a parameter or in the state dict; TP = 2 equals TP = 1 (gloo); merging
adapters into the dequantized base reproduces the QLoRA logits.

Packed rows: a QLoRA model's per-token losses and adapter gradients on a packed row equal those of
its samples one by one.

End to end (pretrain_gpt.py's loop in two launches, learnable corpus): QLoRA lowers the loss from
a saved base; TP = 2 and PP = 2 equal TP = 1 to 1e-5 per iteration, the TP = 1 run resumed from its
adapters-only checkpoint; a packed SFT run trains; ``convert.py --merge-lora`` of the TP = 2 run
exports an HF model whose logits equal the QLoRA model's (1e-5, fp32).
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import run_distributed
from pretrain_run import train_records
from seeding import draw_seed
from sft_data import random_records, write_sft_dataset

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


def test_qlora_packed_rows_equal_their_samples_one_by_one():
    """Packing (megafast.model.packing) under QLoRA: per-token losses of a packed row equal each
    sample's alone, and the adapters' gradients of the row's summed loss the sum over the samples."""
    from megafast.model.packing import PackedSeqParams, segment_ids_from_lengths

    seed = draw_seed()
    model = GPTModel(config(), ParallelState.single(), seed=seed)
    apply_lora(model, LORA, seed)
    fill_b(model, 0, 1)
    assert quantize_base_(model, QLoRAConfig(), backend="torch") > 0
    lengths, s = [[5, 9, 2], [16]], 16
    segments = segment_ids_from_lengths(lengths, s)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    ids, labels = batch()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    packed = model(ids, position_ids=positions, labels=labels, packed_seq_params=PackedSeqParams(segments))
    packed.sum().backward()
    want = {n: p.grad.clone() for n, p in adapters.items()}
    model.zero_grad()
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = model(ids[r:r + 1, start:start + n], labels=labels[r:r + 1, start:start + n])
            torch.testing.assert_close(packed[r:r + 1, start:start + n], alone, rtol=1e-5, atol=1e-6,
                                       msg=f"seed={seed}")
            alone.sum().backward()
            start += n
    for n, p in adapters.items():
        assert rel_err(p.grad, want[n]) <= 1e-5, f"seed={seed}: {n}"
    # the packing mask matters: the same row unpacked gives other losses
    assert rel_err(model(ids, labels=labels), packed) > 1e-3


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
    """tools/checkpoint/convert.py in this process (its imports are already paid for)."""
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools/checkpoint/convert.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--model-type", "GPT", "--loader", "megafast", "--no-progress", *args])


def train_runs(argvs: list[list[str]]) -> None:
    """pretrain_gpt.py's setup/train for each argv in turn, in this process group."""
    from megafast.training.trainer import setup, train

    for argv in argvs:
        run = setup(argv)
        try:
            train(run)
        finally:
            if run.checkpointer is not None:
                run.checkpointer.close()
            run.logger.close()


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


def single_process_runs(rank: int, world: int, argvs: list[list[str]], base: str, adapters: str,
                        held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-process runs, then the QLoRA logits on ``held`` at the start (the base's checkpoint:
    adapters at their init) and with the trained ``adapters``."""
    train_runs(argvs)
    return tuple(qlora_logits_worker(rank, world, base, a, held) for a in (base, adapters))


def two_process_runs(rank: int, world: int, argvs: list[list[str]], base: str, adapters: str,
                     ids: torch.Tensor) -> torch.Tensor:
    """The TP = 2 and PP = 2 runs, then the TP = 2 run's QLoRA logits on ``ids``."""
    train_runs(argvs)
    return qlora_logits_worker(rank, world, base, adapters, ids)


def test_qlora_runs_lower_the_loss_agree_across_layouts_and_export(tmp_path):
    """Two launches (one process, then two) run pretrain_gpt.py's loop for every run in turn."""
    from transformers import AutoModelForCausalLM

    from megafast.training.checkpointing import load_checkpoint  # noqa: F401  (imported before the spawns)

    seed = draw_seed("corpus_seed")
    data = corpus(tmp_path, seed)
    base = tmp_path / "base"
    common = MODEL + TRAIN + data + QLORA
    log = {name: tmp_path / f"{name}.jsonl" for name in ("tp1", "tp2", "pp2", "sft")}
    sft = write_sft_dataset(str(tmp_path / "sft"), random_records(300, VOCAB, 2, seed=seed, max_prompt=12,
                                                                  max_answer=24), ["a", "b"])
    one = [MODEL + TRAIN + data + ["--train-iters", "2", "--save", str(base)],
           common + ["--pretrained-checkpoint", str(base), "--train-iters", "8", "--exit-interval", "4",
                     "--save", str(tmp_path / "tp1"), "--log-jsonl", str(log["tp1"])],
           common + ["--pretrained-checkpoint", str(base), "--train-iters", "8", "--load", str(tmp_path / "tp1"),
                     "--save", str(tmp_path / "tp1"), "--log-jsonl", str(log["tp1"])],  # resumed from adapters
           # packed SFT samples under QLoRA
           MODEL + TRAIN + QLORA + ["--data-path", sft, "--split", "98,2,0", "--data-cache-path",
                                    str(tmp_path / "cache"), "--tokenizer-type", "NullTokenizer", "--vocab-size",
                                    str(VOCAB), "--dataset-type", "sft", "--packing", "--train-iters", "8",
                                    "--pretrained-checkpoint", str(base), "--log-jsonl", str(log["sft"])]]
    held = corpus_sequences(seed)
    # the base is saved by the first run; the runs after it only read it
    before, after = run_distributed(single_process_runs, 1, one, str(base), str(tmp_path / "tp1"), held)[0]
    before, after = token_loss(before, held), token_loss(after, held)
    assert after < before - 0.1, f"QLoRA did not lower the loss: {before:.4f} -> {after:.4f} (corpus_seed={seed})"

    for name, flag in (("tp2", "--target-tensor-parallel-size"), ("pp2", "--target-pipeline-parallel-size")):
        convert(["--saver", "megafast", "--load-dir", str(base), "--save-dir", str(tmp_path / f"base_{name}"), flag, "2"])
    two = [common + ["--train-iters", "8", "--tensor-model-parallel-size", "2", "--pretrained-checkpoint",
                     str(tmp_path / "base_tp2"), "--save", str(tmp_path / "tp2"), "--log-jsonl", str(log["tp2"])],
           common + ["--train-iters", "8", "--pipeline-model-parallel-size", "2", "--pretrained-checkpoint",
                     str(tmp_path / "base_pp2"), "--log-jsonl", str(log["pp2"])]]
    ids = batch()[0] % (VOCAB - 1)
    want = run_distributed(two_process_runs, 2, two, str(tmp_path / "base_tp2"), str(tmp_path / "tp2"), ids)[0]

    losses = {}
    for name in ("tp1", "tp2", "pp2", "sft"):
        recs = train_records(log[name])
        assert sorted(recs) == list(range(1, 9)), name
        losses[name] = np.array([recs[i]["lm_loss"] for i in range(1, 9)])
    ref = losses["tp1"]
    for name in ("tp2", "pp2"):
        err = np.max(np.abs(losses[name] - ref) / np.abs(ref))
        assert err <= 1e-5, f"{name}: lm_loss relative error {err:.2e} (corpus_seed={seed})\n{losses[name]}\n{ref}"
    # packed SFT trains too (the packed rows' per-token equality: test_qlora_packed_rows_equal_their_samples)
    first, last = losses["sft"][:3].mean(), losses["sft"][-3:].mean()
    assert np.isfinite(losses["sft"]).all() and last < first, f"packed QLoRA SFT: {losses['sft']} (corpus_seed={seed})"

    ckpt = torch.load(tmp_path / "tp2" / "iter_0000008" / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=False)
    assert ckpt["model"] and all(is_adapter_name(k) for k in ckpt["model"])  # adapters only, no NF4 buffers
    hf = tmp_path / "hf"
    convert(["--saver", "hf", "--merge-lora", "--load-dir", str(tmp_path / "tp2"), "--save-dir", str(hf)])
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf_model(ids).logits[..., :VOCAB]
    assert rel_err(got, want) <= 1e-5, f"corpus_seed={seed}"
