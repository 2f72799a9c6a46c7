"""Secrets never leave: the one redaction layer every outbound text passes through.

Upstreams (and their proxies) quote the credentials they were sent in their error
messages; exception texts can carry a DSN; a malformed request's header line carries the
client's token. Rather than trusting each call site, the exits redact: error bodies
(`errors.error_body`), in-stream error events (`sse.error_event`), every log handler
edgeroute sets up (:func:`install_log_filter`), metric labels. Only error paths and log
lines pay for it; a successful answer is never scanned.

Two kinds of thing are replaced by :data:`MARKER`:

- every secret value edgeroute knows: each `env:`/`file:`/literal reference resolved by
  `secrets.resolve` registers its value here (provider keys, virtual-key tokens,
  `server.api_keys`, DSNs), and :func:`register_config` adds what the config holds as
  plain values (the Redis URL's password, a provider's credential headers, the credential
  parameters of its paths' queries). Each is registered URL-encoded too, as one secret for
  the bound on known values. Values shorter than :data:`MIN_SECRET_LEN` are not registered:
  they would blank ordinary words and cannot be secret anyway. A value that is no word (see
  `_anywhere`) is replaced wherever it occurs, glued to the upstream's own text too, in any
  case, inside a run of base64 or hex that decodes to text holding it, or to such a run
  (base64 twice), or holding its base64 re-cased (`_encoded`: only runs holding a fixed piece
  of its encoding are decoded), inside a run of percent-escapes however they are written
  (`_percent_runs`), and with invisible characters between its own (`_unhidden`); a word only
  as a whole token. Overlapping secrets go as one span (`_sub_all`);
- common credential shapes, whoever's they are: `sk-…`/`sk-ant-…` keys, `Bearer …`,
  edgeroute's managed keys (`er-…`), other platforms' prefixed tokens (`hf_`, `xai-`,
  `gsk_`, `xoxb-`, `sk_live_`, …), private key blocks, AWS access key ids, Google API
  keys, JWTs, `api-key=`/`x-api-key:`/`password=`-style pairs, `key=` URL parameters
  (Gemini), passwords in URLs.

What goes to a client (error bodies, in-stream error events) is also cleared of what is
not a credential but is nobody's business outside (:func:`outbound`): the addresses of the
upstreams edgeroute calls (each provider's `base_url`, its origin, host and port: an
internal vLLM's `http://10.1.2.3:9000/v1` quoted in its own error message), the shared
state's hosts, any address at an internal IP (private, loopback, link-local: a load
balancer quoting its backend) or `localhost`, and the provider account's organisation and
project ids (`org-…`, `proj_…`, as OpenAI's rate-limit messages name them). Logs keep them: an operator needs
to see which upstream failed.

The log filter also neutralises control characters (newlines, ANSI escapes) in the
values interpolated into a log line, so that a client-chosen string cannot forge a log
line or repaint a terminal (log injection).
"""

from __future__ import annotations

import binascii
import ipaddress
import json
import logging
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

from edgeroute import large_json

MARKER = "[REDACTED]"
MIN_SECRET_LEN = 8
_MAX_KNOWN = 4096  # a bound on what reloads can accumulate (rotated secrets stay secret)

# A query parameter's name that says it carries a credential (the words config versions mask by).
_QUERY_WORDS = ("key", "token", "auth", "pass", "pwd", "secret", "sig", "code", "credential", "session")
_QUERY_NAME = rf"[a-z0-9_.%\-]*?(?:{'|'.join(_QUERY_WORDS)})[a-z0-9_.%\-]*"
_QUERY_CREDENTIAL = re.compile(rf"(?i){_QUERY_NAME}")
# A header's name that says its value is a credential.
_HEADER_CREDENTIAL = re.compile(r"(?i)auth|key|token|secret|cookie|sig|pass|session|credential")
# A value at least this long with a digit, both cases or a sign in it is no word: it is
# replaced wherever it occurs, glued to other characters too (see `_anywhere`).
_ANYWHERE_LEN = 16
# The characters of keys and tokens (base64, URL-safe base64, hex, percent-escapes): a known
# value made of them lies inside one run of them in any text that holds it.
_KEY_CHARS = r"[A-Za-z0-9+/=_.~%\-]"
_RUN = re.compile(rf"{_KEY_CHARS}+")
_RUN_AT_LEAST = re.compile(rf"{_KEY_CHARS}{{{_ANYWHERE_LEN},}}")
# How far before a cut a known value's head is looked for (a longer value, a key file's PEM,
# keeps its first characters past this: its shape goes whole).
_PARTIAL_WINDOW = 512

# Credential shapes: (pattern, replacement, needles). Group 1 (when present) is kept, the
# rest replaced. A pattern runs only when one of its needles occurs in the lower-cased text:
# substring searches cost next to nothing, a regex scan of every position does not.
_SHAPES: list[tuple[re.Pattern[str], str, tuple[str, ...]]] = [
    # name=value / "name": "value" pairs, whatever the value looks like.
    (
        re.compile(
            r"""(?ix)
            ((?:x-)?api[-_]?key|x-goog-api-key|access[-_]?token|refresh[-_]?token|secret(?:[-_]?access)?[-_]?key
              |(?:x-amz-)?security[-_]?token|session[-_]?token
              |client[-_]?secret|password|passwd|authorization|proxy-authorization
              |subscription[-_]?key|(?:x-)?(?:vault|auth)[-_]?token|helicone-auth)
            ("?'?\s*[:=]\s*"?'?)
            (?:(?:bearer|basic|token)\s+)?
            (?:\[REDACTED\]|[^\s"'&,;}\]]+)"""
        ),
        r"\1\2" + MARKER,
        # `api` alone occurs by chance in a third of 66 KB base64 answers: this pattern's scan of
        # one costs 40 ms (its first characters are no literal), so the needles are its names.
        ("apikey", "api-key", "api_key", "token", "secret", "passw", "authorization", "subscription", "helicone-auth"),
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}"), r"\1 " + MARKER, ("bearer", "basic")),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-*]{8,}"), MARKER, ("sk-",)),
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b"), MARKER, ("akia", "asia", "aida", "aroa")),
    # An AWS secret access key has no shape of its own (40 characters of base64); next to an
    # access key id or the word AWS, a 40-character run of them is taken for one.
    (
        re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
        MARKER,
        ("akia", "asia", "aws"),
    ),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"), MARKER, ("aiza",)),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), MARKER, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]*"), MARKER, ("eyj",)),
    # edgeroute's own managed keys (`er-<id>.<secret>`): only their hashes are known here.
    (re.compile(r"\ber-k[0-9a-f]{6,}\.[A-Za-z0-9_\-]{16,}"), MARKER, ("er-k",)),
    # Other providers' and platforms' prefixed tokens (Hugging Face, xAI, Groq, Perplexity,
    # Replicate, Slack, Stripe secret and restricted keys, GitHub fine-grained, GitLab, npm,
    # HashiCorp Vault's service, batch and recovery tokens).
    (
        re.compile(
            r"""\b(?:hf_[A-Za-z0-9]{30,}|xai-[A-Za-z0-9]{20,}|gsk_[A-Za-z0-9]{20,}|pplx-[A-Za-z0-9]{20,}
            |r8_[A-Za-z0-9]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,}|[sr]k_(?:live|test)_[A-Za-z0-9]{10,}
            |github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_\-]{20,}|npm_[A-Za-z0-9]{30,}|hv[sbr]\.[A-Za-z0-9_\-]{20,})""",
            re.X,
        ),
        MARKER,
        (
            "hf_",
            "xai-",
            "gsk_",
            "pplx-",
            "r8_",
            "xox",
            "k_live_",
            "k_test_",
            "github_pat_",
            "glpat-",
            "npm_",
            "hvs.",
            "hvb.",
            "hvr.",
        ),
    ),
    # A private key block; one cut short (a truncated log) is replaced to its end.
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
        MARKER,
        ("private key-----",),
    ),
    # Query parameters that carry keys, anywhere in a URL or a path: by a name holding a
    # credential's word, as config versions mask them (Gemini's `?key=`, Azure Functions'
    # `?code=`, API Management's `?subscription-key=`, a presigned URL's `X-Amz-Signature=`).
    (
        re.compile(rf"(?i)([?&]{_QUERY_NAME}=)[^&\s\"'#]+"),
        r"\1" + MARKER,
        _QUERY_WORDS,
    ),
    # user:password@ in any URL (DSNs, Redis URLs, proxies).
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@\"']*:)[^@\s/\"']+@"), r"\1" + MARKER + "@", ("://",)),
]


