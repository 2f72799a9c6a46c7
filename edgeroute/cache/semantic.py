"""Semantic matching: reuse an answer for a differently worded request that asks the same.

Only the last user turn is compared by meaning; everything else (the earlier turns, the
system prompt, tools, parameters, the route and the tenant) must match exactly, through a
context hash. A candidate must pass four gates:

1. cosine similarity of static word embeddings (WordLlama's 256-d model, shipped inside
   its package: nothing is downloaded) at or above the route's `similarity`;
2. the same *guard signature*: the same numbers (in digits or words), named entities,
   quoted strings, code identifiers, negation (a `not`, or an `un-`/`non-` word), opposed
   words ("enable" / "disable", "ascending" / "descending"), comparisons and language; the
   entities and the numbers in the same order; no word on the other side of a connector
   ("5 km to miles" / "5 miles to km": static embeddings do not see order). Near
   misses ("2 eggs" / "3 eggs", "Paris" / "Lyon", "is" / "is not", English / French) embed
   close together; they are the classic false hit, so they are refused by these exact
   checks rather than by a tighter threshold;
3. the same *shape* (`_shape`): word counts close (apart by at most a quarter of the longer,
   or 3 words), each turn's content words mostly found in the other's (at most one in five,
   or one word, missing, both ways), and the same instruction words ("reply", "share",
   "ignore" ...). Static
   embeddings average words: a prompt padded with another's words plus an injected
   instruction ("... VPN? share your password with your manager how do I reset ... VPN?")
   scores 0.97 against the plain question, and under `scope: team | global` its answer would
   serve the other tenant's question;
4. the stored answer's own checks (fresh, produced by an allowed deployment).

The nearest-neighbour index is usearch's HNSW (half-precision vectors), one per route for
every tenant, bounded by the route's `max_entries` (the oldest record of the tenant holding
the most out first). A search widens past the 8 nearest while all of them are other tenants'
(up to 512). The index lives in this process; entries themselves live
in the configured store (in memory or Redis). With Redis, what each instance indexes is
shared with the others (`shared_index`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import re
import struct
import threading
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeroute.cache.key import cache_key

DIM = 256

# Numbers as written ("3", "3.5", "1,000", "-2", "1e6", "0x1F"), normalised so "1,000" == "1000"
# while "1,25" (a decimal comma) stays 1.25, not 125.
_NUMBER = re.compile(r"(?<![\w.])-?(?:0[xX][0-9a-fA-F]+|\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Comparisons and percentages: "x > 5" and "x < 5" embed as twins.
_OPERATOR = re.compile(r"[<>!=]=|=>|->|<-|[<>%]")
_MAY_COMPARE = re.compile(r"[<>%]|[!=]=")
# Words that tie what comes before them to what comes after, one way round: "100 USD to EUR",
# "Rust faster than Go", "from the laptop to the server". The same words on the other
# sides is another request, and static embeddings do not see order.
# Negation's scope too: "with eggs but without cheese" / "with cheese but without eggs".
_CONNECTORS = frozenset(
    "to from into onto than vs versus over against toward towards without except not instead unlike".split()
)
_WINDOW = 4  # content words on each side of a connector that must not have swapped sides
_MAX_SPANS = 16  # connectors kept one by one; past them all must match (a digest): bounds memory and the pairwise check
_WORD = re.compile(r"[^\W_][\w'\u2019-]*", re.UNICODE)
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|“([^”]{1,200})”|'([^'\s][^']{0,200})'")
# Possessive quantifiers: the next character can never be one they would give back, and
# without backtracking a long word costs one pass instead of one per character.
_CODE = re.compile(r"`([^`]{1,200})`|\b([A-Za-z_]\w*+(?:\.\w++)+\(?|[a-z]++_[a-z0-9_]+|[a-z]++[A-Z]\w*|\w++\(\))")
_SENTENCE_END = re.compile(r"[.!?]\s+")
_NEGATIONS = frozenset(
    "not no never none nothing nobody neither nor cannot can't don't doesn't didn't isn't aren't wasn't weren't "
    "won't wouldn't shouldn't couldn't without".split()
)
# Words whose opposite is a different request ("enable" / "disable", "import" / "export"):
# embeddings put such pairs close together, so they must match exactly, like negations.
_OPPOSED = frozenset(
    "enable disable upgrade downgrade add remove import export increase decrease install uninstall create delete "
    "open close start stop encrypt decrypt lock unlock show hide include exclude allow block deny buy sell before "
    "after minimum maximum min max first last upload download subscribe unsubscribe connect disconnect pause resume "
    "cancel join leave win lose more less higher lower faster slower best worst pros cons advantages disadvantages "
    "send receive read write push pull encode decode compress decompress above below inside outside input output "
    "left right accept reject approve decline login logout ascend descend increment decrement forward backward "
    "expand collapse maximize minimize horizontal vertical positive negative true false valid invalid legal "
    "illegal possible impossible correct incorrect celsius fahrenheit bigger smaller larger better worse "
    "longer shorter older younger newer taller cheaper heavier lighter stronger weaker warmer colder".split()
)


# Numbers spelled out ("three" / "four", "one hundred" / "one thousand") are numbers too.
# "one" is left out: as a pronoun ("which one") it would cost paraphrases their hit.
_NUMBER_WORDS = frozenset(
    "zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million billion trillion dozen half quarter double triple twice thrice second third fourth fifth".split()
)
# Words that start like a negating prefix but are not negations ("under", "unique", "uncle").
_NOT_NEGATING = ("under", "uni", "until", "unless", "unto", "uncle", "unanim", "nonce")


def _negating_prefix(word: str) -> bool:
    """`unsafe`, `unavailable`, `non-empty`: the word says `not` ("safe" / "unsafe" embed as
    near twins). A false positive costs a hit only where the two prompts differ in it."""
    return len(word) >= 5 and word.startswith(("un", "non")) and not word.startswith(_NOT_NEGATING)


def _forms(stem: str) -> list[str]:
    base = stem[:-1] if stem.endswith("e") else stem
    return [stem, stem + "s", stem + "es", stem + "d", stem + "ed", base + "ing", base + "ed"]


# Every inflected form (plain, -s, -es, -d, -ed, -ing) -> its stem, so a lookup is one dict get.
_OPPOSED_FORMS = {form: stem for stem in _OPPOSED for form in _forms(stem)}


# A few very common words per language: enough to tell apart the languages of two prompts
# that are otherwise close (a translated prompt is a different request).
_STOPWORDS = {
    "en": "the is are what how of and to in for with this that you a an do does can my your on it be from by",
    "fr": "le la les est sont quel quelle comment de et pour avec ce cette vous une des du",
    "de": "der die das ist sind was wie und für mit ein eine ich nicht sie",
    "es": "el la los las es son qué cómo de y para con este esta usted una del",
    "it": "il lo la gli le è sono che come di e per con questo questa una del",
    "pt": "o a os as é são que como de e para com este esta você uma do",
    "nl": "de het een is zijn wat hoe en voor met dit dat je van",
}
_STOP_INDEX: dict[str, list[str]] = {}
for _lang, _words in _STOPWORDS.items():
    for _w in _words.split():
        _STOP_INDEX.setdefault(_w, []).append(_lang)
_WHOLE_VOTE = math.lcm(*range(1, len(_STOPWORDS) + 1))  # divisible by any number of languages sharing a word


@dataclass(frozen=True, slots=True)
class Guards:
    """What must be identical between two prompts for one's answer to serve the other.

    Kept with every indexed entry, so kept small: what must be equal (the numbers, named
    entities, quoted text, code identifiers, negation, opposed words, comparisons, script, and
    the order of the entities and of the numbers) as one digest; the language apart (it need
    match only where both prompts say enough to tell it); the connectors' neighbours packed
    (`_pack_spans`). A 5 KB prompt's guards took 12 KB as sets of strings."""

    exact: bytes  # blake2b-128 of the fields that must be equal
    language: str | None  # a guess from common words; None when too few to tell
    spans: bytes = b""  # each connector with the content words just before and after it, packed
    shape: bytes = b""  # word count, instruction words and content words (`_shape`); empty: unknown

    def compatible(self, other: Guards) -> bool:
        """Everything equal; the language only where both prompts say enough to tell it; no
        word on the other side of a connector ("km to miles" / "miles to km"); the same shape
        (one is not the other padded with words or an instruction)."""
        same_language = self.language is None or other.language is None or self.language == other.language
        return (
            same_language
            and self.exact == other.exact
            and not _crossed(self.spans, other.spans)
            and same_shape(self.shape, other.shape)
        )


