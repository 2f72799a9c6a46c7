"""The per-part allowances budgets reserve for images, audio and files (edgeroute.cost.media)."""

from __future__ import annotations

import base64
import math
import os
import struct
import time
import zlib

import orjson
import pytest

from edgeroute.config import Deployment
from edgeroute.cost import media as M
from edgeroute.errors import ProxyError


def _png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _jpeg(w: int, h: int, exif: int = 0) -> bytes:
    app1 = b"\xff\xe1" + struct.pack(">H", exif + 2) + b"\0" * exif if exif else b""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app1 + sof + b"\xff\xd9"


def _gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\0\0\0"


def _webp_vp8x(w: int, h: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (_png(1092, 1092), (1092, 1092)),
        (_jpeg(640, 480), (640, 480)),
        (_jpeg(4000, 3000, exif=60_000), (4000, 3000)),  # the size after a long EXIF block
        (_gif(32, 16), (32, 16)),
        (_webp_vp8x(800, 600), (800, 600)),
    ],
    ids=["png", "jpeg", "jpeg-exif", "gif", "webp"],
)
def test_a_base64_images_header_gives_its_size(data: bytes, size: tuple[int, int]) -> None:
    assert M.data_url_size(_url(data)) == size


def test_openai_tiles_follow_the_published_rule() -> None:
    assert M.openai_tiles(512, 512) == 85 + 170  # one tile
    assert M.openai_tiles(1024, 1024) == 85 + 170 * 4  # to 768 x 768: four tiles
    assert M.openai_tiles(2048, 4096) == 85 + 170 * 6  # to 1024 x 2048, then 768 x 1536
    assert M.openai_tiles(10_000, 768) == 85 + 170 * 4  # to 2048 x 157: one row of four
    assert M.openai_tiles(0, 5) == M.IMAGE_LOW


def test_an_image_is_reserved_at_the_larger_of_the_providers_rules() -> None:
    small, square = _url(_png(100, 100)), _url(_png(1092, 1092))
    assert M.image_tokens({"url": small}) == 85 + 170  # OpenAI's tile above Anthropic's 14
    assert M.image_tokens({"url": square}) == 1590  # Anthropic's 1092 x 1092 / 750 above OpenAI's 765
    assert M.image_tokens({"url": _url(_png(9000, 9000))}) == M.IMAGE_CAP
    # `detail: low` is 85 at OpenAI; Anthropic reads no detail, so its count still bounds it.
    assert M.image_tokens({"url": small, "detail": "low"}) == M.IMAGE_LOW
    assert M.image_tokens({"url": square, "detail": "low"}) == 1590
    assert M.image_tokens({"url": "https://x.example/a.png", "detail": "low"}) == M.IMAGE_CAP


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,",
        "data:image/png;base64,!!!!not base64!!!!",
        "data:image/png,raw" + "A" * 100,
        "data:" + "x" * 10_000,
        _url(b"\x89PNG\r\n\x1a\n" + b"\0" * 4),  # truncated header
        _url(b"\xff\xd8" + b"\xff\xe1\x00\x00" * 10),  # a segment of length 0
        _url(b"\xff\xd8" + b"\xff\xe1\xff\xff" + b"\0" * 100),  # a segment past the end
        _url(b"\xff\xd8\xff" + b"\xff" * 200_000),  # fill bytes without end
        _url(b"\xff\xd8" + b"\xff\xe1\x00\x02" * 20_000),  # empty segments without end
        _url(b"RIFF\0\0\0\0WEBPVP8L" + b"\0" * 20),
        _url(os.urandom(4096)),
        "data:image/png;base64," + "QUFB" * 1_000_000,  # 4 MB of base64 that is no image
    ],
)
def test_hostile_bytes_give_the_cap_quickly(url: str) -> None:
    # This thread's CPU time, not the wall clock: a stall of a busy host is not work done here.
    started = time.thread_time()
    assert M.data_url_size(url) is None
    assert M.image_tokens({"url": url}) == M.IMAGE_CAP
    assert time.thread_time() - started < 0.05  # the header alone is read


def test_a_huge_claimed_size_is_capped() -> None:
    assert M.image_tokens({"url": _url(_png(2**32 - 1, 2**32 - 1))}) == M.IMAGE_CAP