def _anywhere(value: str) -> bool:
    """Whether a known value is replaced wherever it occurs, not only as a whole token. An
    upstream quotes a key glued to its own text (`token<key>was`, `key_<key>`, `x-<key>`);
    a value that is a word (letters only, or short: a test database's password `edgeroute`)
    must not blank the names it is part of (`x-edgeroute-tags`), a long one with digits,
    both cases or signs is part of no name."""
    if len(value) < _ANYWHERE_LEN:
        return False
    return not (value.islower() or value.isupper()) or any(not (c.isalpha() or c in "-_. ") for c in value)


class _Matchers:
    """The patterns over a snapshot of the known forms (values that are no words, inside runs of
    key characters or anywhere; words as whole tokens; the pieces of their encodings; their
    heads for `cut`). Compiling them is `re` parsing a trie of every form: 2 ms with 20
    secrets, about a second with 4,096, so `_Known` builds them in a thread and swaps them in
    whole; never changed once made.

    Forms that are no words match in any case (an upstream upper- or lower-casing what it
    quotes, hex in capitals): runs of key characters are ASCII, so a run lower-cased keeps its
    length and a match in it is a match in the run. A word matches in its own case only (below
    :data:`_ANYWHERE_LEN` and letters only, "edgeroute" must not blank "Edgeroute")."""

    def __init__(self, forms: Iterable[str], anywhere: bool) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        values = sorted(set(forms), key=len, reverse=True)
        self.sorted = sorted({v.lower() for v in values})  # for prefix look-ups (`cut`)
        self.needles = _Needles(values, compiled=True)  # pieces of the values' encodings (`_encoded`)
        self.longest = min(len(values[0]), _PARTIAL_WINDOW) if values else 0
        no_words = [v for v in values if anywhere and _anywhere(v)]
        words = [v for v in values if not (anywhere and _anywhere(v))]
        # A value that is no word is looked for inside the runs of key characters that can
        # hold it (`_RUN`), not at every position of the text: the trie's first branching
        # tried at each character of a message cost a plain message 3 times as much.
        runs = list(dict.fromkeys(v.lower() for v in no_words if _RUN.fullmatch(v)))
        others = [v for v in no_words if not _RUN.fullmatch(v)]  # URLs, DSNs: anywhere in the text
        self.runs = re.compile(_alternatives(runs)) if runs else None  # over lower-cased runs
        # Case-folding in the pattern costs a scan of every position its literal prefix search;
        # ASCII text (the rule) is lower-cased instead, keeping its length and the spans.
        lowered = list(dict.fromkeys(v.lower() for v in others))
        self.others = re.compile(_alternatives(lowered)) if others else None  # over lower-cased ASCII
        self.others_i = re.compile(_alternatives(others), re.IGNORECASE) if others else None  # other text
        # Whole tokens only for words: a secret that is also a word ("edgeroute" as a test
        # database's password) is replaced where it stands alone (quoted, in a URL, after
        # "key:"), not inside a longer name ("x-edgeroute-tags").
        caseless = [v for v in words if _caseless(v)]
        exact = [v for v in words if not _caseless(v)]
        either = [f"(?i:{_alternatives(caseless)})"] if caseless else []
        either += [_alternatives(exact)] if exact else []
        self.regex = re.compile(rf"(?<![\w-])(?:{'|'.join(either)})(?![\w-])") if words else None
        # `regex` without its lookbehind, in two: the words matched in any case lower-cased (for
        # lower-cased text) and the others. Its lookbehind and case-folding, tried at every
        # position, cost 3 times the search of these, whose literal prefixes the search skips to:
        # a message holding none of the words (the rule) pays these two searches.
        lower = list(dict.fromkeys(v.lower() for v in caseless))
        self.quick = (
            re.compile(rf"(?:{_alternatives(lower)})(?![\w-])") if lower else None,
            re.compile(rf"(?:{_alternatives(exact)})(?![\w-])") if exact else None,
        )

    def spans(self, s: str) -> list[tuple[int, int]]:
        """Where the forms that are no words occur in `s`, each occurrence, overlapping ones too
        (`_all_spans`)."""
        runs, others = self.runs, self.others
        found: list[tuple[int, int]] = []
        if others is not None:
            found += _all_spans(others, s.lower()) if s.isascii() else _all_spans(self.others_i, s)  # type: ignore[arg-type]
        if runs is not None:
            for m in _RUN_AT_LEAST.finditer(s):
                at = m.start()
                found += [(at + i, at + j) for i, j in _all_spans(runs, m.group().lower())]
        return found

    def word_spans(self, s: str) -> list[tuple[int, int]]:
        """Where the words occur in `s` as whole tokens (looked for once the others are
        replaced: a word glued to one of them stands alone beside its marker)."""
        words = self._words_in(s)
        return [] if words is None else _all_spans(words, s)

    def _words_in(self, s: str) -> re.Pattern[str] | None:
        caseless, exact = self.quick
        if (caseless is not None and caseless.search(s.lower())) or (exact is not None and exact.search(s)):
            return self.regex
        return None

    def found_in(self, s: str) -> bool:
        runs, others = self.runs, self.others
        if runs is not None and any(runs.search(m.group().lower()) for m in _RUN_AT_LEAST.finditer(s)):
            return True
        if others is not None and others.search(s.lower()):
            return True
        words = self._words_in(s)
        return words is not None and words.search(s) is not None

    def sub(self, s: str) -> str:
        return _sub_all(s, self)


class _Gap:
    """The forms registered since the matchers in use were built, looked for as plain strings:
    nothing to compile, so a secret a rotation adds is replaced from the first text on while a
    thread builds the matchers that will hold it. Found as the matchers find them (no words
    anywhere in any case, words as whole tokens; the pieces of their encodings); a plain
    string search per form is cheap for the few a change adds. Its spans and the matchers'
    are replaced together (`_Known.sub`): an old form holding a new one, or overlapping it,
    goes whole as the matchers built over both will replace it."""

    def __init__(self, forms: Iterable[str], anywhere: bool) -> None:
        values = sorted(set(forms), key=len, reverse=True)
        self.sorted = sorted({v.lower() for v in values})
        self.longest = min(len(values[0]), _PARTIAL_WINDOW) if values else 0
        self.no_words = list(dict.fromkeys(v.lower() for v in values if anywhere and _anywhere(v)))
        words = [v for v in values if not (anywhere and _anywhere(v))]
        self.caseless = list(dict.fromkeys(v.lower() for v in words if _caseless(v)))
        self.exact = [v for v in words if not _caseless(v)]
        self.needles = _Needles(values, compiled=False)

    def __bool__(self) -> bool:
        return bool(self.sorted)

    def sub(self, s: str) -> str:
        return _sub_all(s, self)

    def spans(self, s: str) -> list[tuple[int, int]]:
        return _spans_in(s, self.no_words, whole=False) if self else []

    def word_spans(self, s: str) -> list[tuple[int, int]]:
        return _spans_in(s, self.caseless, whole=True) + _spans(s, self.exact, whole=True) if self else []

    def found_in(self, s: str) -> bool:
        return bool(self.spans(s) or self.word_spans(s))


