"""The names managed keys were given (`keys create --name`), read from the governance table
of the ledger's database, for the views that list keys by id: spend by key, the request log
and its stats by key. A managed key's id (`k230dcccb1b60`) says nothing to an operator; a
config key's id is its name already. Whoever may read those views may read the names: they
show nothing past what `/admin/spend?by=key` shows the same roles.

A name is shown beside the key's id in every view (`k2af… (name)`): `refusal` keeps out what
would make it lie there (redU L7): controls (a newline, ESC), format and bidi characters (a
U+202E reverses the label's text), an empty name, and a config key's id or a managed key's
id-like name (`root`, passing for the root key at a glance), compared as it looks (`_skeleton`:
`Root`, `root ` with a trailing space or a joiner, Cyrillic `r\u043e\u043et` are `root` too, red10 F7).
Any other Unicode text is a name.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from typing import Any, Protocol

import orjson

# Controls, format (bidi embeddings, overrides and isolates; invisible marks), line and paragraph
# separators, surrogates. ZWJ and ZWNJ are kept: emoji sequences and several scripts' words need them.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_JOINERS = frozenset({"\u200c", "\u200d"})
_KEY_ID = re.compile(r"k[0-9a-f]{12}")  # a managed key's id (`keys.create`), as `_skeleton` writes it
# Default-ignorable code points that are no format character (refused already): the joiners
# (kept in names), combining grapheme joiner, Hangul fillers, Mongolian and other variation selectors.
_IGNORABLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]"
)
# Cyrillic and Greek letters drawn like Latin ones (each case as its Latin case: Cyrillic capital
# en is `H`, its small letter is no `h`), and the digits' lookalikes toward the digits (so that a managed
# key's id is still its own skeleton): a small table of UTS #39's confusables for the letters of
# key ids.
_LOOKALIKES = str.maketrans(
    "АВЕКМНОРСТХЅІЈҮаеорсухѕіјһԁԛԝӏкΑΒΕΖΗΙΚΜΝΟΡΤΥΧοινυαρκχ",
    "ABEKMHOPCTXSIJYaeopcyxsijhdqwlkABEZHIKMNOPTYXoivuapkx",
)
_DIGITS = str.maketrans("oil", "011")


class Readable(Protocol):
    dialect: str

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]: ...


def key_names(db: Readable, ids: list[str]) -> dict[str, str]:
    """The names of those of `ids` that are named managed keys; none without managed keys."""
    exists = (
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'gov_keys'"
        if db.dialect == "sqlite"
        else "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'gov_keys' AND schemaname = current_schema()"
    )
    ids = sorted(set(ids))
    if not ids or not db.query(exists, [])[0][0]:
        return {}
    rows = db.query(f"SELECT id, data FROM gov_keys WHERE id IN ({', '.join('?' * len(ids))})", ids)
    names = {str(i): orjson.loads(d).get("name") for i, d in rows}
    return {i: n for i, n in names.items() if isinstance(n, str)}


def refusal(name: str, reserved: Collection[str]) -> str | None:
    """Why `name` cannot name a managed key (None: it can); `reserved`: the config keys' ids."""
    if not name.strip():
        return "must not be empty"
    for i, c in enumerate(name):
        if unicodedata.category(c) in _REFUSED_CATEGORIES and c not in _JOINERS:
            return f"must not contain control, format or bidi characters (U+{ord(c):04X} at {i})"
    seen = _skeleton(name)
    if _KEY_ID.fullmatch(seen) or seen in {_skeleton(r) for r in reserved}:
        return "must not be a key's id (it would pass for that key in every view)"
    return None


def _skeleton(name: str) -> str:
    """`name` as it looks: compatibility forms as the plain ones (NFKC: fullwidth, mathematical
    letters), without the invisible code points and the spaces around it, lookalike letters as
    the Latin ones, in one case, `o`/`i`/`l` as the digits they pass for."""
    plain = _IGNORABLE.sub("", unicodedata.normalize("NFKC", name)).strip()
    return plain.translate(_LOOKALIKES).casefold().translate(_DIGITS)
