"""Optimizer state across data-parallel layouts: the saved pieces of any DP size and sharding
strategy, re-cut for any other.

A saved optimizer state (megafast.training.optimizer, format ``megafast.optimizer/1``) is one
dict per DP rank for a sharded optimizer (each holding elements ``[lo, hi)`` of some flattened
parameters, per its ``layout``) or a single dict of whole parameters. Since Adam/Lion states are
element-wise, the state of element ``k`` of a parameter does not depend on the layout: this
module assembles every parameter's full flat state from the pieces (:func:`assemble`) and slices
it for a target layout (:func:`reshard`), so a checkpoint saved at one DP size loads at another,
optimizer state included (unlike Megatron's ``dp_reshardable`` format). The torch optimizer's
indices follow its two parameter groups (weight decay, then none), each in layout order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

Entry = tuple[str, tuple[int, ...], int, int]  # (parameter name, parameter shape, lo, hi)


def decays(name: str, shape: Sequence[int]) -> bool:
    """Megatron's weight-decay rule on a name and shape (as megafast.training.optimizer.decays)."""
    return len(shape) > 1 and not name.endswith(".bias")


def torch_indices(layout: Sequence[Entry], decay: Sequence[bool], param_groups: Sequence[dict]) -> list[int]:
    """The torch-optimizer index of each layout entry (groups: decay first, then no decay)."""
    if len(param_groups) != 2:
        raise ValueError(f"expected 2 optimizer parameter groups (decay, no decay), got {len(param_groups)}")
    order = [[i for i, d in enumerate(decay) if d], [i for i, d in enumerate(decay) if not d]]
    out = [0] * len(layout)
    for entries, group in zip(order, param_groups):
        if len(entries) != len(group["params"]):
            raise ValueError("optimizer parameter groups do not match the saved layout: the state is damaged")
        for i, idx in zip(entries, group["params"]):
            out[i] = idx
    return out


@dataclass
class FullState:
    """Every parameter's optimizer state, whole and flat (fp32), assembled from saved pieces."""

    optimizer: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> key -> [numel]
    scalars: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> key -> value (Adam's step)
    masters: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)  # None: the model's fp32 weight
    covered: dict[str, int] = field(default_factory=dict)
    hyper: list[dict] = field(default_factory=list)  # each param group's settings (lr, betas, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # loss scaler, skip counters


def assemble(pieces: Sequence[dict]) -> FullState:
    """Join the pieces (every DP rank's dict of one checkpoint) into whole-parameter state."""
    if not pieces:
        raise ValueError("no optimizer state to reshard")
    first = pieces[0]
    full = FullState(first["optimizer"])
    full.hyper = [{k: v for k, v in g.items() if k != "params"} for g in first["torch_optimizer"]["param_groups"]]
    full.extra = {k: first[k] for k in ("loss_scaler", "skipped_in_a_row", "num_skipped")}
    for sd in pieces:
        if sd["optimizer"] != full.optimizer:
            raise ValueError("optimizer state pieces of different optimizers: the checkpoint is damaged")
        layout = [(n, tuple(s), lo, hi) for n, s, lo, hi in sd["layout"]]
        groups = sd["torch_optimizer"]["param_groups"]
        index = torch_indices(layout, [decays(n, s) for n, s, _, _ in layout], groups)
        state = sd["torch_optimizer"]["state"]
        for (name, shape, lo, hi), idx, master in zip(layout, index, sd["master_params"]):
            numel = 1
            for d in shape:
                numel *= d
            if name not in full.shapes:
                full.shapes[name], full.covered[name] = shape, 0
                full.tensors[name], full.scalars[name] = {}, {}
                full.masters[name] = None if master is None else torch.zeros(numel, dtype=torch.float32)
            full.covered[name] += hi - lo
            if master is not None and full.masters[name] is not None:
                full.masters[name][lo:hi] = master.reshape(-1)
            for key, value in state.get(idx, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.numel() == hi - lo:
                    dst = full.tensors[name].setdefault(key, torch.zeros(numel, dtype=value.dtype))
                    dst[lo:hi] = value.reshape(-1).cpu()
                else:
                    full.scalars[name][key] = value
    for name, shape in full.shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        if full.covered[name] != numel:
            raise ValueError(
                f"the saved optimizer pieces cover {full.covered[name]} of the {numel} elements of {name}: "
                "a distrib_optim file is missing or damaged"
            )
    return full


def reshard(
    full: FullState,
    layout: Sequence[Entry],
    whole: Sequence[bool],
    decay: Sequence[bool],
    param_groups: Sequence[dict],
) -> tuple[dict, list[Optional[torch.Tensor]]]:
    """(torch optimizer state dict, fp32 masters or None) for a target layout.

    ``whole[i]``: entry i is a whole parameter (its state has the parameter's shape, else 1-D);
    ``param_groups``: the target torch optimizer's own ``state_dict()["param_groups"]``.
    """
    index = torch_indices(layout, decay, param_groups)
    state: dict[int, dict[str, Any]] = {}
    masters: list[Optional[torch.Tensor]] = []
    for (name, shape, lo, hi), idx, is_whole in zip(layout, index, whole):
        if full.shapes.get(name) != tuple(shape):
            raise ValueError(
                f"the checkpoint's optimizer state has {name} with shape {full.shapes.get(name)}, this model "
                f"{tuple(shape)}: resume with the same model and --tensor/--pipeline-model-parallel-size"
            )
        view = tuple(shape) if is_whole else (hi - lo,)
        entry = {k: t[lo:hi].clone().view(view) for k, t in full.tensors[name].items()}
        entry.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in full.scalars[name].items()})
        if entry:
            state[idx] = entry
        m = full.masters[name]
        masters.append(None if m is None else m[lo:hi].clone().view(view))
    groups = [{**hyper, "params": list(g["params"])} for hyper, g in zip(full.hyper, param_groups)]
    return {"state": state, "param_groups": groups}, masters


__all__ = ["FullState", "assemble", "decays", "reshard", "torch_indices"]