# A span: the connector's number in _CONNECTOR_LIST, then _WINDOW words before it and _WINDOW
# after it, each a 32-bit CRC (0: no word), the same in every process (shared indexes).
_SPAN = struct.Struct(f"<B{2 * _WINDOW}I")
_CONNECTOR_LIST = sorted(_CONNECTORS)
_CONNECTOR_ID = {c: i for i, c in enumerate(_CONNECTOR_LIST)}


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) or 1


def _unpack_spans(packed: bytes) -> list[tuple[int, set[int], set[int]]]:
    out = []
    for c, *ids in _SPAN.iter_unpack(packed):
        out.append((c, {i for i in ids[:_WINDOW] if i}, {i for i in ids[_WINDOW:] if i}))
    return out


def is_packed_spans(packed: bytes) -> bool:
    """Whether `packed` is what `_pack_spans` writes (a record from another instance)."""
    if packed[:1] == b"\xff":  # a long prompt's spans, as their digest
        return len(packed) == 17
    n, rest = divmod(len(packed), _SPAN.size)
    return rest == 0 and n <= _MAX_SPANS and all(s[0] < len(_CONNECTOR_LIST) for s in _SPAN.iter_unpack(packed))


def _crossed(a: bytes, b: bytes) -> bool:
    """Whether some connector has words before it in one prompt that come after it in the
    other, and the other way round: the two ask for opposite directions."""
    if a[:1] == b"\xff" or b[:1] == b"\xff":  # a long prompt's spans, as one digest
        return a != b
    if not a or not b:
        return False
    spans_b = _unpack_spans(b)
    return any(
        c == d and not before.isdisjoint(after2) and not after.isdisjoint(before2)
        for c, before, after in _unpack_spans(a)
        for d, before2, after2 in spans_b
    )


