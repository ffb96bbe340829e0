"""megafast.planner: predictions against the real thing.

- Parameters: every rank's names, shapes and order equal the instantiated GPTModel chunks (TP, PP,
  interleaving, partitions), totals equal ``transformers`` models of the same architecture.
- FLOPs: forward and backward matmul FLOPs equal torch's FlopCounterMode exactly; attention is
  the counted (non-causal) math-kernel work halved by the causal mask.
- Model state: weights, fp32 gradient buffers, master weights and optimizer states equal the
  bytes of a real run (DataParallel + optimizer after one step on gloo ranks), per rank, exactly.
- Activations: equal, byte for byte, the storages autograd keeps (saved_tensors_hooks) on CPU,
  also under TP and sequence parallelism; on a GPU the predicted peak is within 10% of
  torch.cuda.max_memory_allocated (``gpu`` marker).
- Search: the 70B Llama on 64 x 80 GB lists only layouts that fit and says why the others don't.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist import run_distributed
from torch.utils.flop_counter import FlopCounterMode

from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.pipeline.partition import build_model_chunks
from megafast.pipeline.schedules import bubble_fraction, num_warmup_steps
from megafast.planner import (
    Layout,
    Stage,
    attention_flops_per_token,
    forward_flops_per_token,
    matmul_params_per_layer,
    rank_parameter_count,
    rank_parameters,
    total_parameter_count,
    training_flops_per_token,
)
from megafast.planner.memory import (
    GB,
    activation_memory,
    chunk_activation_bytes,
    peak_memory,
    static_memory,
)
from megafast.planner.search import search
from megafast.planner.throughput import Cluster, estimate, step_time
from planner_models import DTYPES, gpt2, llama, saved_activation_bytes

def llama70b() -> GPTConfig:
    return GPTConfig(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=128256,
        max_position_embeddings=4096,
        position_embedding_type="rope",
        normalization="RMSNorm",
        activation="swiglu",
        add_bias_linear=False,
        tie_embeddings=False,
    )


# ----------------------------------------------------------------------------------- parameters

CONFIGS = {
    "gpt2-tied": gpt2(),
    "llama-gqa-untied": llama(),
    "llama-gqa-tied": llama(tie_embeddings=True, num_layers=5),
    "qwen2-qkv-bias": llama(add_qkv_bias=True, num_query_groups=4),
    "gelu-rope-layernorm": gpt2(position_embedding_type="rope", tie_embeddings=False, kv_channels=16),
}
# (pp, virtual chunks, partition)
PIPELINES = [(1, 1, "uniform"), (2, 1, "uniform"), (2, 1, "parameters"), (3, 1, "1,2,1"), (2, 2, "uniform")]


def named_shapes(chunk: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in chunk.named_parameters()]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("pp,chunks,partition", PIPELINES)
def test_rank_parameters_equal_gpt_model_chunks(name, pp, chunks, partition):
    config = CONFIGS[name]
    if partition == "1,2,1" and config.num_layers != 4:
        partition = "uniform"
    layout = Layout(pp=pp, num_model_chunks=chunks, partition=partition)
    total_on_ranks = 0
    for r in range(pp):
        state = ParallelState(pp_size=pp, pp_rank=r)
        models = build_model_chunks(config, state, seed=1, num_chunks=chunks, method=partition)
        predicted = rank_parameters(config, layout, r)
        assert [[(p.name, p.shape) for p in chunk] for chunk in predicted] == [
            named_shapes(m) for m in models
        ]
        count = sum(p.numel() for m in models for p in m.parameters())
        assert rank_parameter_count(config, layout, r) == count
        total_on_ranks += count
    # Summed over ranks: the model's unique parameters, plus the last stage's tied copy when pipelined.
    tied_copy = config.tie_embeddings and pp * chunks > 1
    assert total_on_ranks == total_parameter_count(config, include_tied_copy=tied_copy)
    assert total_parameter_count(config, include_tied_copy=tied_copy) - total_parameter_count(config) == (
        1024 * config.hidden_size if tied_copy else 0  # vocabulary 1000 padded to a multiple of 128
    )


def hf_models():
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=1000,
        hidden_size=64,
        num_attention_heads=8,
        num_hidden_layers=3,
        intermediate_size=160,
        max_position_embeddings=64,
    )
    return {
        "llama-gqa-tied": (
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
            ),
            llama(num_layers=3, tie_embeddings=True),
        ),
        "llama-gqa-untied": (
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
            ),
            llama(num_layers=3),
        ),
        "llama-mha-head-dim": (
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**common, num_key_value_heads=8, head_dim=16)
            ),
            llama(num_layers=3, num_query_groups=8, kv_channels=16),
        ),
        "qwen2": (
            transformers.Qwen2ForCausalLM(
                transformers.Qwen2Config(**common, num_key_value_heads=4, tie_word_embeddings=False)
            ),
            llama(num_layers=3, num_query_groups=4, add_qkv_bias=True),
        ),
        "gpt2": (
            transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=1000, n_embd=64, n_head=8, n_layer=3, n_positions=64, n_inner=160
                )
            ),
            gpt2(num_layers=3),
        ),
    }


def test_total_parameters_equal_transformers_models():
    for name, (hf, config) in hf_models().items():
        hf_count = sum(p.numel() for p in hf.parameters())  # tied weights appear once
        assert total_parameter_count(config, padded=False) == hf_count, name
        # Same model in megafast: the vocabulary padded to a multiple of 128 (1000 -> 1024).
        ours = sum(p.numel() for p in GPTModel(config, seed=1).parameters())
        outputs = 1 if config.tie_embeddings else 2
        assert ours == hf_count + outputs * (1024 - 1000) * config.hidden_size, name
        assert total_parameter_count(config) == ours, name


# ---------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied", "qwen2-qkv-bias"])
def test_flops_equal_flop_counter(name):
    config = CONFIGS[name]
    b, s = 2, 32
    tokens = b * s
    model = GPTModel(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (b, s))
    with FlopCounterMode(display=False) as fwd:
        loss = model(ids, labels=ids).sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    matmul = tokens * (
        2 * config.num_layers * matmul_params_per_layer(config) + 2 * config.hidden_size * 1024
    )
    assert fwd.get_total_flops() == matmul  # CPU flash attention is not counted: matmuls only
    assert bwd.get_total_flops() == 2 * matmul
    attention = tokens * config.num_layers * attention_flops_per_token(config, s)
    assert tokens * forward_flops_per_token(config, s) == matmul + attention
    # The math kernel computes every (query, key) pair: twice the causal work the model counts.
    with (
        torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH),
        FlopCounterMode(display=False) as full,
    ):
        model(ids, labels=ids)
    assert full.get_total_flops() == matmul + 2 * attention


def test_training_flops_count_recompute_only_when_asked():
    for rc in (None, "selective", "full"):
        c = llama(recompute_granularity=rc)
        fwd = forward_flops_per_token(c, 32, tp_size=2)
        assert training_flops_per_token(c, 32, 2) == 3 * fwd  # model FLOPs: the trainer's MFU numerator
        extra = {
            None: 0.0,
            "selective": c.num_layers * attention_flops_per_token(c, 32),
            "full": fwd - 2 * c.hidden_size * 1024,  # all but the output layer (1000 -> 1024 rows: 4 x 128 x TP 2)
        }[rc]
        assert training_flops_per_token(c, 32, 2, include_recompute=True) == pytest.approx(3 * fwd + extra)


# ---------------------------------------------------------------------------------- model state

# (model, tp, pp, dp, chunks, distributed, dtype, optimizer, bucket MiB); world size 4.
STATE_LAYOUTS = [
    ("llama", 1, 1, 4, 1, True, "bf16", "adam", 0.01),  # many buckets, each padded to a multiple of 4
    ("gpt2", 2, 2, 1, 1, False, "bf16", "adam", 25.0),  # tied embedding copy on the last stage
    ("gpt2", 1, 2, 2, 1, True, "bf16", "adam", 0.005),  # tied copy in a bucket of its own, sharded
    ("llama", 1, 2, 2, 2, True, "fp32", "lion", 0.003),  # interleaved chunks, aliased fp32 masters
    ("gpt2", 2, 1, 2, 1, True, "bf16", "lion", 0.002),
]


def state_case(i: int) -> tuple[GPTConfig, Layout]:
    arch, tp, pp, dp, v, dist, dtype, optimizer, bucket = STATE_LAYOUTS[i]
    layout = Layout(
        tp=tp,
        pp=pp,
        dp=dp,
        num_model_chunks=v,
        distributed_optimizer=dist,
        dtype=dtype,
        optimizer=optimizer,
        bucket_size_mb=bucket,
        num_microbatches=2,
    )
    return (gpt2() if arch == "gpt2" else llama()), layout


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_state(rank: int, config: GPTConfig, layout: Layout) -> dict:
    """Build a layout's chunks, DataParallel and optimizer, run one step, measure its bytes."""
    from megafast.pipeline.engine import Microbatch, PipelineEngine
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    state = ParallelState.create(ParallelConfig(layout.tp, layout.pp))
    dtype = DTYPES[layout.dtype]
    chunks = build_model_chunks(config, state, seed=3, num_chunks=layout.num_model_chunks, params_dtype=dtype)
    ddp = DataParallel(chunks, state, layout.bucket_size_mb, layout.distributed_optimizer)
    opt = build_optimizer(
        chunks,
        ddp,
        state,
        OptimizerConfig(
            optimizer=layout.optimizer,
            bf16=layout.dtype == "bf16",
            fp16=layout.dtype == "fp16",
            use_distributed_optimizer=layout.distributed_optimizer,
            loss_scale=1.0 if layout.dtype == "fp16" else None,
        ),
    )
    g = torch.Generator().manual_seed(state.dp_rank)
    mbs = [
        Microbatch(
            *(torch.randint(0, config.vocab_size, (1, 16), generator=g) for _ in range(2)), torch.ones(1, 16)
        )
        for _ in range(layout.num_microbatches)
    ]
    engine = PipelineEngine(chunks, state, (16, 1, config.hidden_size), dtype, torch.device("cpu"))
    ddp.set_last_microbatch(False)  # as the trainer: DP reduction starts in the last microbatch's backward
    engine.run(mbs, 32.0, before_last_backward=lambda c: ddp.set_last_microbatch(True, chunk=c))
    assert opt.step().success
    optimizer_tensors = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "pp_rank": state.pp_rank,
        "dp_rank": state.dp_rank,
        "shapes": [named_shapes(c) for c in chunks],
        "weights": storage_bytes(p for c in chunks for p in c.parameters()),
        "gradients": storage_bytes(b.grad_data for b in ddp.buffers),
        "master_weights": storage_bytes(s.master for s in opt.shards if not s.alias),
        "optimizer_states": storage_bytes(optimizer_tensors),
    }


