"""A Hugging Face model directory as a run's starting weights, converted in memory.

``pretrain_gpt.py --pretrained-checkpoint HF_DIR`` (jllm's way of starting from HF weights):

1. :func:`is_hf_model_dir` tells an HF directory (``config.json``, no megafast commit file) from a
   megafast checkpoint.
2. :func:`open_hf_pretrained` reads ``config.json``, the weight index and the weights' dtype, builds the
   model's GPTConfig with the converter's own family code (megafast.convert.hf_llama / hf_gpt2 /
   hf_moe) and compares it with the run's GPTConfig (:func:`check_run_config`): every field that
   shapes or computes the model must agree (a one-line ValueError naming the field, the flag and
   this model's flags otherwise); RoPE base and scaling and the window may differ on purpose
   (context extension) and are reported as notes; dropout and init are the run's own. This runs
   before the model is built.
3. :func:`load_hf_into_chunks` streams the converter's groups (one layer at a time, as
   ``convert.py --loader hf`` does; a pipeline stage reads only its own layers), shards each full
   tensor for this rank exactly as the converter's megafast writer does (``layout.shard_full``,
   vocabulary padded to the run's multiple) and copies it into the rank's parameters. LoRA
   adapters keep their initial values (the frozen base is what is loaded); QLoRA quantizes
   afterwards, as after any load.

So the weights equal, bit for bit, those of ``convert.py --loader hf --saver megafast`` at the
run's TP/PP followed by ``--pretrained-checkpoint`` of that checkpoint: the same exact transforms,
the same dtype casts (HF dtype kept by the converter, cast to the parameter dtype by the copy).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from megafast.checkpoint import layout
from megafast.checkpoint.paths import TRACKER_FILE
from megafast.config import GPTConfig
from megafast.convert import hf_keymap
from megafast.convert.converter import HFSource, model_flags
from megafast.convert.hf_io import CONFIG_FILE
from megafast.model.lora import is_adapter_name

# GPTConfig fields that shape or compute the model, with the flag that sets each.
STRUCTURE = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("num_query_groups", "--num-query-groups (with --group-query-attention)"),
    ("kv_channels", "--kv-channels"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("position_embedding_type", "--position-embedding-type"),
    ("normalization", "--normalization"),
    ("norm_epsilon", "--norm-epsilon"),
    ("activation", "--swiglu / --openai-gelu"),
    ("add_bias_linear", "--disable-bias-linear"),
    ("add_qkv_bias", "--add-qkv-bias"),
    ("tie_embeddings", "--untie-embeddings-and-output-weights"),
    ("qk_layernorm", "--qk-layernorm"),
    ("num_experts", "--num-experts"),
    ("moe_router_topk", "--moe-router-topk"),
    ("moe_ffn_hidden_size", "--moe-ffn-hidden-size"),
    ("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
    ("moe_shared_expert_gate", "--moe-shared-expert-gate"),
    ("moe_router_score_function", "--moe-router-score-function"),
    ("moe_router_pre_softmax", "--moe-router-pre-softmax"),
    ("moe_layer_freq", "--moe-layer-freq"),
)
# Fields a fine-tuning run may change on purpose: reported, not refused.
ADJUSTABLE = ("rotary_base", "use_rope_scaling", "rope_scaling_type", "rope_scaling_factor", "window_size")


def is_hf_model_dir(path: str) -> bool:
    """Whether ``path`` is a Hugging Face model directory (config.json, no megafast commit file)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and not os.path.isfile(os.path.join(path, TRACKER_FILE))