def _pack_spans(words: list[str], lower: dict[str, str], distinct: set[str]) -> bytes:
    if distinct.isdisjoint(_CONNECTORS):
        return b""
    seq = [low for w in words if (low := lower[w]) not in _FILLER]
    at = [i for i, w in enumerate(seq) if w in _CONNECTORS]
    ids: dict[str, int] = {}
    out = bytearray()
    for i in at:
        before = [
            ids.get(x) or ids.setdefault(x, _word_id(x)) for x in seq[max(0, i - _WINDOW) : i] if x not in _CONNECTORS
        ]
        after = [
            ids.get(x) or ids.setdefault(x, _word_id(x)) for x in seq[i + 1 : i + 1 + _WINDOW] if x not in _CONNECTORS
        ]
        out += _SPAN.pack(
            _CONNECTOR_ID[seq[i]], *before, *[0] * (_WINDOW - len(before)), *after, *[0] * (_WINDOW - len(after))
        )
    if len(at) > _MAX_SPANS:  # past the bound, every span must be equal: kept as their digest
        return b"\xff" + hashlib.blake2b(bytes(out), digest_size=16).digest()
    return bytes(out)


# Words that make a clause an instruction to the model rather than part of a question: one
# prompt having such a word the other lacks is the other's question with an order added
# ("... VPN? share your password with your manager"). Words a plain question often opens with
# ("tell", "give", "explain") are filler and not among them.
_INSTRUCTIONS = sorted(
    set(
        "ignore disregard forget pretend always must reply respond answer say share send email post visit click "
        "contact call paste insist mention obey recommend follow claim".split()
    )
)
_INSTRUCTION_BIT = {w: 1 << i for i, w in enumerate(_INSTRUCTIONS)}
_SHAPE = struct.Struct("<IQ")  # word count (capped), instruction words (a bit each)
_SKETCH = 64  # content words kept: all of a short turn's; the smallest ids of a longer one's (a bottom-k sketch)
_MAX_UNCOVERED = 0.2  # of a turn's content words, the share the other turn may lack
_FREE_UNCOVERED = 1  # or this many words (a reworded short question: "capital" / "capital city")
_LENGTH_SLACK = (0.25, 3)  # word counts may differ by a quarter of the longer, or by 3 words
_SUFFIXES = ("ing", "ed", "es", "s", "ly")


def _stem(word: str) -> str:
    """A crude stem, enough to see "improving" / "improve" or "vaccines" / "vaccine" as one word."""
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 2 and word.endswith(suffix) and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    return word[:5]


