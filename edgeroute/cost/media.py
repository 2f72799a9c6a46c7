"""The tokens a budget reserves for a request's image, audio and file parts.

A part's tokens depend on what it holds (an image's size, an audio clip's length), which the
core's text count never sees: a reservation of the text alone let concurrent requests of many
images each overshoot a budget many times over. Each part is reserved at an allowance instead:

- image (`image_url`, and the Anthropic `image` and Responses `input_image` parts edgeroute
  turns into one): the larger of OpenAI's tile rule (85 + 170 a 512-px tile, after the fit
  into 2048 px and the shortest side to 768 px; 85 at `detail: low`) and Anthropic's
  width x height / 750 (at most 1,600), by the size a base64 image's header gives, else the cap;
- audio (`input_audio`): 32 tokens a kilobyte of its data, at least 1,000 (Gemini counts 32
  tokens a second of audio, OpenAI about 10, and no common codec takes less than a kilobyte
  for a second);
- file (`file`): `FILE_TOKENS`, a PDF's text and page images of a few dozen pages; a base64
  PDF whose pages can be counted (its page objects, its page tree's `/Count`) at least
  `PDF_PAGE_TOKENS` a page: Anthropic counts a page's text (1,500 to 3,000 tokens) and its
  image (at most 1,600), and a PDF of a hundred pages passed the allowance many times over.

The images of a deployment of an OpenAI model that counts them at a multiple of gpt-4o's
count (gpt-4o-mini: 33 times) are reserved at that multiple (`IMAGE_SCALE`). A Gemini model
counts an image by tiles (258 tokens for one at most 384 px a side, else 258 a 768-px tile),
which passes the cap for large images: its deployments' images are reserved at the larger of
the two rules, an image of unknown size as one that fills 3,072 px a side (`GEMINI_MOST`: the
most Gemini is taken to read of an image; a deployment's `media_tokens.image` says otherwise). A deployment's
`media_tokens` replaces the allowance of a kind for its requests; a request reserves the
largest allowance of the deployments it may reach.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgeroute import _core
from edgeroute.config import Deployment
from edgeroute.cost import pdf
from edgeroute.errors import checked_json

IMAGE_LOW = 85  # OpenAI, `detail: low`: whatever the size
IMAGE_CAP = 1600  # the most either rule gives one image: Anthropic's (OpenAI's is 1,445)
AUDIO_MIN = 1000
AUDIO_PER_KB = 32
FILE_TOKENS = 50_000
PDF_PAGE_TOKENS = 4_600  # the most Anthropic counts a PDF page: 3,000 of text and a 1,600 image
PDF_PAGE_ESTIMATE = 2_400  # what a page of text typically counts (a 1-page PDF: 2,115 to 2,347)
GEMINI_TILE = 258
GEMINI_MOST = 16 * GEMINI_TILE  # 4 x 4 tiles of 768 px
# An image header is read from this much of its base64 at most: a JPEG's size follows its
# EXIF block (often tens of kilobytes); one later than this is reserved at the cap.
_HEADER_B64 = 96 * 1024


@dataclass(frozen=True, slots=True)
class MediaRule:
    """The per-part allowances of the deployments a request may reach (`rule_of`)."""

    image: int | None = None  # the largest `media_tokens.image` among them
    image_default: bool = True  # one of them has none: its images at the default rules
    image_scale: float = 1.0  # the largest `IMAGE_SCALE` of those
    gemini: bool = False  # one of those is a Gemini model: images by its tiles too
    audio: int | None = None
    audio_default: bool = True
    file: int = FILE_TOKENS


DEFAULT_RULE = MediaRule()


@dataclass(frozen=True, slots=True)
class MediaParts:
    """A request's non-text parts: each image's and audio clip's default allowance, and files."""

    images: tuple[int, ...] = ()
    audio: tuple[int, ...] = ()
    files: int = 0
    # Each image by Gemini's tiles (derived from the images, so not compared).
    gemini: tuple[int, ...] = field(default=(), compare=False)
    # The pages of each base64 PDF whose pages were counted (not among `files`).
    pdf_pages: tuple[int, ...] = ()
    # The built-in tools it enables (web search, ...), each with the calls reserved (cost.tool_calls).
    tools: tuple[tuple[str, int, int], ...] = ()
    # The tokens of its Predicted Output, reserved at the output price for each answer (cost.prediction).
    prediction: int = 0

    def tokens(self, rule: MediaRule) -> int:
        images = self.images
        if rule.gemini and self.gemini:
            images = tuple(max(d, g) for d, g in zip(images, self.gemini, strict=True))
        return (
            _each(images, rule.image, rule.image_default, rule.image_scale)
            + _each(self.audio, rule.audio, rule.audio_default)
            + self.files * rule.file
            + sum(max(rule.file, pages * PDF_PAGE_TOKENS) for pages in self.pdf_pages)
        )


