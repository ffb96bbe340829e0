"""Every Triton kernel specialization that training launches, at realistic GPU shapes.

Each :class:`LaunchSpec` is one kernel call as its launcher makes it on a CUDA tensor: the same
arguments (tensors as ``MockTensor`` of the right dtype, integers with their real values, so the
JIT's divisibility-by-16 specialisation is the one a GPU run gets), the constexprs, and the block
sizes / warps / stages that the launcher's own selection functions pick (``row_settings``,
``rotary_blocks``, ``swiglu_blocks``, ``ce_block``, the flash-attention autotune candidates that
survive ``prune_attention_configs``). :mod:`megafast.kernels.aot_check` compiles them for sm_90a
and sm_80.

Shapes: hidden 2048-8192 at 16k tokens; vocabulary shards 32k-128k; sequence 2k-8k with head dim
64 and 128, with and without GQA; fp32, bf16 (and fp16 where the kernel is dtype-generic and the
model can run it: --fp16), forward and backward. MoE: Mixtral-like (hidden 4096, expert FFN 14336,
8 experts, top-2) and Qwen2-MoE-like (hidden 2048, FFN 1408, 60 experts, top-4) at 16k tokens.
NF4 dequantization (QLoRA) of the base weights of hidden 4096 and 8192 models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megafast.kernels import add_rms_norm_kernel as add_rms
from megafast.kernels import cross_entropy_kernel as ce
from megafast.kernels import flash_attention_kernel as fa
from megafast.kernels import gelu_kernel as gelu
from megafast.kernels import grouped_gemm_kernel as gg
from megafast.kernels import layer_norm_kernel as ln
from megafast.kernels import moe_permute_kernel as perm
from megafast.kernels import nf4_dequantize_kernel as nf4
from megafast.kernels import rms_norm_kernel as rms
from megafast.kernels import rotary_kernel as rope
from megafast.kernels import swiglu_kernel as swiglu
from megafast.kernels._triton import row_settings, triton

TOKENS = 16384  # micro-batch tokens (e.g. 4 x 4096) of the row-wise kernels
HIDDENS = (2048, 4096, 8192)
FFNS = (5632, 14336, 28672)  # Llama-style SwiGLU widths of the hidden sizes above
VOCABS = (32000, 50304, 128256)  # one vocabulary shard (TP 1); TP > 1 gives narrower rows
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (batch, query heads, kv heads, sequence, head dim) of the attention kernels
ATTENTION_SHAPES = (
    (8, 16, 16, 2048, 64),  # GPT-2 / 1B class, no GQA
    (2, 32, 8, 8192, 128),  # Llama-3 8B class, GQA 4
    (4, 32, 32, 4096, 128),  # Llama-2 7B class, no GQA
    (1, 64, 8, 8192, 128),  # 70B class (TP 1 slice), GQA 8
)
# the same kernels with a causal sliding window (left width): Mistral-7B's 4096 (HF 4096 - 1) at
# seq 8192 with GQA 4, and a 1k window at head dim 64
ATTENTION_WINDOWS = (
    ((2, 32, 8, 8192, 128), 4095),
    ((8, 16, 16, 2048, 64), 1023),
)
# MoE layers (tokens, hidden, expert FFN, experts, top-k): Mixtral-8x7B-like and Qwen2-MoE-like
MOE_SHAPES = (
    (TOKENS, 4096, 14336, 8, 2),
    (TOKENS, 2048, 1408, 60, 4),
)

# frozen [out, in] base weights QLoRA dequantizes (one TP shard at TP 1): Llama-3 8B's attention
# and MLP, Llama-3 70B's attention and MLP
NF4_WEIGHTS = ((4096, 4096), (14336, 4096), (8192, 8192), (28672, 8192))
SM_COUNT = 132  # only sets how many rows a norm-backward program loops over (no compile effect)


@dataclass
class LaunchSpec:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=, num_stages=)``."""

    name: str  # e.g. "rms_norm fwd"
    kernel: Callable  # the @triton.jit function (or its autotuner / interpreter wrapper)
    args: tuple
    constexprs: dict[str, Any]
    shape: str
    dtype: str
    num_warps: int
    num_stages: int = 3
    uses_dot: bool = False


