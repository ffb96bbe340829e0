"""A LoRA run's adapters as a PEFT adapter (``convert.py --saver hf --lora-format peft``).

Written to ``save_dir``::

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules (HF
                                 module names), bias none, task_type CAUSAL_LM, fan_in_fan_out (GPT-2's
                                 Conv1D), base_model_name_or_path = the absolute path of base/
    adapter_model.safetensors    base_model.model.{HF module}.lora_A.weight [r, in] / lora_B.weight [out, r]
    tokenizer files              the run's tokenizer, as the base has them
    base/                        the unmerged base as an HF model (QLoRA: its NF4 round trip, the
                                 weights the adapters were trained on), megafast.convert.lora_merge

so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(save_dir + "/base"), save_dir)``
(or a serving engine that takes PEFT adapters) computes what the merged export computes.

Mapping (s = alpha / r in both; PEFT's update is s * B A, as megafast's):

- one megafast adapter per HF module (``copy``; GPT-2's Conv1D ``transpose``: PEFT keeps A [r, in],
  B [out, r] with fan_in_fan_out): A and B as they are;
- fused QKV (``qkv``: q_proj, k_proj, v_proj): the three share A, and each takes its rows of B.
  This is exact: [B_q; B_k; B_v] A = [B_q A; B_k A; B_v A]. B's rows are in megafast's grouped
  order and are split exactly as the weight is (megafast.checkpoint.layout.split_qkv);
- SwiGLU's fc1 (``gate_up``: gate_proj, up_proj): shared A, B = [B_gate; B_up];
- GPT-2's fused c_attn (``qkv_conv1d``): one adapter, B's rows reordered to [q; k; v].

Adapters are gathered over TP ranks as their base layer is sharded (megafast.model.lora): a
column-parallel layer's A is replicated and B split by rows (with the layer's stride), a
row-parallel layer's A is split by columns and B replicated.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Optional

import torch

from megafast.atomic_file import atomic_write
from megafast.checkpoint import layout
from megafast.checkpoint.commit import committed
from megafast.checkpoint.paths import MODEL_FILE, model_keys, rank_dirs
from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.checkpoint.state_dict import load_file
from megafast.config import GPTConfig, LoRAConfig
from megafast.convert import converter
from megafast.convert.converter import ConvertOptions, convert_checkpoint
from megafast.convert.hf_io import write_json
from megafast.convert.hf_keymap import Rule
from megafast.convert.hf_tokenizer import copy_hf_tokenizer_files
from megafast.model.lora import LINEAR_IN, LINEAR_OUT
from megafast.parallel.layers import unshard

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
PREFIX = "base_model.model."


def _full_adapters(lora_iter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapted layer (megafast name, e.g. ``decoder.layers.0.self_attention.linear_qkv``) -> full (A, B)."""
    files = {rank: load_file(os.path.join(path, MODEL_FILE)) for rank, path in rank_dirs(lora_iter).items()}
    tp = max(t for t, _ in files) + 1
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for (t, _), ckpt in sorted(files.items(), key=lambda kv: kv[0][0]):
        for key in model_keys(ckpt):
            for name, tensor in ckpt[key].items():
                for suffix, which in ((LINEAR_IN, "a"), (LINEAR_OUT, "b")):
                    if name.endswith(suffix):
                        parts.setdefault(name[: -len(suffix) - 1], {"a": [], "b": []})[which].append(tensor)
    out = {}
    for layer, ab in parts.items():
        if len(ab["a"]) != tp or len(ab["b"]) != tp:
            raise ValueError(f"{lora_iter}: adapter {layer} is on {len(ab['a'])} of {tp} TP ranks: "
                             "the checkpoint is incomplete")
        out[layer] = ab["a"], ab["b"]
    return out


def _gather(layer: str, a_parts: list[torch.Tensor], b_parts: list[torch.Tensor], config: GPTConfig):
    """Full (A [r, in], B [out, r]) from each TP rank's (A_i, B_i), split as the base layer is."""
    if len(a_parts) == 1:
        return a_parts[0], b_parts[0]
    split = layout.tp_partition(f"{layer}.weight", config)
    if split is None:
        raise ValueError(f"adapter {layer}: its base layer is not tensor-parallel; megafast cannot have adapted it")
    dim, stride = split
    if dim == 0:  # column-parallel: A replicated, B split by output rows with the layer's stride
        return a_parts[0], unshard(b_parts, 0, stride)
    return unshard(a_parts, 1, 1), b_parts[0]  # row-parallel: A split by input columns, B replicated