def test_the_parts_of_chat_and_responses_bodies() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                    {"type": "input_audio", "input_audio": {"data": "A" * 400_000, "format": "wav"}},
                    {"type": "file", "file": {"file_id": "f"}},
                    "garbage",
                    {"type": 7},
                ],
            },
            "not a message",
        ],
    }
    parts = M.body_parts(orjson.dumps(body))
    assert parts == M.MediaParts((M.IMAGE_CAP,), (M.AUDIO_PER_KB * 292,), 1)
    assert parts.tokens(M.DEFAULT_RULE) == M.IMAGE_CAP + 32 * 292 + M.FILE_TOKENS
    responses = [{"role": "user", "content": [{"type": "input_image", "image_url": _url(_png(512, 512))}]}]
    assert M.message_parts(responses) == M.MediaParts((350,))  # Anthropic: 512 x 512 / 750
    with pytest.raises(ProxyError, match="not valid JSON") as e:  # one the core took: never reserved at nothing
        M.body_parts(b'{"zz":1e400}')
    assert e.value.status == 400


def test_a_key_hidden_by_an_escape_is_read() -> None:
    hidden = (
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"image\\u005furl","image_url":{"url":"u"}}]}]}'
    )
    assert M.body_parts(hidden) == M.MediaParts((M.IMAGE_CAP,))


def _dep(model: str = "x", **media: int) -> Deployment:
    return Deployment.model_validate({"provider": "p", "model": model, "media_tokens": media or None})


def test_a_deployments_media_tokens_replace_the_allowance() -> None:
    parts = M.MediaParts((255, 1590), (1000,), 2)
    assert parts.tokens(M.rule_of([_dep()])) == 255 + 1590 + 1000 + 2 * M.FILE_TOKENS
    # Only deployments that set it: their count, lower or higher than the default.
    assert parts.tokens(M.rule_of([_dep(image=50, audio=7, file=3)])) == 100 + 7 + 6
    # With one that does not: the larger of its default and the override, each part.
    assert parts.tokens(M.rule_of([_dep(image=1000), _dep()])) == 1000 + 1590 + 1000 + 2 * M.FILE_TOKENS
    assert parts.tokens(M.rule_of([_dep(image=40_000), _dep(file=10)])) == 80_000 + 1000 + 2 * M.FILE_TOKENS


def test_models_that_count_images_at_a_multiple_are_reserved_at_it() -> None:
    """gpt-4o-mini bills 2,833 + 5,667 a tile, 33.3 times gpt-4o's 85 + 170."""
    parts = M.MediaParts((85 + 170 * 8,))  # 1,445: gpt-4o's most
    assert parts.tokens(M.rule_of([_dep("gpt-4o-mini-2024-07-18")])) >= 2833 + 5667 * 8
    assert parts.tokens(M.rule_of([_dep("openai/gpt-4.1-nano"), _dep("gpt-4o")])) == math.ceil(1445 * 2.46)
    assert parts.tokens(M.rule_of([_dep("gpt-4o")])) == 1445
    # Its own `media_tokens.image` says otherwise.
    assert parts.tokens(M.rule_of([_dep("gpt-4o-mini", image=1000)])) == 1000


def test_a_gemini_models_images_are_reserved_by_its_tiles_too() -> None:
    """Gemini counts 258 tokens a 768-px tile (one tile at most 384 px a side): past the cap the
    other rules share for a large image; at most 4 x 4 tiles, and that for an image by URL."""

    def chat(*urls: str) -> M.MediaParts:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return M.body_parts(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}))

    big, small, by_url = _url(_png(3000, 3000)), _url(_png(300, 300)), "https://example.com/a.png"
    gemini, other = M.rule_of([_dep("google/gemini-2.0-flash")]), M.rule_of([_dep("gpt-4o")])
    assert chat(big).tokens(other) == M.IMAGE_CAP
    assert chat(big).tokens(gemini) == 4 * 4 * M.GEMINI_TILE == M.GEMINI_MOST
    assert M.gemini_image_tokens({"url": _url(_png(2000, 800))}) == 3 * 2 * M.GEMINI_TILE  # under the cap: 1,600
    assert chat(small).tokens(other) == 85 + 170 and chat(small).tokens(gemini) == M.GEMINI_TILE
    assert chat(by_url, small).tokens(gemini) == M.GEMINI_MOST + M.GEMINI_TILE
    # Beside another deployment, the larger of the two; a Gemini one's own media_tokens decides for it.
    assert chat(big).tokens(M.rule_of([_dep("gpt-4o"), _dep("gemini-2.5-pro")])) == M.GEMINI_MOST
    assert chat(big).tokens(M.rule_of([_dep("gemini-2.5-pro", image=500)])) == 500
