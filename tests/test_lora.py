"""LoRA adapters: one adapted column/row layer equals ``W x + (alpha / r) B A dropout(x)`` written by
hand from full tensors (dropout masks drawn independently), at TP 1 and 2, forward and gradients;
TP = 2 (with and without sequence parallelism) equals TP = 1 in loss and adapter
gradients, the base stays frozen, adapters start TP-invariant, merging is exact (per shard too),
and an end-to-end LoRA run (TP = 2) exports through ``convert.py --merge-lora`` to a transformers
model whose logits match the adapted megafast model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from seeding import draw_seed
from tp_shards import chunk_shard, chunk_unshard

from megafast.config import GPTConfig, LoRAConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.model.lora import (
    LINEAR_IN,
    LINEAR_OUT,
    adapter_state_dict,
    apply_lora,
    is_adapter_name,
    merge_lora_,
    merge_state_dict,
)
from megafast.parallel import ParallelState, sync_sequence_parallel_grads
from megafast.parallel.layers import gather_full
from megafast.parallel.mappings import gather_from_tensor_parallel_region

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
LORA = LoRAConfig(rank=4, alpha=8.0)


def config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        vocab_size=VOCAB, max_position_embeddings=32, position_embedding_type="rope", normalization="RMSNorm",
        activation="swiglu", add_bias_linear=False, tie_embeddings=False, init_method_std=0.1,
        make_vocab_size_divisible_by=1,
    )
    base.update(kw)
    return GPTConfig(**base)


def fill_b(model: torch.nn.Module, tp_rank: int, tp: int) -> None:
    """B starts at zero (no gradient reaches A then): give it full random values, sharded like B."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(LINEAR_OUT):
                sharded = getattr(p, "tensor_model_parallel", False)
                shape = (p.shape[0] * tp, p.shape[1]) if sharded else tuple(p.shape)
                full = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.2
                p.copy_(chunk_shard(full, 0, tp_rank, tp, p.partition_stride) if sharded else full)