TP_ACTIVATIONS = [
    ("llama", False, "bf16", None),
    ("llama", True, "bf16", "selective"),
    ("gpt2", True, "fp32", None),
    ("llama", True, "fp32", "full"),
]


def state_worker(rank: int, world: int) -> dict:
    out = {"state": [], "activations": []}
    for i in range(len(STATE_LAYOUTS)):
        out["state"].append(measure_state(rank, *state_case(i)))
    state = ParallelState.create(ParallelConfig(2, 1, False))
    sp_state = ParallelState.create(ParallelConfig(2, 1, True))
    for arch, sp, dtype, rc in TP_ACTIVATIONS:
        config = (llama if arch == "llama" else gpt2)(recompute_granularity=rc, hidden_dropout=0.1)
        model = GPTModel(config, sp_state if sp else state, seed=1, params_dtype=DTYPES[dtype])
        ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))
        out["activations"].append(saved_activation_bytes(model, ids))
    return out


@pytest.fixture(scope="module")
def gloo4() -> list[dict]:
    return run_distributed(state_worker, 4)


def test_model_state_bytes_equal_a_real_run(gloo4):
    for i in range(len(STATE_LAYOUTS)):
        config, layout = state_case(i)
        for rank, out in enumerate(gloo4):
            got = out["state"][i]
            expected = static_memory(config, layout, got["pp_rank"], got["dp_rank"])
            where = f"layout {STATE_LAYOUTS[i]} rank {rank}"
            assert got["shapes"] == [
                [(p.name, p.shape) for p in c] for c in rank_parameters(config, layout, got["pp_rank"])
            ], where
            for field in ("weights", "gradients", "master_weights", "optimizer_states"):
                assert got[field] == getattr(expected, field), f"{where}: {field}"


