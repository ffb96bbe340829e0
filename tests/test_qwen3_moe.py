"""Qwen3-MoE from and to Hugging Face (issue 13): tiny random ``Qwen3MoeForCausalLM`` models built
from transformers configs (q/k RMSNorm per head, head_dim != hidden / heads, no shared expert,
dense layers from ``mlp_only_layers`` or ``decoder_sparse_step``, both ``norm_topk_prob``).

- megafast's logits equal transformers' (fp32, 1e-5 of the largest logit) at TP=1 and at
  TP=2 x PP=2, and greedy generation with the KV cache is token-identical;
- HF -> megafast (TP=2, PP=2) -> HF gives every tensor back bit for bit, none missing or extra,
  and the same configuration;
- an unknown config.json field, or a missing expert tensor, is a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil

import hf_models
import pytest
import torch
from dist import run_distributed
from seeding import draw_seed

from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.convert.converter import ConvertOptions, convert_checkpoint

VOCAB, LAYERS, EXPERTS, NEW = 101, 4, 4, 12
NAMES = ("normed", "pre_softmax")


def _hf_config(name: str):
    from transformers import Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, intermediate_size=40, moe_intermediate_size=16,
                  num_experts=EXPERTS, num_experts_per_tok=2, use_sliding_window=False, rope_theta=1e6)
    if name == "normed":  # top-k weights renormalised; layer 1 dense (mlp_only_layers)
        return Qwen3MoeConfig(**common, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
    # softmax over every expert, not renormalised; MoE on every second layer (decoder_sparse_step)
    return Qwen3MoeConfig(**common, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[])


MOE_LAYERS = {"normed": [True, False, True, True], "pre_softmax": [False, True, False, True]}


def build(name: str, seed: int):
    return hf_models.randomized(_hf_config(name), seed, attn_implementation="sdpa")


def _convert(loader: str, saver: str, src: str, out: str, **kw) -> str:
    convert_checkpoint(ConvertOptions(loader, saver, src, out, progress=False, **kw))
    return out


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF model, HF dir, prompt [1, 9], HF logits, HF greedy tokens, {(tp, pp): checkpoint})."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    seed = draw_seed("seed")
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, name in enumerate(NAMES):
        model = build(name, seed + 1 + i)
        hf_dir = str(root / f"{name}_hf")
        model.save_pretrained(hf_dir, max_shard_size="40KB")
        with torch.no_grad():
            logits = model(prompt).logits
        ckpts = {(tp, pp): _convert("hf", "megafast", hf_dir, str(root / f"{name}_tp{tp}pp{pp}"),
                                    target_tensor_parallel_size=tp, target_pipeline_parallel_size=pp)
                 for tp, pp in ((1, 1), (2, 2))}
        out[name] = (model, hf_dir, prompt, logits, _hf_greedy(model, prompt[0].tolist()), ckpts)
    return out


def test_config_carries_qk_norms_routing_and_layer_pattern(models):
    for name in NAMES:
        config = MegafastCheckpointReader(models[name][5][(2, 2)]).config
        assert config.qk_layernorm and config.kv_channels == 16 and not config.add_qkv_bias
        assert (config.num_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (EXPERTS, 2, 16)
        assert config.ffn_hidden_size == 40 and not config.moe_shared_expert_intermediate_size
        assert config.moe_router_pre_softmax == (name == "pre_softmax")
        assert [config.is_moe_layer(i) for i in range(LAYERS)] == MOE_LAYERS[name]


def test_logits_and_greedy_generation_equal_transformers_single_process(models):
    from megafast.generation.generator import Generator, load_for_generation
    from megafast.generation.sampling import SamplingConfig
    from megafast.parallel import ParallelState

    for name, (_, _, prompt, want, greedy, ckpts) in models.items():
        model = load_for_generation(MegafastCheckpointReader(ckpts[(1, 1)]), ParallelState.single())
        with torch.no_grad():
            got = model(prompt)[..., :VOCAB]
        hf_models.assert_rel_close(got, want, 1e-5, f"{name} logits (TP=1, PP=1)")
        tokens = Generator(model, ParallelState.single()).generate(prompt[0].tolist(), NEW,
                                                                     SamplingConfig(temperature=0.0))
        assert tokens == greedy, f"{name}: greedy {tokens} != transformers' {greedy}"


def _tp2_pp2_worker(rank: int, world: int, cases: list) -> dict:
    from hf_models import forward_stages

    from megafast.config import ParallelConfig
    from megafast.generation.generator import Generator, load_for_generation
    from megafast.generation.sampling import SamplingConfig
    from megafast.parallel import ParallelState

    state = ParallelState.create(ParallelConfig(2, 2))
    out = {}
    for name, ckpt, prompt in cases:
        model = load_for_generation(MegafastCheckpointReader(ckpt), state)
        logits = forward_stages(model, state, prompt, VOCAB)
        tokens = Generator(model, state).generate(prompt[0].tolist(), NEW, SamplingConfig(temperature=0.0))
        if state.is_last_stage and state.tp_rank == 0:
            out[name] = (logits, tokens)
    return out


def test_logits_and_greedy_generation_equal_transformers_tp2_pp2(models):
    # one model (four ranks are slow to start): pre_softmax puts a dense and an MoE layer on each stage
    cases = [(name, m[5][(2, 2)], m[2]) for name, m in models.items() if name == "pre_softmax"]
    results = {}
    for part in run_distributed(_tp2_pp2_worker, 4, cases):
        results.update(part)
    assert set(results) == {"pre_softmax"}
    for name, (logits, tokens) in results.items():
        hf_models.assert_rel_close(logits, models[name][3], 1e-5, f"{name} logits (TP=2, PP=2)")
        assert tokens == models[name][4], f"{name} at TP=2 x PP=2: greedy {tokens} != {models[name][4]}"


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _meaning(directory: str) -> dict:
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(directory, local_files_only=True).to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return d


@pytest.mark.parametrize("name", NAMES)
def test_hf_megafast_tp2_pp2_hf_roundtrip_is_bit_identical(models, name, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf_dir, prompt, logits, _, ckpts = models[name]
    out = _convert("megafast", "hf", ckpts[(2, 2)], str(tmp_path / "hf"))
    got, want = _read_safetensors(out), _read_safetensors(hf_dir)
    experts = [k for k in want if ".mlp.experts." in k]
    assert len(experts) == 3 * EXPERTS * sum(MOE_LAYERS[name]), sorted(want)[:8]
    assert sum(".q_norm." in k or ".k_norm." in k for k in want) == 2 * LAYERS
    assert set(got) == set(want), f"{name}: {sorted(set(want) ^ set(got))[:4]}"
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}: {k} differs after the round trip"
    assert _meaning(out) == _meaning(hf_dir), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(prompt).logits, logits), f"{name}: the exported model computes differently"


def test_unknown_config_field_is_a_one_line_error(models, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(models["normed"][1], bad)
    path = os.path.join(bad, "config.json")
    config = json.load(open(path))
    config["shared_expert_intermediate_size"] = 24  # a Qwen2-MoE field: Qwen3-MoE has no shared expert
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match=r"field 'shared_expert_intermediate_size' \(= 24\) is not one") as info:
        _convert("hf", "megafast", bad, str(tmp_path / "out"))
    assert "\n" not in str(info.value) and "Qwen3MoeForCausalLM" in str(info.value)
    assert not os.path.exists(tmp_path / "out" / "latest_checkpointed_iteration.txt")


def test_missing_expert_tensor_is_a_one_line_error(models, tmp_path):
    from safetensors.torch import save_file

    src, dst = models["normed"][1], str(tmp_path / "missing")
    shutil.copytree(src, dst)
    tensors = _read_safetensors(dst)
    for file in os.listdir(dst):
        if file.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(dst, file))
    del tensors["model.layers.3.mlp.experts.2.up_proj.weight"]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.2\.up_proj\.weight is missing") as info:
        _convert("hf", "megafast", dst, str(tmp_path / "out"), target_tensor_parallel_size=2)
    assert "\n" not in str(info.value)
