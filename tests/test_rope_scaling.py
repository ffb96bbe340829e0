"""RoPE scaling (llama3, linear, yarn): inverse frequencies and the YaRN attention factor against
the formulas written out here in plain Python floats (per frequency, no torch vector code), and
against transformers' own ``ROPE_INIT_FUNCTIONS``; the flags and checkpoint args that carry them.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from seeding import draw_seed

from megafast.arguments import build_parser, model_config
from megafast.checkpoint.args import config_from_args, model_args
from megafast.config import GPTConfig
from megafast.model.rotary import RotaryEmbedding, rope_frequencies

BASE = dict(
    num_layers=1, hidden_size=64, num_attention_heads=2, vocab_size=50, position_embedding_type="rope",
    normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
)


def _plain(d: int, base: float) -> list[float]:
    return [base ** (-(2 * j) / d) for j in range(d // 2)]


def llama3_by_hand(d, base, factor, low, high, old_context) -> list[float]:
    """Meta's reference (llama-models ``apply_scaling``), one frequency at a time."""
    out = []
    for f in _plain(d, base):
        wavelen = 2 * math.pi / f
        if wavelen < old_context / high:
            out.append(f)
        elif wavelen > old_context / low:
            out.append(f / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def yarn_by_hand(d, base, factor, old_context, beta_fast, beta_slow, truncate=True) -> tuple[list[float], float]:
    """YaRN (Peng et al. 2023, the reference ``find_correction_range`` / ``linear_ramp_mask``)."""

    def dim_of(rotations):  # the dimension index whose wavelength fits `rotations` times in the context
        return d * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for j, f in enumerate(_plain(d, base)):
        ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: keep f, 1: interpolate f / factor
        out.append(f / factor * ramp + f * (1 - ramp))
    mscale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    return out, mscale


def _config(**kw) -> GPTConfig:
    return GPTConfig(**BASE, **kw)


@pytest.mark.parametrize("d,base", [(64, 500000.0), (32, 10000.0), (128, 1e6)])
def test_frequencies_match_the_formulas(d, base):
    seed = draw_seed("seed")
    g = torch.Generator().manual_seed(seed)
    factor = float(torch.randint(2, 33, (1,), generator=g))
    old_context = int(torch.randint(16, 8193, (1,), generator=g))
    common = dict(kv_channels=d, rotary_base=base, use_rope_scaling=True, rope_scaling_factor=factor,
                  rope_scaling_original_max_position_embeddings=old_context)
    msg = f"(seed {seed}: factor {factor}, original context {old_context})"

    got, scale = rope_frequencies(_config(**common, rope_scaling_type="linear"))
    want = [f / factor for f in _plain(d, base)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0, msg=msg)
    assert scale == 1.0

    got, scale = rope_frequencies(_config(**common, rope_scaling_type="llama3"))
    want = llama3_by_hand(d, base, factor, 1.0, 4.0, old_context)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0, msg=msg)
    assert scale == 1.0

    for truncate in (True, False):
        config = _config(**common, rope_scaling_type="yarn", yarn_correction_range_round_to_int=truncate)
        got, scale = rope_frequencies(config)
        want, mscale = yarn_by_hand(d, base, factor, old_context, 32.0, 1.0, truncate)
        # the blend weight is an fp32 number in [0, 1] (transformers computes 1 - (1 - ramp)): its
        # rounding moves a frequency by up to a few fp32 ulps of the unscaled frequency
        plain = torch.tensor(_plain(d, base), dtype=torch.float64)
        err = ((got.double() - torch.tensor(want, dtype=torch.float64)).abs() / plain).max().item()
        assert err <= 1e-6, f"yarn (truncate={truncate}): error {err:.2e} of the unscaled frequency {msg}"
        assert scale == pytest.approx(mscale, rel=1e-12), msg


