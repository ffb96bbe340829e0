"""Document encoders for preprocessing: texts in, token bytes out, exactly as the tokenizer says.

An encoder turns a chunk of documents into `(tokens, lengths)`: the token ids of every document
concatenated as bytes of the dataset dtype (the `.bin` layout) and each document's length, with
the EOD appended to non-empty documents when asked. Two implementations:

- `BatchEncoder`: any tokenizer's `tokenize_batch`, then one conversion to the dtype.
- `WordCacheEncoder`: SentencePiece with a per-word cache, the fast path. Ids are identical to
  `SentencePieceProcessor.encode(text)`; it is used only for models where that is proven below.

Why a word cache is exact for SentencePiece BPE
-----------------------------------------------
`encode(text)` is `model.Encode(normalize(text))`. The normalizer maps characters (the
precompiled charsmap, e.g. nmt_nfkc), strips and collapses spaces (`remove_extra_whitespaces`),
adds the dummy prefix and writes every space as "▁" (U+2581). The BPE model then starts from the
characters of the normalized string (user-defined symbols kept whole) and repeatedly merges the
adjacent pair whose concatenation is the best-scoring vocabulary piece (ties: leftmost). A merge
can only create a vocabulary piece, so if no piece has a "▁" anywhere but at its start, no merge
ever spans the position just before a "▁": the normalized string falls apart into words
("▁hello", "▁world"), and merges inside one word neither see nor affect the others (a word's
own merges happen in the same relative order, ties broken the same way). Hence the ids of the
text are the concatenation of the ids of its words, each encoded on its own, and a dict from word
to ids reproduces `encode` exactly. With `treat_whitespace_as_suffix` the same holds with "▁" at
the end of words. Two details complete the proof:

- SentencePiece merges a run of consecutive `<unk>` pieces into one; a run cannot cross a word
  boundary because each word starts (ends, for suffix) with "▁", which must be a known piece.
- A word is encoded on its own by a second processor built from the same model with an identity
  normalizer (no charsmap, no dummy prefix, no whitespace handling), so it sees exactly the
  normalized characters of the word. User-defined symbols never span a word boundary (those with
  a space or an inner "▁" disable the cache).

`analyse_model` checks these conditions on the model proto: BPE, `escape_whitespaces`, no piece
with an inner "▁", "▁" itself known. Unigram models are NOT cached: their Viterbi search sums
float32 scores over the whole text, so which of two near-tied segmentations of a word wins can
depend on the score accumulated before it; word-by-word results then differ from whole-text ones
(measured with an 8k unigram model: 184 of the 12,749 demo-corpus documents, on equal-score
splits of runs like "########"). Such models, and any other failing check, use `BatchEncoder`.

Words missing from the cache are cut further before SentencePiece sees them, by the same
argument one level down: a merge that spanned the boundary between adjacent characters x and y
would create a piece containing "xy", so where no piece (nor user-defined symbol) contains "xy",
and x or y is a known character (no <unk> run across), the word is cut and each part is encoded
on its own (`safe_pairs`, a 256 x 256 table for Latin-1 characters; others are never cut). The
parts ("self", ".", "assert", "(" ...) repeat far more often than whole words, so a second cache
of parts cuts the text SentencePiece must encode for new words about tenfold on source code.

Fast normalization for ASCII text: for a pure-ASCII document without characters the charsmap
deletes or maps to something other than a space (nmt_nfkc maps \\t \\n \\f \\r to a space and
deletes other control characters), normalize-and-split equals Python's `str.split()`. The ASCII
rules are read from the charsmap's double-array trie itself (`ascii_charsmap_rules`), and any
document with a character outside the proven set takes `SentencePieceProcessor.normalize`.

Memory stays bounded: each cache (words, parts) is emptied when it passes `max_words` entries,
and words longer than `max_word_chars` characters are encoded but not kept.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from megafast.data.tokenizer import Tokenizer

WS = "\u2581"  # SentencePiece's whitespace marker
_BPE = 2  # TrainerSpec.ModelType.BPE
_UNIGRAM = 1
_NORMAL, _USER_DEFINED, _BYTE = 1, 4, 6  # ModelProto.SentencePiece.Type


class BatchEncoder:
    """Encodes with the tokenizer's `tokenize_batch` (any tokenizer type)."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, eod: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self.eod = eod

    def encode(self, texts: Sequence[str]) -> tuple[bytes, list[int]]:
        """(tokens of all documents as dtype bytes, tokens per document incl. the EOD)."""
        ids = self.tokenizer.tokenize_batch(texts)
        if self.eod is not None:
            for doc in ids:
                if len(doc):
                    doc.append(self.eod)
        lengths = [len(doc) for doc in ids]
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        return flat.astype(self.dtype).tobytes(), lengths


