"""Tokenizer files that travel with a converted checkpoint.

HF -> megafast copies the model directory's tokenizer files into ``{checkpoint}/tokenizer`` and
names them in the checkpoint args (``HuggingFaceTokenizer``), so ``tools/generate.py --prompt``
works on the result. megafast -> HF writes files ``transformers.AutoTokenizer`` loads offline:

| megafast tokenizer        | written                                                           |
|---------------------------|-------------------------------------------------------------------|
| HuggingFaceTokenizer dir  | its tokenizer files, copied                                       |
| HuggingFaceTokenizer json | tokenizer.json + tokenizer_config.json                            |
| SentencePieceTokenizer    | tokenizer.json built from the .model (below), the .model itself as |
|                           | tokenizer.model, tokenizer_config.json, special_tokens_map.json   |
| GPT2BPETokenizer          | vocab.json + merges.txt + tokenizer_config.json (GPT2Tokenizer)   |

A SentencePiece model becomes a ``tokenizers`` pipeline with the same behaviour: its
precompiled normalisation rules, SentencePiece's whitespace clean-up (strip, collapse runs of
spaces) when ``remove_extra_whitespaces``, the ``▁`` meta-space with a dummy prefix, then the
model itself (BPE with merges recovered from the piece scores, or Unigram with the scores) and
its control/user pieces as special tokens. On text without special-token strings it encodes
exactly as ``sentencepiece`` does (checked in the tests on Python sources).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

from megafast.atomic_file import atomic_write
from megafast.convert.hf_io import write_json

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def copy_hf_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files ``src_dir`` has into ``dst_dir``; returns their names."""
    names = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    if names:
        os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        copy_file(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return names


def sentencepiece_to_tokenizers(model_file: str):
    """(``tokenizers.Tokenizer``, special pieces {"bos", "eos", "unk", "pad"}) of a SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [
        (p.piece, p.score, p.type) for p in proto.pieces
    ]  # type 1 normal, 2 unk, 3 control, 4 user, 6 byte
    if trainer.model_type == 2:  # BPE: a merge for every split of a piece into two pieces, by piece rank
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        merges = []
        for rank, (piece, _, kind) in enumerate(pieces):
            if kind != 1:
                continue
            splits = [
                (piece[:k], piece[k:])
                for k in range(1, len(piece))
                if piece[:k] in vocab and piece[k:] in vocab
            ]
            merges += [(a, b, rank) for a, b in sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
        merges.sort(key=lambda m: m[2])
        model = BPE(
            vocab,
            [(a, b) for a, b, _ in merges],
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    elif trainer.model_type == 1:
        model = Unigram([(piece, score) for piece, score, _ in pieces], trainer.unk_id, trainer.byte_fallback)
    else:
        raise ValueError(
            f"{model_file}: SentencePiece model type {trainer.model_type} (not BPE or unigram) "
            "cannot be exported"
        )
    tokenizer = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if norm.add_dummy_prefix else "never"
    split = trainer.split_by_whitespace
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    if trainer.split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [tokenizer.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True)]
        )
    unk_surface = trainer.unk_surface.replace(" ", "▁")  # SentencePiece decodes <unk> as " ⁇ "
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(trainer.unk_piece, unk_surface),
            decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(piece, special=True, normalized=False) for piece, _, kind in pieces if kind in (2, 3)]
    )
    user = [AddedToken(piece, special=False, normalized=False) for piece, _, kind in pieces if kind == 4]
    if user:
        tokenizer.add_tokens(user)
    special = {}
    for role, index in (
        ("bos", trainer.bos_id),
        ("eos", trainer.eos_id),
        ("unk", trainer.unk_id),
        ("pad", trainer.pad_id),
    ):
        if 0 <= index < len(pieces):
            special[role] = (pieces[index][0], index)
    return tokenizer, special


def _write_token_config(
    dst_dir: str, tokenizer_class: str, special: dict[str, tuple[str, int]], max_length: int
) -> None:
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    config.update({f"{role}_token": piece for role, (piece, _) in special.items()})
    write_json(os.path.join(dst_dir, "tokenizer_config.json"), config)
    write_json(
        os.path.join(dst_dir, "special_tokens_map.json"),
        {f"{role}_token": piece for role, (piece, _) in special.items()},
    )


def export_tokenizer(
    tokenizer_type: Optional[str],
    tokenizer_model: Optional[str],
    vocab_file: Optional[str],
    merge_file: Optional[str],
    dst_dir: str,
    max_length: int,
) -> dict[str, int]:
    """Write the tokenizer for transformers into ``dst_dir``; returns the known
    {"bos_token_id", "eos_token_id"}."""
    if tokenizer_type in (None, "NullTokenizer"):
        return {}
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not tokenizer_model or not os.path.isfile(tokenizer_model):
            raise ValueError(f"SentencePiece model {tokenizer_model} not found: pass --tokenizer-model")
        tokenizer, special = sentencepiece_to_tokenizers(tokenizer_model)
        text = tokenizer.to_str(pretty=True)
        atomic_write(os.path.join(dst_dir, "tokenizer.json"), lambda f: f.write(text.encode()))
        copy_file(tokenizer_model, os.path.join(dst_dir, "tokenizer.model"))
        _write_token_config(dst_dir, "PreTrainedTokenizerFast", special, max_length)
        return {f"{role}_token_id": index for role, (_, index) in special.items() if role in ("bos", "eos")}
    if tokenizer_type == "GPT2BPETokenizer":
        for path, flag in ((vocab_file, "--vocab-file"), (merge_file, "--merge-file")):
            if not path or not os.path.isfile(path):
                raise ValueError(f"GPT-2 tokenizer file {path} not found: pass {flag}")
        copy_file(vocab_file, os.path.join(dst_dir, "vocab.json"))
        copy_file(merge_file, os.path.join(dst_dir, "merges.txt"))
        from megafast.data.tokenizer import GPT2BPETokenizer

        eod = GPT2BPETokenizer(vocab_file, merge_file).eod
        special = {role: ("<|endoftext|>", eod) for role in ("bos", "eos", "unk")}
        _write_token_config(dst_dir, "GPT2Tokenizer", special, max_length)
        return {"bos_token_id": eod, "eos_token_id": eod}
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model and os.path.isdir(tokenizer_model):
            if not copy_hf_tokenizer_files(tokenizer_model, dst_dir):
                raise ValueError(f"{tokenizer_model} holds no tokenizer files to export")
            return {}
        if tokenizer_model and os.path.isfile(tokenizer_model):
            from megafast.data.tokenizer import HuggingFaceTokenizer

            copy_file(tokenizer_model, os.path.join(dst_dir, "tokenizer.json"))
            tok = HuggingFaceTokenizer(tokenizer_model)
            try:
                eod = tok.eod
            except ValueError:
                _write_token_config(dst_dir, "PreTrainedTokenizerFast", {}, max_length)
                return {}
            from tokenizers import Tokenizer

            piece = Tokenizer.from_file(tokenizer_model).id_to_token(eod)
            _write_token_config(dst_dir, "PreTrainedTokenizerFast", {"eos": (piece, eod)}, max_length)
            return {"eos_token_id": eod}
        raise ValueError(f"HuggingFace tokenizer {tokenizer_model} not found: pass --tokenizer-model")
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r} in the checkpoint args: pass --tokenizer-type"
    )
