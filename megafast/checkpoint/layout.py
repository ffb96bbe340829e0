"""megafast's checkpoint tensors as full (unsharded, unpadded) tensors: names, shapes, TP splits.

Every converter speaks this neutral form: the model is a sequence of *groups* (the embedding,
then each transformer layer, then the final norm and output layer), each a dict from megafast
parameter name (DESIGN.md, global layer indices) to the full tensor that the TP ranks' shards
come from, with the vocabulary unpadded. A loader yields groups in order, a saver consumes them,
so at most one layer is held at a time.

Full layouts (h hidden, H heads, G query groups, d head dim, f FFN size, V vocabulary):

| name                                         | full shape          | TP split (dim, stride)   |
|----------------------------------------------|---------------------|--------------------------|
| embedding.word_embeddings.weight             | [V, h]              | (0, 1), padded to Vp     |
| embedding.position_embeddings.weight         | [P, h]              | replicated               |
| decoder.layers.i.*layernorm.{weight,bias}    | [h]                 | replicated               |
| decoder.layers.i.self_attention.linear_qkv.* | [(H + 2G) d, h]     | (0, 1), grouped per G    |
| decoder.layers.i.self_attention.linear_proj  | weight [h, H d]     | (1, 1); bias replicated  |
| decoder.layers.i.self_attention.{q,k}_layernorm | [d] (--qk-layernorm) | replicated            |
| decoder.layers.i.mlp.linear_fc1.*            | [f or 2f, h]        | (0, 2) SwiGLU, else (0, 1)|
| decoder.layers.i.mlp.linear_fc2              | weight [h, f]       | (1, 1); bias replicated  |
| decoder.layers.i.mlp.router.weight (MoE)     | [E, h]              | replicated               |
| decoder.layers.i.mlp.experts.linear_fc1      | weight [E, 2F or F, h] | replicated (expert TP 1)|
| decoder.layers.i.mlp.experts.linear_fc2      | weight [E, h, F]    | replicated               |
| decoder.layers.i.mlp.shared_experts.*        | gate_weight [1, h], linear_fc1 [2S or S, h], linear_fc2 [h, S] | replicated |
| decoder.final_layernorm.{weight,bias}        | [h]                 | replicated               |
| output_layer.weight (untied only)            | [V, h]              | (0, 1), padded to Vp     |

Fused QKV rows, per query group g: its H/G query heads, then its k head, then its v head (each
d rows). SwiGLU's fc1 is [gate; up] in full; rank r holds [gate_r; up_r] (stride 2).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from megafast.config import GPTConfig
from megafast.parallel.layers import shard, unshard

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_TENSORS = (WORD_EMBEDDINGS, OUTPUT_LAYER)

Specs = dict[str, tuple[int, ...]]  # megafast name -> full (unpadded) shape


def layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def _norm_specs(config: GPTConfig, prefix: str) -> Specs:
    h = config.hidden_size
    specs = {f"{prefix}.weight": (h,)}
    if config.normalization == "LayerNorm":
        specs[f"{prefix}.bias"] = (h,)
    return specs


def embedding_specs(config: GPTConfig) -> Specs:
    specs: Specs = {WORD_EMBEDDINGS: (config.vocab_size, config.hidden_size)}
    if config.position_embedding_type == "learned_absolute":
        specs[POSITION_EMBEDDINGS] = (config.max_position_embeddings, config.hidden_size)
    return specs


def layer_specs(config: GPTConfig, i: int) -> Specs:
    """Full shapes of transformer layer ``i``'s tensors, in the model's state-dict order."""
    h, p = config.hidden_size, layer_prefix(i)
    fc1_rows = config.ffn_hidden_size * (2 if config.activation == "swiglu" else 1)
    specs = _norm_specs(config, f"{p}input_layernorm")
    specs[f"{p}self_attention.linear_qkv.weight"] = (config.qkv_size, h)
    if config.qkv_bias:
        specs[f"{p}self_attention.linear_qkv.bias"] = (config.qkv_size,)
    specs[f"{p}self_attention.linear_proj.weight"] = (h, config.num_attention_heads * config.head_dim)
    if config.add_bias_linear:
        specs[f"{p}self_attention.linear_proj.bias"] = (h,)
    if config.qk_layernorm:  # per-head norms over d, replicated
        for which in ("q_layernorm", "k_layernorm"):
            specs[f"{p}self_attention.{which}.weight"] = (config.head_dim,)
            if config.normalization == "LayerNorm":
                specs[f"{p}self_attention.{which}.bias"] = (config.head_dim,)
    specs.update(_norm_specs(config, f"{p}pre_mlp_layernorm"))
    if config.is_moe_layer(i):
        specs.update(moe_specs(config, i))
        return specs
    specs[f"{p}mlp.linear_fc1.weight"] = (fc1_rows, h)
    if config.add_bias_linear:
        specs[f"{p}mlp.linear_fc1.bias"] = (fc1_rows,)
    specs[f"{p}mlp.linear_fc2.weight"] = (h, config.ffn_hidden_size)
    if config.add_bias_linear:
        specs[f"{p}mlp.linear_fc2.bias"] = (h,)
    return specs


def moe_specs(config: GPTConfig, i: int) -> Specs:
    """Full shapes of MoE layer ``i``'s MLP tensors (E experts of FFN size F, shared size S)."""
    h, p, E, F = config.hidden_size, f"{layer_prefix(i)}mlp.", config.num_experts, config.moe_ffn_hidden_size
    glu = 2 if config.activation == "swiglu" else 1
    specs = {
        f"{p}router.weight": (E, h),
        f"{p}experts.linear_fc1.weight": (E, glu * F, h),
        f"{p}experts.linear_fc2.weight": (E, h, F),
    }
    shared = config.moe_shared_expert_intermediate_size
    if shared:
        if config.moe_shared_expert_gate:
            specs[f"{p}shared_experts.gate_weight"] = (1, h)
        specs[f"{p}shared_experts.linear_fc1.weight"] = (glu * shared, h)
        specs[f"{p}shared_experts.linear_fc2.weight"] = (h, shared)
    return specs