def test_activation_bytes_equal_saved_tensors_under_tensor_parallelism(gloo4):
    for i, (arch, sp, dtype, rc) in enumerate(TP_ACTIVATIONS):
        config = (llama if arch == "llama" else gpt2)(recompute_granularity=rc, hidden_dropout=0.1)
        layout = Layout(
            tp=2, seq_length=32, micro_batch_size=2, sequence_parallel=sp, recompute=rc, dtype=dtype
        )
        expected = chunk_activation_bytes(
            config, layout, Stage((0, config.num_layers), True, True), device="cpu"
        )
        assert {out["activations"][i] for out in gloo4} == {expected}, TP_ACTIVATIONS[i]


def test_single_process_state_bytes():
    """(TP, PP, DP) = (1, 1, 1), bf16 and fp32: every byte accounted for on one process."""
    for dtype in ("bf16", "fp32"):
        layout = Layout(dtype=dtype)
        config = llama()
        got = measure_state_single(config, layout)
        assert dataclasses.astuple(static_memory(config, layout, 0))[:4] == got  # [4]: host (offload)


def measure_state_single(config: GPTConfig, layout: Layout) -> tuple[int, int, int, int]:
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    state = ParallelState.single()
    model = GPTModel(config, state, seed=1, params_dtype=DTYPES[layout.dtype])
    ddp = DataParallel([model], state)
    opt = build_optimizer([model], ddp, state, OptimizerConfig(bf16=layout.dtype == "bf16"))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(ids, labels=ids).sum().backward()
    assert opt.step().success
    states = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return (
        storage_bytes(model.parameters()),
        storage_bytes(b.grad_data for b in ddp.buffers),
        storage_bytes(s.master for s in opt.shards if not s.alias),
        storage_bytes(states),
    )