def _t(dtype: torch.dtype):
    """A pointer argument of ``dtype``: address 0, i.e. 16-byte aligned as torch's allocations."""
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype)


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _row_kernels() -> list[LaunchSpec]:
    """RMSNorm, add + RMSNorm, LayerNorm: forward and backward at every hidden size and dtype."""
    f32, specs = torch.float32, []
    for n in HIDDENS:
        for dt in DTYPES:
            block, warps = row_settings(n, dt.itemsize)
            shape, d = f"{TOKENS}x{n}", _SHORT[dt]
            per_program = triton.cdiv(TOKENS, 2 * SM_COUNT)
            x = _t(dt)
            specs += [
                LaunchSpec("rms_norm fwd", rms._rms_norm_fwd_kernel,
                           (x, _t(dt), _t(dt), _t(f32), n, n, n, 1e-5), {"BLOCK": block}, shape, d, warps),
                LaunchSpec("add_rms_norm fwd", add_rms._add_rms_norm_fwd_kernel,
                           (x, _t(dt), _t(dt), _t(dt), _t(dt), _t(f32), n, n, n, n, n, 1e-5),
                           {"BLOCK": block}, shape, d, warps),
                LaunchSpec("layer_norm fwd", ln._layer_norm_fwd_kernel,
                           (x, _t(dt), _t(dt), _t(dt), _t(f32), _t(f32), n, n, n, 1e-5),
                           {"HAS_BIAS": True, "BLOCK": block}, shape, d, warps),
                LaunchSpec("layer_norm bwd", ln._layer_norm_bwd_kernel,
                           (_t(dt), x, _t(dt), _t(f32), _t(f32), _t(dt), _t(f32), _t(f32), n, n, n,
                            TOKENS, n, per_program), {"HAS_BIAS": True, "BLOCK": block}, shape, d, warps),
            ]
            for has_dh, what in ((False, "rms_norm bwd"), (True, "add_rms_norm bwd")):
                specs.append(LaunchSpec(
                    what, rms._rms_norm_bwd_kernel,
                    (_t(dt), _t(dt), x, _t(dt), _t(f32), _t(dt), _t(f32), n, n, n, n, TOKENS, n, per_program),
                    {"HAS_DH": has_dh, "BLOCK": block}, shape, d, warps))
    return specs


def _elementwise_kernels() -> list[LaunchSpec]:
    """RoPE (q and GQA's k heads), SwiGLU, GELU (tanh and erf): forward and backward."""
    f32, specs = torch.float32, []
    for dt in DTYPES:
        d = _SHORT[dt]
        for b, heads, groups, s, hd in ATTENTION_SHAPES:
            for h in sorted({heads, groups}):
                block_h, block_d, warps = rope.rotary_blocks(h, hd)
                # q/k sliced from the fused QKV output [s, b, (H + 2G) * hd]: strides of that buffer;
                # cos/sin [s, hd] fp32, shared by the batch (stride 0)
                row = (heads + 2 * groups) * hd
                for backward in (False, True):
                    specs.append(LaunchSpec(
                        f"rope {'bwd' if backward else 'fwd'}", rope._rotary_kernel,
                        (_t(dt), _t(f32), _t(f32), _t(dt), b, h, hd // 2, b * row, row, hd,
                         b * h * hd, h * hd, hd, hd, 0, hd, 0),
                        {"BACKWARD": backward, "BLOCK_H": block_h, "BLOCK_D": block_d},
                        f"s{s} b{b} h{h} d{hd}", d, warps))
        for f in FFNS:
            block, warps = swiglu.swiglu_blocks(f)
            shape = f"{TOKENS}x{2 * f}"
            specs += [
                LaunchSpec("swiglu fwd", swiglu._swiglu_fwd_kernel, (_t(dt), _t(dt), 2 * f, f, f),
                           {"BLOCK": block}, shape, d, warps),
                LaunchSpec("swiglu bwd", swiglu._swiglu_bwd_kernel,
                           (_t(dt), _t(dt), _t(dt), f, 2 * f, 2 * f, f), {"BLOCK": block}, shape, d, warps),
            ]
        n = TOKENS * 4 * HIDDENS[0]
        for tanh in (True, False):
            for backward in (False, True):
                specs.append(LaunchSpec(
                    f"gelu_{'tanh' if tanh else 'erf'} {'bwd' if backward else 'fwd'}", gelu._gelu_kernel,
                    (_t(dt), _t(dt), _t(dt), n), {"BACKWARD": backward, "TANH": tanh, "BLOCK": gelu.BLOCK},
                    f"{TOKENS}x{4 * HIDDENS[0]}", d, gelu.NUM_WARPS))
    return specs


