"""Tokenizers behind one interface, chosen by Megatron's `--tokenizer-type` names.

| type                     | files                           | eod                                  |
|--------------------------|---------------------------------|--------------------------------------|
| `SentencePieceTokenizer` | `--tokenizer-model x.model`     | the model's `eos_id`                 |
| `HuggingFaceTokenizer`   | `--tokenizer-model DIR` or JSON | `eos_token_id` (DIR) / a known EOS   |
| `GPT2BPETokenizer`       | `--vocab-file`, `--merge-file`  | `<|endoftext|>`                      |
| `NullTokenizer`          | `--vocab-size V`                | V - 1 (megatron-core 0.19's)         |

Every tokenizer has `vocab_size`, `eod`, `tokenize(text) -> list[int]`, `detokenize(ids) -> str`
and `tokenize_batch(texts) -> list[list[int]]` (one native batched call where the library has
one). No tokenizer adds special tokens (BOS/EOS) on its own: preprocessing appends the EOD when
asked (`--append-eod`), the same for every type. Text that looks like a special token
(`"<|endoftext|>"` in a GPT-2 corpus) is tokenized as ordinary text, as Megatron's GPT-2 BPE does.
Everything is loaded from local files; nothing is ever downloaded.

`GPTSentencePieceTokenizer` and `Llama2Tokenizer` are accepted as other names for
`SentencePieceTokenizer` (megatron-core 0.19 builds all three with its sentencepiece library, eod =
`eos_id`).

`NullTokenizer` follows megatron-core 0.19 (`megatron.core.tokenizers.text.libraries.NullTokenizer`):
`--vocab-size V` is the whole vocabulary and the end-of-document id is V - 1 (or
`--null-tokenizer-eod-id`). Megatron-LM's older `_NullTokenizer` had V + 1 ids with eod V; a
checkpoint whose args predate the change (no `null_tokenizer_eod_id` entry) is read with that
convention by :func:`megafast.checkpoint.args.tokenizer_from_args`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Sequence

from megafast.extras import require

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer",
                   "NullTokenizer")
_ALIASES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer", "Llama2Tokenizer": "SentencePieceTokenizer"}

# End-of-text tokens tried, in order, for a bare tokenizer.json (which does not say which is EOS).
_KNOWN_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer(ABC):
    """The interface every tokenizer implements (see the module docstring)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (the embedding table needs at least this many rows)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id; ValueError (one line) when the tokenizer has none."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text (no special tokens added)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts; subclasses use the library's batched call."""
        return [self.tokenize(text) for text in texts]

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), if it ships one (HF directories only)."""
        return None

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """A conversation ([{"role", "content"}, ...]) as text in the tokenizer's chat template."""
        raise ValueError(f"{type(self).__name__} has no chat template; use the default role markers")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _require_file(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise ValueError(f"{flag} is required ({what})")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: file not found; pass the path of {what}")
    return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (`.model`); eod = the model's `eos_id`.

    `num_threads` is what `tokenize_batch` gives SentencePiece's batched encoder.
    """

    def __init__(self, model_file: str, num_threads: int = 1) -> None:
        import sentencepiece as spm

        self.model_file = _require_file(model_file, "--tokenizer-model",
                                        "a SentencePiece .model file")
        self.num_threads = num_threads
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(model_file=self.model_file)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"--tokenizer-model {model_file}: not a SentencePiece model "
                             f"({str(exc).strip().splitlines()[-1]}); pass a .model file") from None

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def eod(self) -> int:
        eos = self.processor.eos_id()
        if eos < 0:
            raise ValueError(f"{self.model_file}: the SentencePiece model has no eos piece, so "
                             "there is no EOD; train it with an eos_id or drop --append-eod")
        return eos

    def tokenize(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=self.num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer: a directory (via transformers) or a `tokenizer.json` file.

    A directory is loaded with `AutoTokenizer.from_pretrained(path, local_files_only=True)`;
    `vocab_size` is `len(tokenizer)` (added tokens included, as Megatron counts) and eod is its
    `eos_token_id`. A bare `tokenizer.json` is loaded with the `tokenizers` library; eod is the
    first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`, `<|eot_id|>` it knows.
    """

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("--tokenizer-model is required for HuggingFaceTokenizer (a local "
                             "tokenizer directory or tokenizer.json file)")
        if not os.path.exists(path):
            raise ValueError(f"--tokenizer-model {path}: not found; pass a local tokenizer "
                             "directory or tokenizer.json (nothing is downloaded)")
        self.path = path
        self._fast: Any = None  # tokenizers.Tokenizer, for a bare tokenizer.json
        self._hf: Any = None  # transformers tokenizer, for a directory
        if os.path.isdir(path):
            require("transformers", "data", f"--tokenizer-model {path} (a Hugging Face tokenizer directory)")
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ValueError(f"--tokenizer-model {path}: cannot load a tokenizer from this "
                                 f"directory ({str(exc).splitlines()[0]}); it needs "
                                 "tokenizer.json or the files of a slow tokenizer") from None
            self._eod = self._hf.eos_token_id
            self._vocab_size = len(self._hf)
        else:
            from tokenizers import Tokenizer as FastTokenizer

            try:
                self._fast = FastTokenizer.from_file(path)
            except Exception as exc:  # the Rust library raises a bare Exception
                raise ValueError(f"--tokenizer-model {path}: not a tokenizer.json file "
                                 f"({str(exc).splitlines()[0]})") from None
            self._vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            found = (self._fast.token_to_id(t) for t in _KNOWN_EOS_TOKENS)
            self._eod = next((i for i in found if i is not None), None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"{self.path}: the tokenizer has no end-of-text token (looked for "
                             f"eos_token / {', '.join(_KNOWN_EOS_TOKENS)}); add one or drop "
                             "--append-eod")
        return int(self._eod)

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._hf.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._hf, "chat_template", None) if self._hf is not None else None
        return template if isinstance(template, str) and template else None

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self.chat_template is None:
            raise ValueError(f"--tokenizer-model {self.path}: the tokenizer has no chat_template; use the "
                             "default role markers or --role-markers")
        return self._hf.apply_chat_template(list(messages), tokenize=False,
                                            add_generation_prompt=add_generation_prompt)


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt` (the `tokenizers` library).

    Pre-tokenization is GPT-2's regex (ByteLevel, no prefix space), the model is plain BPE over
    the merges; `vocab_size` is the size of vocab.json and eod is `<|endoftext|>`.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        _require_file(vocab_file, "--vocab-file", "GPT-2's vocab.json")
        _require_file(merge_file, "--merge-file", "GPT-2's merges.txt")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # the Rust library raises a bare Exception
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot "
                             f"read a GPT-2 BPE ({str(exc).splitlines()[0]})") from None
        self._tok = FastTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_file = vocab_file
        self._eod = self._tok.token_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"{self.vocab_file}: no <|endoftext|> token in the vocabulary, so "
                             "there is no EOD; use GPT-2's vocab.json or drop --append-eod")
        return int(self._eod)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Text that already is token ids: `"12 7 31"` -> `[12, 7, 31]` (megatron-core 0.19's NullTokenizer).

    Built with `vocab_size=V`: ids are 0..V-1, `vocab_size` is V and eod is `eod_id`, by default
    V - 1, exactly as `megatron.core.tokenizers.text.libraries.NullTokenizer`.
    """

    def __init__(self, vocab_size: int, eod_id: int | None = None) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError(f"--vocab-size must be an integer >= 2 for NullTokenizer (ids 0..V-2 and the "
                             f"EOD V-1), got {vocab_size}")
        self._vocab_size = int(vocab_size)
        self._eod = self._vocab_size - 1 if eod_id is None else int(eod_id)
        if not 0 <= self._eod < self._vocab_size:
            raise ValueError(f"--null-tokenizer-eod-id {eod_id} is outside the vocabulary [0, {self._vocab_size}): "
                             "give an id below --vocab-size or drop it (default V-1)")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            bad = next(x for x in text.split() if not x.lstrip("-").isdigit())
            raise ValueError(f"NullTokenizer: {bad[:40]!r} is not an integer; the text must be "
                             "space-separated token ids") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"NullTokenizer: token id {i} is outside [0, {self.vocab_size}); "
                                 "raise --vocab-size or fix the data")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    null_eod_id: int | None = None,
) -> Tokenizer:
    """The tokenizer for Megatron's `--tokenizer-type` name and its files.

    ``null_eod_id``: NullTokenizer's end-of-document id (default ``vocab_size - 1``). Raises
    ValueError with one line for an unknown type, a missing required argument or a
    missing/unreadable file.
    """
    name = _ALIASES.get(tokenizer_type, tokenizer_type)
    if name == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise ValueError(f"{tokenizer_type} needs --tokenizer-model (a SentencePiece .model)")
        return SentencePieceTokenizer(tokenizer_model)
    if name == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model or "")
    if name == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise ValueError("GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file "
                             "(merges.txt)")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if name == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size V (ids are 0..V-1, EOD is V-1)")
        return NullTokenizer(vocab_size, null_eod_id)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of "
                     f"{', '.join(TOKENIZER_TYPES)}")
