"""The kernels on a CUDA device (run by benchmarks/run_gpu.sh on the GPU machine; skipped elsewhere):
the Triton kernels compiled for real, bf16 flash attention (broken only in the CPU interpreter),
the CUDA extension's RoPE and multi-tensor AdamW/Lion, and the optimizer and model wired to them."""

from __future__ import annotations

import pytest
import torch

from kernel_harness import TOLERANCES, check_against_reference, fresh_seed, rel_err

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16]


def _t(*shape, dtype=torch.float32, scale=1.0, shift=0.0, grad=True):
    t = (torch.randn(*shape, device=CUDA) * scale + shift).to(dtype)
    return t.requires_grad_() if grad else t


def test_extension_was_built_with_cuda_ops():
    from megafast.kernels.cuda_ext import cuda_available

    assert cuda_available(), (
        "megafast._C lacks the CUDA ops: build with `pip install --no-build-isolation -e .`"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 1531), (1, 4096), (512, 8192)])
def test_norms(shape, dtype):
    from megafast.kernels.add_rms_norm_kernel import add_rms_norm_torch, add_rms_norm_triton
    from megafast.kernels.layer_norm_kernel import layer_norm_torch, layer_norm_triton
    from megafast.kernels.rms_norm_kernel import rms_norm_torch, rms_norm_triton

    seed, n = fresh_seed(), shape[-1]
    x, w, b = _t(*shape, dtype=dtype, scale=2), _t(n, dtype=dtype, scale=0.5, shift=1), _t(n, dtype=dtype)
    what = f"{shape} {dtype} seed={seed}"
    check_against_reference(rms_norm_triton, rms_norm_torch, (x, w, 1e-5), what="rms " + what)
    check_against_reference(layer_norm_triton, layer_norm_torch, (x, w, b, 1e-5), what="ln " + what)
    r = _t(*shape, dtype=dtype)
    check_against_reference(
        add_rms_norm_triton, add_rms_norm_torch, (x, r, w, 1e-5), what="add_rms " + what
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_and_rotary(dtype):
    from megafast.kernels.gelu_kernel import gelu_torch, gelu_triton
    from megafast.kernels.rotary_kernel import apply_rotary_cuda, apply_rotary_torch, apply_rotary_triton
    from megafast.kernels.swiglu_kernel import swiglu_torch, swiglu_triton
    from megafast.model.rotary import RotaryEmbedding

    seed = fresh_seed()
    check_against_reference(
        swiglu_triton, swiglu_torch, (_t(3, 37, 2 * 1531, dtype=dtype),), what=f"swiglu {seed}"
    )
    for approx in ("tanh", "none"):
        check_against_reference(
            lambda t, a=approx: gelu_triton(t, a),
            lambda t, a=approx: gelu_torch(t, a),
            (_t(3, 37, 1531, dtype=dtype, scale=3),),
            what=f"gelu {approx} {seed}",
        )
    s, b, h, d = 257, 2, 12, 128
    cos, sin = RotaryEmbedding(d, 10000.0)(s, CUDA)
    per_seq = (torch.randn(s, b, 1, d, device=CUDA), torch.randn(s, b, 1, d, device=CUDA))
    for fn in (apply_rotary_triton, apply_rotary_cuda):
        for c, sn in ((cos, sin), per_seq):
            x = _t(s, b, h, d, dtype=dtype)
            check_against_reference(
                fn, apply_rotary_torch, (x, c, sn), what=f"{fn.__name__} {dtype} {seed}"
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_and_fused_linear(dtype):
    from megafast.kernels.cross_entropy_kernel import cross_entropy_torch, cross_entropy_triton
    from megafast.kernels.fused_linear_cross_entropy_kernel import (
        fused_linear_cross_entropy_torch,
        fused_linear_cross_entropy_triton,
    )

    seed = fresh_seed()
    target = torch.randint(0, 32000, (4, 300), device=CUDA)
    target[0, :50] = -100
    logits = _t(4, 300, 32128, dtype=dtype, scale=4)
    check_against_reference(
        lambda z, t: cross_entropy_triton(z, t, -100, 32000),
        lambda z, t: cross_entropy_torch(z, t, -100, 32000),
        (logits, target),
        what=f"ce {dtype} seed={seed}",
    )
    x, w = _t(1200, 256, dtype=dtype), _t(32128, 256, dtype=dtype, scale=0.1)
    t = torch.randint(0, 32000, (1200,), device=CUDA)
    for reduction in ("none", "mean"):
        check_against_reference(
            lambda a, b_, tt, r=reduction: fused_linear_cross_entropy_triton(
                a, b_, tt, None, 32000, -100, r, 256
            ),
            lambda a, b_, tt, r=reduction: fused_linear_cross_entropy_torch(a, b_, tt, 32000, -100, r),
            (x, w, t),
            tol={torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype],  # TF32-free fp32; bf16 logits
            what=f"flce {reduction} {dtype} seed={seed}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,heads,groups,s,d,causal",
    [
        (2, 8, 2, 300, 64, True),
        (1, 4, 4, 257, 128, True),
        (2, 4, 1, 129, 64, False),
        (1, 2, 2, 1024, 128, True),
    ],
)
def test_flash_attention(b, heads, groups, s, d, causal, dtype):
    from megafast.kernels.flash_attention_kernel import attention_torch, flash_attention_triton

    seed = fresh_seed()
    q, k, v = (
        _t(b, heads, s, d, dtype=dtype),
        _t(b, groups, s, d, dtype=dtype),
        _t(b, groups, s, d, dtype=dtype),
    )
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    check_against_reference(
        lambda *a: flash_attention_triton(*a, causal=causal),
        lambda *a: attention_torch(*a, causal=causal),
        (q, k, v),
        tol=tol,
        what=f"flash {(b, heads, groups, s, d, causal)} {dtype} seed={seed}",
    )


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt", ["adam", "lion"])
def test_multi_tensor_optimizer_kernels(opt, grad_dtype):
    from megafast.kernels.multi_tensor_optim import (
        multi_tensor_adamw_,
        multi_tensor_adamw_torch,
        multi_tensor_lion_,
        multi_tensor_lion_torch,
    )

    seed = fresh_seed()
    shapes = [(4096, 1000), (1,), (65536,), (65537,), (3, 7)]  # chunk boundaries and tiny tensors
    params = [torch.randn(s, device=CUDA) for s in shapes]
    mine, ref = [p.clone() for p in params], [p.clone() for p in params]
    states = {
        k: ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]) for k in ("m", "v")
    }
    model = [torch.empty(s, device=CUDA, dtype=torch.bfloat16) for s in shapes]
    model[1] = None  # an fp32 parameter: nothing to write
    for step in range(1, 4):
        grads = [torch.randn(s, device=CUDA).to(grad_dtype) for s in shapes]
        if opt == "adam":
            kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, grad_scale=0.7)
            multi_tensor_adamw_(mine, grads, states["m"][0], states["v"][0], model, **kw)
            multi_tensor_adamw_torch(
                ref, grads, states["m"][1], states["v"][1], [None] * len(shapes), **kw
            )
        else:
            kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_scale=0.7)
            multi_tensor_lion_(mine, grads, states["m"][0], model, **kw)
            multi_tensor_lion_torch(ref, grads, states["m"][1], [None] * len(shapes), **kw)
    torch.cuda.synchronize()
    for i, (a, r) in enumerate(zip(mine, ref)):
        assert rel_err(a, r) <= 1e-6, f"{opt} tensor {i} seed={seed}"
        if model[i] is not None:
            assert torch.equal(model[i], a.to(torch.bfloat16)), f"{opt} bf16 weights of tensor {i}"
    for m_mine, m_ref in zip(*states["m"]):
        assert rel_err(m_mine, m_ref) <= 1e-6