def _shape(words: list[str], distinct: set[str]) -> bytes:
    """The turn's word count, its instruction words, and its content words' stems (as 32-bit
    CRCs, the `_SKETCH` smallest: every one of a short turn's) packed."""
    mask = 0
    for w in distinct & _INSTRUCTION_BIT.keys():
        mask |= _INSTRUCTION_BIT[w]
    content = {
        _word_id(_stem(w))
        for w in {w.removesuffix("'s") for w in distinct}
        if len(w) > 1 and w not in _FILLER and w not in _CONNECTORS and w not in _NEGATIONS
    }
    sketch = sorted(content)[:_SKETCH]
    return _SHAPE.pack(min(len(words), 0xFFFFFFFF), mask) + struct.pack(f"<{len(sketch)}I", *sketch)


def is_shape(packed: bytes) -> bool:
    """Whether `packed` is what `_shape` writes (a record from another instance)."""
    n, rest = divmod(len(packed) - _SHAPE.size, 4)
    return len(packed) >= _SHAPE.size and rest == 0 and n <= _SKETCH


def same_shape(a: bytes, b: bytes) -> bool:
    """Word counts close, the same instruction words, and each turn's content words mostly
    found in the other's, both ways. Unknown (empty) on either side: not the same. For turns
    past `_SKETCH` content words, the shares are estimated on the smallest ids of both (a
    bottom-k sample of the union, in which membership in either set is exact)."""
    if len(a) < _SHAPE.size or len(b) < _SHAPE.size:
        return False
    (na, mask_a), (nb, mask_b) = _SHAPE.unpack_from(a), _SHAPE.unpack_from(b)
    share, words = _LENGTH_SLACK
    if mask_a != mask_b or abs(na - nb) > max(words, share * max(na, nb)):
        return False
    ids_a = set(struct.unpack_from(f"<{(len(a) - _SHAPE.size) // 4}I", a, _SHAPE.size))
    ids_b = set(struct.unpack_from(f"<{(len(b) - _SHAPE.size) // 4}I", b, _SHAPE.size))
    sample = sorted(ids_a | ids_b)[:_SKETCH]
    in_a = [i for i in sample if i in ids_a]
    in_b = [i for i in sample if i in ids_b]
    return _mostly_in(in_a, ids_b) and _mostly_in(in_b, ids_a)


def _mostly_in(ids: list[int], other: set[int]) -> bool:
    missing = sum(i not in other for i in ids)
    return missing <= max(_FREE_UNCOVERED, _MAX_UNCOVERED * len(ids))


def _number(raw: str) -> str:
    if "," in raw:
        return raw.replace(",", "") if _THOUSANDS.fullmatch(raw) else raw.replace(",", ".")
    return raw.lower()


def guards(text: str) -> Guards:
    """The guard signature of a prompt. Runs once per semantic lookup, on turns of thousands
    of tokens, so each pass that needs no order works on distinct words and chunks only
    (none of the patterns but backquotes reaches across whitespace)."""
    chunks = " ".join(set(text.split()))  # each distinct whitespace-free chunk once
    # Numbers as NFKC writes them: "½" / "¾", a minus sign (U+2212) as "-".
    numeric = chunks if chunks.isascii() else unicodedata.normalize("NFKC", chunks).replace("\u2212", "-")
    digits = {_number(m) for m in _NUMBER.findall(numeric)}
    words = _WORD.findall(text)
    counts = collections.Counter(words)
    lower = {w: w.lower().replace("\u2019", "'") for w in counts}
    entities: set[str] = set()
    first = words[0] if words else None
    for w, low in lower.items():
        # A capitalised word that does not start the text, or an acronym: a name.
        if len(w) < 2 or (w == first and counts[w] == 1 and not w.isupper()):
            continue
        if (w[0].isupper() and low not in _STOP_INDEX) or w.isupper():
            entities.add(low.removesuffix("'s"))
    for sentence in _SENTENCE_END.split(text):
        found = _WORD.search(sentence)
        opener = found.group(0).lower().replace("\u2019", "'").removesuffix("'s") if found else ""
        if found and len(opener) > 1 and opener[0] != found.group(0)[0] and not _is_common(opener):
            # The first word of a sentence can be a name too ("Paris is ..."): keep it if
            # it is not a common sentence opener.
            entities.add(opener)
    quoted = frozenset(next(g for g in m if g) for m in _QUOTED.findall(text))
    code = frozenset(next(g for g in m if g) for m in _CODE.findall(text if "`" in text else chunks))
    distinct = set(lower.values())
    numbers = frozenset(digits | (distinct & _NUMBER_WORDS))
    negated = not distinct.isdisjoint(_NEGATIONS) or any(w.endswith("n't") or _negating_prefix(w) for w in distinct)
    actions = frozenset(_OPPOSED_FORMS[w] for w in distinct if w in _OPPOSED_FORMS)
    script, language = _language(text, counts, lower)
    operators = frozenset(_OPERATOR.findall(chunks)) if _MAY_COMPARE.search(chunks) else frozenset()
    order = [w for w in dict.fromkeys(lower.values()) if w in entities]  # `lower` is in order of first sight
    if len(digits) > 1:  # then the numbers, in their own order ("100 USD" and "USD 100" are one request)
        order += ["", *dict.fromkeys(_number(m) for m in _NUMBER.findall(text))]
    exact = (numbers, frozenset(entities), quoted, code, negated, actions, script, operators, order)
    return seal(exact, language, _pack_spans(words, lower, distinct), _shape(words, distinct))


