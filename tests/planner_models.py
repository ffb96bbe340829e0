"""Small GPT-2 and Llama configs and the saved-activation measurement shared by the planner and
recompute tests (test_planner.py, test_recompute.py)."""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

from megafast.config import GPTConfig
from megafast.model import GPTModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpt2(**kw) -> GPTConfig:
    return GPTConfig(
        **{
            **dict(
                num_layers=4,
                hidden_size=64,
                num_attention_heads=8,
                vocab_size=1000,
                max_position_embeddings=64,
                ffn_hidden_size=160,
            ),
            **kw,
        }
    )


def llama(**kw) -> GPTConfig:
    return gpt2(
        **{
            **dict(
                position_embedding_type="rope",
                normalization="RMSNorm",
                activation="swiglu",
                add_bias_linear=False,
                num_query_groups=2,
                tie_embeddings=False,
            ),
            **kw,
        }
    )


def saved_activation_bytes(model: GPTModel, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(seen.values())
