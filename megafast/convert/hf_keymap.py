"""Explicit HF <-> megafast key maps: one :class:`Rule` per megafast tensor, applied both ways.

A family module (hf_llama, hf_gpt2) lists, per group (embedding, layer i, final), the rules
naming each megafast tensor, the HF tensor(s) it is made of, and how:

| kind            | HF tensors                        | megafast full tensor                       |
|-----------------|-----------------------------------|--------------------------------------------|
| ``copy``        | one, same shape                   | the same tensor                            |
| ``transpose``   | one Conv1D weight [in, out]       | its transpose [out, in] (torch's Linear)   |
| ``qkv``         | q [H d, ...], k, v [G d, ...]     | fused per query group (layout.fuse_qkv)    |
| ``qkv_concat``  | one [q; k; v] bias [3 H d]        | fused per query group                      |
| ``qkv_conv1d``  | one Conv1D weight [h, 3 H d]      | transposed, then fused per query group     |
| ``gate_up``     | gate [f, ...], up [f, ...]        | [gate; up] (SwiGLU's fc1)                  |
| ``experts``     | one [a, b] per expert (E of them) | stacked [E, a, b]                          |
| ``experts_gate_up`` | gate_0, up_0, gate_1, ... [f, h] | stacked [gate_e; up_e]: [E, 2f, h]       |

Every HF tensor read is checked against the shape the config implies (ValueError naming it);
every transform is exact (reshapes, transposes and concatenations only), so HF -> megafast -> HF
reproduces each tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from megafast.checkpoint import layout
from megafast.config import GPTConfig

Kind = Literal["copy", "transpose", "qkv", "qkv_concat", "qkv_conv1d", "gate_up", "experts", "experts_gate_up"]


@dataclass(frozen=True)
class Rule:
    megafast: str
    hf: tuple[str, ...]
    kind: Kind = "copy"


def hf_shapes(rule: Rule, full_shape: tuple[int, ...], config: GPTConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` given the megafast full shape."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_query_groups * config.head_dim
    rest = tuple(full_shape[1:])
    if rule.kind == "copy":
        return [tuple(full_shape)]
    if rule.kind == "transpose":
        return [tuple(reversed(full_shape))]
    if rule.kind == "qkv":
        return [(q_rows, *rest), (kv_rows, *rest), (kv_rows, *rest)]
    if rule.kind == "qkv_concat":
        return [(q_rows + 2 * kv_rows,)]
    if rule.kind == "qkv_conv1d":
        return [(full_shape[1], q_rows + 2 * kv_rows)]
    if rule.kind == "gate_up":
        half = full_shape[0] // 2
        return [(half, *rest), (half, *rest)]
    if rule.kind == "experts":
        return [tuple(full_shape[1:])] * full_shape[0]
    if rule.kind == "experts_gate_up":
        return [(full_shape[1] // 2, *full_shape[2:])] * (2 * full_shape[0])
    raise AssertionError(f"unknown rule kind {rule.kind}")


def to_megafast(rule: Rule, tensors: list[torch.Tensor], config: GPTConfig) -> torch.Tensor:
    """The megafast full tensor from the rule's HF tensors (shapes already checked)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "transpose":
        return tensors[0].t().contiguous()
    if rule.kind == "qkv":
        return layout.fuse_qkv(*tensors, config)
    if rule.kind in ("qkv_concat", "qkv_conv1d"):
        packed = tensors[0].t() if rule.kind == "qkv_conv1d" else tensors[0]  # [q; k; v] rows
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_query_groups * config.head_dim
        q, k, v = packed.split([q_rows, kv_rows, kv_rows], dim=0)
        return layout.fuse_qkv(q, k, v, config).contiguous()
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    if rule.kind == "experts":
        return torch.stack(tensors, dim=0)
    if rule.kind == "experts_gate_up":  # (gate_0, up_0, gate_1, up_1, ...)
        return torch.stack([torch.cat(tensors[i : i + 2], dim=0) for i in range(0, len(tensors), 2)], dim=0)
    raise AssertionError(f"unknown rule kind {rule.kind}")


def to_hf(rule: Rule, full: torch.Tensor, config: GPTConfig) -> list[torch.Tensor]:
    """The rule's HF tensors from the megafast full tensor (inverse of :func:`to_megafast`)."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "transpose":
        return [full.t().contiguous()]
    if rule.kind == "qkv":
        return list(layout.split_qkv(full, config))
    if rule.kind in ("qkv_concat", "qkv_conv1d"):
        packed = torch.cat(layout.split_qkv(full, config), dim=0)  # [q; k; v] rows
        return [packed.t().contiguous() if rule.kind == "qkv_conv1d" else packed]
    if rule.kind == "gate_up":
        return [t.contiguous() for t in full.chunk(2, dim=0)]
    if rule.kind == "experts":
        return [t.contiguous() for t in full.unbind(0)]
    if rule.kind == "experts_gate_up":
        return [half.contiguous() for expert in full.unbind(0) for half in expert.chunk(2, dim=0)]
    raise AssertionError(f"unknown rule kind {rule.kind}")


def import_group(
    rules: list[Rule], specs: layout.Specs, get: Callable[[str], torch.Tensor], config: GPTConfig, where: str
) -> dict[str, torch.Tensor]:
    """megafast full tensors of one group, read through ``get(hf_name)`` with shape checks."""
    out = {}
    for rule in rules:
        shapes = hf_shapes(rule, specs[rule.megafast], config)
        tensors = []
        for name, shape in zip(rule.hf, shapes):
            tensor = get(name)
            layout.check_shape(name, tensor, shape, where)
            tensors.append(tensor)
        out[rule.megafast] = to_megafast(rule, tensors, config)
    return out


def export_group(
    rules: list[Rule], full: dict[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """HF tensors of one group from its megafast full tensors."""
    out = {}
    for rule in rules:
        out.update(zip(rule.hf, to_hf(rule, full[rule.megafast], config)))
    return out


def hf_specs(
    rule_groups: list[tuple[str, list[Rule]]], config: GPTConfig
) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name and shape, in the order the groups produce them."""
    specs = dict(pair for _, group_specs in layout.groups(config) for pair in group_specs.items())
    out = []
    for _, rules in rule_groups:
        for rule in rules:
            out.extend(zip(rule.hf, hf_shapes(rule, specs[rule.megafast], config)))
    return out
