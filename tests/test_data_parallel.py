"""DataParallel: DP=2 over halves of a global batch equals one process over all of it.

Checked on 2 gloo ranks against a single-process reference: the DP-summed fp32 ``main_grad`` and
the parameters after one optimizer step; bucket sizes (one bucket .. one per parameter) and
overlap on/off give bit-identical gradients; the distributed optimizer (ZeRO-1, fp32 and bf16)
equals the plain one after 3 steps, and its per-rank state dict resumes bit-exactly. On one
process: bf16 parameters accumulate microbatch gradients in fp32.
"""

from __future__ import annotations

import io
import random

import pytest
import torch

from dist import run_distributed
from seeding import draw_seed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer import OptimizerConfig, build_optimizer

VOCAB = 101
GLOBAL_BATCH, SEQ = 4, 16
# (bucket_size_mb, overlap_grad_reduce): one big bucket, tiny buckets (many), a single bucket.
VARIANTS = [(25.0, True), (25.0, False), (0.01, True), (0.0005, False), (None, True)]
# Adam's first update is lr * g / (|g| + eps): with a tiny eps, gradients near zero turn fp32
# rounding noise into O(lr) differences. eps = 1e-3 keeps the update a smooth function of g.
ADAM = dict(lr=1e-2, weight_decay=0.1, adam_eps=1e-3)


def gpt_config() -> GPTConfig:
    return GPTConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ,
        make_vocab_size_divisible_by=1, init_method_std=0.1,
    )


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels[0, :5] = -100
    labels[3, 7:9] = -100
    return ids, labels


def backward_batch(model, ddp, ids, labels, denom, num_microbatches: int) -> None:
    """Megatron's per-token loss: sum of this rank's token losses / tokens of the global batch."""
    for i, (x, y) in enumerate(zip(ids.chunk(num_microbatches), labels.chunk(num_microbatches))):
        ddp.set_last_microbatch(i == num_microbatches - 1)
        (model(x, labels=y).sum() / denom).backward()


def dp_slice(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    per = t.shape[0] // state.dp_size
    return t[state.dp_rank * per : (state.dp_rank + 1) * per]


def one_step(state, seed, data_seed, opt_config, num_microbatches=1, **ddp_kw) -> dict:
    """Build, run one global batch, step; return main_grads, grad norm and updated params."""
    model = GPTModel(gpt_config(), state, seed=seed)
    ddp = DataParallel([model], state, **ddp_kw)
    opt = build_optimizer([model], ddp, state, opt_config)
    ids, labels = make_batch(data_seed)
    denom = (labels != -100).sum()
    backward_batch(model, ddp, dp_slice(ids, state), dp_slice(labels, state), denom, num_microbatches)
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    result = opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"grads": grads, "norm": result.grad_norm, "params": params, "buckets": len(ddp.buckets)}


def run_steps(model, ddp, opt, state, data_seeds, num_microbatches=2) -> list[float]:
    norms = []
    for ds in data_seeds:
        ids, labels = make_batch(ds)
        denom = (labels != -100).sum()
        backward_batch(model, ddp, dp_slice(ids, state), dp_slice(labels, state), denom, num_microbatches)
        result = opt.step()
        assert result.success
        norms.append(result.grad_norm)
    return norms


def masters_by_piece(opt) -> dict:
    return {(s.name, s.lo, s.hi): s.master.detach().clone() for s in opt.shards}


def serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zero1_case(state, seed, data_seeds, dtype, clip_grad: float = 0.05) -> dict:
    """Plain vs distributed optimizer over 3 steps; ZeRO-1 state-dict resume before step 3."""
    config = OptimizerConfig(**ADAM, clip_grad=clip_grad, bf16=dtype == torch.bfloat16)
    out = {}
    for distributed in (False, True):
        cfg = OptimizerConfig(**{**config.__dict__, "use_distributed_optimizer": distributed})
        model = GPTModel(gpt_config(), state, seed=seed, params_dtype=dtype)
        ddp = DataParallel([model], state, bucket_size_mb=0.002, use_distributed_optimizer=distributed)
        opt = build_optimizer([model], ddp, state, cfg)
        norms = run_steps(model, ddp, opt, state, data_seeds[:2])
        saved = serialise({"model": model.state_dict(), "optimizer": opt.state_dict()})
        norms += run_steps(model, ddp, opt, state, data_seeds[2:])
        # Resume into a freshly built (differently initialised) model from the saved state.
        model2 = GPTModel(gpt_config(), state, seed=seed + 1, params_dtype=dtype)
        ddp2 = DataParallel([model2], state, bucket_size_mb=0.002, use_distributed_optimizer=distributed)
        opt2 = build_optimizer([model2], ddp2, state, cfg)
        ckpt = torch.load(io.BytesIO(saved), weights_only=False)
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["optimizer"])
        run_steps(model2, ddp2, opt2, state, data_seeds[2:])
        out[distributed] = {
            "norms": norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "resumed": {n: p.detach().clone() for n, p in model2.named_parameters()},
            "masters": masters_by_piece(opt),
            "resumed_masters": masters_by_piece(opt2),
            "param_dtype": {p.dtype for p in model.parameters()},
            "master_dtype": {s.master.dtype for s in opt.shards},
            "main_grad_dtype": {p.main_grad.dtype for p in model.parameters()},
        }
    return out