def final_specs(config: GPTConfig) -> Specs:
    specs = _norm_specs(config, "decoder.final_layernorm")
    if not config.tie_embeddings:
        specs[OUTPUT_LAYER] = (config.vocab_size, config.hidden_size)
    return specs


def groups(config: GPTConfig) -> list[tuple[str, Specs]]:
    """(label, specs) of every group in order: embedding, layer 0 .. L-1, final."""
    out = [("embedding", embedding_specs(config))]
    out += [(f"layer {i}", layer_specs(config, i)) for i in range(config.num_layers)]
    out.append(("final", final_specs(config)))
    return out


def tp_partition(name: str, config: GPTConfig) -> Optional[tuple[int, int]]:
    """(partition dim, stride) of a tensor split over TP ranks; None when replicated.

    Mirrors the ``partition_dim``/``partition_stride`` attributes of megafast.parallel.layers.
    """
    if name in VOCAB_TENSORS or name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0, 1
    if any(part in name for part in (".mlp.router.", ".mlp.experts.", ".mlp.shared_experts.")):
        return None  # MoE: replicated over TP (expert tensor parallelism 1)
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return 0, 2 if config.activation == "swiglu" else 1
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None


def is_expert(name: str) -> bool:
    """Whether ``name`` is a routed-expert stack [E, ...], split along dim 0 over the expert-parallel
    ranks (rank e holds experts e E / EP ... (e+1) E / EP - 1); every other tensor is whole on each."""
    return ".mlp.experts." in name


def expert_slice(full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """EP rank ``ep_rank``'s experts of a full expert stack (dim 0)."""
    local = full.shape[0] // ep_size
    return full[ep_rank * local : (ep_rank + 1) * local]


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    """ValueError naming the tensor when its shape is not the one the config implies."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{where}: tensor {name} has shape {list(tensor.shape)} but the model config implies "
            f"{list(shape)}: the weights do not match config.json/args (wrong or edited file?)"
        )


def full_groups(
    config: GPTConfig, full: Callable[[str], torch.Tensor], where: str
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(label, {name: full tensor}) of every group of ``config`` in order, each tensor from
    ``full(name)`` and checked against the shape the config implies (what every reader yields)."""
    for label, specs in groups(config):
        tensors = {}
        for name, shape in specs.items():
            tensors[name] = full(name)
            check_shape(name, tensors[name], shape, where)
        yield label, tensors


def pad_vocab(full: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """[V, h] -> [Vp, h] with zero rows appended (megafast's padding, excluded from the softmax)."""
    if full.shape[0] == padded_rows:
        return full
    return torch.cat([full, full.new_zeros(padded_rows - full.shape[0], *full.shape[1:])])


def shard_full(name: str, full: torch.Tensor, config: GPTConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full tensor (the vocabulary padded first)."""
    if name in VOCAB_TENSORS:
        full = pad_vocab(full, config.padded_vocab_size(tp_size))
    split = tp_partition(name, config)
    if split is None or tp_size == 1:
        return full
    dim, stride = split
    return shard(full, dim, tp_rank, tp_size, stride).contiguous()


def unshard_parts(name: str, parts: list[torch.Tensor], config: GPTConfig) -> torch.Tensor:
    """The full (vocabulary-unpadded) tensor from every TP rank's part, in rank order."""
    split = tp_partition(name, config)
    full = parts[0] if split is None or len(parts) == 1 else unshard(parts, split[0], split[1])
    return full[: config.vocab_size] if name in VOCAB_TENSORS else full


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Separate q [H d, ...], k and v [G d, ...] -> megafast's per-group fused [(H + 2G) d, ...]."""
    G, d = config.num_query_groups, config.head_dim
    per_group = config.num_attention_heads // G
    rest = q.shape[1:]
    fused = torch.cat(
        [q.reshape(G, per_group * d, *rest), k.reshape(G, d, *rest), v.reshape(G, d, *rest)], dim=1
    )  # [G, (H/G + 2) d, ...]
    return fused.reshape(config.qkv_size, *rest)


def split_qkv(qkv: torch.Tensor, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: [(H + 2G) d, ...] -> q [H d, ...], k [G d, ...], v [G d, ...]."""
    G, d = config.num_query_groups, config.head_dim
    per_group = config.num_attention_heads // G
    rest = qkv.shape[1:]
    grouped = qkv.reshape(G, (per_group + 2) * d, *rest)  # [G, (H/G + 2) d, ...]
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (
        q.reshape(config.num_attention_heads * d, *rest).contiguous(),
        k.reshape(G * d, *rest).contiguous(),
        v.reshape(G * d, *rest).contiguous(),
    )


def stage_of(name: str, layer_ranges: list[tuple[int, int]]) -> int:
    """Pipeline stage holding ``name``: the embedding on the first, the final norm/output on the last."""
    if name.startswith("embedding."):
        return 0
    if name.startswith("decoder.layers."):
        i = int(name.split(".")[2])
        return next(s for s, (start, end) in enumerate(layer_ranges) if start <= i < end)
    return len(layer_ranges) - 1