@pytest.mark.parametrize("opt", ["adam", "lion"])
@pytest.mark.parametrize("distributed", [False, True])
def test_optimizer_cuda_step_equals_torch_step(opt, distributed):
    """MixedPrecisionOptimizer over a bf16 model: --fused-optimizer cuda and torch give the same
    masters, states and bf16 weights (single rank; ZeRO-1 layout with dp=1 exercises the views)."""
    from megafast.config import GPTConfig
    from megafast.model import GPTModel
    from megafast.parallel import ParallelState
    from megafast.training.data_parallel import DataParallel
    from megafast.training.optimizer import OptimizerConfig, build_optimizer

    seed = fresh_seed()
    config = GPTConfig(
        num_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        vocab_size=1000,
        make_vocab_size_divisible_by=1,
        position_embedding_type="rope",
        normalization="RMSNorm",
        activation="swiglu",
        add_bias_linear=False,
    )
    runs = {}
    for fused in ("cuda", "torch"):
        model = GPTModel(config, seed=seed, params_dtype=torch.bfloat16, device=CUDA)
        state = ParallelState.single()
        ddp = DataParallel([model], state, 1.0, distributed, False)
        opt_obj = build_optimizer(
            [model],
            ddp,
            state,
            OptimizerConfig(
                optimizer=opt,
                lr=1e-3,
                weight_decay=0.1,
                bf16=True,
                clip_grad=0.5,
                use_distributed_optimizer=distributed,
                fused_optimizer=fused,
            ),
        )
        assert opt_obj.cuda_step == (fused == "cuda")
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            ids = torch.randint(0, 1000, (2, 64), generator=g).to(CUDA)
            model(ids, labels=ids).float().mean().backward()
            opt_obj.step()
        runs[fused] = (
            {n: p.detach().clone() for n, p in model.named_parameters()},
            [s.master.detach().clone() for s in opt_obj.shards],
        )
    for n, p in runs["torch"][0].items():
        assert rel_err(runs["cuda"][0][n], p) <= 1e-2, f"{opt} bf16 weight {n}"
    for a, b in zip(runs["cuda"][1], runs["torch"][1]):
        assert rel_err(a, b) <= 1e-5, f"{opt} master weights seed={seed}"


