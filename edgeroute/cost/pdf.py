"""The pages of a base64 PDF, read from its bytes (a budget's reservation, `count_tokens`).

A PDF's pages are its page objects (the name `/Page`) and its page tree's `/Count`; the more
of the two is taken. What a PDF reader reads, this reads too, or reserves the most:
- base64 broken into lines (as `base64` and MIME write it) is read whole;
- a name spelt with `#` escapes (`/P#61ge` is `/Page`) is the name;
- pages kept in compressed object streams (`/Type /ObjStm`, PDF 1.5: most writers' default)
  are inflated and read; one that cannot be (another filter, inflating past `_INFLATE_MOST` or
  `_INFLATE_RATIO` times the PDF's size, cut short) makes the PDF `MOST_PAGES` pages.

The base64 is decoded a block at a time: each call holds the GIL a few milliseconds only.
"""

from __future__ import annotations

import binascii
import re
import zlib

MOST_PAGES = 1_000  # more than any provider reads: a `/Count` beyond is no real page tree
BLOCK = 1 << 20  # base64 characters decoded at a time
_OVERLAP = 64  # the longest match searched for, in bytes
_DICT_MOST = 2048  # an object stream's dictionary, from its `/Type` to its `stream` keyword
_CARRY_MOST = 4 << 20  # an object stream's compressed bytes kept while its end is not read yet
_INFLATE_MOST = 4 << 20  # what a PDF's object streams may inflate to, all together (~5 ms)
# and at most this many times its own size (objects' dictionaries deflate 3 to 8 times): forty
# small PDFs of a request read on the loop inflated 4 MiB each (350 ms).
_INFLATE_RATIO = 16
_STREAMS_MOST = 1_000  # object streams read in a PDF (a writer puts 100 to 200 objects in each)


def _name(word: str) -> bytes:
    """A regex for the PDF name `/word` after its `/`, each character as itself or its `#` escape."""
    return "".join(f"(?:{c}|#{ord(c):02x}|#{ord(c):02X})" for c in word).encode()


_ENDS = rb"(?=[\s()<>\[\]{}/%]|\Z)"  # a name ends at whitespace or a delimiter
# One search for them all (a third of the time of three): a page, a count, an object stream,
# a page tree node's kids (a page without `/Type`, its tree's count given by reference, is
# read by PDF readers: its parent's `/Kids` names it).
_NAMES = re.compile(
    rb"/(?:("
    + _name("Page")
    + _ENDS
    + rb")|"
    + _name("Count")
    + rb"\s+(\d{1,9})|("
    + _name("ObjStm")
    + _ENDS
    + rb")|"
    + _name("Kids")
    + rb"\s*(\[|\d))"
)
_REFERENCE = re.compile(rb"\d+\s+\d+\s+R")
_STREAM = re.compile(rb"stream\r?\n")
# Decoding parameters (a PNG predictor: its rows differenced) in an object stream's dictionary:
# what inflates is no text to read, and no writer puts them there.
_PARAMETERS = re.compile(
    rb"/(?:" + _name("DecodeParms") + rb"|" + _name("DP") + rb"|" + _name("Predictor") + rb")" + _ENDS
)


def _inflate(block: bytes, at: int, most: int) -> tuple[zlib._Decompress, bytes]:
    """Inflates the stream at `block[at:]`, given up to its `endstream` first (the rest of the
    block, copied by zlib when it ends, would make many small streams cost their bytes each)."""
    view = memoryview(block)
    stop = block.find(b"endstream", at)
    if stop >= 0:
        z = zlib.decompressobj()
        out = z.decompress(view[at:stop], most)
        if z.eof or z.unconsumed_tail:
            return z, out
    z = zlib.decompressobj()  # no end, or its compressed bytes spell `endstream`
    return z, z.decompress(view[at:], most)


