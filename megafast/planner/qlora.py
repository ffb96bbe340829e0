"""Memory per GPU of a QLoRA run (``--lora-rank R --qlora``): the planner's QLoRA row.

With QLoRA (megafast.model.qlora) one GPU of pipeline rank r holds, from the same layout rules as
the model, the data-parallel buffers and the optimizer, so the bytes are exact with the plain
optimizer (the distributed one divides the adapters' masters and states by DP; its bucket padding
is not counted):

- base: each adapted layer's weight shard (``--lora-target-modules``) in NF4: blocks =
  ceil(numel / 64); 32 bytes of packed codes per block (a last partial block padded) + a 4-byte
  fp32 absmax per block (4.5 bits per element), or with ``--qlora-double-quant`` 1 byte per block
  + 4 bytes per 256 blocks + a 4-byte offset (4.127 bits);
- frozen: everything else (embeddings, norms, output layer, layers without an adapter) in the model
  dtype, with no gradient, master or optimizer state;
- adapters: A [r, in] and B [out, r] per adapted layer, sharded like it (r (out + in) elements of
  the layer's shard shape), in the model dtype; their fp32 gradient buffer, fp32 masters (none in
  fp32 runs) and optimizer states (Adam: 8 bytes per element + a 4-byte ``step`` per tensor;
  Lion: 4 bytes per element).
"""

from __future__ import annotations

from dataclasses import dataclass

from megafast.config import GPTConfig, LoRAConfig, QLoRAConfig
from megafast.planner.layout import DTYPE_BYTES, Layout
from megafast.planner.memory import GRAD_BYTES, MASTER_BYTES, StaticMemory
from megafast.planner.parameters import rank_parameters


@dataclass(frozen=True)
class QLoRAMemory:
    """Bytes of model state on one GPU of a QLoRA run (module doc)."""

    base_nf4: int  # the adapted layers' frozen weights, NF4 codes + block scales
    frozen: int  # the other frozen weights, in the model dtype
    adapters: int  # LoRA A and B, in the model dtype
    gradients: int  # fp32 gradients of the adapters
    master_weights: int
    optimizer_states: int
    base_elements: int  # elements held in NF4 (bits per element = 8 * base_nf4 / base_elements)

    @property
    def total(self) -> int:
        return (self.base_nf4 + self.frozen + self.adapters + self.gradients + self.master_weights
                + self.optimizer_states)

    @property
    def static(self) -> StaticMemory:
        """The same bytes in the planner's four columns (weights = base + frozen + adapters)."""
        return StaticMemory(self.base_nf4 + self.frozen + self.adapters, self.gradients, self.master_weights,
                            self.optimizer_states)


def nf4_bytes(numel: int, qlora: QLoRAConfig) -> int:
    """Stored bytes of one weight of ``numel`` elements in NF4 (megafast.quant.nf4_quantize)."""
    blocks = -(-numel // qlora.block_size)
    codes = blocks * qlora.block_size // 2
    if not qlora.double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // qlora.double_quant_block_size) + 4


def qlora_memory(
    config: GPTConfig, layout: Layout, lora: LoRAConfig, qlora: QLoRAConfig, pp_rank: int = 0
) -> QLoRAMemory:
    """Model-state bytes of one GPU of pipeline rank ``pp_rank`` in a QLoRA run (module doc)."""
    e = DTYPE_BYTES[layout.dtype]
    base = frozen = base_elements = adapter_numel = adapter_tensors = 0
    for chunk in rank_parameters(config, layout, pp_rank):
        for spec in chunk:
            parts = spec.name.rsplit(".", 2)
            # LoRA/QLoRA wrap the 2-D linears; stacked MoE expert weights [E, out, in] stay as they are
            if len(parts) == 3 and parts[1] in lora.target_modules and parts[2] == "weight" and len(spec.shape) == 2:
                out_rows, in_cols = spec.shape
                base += nf4_bytes(spec.numel, qlora)
                base_elements += spec.numel
                adapter_numel += lora.rank * (out_rows + in_cols)
                adapter_tensors += 2
            else:
                frozen += spec.numel * e
    sharded = layout.distributed_optimizer and layout.dp > 1
    masters = -(-adapter_numel // layout.dp) if sharded else adapter_numel
    adam = layout.optimizer == "adam"
    states = masters * MASTER_BYTES * (2 if adam else 1) + (4 * adapter_tensors if adam else 0)
    return QLoRAMemory(
        base_nf4=base,
        frozen=frozen,
        adapters=adapter_numel * e,
        gradients=adapter_numel * GRAD_BYTES,
        master_weights=0 if layout.dtype == "fp32" else masters * MASTER_BYTES,
        optimizer_states=states,
        base_elements=base_elements,
    )


__all__ = ["QLoRAMemory", "nf4_bytes", "qlora_memory"]