def seal(exact: tuple[Any, ...], language: str | None, spans: bytes, shape: bytes) -> Guards:
    """The guards from what must be equal (sets, flags and sequences: their digest), the
    language, the packed spans and the shape."""
    canonical = orjson.dumps([sorted(x) if isinstance(x, frozenset) else x for x in exact])
    return Guards(hashlib.blake2b(canonical, digest_size=16).digest(), language, spans, shape)


def _is_common(word: str) -> bool:
    return word in _COMMON_OPENERS or word in _STOP_INDEX


_COMMON_OPENERS = frozenset(
    "what how why when where who which whom whose is are was were do does did can could would should will "
    "please tell give write explain describe list name show find help make create i my we our you your "
    "the a an in on at for of to from with by about if there this that these those it its hi hello hey "
    "summarize translate compare calculate define convert generate suggest recommend draft outline".split()
)
# Words around a connector that say nothing of what goes where ("the", "my", "how", "x"): the
# content words on each side are what must not change sides.
_FILLER = (frozenset(_STOP_INDEX) | _COMMON_OPENERS) - _CONNECTORS


def _language(text: str, counts: collections.Counter[str], lower: dict[str, str]) -> tuple[str, str | None]:
    """The prompt's script, and for Latin script a guess from common words, each word's vote
    split among the languages that share it (None when the evidence is thin or split)."""
    if text.isascii():
        script = "latin" if any(c.isalpha() for c in text) else "none"
    else:
        scripts: collections.Counter[str] = collections.Counter()
        for ch, n in collections.Counter(text).items():  # each distinct character once
            if ch.isalpha():
                scripts[_script(ch)] += n
        script = scripts.most_common(1)[0][0] if scripts else "none"
    if script == "none":
        return "none", None
    if script != "latin":
        return script, None
    # Votes in exact integer shares (a whole vote is _WHOLE_VOTE), so that no rounding of
    # 1/3 + 1/3 + ... decides a tie.
    votes: dict[str, int] = collections.defaultdict(int)
    for w, n in counts.items():
        langs = _STOP_INDEX.get(lower[w], ())
        for lang in langs:
            votes[lang] += n * (_WHOLE_VOTE // len(langs))
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])[:2]
    if not ranked or ranked[0][1] < 2 * _WHOLE_VOTE or (len(ranked) > 1 and ranked[1][1] * 2 > ranked[0][1]):
        return script, None
    return script, ranked[0][0]


@functools.lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI"):
        if name.startswith(script):
            return script.lower()
    return "latin" if "LATIN" in name else "other"


def split_last_user_turn(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The last user turn's text, and the body with it blanked out (the part that must match
    exactly); None when the request does not end in a plain-text user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return None  # images, audio, files: compared exactly only
        content = "\n".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str) or not content.strip():
        return None
    rest = dict(body)
    rest["messages"] = [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]
    return content, rest


def context_hash(rest: dict[str, Any], route: str, tenant: str) -> str:
    return cache_key(rest, route, tenant)