@dataclass(frozen=True)
class WordCacheSupport:
    """Whether (and how) a SentencePiece model can be encoded word by word; see the module doc."""

    exact: bool
    reason: str  # why not, when not exact
    suffix: bool = False  # treat_whitespace_as_suffix: "▁" ends words instead of starting them
    ascii_fast_path: bool = False
    ascii_reject: str = ""  # ASCII characters whose presence sends a text to the normalizer


def _load_proto(serialized: bytes):  # -> sentencepiece_model_pb2.ModelProto
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    return proto


def ascii_charsmap_rules(charsmap: bytes) -> dict[bytes, bytes]:
    """Every rule of a precompiled charsmap whose key is pure ASCII: {key: replacement}.

    The charsmap is `<uint32 trie size><darts-clone double array><NUL-terminated outputs>`; this
    walks the double array from the root along ASCII labels (1..127) only, so it lists all rules
    that can fire on ASCII text. Unit layout (darts-clone): has_leaf = bit 8, value = bits 0..30,
    label = bits 0..7 | bit 31, offset = (unit >> 10) << ((unit & (1 << 9)) >> 6).
    """
    if not charsmap:
        return {}
    (trie_size,) = struct.unpack_from("<I", charsmap, 0)
    units = np.frombuffer(charsmap, "<u4", trie_size // 4, 4).tolist()
    outputs = charsmap[4 + trie_size:]
    rules: dict[bytes, bytes] = {}
    stack: list[tuple[int, bytes]] = [(0, b"")]
    while stack:
        pos, key = stack.pop()
        unit = units[pos]
        offset = (unit >> 10) << ((unit & (1 << 9)) >> 6)
        if key and (unit >> 8) & 1:
            value = units[pos ^ offset] & ((1 << 31) - 1)
            rules[key] = outputs[value:outputs.index(b"\0", value)]
        for c in range(1, 128):
            child = pos ^ offset ^ c
            if child < len(units) and units[child] & ((1 << 31) | 0xFF) == c:
                stack.append((child, key + bytes([c])))
    return rules


def _ascii_fast_path(proto) -> tuple[bool, str]:
    """Whether `str.split()` can stand in for normalize-and-split on ASCII text, and the ASCII
    characters whose presence disables that for a document."""
    spec = proto.normalizer_spec
    if not spec.remove_extra_whitespaces:
        return False, ""
    if any(p.type == _USER_DEFINED for p in proto.pieces):
        return False, ""  # the normalizer copies user-defined symbols verbatim
    rules = ascii_charsmap_rules(spec.precompiled_charsmap)
    if any(len(key) > 1 for key in rules):
        return False, ""
    reject = []
    for c in range(1, 128):
        char = chr(c)
        mapped = rules.get(bytes([c]), char.encode()).decode("utf-8", "replace")
        if char.isspace():  # str.split() separates words here
            ok = mapped == " "
        else:
            ok = mapped == char
        if not ok:
            if char == " ":
                return False, ""
            reject.append(char)
    return True, "".join(reject)


def analyse_model(serialized: bytes) -> WordCacheSupport:
    """Check the conditions under which word-by-word encoding equals `encode` (module doc)."""
    try:
        proto = _load_proto(serialized)
    except ImportError:
        return WordCacheSupport(False, "the protobuf package is needed to read the model proto")
    return _analyse(proto)


def _analyse(proto) -> WordCacheSupport:
    spec = proto.normalizer_spec
    trainer = proto.trainer_spec
    model_type = trainer.model_type if trainer.HasField("model_type") else _UNIGRAM
    if model_type == _UNIGRAM:
        return WordCacheSupport(False, "unigram Viterbi sums float32 scores over the whole text, "
                                       "so near-ties may resolve differently word by word")
    if model_type != _BPE:
        return WordCacheSupport(False, "only BPE models are cached")
    if spec.HasField("escape_whitespaces") and not spec.escape_whitespaces:
        return WordCacheSupport(False, "escape_whitespaces is off, so words are not marked by ▁")
    suffix = trainer.treat_whitespace_as_suffix
    for piece in proto.pieces:
        text = piece.piece
        inner = text[:-1] if suffix else text[1:]
        if WS in inner:
            return WordCacheSupport(False, f"piece {text!r} has an inner ▁ (a merge across words)")
        if piece.type == _USER_DEFINED and " " in text:
            return WordCacheSupport(False, f"user-defined symbol {text!r} contains a space")
    if not any(p.piece == WS and p.type in (_NORMAL, _USER_DEFINED) for p in proto.pieces):
        return WordCacheSupport(False, "▁ alone is not a piece, so <unk> runs could join words")
    fast, reject = _ascii_fast_path(proto)
    return WordCacheSupport(True, "", suffix=suffix, ascii_fast_path=fast, ascii_reject=reject)


def safe_pairs(proto) -> np.ndarray:
    """bool[256, 256]: True where a word may be cut between characters x and y (code points).

    No vocabulary piece (any type but BYTE, which never matches text) contains "xy", so no
    merge or user-defined symbol spans the cut, and x or y is a known single-character piece,
    so no run of <unk> spans it either. Only Latin-1 pairs are listed; others are never cut.
    """
    table = np.ones((256, 256), dtype=bool)
    known = np.zeros(256, dtype=bool)
    for piece in proto.pieces:
        if piece.type == _BYTE:
            continue
        codes = [ord(c) for c in piece.piece]
        if len(codes) == 1 and codes[0] < 256 and piece.type in (_NORMAL, _USER_DEFINED):
            known[codes[0]] = True
        for x, y in zip(codes, codes[1:]):
            if x < 256 and y < 256:
                table[x, y] = False
    table &= known[:, None] | known[None, :]
    return table


def _identity_processor(proto):  # -> sentencepiece.SentencePieceProcessor
    """The same model with a normalizer that changes nothing (for already-normalized words)."""
    import sentencepiece as spm

    words = type(proto)()
    words.CopyFrom(proto)
    words.DiscardUnknownFields()  # e.g. self-test samples, which assume the real normalizer
    spec = words.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.normalization_rule_tsv = ""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=words.SerializeToString())