NONE = MediaParts()


def _each(defaults: tuple[int, ...], override: int | None, by_default: bool, scale: float = 1.0) -> int:
    if not defaults:
        return 0
    if scale != 1.0:
        defaults = tuple(math.ceil(d * scale) for d in defaults)
    if override is None:
        return sum(defaults)
    if not by_default:
        return override * len(defaults)
    return sum(max(d, override) for d in defaults)


def rule_of(deployments: Iterable[Deployment]) -> MediaRule:
    """The largest allowance of each kind among `deployments` (their `media_tokens`)."""
    image: int | None = None
    audio: int | None = None
    image_default = audio_default = gemini = False
    file, scale = 0, 1.0
    for d in deployments:
        m = d.media_tokens
        if m is None or m.image is None:
            image_default = True
            scale = max(scale, image_scale(d.model))
            gemini |= d.model.rsplit("/", 1)[-1].startswith("gemini")
        else:
            image = max(image or 0, m.image)
        if m is None or m.audio is None:
            audio_default = True
        else:
            audio = max(audio or 0, m.audio)
        file = max(file, FILE_TOKENS if m is None or m.file is None else m.file)
    if image is None and audio is None and file == FILE_TOKENS and scale == 1.0 and not gemini:
        return DEFAULT_RULE
    return MediaRule(image, image_default, scale, gemini, audio, audio_default, file)


# OpenAI models that count an image as more than gpt-4o's tiles (their published multipliers,
# over the patch or tile count; the default allowance is at least either): their deployments'
# images are reserved at the default times this, unless `media_tokens.image` says otherwise.
IMAGE_SCALE = {"gpt-4o-mini": 33.34, "gpt-4.1-nano": 2.46, "o4-mini": 1.72, "gpt-4.1-mini": 1.62}


def image_scale(model: str) -> float:
    name = model.rsplit("/", 1)[-1]  # `openai/gpt-4o-mini`, as some gateways name it
    return next((v for k, v in IMAGE_SCALE.items() if name.startswith(k)), 1.0)


# A request's media parts, read when a budget needs them (None: it has none).
Media = Callable[[], Awaitable[MediaParts]]


def with_parts(media: Media | None, **more: Any) -> Media | None:
    """`media` with more of what a reservation holds (`MediaParts` fields: tools, prediction)."""
    if not any(more.values()):
        return media

    async def parts() -> MediaParts:
        got = await media() if media is not None else NONE
        return dataclasses.replace(got, **more)

    return parts


ON_LOOP_BYTES = 256 * 1024  # a larger body is parsed again (its PDFs' pages read) in a worker thread


def body_media(body: bytes, decision: _core.Decision) -> Media | None:
    """The media parts of a chat-completions body; None when the core found none (its parse
    counts parts of a type other than text): a text-only body is not parsed again."""
    if not decision.other_parts:
        return None

    async def parts() -> MediaParts:
        return await asyncio.to_thread(body_parts, body) if len(body) > ON_LOOP_BYTES else body_parts(body)

    return parts


def items_media(items: Any) -> Media | None:
    """The media parts of parsed messages (chat `messages`, or a Responses `input`)."""
    if not isinstance(items, list):
        return None

    async def parts() -> MediaParts:
        # PDFs' pages are read from all their bytes: in a worker thread when large (20 MB: ~50 ms),
        # or many (forty PDFs just below the bound, each inflating its object streams).
        heavy = sum(len(_file_data(p)) for m in items for p in _content(m)) > ON_LOOP_BYTES
        return await asyncio.to_thread(message_parts, items) if heavy else message_parts(items)

    return parts