def dp_worker(rank: int, world: int, seed: int, data_seed: int) -> dict:
    state = ParallelState.create(ParallelConfig())
    assert state.dp_size == world
    opt_config = OptimizerConfig(**ADAM)
    out = {"variants": {}}
    for bucket_mb, overlap in VARIANTS:
        out["variants"][(bucket_mb, overlap)] = one_step(
            state, seed, data_seed, opt_config, num_microbatches=2, bucket_size_mb=bucket_mb, overlap_grad_reduce=overlap
        )
    out["single_microbatch"] = one_step(state, seed, data_seed, opt_config, num_microbatches=1)
    out["averaged"] = one_step(state, seed, data_seed, opt_config, average_in_collective=True)

    # A second backward while the first one's buckets are already being reduced is an error.
    model = GPTModel(gpt_config(), state, seed=seed)
    ddp = DataParallel([model], state)
    ids, labels = make_batch(data_seed)
    model(ids[:1], labels=labels[:1]).sum().backward()
    try:
        model(ids[:1], labels=labels[:1]).sum().backward()
        out["double_backward_error"] = None
    except RuntimeError as e:
        out["double_backward_error"] = str(e)
    ddp.zero_grad()

    rng = random.Random(data_seed)
    data_seeds = [rng.randrange(1 << 30) for _ in range(3)]
    # bf16 without clipping: a clip factor differing in its last bit (the norm is summed in another
    # order) can flip a bf16 rounding of the params, which the next steps amplify; unclipped, the
    # sharded and plain updates are the same elementwise arithmetic.
    out["zero1"] = {
        "torch.float32": zero1_case(state, seed, data_seeds, torch.float32),
        "torch.bfloat16": zero1_case(state, seed, data_seeds, torch.bfloat16, clip_grad=0.0),
    }
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.float().abs().max().clamp_min(1e-30)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"


@pytest.fixture(scope="module")
def seeds() -> tuple[int, int]:
    return draw_seed("seed"), draw_seed("data_seed")


@pytest.fixture(scope="module")
def dp2(seeds) -> list[dict]:
    return run_distributed(dp_worker, 2, *seeds)


@pytest.fixture(scope="module")
def reference(seeds) -> dict:
    torch.manual_seed(0)
    return one_step(ParallelState.single(), *seeds, OptimizerConfig(**ADAM))


def test_dp2_equals_one_process_over_the_global_batch(dp2, reference):
    for rank, out in enumerate(dp2):
        for key, got in [("single_microbatch", out["single_microbatch"])] + list(out["variants"].items()):
            for n, g in reference["grads"].items():
                assert got["grads"][n].dtype == torch.float32
                assert_rel_close(got["grads"][n], g, 1e-5, f"rank {rank} {key} main_grad {n}")
                assert_rel_close(got["params"][n], reference["params"][n], 1e-5, f"rank {rank} {key} param {n}")
            assert got["norm"] == pytest.approx(reference["norm"], rel=1e-5)
    for n in reference["params"]:  # every DP rank ends with the same model
        assert torch.equal(dp2[0]["variants"][VARIANTS[0]]["params"][n], dp2[1]["variants"][VARIANTS[0]]["params"][n])


def test_bucket_sizes_and_overlap_give_identical_gradients(dp2):
    variants = dp2[0]["variants"]
    counts = {k: v["buckets"] for k, v in variants.items()}
    assert counts[(None, True)] == 1 and counts[(25.0, True)] == 1
    assert counts[(0.0005, False)] > counts[(0.01, True)] > 1, counts
    base = variants[VARIANTS[0]]
    for key, got in variants.items():
        for n, g in base["grads"].items():
            assert torch.equal(got["grads"][n], g), f"{key}: main_grad {n} differs from {VARIANTS[0]}"
            assert torch.equal(got["params"][n], base["params"][n]), f"{key}: param {n} differs"


