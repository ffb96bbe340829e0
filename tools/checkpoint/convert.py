"""Convert checkpoints between Hugging Face, megafast and Megatron-LM, or re-shard them (Megatron's flags).

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megafast \
        --load-dir HF_DIR --save-dir CKPT --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader megafast --saver hf \
        --load-dir CKPT --save-dir HF_OUT
    python tools/checkpoint/convert.py --model-type GPT --loader megafast --saver megafast \
        --load-dir CKPT --save-dir CKPT_TP1 --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python tools/checkpoint/convert.py --model-type GPT --loader megafast --saver hf --merge-lora \
        --load-dir LORA_CKPT --save-dir HF_OUT        # a LoRA run: adapters merged into its base first
    python tools/checkpoint/convert.py --model-type GPT --loader megafast --saver hf --lora-format peft \
        --load-dir LORA_CKPT --save-dir ADAPTER      # PEFT adapter files + the unmerged base in ADAPTER/base
    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megafast \
        --load-dir MIXTRAL_HF --save-dir CKPT_EP2 --target-tensor-parallel-size 2 \
        --target-pipeline-parallel-size 2 --target-expert-parallel-size 2   # MoE: each EP rank's experts apart

    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver hf \
        --load-dir MEGATRON_CKPT --save-dir HF_OUT     # Megatron-LM's legacy torch or torch_dist format
    python tools/checkpoint/convert.py --model-type GPT --loader megafast --saver megatron \
        --load-dir CKPT --save-dir MEGATRON_OUT --target-tensor-parallel-size 2   # Megatron-LM's legacy format

Megatron-LM's and Fast-LLM's spellings are accepted: ``--loader llama_mistral`` / ``llama2_hf`` (a
Hugging Face Llama/Mistral directory: ``hf``), ``--loader mcore`` / ``legacy`` (``megatron``: either
format is detected), ``--saver mcore`` / ``legacy`` (``megatron``: the legacy torch format).

HF models: LlamaForCausalLM (Llama 2/3, GQA), MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel,
from model.safetensors (single or sharded with its index) or pytorch_model.bin. A megafast
checkpoint written from HF is a ``release`` checkpoint: start training from it with
``pretrain_gpt.py --load DIR --finetune`` and the same model flags (see its ``args``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megafast.convert.converter import ConvertOptions, convert_checkpoint, finetune_flags  # noqa: E402
from megafast.convert.hf_export import export_hf_checkpoint  # noqa: E402


LOADER_ALIASES = {"llama_mistral": "hf", "llama2_hf": "hf", "mcore": "megatron", "legacy": "megatron"}
SAVER_ALIASES = {"mcore": "megatron", "legacy": "megatron"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model-type", required=True, choices=["GPT"], help="the model family (GPT: decoder-only)")
    p.add_argument("--loader", required=True, choices=["hf", "megafast", "megatron", *LOADER_ALIASES],
                   help="format of --load-dir (aliases: llama_mistral, llama2_hf = hf; mcore, legacy = megatron)")
    p.add_argument("--saver", required=True, choices=["hf", "megafast", "megatron", *SAVER_ALIASES],
                   help="format to write to --save-dir (aliases: mcore, legacy = megatron, Megatron-LM's legacy format)")
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="megafast/megatron saver: TP size (default: the source's, 1 from HF)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="megafast/megatron saver: PP size (default: the source's, 1 from HF)")
    p.add_argument("--target-expert-parallel-size", type=int, default=None,
                   help="megafast saver (MoE): EP size, each EP rank's experts in its own mp_rank_TT_PPP_EEE "
                        "directory (default: the source's, 1 from HF)")
    p.add_argument("--target-params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="megafast saver: pad the vocabulary to a multiple of this x TP (default: source's, 128)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="megafast/megatron loader: the unpadded vocabulary, when the checkpoint's tokenizer is "
                        "unavailable (a Megatron checkpoint otherwise keeps its padding rows)")
    p.add_argument("--max-shard-size", default="5GB", help="hf saver: largest safetensors shard (default 5GB)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"],
                   help="hf saver: tokenizer to export (default: the one in the checkpoint args)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --save-dir")
    p.add_argument("--merge-lora", action="store_true",
                   help="megafast loader: --load-dir is a LoRA run's checkpoint (adapters only); merge the "
                        "adapters into its base model first (megafast.convert.lora_merge)")
    p.add_argument("--lora-base-dir", default=None,
                   help="with --merge-lora / --lora-format: the base (a megafast checkpoint or an HF model directory; "
                        "default: the run's --pretrained-checkpoint)")
    p.add_argument("--lora-format", choices=["merged", "peft"], default=None,
                   help="--saver hf of a LoRA run's checkpoint: merged (the default, as --merge-lora) writes "
                        "the merged model; peft writes PEFT's adapter_config.json + adapter_model.safetensors "
                        "and the unmerged base model in SAVE_DIR/base (megafast.convert.peft_export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Megatron-LM's converter flags, so its command lines run unchanged
    p.add_argument("--megatron-path", default=None,
                   help="Megatron-LM's checkout, as its converter takes it: checked to hold megatron/ (megafast "
                        "reads and writes Megatron checkpoints without importing it)")
    p.add_argument("--model-size", default=None,
                   help="Megatron's llama_mistral size name (llama2-7B, llama3-8B, mistral-7B, ...): the HF "
                        "model's parameter count must round to it (within 25%%)")
    p.add_argument("--checkpoint-type", choices=["hf", "meta"], default=None,
                   help="llama_mistral loader: hf (Meta's original consolidated.*.pth files are not read)")
    p.add_argument("--bf16", action="store_true", help="same as --target-params-dtype bf16")
    p.add_argument("--fp16", action="store_true", help="same as --target-params-dtype fp16")
    p.add_argument("--loader-transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="megatron loader: the implementation the checkpoint was saved with (checked against its args)")
    p.add_argument("--saver-transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="megatron saver: local (the only one written)")
    return p


def _megatron_flags(a: argparse.Namespace) -> None:
    """Megatron-LM's converter flags onto ours (one-line errors for what we do not do)."""
    if a.checkpoint_type == "meta":
        raise SystemExit("error: --checkpoint-type meta (Meta's consolidated.*.pth) is not supported: "
                         "convert the Hugging Face release (--checkpoint-type hf)")
    if a.saver_transformer_impl == "transformer_engine":
        raise SystemExit("error: --saver-transformer-impl transformer_engine is not written: the megatron saver "
                         "writes --transformer-impl local names (Megatron's TE models load torch_dist, convert from it)")
    if a.bf16 and a.fp16:
        raise SystemExit("error: --bf16 and --fp16 both given: choose one")
    if a.megatron_path is not None and not os.path.isdir(os.path.join(a.megatron_path, "megatron")):
        raise SystemExit(f"error: --megatron-path {a.megatron_path} holds no megatron/ package: give Megatron-LM's "
                         "checkout, or drop the flag (megafast does not need it)")
    dtype = "bf16" if a.bf16 else ("fp16" if a.fp16 else None)
    if dtype and a.target_params_dtype not in (None, dtype):
        raise SystemExit(f"error: --{dtype} contradicts --target-params-dtype {a.target_params_dtype}")
    a.target_params_dtype = a.target_params_dtype or dtype