@pytest.mark.parametrize("activation,norm", [("swiglu", "RMSNorm"), ("gelu", "LayerNorm")])
def test_model_triton_equals_torch_on_gpu(activation, norm, no_tf32):
    """fp32 on the GPU (no TF32): Triton kernels + Triton flash attention vs torch ops + SDPA."""
    from megafast.config import GPTConfig
    from megafast.model import GPTModel

    seed = fresh_seed()
    results = []
    for kernels, attention in (("triton", "triton"), ("torch", "sdpa")):
        config = GPTConfig(
            num_layers=2,
            hidden_size=256,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=1000,
            make_vocab_size_divisible_by=1,
            position_embedding_type="rope",
            normalization=norm,
            activation=activation,
            max_position_embeddings=128,
            kernels=kernels,
            attention_backend=attention,
            rope_kernel="auto",
        )
        model = GPTModel(config, seed=seed, device=CUDA)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (2, 128), generator=g).to(CUDA)
        loss = model(ids, labels=ids)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert rel_err(l1, l2) <= TOLERANCES[torch.float32]
    for n in g2:
        assert rel_err(g1[n], g2[n]) <= 2e-5, f"grad {n} seed={seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_grouped_gemm_and_permutation(dtype):
    """The MoE kernels compiled for real: grouped GEMM (uneven and empty experts, dropped slots, odd
    K and N) and permute/unpermute against their torch twins (float64 copies)."""
    from megafast.kernels import grouped_gemm_kernel as gg
    from megafast.kernels import moe_permute_kernel as mp

    seed = fresh_seed()
    counts = torch.tensor([300, 0, 1, 517, 129, 0, 64, 2], device=CUDA)
    x = _t(1100, 1000, dtype=dtype)  # 1013 routed rows + 87 dropped slots
    w = _t(8, 1000, 1400, dtype=dtype, scale=1000**-0.5)
    check_against_reference(gg.grouped_gemm, gg.grouped_gemm_torch, (x, w, counts), tol=2e-2,
                            what=f"grouped_gemm {dtype} seed={seed}")
    t, k, e, h = 777, 2, 8, 1000
    idx = torch.randn(t, e, device=CUDA).topk(k, dim=-1).indices
    idx[::7, 1] = -1  # dropped choices
    hidden = _t(t, h, dtype=dtype)
    permuted, row_id_map, tpe = mp.permute(hidden, idx, e)
    ref_permuted, ref_map, ref_tpe = mp.permute_torch(hidden, idx, e)
    assert torch.equal(permuted, ref_permuted) and torch.equal(row_id_map, ref_map)
    assert torch.equal(tpe, ref_tpe)
    check_against_reference(lambda y, p: mp.unpermute(y, row_id_map, p),
                            lambda y, p: mp.unpermute_torch(y, row_id_map, p),
                            (_t(t * k, h, dtype=dtype), _t(t, k).softmax(-1).detach().requires_grad_()),
                            tol=2e-2, what=f"unpermute {dtype} seed={seed}")