def test_llama3_keeps_high_frequencies_and_divides_low_ones():
    """Llama 3.1's published setting: the shortest wavelengths unchanged, the longest / 8."""
    config = _config(kv_channels=128, rotary_base=500000.0, use_rope_scaling=True, rope_scaling_factor=8.0)
    got, _ = rope_frequencies(config)
    plain = torch.tensor(_plain(128, 500000.0), dtype=torch.float32)
    assert got[0] == plain[0] and got[-1] == pytest.approx(plain[-1].item() / 8, rel=1e-6)


def test_yarn_cos_sin_carry_the_attention_factor_and_mscale_options():
    config = _config(kv_channels=32, use_rope_scaling=True, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                     rope_scaling_original_max_position_embeddings=64)
    rope = RotaryEmbedding.from_config(config)
    cos, sin = rope(10, torch.device("cpu"))
    inv_freq, _ = rope_frequencies(config)
    angles = torch.arange(10, dtype=torch.float32)[:, None] * inv_freq[None]  # [s, d/2]
    m = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(cos[:, 0, 0, :16], angles.cos() * m)
    torch.testing.assert_close(sin[:, 0, 0, 16:], angles.sin() * m)
    both = dataclasses.replace(config, yarn_mscale=0.707, yarn_mscale_all_dim=0.707)  # DeepSeek style
    assert rope_frequencies(both)[1] == 1.0
    given = dataclasses.replace(config, yarn_attention_factor=1.5)
    assert rope_frequencies(given)[1] == 1.5


def _hf_config(d, base, max_positions, params):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d, max_position_embeddings=max_positions,
                       rope_parameters={"rope_theta": base, **params})


@pytest.mark.parametrize(
    "params,fields",
    [
        ({"rope_type": "linear", "factor": 4.0}, dict(rope_scaling_type="linear", rope_scaling_factor=4.0)),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64},
            dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_scaling_original_max_position_embeddings=64),
        ),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
             "beta_slow": 2.0},
            dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_scaling_original_max_position_embeddings=32,
                 yarn_beta_fast=16.0, yarn_beta_slow=2.0),
        ),
    ],
)
def test_frequencies_equal_transformers(params, fields):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, base = 32, 10000.0
    want, want_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](_hf_config(d, base, 128, params), "cpu")
    got, scale = rope_frequencies(_config(kv_channels=d, rotary_base=base, use_rope_scaling=True, **fields))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


def test_flags_and_checkpoint_args_carry_the_scaling():
    argv = ("--num-layers 1 --hidden-size 64 --num-attention-heads 2 --seq-length 16 --micro-batch-size 1 "
            "--position-embedding-type rope --use-rope-scaling --rope-scaling-factor 4 --rope-scaling-type yarn "
            "--yarn-original-max-position-embeddings 32 --yarn-beta-fast 16 --window-size 7,0 --qk-layernorm").split()
    args = build_parser().parse_args(argv)
    args.max_position_embeddings = 64
    config = model_config(args, 100)
    assert (config.use_rope_scaling, config.rope_scaling_type, config.rope_scaling_factor) == (True, "yarn", 4.0)
    assert config.rope_scaling_original_max_position_embeddings == 32 and config.yarn_beta_fast == 16.0
    assert config.window_size == (7, 0) and config.qk_layernorm
    assert config_from_args(model_args(config, 1, 1), 100) == config
    megatron = build_parser().parse_args(argv[:12] + ["--use-rope-scaling"])  # Megatron's meaning: llama3, 8
    megatron.max_position_embeddings = 64
    plain = model_config(megatron, 100)
    assert (plain.rope_scaling_type, plain.rope_scaling_factor) == ("llama3", 8.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(use_rope_scaling=True, rope_scaling_type="dynamic"), "unknown --rope-scaling-type 'dynamic'"),
        (dict(use_rope_scaling=True, rope_scaling_factor=0.0), "--rope-scaling-factor must be > 0"),
        (dict(window_size=(4, 4)), r"--window-size 4,4 is not \(left, 0\)"),
    ],
)
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        _config(**kw)
    assert "\n" not in str(info.value)


def test_window_of_minus_one_is_plain_causal():
    assert _config(window_size=(-1, 0)).window_size is None