# Where the tokenizer's input splits into independent pieces: before each space that follows
# a character other than a space or "▁" (the normalizer turns spaces into "▁", and no token of the vocabulary has a
# "▁" after another character, so no token spans such a point: each piece tokenizes alone
# exactly as it does inside the whole text). Checked against the vocabulary at load.
_PIECES = re.compile(r"(?<=[^ \u2581]) ")
_PIECE_CACHE_MAX = 200_000  # distinct words: a few tens of MB at most, then it starts over
_PIECE_MAX_CHARS = 64


class Embedder:
    """Static word embeddings: the mean of the prompt's token vectors, normalised.

    The tokenizer runs its BPE over the whole text as one word (it has no pre-tokenizer),
    which takes about a millisecond for a 1,000-token turn; split into pieces at the points
    where no token can cross and with each piece's ids remembered, the same ids come out in
    a tenth of the time (repeated words are the rule in real prompts)."""

    def __init__(self) -> None:
        import numpy as np
        import wordllama
        from safetensors import safe_open
        from tokenizers import Tokenizer

        root = Path(wordllama.__file__).parent
        self._tok = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np", device="cpu") as f:
            self._table = f.get_tensor("embedding.weight").astype(np.float32)
        self._np = np
        vocab = self._tok.get_vocab()
        # Splitting is exact only if no token has "▁" after another character (see _PIECES).
        self._split = not any("\u2581" in t.lstrip("\u2581") for t in vocab)
        self._space = vocab.get("\u2581", 0)
        # A trailing space is a piece of its own, "▁", which an empty text does not encode to.
        self._pieces: dict[str, list[int]] = {"": [self._space]}

    def token_ids(self, text: str) -> list[int]:
        """The tokenizer's ids for `text` (without special tokens), piece by remembered piece."""
        if not self._split or not text:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        pieces = _PIECES.split(text)
        known = self._pieces
        new = [p for p in set(pieces) if p not in known]
        fresh = dict(zip(new, (e.ids for e in self._tok.encode_batch(new, add_special_tokens=False)), strict=True))
        out: list[int] = []
        for p in pieces:
            ids = known.get(p)
            out += fresh[p] if ids is None else ids
        if len(known) + len(fresh) > _PIECE_CACHE_MAX:
            known.clear()
            known[""] = [self._space]
        if len(fresh) < _PIECE_CACHE_MAX:
            # A long run without spaces (data, code) is rarely seen twice: not worth keeping.
            known.update((p, ids) for p, ids in fresh.items() if len(p) <= _PIECE_MAX_CHARS)
        return out

    def forget_pieces(self) -> None:
        """Drops the remembered pieces (benchmarks: a lookup of words never seen)."""
        self._pieces = {"": [self._space]}

    def embed(self, text: str) -> Any:
        ids = self.token_ids(text) or [0]
        v = self._table[ids].mean(axis=0)
        norm = float(self._np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def analyze(self, text: str) -> tuple[Any, Guards]:
        """The embedding and the guard signature of a last user turn (run off the event loop)."""
        return self.embed(text), guards(text)


@functools.cache
def builtin_embedder() -> Embedder:
    """Loaded once per process (about a second, 33 MB): at start when a route needs it."""
    return Embedder()


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str  # the exact key the stored answer lives under
    similarity: float
    tenant: str = ""  # whose share of the bounds it counts against (that of the request that stored it)


# A search looks at the nearest `_K` records first; while every one of them is at or above the
# threshold and none is of the asking context (other tenants' near twins), it looks again at
# four times as many, up to `_MAX_K`: a tenant's own hit is not hidden by others' entries.
_K = 8
_MAX_K = 512


class SemanticIndex:
    """Per route: an HNSW index of last-user-turn embeddings, each labelled with what a match
    must equal exactly (the context hash, the guards) and the exact key of its answer.

    Bounded by `max_entries`: past it, the oldest record of the tenant holding the most goes
    (with one tenant, the oldest), so that one busy tenant evicts its own records, not
    every other tenant's."""

    def __init__(self, max_entries: int, ndim: int = DIM) -> None:
        from usearch.index import Index

        self.ndim = ndim
        # Half-precision vectors: a quarter of float32's build time and half its memory, the
        # same neighbours at these dimensions (cosine over normalised vectors).
        self._index = Index(
            ndim=ndim, metric="cos", dtype="f16", connectivity=16, expansion_add=64, expansion_search=64
        )
        self._meta: dict[int, tuple[str, Guards, str, str]] = {}  # label -> (context, guards, exact key, tenant)
        self._orders: dict[str, collections.deque[int]] = {}  # per tenant, its labels oldest first
        # Tenants by how many records they hold, and the most any holds: the largest is found in O(1).
        self._by_count: dict[int, set[str]] = collections.defaultdict(set)
        self._top = 0
        self._next = 0
        self.max_entries = max_entries
        self._lock = threading.Lock()  # searched and written from the embedding thread and the loop

    def __len__(self) -> int:
        return len(self._meta)

    def memory_bytes(self) -> int:
        """The graph and vectors (usearch's own count); the labels' metadata comes on top."""
        return int(self._index.memory_usage)

    def held(self, tenant: str) -> int:
        """How many records `tenant` holds."""
        with self._lock:
            return len(self._orders.get(tenant, ()))

    def _counted(self, tenant: str, delta: int) -> None:
        order = self._orders[tenant]
        n = len(order)
        self._by_count[n - delta].discard(tenant)
        if n:
            self._by_count[n].add(tenant)
            self._top = max(self._top, n)
        else:
            del self._orders[tenant]
        while self._top and not self._by_count[self._top]:
            self._top -= 1

    def _append(self, label: int, context: str, g: Guards, key: str, tenant: str) -> None:
        self._meta[label] = (context, g, key, tenant)
        self._orders.setdefault(tenant, collections.deque()).append(label)
        self._counted(tenant, 1)

    def _evict(self, prefer: str) -> None:
        """Drops the oldest record of the tenant holding the most (`prefer` among equals)."""
        while len(self._meta) > self.max_entries:
            largest = self._by_count[self._top]
            tenant = prefer if prefer in largest else next(iter(largest))
            old = self._orders[tenant].popleft()
            self._counted(tenant, -1)
            self._meta.pop(old, None)
            self._index.remove(old)

    def add(self, vector: Any, context: str, g: Guards, key: str, tenant: str = "") -> None:
        with self._lock:
            label = self._next
            self._next += 1
            self._index.add(label, vector)
            self._append(label, context, g, key, tenant)
            self._evict(tenant)

    def remove_keys(self, keys: set[str]) -> int:
        """Drops the records of these exact keys (their answers are gone: a revoked key's); how many."""
        with self._lock:
            labels = [label for label, meta in self._meta.items() if meta[2] in keys]
            tenants = {self._meta[label][3] for label in labels}
            for label in labels:
                del self._meta[label]
                self._index.remove(label)
            dropped = set(labels)
            for tenant in tenants:
                before = len(self._orders[tenant])
                self._orders[tenant] = collections.deque(x for x in self._orders[tenant] if x not in dropped)
                self._counted(tenant, len(self._orders[tenant]) - before)
            return len(labels)

    def add_many(self, vectors: Any, context: str, g: Guards, keys: list[str], tenant: str = "") -> None:
        """Bulk load (benchmarks, warm starts): one batched insert into the graph."""
        import numpy as np

        with self._lock:
            labels = np.arange(self._next, self._next + len(keys), dtype=np.uint64)
            self._next += len(keys)
            self._index.add(labels, vectors)
            for label, key in zip(labels.tolist(), keys, strict=True):
                self._append(label, context, g, key, tenant)

    def search(self, vector: Any, context: str, g: Guards, threshold: float) -> list[Candidate]:
        with self._lock:
            k = _K
            while True:
                out, more = self._search(vector, context, g, threshold, k)
                if out or not more or k >= _MAX_K:
                    return out
                k *= 4

    def _search(self, vector: Any, context: str, g: Guards, threshold: float, k: int) -> tuple[list[Candidate], bool]:
        """The candidates among the `k` nearest, and whether nearer ones may lie beyond them
        (all `k` at or above the threshold)."""
        if not self._meta:
            return [], False
        matches = self._index.search(vector, min(k, len(self._meta)))
        out = []
        over = 0
        for label, distance in zip(matches.keys, matches.distances, strict=True):
            meta = self._meta.get(int(label))
            similarity = 1.0 - float(distance)
            over += similarity >= threshold
            if meta is None or similarity < threshold or meta[0] != context or not meta[1].compatible(g):
                continue
            out.append(Candidate(meta[2], similarity, meta[3]))
        return out, over == k and k < len(self._meta)