def _cross_entropy_kernels() -> list[LaunchSpec]:
    """Cross-entropy statistics and gradient (also the fused linear + CE's chunks) per vocabulary."""
    f32, i64, specs = torch.float32, torch.int64, []
    for v in VOCABS:
        block, warps = ce.ce_block(v, is_cuda=True)
        for dt in DTYPES:
            d, shape = _SHORT[dt], f"{TOKENS}x{v}"
            specs += [
                LaunchSpec("cross_entropy stats", ce._ce_stats_kernel,
                           (_t(dt), _t(i64), _t(f32), _t(f32), _t(f32), v, v, 0, -100),
                           {"BLOCK": block}, shape, d, warps),
                LaunchSpec("cross_entropy grad", ce._ce_grad_kernel,
                           (_t(dt), _t(dt), _t(i64), _t(f32), _t(f32), v, v, v, v, 0),
                           {"BLOCK": block}, shape, d, warps),
            ]
    return specs


def _quant_kernels() -> list[LaunchSpec]:
    """NF4 dequantization (QLoRA's base weights) into each model dtype, blocks of 64."""
    f32, u8, specs = torch.float32, torch.uint8, []
    for rows, cols in NF4_WEIGHTS:
        for dt in DTYPES:
            specs.append(LaunchSpec(
                "nf4_dequantize", nf4._nf4_dequantize_kernel, (_t(u8), _t(f32), _t(f32), _t(dt), rows * cols),
                {"BLOCK_SIZE": 64, "BLOCK": nf4.BLOCK}, f"{rows}x{cols}", _SHORT[dt], nf4.NUM_WARPS))
    return specs


