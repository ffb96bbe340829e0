"""Every Triton kernel launch of training compiles for sm_90a (H100/H200) and sm_80 (A100) on this
CPU machine (triton.compile ahead of time + the wheel's ptxas), fits in shared memory, does not
spill registers and (sm_90a) lowers its bf16/fp16 tl.dot to wgmma. See megafast/kernels/aot_check.py."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from megafast.kernels import aot_check, aot_specs  # noqa: E402
from megafast.kernels import flash_attention_kernel as fa  # noqa: E402


def test_every_launch_compiles_fits_and_does_not_spill(record_property):
    results = aot_check.check_all((90, 80), jobs=min(2, os.cpu_count() or 1))
    # printed at the end of the session by conftest.py (also from a pytest-xdist worker)
    record_property("terminal_summary", aot_check.table(results) + "\n\n" + aot_check.summary(results))
    bad = aot_check.failures(results)
    assert not bad, "\n".join(bad)
    kernels = {r.kernel for r in results}
    assert {"rms_norm fwd", "rms_norm bwd", "add_rms_norm fwd", "add_rms_norm bwd", "layer_norm fwd",
            "layer_norm bwd", "rope fwd", "rope bwd", "swiglu fwd", "swiglu bwd", "gelu_tanh fwd",
            "gelu_erf bwd", "cross_entropy stats", "cross_entropy grad", "flash_attn fwd",
            "flash_attn bwd_delta", "flash_attn bwd_dkdv", "flash_attn bwd_dq", "grouped_gemm fwd",
            "grouped_gemm dx", "grouped_gemm dw", "moe gather_rows (permute)", "moe combine_rows (unpermute)",
            "moe gather_rows (d expert_out)", "moe combine_rows (d hidden)", "moe prob_grad", "nf4_dequantize",
            "flash_attn fwd window", "flash_attn bwd_dkdv window", "flash_attn bwd_dq window"} <= kernels
    dots = [r for r in results if r.arch == "sm_90a" and r.wgmma is not None]
    assert dots and all(r.wgmma for r in dots)


def test_the_check_flags_each_problem():
    """The failure rules themselves, on hand-made results (no compile)."""
    clean = aot_check.Result("sm_90a", "k", "s", "bf16", "", 4, 3, shared=1024, registers=128)
    assert clean.problems(90) == []
    assert "shared memory" in aot_check.Result(**{**clean.__dict__, "shared": 232449}).problems(90)[0]
    assert aot_check.Result(**{**clean.__dict__, "shared": 200000}).problems(90) == []
    assert "shared memory" in aot_check.Result(**{**clean.__dict__, "shared": 200000}).problems(80)[0]
    assert "spills" in aot_check.Result(**{**clean.__dict__, "spill_bytes": 8}).problems(90)[0]
    assert "wgmma" in aot_check.Result(**{**clean.__dict__, "wgmma": False}).problems(90)[0]
    assert "compile" in aot_check.Result(**{**clean.__dict__, "error": "boom"}).problems(90)[0]


def test_ptxas_usage_reads_spills():
    """A kernel that must spill (a big private array indexed at run time) is reported as spilling."""
    ptx = """
.version 8.0
.target sm_80
.address_size 64
.visible .entry spill(.param .u64 p, .param .u32 n)
{
  .local .align 4 .b8 buf[4096];
  .reg .b32 r<4>; .reg .b64 rd<6>;
  ld.param.u64 rd1, [p]; ld.param.u32 r1, [n];
  mov.u64 rd2, buf; cvt.u64.u32 rd3, r1; shl.b64 rd3, rd3, 2; add.u64 rd4, rd2, rd3;
  st.local.u32 [rd4], r1; ld.local.u32 r2, [rd2]; st.global.u32 [rd1], r2;
  ret;
}
"""
    regs, spills = aot_check.ptxas_usage(ptx, "sm_80", 80)
    assert regs > 0 and spills == 0  # a local array is stack, not a spill: only spills count
    # the real spill numbers come from ptxas's "bytes spill stores/loads" lines
    assert aot_check._PTXAS_RE["spill_stores"].findall("8 bytes spill stores, 12 bytes spill loads") == ["8"]


def test_attention_autotune_candidates_are_the_pruned_ones():
    """Every candidate the launcher may pick is one the compile check covers; fp32 is not offered on GPUs."""
    for cc in (90, 80):
        specs = [s for s in aot_specs.launch_specs(cc) if s.name == "flash_attn bwd_dkdv"]
        seen = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages) for s in specs}
        for hd in (64, 128):
            kept = set(fa.prune_attention_configs(fa.DKDV_CONFIGS, torch.bfloat16, hd, cc, "dkdv"))
            assert kept and kept <= seen
        windowed = [s for s in aot_specs.launch_specs(cc) if s.name == "flash_attn bwd_dkdv window"]
        seen = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages) for s in windowed}
        assert windowed and all(s.constexprs["WINDOW"] for s in windowed)
        for hd in (64, 128):
            kept = set(fa.prune_attention_configs(fa.DKDV_CONFIGS, torch.bfloat16, hd, cc, "dkdv", window=True))
            assert kept and kept <= seen
    with pytest.raises(ValueError, match="bf16/fp16"):
        fa.prune_attention_configs(fa.FWD_CONFIGS, torch.float32, 64, 90)
