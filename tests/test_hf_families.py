"""Llama 3.1+ (llama3 RoPE scaling), DeepSeek-Coder (linear), YaRN, Qwen3 (q/k norm, explicit
head_dim) and Mistral / Qwen2 with a sliding window: tiny random transformers models built from
configs, converted to megafast at TP=2 x PP=2.

- the logits of a prompt longer than the original context / the window equal transformers'
  (fp32, 1e-5 of the largest logit), single-process and at TP=2 x PP=2 (4 gloo ranks);
- greedy generation with the KV cache is token-identical to ``model.generate`` at both layouts;
- HF -> megafast (TP=2, PP=2) -> HF reproduces every tensor bit for bit and the config's meaning;
- a config.json field the converter does not know is a one-line error naming it.
"""

from __future__ import annotations

import json
import os

import hf_models
import pytest
import torch
from dist import run_distributed
from seeding import draw_seed

from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.convert.converter import ConvertOptions, convert_checkpoint

VOCAB, PROMPT, NEW = 101, 40, 12  # the prompt is longer than every original context and window below


def _config(name: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    if name == "llama31":  # Llama 3.1/3.2/3.3's rope_scaling, with a 16-token original context
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaConfig(**common, max_position_embeddings=128, rope_parameters=rope, tie_word_embeddings=True)
    if name == "deepseek_coder":  # DeepSeek-Coder: Llama with linear scaling (factor 4)
        rope = {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0}
        return LlamaConfig(**common, max_position_embeddings=64, rope_parameters=rope, tie_word_embeddings=False)
    if name == "llama_yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0}
        return LlamaConfig(**common, max_position_embeddings=64, rope_parameters=rope, tie_word_embeddings=False)
    if name == "qwen3":  # q/k RMSNorm, head_dim 16 != hidden / heads
        return Qwen3Config(**common, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "mistral_window":  # every token sees the 8 latest (itself included)
        return MistralConfig(**common, head_dim=8, sliding_window=8, max_position_embeddings=128,
                             tie_word_embeddings=False)
    if name == "qwen2_window":  # Qwen2 with use_sliding_window on every layer
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=0,
                           max_position_embeddings=128, tie_word_embeddings=True)
    raise KeyError(name)


NAMES = ("llama31", "deepseek_coder", "llama_yarn", "qwen3", "mistral_window", "qwen2_window")


def build(name: str, seed: int):
    return hf_models.randomized(_config(name), seed, attn_implementation="sdpa")


def _convert(loader: str, saver: str, src: str, out: str, **kw) -> str:
    convert_checkpoint(ConvertOptions(loader, saver, src, out, progress=False, **kw))
    return out


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (HF model, HF dir, prompt [1, PROMPT], HF logits, HF greedy tokens, TP2xPP2 checkpoint)."""
    root = tmp_path_factory.mktemp("families")
    seed = draw_seed("seed")
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, name in enumerate(NAMES):
        model = build(name, seed + i)
        hf_dir = str(root / f"{name}_hf")
        model.save_pretrained(hf_dir, max_shard_size="40KB")
        with torch.no_grad():
            logits = model(prompt).logits
        greedy = _hf_greedy(model, prompt[0].tolist())
        ckpt = _convert("hf", "megafast", hf_dir, str(root / f"{name}_tp2pp2"),
                        target_tensor_parallel_size=2, target_pipeline_parallel_size=2)
        out[name] = (model, hf_dir, prompt, logits, greedy, ckpt)
    return out


def _logits_and_greedy(model, state, prompt: torch.Tensor) -> tuple:
    from hf_models import forward_stages

    from megafast.generation.generator import Generator
    from megafast.generation.sampling import SamplingConfig

    logits = forward_stages(model, state, prompt, model.config.vocab_size)
    tokens = Generator(model, state).generate(prompt[0].tolist(), NEW, SamplingConfig(temperature=0.0))
    return logits, tokens


def family_worker(rank: int, world: int, cases: list) -> dict:
    """Every model at TP=2 x PP=2: logits of the prompt (last stage) and greedy tokens."""
    from megafast.config import ParallelConfig
    from megafast.generation.generator import load_for_generation
    from megafast.parallel import ParallelState

    state = ParallelState.create(ParallelConfig(2, 2))
    out = {}
    for name, ckpt, prompt in cases:
        model = load_for_generation(MegafastCheckpointReader(ckpt), state)
        logits, tokens = _logits_and_greedy(model, state, prompt)
        if state.is_last_stage and state.tp_rank == 0:
            out[name] = (logits, tokens)
    return out


def test_converted_configs_carry_the_family_features(families):
    configs = {name: MegafastCheckpointReader(f[5]).config for name, f in families.items()}
    c = configs["llama31"]
    assert (c.use_rope_scaling, c.rope_scaling_type, c.rope_scaling_factor) == (True, "llama3", 8.0)
    assert c.rope_scaling_original_max_position_embeddings == 16 and c.rotary_base == 500000.0
    assert (configs["deepseek_coder"].rope_scaling_type, configs["deepseek_coder"].rope_scaling_factor) == ("linear", 4.0)
    assert configs["llama_yarn"].rope_scaling_type == "yarn"
    assert configs["qwen3"].qk_layernorm and configs["qwen3"].kv_channels == 16
    assert configs["mistral_window"].window_size == (7, 0) and configs["qwen2_window"].window_size == (5, 0)
    assert not any(c.qk_layernorm for n, c in configs.items() if n != "qwen3")


def test_logits_and_greedy_generation_equal_transformers_single_process(families):
    from megafast.generation.generator import load_for_generation
    from megafast.parallel import ParallelState

    for name, (_, hf_dir, prompt, want, greedy, _) in families.items():
        ckpt = _convert("hf", "megafast", hf_dir, os.path.join(os.path.dirname(hf_dir), f"{name}_tp1pp1"))
        model = load_for_generation(MegafastCheckpointReader(ckpt), ParallelState.single())
        logits, tokens = _logits_and_greedy(model, ParallelState.single(), prompt)
        hf_models.assert_rel_close(logits, want, 1e-5, f"{name} logits (TP=1, PP=1)")
        assert tokens == greedy, f"{name}: greedy {tokens} != transformers' {greedy}"


def test_logits_and_greedy_generation_equal_transformers_tp2_pp2(families):
    cases = [(name, f[5], f[2]) for name, f in families.items()]
    results = {}
    for part in run_distributed(family_worker, 4, cases):
        results.update(part)
    assert set(results) == set(families)
    for name, (logits, tokens) in results.items():
        hf_models.assert_rel_close(logits, families[name][3], 1e-5, f"{name} logits (TP=2, PP=2)")
        assert tokens == families[name][4], f"{name} at TP=2 x PP=2: greedy {tokens} != {families[name][4]}"


def _meaning(directory: str) -> dict:
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(directory, local_files_only=True).to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return d


def test_hf_megafast_hf_roundtrip_is_bit_identical(families, tmp_path):
    from safetensors.torch import load_file

    for name, (model, hf_dir, _, _, _, ckpt) in families.items():
        out = _convert("megafast", "hf", ckpt, str(tmp_path / name))
        tensors = {}
        for file in sorted(os.listdir(out)):
            if file.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(out, file)))
        want = hf_models.hf_state_dict(model)
        assert set(tensors) == set(want), f"{name}: {set(tensors) ^ set(want)}"
        for key, value in want.items():
            assert torch.equal(tensors[key], value), f"{name}: {key} differs"
        assert _meaning(out) == _meaning(hf_dir), name


def _with_field(hf_dir: str, out: str, **fields) -> str:
    import shutil

    shutil.copytree(hf_dir, out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(fields)
    with open(path, "w") as f:
        json.dump(config, f)
    return out


@pytest.mark.parametrize(
    "name,fields,match",
    [
        ("llama31", {"attn_logit_softcapping": 30.0}, r"field 'attn_logit_softcapping' \(= 30.0\) is not one"),
        ("qwen3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, "RoPE scaling 'longrope'"),
        ("llama31", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "smoothing": 2}}, r"rope_parameters\.smoothing=2"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True"),
        ("mistral_window", {"layer_types": ["sliding_attention"] * 4}, "field 'layer_types'"),
        ("qwen2_window", {"layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}, "layer_types=.*mixed"),
    ],
)
def test_unknown_or_unsupported_fields_are_one_line_errors(families, tmp_path, name, fields, match):
    bad = _with_field(families[name][1], str(tmp_path / "bad"), **fields)
    with pytest.raises(ValueError, match=match) as info:
        _convert("hf", "megafast", bad, str(tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "out" / "latest_checkpointed_iteration.txt")