def _sub_all(s: str, *finders: _Matchers | _Gap) -> str:
    """`s` with what `finders` find replaced by :data:`MARKER`: every occurrence of each, all
    the finders' together, overlapping ones as one span; the values that are no words first,
    then the words (whole tokens once a marker stands beside them). Replaced one after another,
    a secret holding another, or overlapping it (the end of one the start of the other), lost
    the shared characters to the first and the rest of it was left in clear."""
    s = _replaced(s, [span for f in finders for span in f.spans(s)])
    return _replaced(s, [span for f in finders for span in f.word_spans(s)])


def _spans(s: str, values: list[str], whole: bool) -> list[tuple[int, int]]:
    """Where each of `values` occurs in `s` (as a whole token where `whole`)."""
    found = []
    for v in values:
        i = s.find(v)
        while i != -1:
            end = i + len(v)
            if not whole or not (_word_char(s, i - 1) or _word_char(s, end)):
                found.append((i, end))
            i = s.find(v, i + 1)
    return found


def _spans_in(s: str, lowered: list[str], whole: bool) -> list[tuple[int, int]]:
    """`_spans` of lower-case `lowered` in any case: in `s` lower-cased where that keeps its
    length (ASCII, nearly all text), else by case-folding patterns (`re` caches them)."""
    if not lowered:
        return []
    low = s.lower()
    if len(low) == len(s):
        return _spans(low, lowered, whole)
    edge = (r"(?<![\w-])", r"(?![\w-])") if whole else ("", "")
    return [m.span() for v in lowered for m in re.finditer(edge[0] + re.escape(v) + edge[1], s, re.IGNORECASE)]


def _word_char(s: str, i: int) -> bool:
    """Whether `s[i]` is part of a token (`\\w` or `-`, as the matchers' lookarounds say)."""
    return 0 <= i < len(s) and (s[i].isalnum() or s[i] in "_-")


def _replaced(s: str, spans: list[tuple[int, int]]) -> str:
    """`s` with `spans` replaced by :data:`MARKER`, one marker for spans that overlap (two
    secrets sharing characters go as one) and one for each that merely touch another."""
    if not spans:
        return s
    out, at = [], 0
    for start, end in sorted(spans):
        if start >= at:
            out += [s[at:start], MARKER]
        at = max(at, end)
    out.append(s[at:])
    return "".join(out)


def _all_spans(pattern: re.Pattern[str], s: str) -> list[tuple[int, int]]:
    """Where `pattern` matches in `s` from each position it can start at, not only after the
    previous match's end: a secret that begins inside another's match (their overlap) is found
    whole. A text holding none pays one search."""
    found = []
    m = pattern.search(s)
    while m is not None:
        found.append(m.span())
        m = pattern.search(s, m.start() + 1)
    return found


class _Known:
    """The registered secrets, each with its forms (the value stripped, URL-encoded, the password
    of a URL), and what finds them: the matchers built over the forms known when they were
    built (`_Matchers`), and the forms registered since, found as plain strings (`_Gap`) until
    a thread has built matchers holding them and swapped them in. Building the matchers on the
    caller's thread held the event loop about a second once per change with 4,096 secrets (a
    process that had rotated thousands of keys); a new secret is never in neither. The pair is
    one attribute, replaced whole: a reader never sees new matchers with the old gap's forms
    already dropped.

    The bound counts secrets: a secret's forms are kept and dropped with it, so registering a
    form more does not shorten how many rotated secrets are remembered."""

    def __init__(self, min_len: int = MIN_SECRET_LEN, anywhere: bool = False) -> None:
        self._min_len = min_len
        self._anywhere = anywhere  # whether values that are no words match inside other text
        # secret -> its forms; insertion-ordered, the oldest first
        self._values: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._generation = 0  # of changes: a build holds the forms known at one
        self._built = 0  # the change the matchers in use hold the forms of
        self._pending: dict[str, int] = {}  # a form not in the matchers -> the change that added it
        self._state = (_Matchers((), anywhere), _Gap((), anywhere))
        self._stale = False  # forms pending that the gap does not hold yet
        self._building = False
        _ALL_KNOWN.add(self)

    def add(self, value: str, *forms: str) -> None:
        """Registers `value` with `forms` of it: one secret for the bound, whatever its forms."""
        with self._lock:
            if value in self._values:
                # Seen again (a live secret re-registered): the youngest, last to be evicted.
                self._values[value] = self._values.pop(value)
                return
            kept = tuple(f for f in dict.fromkeys((value, *forms)) if len(f) >= self._min_len)
            if not kept:
                return
            self._values[value] = kept
            while len(self._values) > _MAX_KNOWN:
                del self._values[next(iter(self._values))]  # still matched until the next build
            self._generation += 1
            for f in kept:
                self._pending[f] = self._generation
            self._stale = True

    def current(self) -> tuple[_Matchers, _Gap]:
        """The matchers and the gap, one consistent pair; starts a build when forms are pending."""
        if self._stale:
            with self._lock:
                if self._stale:
                    self._stale = False
                    self._state = (self._state[0], _Gap(self._pending, self._anywhere))
                    self._build_later()
        return self._state

    def _build_later(self) -> None:  # under the lock
        if self._building or not self._pending:
            return
        self._building = True
        secrets = list(self._values.values())  # flattened in the thread: 16,000 forms cost the loop 1 ms
        threading.Thread(
            target=self._build, args=(secrets, self._generation), name="edgeroute-redact-build", daemon=True
        ).start()

    def _build(self, secrets: list[tuple[str, ...]], generation: int) -> None:
        forms = [f for kept in secrets for f in kept]
        try:
            # Parsing a trie of 4,096 secrets makes some 300,000 containers: collections they
            # trigger held the GIL, so the loop, 80-110 ms at a time.
            with large_json.collector_paused():
                matchers = _Matchers(forms, self._anywhere)
        except BaseException:
            with self._lock:  # the gap keeps finding what is pending; the next change tries again
                self._building = False
            raise
        with self._lock:
            self._swap(matchers, generation)
            self._building = False
            self._build_later()  # what was registered meanwhile

    def _swap(self, matchers: _Matchers, generation: int) -> None:  # under the lock
        if generation < self._built:
            return  # a build older than one swapped in meanwhile (`settle`): what it lacks is no longer pending
        self._built = generation
        self._pending = {f: g for f, g in self._pending.items() if g > generation}
        self._state = (matchers, _Gap(self._pending, self._anywhere))
        self._stale = False

    def settle(self) -> None:
        """Builds the matchers over the forms known now on this thread (tests, benchmarks)."""
        with self._lock:
            forms, generation = [f for kept in self._values.values() for f in kept], self._generation
        matchers = _Matchers(forms, self._anywhere)
        with self._lock:
            self._swap(matchers, generation)

    @property
    def building(self) -> bool:
        """Whether a thread is building the matchers (tests wait on it)."""
        return self._building

    def _after_fork(self) -> None:
        # A build thread does not survive a fork, and its lock may have been held: start afresh.
        self._lock = threading.Lock()
        self._building = False
        self._stale = bool(self._pending)

    def sub(self, s: str) -> str:
        """`s` with every known value replaced by :data:`MARKER`, the gap's and the matchers'
        together (`_sub_all`): a new secret holding or overlapping an old one goes whole, as the
        matchers built over both will replace it."""
        matchers, gap = self.current()
        return _sub_all(s, gap, matchers)

    def found_in(self, s: str) -> bool:
        """Whether a known value occurs in `s` (decoded bytes: anywhere, in any case)."""
        matchers, gap = self.current()
        return matchers.found_in(s) or gap.found_in(s)

    def encoded_in(self, s: str) -> bool:
        """Whether `s` holds a piece of a known value's base64 (once or twice) or hex in any
        case (`_needles`)."""
        matchers, gap = self.current()
        # A needle (no space in it) lies inside one word at least as long: the few such words of
        # prose are searched, not every position of it (a fourth of the cost for 64 KB of text).
        words = " ".join([w for w in s.split() if len(w) >= _NEEDLE_LEN])
        return bool(words) and (matchers.needles.found_in(words) or gap.needles.found_in(words))

    def recased_in(self, run: str) -> bool:
        """Whether `run` holds a whole piece of a known value's base64 in another case."""
        matchers, gap = self.current()
        low = run.lower().translate(_URLSAFE)
        return matchers.needles.recased_in(low) or gap.needles.recased_in(low)

    def partial_at(self, s: str, at: int) -> int:
        """Where a known value begins that `s[:at]` ends inside (at least :data:`MIN_SECRET_LEN`
        of it kept), or `at`: cutting there leaves no known secret's head behind."""
        matchers, gap = self.current()
        longest = max(matchers.longest, gap.longest)
        for j in range(max(0, at - longest + 1), at - MIN_SECRET_LEN + 1):
            tail = s[j:at].lower()
            if _starts(matchers.sorted, tail) or _starts(gap.sorted, tail):
                return j
        return at