class _Scan:
    """Page objects, counts and object streams in a PDF's bytes given a block at a time."""

    def __init__(self, inflate_most: int) -> None:
        self.inflate_most = inflate_most  # what its object streams may inflate to, all together
        self.kept = b""  # the end of the last block, searched again with the next
        self.base = 0  # the offset of `kept` in the PDF
        self.searched = 0  # the offset up to which pages and counts were searched
        self.streamed = 0  # the offset up to which object streams were read
        self.objects = self.count = self.kids = self.inflated = self.streams = 0
        self.unreadable = False

    def feed(self, data: bytes, last: bool) -> None:
        block = self.kept + data
        end = len(block) if last else max(len(block) - _OVERLAP, 0)
        streams = self._search(block, self.searched - self.base, self.streamed - self.base, end)
        self.searched = self.base + end
        keep = self._streams(block, streams, end, last)
        if len(block) - keep > _CARRY_MOST:
            self.unreadable = True
        self.kept, self.base = block[keep:], self.base + keep

    def _search(self, block: bytes, pages: int, streams: int, end: int) -> list[re.Match[bytes]]:
        """Counts the page objects and counts in `block[pages:end]`; the object streams that
        begin in `block[streams:end]`."""
        found = []
        for m in _NAMES.finditer(block, min(pages, streams)):
            if m.start() >= end:
                break
            if m[3] is not None or m[4] is not None:
                if m.start() >= streams:
                    found.append(m)
            elif m.start() < pages:
                continue
            elif m[1] is not None:
                self.objects += 1
            else:
                self.count = max(self.count, int(m[2]))
        return found

    def _streams(self, block: bytes, streams: list[re.Match[bytes]], end: int, last: bool) -> int:
        """Reads the object streams `streams`; where to keep the block from."""
        for m in streams:
            if m[4] is not None:  # a page tree node's kids
                if m[4] != b"[":  # an array given by reference: not read here
                    self.unreadable = True
                    continue
                close = block.find(b"]", m.end())
                if close < 0 and not last:
                    return self._wait(m.start(), m.start(), end)
                self.kids += len(_REFERENCE.findall(block, m.end(), close)) if close >= 0 else 0
                continue
            opened = _STREAM.search(block, m.end(), m.end() + _DICT_MOST + 8)
            begun = block.rfind(b"obj", max(m.start() - _DICT_MOST, 0), m.start())  # its dictionary
            begun = begun if begun >= 0 else max(m.start() - _DICT_MOST, 0)
            if opened is None:
                if last or len(block) >= m.end() + _DICT_MOST + 8:
                    self.unreadable = True
                    continue
                return self._wait(m.start(), begun, end)
            if _PARAMETERS.search(block, begun, opened.start()):
                self.unreadable = True
                continue
            self.streams += 1
            if self.streams > _STREAMS_MOST or self.inflated >= self.inflate_most:
                self.unreadable = True
                break
            try:
                z, out = _inflate(block, opened.end(), self.inflate_most - self.inflated)
            except zlib.error:
                # An unfiltered one is plain text, searched already; any other filter is unread.
                self.unreadable |= b"/Filter" in block[begun : opened.start()]
                continue
            if z.eof:
                self.inflated += len(out)
                for k in self._search(out, 0, len(out), len(out)):
                    close = out.find(b"]", k.end()) if k[4] == b"[" else -1
                    self.unreadable |= k[4] is not None and close < 0  # kids by reference, or no end
                    self.kids += len(_REFERENCE.findall(out, k.end(), close)) if close >= 0 else 0
            elif z.unconsumed_tail or last:  # inflating past the limit, or cut short
                self.unreadable = True
            else:
                self.streams -= 1  # read again with the next block
                return self._wait(m.start(), begun, end)
        self.streamed = self.base + end
        return max(end - _DICT_MOST, 0)  # the dictionary of an object stream the next block begins

    def _wait(self, at: int, keep: int, end: int) -> int:
        """What begins at `at` (its dictionary at `keep`) goes on in the next block: read again
        from there."""
        self.streamed = self.base + at
        return min(keep, end)

    def pages(self, unreadable: int | None) -> int | None:
        if self.unreadable:
            return unreadable
        pages = max(self.objects, self.count, self.kids)
        return min(pages, MOST_PAGES) if pages else None


def pages(data: str, unreadable: int | None = MOST_PAGES) -> int | None:
    """The pages of a PDF given as base64 (`data`), when its bytes show them; None when they do
    not (not base64, no page objects or count: not a PDF). One whose object streams cannot be
    read is `unreadable` pages: the most for a reservation, None (not counted) for an estimate."""
    scan = _Scan(min(_INFLATE_MOST, _INFLATE_RATIO * len(data) * 3 // 4))
    pending = ""  # characters of a quad a block's end cut
    for at in range(0, len(data), BLOCK):
        last = at + BLOCK >= len(data)
        got = _decode(pending + data[at : at + BLOCK], last)
        if got is None:
            return None
        block, pending = got
        scan.feed(block, last)
        if scan.unreadable:
            break
    return scan.pages(unreadable)


def _decode(chars: str, last: bool) -> tuple[bytes, str] | None:
    """The bytes of `chars`' whole quads, and the characters left for the next block's; None
    when they are not base64. Spaces and line breaks are no data (a strict decode first: a
    search for them costs a fifth of decoding)."""
    try:
        return _quads(chars, last, strict=True)
    except (binascii.Error, ValueError):
        pass
    words = chars.split()
    try:
        return _quads("".join(words), last, strict=False)
    except (binascii.Error, ValueError):
        return None


def _quads(chars: str, last: bool, strict: bool) -> tuple[bytes, str]:
    whole = len(chars) if last else len(chars) - len(chars) % 4
    # Padding before the end: a decoder stops there or refuses it, and this one stops.
    if chars.find("=", 0, whole - 2 if last else whole) >= 0:
        raise ValueError("padding before the end")
    return binascii.a2b_base64(chars[:whole], strict_mode=strict), chars[whole:]
