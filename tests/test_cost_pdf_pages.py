"""A PDF's pages as budgets reserve them and `count_tokens` counts them (`cost.pdf`). A PDF
whose pages were not seen was reserved at 50,000 tokens, whatever its pages: a hundred-page PDF
(Anthropic bills ~4,600 tokens a page) passed a budget that held a fifth of it. Three ways a
PDF hid its pages that any PDF reader reads: its base64 broken into lines (as `base64` and MIME
write it), its names spelt with `#` escapes (`/P#61ge`), its pages in compressed object streams
(PDF 1.5: qpdf's, Acrobat's, pdfTeX's default)."""

from __future__ import annotations

import base64
import struct
import textwrap
import threading
import zlib
from pathlib import Path
from typing import Any

import anthropic
import pytest

from edgeroute.cost import media, pdf
from tests.providers_fixtures import start_mock
from tests.test_anthropic_documents import budget_config
from tests.test_budget_media_parts import APP, _spent
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

URL = "data:application/pdf;base64,"


def plain(pages: int, escaped: bool = False) -> bytes:
    """A PDF of `pages` empty pages, its page objects in the open (`escaped`: names spelt with `#`)."""
    page, count = ("/P#61ge", "/C#6Funt") if escaped else ("/Page", "/Count")
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objs = [
        "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
        f"2 0 obj << /Type /Pages /Kids [{kids}] {count} {pages} >> endobj",
        *(f"{3 + i} 0 obj << /Type {page} /Parent 2 0 R >> endobj" for i in range(pages)),
    ]
    return ("%PDF-1.4\n" + "\n".join(objs) + "\n%%EOF\n").encode()