_ALL_KNOWN: weakref.WeakSet[_Known] = weakref.WeakSet()  # to start afresh in a forked child


def _after_fork() -> None:
    for known in _ALL_KNOWN:
        known._after_fork()


os.register_at_fork(after_in_child=_after_fork)


def _starts(values: list[str], head: str) -> bool:
    """Whether one of sorted `values` starts with `head`."""
    i = bisect_left(values, head)
    return i < len(values) and values[i].startswith(head)


def _caseless(value: str) -> bool:
    """Whether a value matched as a whole token matches in any case too: long, or not letters
    only. A short word ("edgeroute", a test database's password) in its own case only."""
    return len(value) >= _ANYWHERE_LEN or not value.isalpha()


# Runs that may be a known value encoded: base64 (standard and URL-safe, its padding) and hex.
# An upstream quoting an `Authorization: Basic` header it was sent, or a key it logged as bytes,
# writes the key this way, inside an encoding of more than the key (`user:key`): decoding the
# run finds it at any of base64's alignments, registering encoded forms would not (and would
# multiply the values known). The shortest such run holds a value of `MIN_SECRET_LEN` bytes.
_BASE64_RUN = re.compile(rf"[A-Za-z0-9+/_\-]{{{MIN_SECRET_LEN * 4 // 3},}}=*")
_HEX_RUN = re.compile(rf"[0-9A-Fa-f]{{{MIN_SECRET_LEN * 2},}}")
_URLSAFE = str.maketrans("-_", "+/")
_TO_URLSAFE = str.maketrans("+/", "-_")
# Characters of a secret's encoding looked for before any run is decoded (see `_needles`).
_NEEDLE_LEN = 12
_NEEDLE_RUN = re.compile(rf"[A-Za-z0-9+/_\-]{{{_NEEDLE_LEN},}}")


