"""Checkpoint conversion: Hugging Face Llama/Mistral/Qwen2/GPT-2 <-> megafast, and megafast re-sharding.

Entry point: ``tools/checkpoint/convert.py`` (Megatron's flags) over
:func:`megafast.convert.converter.convert_checkpoint`. Modules: ``hf_keymap`` + ``hf_llama`` /
``hf_gpt2`` (explicit key maps), ``hf_io`` (HF files), ``hf_tokenizer`` (tokenizer files),
``megafast_checkpoint`` (the megafast writer at a target layout), ``reshard`` (megafast at
another layout), ``lora_merge`` (adapters merged into their base). The megafast format itself
(full tensors and TP splits, reading, paths, commit, args <-> config) is megafast.checkpoint.
"""