def batch(b: int = 2, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


def run_lora(state: ParallelState, seed: int) -> dict:
    """Forward/backward of a LoRA model on this rank; gathered adapter weights and gradients."""
    model = GPTModel(config(), state, seed=seed)
    adapted = apply_lora(model, LORA, seed)
    fill_b(model, state.tp_rank, state.tp_size)
    params = dict(model.named_parameters())
    init = {n: gather_full(p.detach(), p, state.tp_group).clone() for n, p in params.items() if is_adapter_name(n)}
    ids, labels = batch()
    loss = model(ids, labels=labels)
    (loss.sum() / loss.numel()).backward()
    sync_sequence_parallel_grads(model, state.tp_group)
    frozen = [n for n, p in params.items() if not is_adapter_name(n) and (p.requires_grad or p.grad is not None)]
    grads = {n: gather_full(p.grad, p, state.tp_group).clone() for n, p in params.items() if is_adapter_name(n)}
    with torch.no_grad():
        logits = gather_from_tensor_parallel_region(model(ids), state.tp_group)[..., :VOCAB]
        shards = {k: v.clone() for k, v in model.state_dict().items()}
        merged_shards = merge_state_dict(shards, LORA.scale)
        merge_lora_(model, LORA.scale)
        merged_logits = gather_from_tensor_parallel_region(model(ids), state.tp_group)[..., :VOCAB]
        merged_full = {n: gather_full(p.detach(), p, state.tp_group).clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "init": init, "frozen": frozen, "adapted": adapted,
            "logits": logits, "merged_logits": merged_logits, "merged_shards": merged_shards,
            "merged_full": merged_full, "tp_rank": state.tp_rank}


def worker(rank: int, world: int, sp: bool, seed: int) -> dict:
    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sp))
    return run_lora(state, seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def tp1() -> dict:
    return run_lora(ParallelState.single(), 1234)


def test_base_is_frozen_and_only_adapters_train(tp1):
    assert tp1["frozen"] == []
    assert len(tp1["adapted"]) == 2 * 4  # linear_qkv, linear_proj, linear_fc1, linear_fc2 per layer
    assert all(g.abs().sum() > 0 for g in tp1["grads"].values())


@pytest.mark.parametrize("sp", [False, True])
def test_lora_tp2_equals_tp1(tp1, sp):
    ranks = run_distributed(worker, 2, sp, 1234)
    got = ranks[0]
    assert rel_err(got["loss"], tp1["loss"]) <= 1e-5
    assert set(got["grads"]) == set(tp1["grads"])
    for name, grad in tp1["grads"].items():
        assert torch.equal(got["init"][name], tp1["init"][name]), f"initial {name} differs between TP=1 and TP=2"
        err = rel_err(got["grads"][name], grad)
        assert err <= 1e-5, f"sp={sp} grad {name}: relative error {err:.2e}"
    # Merging is shard-local: the merged TP shards are the shards of the merged full weights.
    layers = tuple(f"{layer}.weight" for layer in tp1["adapted"])
    for r in ranks:
        assert not any(is_adapter_name(k) for k in r["merged_shards"])
        for name in layers:
            full, part = tp1["merged_full"][name], r["merged_shards"][name]
            assert rel_err(part, _shard_like(name, full, r["tp_rank"], part.shape)) <= 1e-6, name
    assert rel_err(got["merged_logits"], tp1["logits"]) <= 1e-5


def _shard_like(name: str, full: torch.Tensor, rank: int, shape: torch.Size) -> torch.Tensor:
    if full.shape == shape:
        return full
    dim = 0 if full.shape[0] != shape[0] else 1
    stride = 2 if name.endswith("linear_fc1.weight") else 1
    return chunk_shard(full, dim, rank, 2, stride)


def test_merge_reproduces_the_adapted_model(tp1):
    assert rel_err(tp1["merged_logits"], tp1["logits"]) <= 1e-5
    a = tp1["init"][f"decoder.layers.0.self_attention.linear_qkv.{LINEAR_IN}"]
    assert a.abs().max() <= 1 / 32**0.5  # U(-1/sqrt(in), 1/sqrt(in))


def test_adapter_state_dict_and_config_errors():
    model = GPTModel(config(), seed=1)
    apply_lora(model, LoRAConfig(2, 4.0, target_modules=("linear_qkv",)), 1)
    keys = sorted(adapter_state_dict(model))
    assert keys == [f"decoder.layers.{i}.self_attention.linear_qkv.{w}" for i in range(2) for w in (LINEAR_IN, LINEAR_OUT)]
    with pytest.raises(ValueError, match="choose among linear_qkv"):
        LoRAConfig(2, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="--lora-rank must be >= 1"):
        LoRAConfig(0)


# ---- end to end: train LoRA at TP=2, merge, export to HF, compare logits ----

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
         "--num-query-groups", "2", "--ffn-hidden-size", "48", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--make-vocab-size-divisible-by", "1", "--init-method-std", "0.1"]
TRAIN = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
         "--log-interval", "1", "--eval-iters", "0", "--seed", "99", "--device", "cpu", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--attention-dropout", "0",
         "--hidden-dropout", "0", "--tensor-model-parallel-size", "2"]


def torchrun(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "pretrain_gpt.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def adapted_logits_worker(rank: int, world: int, base: str, lora: str, ids: torch.Tensor) -> torch.Tensor:
    from megafast.training.checkpointing import load_checkpoint

    state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world))
    model = GPTModel(config(), state, seed=5)
    apply_lora(model, LORA, 5)
    assert load_checkpoint(base, model, None, None, state, finetune=True) is not None
    assert load_checkpoint(lora, model, None, None, state, finetune=True) is not None
    with torch.no_grad():
        return gather_from_tensor_parallel_region(model.eval()(ids), state.tp_group)[..., :VOCAB]


