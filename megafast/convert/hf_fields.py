"""Which HF config.json fields a family's converter understands (an explicit allow-list).

A field the converter does not know could change the model (a new attention variant, a scaling,
a quantisation), so importing it silently would give a different model. Every field of
config.json must therefore be either

- generic: read by transformers' ``PretrainedConfig`` for every model and without effect on the
  forward pass (names, dtype, token ids, output switches, generation defaults of old configs), or
- one the family's ``config_from_hf`` reads and maps (or checks and refuses with its value).

Anything else is a one-line ValueError naming the field.
"""

from __future__ import annotations

from typing import Any, Iterable

GENERIC_FIELDS = frozenset(
    {
        # identity, format, dtype
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "auto_map", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
        "attn_implementation", "_experts_implementation", "use_bfloat16", "torchscript",
        # special tokens
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "tokenizer_class",
        # output switches and task heads (the causal LM head is what is converted)
        "use_cache", "return_dict", "output_hidden_states", "output_attentions", "output_scores",
        "return_dict_in_generate", "id2label", "label2id", "num_labels", "problem_type",
        "finetuning_task", "prefix", "task_specific_params", "pruned_heads", "chunk_size_feed_forward",
        "tf_legacy_loss", "is_decoder", "is_encoder_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "tie_encoder_decoder",
        # generation defaults that old transformers wrote into config.json
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    }
)


def check_known_fields(hf: dict[str, Any], known: Iterable[str], architecture: str, where: str) -> None:
    """ValueError naming the first config.json field that is neither generic nor in ``known``."""
    allowed = GENERIC_FIELDS | frozenset(known)
    unknown = sorted(key for key in hf if key not in allowed)
    if unknown:
        raise ValueError(
            f"{where}: config.json field {unknown[0]!r} (= {hf[unknown[0]]!r}) is not one megafast's "
            f"{architecture} converter knows: it may change the model, so nothing is converted"
            + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
        )


__all__ = ["GENERIC_FIELDS", "check_known_fields"]