def check_run_config(hf: GPTConfig, run: GPTConfig, where: str) -> list[str]:
    """ValueError (one line) when the run's model cannot hold the HF weights; else notes on the
    fields it changes on purpose (RoPE base/scaling, window)."""
    fix = f"pass this model's flags: {' '.join(model_flags(hf))} --vocab-size {hf.vocab_size}"
    fields = list(STRUCTURE)
    if hf.position_embedding_type == "learned_absolute":  # a weight of max_position_embeddings rows
        fields.append(("max_position_embeddings", "--max-position-embeddings"))
    for name, flag in fields:
        want, got = getattr(hf, name), getattr(run, name)
        if want != got:
            raise ValueError(f"{where}: config.json gives {name}={want!r} but this run has {got!r} ({flag}); {fix}")
    if run.vocab_size > hf.vocab_size:
        raise ValueError(
            f"{where}: the run's vocabulary has {run.vocab_size} tokens (tokenizer / --vocab-size) but the model's "
            f"embedding has {hf.vocab_size} rows: the vocabulary does not fit; use the model's tokenizer"
        )
    if run.vocab_size < hf.vocab_size:
        raise ValueError(
            f"{where}: config.json has vocab_size {hf.vocab_size} but the run's vocabulary has {run.vocab_size} "
            f"tokens: pass --vocab-size {hf.vocab_size} (the embedding keeps all its rows)"
        )
    notes = []
    for name in ADJUSTABLE:
        want, got = getattr(hf, name), getattr(run, name)
        if want != got:
            notes.append(f"config.json gives {name}={want!r}; fine-tuning with this run's {got!r}")
    return notes


def open_hf_pretrained(directory: str, run: GPTConfig) -> tuple[HFSource, list[str]]:
    """The HF model as a converter source, checked against the run's config (config.json, the
    weight index and the embedding's dtype are read, no other tensor). Returns (source, notes)."""
    where = f"--pretrained-checkpoint {directory}"
    try:
        source = HFSource(directory, run.make_vocab_size_divisible_by)
    except ValueError as e:
        raise ValueError(f"--pretrained-checkpoint: {e}") from None
    return source, check_run_config(source.config, run, where)


@torch.no_grad()
def load_hf_into_chunks(
    source: HFSource, chunks: Sequence[nn.Module], run: GPTConfig, tp_rank: int, tp_size: int
) -> int:
    """Copy this rank's shards of the HF weights into ``chunks`` (built for ``run`` at any TP/PP).

    Every state-dict entry of the chunks but the LoRA adapters must be filled (a tied output
    layer on the last pipeline stage from the embedding). Returns the number of tensors copied.
    """
    targets: dict[str, list[torch.Tensor]] = {}
    for chunk in chunks:
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            if not is_adapter_name(name):
                targets.setdefault(name, []).append(tensor)
    tied_output = run.tie_embeddings and layout.OUTPUT_LAYER in targets
    filled = set()
    specs = dict(layout.groups(source.config))
    for label, rules in source.rules:  # only the groups this rank holds are read (pipeline stages)
        rules = [r for r in rules if r.megafast in targets or (tied_output and r.megafast == layout.WORD_EMBEDDINGS)]
        if not rules:
            continue
        tensors = hf_keymap.import_group(rules, specs[label], source.checkpoint.get, source.config, source.directory)
        for name, full in tensors.items():
            full = full.to(source.dtype)  # as the converter's writer stores it (mixed-dtype files too)
            names = [name] + ([layout.OUTPUT_LAYER] if tied_output and name == layout.WORD_EMBEDDINGS else [])
            for target in names:
                if target not in targets:
                    continue  # another pipeline stage's tensor
                part = layout.shard_full(target, full, run, tp_rank, tp_size)
                for tensor in targets[target]:
                    if part.shape != tensor.shape:
                        raise ValueError(
                            f"{source.directory}: tensor {target} gives a shard of shape {list(part.shape)} but "
                            f"the model expects {list(tensor.shape)}: config.json does not describe its weights"
                        )
                    tensor.detach().copy_(part)
                filled.add(target)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(
            f"{source.directory}: the model has {missing[0]} ({len(missing)} such) but the HF weights give none"
        )
    return len(filled)


__all__ = ["check_run_config", "is_hf_model_dir", "load_hf_into_chunks", "open_hf_pretrained"]