# ---------------------------------------------------------------------------------- activations

ACTIVATION_CASES = [
    (arch, rc, dropout, dtype)
    for arch in ("gpt2", "llama", "llama-mha")
    for rc in (None, "selective", "full")
    for dropout, dtype in ((0.0, "fp32"), (0.1, "bf16"))
]


@pytest.mark.parametrize("arch,rc,dropout,dtype", ACTIVATION_CASES)
def test_activation_bytes_equal_saved_tensors(arch, rc, dropout, dtype):
    make = {"gpt2": gpt2, "llama": llama, "llama-mha": lambda **kw: llama(num_query_groups=8, **kw)}[arch]
    config = make(recompute_granularity=rc, hidden_dropout=dropout, num_layers=2)
    model = GPTModel(config, seed=1, params_dtype=DTYPES[dtype])
    ids = torch.randint(0, config.vocab_size, (3, 32))
    layout = Layout(seq_length=32, micro_batch_size=3, recompute=rc, dtype=dtype)
    assert saved_activation_bytes(model, ids) == chunk_activation_bytes(
        config, layout, Stage((0, 2), True, True), "cpu"
    )


# Triton RMSNorm (+ fused residual add) + SwiGLU + RoPE + cross-entropy with SDPA (GQA expanded),
# LayerNorm + GELU with Triton attention, and the fused linear + cross-entropy (Triton and torch).
TRITON_CASES = [
    ("llama", 2, None, "sdpa", "bf16", "triton", False),
    ("gpt2", 8, "selective", "triton", "fp32", "triton", False),
    ("llama", 2, "selective", "sdpa", "fp32", "triton", True),
    ("gpt2", 8, None, "sdpa", "bf16", "triton", True),
    ("llama", 2, None, "sdpa", "bf16", "torch", True),
]


@pytest.mark.parametrize("arch,groups,rc,attention,dtype,kernels,fused", TRITON_CASES)
def test_activation_bytes_equal_saved_tensors_with_triton_kernels(
    arch, groups, rc, attention, dtype, kernels, fused
):
    """The Triton norms, SwiGLU, RoPE, cross-entropy and flash attention keep other tensors than the
    torch ops (run by Triton's interpreter on CPU: TRITON_INTERPRET=1, set by conftest.py)."""
    pytest.importorskip("triton")
    make = gpt2 if arch == "gpt2" else llama
    config = make(
        num_layers=2,
        num_query_groups=groups,
        recompute_granularity=rc,
        kernels=kernels,
        attention_backend=attention,
        fused_linear_cross_entropy=fused,
    )
    model = GPTModel(config, seed=1, params_dtype=DTYPES[dtype])
    ids = torch.randint(0, config.vocab_size, (2, 32))
    layout = Layout(seq_length=32, micro_batch_size=2, recompute=rc, dtype=dtype)
    assert saved_activation_bytes(model, ids) == chunk_activation_bytes(
        config, layout, Stage((0, 2), True, True), "cpu"
    )