def _file_data(part: Any) -> str:
    """A `file` or `input_file` part's inline data ("" for any other part)."""
    kind = part.get("type") if isinstance(part, dict) else None
    holder = part.get("file") if kind == "file" else part if kind == "input_file" else None
    data = holder.get("file_data") if isinstance(holder, dict) else None
    return data if isinstance(data, str) else ""


def body_parts(body: bytes) -> MediaParts:
    """The non-text parts of a chat-completions body."""
    req = checked_json(body)  # the core took it; unread here, its media would go unreserved
    messages = req.get("messages") if isinstance(req, dict) else None
    return message_parts(messages) if isinstance(messages, list) else NONE


def message_parts(messages: list[Any]) -> MediaParts:
    """The non-text parts of chat `messages` or of Responses `input` items (an upstream judges
    whether each is valid)."""
    images: list[Any] = []
    audio: list[int] = []
    files = 0
    pdfs: list[int] = []
    for m in messages:
        for part in _content(m):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                images.append(part.get("image_url"))
            elif kind == "input_image":  # Responses: the URL and detail on the part itself
                images.append(part)
            elif kind == "input_audio":
                audio.append(audio_tokens(part.get("input_audio")))
            elif kind in ("file", "input_file"):
                if (pages := pdf_pages(part.get("file") if kind == "file" else part)) is None:
                    files += 1
                else:
                    pdfs.append(pages)
    if not (images or audio or files or pdfs):
        return NONE
    gemini = tuple(gemini_image_tokens(i) for i in images)
    return MediaParts(tuple(image_tokens(i) for i in images), tuple(audio), files, gemini, pdf_pages=tuple(pdfs))


_PDF_URL = "data:application/pdf;base64,"


def pdf_pages(file: Any, unreadable: int | None = pdf.MOST_PAGES) -> int | None:
    """The pages of a file part's base64 PDF (`file_data`, see `pdf.pages`); None for anything else."""
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith(_PDF_URL):
        return None
    return pdf.pages(data[len(_PDF_URL) :], unreadable)


def body_pdf_pages(body: bytes) -> list[int | None]:
    """Each `file` part's PDF pages in a chat-completions body's messages, for an estimate
    (`count_tokens`): None where not counted, a PDF whose pages cannot be read too."""
    return [pdf_pages(p.get("file"), unreadable=None) for p in _body_parts(body, "file")]


def _content(item: Any) -> list[Any]:
    """An item's content parts: a message's `content`, or a Responses `function_call_output`'s
    `output` when it is an array of parts (a tool's screenshots reach the model, and are billed)."""
    if not isinstance(item, dict):
        return []
    content = item.get("output") if item.get("type") == "function_call_output" else item.get("content")
    return content if isinstance(content, list) else []


def image_tokens(image: Any) -> int:
    """An `image_url` part's allowance: by its size when a base64 header gives it, else the cap."""
    url = image.get("url", image.get("image_url")) if isinstance(image, dict) else image
    low = isinstance(image, dict) and image.get("detail") == "low"
    size = data_url_size(url) if isinstance(url, str) else None
    if size is None:
        return IMAGE_CAP
    w, h = size
    anthropic = min(IMAGE_CAP, math.ceil(w * h / 750))
    return max(IMAGE_LOW if low else openai_tiles(w, h), anthropic)


def gemini_image_tokens(image: Any) -> int:
    """An image part's tokens by Gemini's tiles when a base64 header gives its size (at most
    `GEMINI_MOST`), else `GEMINI_MOST`."""
    url = image.get("url", image.get("image_url")) if isinstance(image, dict) else image
    size = data_url_size(url) if isinstance(url, str) else None
    if size is None:
        return GEMINI_MOST
    w, h = size
    if w <= 384 and h <= 384:
        return GEMINI_TILE
    return min(GEMINI_MOST, math.ceil(w / 768) * math.ceil(h / 768) * GEMINI_TILE)