def _pieces(raw: bytes) -> list[str]:
    """The base64 of `raw` at each of its 3 alignments, whole groups only: base64 writes 3 bytes
    as 4 characters, so whatever bytes come before a value (`user:`), the groups wholly inside
    it are written the same at one of the 3 alignments (from its byte 0, 1 or 2)."""
    return [binascii.b2a_base64(raw[k:][: (len(raw) - k) // 3 * 3], newline=False).decode() for k in range(3)]


def _needles(form: str) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """The fixed pieces of `form`'s encodings, one of which any run holding `form` encoded
    contains: its base64 (at each alignment; of `form` upper- and lower-cased too, as a client
    or upstream may re-case a key before encoding it) and the base64 of that base64 (a debug
    token or trace blob holding a `Basic` header); its hex (lower-case, in any alignment). The
    first :data:`_NEEDLE_LEN` characters of each suffice to find the runs to decode
    (`_encoded`). Also the whole pieces of its base64, lower-cased, by their needle: an
    upstream that upper- or lower-cases its message after encoding leaves no decodable run,
    but one holding a whole piece in another case (`recased_in`). A non-ASCII value's encoding
    is of its UTF-8 (a Basic-auth password, RFC 7617)."""
    b64: list[str] = []
    hexes: list[str] = []
    whole: dict[str, list[str]] = {}
    raw = form.encode("utf-8", "surrogatepass")
    for cased in dict.fromkeys((raw, form.upper().encode("utf-8", "surrogatepass"), raw.lower())):
        b64 += [p for p in _pieces(cased) if p]
        hexes.append(cased.hex()[:_NEEDLE_LEN])
    for piece in _pieces(raw):
        if len(piece) >= _NEEDLE_LEN:
            whole.setdefault(piece[:_NEEDLE_LEN].lower(), []).append(piece.lower())
            b64 += [p for p in _pieces(piece.encode()) if len(p) >= _NEEDLE_LEN]  # base64 twice
    return [p[:_NEEDLE_LEN] for p in b64], hexes, whole


class _Needles:
    """The pieces of a set of forms' encodings (`_needles`): patterns for the matchers (built in
    a thread), plain substring searches for a gap's few forms (nothing to compile on the
    caller's thread). Base64 is looked for in its own case (lower-cased, a base64 text's
    letters match twice as often: searching it cost 1.6 times as much), and lower-cased only
    in the words that are all one case (an upper-cased message)."""

    def __init__(self, forms: Iterable[str], compiled: bool) -> None:
        b64: set[str] = set()
        hexes: set[str] = set()
        self._whole: dict[str, list[str]] = {}
        for form in forms:
            found, its_hex, whole = _needles(form)
            b64.update(found)
            hexes.update(its_hex)
            for needle, pieces in whole.items():
                self._whole.setdefault(needle, []).extend(pieces)
        self._plain = (sorted(b64), sorted(hexes))
        self._patterns: list[re.Pattern[str]] = []
        self._recased: re.Pattern[str] | None = None
        if compiled:
            self._plain = ([], [])
            self._patterns = _needle_patterns(list(b64), list(hexes))
            self._recased = re.compile(_alternatives(sorted(self._whole))) if self._whole else None

    def found_in(self, words: str) -> bool:
        """Whether `words` (the long words of a text) hold a needle, or a word all of one case
        a whole piece's needle in any case."""
        b64, hexes = self._plain
        if self._patterns:
            if any(p.search(words) for p in self._patterns):
                return True
        elif b64 or hexes:
            standard, low = words.translate(_URLSAFE), words.lower()
            if any(n in standard for n in b64) or any(h in low for h in hexes):
                return True
        if not self._whole:
            return False
        runs = _NEEDLE_RUN.findall(words)  # the base64 in a word (`"…","type":` is no one case)
        single = " ".join(r for r in runs if r.isupper() or r.islower()).lower().translate(_URLSAFE)
        if self._recased is not None:
            return self._recased.search(single) is not None
        return any(n in single for n in self._whole)

    def recased_in(self, low: str) -> bool:
        """Whether `low` (a run lower-cased, URL-safe base64 as standard) holds a whole piece."""
        if self._recased is not None:
            starts = [i for i, _ in _all_spans(self._recased, low)]
        else:
            starts = [i for i, _ in _spans(low, list(self._whole), whole=False)]
        return any(low.startswith(p, i) for i in starts for p in self._whole.get(low[i : i + _NEEDLE_LEN], ()))


def _needle_patterns(b64: list[str], hexes: list[str]) -> list[re.Pattern[str]]:
    """Patterns for the pieces: URL-safe base64 where base64 has `+` and `/`, hex in any case;
    each a character class in the trie rather than the pieces written twice (a rebuild with
    4,096 secrets compiles a trie of them). Two patterns: one alternation of both tries is
    searched 3 times slower than each (its first characters are no longer one set)."""
    out = []
    if b64:  # the trie's literals escape `+` as `\\+`; `/` is not escaped
        trie = _alternatives(sorted(b64, key=len, reverse=True))
        out.append(re.compile(trie.replace("\\+", "[+\\-]").replace("/", "[/_]")))
    if hexes:  # the trie of lower-case hex holds no other letters than a-f
        out.append(re.compile(re.sub("[a-f]", lambda m: f"[{m.group()}{m.group().upper()}]", _alternatives(hexes))))
    return out


def _decodings(run: str) -> list[bytes]:
    """What `run` decodes to as base64 from each of its first four characters (a word glued
    before it, `token<base64>`, shifts its groups), and as hex from each of its first two."""
    out = []
    if len(run) >= 2 * MIN_SECRET_LEN:
        for hexes in _HEX_RUN.findall(run):
            out += [bytes.fromhex(hexes[at : len(hexes) - (len(hexes) - at) % 2]) for at in (0, 1)]
    data = run.rstrip("=").translate(_URLSAFE)
    n = len(data)
    for at in range(4):  # padding past what the data needs is ignored; a lone last character is no byte
        out.append(binascii.a2b_base64(data[at : n - ((n - at) % 4 == 1)] + "=="))
    return out


def _encoded(known: _Known, s: str) -> str:
    """`s` with each run of base64 or hex that decodes to text holding a known value replaced
    whole (the `user:` of a Basic pair with the key: it is part of the credential). Only the
    runs holding a piece of a known value's encoding (`_needles`, one search of `s`) are
    decoded: decoding every run at its 4 alignments made a 66 KB base64 embeddings answer
    cost 5 times as much to redact. A value is looked for encoded as registered
    (its URL-encodings too) and upper- or lower-cased, not otherwise re-cased. A block of
    MIME's lines is decoded joined (`_MIME_BLOCK`)."""
    if "\n" in s or "\x1c" in s:  # lines (`_credentials` reads an escaped `\\n` as `\\` and \x1c)
        s = _MIME_BLOCK.sub(lambda m: MARKER if _holds(known, _LINE_BREAK.sub("", m.group())) else m.group(), s)
    if not known.encoded_in(s):
        return s
    found = set()
    for m in _BASE64_RUN.finditer(s):
        run = m.group()
        if not (run.isalpha() and run.islower()) and _holds(known, run):
            found.add(run)
    if not found:
        return s
    return _BASE64_RUN.sub(lambda m: MARKER if m.group() in found else m.group(), s)


def _holds(known: _Known, run: str, twice: bool = True) -> bool:
    """Whether `run` (base64 or hex) decodes to text holding a known value: read a character a
    byte (latin-1), then as UTF-8 for a non-ASCII value (only a run holding a piece of a known
    value's encoding is decoded at all); or holds a whole piece of one's base64 in another case
    (the upstream upper- or lower-cased its message); or, base64 of base64, decodes to a run
    that does."""
    if not known.encoded_in(run):
        return False
    decoded = b"\0".join(_decodings(run)).decode("latin-1")
    if known.found_in(decoded) or known.recased_in(run):
        return True
    if not decoded.isascii() and known.found_in(decoded.encode("latin-1").decode("utf-8", "replace")):
        return True
    return twice and any(_holds(known, m.group(), twice=False) for m in _BASE64_RUN.finditer(decoded))


# MIME base64 (e-mail, PEM, Python's `base64.encodebytes`) breaks its lines every 76 (or 64)
# characters: a key's encoding across a break was in no run whole. A block of such lines is
# decoded joined. The break as written, escaped in JSON, or as `_credentials` reads an escape.
_LINE_BREAK = re.compile(r"\r?\n|\\r\\n|\\n|\\\x1d\\\x1c|\\\x1c")
_B64_CHAR = r"[A-Za-z0-9+/_\-]"
# From a run's start only, and possessive: tried inside a 1 MB run of letters, a line's `{16,}`
# gave back a character at a time looking for a break (minutes for an upstream's error event).
_MIME_BLOCK = re.compile(rf"(?<!{_B64_CHAR}){_B64_CHAR}{{16,}}+(?:(?:{_LINE_BREAK.pattern}){_B64_CHAR}++)++=*+")
# Any run of base64 or hex, or block of its lines (where `cut` falls).
_BLOB = re.compile(rf"{_B64_CHAR}++(?:(?:{_LINE_BREAK.pattern}){_B64_CHAR}++)*+=*+")


def _before_encoded(s: str, at: int) -> int:
    """`at`, or the start of the run of base64 or hex (or block of its lines) it falls inside
    when that holds a known value: cut there, the head kept would hold a piece of its encoding
    that no later redaction recognises."""
    for m in _BLOB.finditer(s, max(0, at - 2 * MAX_MESSAGE)):
        if m.start() >= at:
            break
        if m.end() > at:
            return m.start() if _holds(_KNOWN, _LINE_BREAK.sub("", m.group())) else at
    return at


_END = ""  # a trie node's key for "a value ends here"
_TRIE_DEPTH = 200  # branch points along one value (recursion): past it, the plain alternation


def _alternatives(values: list[str]) -> str:
    """A regex matching any of `values` (longest first), as a trie: `re` tries a plain
    alternation's values one after another at every position of a text, so with 4,096
    registered (a test process, or many rotated keys) a short error message took 1 ms to
    redact; branching on each next character, the work is about the text's length."""
    trie: dict[str, Any] = {}
    for v in values:
        node = trie
        for ch in v:
            node = node.setdefault(ch, {})
        node[_END] = None
    try:
        return _node_pattern(trie, 0)
    except RecursionError:  # a chain of values each a prefix of the next, past the depth bound
        return "|".join(map(re.escape, values))
    finally:
        _dismantle(trie)


def _dismantle(trie: dict[str, Any]) -> None:
    """Frees `trie` a node at a time: dropped whole, its tens of thousands of nodes (4,096
    secrets) are freed in one call holding the GIL, 30 ms the event loop waits for even though
    the patterns are built in a thread."""
    nodes = [trie]
    while nodes:
        node = nodes.pop()
        nodes += [child for child in node.values() if child]
        node.clear()


def _node_pattern(node: dict[str, Any], depth: int) -> str:
    if depth > _TRIE_DEPTH:
        raise RecursionError
    branches = []
    for ch, child in node.items():
        if ch == _END:
            continue
        run = ch  # a run of single-child nodes is one literal
        while len(child) == 1 and _END not in child:
            ((nxt, child),) = child.items()
            run += nxt
        branches.append(re.escape(run) + _node_pattern(child, depth + 1))
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if _END in node:  # a value ends here; a longer one goes on: greedy `?` tries the longer first
        return f"(?:{body})?" if branches else ""
    return body


_KNOWN = _Known(anywhere=True)
# The upstreams' addresses: a host name may be short ("vllm:8000"), a word it may not be.
_ENDPOINTS = _Known(min_len=4)
# Provider account ids, in what a client is sent only (see the module's docstring).
_ACCOUNT_IDS = re.compile(r"\b(?:org-[A-Za-z0-9]{12,}|proj_[A-Za-z0-9]{12,})\b")
# An address that names an IP or `localhost`, with its scheme, port and path when it has
# them: kept from clients when the IP is internal (`_internal`), whoever's it is (a provider's
# load balancer quoting its backend, `http://10.0.0.5:8443/internal`).
_ADDRESS = re.compile(
    r"""(?ix)
    (?:\b[a-z][a-z0-9+.\-]*://(?:[^\s/@"'<>]*@)?)?
    (\[[0-9a-z:.%]+\]|(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\w)|\blocalhost\b|(?<![\w:.])::1(?![\w:]))
    (?::\d{1,5})?
    (?:/[^\s"'<>)\],;]*)?"""
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: internal, not `is_private` before 3.12


def _internal(host: str) -> bool:
    """Whether `host` (an IP, bracketed or not, or `localhost`) is no public address."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_reserved or ip in _CGNAT


# What any address `_ADDRESS` takes holds (an IPv4's dots, a bracketed host, `::1`; or
# `localhost`): searched first, since `_ADDRESS` tried at every word of a message is half the
# cost of an ordinary error's redaction (250 of 410 µs for 2 KB of words on a loaded machine).
_MAYBE_ADDRESS = re.compile(r"\d\.\d|\[[0-9A-Za-z:.%]+\]|::1")


def _internal_addresses(s: str) -> str:
    if _MAYBE_ADDRESS.search(s) is None and "localhost" not in s.lower():
        return s

    def hide(m: re.Match[str]) -> str:
        if not _internal(m.group(1)):
            return m.group()
        return MARKER + "." if m.group().endswith(".") else MARKER  # a sentence's full stop stays

    return _ADDRESS.sub(hide, s)


def known_changes() -> tuple[int, int, int]:
    """A value that changes whenever the known secrets or endpoints do (and in a forked child):
    a name redacted under one value reads the same until it changes, so callers may keep it."""
    return (os.getpid(), _KNOWN._generation, _ENDPOINTS._generation)


def _quote_all(v: str) -> str:
    return quote(v, safe="")


def register(value: str) -> None:
    """Marks `value` (and the password inside it, when it is a URL) as a secret."""
    if not value:
        return
    forms = [value.strip()]
    if "://" in value and "@" in value:
        try:
            password = urlsplit(value.strip()).password
        except ValueError:
            password = None
        if password:
            forms += [password, unquote(password)]
    # As an upstream quoting a URL or a form it was sent writes it (`+` as `%2B`, `/` as `%2F`).
    # Other cases, base64 and hex are found as they are matched (see `_Known`, `_encoded`): one
    # secret for the bound on known values, however many forms it has.
    _KNOWN.add(value, *forms, *(q(v) for v in (value, value.strip()) for q in (_quote_all, quote, quote_plus)))


def register_config(cfg: Any) -> None:
    """Registers the secrets a config holds as plain values rather than references, and the
    addresses of the upstreams and stores it names (kept from clients, see :func:`outbound`):
    the Redis URL, a provider's credential headers (`x-api-key`, `Authorization`, a gateway's
    `Ocp-Apim-Subscription-Key`; sent as written, never resolved as references) and the
    credential parameters in the query of its URLs and paths (`?code=`, `?subscription-key=`)."""
    shared = getattr(cfg, "shared_state", None)
    url = getattr(shared, "redis_url", None)
    found: list[str] = []
    if isinstance(url, str):
        found.append(url)
        register_endpoint(url)
    for provider in (getattr(cfg, "providers", None) or {}).values():
        base = getattr(provider, "base_url", None)
        if isinstance(base, str):
            register_endpoint(base)
        for name, v in (getattr(provider, "headers", None) or {}).items():
            if isinstance(v, str):
                found += header_secrets(name, v)
        check = getattr(provider, "health_check", None)
        paths = [base, getattr(check, "path", None), *(getattr(provider, "options", None) or {}).values()]
        found += [v for path in paths if isinstance(path, str) for v in query_secrets(path)]
    for v in found:
        register(v)
    _config_secrets[:] = found  # the running config's: kept current with the resolved ones


def header_secrets(name: str, v: str) -> list[str]:
    """A header's value when its name says it is a credential, and the token after an auth
    scheme (`Bearer <token>`) in any header."""
    found = [v] if _HEADER_CREDENTIAL.search(name) else []
    scheme, _, token = v.strip().partition(" ")
    if scheme.lower() in ("bearer", "basic", "token", "apikey", "key") and token.strip():
        found.append(token.strip())
    return found


def query_secrets(url: str) -> list[str]:
    """The values of a URL's or path's credential parameters (`?key=`, `?code=`,
    `&subscription-key=`, `X-Amz-Signature=`), as written and unquoted."""
    if "?" not in url:
        return []
    query = url.split("?", 1)[1].split("#", 1)[0]
    found = []
    for raw in query.split("&"):
        name, eq, v = raw.partition("=")
        if eq and v and _QUERY_CREDENTIAL.fullmatch(name):
            found += [v, unquote(v)]
    return found


_config_secrets: list[str] = []  # what the last `register_config` found


def keep_current(values: Iterable[str]) -> None:
    """Registers `values` (the secrets in use) and the running config's plain ones again: the
    youngest, so the bound on known values drops superseded (rotated) ones first."""
    for v in [*values, *_config_secrets]:
        register(v)


def register_endpoint(url: str) -> None:
    """Marks an upstream's or store's address as kept from clients: the URL as written, its
    origin (`scheme://host:port`), `host:port`, and the host when it has a dot (an IP or a
    domain: a bare name such as `vllm` could be an ordinary word)."""
    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host:
        return
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never the credentials: those are secrets already
    forms = [f"{parts.scheme}://{netloc}"]
    if port is not None:
        forms.append(netloc)
    if "." in host or ":" in host:
        forms.append(host)
    _ENDPOINTS.add(f"{parts.scheme}://{netloc}{parts.path}", *forms)  # one address for the bound


# A JSON string's escapes that may stand for a key's own characters: `\/` (PHP and others
# escape every slash) and `\u00XX` of a printable character. Raw JSON is redacted as text (an
# upstream's error event relayed, a response the request log stores): `Zq8v\/wK3` matched no
# known `Zq8v/wK3`, and the client's JSON parser put the key back together. An escaped
# backslash is consumed first, so that `\\/` stays a backslash and a slash.
_JSON_ESCAPE = re.compile(r"\\(?:\\|/|u00([2-7][0-9A-Fa-f]))")


def _unescaped(m: re.Match[str]) -> str:
    if m.group(1) is None:
        return "/" if m.group() == "\\/" else m.group()
    c = chr(int(m.group(1), 16))
    return m.group() if c in '"\\\x7f' else c  # JSON's own quote and backslash stay escaped


# An escape (`\n`, `\t`, ...) written before a credential glues its letter to it: `\nsk-…` has
# no word boundary before `sk-`, `\nBearer …` none before `Bearer`, and a log line's values
# are written with such escapes (`printable`). While the text is redacted each escape's letter
# is a whitespace control character that text never holds, written back after.
_ESCAPE_LETTER = re.compile(r"\\(?:\\|([nrtbf]))")
_AS_SPACE = {"n": "\x1c", "r": "\x1d", "t": "\x1e", "f": "\x1f", "b": "\x85"}
_SPACE_ESCAPE = re.compile(r"\\?([\x1c-\x1f\x85])")
_AS_ESCAPE = {v: "\\" + k for k, v in _AS_SPACE.items()}


# Characters that show nothing (zero-width, soft hyphen, BOM, bidi controls), raw or as a log
# line's escape (`printable`), between two of a key's characters: written there they hide it from
# every match, and a reader's copy of the text gives the key back without them. Elsewhere (an
# emoji's joiner, a word break in Thai) they are no key's. Each searched alone: a character
# class and a literal prefix the search skips to (one pattern of both, with its lookarounds,
# was tried at every position: 70 µs for a 2 KB message holding an emoji's joiner).
_INVISIBLE_CHAR = re.compile(r"[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_INVISIBLE_ESCAPE = re.compile(
    r"\\(?:x[aA][dD]|u(?:061[cC]|180[eE]|200[b-fB-F]|202[a-eA-E]|206[0-46-9]|[fF][eE][fF][fF]))"
)
_KEY_CHAR_SET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_.~%-")


def _unhidden(s: str) -> str | None:
    """`s` without the invisible characters it has between two of a key's characters, or None
    when it has none there (`isascii` is O(1): ASCII text without a backslash pays nothing)."""
    hits = [m.span() for m in _INVISIBLE_CHAR.finditer(s)] if not s.isascii() else []
    if "\\" in s:
        hits += [m.span() for m in _INVISIBLE_ESCAPE.finditer(s)]
    if not hits:
        return None
    runs: list[tuple[int, int]] = []  # hits that follow each other, as one
    for start, end in sorted(hits):
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    keys = _KEY_CHAR_SET
    drop = [(a, b) for a, b in runs if a > 0 and b < len(s) and s[a - 1] in keys and s[b] in keys]
    if not drop:
        return None
    out, at = [], 0
    for start, end in drop:
        out.append(s[at:start])
        at = end
    out.append(s[at:])
    return "".join(out)


def _credentials(s: str) -> str:
    """`s` with every known secret and credential shape replaced by :data:`MARKER`, as written;
    a text whose secret invisible characters hide is written without them."""
    bare = _unhidden(s)
    if bare is not None:
        masked = _credentials(bare)
        if masked != bare:
            return masked
    if "\\/" in s or "\\u00" in s:  # a substring test on the common path
        s = _JSON_ESCAPE.sub(_unescaped, s)
    spaced = "\\" in s and not _SPACE_ESCAPE.search(s)
    if spaced:
        s = _ESCAPE_LETTER.sub(lambda m: m.group() if m.group(1) is None else "\\" + _AS_SPACE[m.group(1)], s)
    if "%" in s and _PERCENT_ESCAPE.search(s):  # a substring test on the common path
        s = _percent_runs(s)
    s = _masked(s)
    # An escape's backslash a replacement took leaves its letter: written whole again.
    return _SPACE_ESCAPE.sub(lambda m: _AS_ESCAPE[m.group(1)], s) if spaced else s


def _masked(s: str) -> str:
    """`s` with every known secret (as written or encoded) and credential shape replaced."""
    s = _KNOWN.sub(_encoded(_KNOWN, s))
    low = s.lower()
    for pattern, repl, needles in _SHAPES:
        if any(n in low for n in needles):
            s = pattern.sub(repl, s)
    return s


# A key percent-encoded otherwise than `register`'s forms write it: a sign no encoder of the
# key's own escapes (`sk%2Dlive%2D…`), every byte escaped, lower-case hex, a URL encoded twice
# (`%252B`). A run of key characters holding an escape is read decoded (once and twice), all
# such runs masked together in one pass (as `_literals` masks JSON strings); a run is written
# back decoded and masked only when a mask changed it, else kept as spelled.
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# From a run's start (the lookbehind) to its first escape, then to its end: linear in the text.
_PERCENT_RUN = re.compile(rf"(?<!{_KEY_CHARS}){_KEY_CHARS}*?%[0-9A-Fa-f]{{2}}{_KEY_CHARS}*+")


def _percent_runs(s: str) -> str:
    runs = [(m.start(), m.end()) for m in _PERCENT_RUN.finditer(s)]
    if not runs:
        return s
    # Decoded all at once, joined (no escape crosses a joint; a decoded NUL cannot make one).
    once = _unquoted(_JOIN.join(s[start:end] for start, end in runs))
    readings = once.split(_JOIN)
    if _PERCENT_ESCAPE.search(once):  # `%25`: encoded twice
        readings += _unquoted(once).split(_JOIN)
    joined = _JOIN.join(readings)
    masked = _masked(joined)  # one pass for every run
    if masked == joined:
        return s
    parts = masked.split(_JOIN)
    if len(parts) != len(readings):  # a mask took a joint: each alone
        parts = [_masked(r) for r in readings]
    written: dict[int, str] = {}
    for i, (reading, part) in enumerate(zip(readings, parts, strict=True)):
        if part != reading:
            written.setdefault(i % len(runs), part)
    out: list[str] = []
    at = 0
    for k, part in sorted(written.items()):
        start, end = runs[k]
        out += (s[at:start], part)
        at = end
    out.append(s[at:])
    return "".join(out)


_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _unquoted(s: str) -> str:
    """`s` with its percent-escapes decoded (UTF-8; a NUL read as U+FFFD): `urllib`'s `unquote`
    took 0.6 s for a run of 350,000 escapes, a `bytes.fromhex` a group of them takes 5 ms."""
    return _ESCAPES.sub(_decoded_escapes, s)


def _decoded_escapes(m: re.Match[str]) -> str:
    return bytes.fromhex(m.group().replace("%", "")).decode("utf-8", "replace").replace("\x00", "\ufffd")


# A JSON string literal, or one a cut left open at the end. Never across a raw newline, which
# JSON cannot hold: in plain text (a stream's answer) quotes on different lines pair as no literal.
_LITERAL = re.compile(r'"((?:[^"\\\n]|\\[^\n])*+)("|\\?\Z)')  # possessive: one pass however it ends
_CUT_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{0,3})?\Z")  # an escape a cut split, dropped


def text(s: str, also: Callable[[str], str] | None = None) -> str:
    """`s` with every known secret and credential shape replaced by :data:`MARKER` (and `also`
    applied: the request log's PII markers) as it reads, whatever it is: an upstream's raw JSON
    body, a message quoting one, a log line. Each JSON string with an escape in it is decoded,
    masked and written back (still JSON), since its raw spelling hides what it holds: in
    `"key:\\nsk-…"` the escape's `n` glues to the key, `\\u0073k-…` is no `sk-` and `\\"api_key\\":`
    no pair until decoded. Then the whole text is masked as written (what is outside strings,
    or no JSON at all: escapes still count as the spaces they stand for)."""
    if not s:
        return s
    if "\\" in s:  # a substring test on the common path
        s = _literals(s, also)
    s = _credentials(s)
    return also(s) if also is not None else s


# The decoded strings are masked together, joined by a line that no secret nor credential shape
# crosses: one pass for the text, not one a string (an upstream's 1 MiB error event of 150,000
# escaped strings took the event loop 4 s one string at a time).
_JOIN = "\n\x00\n"
# An escape that is not JSON's, in a string's body.
_NOT_JSON_ESCAPE = re.compile(r'(?<!\\)(?:\\\\)*+\\(?:[^"\\/bfnrtu]|u(?![0-9a-fA-F]{4}))')


def _literals(s: str, also: Callable[[str], str] | None) -> str:
    """`s` with each JSON string that holds an escape decoded, masked and written back."""
    spans: list[tuple[int, int, bool]] = []  # (start, end, closed)
    bodies: list[str] = []
    for m in _LITERAL.finditer(s):
        inner = m.group(1)
        if "\\" not in inner:
            continue  # reads as written: the whole text's pass sees it
        closed = m.group(2) == '"'
        body = inner if closed else _CUT_ESCAPE.sub("", inner)
        if _NOT_JSON_ESCAPE.search(body) is not None:
            continue  # not a JSON string (quotes in plain text): masked as written
        spans.append((m.start(), m.end(), closed))
        bodies.append(body)
    if not bodies:
        return s
    # All decoded in one call (raw control characters read as written, not refused).
    strings: list[str] = json.loads('["' + '","'.join(bodies) + '"]', strict=False)
    found = [(start, end, _maskable(d), closed) for (start, end, closed), d in zip(spans, strings, strict=True)]
    joined = _JOIN.join(f[2] for f in found)
    masked = text(joined, also)  # JSON inside JSON: decoded again
    if masked == joined:
        return s  # each kept as it was spelled
    parts = masked.split(_JOIN)
    if len(parts) != len(found):  # a mask took a joint: each string alone
        parts = [text(f[2], also) for f in found]
    out: list[str] = []
    at = 0
    for (start, end, decoded, closed), part in zip(found, parts, strict=True):
        if part != decoded:
            written = json.dumps(part, ensure_ascii=False)
            out += (s[at:start], written if closed else written[:-1])
            at = end
    out.append(s[at:])
    return "".join(out)


def _maskable(decoded: str) -> str:
    """A decoded string as it is masked: a lone surrogate (`\\ud800`, valid JSON) cannot cross
    into the core, and a NUL would let a string hold the joint: both read as U+FFFD (a string
    is written back only when a mask changed it)."""
    if decoded.isascii():
        return decoded.replace("\x00", "\ufffd") if "\x00" in decoded else decoded
    return decoded.encode("utf-8", "surrogatepass").decode("utf-8", "replace").replace("\x00", "\ufffd")


MAX_MESSAGE = 4096  # characters of an error message kept (`message`)
_SEPARATOR = re.compile(r"[\s\"'`,;:=&]")


def cut(s: str, limit: int) -> str:
    """`s` cut to about `limit` characters, before the word that straddles the limit and before
    any known secret it cuts into: half a secret left at the end would no longer match its
    pattern, so it goes whole."""
    if len(s) <= limit:
        return s
    head = s[:limit]
    ends = [m.start() for m in _SEPARATOR.finditer(head, max(0, limit - 256))]
    at = ends[-1] if ends else limit
    # A known secret glued to the text before it has no separator to cut at: never keep its head.
    at = _before_encoded(s, _KNOWN.partial_at(s, at))
    return f"{head[:at]} …[{len(s) - at} characters cut]"


def outbound(s: str) -> str:
    """`s` as a client may see it: :func:`text`, then the upstreams' addresses and the
    provider accounts' ids replaced by :data:`MARKER` as well."""
    s = text(s)
    if not s:
        return s
    s = _ENDPOINTS.sub(s)
    if "org-" in s or "proj_" in s:
        s = _ACCOUNT_IDS.sub(MARKER, s)
    return _internal_addresses(s)


def message(s: str) -> str:
    """An error message as it may leave for a client: cut to :data:`MAX_MESSAGE`, then
    redacted (:func:`outbound`). A client can make a message huge (an unknown model named
    with megabytes), and redacting megabytes would hold the event loop for seconds: every
    other request would wait."""
    return outbound(cut(s, MAX_MESSAGE))


def value(v: Any) -> Any:
    """Redacts every string inside a JSON-like value (dicts, lists), returning a copy."""
    if isinstance(v, str):
        return message(v)
    if isinstance(v, dict):
        return {k: value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [value(x) for x in v]
    return v


def contains_secret(s: str) -> bool:
    """Whether redaction would change `s` (for tests and assertions)."""
    return text(s) != s


# -- logs ------------------------------------------------------------------------------------

# C0 and C1 controls, line and paragraph separators, the bidi overrides and isolates (which make
# a terminal show text in another order than it is: "Trojan source"), the bidi marks (U+200E,
# U+200F, U+061C) and the invisible characters (soft hyphen, zero-width space, word joiner and
# invisible operators, BOM, U+180E). Zero-width (non-)joiners are kept: scripts and emoji use them.
_INVISIBLE = r"\u00ad\u061c\u180e\u200b\u200e\u200f\u2060-\u2064\ufeff"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069" + _INVISIBLE + r"]|\n")


def printable(s: str) -> str:
    """Control characters as visible escapes: one event stays one line, no terminal codes
    (for anything that writes client-chosen text to a log or a terminal)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), s)


# What JSON leaves raw that a terminal acts on: C1 controls (U+009B is CSI to a terminal
# honouring 8-bit controls), line separators and bidi controls. In a JSON string a `\u`
# escape is the same value; JSON's structure is ASCII, so only strings hold these.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069" + _INVISIBLE + "]")


def json_printable(encoded: str) -> str:
    """A JSON document (orjson's output) with those characters as `\\u` escapes, for a terminal."""
    if encoded.isascii():  # the common case, O(1) for a str
        return encoded
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)


def _safe_arg(a: Any) -> Any:
    if isinstance(a, str):
        return printable(a)
    if isinstance(a, bytes):
        return printable(a.decode("utf-8", "backslashreplace"))
    return a


_exc_formatter = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts a record in place (message, exception text, stack) before any handler formats it.

    Values interpolated into the message (`log.info("... %s", value)`) have their control
    characters escaped; the message template itself is the program's and kept as is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_edgeroute_redacted", False):
            return True
        args = record.args
        if args:
            if isinstance(args, dict):
                record.args = {k: _safe_arg(v) for k, v in args.items()}
            else:
                record.args = tuple(_safe_arg(a) for a in args)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        record.msg = text(cut(message, 16 * MAX_MESSAGE))  # a line, not a megabyte to redact on the loop
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _exc_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = text(record.exc_text)
            record.exc_info = None  # formatters then print the redacted text, never re-format the exception
        if record.stack_info:
            record.stack_info = text(record.stack_info)
        record._edgeroute_redacted = True
        return True


_FILTER = RedactingFilter()


def install_log_filter(handler: logging.Handler) -> None:
    """Installs the redacting filter on `handler` (idempotent). Every handler edgeroute
    creates must get one: a filter on a logger does not see records propagated to it."""
    if _FILTER not in handler.filters:
        handler.addFilter(_FILTER)


def install_on(handlers: Iterable[logging.Handler]) -> None:
    for h in handlers:
        install_log_filter(h)