def _attention_kernels(capability: int) -> list[LaunchSpec]:
    """Flash attention forward, D, dK/dV and dQ: every autotune candidate the launcher may pick,
    causal, and with a sliding window (launch names end in " window")."""
    f32, specs = torch.float32, []
    cases = [(shape, None) for shape in ATTENTION_SHAPES] + list(ATTENTION_WINDOWS)
    for dt in fa.attention_dtypes():
        for (b, heads, groups, s, hd), window in cases:
            windowed = window is not None
            precision, block_d = fa.attention_settings(dt, hd)
            d, shape = _SHORT[dt], f"b{b} H{heads} G{groups} s{s} d{hd}"
            tag = "" if window is None else " window"
            if window is not None:
                shape += f" W{window}"
            q_strides = (heads * hd, hd, b * heads * hd)  # [b, H, s, d] views of [s, b, H, d] memory
            kv_strides = (groups * hd, hd, b * groups * hd)
            flags = {"CAUSAL": True, "WINDOW": windowed, "PRECISION": precision, "BLOCK_D": block_d}
            left = 0 if window is None else window
            scales = (1.0 / hd**0.5, 1.0 / hd**0.5 * fa.LOG2E, left)
            for m, n, w, st in fa.prune_attention_configs(fa.FWD_CONFIGS, dt, hd, capability, "fwd", windowed):
                specs.append(LaunchSpec(
                    "flash_attn fwd" + tag, fa._attn_fwd_kernel,
                    (_t(dt), _t(dt), _t(dt), _t(dt), _t(f32), *q_strides, *kv_strides, *kv_strides,
                     *q_strides, heads, heads // groups, s, hd, scales[1], left),
                    {**flags, "BLOCK_M": m, "BLOCK_N": n}, shape, d, w, st, uses_dot=True))
            if window is None:  # D = rowsum(dO * O) knows nothing of masks
                specs.append(LaunchSpec(
                    "flash_attn bwd_delta", fa._attn_bwd_delta_kernel,
                    (_t(dt), _t(dt), _t(f32), *q_strides, *q_strides, heads, s, hd),
                    {"BLOCK_M": fa.DELTA_BLOCK_M, "BLOCK_D": block_d}, shape, d, 4))
            common = (*q_strides, *kv_strides, *kv_strides, *q_strides)
            for m, n, w, st in fa.prune_attention_configs(fa.DKDV_CONFIGS, dt, hd, capability, "dkdv", windowed):
                specs.append(LaunchSpec(
                    "flash_attn bwd_dkdv" + tag, fa._attn_bwd_dkdv_kernel,
                    (_t(dt), _t(dt), _t(dt), _t(dt), _t(f32), _t(f32), _t(dt), _t(dt), *common, *kv_strides,
                     *kv_strides, heads, groups, heads // groups, s, hd, *scales),
                    {**flags, "BLOCK_M": m, "BLOCK_N": n}, shape, d, w, st, uses_dot=True))
            for m, n, w, st in fa.prune_attention_configs(fa.DQ_CONFIGS, dt, hd, capability, "dq", windowed):
                specs.append(LaunchSpec(
                    "flash_attn bwd_dq" + tag, fa._attn_bwd_dq_kernel,
                    (_t(dt), _t(dt), _t(dt), _t(dt), _t(f32), _t(f32), _t(dt), *common, *q_strides,
                     heads, heads // groups, s, hd, *scales),
                    {**flags, "BLOCK_M": m, "BLOCK_N": n}, shape, d, w, st, uses_dot=True))
    return specs


def _moe_kernels() -> list[LaunchSpec]:
    """MoE: the grouped GEMM (y, dx, dw) of fc1 ([E, H, 2F]: gate and up) and fc2 ([E, F, H]), bf16/fp16
    (fp32 grouped GEMMs run in torch on GPUs); token permute/unpermute gathers and d probs, fp32/bf16/fp16."""
    f32, i32, i64, specs = torch.float32, torch.int32, torch.int64, []
    bm, bn, bk, warps, stages = gg.gemm_blocks(True)
    dbm, dbn, dbk, dwarps, dstages = gg.dw_blocks(True)
    for tokens, h, f, e, k in MOE_SHAPES:
        rows = tokens * k
        n_tiles = gg.max_row_tiles(rows, e, bm)
        for dt in (torch.bfloat16, torch.float16):
            d, prec = _SHORT[dt], gg._precision(dt)
            for what, kk, nn in (("fc1", h, 2 * f), ("fc2", f, h)):
                shape = f"{what} E{e} {rows}x{kk}x{nn}"
                blocks = {"PRECISION": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gg.GROUP}
                specs += [
                    LaunchSpec("grouped_gemm fwd", gg._grouped_gemm_kernel,  # y = x @ w[e]
                               (_t(dt), _t(dt), _t(dt), _t(i32), n_tiles, nn, kk, e,
                                kk, 1, kk * nn, nn, 1, nn, 1),
                               blocks, shape, d, warps, stages, uses_dot=True),
                    LaunchSpec("grouped_gemm dx", gg._grouped_gemm_kernel,  # dx = dy @ w[e]^T
                               (_t(dt), _t(dt), _t(dt), _t(i32), n_tiles, kk, nn, e,
                                nn, 1, kk * nn, 1, nn, kk, 1),
                               blocks, shape, d, warps, stages, uses_dot=True),
                    LaunchSpec("grouped_gemm dw", gg._grouped_gemm_dw_kernel,  # dw[e] = x_e^T @ dy_e
                               (_t(dt), _t(dt), _t(dt), _t(i64), _t(i64), nn, kk,
                                kk, 1, nn, 1, kk * nn, nn, 1),
                               {"PRECISION": prec, "BLOCK_M": dbm, "BLOCK_N": dbn, "BLOCK_K": dbk,
                                "GROUP_K": gg.GROUP},
                               shape, d, dwarps, dstages, uses_dot=True),
                ]
        for dt in DTYPES:
            d, block, shape = _SHORT[dt], perm._blocks(h), f"T{tokens} k{k} E{e} H{h}"
            for scale_dt in ((None, f32, dt) if dt != f32 else (None, f32)):
                has = scale_dt is not None
                tag = "" if not has else f" probs {_SHORT[scale_dt]}"
                specs += [
                    LaunchSpec("moe gather_rows" + (" (d expert_out)" if has else " (permute)"),
                               perm._gather_rows_kernel,
                               (_t(dt), _t(dt), _t(i64), _t(scale_dt or dt), h, k, h, h),
                               {"HAS_SCALE": has, "BLOCK": block}, shape + tag, d, perm.NUM_WARPS),
                    LaunchSpec("moe combine_rows" + (" (unpermute)" if has else " (d hidden)"),
                               perm._combine_rows_kernel,
                               (_t(dt), _t(dt), _t(i64), _t(scale_dt or dt), h, h, h),
                               {"TOP_K": k, "HAS_SCALE": has, "BLOCK": block},
                               shape + tag, d, perm.NUM_WARPS),
                ]
                if has:
                    specs.append(LaunchSpec("moe prob_grad", perm._prob_grad_kernel,
                                            (_t(dt), _t(dt), _t(i64), _t(scale_dt), h, k, h, h),
                                            {"BLOCK": block}, shape + tag, d, perm.NUM_WARPS))
    return specs


def launch_specs(capability: int) -> list[LaunchSpec]:
    """Every launch of every Triton kernel (for compute capability ``capability``, e.g. 90 or 80)."""
    return (_row_kernels() + _elementwise_kernels() + _cross_entropy_kernels()
            + _attention_kernels(capability) + _moe_kernels() + _quant_kernels())
