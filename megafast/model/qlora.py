"""QLoRA: the frozen base weights of the LoRA-adapted layers stored in NF4 (Dettmers et al. 2023).

After :func:`megafast.model.lora.apply_lora` and once the base weights are loaded
(``--pretrained-checkpoint``: quantize on load), :func:`quantize_base_` replaces the ``weight``
parameter of every adapted column- / row-parallel layer by a :class:`megafast.quant.NF4Weight`
(0.5 byte per element + block absmax), so the layer computes

    y = x W_hat^T + b + s (x A^T) B^T,      W_hat = nf4_dequantize(nf4_quantize(W))

with W_hat dequantized on the fly in the forward and again in the backward pass (one layer at a
time; no full-precision copy is kept). Each tensor-parallel rank quantizes its own shard; the
blocks run over the flattened shard, so they are the full weight's blocks whenever a shard's rows
are a multiple of the block size long (then TP=2 gives the same W_hat as TP=1). Embeddings,
norms, the output layer and layers without an adapter stay in the model dtype.

The NF4 buffers are never saved: checkpoints hold the adapters only, and an export merges them
into the dequantized base (:func:`dequantize_base_state`, used by megafast.convert.lora_merge).
"""

from __future__ import annotations

import torch
from torch import nn

from megafast.config import QLoRAConfig
from megafast.model.lora import LINEAR_IN, LoRAAdapter
from megafast.quant import NF4Weight, nf4_dequantize, nf4_quantize


def quantize_base_(model: nn.Module, config: QLoRAConfig, backend: str = "auto") -> int:
    """Store the base weight of every LoRA-adapted layer of ``model`` in NF4 (in place).

    Returns the number of weight elements now held in NF4 on this rank. The full-precision
    parameters are released (nothing else references frozen weights: data parallelism and the
    optimizer keep only trainable ones).
    """
    targets = [m for m in model.modules() if isinstance(getattr(m, "adapter", None), LoRAAdapter)
               and isinstance(getattr(m, "weight", None), torch.Tensor)]
    for module in targets:  # checked before anything changes
        if module.weight.requires_grad:
            raise ValueError(f"{type(module).__name__} has a trainable weight: QLoRA quantizes frozen bases only")
    count = 0
    for module in targets:
        weight = module.weight.detach()
        del module.weight  # the parameter goes; a submodule of the same name takes its place
        module.weight = NF4Weight.from_weight(
            weight, config.block_size, config.double_quant, config.double_quant_block_size, backend
        )
        count += weight.numel()
    return count


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the NF4 weights of ``model`` (packed codes and block scales)."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, NF4Weight))


def dequantize_base_state(
    state: dict[str, torch.Tensor], config: QLoRAConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The state dict (one TP rank's, or full) with the base weight of every adapted layer replaced
    by its NF4 round trip, exactly the W_hat a QLoRA run with the same shards computes with.

    ``dtype``: the run's model dtype (the weights are cast to it before quantizing, as the run's
    loaded parameters were); the result keeps each weight's stored dtype.
    """
    out = dict(state)
    for key in state:
        if not key.endswith(LINEAR_IN):
            continue
        name = f"{key[: -len(LINEAR_IN) - 1]}.weight"
        if name not in out:
            raise ValueError(f"adapter {key} has no base weight {name} to dequantize")
        w = out[name]
        q = nf4_quantize(w.to(dtype or w.dtype), config.block_size, config.double_quant,
                         config.double_quant_block_size)
        out[name] = nf4_dequantize(q).to(w.dtype)
    return out


__all__ = ["dequantize_base_state", "quantize_base_", "quantized_bytes"]
