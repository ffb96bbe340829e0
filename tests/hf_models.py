"""Tiny random Hugging Face models for the conversion and generation tests (built from configs,
nothing downloaded), saved in every checkpoint format the converter reads, plus a manual forward
through megafast's pipeline stages with p2p between ranks.

| name          | architecture      | features                                   | saved as                      |
|---------------|-------------------|--------------------------------------------|-------------------------------|
| llama_gqa     | LlamaForCausalLM  | GQA 4 heads / 2 groups, untied, rope 5e5   | sharded safetensors + index   |
| llama_tied    | LlamaForCausalLM  | GQA, tied embeddings                       | pytorch_model.bin             |
| mistral       | MistralForCausalLM| head_dim 16 != hidden/heads (GQA 4 / 2)    | sharded safetensors + index   |
| qwen2         | Qwen2ForCausalLM  | QKV bias, tied                             | model.safetensors             |
| gpt2          | GPT2LMHeadModel   | Conv1D, fused c_attn, learned positions    | sharded pytorch_model.bin     |

Weights are redrawn larger than HF's init (and biases non-zero) so that every tensor matters.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

VOCAB = 101  # not a multiple of anything: the vocabulary padding is exercised
LAYERS = 4


def _config(name: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    if name == "llama_gqa":
        return LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)
    if name == "llama_tied":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5)
    if name == "mistral":
        return MistralConfig(
            **common, num_key_value_heads=2, head_dim=16, sliding_window=None, tie_word_embeddings=False
        )
    if name == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)
    if name == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=LAYERS,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise KeyError(name)


NAMES = ("llama_gqa", "llama_tied", "mistral", "qwen2", "gpt2")


def build(name: str, seed: int = 0):
    """The HF model ``name`` in eval mode with random fp32 weights."""
    return randomized(_config(name), seed)


def randomized(config, seed: int, **from_config):
    """An HF model of ``config`` in eval mode with random fp32 weights, larger than HF's init so that
    every tensor matters: norm weights 1 + 0.1 N(0, 1), everything else 0.15 N(0, 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, **from_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in pname or "ln_" in pname) and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def save(model, name: str, directory: str, max_shard_size: str = "24KB") -> None:
    """Save in the format the table above gives for ``name``."""
    if name in ("llama_gqa", "mistral"):
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return
    if name == "qwen2":
        model.save_pretrained(directory, max_shard_size="100MB")
        return
    model.save_pretrained(directory)  # config.json and generation_config.json as HF writes them
    for file in os.listdir(directory):
        if file.startswith("model"):
            os.remove(os.path.join(directory, file))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if name == "llama_tied":
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    keys = sorted(state)  # gpt2: two .bin shards and their index
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, os.path.join(directory, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors an HF export must reproduce (a tied model's lm_head is the embedding, not saved)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def forward_stages(model, state, ids: torch.Tensor, vocab: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] on the last stage (None elsewhere) of one model chunk
    per rank, hidden states passed between stages with blocking send/recv."""
    import torch.distributed as dist

    from megafast.parallel.mappings import gather_from_tensor_parallel_region

    with torch.no_grad():
        if state.is_first_stage:
            x = model(ids)
        else:
            x = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)  # [s, b, h]
            dist.recv(x, src=state.pp_ranks[state.pp_rank - 1], group=state.pp_group)
            x = model(hidden_states=x)
        if not state.is_last_stage:
            dist.send(x.contiguous(), dst=state.pp_ranks[state.pp_rank + 1], group=state.pp_group)
            return None
        return gather_from_tensor_parallel_region(x, state.tp_group)[..., :vocab]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |a - e| <= tol * max |e| (the scale-relative error of the whole tensor)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"
