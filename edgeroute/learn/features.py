"""Hashed text features, bit-identical to `rust/edgeroute-core/src/classify.rs`.

This module owns the featurizer specification; the Rust core re-implements it
and the two are held together by the fixture `classify_features.json` (text ->
bucket ids) that `build_models` writes and a Rust test reads.

Specification (version 2; version 1 differs only in step 2), all arithmetic on
unsigned 64-bit integers mod 2**64:

1. ``b = text.encode("utf-8")``; if ``len(b) > head + tail`` keep
   ``b[:head] + b[len(b) - tail:]`` (bytes, so a cut may split a character: both
   sides cut the same way). Then ASCII ``A-Z`` -> ``a-z``; other bytes unchanged.
2. Tokens: maximal runs of word bytes (``a-z0-9_`` or any byte >= 0x80), and each
   ASCII punctuation byte (``!``..``~`` that is not a word byte) as a one-byte
   token. Everything else separates tokens. Version 2 only: each whole 3-byte
   character with lead byte ``E3``..``ED`` (kana, CJK ideographs, Hangul) is a
   token of its own and ends the word run before it.
3. ``h(tok) = fnv1a64(tok)``. Word unigram bucket ``fmix64(h ^ SEED_UNI) & mask``;
   bigram of consecutive tokens ``fmix64((h1 * GOLDEN + h2) ^ SEED_BI) & mask``.
4. Character n-grams for each ``n`` in ``char_ngrams`` (n <= 7) over the bytes of
   step 1: ``key = int.from_bytes(b[i:i+n], "little") | (n << 56)``, bucket
   ``fmix64(key ^ SEED_CHAR) & mask``.
5. The feature vector is the multiset of buckets; models scale the summed
   weights by ``1 / sqrt(number of buckets emitted)``.

No numpy needed here: this is the reference used by tests and the parity fixture.
Training uses :func:`bucket_ids_fast`, which vectorises step 4 with numpy when it is
installed and falls back to the reference otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN = 0x9E3779B97F4A7C15
SEED_UNI = 0x243F6A8885A308D3
SEED_BI = 0x13198A2E03707344
SEED_CHAR = 0xA4093822299F31D0

_LOWER = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))
_TOKEN_RE = re.compile(rb"[a-z0-9_\x80-\xff]+|[!-/:-@\[-^`{-~]")
# Version 2: each whole 3-byte character with lead byte E3..ED (U+3000..U+DFFF: kana,
# CJK ideographs, Hangul) is a token of its own; those scripts put no spaces between
# words, so version 1 saw a whole Chinese sentence as one "word".
_TOKEN_RE_V2 = re.compile(
    rb"[\xe3-\xed][\x80-\xbf]{2}|(?:[a-z0-9_\x80-\xe2\xee-\xff]|[\xe3-\xed](?![\x80-\xbf]{2}))+|[!-/:-@\[-^`{-~]"
)


@dataclass(frozen=True)
class FeaturizerConfig:
    """What the featurizer emits; stored in every model file."""

    # 2 for new models; files written with version 1 still load and hash as before
    version: int = 2
    # 2^15 buckets x (10 task + 2 router) i16 weights = 768 KiB: fits the core's L2
    # cache; 1 KiB + 256 B of text carries the task and difficulty signal and
    # bounds the work per prompt (~2,000 buckets) whatever the prompt length.
    log2_buckets: int = 15
    head_bytes: int = 1024
    tail_bytes: int = 256
    word_unigrams: bool = True
    word_bigrams: bool = True
    char_ngrams: tuple[int, ...] = field(default=(4,))

    @property
    def mask(self) -> int:
        return (1 << self.log2_buckets) - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "log2_buckets": self.log2_buckets,
            "head_bytes": self.head_bytes,
            "tail_bytes": self.tail_bytes,
            "word_unigrams": self.word_unigrams,
            "word_bigrams": self.word_bigrams,
            "char_ngrams": list(self.char_ngrams),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FeaturizerConfig:
        version = int(obj.get("version", 1))
        if version not in (1, 2):
            raise ValueError(f"unsupported featurizer version {version}")
        return cls(
            version=version,
            log2_buckets=int(obj["log2_buckets"]),
            head_bytes=int(obj["head_bytes"]),
            tail_bytes=int(obj["tail_bytes"]),
            word_unigrams=bool(obj["word_unigrams"]),
            word_bigrams=bool(obj["word_bigrams"]),
            char_ngrams=tuple(int(n) for n in obj["char_ngrams"]),
        )


def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finaliser."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK64
    k ^= k >> 33
    return k


@lru_cache(maxsize=1 << 18)
def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def normalize(text: str, cfg: FeaturizerConfig) -> bytes:
    """Step 1: UTF-8, head+tail truncation, ASCII lower-casing."""
    b = text.encode("utf-8")
    if len(b) > cfg.head_bytes + cfg.tail_bytes:
        b = b[: cfg.head_bytes] + b[len(b) - cfg.tail_bytes :]
    return b.translate(_LOWER)


def _word_buckets(b: bytes, cfg: FeaturizerConfig) -> list[int]:
    mask = cfg.mask
    out: list[int] = []
    prev: int | None = None
    for tok in (_TOKEN_RE_V2 if cfg.version >= 2 else _TOKEN_RE).findall(b):
        h = fnv1a64(tok)
        if cfg.word_unigrams:
            out.append(fmix64(h ^ SEED_UNI) & mask)
        if cfg.word_bigrams and prev is not None:
            out.append(fmix64((((prev * GOLDEN) & MASK64) + h) & MASK64 ^ SEED_BI) & mask)
        prev = h
    return out


def _char_buckets(b: bytes, cfg: FeaturizerConfig) -> list[int]:
    mask = cfg.mask
    out: list[int] = []
    for n in cfg.char_ngrams:
        tag = n << 56
        for i in range(len(b) - n + 1):
            key = int.from_bytes(b[i : i + n], "little") | tag
            out.append(fmix64(key ^ SEED_CHAR) & mask)
    return out


def bucket_ids(text: str, cfg: FeaturizerConfig) -> list[int]:
    """The reference featurizer: word buckets then char-n-gram buckets, in order."""
    b = normalize(text, cfg)
    return _word_buckets(b, cfg) + _char_buckets(b, cfg)


def bucket_ids_fast(text: str, cfg: FeaturizerConfig) -> list[int]:
    """Same multiset as :func:`bucket_ids` (same order too), numpy-vectorised."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is the training extra
        return bucket_ids(text, cfg)
    b = normalize(text, cfg)
    out = _word_buckets(b, cfg)
    arr = np.frombuffer(b, dtype=np.uint8).astype(np.uint64)
    for n in cfg.char_ngrams:
        m = len(b) - n + 1
        if m <= 0:
            continue
        key = np.full(m, n << 56, dtype=np.uint64)
        for j in range(n):
            key |= arr[j : j + m] << np.uint64(8 * j)
        k = key ^ np.uint64(SEED_CHAR)
        k ^= k >> np.uint64(33)
        k *= np.uint64(0xFF51AFD7ED558CCD)
        k ^= k >> np.uint64(33)
        k *= np.uint64(0xC4CEB9FE1A85EC53)
        k ^= k >> np.uint64(33)
        out.extend((k & np.uint64(cfg.mask)).tolist())
    return out


def length_features(text: str) -> list[float]:
    """Dense length features shared with Rust: log1p(bytes)/10, log1p(lines)/5."""
    nbytes = len(text.encode("utf-8"))
    lines = text.count("\n") + 1
    return [math.log1p(nbytes) / 10.0, math.log1p(lines) / 5.0]