def anthropic_image_tokens(image: Any) -> int:
    """An `image_url` part's tokens by Anthropic's rule (width x height / 750, at most
    `IMAGE_CAP` after its resize), when a base64 header gives the size; else the cap."""
    url = image.get("url") if isinstance(image, dict) else image
    size = data_url_size(url) if isinstance(url, str) else None
    return IMAGE_CAP if size is None else min(IMAGE_CAP, math.ceil(size[0] * size[1] / 750))


def body_images(body: bytes) -> list[Any]:
    """The `image_url` objects of a chat-completions body's messages."""
    return [p.get("image_url") for p in _body_parts(body, "image_url")]


def _body_parts(body: bytes, kind: str) -> list[dict[str, Any]]:
    """The content parts of type `kind` of a chat-completions body's messages."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    messages = req.get("messages") if isinstance(req, dict) else None
    parts = (part for m in (messages if isinstance(messages, list) else []) for part in _content(m))
    return [p for p in parts if isinstance(p, dict) and p.get("type") == kind]


def openai_tiles(w: int, h: int) -> int:
    """OpenAI's count of a high-detail image: fit into 2048 x 2048, shortest side to 768 px, then
    170 a 512-px tile and 85 more."""
    if w <= 0 or h <= 0:
        return IMAGE_LOW
    scale = min(1.0, 2048 / max(w, h))
    fw, fh = w * scale, h * scale
    scale = min(1.0, 768 / min(fw, fh))
    fw, fh = fw * scale, fh * scale
    return 85 + 170 * math.ceil(fw / 512) * math.ceil(fh / 512)


def audio_allowance(rule: MediaRule, clips: int) -> int:
    """The tokens reserved for `clips` audio clips of unknown length (a chat turn naming a
    stored clip by its id, whose size is not known): each as an `input_audio` part without its
    data, `AUDIO_MIN`, or the deployments' `media_tokens.audio`."""
    if rule.audio is None:
        return AUDIO_MIN * clips
    return (max(AUDIO_MIN, rule.audio) if rule.audio_default else rule.audio) * clips


def audio_tokens(audio: Any) -> int:
    data = audio.get("data") if isinstance(audio, dict) else None
    kb = len(data) * 3 // 4 // 1024 if isinstance(data, str) else 0
    return max(AUDIO_MIN, AUDIO_PER_KB * kb)


def data_url_size(url: str) -> tuple[int, int] | None:
    """(width, height) from the header of a base64 `data:` URL's PNG, JPEG, GIF or WebP image;
    None for anything else. Bounded work, and no exception whatever the bytes."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 256)
    if comma < 0 or not url[:comma].endswith(";base64"):
        return None
    chunk = url[comma + 1 : comma + 1 + _HEADER_B64]
    chunk = chunk[: len(chunk) // 4 * 4]
    try:
        head = binascii.a2b_base64(chunk)
    except (binascii.Error, ValueError):
        return None
    return header_size(head)


def header_size(b: bytes) -> tuple[int, int] | None:
    """An image's size from its first bytes (PNG, GIF, WebP, JPEG), else None."""
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR" and len(b) >= 24:
        return _be(b, 16, 4), _be(b, 20, 4)
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        return b[6] | b[7] << 8, b[8] | b[9] << 8
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP" and len(b) >= 30:
        return _webp(b)
    if b[:2] == b"\xff\xd8":
        return _jpeg(b)
    return None


def _be(b: bytes, at: int, n: int) -> int:
    return int.from_bytes(b[at : at + n], "big")


def _webp(b: bytes) -> tuple[int, int] | None:
    chunk = b[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
    if chunk == b"VP8L" and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(b[28:30], "little") & 0x3FFF
    return None


# Start-of-frame markers (not DHT C4, JPG C8, DAC CC): they carry the frame's size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# Segments (and fill bytes) walked before a JPEG's frame at most: a real one has a dozen.
_JPEG_STEPS = 256


def _jpeg(b: bytes) -> tuple[int, int] | None:
    """The first frame's size: a walk of the segments' lengths (each step moves forward)."""
    i = 2
    for _ in range(_JPEG_STEPS):
        if i + 9 > len(b):
            return None
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return _be(b, i + 7, 2), _be(b, i + 5, 2)
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2  # markers without a length
            continue
        length = _be(b, i + 2, 2)
        if length < 2:
            return None
        i += 2 + length
    return None