def test_microbatches_in_flight_follow_the_schedule():
    config = llama(num_layers=8)
    for r in range(4):
        one_f_one_b = activation_memory(config, Layout(pp=4, num_microbatches=6), r)
        assert one_f_one_b.in_flight == min(4 - r, 6)
        gpipe = activation_memory(config, Layout(pp=4, num_microbatches=6, pipeline_schedule="gpipe"), r)
        assert gpipe.in_flight == 6
        interleaved = activation_memory(config, Layout(pp=4, num_microbatches=8, num_model_chunks=2), r)
        assert interleaved.in_flight == num_warmup_steps(4, r, 8, 2) + 1
    # Full recompute keeps one [s, b, h] tensor per layer; sequence parallelism divides it by TP.
    base = Layout(tp=2, seq_length=64, micro_batch_size=2, recompute="full")
    hidden = 2 * 64 * 2 * config.hidden_size
    stage = Stage((2, 6), False, False)
    with_sp = chunk_activation_bytes(config, dataclasses.replace(base, sequence_parallel=True), stage)
    assert chunk_activation_bytes(config, base, stage) - with_sp == (4 + 1) * hidden // 2


# ------------------------------------------------------------------------------ throughput, search


def test_step_time_pieces():
    config, cluster = llama(num_layers=8, hidden_size=512, ffn_hidden_size=1408), Cluster(8)
    single = step_time(config, Layout(tp=1, pp=1, dp=8, num_microbatches=4, seq_length=64), cluster)
    assert single.tp_comm == single.pp_comm == single.bubble == 0
    assert single.dp_comm > 0
    piped = step_time(config, Layout(pp=4, dp=2, num_microbatches=4, seq_length=64), cluster)
    busy = piped.compute + piped.tp_comm + piped.pp_comm
    assert piped.bubble / (busy + piped.bubble) == pytest.approx(float(bubble_fraction("1f1b", 4, 4)))
    assert step_time(config, Layout(tp=8, num_microbatches=4, seq_length=64), cluster).tp_comm > 0
    # More microbatches per step shrink the bubble share.
    longer = step_time(config, Layout(pp=4, dp=2, num_microbatches=32, seq_length=64), cluster)
    assert longer.bubble / longer.total < piped.bubble / piped.total


def test_estimate_rejects_impossible_layouts_with_a_reason():
    cluster = Cluster(num_gpus=16)
    config = llama70b()
    assert (
        "8 query groups"
        in estimate(config, Layout(tp=16, seq_length=64), Cluster(16, gpus_per_node=16)).reason
    )
    assert (
        "spans more than a node"
        in estimate(config, Layout(tp=8, dp=2, seq_length=64), Cluster(16, gpus_per_node=4)).reason
    )
    assert "not the 16 given" in estimate(config, Layout(tp=8, seq_length=64), cluster).reason
    small = search(llama(), Cluster(8), seq_length=64, global_batch_size=12, micro_batch_sizes=(8,))
    assert {e.reason for e in small.rejected if e.layout.dp == 8} == {
        "global batch 12 is not a multiple of micro-batch 8 x DP 8"
    }
    with pytest.raises(ValueError, match="micro_batch_size"):
        Layout(micro_batch_size=0)
    with pytest.raises(ValueError, match="need >= 1 GPU"):
        Cluster(num_gpus=0)


@pytest.fixture(scope="module")
def plan70b():
    # without ZeRO-2/3 and offload (test_sharded_data_parallel checks the search with them)
    return search(llama70b(), Cluster(num_gpus=64, gpu_memory_gb=80), seq_length=4096, global_batch_size=1024,
                  sharding_strategies=("no_shard", "optim"), offload=False)


def test_70b_on_64_gpus_lists_only_layouts_that_fit(plan70b):
    cluster = Cluster(num_gpus=64, gpu_memory_gb=80)
    assert plan70b.feasible, "some layout of a 70B model must fit on 64 x 80 GB"
    speeds = [e.tokens_per_s for e in plan70b.feasible]
    assert speeds == sorted(speeds, reverse=True)
    for est in plan70b.feasible:
        lay = est.layout
        assert est.fits and est.memory.total <= cluster.usable_memory_bytes
        assert lay.world_size == 64 and lay.global_batch_size == 1024
        for r in range(lay.pp):  # the reported GPU is the most loaded one
            assert (
                static_memory(llama70b(), lay, r).total + activation_memory(llama70b(), lay, r).peak
                <= est.memory.total
            )
        assert 0.0 < est.mfu < 0.6
        # bf16 weights + fp32 gradients alone are 6 bytes x 70.5B = 423 GB: split at least 8 ways.
        assert lay.tp * lay.pp >= 8
    assert plan70b.feasible[0].mfu > 0.35