def _peft_modules(
    rule: Rule, a: torch.Tensor, b: torch.Tensor, config: GPTConfig
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(HF module, A, B) of the PEFT adapters that compute megafast's s * B A on ``rule``'s weight."""
    modules = [name[: -len(".weight")] for name in rule.hf]
    if rule.kind in ("copy", "transpose"):
        return [(modules[0], a, b)]
    if rule.kind == "qkv":
        return [(m, a, part) for m, part in zip(modules, layout.split_qkv(b, config))]
    if rule.kind == "qkv_conv1d":
        return [(modules[0], a, torch.cat(layout.split_qkv(b, config), dim=0))]
    if rule.kind == "gate_up":
        return [(m, a, part.contiguous()) for m, part in zip(modules, b.chunk(2, dim=0))]
    raise ValueError(f"an adapter on {rule.megafast} (HF {', '.join(rule.hf)}) has no PEFT form")


def _target_modules(adapted: set[str], all_modules: set[str]) -> list[str]:
    """PEFT target names (suffixes of module paths) matching exactly the adapted HF modules: the
    shortest suffix that names no module left without an adapter (GPT-2: attn.c_proj, mlp.c_proj)."""
    targets = set()
    for module in adapted:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            matches = {m for m in all_modules if m == suffix or m.endswith("." + suffix)}
            if matches <= adapted:
                targets.add(suffix)
                break
    return sorted(targets)


def export_peft(opts: ConvertOptions, base_dir: Optional[str] = None) -> str:
    """Write the PEFT adapter of LoRA checkpoint ``opts.load_dir`` and its unmerged base (module
    docstring) into ``opts.save_dir``; returns it."""
    from safetensors.torch import save as safetensors_bytes

    from megafast.convert.lora_merge import merge_lora_checkpoint

    if opts.saver != "hf" or opts.loader != "megafast":
        raise ValueError("--lora-format peft needs --loader megafast --saver hf (a LoRA run's checkpoint)")
    converter._check_target(opts)
    commit = committed(opts.load_dir)
    first = load_file(os.path.join(next(iter(rank_dirs(commit.directory).values())), MODEL_FILE), mmap=True)
    lora = LoRAConfig.from_dict(first["lora"])
    parent = os.path.dirname(os.path.abspath(opts.save_dir))
    os.makedirs(parent, exist_ok=True)
    base_ckpt = tempfile.mkdtemp(prefix=".peft-base-", dir=parent)
    try:
        merge_lora_checkpoint(opts.load_dir, base_ckpt, base_dir, merge=False)
        reader = MegafastCheckpointReader(base_ckpt, opts.true_vocab_size)
        config, metadata = reader.config, dict(reader.args.get(converter.HF_METADATA) or {})
        converter._clear_target(opts.save_dir)
        base_out = os.path.join(opts.save_dir, BASE_DIR)
        convert_checkpoint(dataclasses.replace(opts, load_dir=base_ckpt, save_dir=base_out, overwrite=True))
    finally:
        shutil.rmtree(base_ckpt, ignore_errors=True)

    family = converter.export_family(config, metadata)
    rules = {rule.megafast: rule for _, group in family.rule_groups(config) for rule in group}
    all_modules = {name[: -len(".weight")] for rule in rules.values() for name in rule.hf if name.endswith(".weight")}
    tensors: dict[str, torch.Tensor] = {}
    adapted: set[str] = set()
    conv1d = False
    for layer, (a_parts, b_parts) in sorted(_full_adapters(commit.directory).items()):
        rule = rules.get(f"{layer}.weight")
        if rule is None:
            raise ValueError(f"adapter {layer}: its weight has no Hugging Face name in {family.__name__}")
        a, b = _gather(layer, a_parts, b_parts, config)
        conv1d |= rule.kind in ("transpose", "qkv_conv1d")
        for module, a_m, b_m in _peft_modules(rule, a, b, config):
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a_m.contiguous().clone()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b_m.contiguous().clone()
            adapted.add(module)
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    atomic_write(os.path.join(opts.save_dir, ADAPTER_WEIGHTS), lambda f: f.write(data))
    copy_hf_tokenizer_files(base_out, opts.save_dir)
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(base_out),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _target_modules(adapted, all_modules),
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    write_json(os.path.join(opts.save_dir, ADAPTER_CONFIG), adapter_config)  # last: the adapter is complete
    return opts.save_dir


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_DIR", "export_peft"]