def _check_model_size(model_size: str, loader: str, load_dir: str, divisible_by: Optional[int]) -> None:
    """Megatron's ``--model-size`` (e.g. ``llama3-8B``) against the HF model's parameter count."""
    match = re.search(r"(\d+(?:\.\d+)?)B", model_size)
    if loader != "hf" or match is None:
        raise SystemExit(f"error: --model-size {model_size} names an HF model's size (like llama3-8B) and applies "
                         "to --loader hf/llama_mistral only")
    from megafast.convert.converter import HFSource
    from megafast.planner.parameters import total_parameter_count

    try:
        config = HFSource(load_dir, divisible_by).config
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    billions = total_parameter_count(config, padded=False) / 1e9
    named = float(match.group(1))
    if not 0.75 * named <= billions <= 1.25 * named:
        raise SystemExit(f"error: --model-size {model_size} names a {named:g}B model but {load_dir} holds "
                         f"{billions:.2f}B parameters: give the size of this model, or drop the flag")


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    a.loader = LOADER_ALIASES.get(a.loader, a.loader)
    a.saver = SAVER_ALIASES.get(a.saver, a.saver)
    _megatron_flags(a)
    if a.model_size is not None:
        _check_model_size(a.model_size, a.loader, a.load_dir, a.make_vocab_size_divisible_by)
    opts = ConvertOptions(
        loader=a.loader, saver=a.saver, load_dir=a.load_dir, save_dir=a.save_dir,
        target_tensor_parallel_size=a.target_tensor_parallel_size,
        target_pipeline_parallel_size=a.target_pipeline_parallel_size, target_params_dtype=a.target_params_dtype,
        target_expert_parallel_size=a.target_expert_parallel_size,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, true_vocab_size=a.true_vocab_size,
        max_shard_size=a.max_shard_size, tokenizer_type=a.tokenizer_type, tokenizer_model=a.tokenizer_model,
        vocab_file=a.vocab_file, merge_file=a.merge_file, overwrite=a.overwrite, progress=not a.no_progress,
        source_transformer_impl=a.loader_transformer_impl,
    )
    if a.lora_format is not None and (a.loader, a.saver) != ("megafast", "hf"):
        raise SystemExit("error: --lora-format applies to --loader megafast --saver hf (a LoRA run's checkpoint)")
    if a.merge_lora and a.lora_format == "peft":
        raise SystemExit("error: --merge-lora and --lora-format peft contradict each other: choose one")
    if a.merge_lora and (a.loader, a.saver) != ("megafast", "hf"):
        written = _convert_merged(a, opts)
    else:
        try:
            if (a.loader, a.saver) == ("megafast", "hf"):  # a LoRA checkpoint: merged unless --lora-format peft
                lora_format = a.lora_format or ("merged" if a.merge_lora else None)
                written = export_hf_checkpoint(opts, lora_format, a.lora_base_dir)
            else:
                written = convert_checkpoint(opts)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    print(f"wrote {written}")
    if a.saver == "megafast":
        print(f"train from it with: pretrain_gpt.py {' '.join(finetune_flags(a.save_dir))} ...")


def _convert_merged(a: argparse.Namespace, opts: ConvertOptions) -> str:
    """--merge-lora: merge into a temporary megafast checkpoint next to --save-dir, convert that."""
    import dataclasses
    import shutil
    import tempfile

    from megafast.convert.lora_merge import merge_lora_checkpoint

    if a.loader != "megafast":
        raise SystemExit("error: --merge-lora needs --loader megafast (a LoRA run's checkpoint)")
    parent = os.path.dirname(os.path.abspath(a.save_dir))
    os.makedirs(parent, exist_ok=True)
    merged = tempfile.mkdtemp(prefix=".merged-lora-", dir=parent)
    try:
        merge_lora_checkpoint(a.load_dir, merged, a.lora_base_dir)
        return convert_checkpoint(dataclasses.replace(opts, load_dir=merged))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutil.rmtree(merged, ignore_errors=True)


if __name__ == "__main__":
    main()