def object_streams(pages: int, filler: int = 0, per_stream: int = 400) -> bytes:
    """A PDF 1.5 whose catalog, page tree and pages are all in compressed object streams, found
    by a compressed cross-reference stream (as `qpdf --object-streams=generate` writes it);
    `filler` bytes of an image before them."""
    dicts = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>"]
    dicts[1] %= (" ".join(f"{3 + i} 0 R" for i in range(pages)).encode(), pages)
    dicts += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>" for _ in range(pages)]
    out = b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n"
    image = bytes(range(256)) * (filler // 256 + 1)  # no `/` then a letter in it
    first = len(dicts) + 1  # the object streams' numbers, then the image's, then the xref's
    streams = range(0, len(dicts), per_stream)
    xref = [b"\x00\x00\x00\x00\x00\xff\xff"]  # object 0
    xref += [
        struct.pack(">BIH", 2, first + at // per_stream, i - at)
        for at in streams
        for i in range(at, min(at + per_stream, len(dicts)))
    ]
    image_at, xref_number = first + len(streams), first + len(streams) + 1
    if filler:
        xref.append(struct.pack(">BIH", 1, len(out), 0))
        out += b"%d 0 obj << /Length %d /Filter /DCTDecode >>\nstream\n%s\nendstream endobj\n" % (
            image_at,
            filler,
            image[:filler],
        )
    for s, at in enumerate(streams):
        chunk = dicts[at : at + per_stream]
        offsets, body = [], b""
        for i, d in enumerate(chunk):
            offsets.append(b"%d %d" % (1 + at + i, len(body)))
            body += d + b"\n"
        head = b" ".join(offsets) + b"\n"
        data = zlib.compress(head + body)
        xref.insert(len(dicts) + 1 + s, struct.pack(">BIH", 1, len(out), 0))
        out += b"%d 0 obj << /Type /ObjStm /N %d /First %d " % (first + s, len(chunk), len(head))
        out += b"/Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream endobj\n" % (len(data), data)
    if not filler:
        xref.append(struct.pack(">BIH", 0, 0, 0))  # no image
    xref.append(struct.pack(">BIH", 1, len(out), 0))
    table = zlib.compress(b"".join(xref))
    at = len(out)
    out += b"%d 0 obj << /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R " % (xref_number, xref_number + 1)
    out += b"/Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream endobj\n" % (len(table), table)
    return out + b"startxref\n%d\n%%%%EOF\n" % at


def counted(data: bytes | str) -> int | None:
    return media.pdf_pages({"file_data": URL + (data if isinstance(data, str) else base64.b64encode(data).decode())})


def test_base64_in_lines_is_read_whole() -> None:
    """Any line break in a PDF's base64 past its first megabyte (76-character lines, as
    `base64.encodebytes` and MIME write it; one newline in front) hid all its pages."""
    doc = plain(300) + b"%" + b"A" * 2_000_000 + b"\n"
    assert counted(base64.encodebytes(doc).decode()) == 300
    assert counted("\n" + base64.b64encode(doc).decode()) == 300
    assert counted("\r\n".join(textwrap.wrap(base64.b64encode(doc).decode(), 64))) == 300


def test_names_spelt_with_escapes_are_read() -> None:
    """`/Type /P#61ge` is a page to every PDF reader: it was none here."""
    assert counted(plain(200, escaped=True)) == 200


@pytest.mark.parametrize(("pages", "filler"), [(3, 0), (250, 0), (250, 1_500_000), (900, 3_000_000)])
def test_pages_in_object_streams_are_read(pages: int, filler: int) -> None:
    """A PDF whose objects are compressed showed neither its page objects nor its `/Count`:
    reserved as 50,000 tokens at any size. Its object streams are inflated and read, across
    the blocks the base64 is decoded in."""
    assert counted(object_streams(pages, filler)) == pages
    for at in range(0, 1200, 97):  # an object stream cut by a block's end, wherever
        assert counted(object_streams(pages, filler=pdf.BLOCK * 3 // 4 - 300 + at)) == pages


def test_an_object_stream_not_read_is_the_most_pages() -> None:
    """An object stream that cannot be read (another filter, inflating beyond the limit, cut
    short) may hold any pages: the PDF is reserved at the most a provider reads."""
    doc = object_streams(50)
    start = doc.index(b"stream\n", doc.index(b"/ObjStm")) + 7
    assert counted(doc[:start] + b"\x00" + doc[start + 1 :]) == pdf.MOST_PAGES  # filtered, not inflatable
    assert counted(doc[: start + 20]) == pdf.MOST_PAGES  # cut short
    bomb = b"1000 0 obj << /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode >>\nstream\n"
    assert counted(b"%PDF-1.5\n" + bomb + zlib.compress(b" " * (40 << 20), 9) + b"\nendstream") == pdf.MOST_PAGES
    tiny = b"1 0 obj << /Type /ObjStm /Filter /FlateDecode >>\nstream\n%s\nendstream endobj\n"
    many = tiny % zlib.compress(b"1 0 << /Type /Page >>") * 200_000  # 20 MB: each inflated, a copy of the rest
    assert counted(b"%PDF-1.5\n" + many) == pdf.MOST_PAGES


async def test_a_pdf_not_read_is_reserved_at_the_most_but_not_counted(start_mock: Any, tmp_path: Path) -> None:
    """A PDF whose object streams cannot be read is reserved as the most pages (a budget
    refuses it), but `count_tokens`, an estimate a client checks against its context window,
    does not count it: it reported 2.4 million tokens for any such PDF."""
    doc = object_streams(5)
    start = doc.index(b"stream\n", doc.index(b"/ObjStm")) + 7
    data = base64.b64encode(doc[:start] + b"\x00" + doc[start + 1 :]).decode()
    source = {"type": "base64", "media_type": "application/pdf", "data": data}
    turn: Any = [{"role": "user", "content": [{"type": "document", "source": source}, {"type": "text", "text": "Hi"}]}]
    async with cost_proxy(budget_config(await start_mock("anthropic"), tmp_path)) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0) as client:
            with pytest.raises(anthropic.RateLimitError):
                await client.messages.create(model="m", max_tokens=5, messages=turn)
            tokens = await client.messages.count_tokens(model="m", messages=turn)
    assert 0 < tokens.input_tokens < media.PDF_PAGE_ESTIMATE


def test_padding_before_the_end_is_not_base64() -> None:
    """A decoder stops at padding (or refuses it): what follows is no part of the PDF."""
    assert counted("QQ==" + base64.b64encode(plain(5)).decode()) is None
    assert counted(plain(5)) == 5


async def test_a_budget_reserves_the_pages_of_a_compressed_pdf(start_mock: Any, tmp_path: Path) -> None:
    """Through the Anthropic SDK: a hundred-page PDF with object streams passed a $0.10 budget
    (reserved at 50,000 tokens, billed 460,000 at $1 a million); it is refused unsent."""
    up = await start_mock("anthropic", record=True)
    cfg = budget_config(up, tmp_path)
    hidden = [
        base64.b64encode(object_streams(100)).decode(),
        base64.b64encode(plain(100, escaped=True)).decode(),
        base64.encodebytes(plain(100) + b"%" + b"A" * 1_500_000 + b"\n").decode(),
    ]
    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0) as client:
            for data in hidden:
                doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
                turn: Any = [{"role": "user", "content": [doc, {"type": "text", "text": "Summarise"}]}]
                with pytest.raises(anthropic.RateLimitError) as refused:
                    await client.messages.create(model="m", max_tokens=5, messages=turn)
                assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
                tokens = await client.messages.count_tokens(model="m", messages=turn)
                assert tokens.input_tokens >= 100 * media.PDF_PAGE_ESTIMATE
        spent = await _spent(proxy.url)
    assert up.options.requests == [] and spent == 0


@pytest.fixture
def read_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each PDF's pages are read on, in order."""
    names: list[str] = []
    real = pdf.pages

    def pages(data: str, unreadable: int | None = pdf.MOST_PAGES) -> int | None:
        names.append(threading.current_thread().name)
        return real(data, unreadable)

    monkeypatch.setattr(pdf, "pages", pages)
    return names


async def test_many_pdfs_just_below_the_bound_are_read_off_the_loop(read_on: list[str]) -> None:
    """A PDF above 256 KiB is read in a worker thread; forty just below it (10 MB, the default
    body bound) were all read on the event loop, each inflating its object streams (up to
    4 MiB each): every other request waited for them."""
    doc = base64.b64encode(object_streams(20, filler=190_000)).decode()
    assert media.ON_LOOP_BYTES - 20_000 < len(URL + doc) <= media.ON_LOOP_BYTES
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": URL + doc}}
    items = [{"role": "user", "content": [part] * 40}]
    got = media.items_media(items)
    assert got is not None
    parts = await got()
    assert parts.pdf_pages == (20,) * 40
    assert read_on and threading.main_thread().name not in read_on


async def test_count_tokens_reads_pdfs_below_a_megabyte_off_the_loop(
    start_mock: Any, tmp_path: Path, read_on: list[str]
) -> None:
    """`count_tokens` read a body's PDFs on the event loop up to 1 MB (a body's parse bound),
    where a request's reservation moves them to a worker thread past 256 KiB: four PDFs of
    200 KB, each inflating its object streams, held every other request meanwhile."""
    data = base64.b64encode(object_streams(20, filler=150_000)).decode()
    doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    turn: Any = [{"role": "user", "content": [doc] * 4 + [{"type": "text", "text": "Summarise"}]}]
    async with cost_proxy(budget_config(await start_mock("anthropic"), tmp_path)) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0) as client:
            tokens = await client.messages.count_tokens(model="m", messages=turn)
    assert media.ON_LOOP_BYTES < 4 * len(data) < 1 << 20
    assert tokens.input_tokens >= 4 * 20 * media.PDF_PAGE_ESTIMATE
    assert len(read_on) == 4 and threading.main_thread().name not in read_on


def test_a_small_pdf_inflates_a_few_times_its_size_at_most() -> None:
    """Forty 5 KB PDFs (read on the loop) each inflated an object stream to 4 MiB: 350 ms of the
    event loop for one request. An object stream inflating past 16 times its PDF's size is a
    bomb, no writer's: the PDF is reserved at the most pages."""
    bomb = b"1000 0 obj << /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode >>\nstream\n"
    small = b"%PDF-1.5\n" + bomb + zlib.compress(b" " * (4 << 20), 9) + b"\nendstream"
    assert len(small) < 6_000 and counted(small) == pdf.MOST_PAGES
    assert counted(object_streams(3)) == 3 and counted(object_streams(1000)) == 1000


def test_pages_without_a_type_are_read_by_their_parents_kids() -> None:
    """PDF readers (qpdf, pdfium) take a page tree's leaves for pages with or without their
    `/Type /Page`, and read a `/Count` given by reference: such a PDF of 300 pages (qpdf reads
    300) was 3 pages here, the number of the object holding its count."""
    kids = " ".join(f"{10 + i} 0 R" for i in range(300))
    objs = [
        "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
        f"2 0 obj << /Type /Pages /Kids [{kids}] /Count 3 0 R >> endobj",
        "3 0 obj 300 endobj",
        *(f"{10 + i} 0 obj << /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj" for i in range(300)),
    ]
    doc = ("%PDF-1.4\n" + "\n".join(objs) + "\n%%EOF\n").encode()
    assert counted(doc) == 300
    for at in (-100, -20, 60):  # the second's `/Kids` array cut by the end of a block decoded
        filler = b"%" + b"A" * (pdf.BLOCK * 3 // 4 + at - len(doc) - 2) + b"\n"
        assert counted(doc + filler + doc) == 600
    assert counted(doc.replace(f"/Kids [{kids}]".encode(), b"/Kids 4 0 R")) == pdf.MOST_PAGES


def test_an_object_stream_with_a_predictor_is_the_most_pages() -> None:
    """Rows differenced by a PNG predictor (`/DecodeParms << /Predictor 12 >>`, which readers
    undo) inflate to no text: its pages were none, the PDF reserved at the allowance."""
    doc = object_streams(300)
    params = b"/DecodeParms << /Pr#65dictor 12 /Columns 5 >> /Info (" + b"x" * 300 + b") /Type /ObjStm"
    predicted = doc.replace(b"/Type /ObjStm", params)
    assert counted(predicted) == pdf.MOST_PAGES
    for at in range(-400, 0, 40):  # its dictionary cut by the end of a block decoded
        filler = b"%" + b"A" * (pdf.BLOCK * 3 // 4 + at - len(doc) - 2) + b"\n"
        assert counted(doc + filler + predicted) == pdf.MOST_PAGES
        assert counted(doc + filler + doc) == 600