def test_70b_known_infeasible_layouts_are_rejected_with_a_reason(plan70b):
    def rejected(**fields) -> list:
        return [e for e in plan70b.rejected if all(getattr(e.layout, k) == v for k, v in fields.items())]

    feasible = {(e.layout.tp, e.layout.pp, e.layout.distributed_optimizer) for e in plan70b.feasible}
    # Pure DP: 141 GB of bf16 weights alone exceed 80 GB, with or without the distributed optimizer.
    for dist in (False, True):
        cases = rejected(tp=1, pp=1, dp=64, distributed_optimizer=dist)
        assert cases and all(e.reason.startswith("needs ") and "weights 141.1" in e.reason for e in cases)
        assert (1, 1, dist) not in feasible
    # TP=8 alone: 8.8B parameters per GPU need 16 bytes each with a plain Adam optimizer.
    cases = rejected(tp=8, pp=1, distributed_optimizer=False)
    assert cases and all(
        "optimizer states 70.6" in e.reason and "> 72.0 GB usable" in e.reason for e in cases
    )
    assert (8, 1, False) not in feasible
    # Layouts the model cannot be split into are rejected before any memory is estimated.
    assert all("does not divide 8 query groups" in e.reason and e.memory is None for e in rejected(tp=16))


def test_peak_memory_is_the_most_loaded_rank():
    config, layout = llama(num_layers=8), Layout(pp=4, num_microbatches=8, seq_length=64)
    peak = peak_memory(config, layout)
    totals = [
        static_memory(config, layout, r).total + activation_memory(config, layout, r).peak for r in range(4)
    ]
    assert peak.total == max(totals) and peak.pp_rank == totals.index(max(totals))
    assert peak.breakdown_gb()["total"] == pytest.approx(peak.total / GB)


# ------------------------------------------------------------------------------------------ GPU

GPU_CASES = [
    (
        "llama-1b-ish",
        dict(
            num_layers=4,
            hidden_size=2048,
            num_attention_heads=16,
            num_query_groups=4,
            ffn_hidden_size=5632,
            vocab_size=32000,
        ),
        2048,
        2,
        None,
    ),
    (
        "llama-selective",
        dict(
            num_layers=4,
            hidden_size=2048,
            num_attention_heads=16,
            num_query_groups=4,
            ffn_hidden_size=5632,
            vocab_size=32000,
        ),
        2048,
        4,
        "selective",
    ),
    (
        "gpt2-medium-ish",
        dict(
            num_layers=6,
            hidden_size=1024,
            num_attention_heads=16,
            ffn_hidden_size=4096,
            vocab_size=50257,
            max_position_embeddings=1024,
        ),
        1024,
        8,
        "full",
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw,seq,mbs,rc", GPU_CASES)
def test_predicted_activation_peak_within_10_percent_on_gpu(name, kw, seq, mbs, rc):
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    make = gpt2 if name.startswith("gpt2") else llama
    config = make(**kw, recompute_granularity=rc, hidden_dropout=0.0)
    device = torch.device("cuda")
    state = ParallelState.single()
    model = GPTModel(config, state, seed=1, params_dtype=torch.bfloat16, device=device)
    ddp = DataParallel([model], state)
    opt = build_optimizer([model], ddp, state, OptimizerConfig(bf16=True))
    ids = torch.randint(0, config.vocab_size, (mbs, seq), device=device)

    def step() -> None:
        model(ids, labels=ids).mean().backward()
        opt.step()

    step()  # optimizer states exist from here on
    torch.cuda.synchronize()
    layout = Layout(seq_length=seq, micro_batch_size=mbs, recompute=rc, dtype="bf16")
    static = static_memory(config, layout, 0)
    baseline = torch.cuda.memory_allocated()
    assert abs(baseline - static.total) <= 0.01 * static.total + 64 * 2**20  # rope caches, allocator rounding
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - baseline
    predicted = activation_memory(config, layout, 0).peak
    assert abs(predicted - measured) <= 0.10 * measured, (
        f"{name}: predicted {predicted / GB:.3f} GB, measured {measured / GB:.3f} GB"
    )