def test_average_in_collective_divides_by_dp_size(dp2, reference):
    for n, g in reference["grads"].items():
        assert_rel_close(dp2[0]["averaged"]["grads"][n], g / 2, 1e-5, f"averaged main_grad {n}")


def test_second_backward_after_sync_started_is_an_error(dp2):
    for out in dp2:
        assert out["double_backward_error"] is not None and "set_last_microbatch(False)" in out["double_backward_error"]


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_distributed_optimizer_equals_plain_and_resumes_bit_exactly(dp2, dtype):
    tol = 1e-6
    for rank, out in enumerate(dp2):
        plain, zero1 = out["zero1"][dtype][False], out["zero1"][dtype][True]
        assert zero1["master_dtype"] == {torch.float32} and zero1["main_grad_dtype"] == {torch.float32}
        assert zero1["param_dtype"] == {getattr(torch, dtype.split(".")[1])}
        assert plain["norms"] == pytest.approx(zero1["norms"], rel=1e-6)
        # Every ZeRO-1 master piece equals the same elements of the plain optimizer's master.
        full = {name: m for (name, lo, hi), m in plain["masters"].items()}
        pieces = zero1["masters"]
        assert sum(hi - lo for _, lo, hi in pieces) < sum(m.numel() for m in full.values())  # sharded
        for (name, lo, hi), m in pieces.items():
            assert_rel_close(m, full[name].reshape(-1)[lo:hi], tol, f"rank {rank} {dtype} master {name}[{lo}:{hi}]")
        for n, p in plain["params"].items():
            assert_rel_close(zero1["params"][n], p, tol, f"rank {rank} param {n}")
        for variant in (plain, zero1):
            for n, p in variant["params"].items():
                assert torch.equal(variant["resumed"][n], p), f"rank {rank} {dtype}: resumed param {n} differs"
            for k, m in variant["masters"].items():
                assert torch.equal(variant["resumed_masters"][k], m), f"rank {rank} {dtype}: resumed master {k}"
    # The two DP ranks own disjoint shards that together cover every parameter element.
    covered: dict[str, int] = {}
    for out in dp2:
        for name, lo, hi in out["zero1"][dtype][True]["masters"]:
            covered[name] = covered.get(name, 0) + hi - lo
    assert covered == {n: p.numel() for n, p in dp2[0]["zero1"][dtype][False]["params"].items()}


def test_bf16_params_accumulate_microbatch_grads_in_fp32(seeds):
    seed, data_seed = seeds
    state = ParallelState.single()
    model = GPTModel(gpt_config(), state, seed=seed, params_dtype=torch.bfloat16)
    plain = GPTModel(gpt_config(), state, seed=seed, params_dtype=torch.bfloat16)
    ddp = DataParallel([model], state, bucket_size_mb=0.002)
    opt = build_optimizer([model], ddp, state, OptimizerConfig(lr=1e-3, bf16=True))
    ids, labels = make_batch(data_seed)
    denom = (labels != -100).sum()
    backward_batch(model, ddp, ids, labels, denom, num_microbatches=4)
    ddp.finish_grad_sync()

    expected = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in plain.named_parameters()}
    bf16_sum = {n: torch.zeros(p.shape, dtype=torch.bfloat16) for n, p in plain.named_parameters()}
    for x, y in zip(ids.chunk(4), labels.chunk(4)):
        plain.zero_grad(set_to_none=True)
        (plain(x, labels=y).sum() / denom).backward()
        for n, p in plain.named_parameters():
            assert p.grad.dtype == torch.bfloat16
            expected[n] += p.grad.float()  # the same fp32 sum of the individual bf16 gradients
            bf16_sum[n] += p.grad
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None
        assert p.main_grad.dtype == torch.float32
        assert torch.equal(p.main_grad, expected[n]), f"main_grad {n} is not the fp32 sum of microbatch grads"
    # A bf16 running sum would have lost precision somewhere.
    assert any(not torch.equal(bf16_sum[n].float(), expected[n]) for n in expected)

    assert all(s.master.dtype == torch.float32 and not s.alias for s in opt.shards)
    before = {s.name: s.master.clone() for s in opt.shards}
    assert opt.step().success
    for s in opt.shards:
        assert s.master.dtype == torch.float32
        assert not torch.equal(s.master, before[s.name]), f"{s.name} was not updated"
        assert torch.equal(s.param.detach(), s.master.to(torch.bfloat16)), f"{s.name}: param != bf16(master)"
    assert all(torch.count_nonzero(p.main_grad) == 0 for p in model.parameters())  # zeroed after step


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError, match="bucket size"):
        DataParallel([GPTModel(gpt_config())], ParallelState.single(), bucket_size_mb=0)
