"""Checkpoint conversion: Hugging Face Llama/Mistral/Qwen2/GPT-2 <-> megafast, and megafast re-sharding.

Entry point: ``tools/checkpoint/convert.py`` (Megatron's flags) over
:func:`megafast.convert.converter.convert_checkpoint`. Modules: ``layout`` (megafast's full
tensors and TP splits), ``hf_keymap`` + ``hf_llama`` / ``hf_gpt2`` (explicit key maps),
``hf_io`` (HF files), ``hf_tokenizer`` (tokenizer files), ``megafast_checkpoint`` (megafast
files), ``reshard`` (any saved layout into a model of another), ``checkpoint_args`` (args <-> config).
"""