class WordCacheEncoder:
    """SentencePiece BPE encoding through a per-word cache; ids identical to `encode(text)`.

    Raises ValueError when the model does not satisfy `analyse_model` (use `BatchEncoder`).
    Cache keys: a "word" key `k` stands for "▁k" ("k▁" with suffix whitespace); a key starting
    with "▁" stands for the bare word after it (the text's first word without a dummy prefix, or
    its last without a trailing space in suffix mode). Split parts never contain "▁", so the two
    kinds cannot collide, and the bare empty word "▁" maps to no tokens.
    """

    def __init__(self, model_file: str, dtype: np.dtype, eod: int | None = None,
                 max_words: int = 1 << 19, max_word_chars: int = 64) -> None:
        import sentencepiece as spm

        with open(model_file, "rb") as f:
            serialized = f.read()
        try:
            proto = _load_proto(serialized)
        except ImportError:
            raise ImportError(NO_PROTOBUF) from None
        self.support = _analyse(proto)
        if not self.support.exact:
            raise ValueError(f"{model_file}: the word cache is not exact for this model "
                             f"({self.support.reason}); encode without it (--no-word-cache)")
        self._normalize = spm.SentencePieceProcessor(model_proto=serialized).normalize
        self._words = _identity_processor(proto)
        self.dtype = np.dtype(dtype)
        self._itemsize = self.dtype.itemsize
        self._eod = b"" if eod is None else np.array([eod], self.dtype).tobytes()
        self._suffix = self.support.suffix
        self._dummy = proto.normalizer_spec.add_dummy_prefix
        self._fast = self.support.ascii_fast_path
        self._reject = self.support.ascii_reject.encode("ascii")
        self.max_words = max_words
        self.max_word_chars = max_word_chars
        self._cache: dict[str, bytes] = {WS: b""}
        self._piece_cache: dict[str, bytes] = {}
        self._safe = safe_pairs(proto)
        self.hits = 0
        self.misses = 0

    def keys(self, text: str) -> list[str]:
        """Cache keys of a text's words, in order (see the class docstring)."""
        if self._fast and text.isascii() and (
            not self._reject or len(text.encode("ascii").translate(None, self._reject)) == len(text)
        ):
            keys = text.split()
            if not self._dummy and keys:
                if self._suffix:
                    keys[-1] = WS + keys[-1]
                else:
                    keys[0] = WS + keys[0]
            return keys
        normalized = self._normalize(text)
        if not normalized:
            return []
        keys = normalized.split(WS)
        if self._suffix:
            keys[-1] = WS + keys[-1]
        else:
            keys[0] = WS + keys[0]
        return keys

    def _joined_words(self, keys: list[str]) -> tuple[str, np.ndarray]:
        """The normalized words the keys stand for, concatenated, and where each one starts."""
        if any(k[:1] == WS for k in keys):  # a bare key "▁w" stands for the word "w"
            words = [k[1:] if k[:1] == WS else (k + WS if self._suffix else WS + k) for k in keys]
            joined = "".join(words)
            lengths = np.fromiter(map(len, words), np.int64, len(words))
        else:
            joined = WS.join(keys) + WS if self._suffix else WS + WS.join(keys)
            lengths = np.fromiter(map(len, keys), np.int64, len(keys)) + 1
        starts = np.zeros(len(keys), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return joined, starts

    def _encode_pieces(self, pieces: list[str]) -> None:
        """Encode parts of words (each on its own) into the piece cache."""
        ids = self._words.encode(pieces)
        lengths = [len(x) for x in ids]
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        blob = flat.astype(self.dtype).tobytes()
        ends = [n * self._itemsize for n in accumulate(lengths)]
        self._piece_cache.update(zip(pieces, map(blob.__getitem__, map(slice, [0] + ends, ends))))

    def _fill(self, missing: set[str]) -> list[str]:
        """Encode missing words into the cache; returns the keys to drop after this chunk.

        Words are cut at safe pairs (see `safe_pairs`) and assembled from cached parts.
        """
        keys = list(missing)
        joined, starts = self._joined_words(keys)
        points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        left, right = points[:-1], points[1:]
        latin = (left < 256) & (right < 256)
        cut = np.zeros(len(points) + 1, dtype=bool)
        cut[1:-1][latin] = self._safe[left[latin], right[latin]]
        cut[starts] = True
        cut[-1] = True
        bounds = np.flatnonzero(cut)
        first = np.searchsorted(bounds, starts).tolist()
        first.append(len(bounds) - 1)
        edges = bounds.tolist()
        pieces = [joined[a:b] for a, b in zip(edges, edges[1:])]
        if len(self._piece_cache) > self.max_words:
            self._piece_cache.clear()
        new_pieces = set(pieces).difference(self._piece_cache)
        if new_pieces:
            self._encode_pieces(list(new_pieces))
        encoded = list(map(self._piece_cache.__getitem__, pieces))
        join = b"".join
        self._cache.update(zip(keys, [join(encoded[a:b]) for a, b in zip(first, first[1:])]))
        limit = self.max_word_chars
        return [k for k in keys if len(k) > limit]

    def encode(self, texts: Sequence[str]) -> tuple[bytes, list[int]]:
        """(tokens of all documents as dtype bytes, tokens per document incl. the EOD)."""
        if len(self._cache) > self.max_words:
            self._cache.clear()
            self._cache[WS] = b""
        all_keys = [self.keys(text) for text in texts]
        seen = set(chain.from_iterable(all_keys))
        missing = seen.difference(self._cache)
        transient = self._fill(missing) if missing else []
        self.misses += len(missing)
        self.hits += len(seen) - len(missing)
        get = self._cache.__getitem__
        join = b"".join
        eod = self._eod
        size = self._itemsize
        out: list[bytes] = []
        lengths: list[int] = []
        for keys in all_keys:
            tokens = join(map(get, keys))
            out.append(tokens)
            n = len(tokens) // size
            if n and eod:
                out.append(eod)
                n += 1
            lengths.append(n)
        for key in transient:
            del self._cache[key]
        return join(out), lengths


def word_cache_support(model_file: str) -> WordCacheSupport:
    """`analyse_model` of a model file."""
    with open(model_file, "rb") as f:
        return analyse_model(f.read())


NO_PROTOBUF = ("the protobuf package is missing, so SentencePiece models are encoded without the "
               "word cache (same tokens, about 1.5x slower): pip install protobuf (a megafast dependency)")


def protobuf_missing() -> bool:
    """True, after a warning, when the word cache cannot read model protos (no protobuf).

    The warning is raised here only, so it shows once per process; worker processes forked after
    the main process warned inherit its warning registry and stay silent."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except ImportError:
        warnings.warn(NO_PROTOBUF)
        return True
    return False


def make_encoder(tokenizer: Tokenizer, dtype: np.dtype, eod: int | None = None,
                 word_cache: bool = True) -> BatchEncoder | WordCacheEncoder:
    """The fastest exact encoder: the word cache for a SentencePiece model that allows it."""
    from megafast.data.tokenizer import SentencePieceTokenizer

    if word_cache and isinstance(tokenizer, SentencePieceTokenizer) and not protobuf_missing():
        try:
            return WordCacheEncoder(tokenizer.model_file, dtype, eod)
        except ValueError:  # not provably exact for this model: plain batches
            pass
    return BatchEncoder(tokenizer, dtype, eod)