def test_lora_run_saves_adapters_only_and_merged_hf_export_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    base, lora, hf = tmp_path / "base", tmp_path / "lora", tmp_path / "hf"
    torchrun(2, MODEL + TRAIN + ["--train-iters", "2", "--save", str(base)])
    log = tmp_path / "lora.jsonl"
    torchrun(2, MODEL + TRAIN + ["--train-iters", "3", "--save", str(lora), "--pretrained-checkpoint", str(base),
                                 "--lora-rank", "4", "--lora-alpha", "8", "--log-jsonl", str(log)])
    losses = [json.loads(line)["lm_loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 3
    ckpt = torch.load(lora / "iter_0000003" / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=False)
    assert ckpt["lora"]["rank"] == 4 and ckpt["model"] and all(is_adapter_name(k) for k in ckpt["model"])

    cmd = [sys.executable, str(ROOT / "tools/checkpoint/convert.py"), "--model-type", "GPT", "--loader", "megafast",
           "--saver", "hf", "--merge-lora", "--load-dir", str(lora), "--save-dir", str(hf), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ids = batch()[0]
    want = run_distributed(adapted_logits_worker, 2, str(base), str(lora), ids)[0]
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf_model(ids).logits[..., :VOCAB]
    assert rel_err(got, want) <= 1e-5


def test_model_only_load_refreshes_fp32_masters():
    """--pretrained-checkpoint / --finetune load weights after the optimizer copied its bf16 masters."""
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    state = ParallelState.single()
    model = GPTModel(config(), state, seed=1, params_dtype=torch.bfloat16)
    ddp = DataParallel([model], state)
    optimizer = build_optimizer([model], ddp, state, OptimizerConfig(bf16=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what loading other weights does
    optimizer.reload_model_params()
    for opt_shard in optimizer.shards:
        assert torch.equal(opt_shard.master, opt_shard.param.detach().float())


# ------------------------------------------------------- one adapted layer against W x + (alpha / r) B A x

IN, OUT, SEQ_LEN, MB = 8, 12, 6, 3
LAYER_CASES = [  # (base layer, sequence parallel, partition stride)
    ("column", False, 1), ("column", False, 2), ("column", True, 1), ("row", False, 1), ("row", True, 1),
]
DROPOUTS = [0.0, 0.3]


def layer_inputs(seed: int, index: int) -> dict:
    """Full W [out, in], B [out, r], x [s, b, in] and upstream gradient [s, b, out] of one case."""
    g = torch.Generator().manual_seed(seed * 101 + index)
    return {"w": torch.randn(OUT, IN, generator=g) * IN**-0.5, "b": torch.randn(OUT, LORA.rank, generator=g),
            "x": torch.randn(SEQ_LEN, MB, IN, generator=g), "dy": torch.randn(SEQ_LEN, MB, OUT, generator=g)}


def input_split(kind: str, sp: bool, tp: int) -> int | None:
    """The dim of x each rank holds a chunk of (row: the hidden dim; column + SP: the sequence)."""
    return -1 if kind == "row" else 0 if sp and tp > 1 else None


def output_split(kind: str, sp: bool, tp: int) -> int | None:
    return -1 if kind == "column" else 0 if sp and tp > 1 else None


def adapted_layer_worker(rank: int, tp: int, seed: int, data_seed: int) -> dict:
    """Each case's adapted layer on this rank: its output, its A, and A's and B's gradients."""
    from megafast.model.lora import LoRAAdapter
    from megafast.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megafast.parallel.random import model_parallel_rng_tracker

    group = torch.distributed.group.WORLD if tp > 1 else None
    out = {}
    for index, (kind, sp, stride) in enumerate(LAYER_CASES):
        for p in DROPOUTS:
            d = layer_inputs(data_seed, index)
            fill = lambda full, w=d["w"]: full.copy_(w)  # noqa: E731 - the full W, sliced by the layer
            if kind == "column":
                layer = ColumnParallelLinear(IN, OUT, tp_group=group, bias=False, sequence_parallel=sp,
                                             partition_stride=stride, init_method=fill)
            else:
                layer = RowParallelLinear(IN, OUT, tp_group=group, bias=False, sequence_parallel=sp, init_method=fill)
            cfg = LoRAConfig(rank=LORA.rank, alpha=LORA.alpha, dropout=p)
            layer.adapter = LoRAAdapter(layer, cfg, f"case{index}", seed, model_parallel_rng_tracker(seed, rank))
            with torch.no_grad():
                b = layer.adapter.linear_out.weight
                b.copy_(chunk_shard(d["b"], 0, rank, tp, stride) if kind == "column" else d["b"])
            split_in, split_out = input_split(kind, sp, tp), output_split(kind, sp, tp)
            x = d["x"] if split_in is None else d["x"].chunk(tp, split_in)[rank]
            dy = d["dy"] if split_out is None else chunk_shard(d["dy"], split_out, rank, tp, stride if kind == "column" else 1)
            layer.train()
            torch.manual_seed(data_seed + index)  # the default generator: dropout of a replicated x
            y = layer(x.clone().requires_grad_())
            y.backward(dy)
            a = layer.adapter.linear_in.weight
            out[(index, p)] = {"y": y.detach(), "a": a.detach().clone(), "grad_a": a.grad.clone(),
                               "grad_b": b.grad.clone()}
    return out


def reference_mask(kind: str, sp: bool, tp: int, p: float, seed: int, data_seed: int, index: int) -> torch.Tensor:
    """The dropout keep-mask of the full x, drawn here: a replicated x (column, no SP) from the default
    generator seeded for the step; a sharded x per rank from that rank's model-parallel stream
    (Megatron's seed + 2718 + tp_rank), the chunks put back together."""
    shape = (SEQ_LEN, MB, IN)
    split = input_split(kind, sp, tp)
    if split is None and kind == "column":
        return torch.empty(shape).bernoulli_(1 - p, generator=torch.Generator().manual_seed(data_seed + index))
    split = -1 if split is None else split  # row at TP 1: the whole x is rank 0's shard
    parts = []
    for r in range(tp):
        local = list(shape)
        local[split] //= tp
        parts.append(torch.empty(local).bernoulli_(1 - p, generator=torch.Generator().manual_seed(seed + 2718 + r)))
    return torch.cat(parts, split)


@pytest.mark.parametrize("tp", [1, 2])
def test_adapted_layer_matches_hand_written_lora(tp):
    """y = x W^T + (alpha / r) (dropout(x) A^T) B^T and its A/B gradients, from full tensors by hand,
    for column (strides 1 and 2, with and without sequence parallelism) and row layers, dropout 0
    and 0.3: every rank's output and gradients are its shards of the reference."""
    seed, data_seed = draw_seed("seed"), draw_seed("data_seed")
    if tp == 1:
        ranks = [adapted_layer_worker(0, 1, seed, data_seed)]
    else:
        ranks = run_distributed(adapted_layer_worker, tp, seed, data_seed)
    s = LORA.alpha / LORA.rank
    for index, (kind, sp, stride) in enumerate(LAYER_CASES):
        for p in DROPOUTS:
            tag = f"tp={tp} {kind} sp={sp} stride={stride} dropout={p}"
            d = layer_inputs(data_seed, index)
            got = [r[(index, p)] for r in ranks]
            # A: replicated (column) or chunked by input columns (row); the full A as the ranks hold it.
            a = got[0]["a"] if kind == "column" else torch.cat([g["a"] for g in got], 1)
            if kind == "column":
                assert all(torch.equal(g["a"], a) for g in got), f"{tag}: A differs between ranks"
            a = a.clone().requires_grad_()
            b = d["b"].clone().requires_grad_()
            mask = reference_mask(kind, sp, tp, p, seed, data_seed, index) if p > 0 else torch.ones(SEQ_LEN, MB, IN)
            x = d["x"]
            y = x @ d["w"].T + s * ((x * mask / (1 - p)) @ a.T) @ b.T  # [s, b, out]
            y.backward(d["dy"])
            split_out = output_split(kind, sp, tp)
            for r, g in enumerate(got):
                want = y.detach() if split_out is None else chunk_shard(y.detach(), split_out, r, tp,
                                                                         stride if kind == "column" else 1)
                assert rel_err(g["y"], want) <= 1e-5, f"{tag} rank {r}: output"
            # Gradients: a replicated parameter fed by a sequence shard holds a partial sum (summed here).
            if kind == "column":
                grad_a = sum(g["grad_a"] for g in got) if sp and tp > 1 else got[0]["grad_a"]
                grad_b = chunk_unshard([g["grad_b"] for g in got], 0, stride)
            else:
                grad_a = torch.cat([g["grad_a"] for g in got], 1)
                grad_b = sum(g["grad_b"] for g in got) if sp and tp > 1 else got[0]["grad_b"]
            assert rel_err(grad_a, a.grad) <= 1e-5, f"{tag}: grad of A"
            assert rel_err(grad_b, b.grad) <= 1e-5, f"{tag}: grad of B"
