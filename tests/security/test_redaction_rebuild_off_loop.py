"""A change to the known secrets (a rotation, a new key) no longer stalls the event loop: the
first redaction after it rebuilt every pattern on the caller's thread, 2 ms with 20 secrets but
about a second at the 4,096 bound, once per change for a process that had rotated thousands of
keys. The patterns are now built in a thread and swapped in; meanwhile the secrets registered
since the last build are looked for as plain strings, so none is ever written in clear."""

from __future__ import annotations

import base64
import threading

import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute import redact
from edgeroute.redact import MARKER
from tests.conftest import ServeRoutes, eventually
from tests.security.test_redaction_set_keeps_secrets_in_use import known_values_restored  # noqa: F401  (a fixture)
from tests.test_cost_support import cost_proxy

NEW = "Nw7/rotatedKEY+9f3k2LmQ8xZp"  # the key a rotation brings


async def _settled() -> bool:
    return not getattr(redact._KNOWN, "building", False)


@pytest.mark.usefixtures("known_values_restored")
async def test_a_new_secret_is_redacted_at_once_and_the_patterns_are_built_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(4096):  # a process that has rotated thousands of keys
        redact.register(f"Rot8/key{i:06d}+abcdefghijklmn")
    redact.text("warm up")
    await eventually(_settled, "the first build")
    built_on: list[threading.Thread] = []
    real = redact._alternatives

    def spy(values: list[str]) -> str:
        built_on.append(threading.current_thread())
        return real(values)

    monkeypatch.setattr(redact, "_alternatives", spy)
    redact.register(NEW)
    basic = base64.b64encode(f"user:{NEW}".encode()).decode()
    said = f"Incorrect API key provided: {NEW}, {NEW.upper()}, Basic {basic}, token{NEW}was"
    expected = f"Incorrect API key provided: {MARKER}, {MARKER}, Basic {MARKER}, token{MARKER}was"
    assert redact.outbound(said) == expected  # from the first text on
    assert threading.current_thread() not in built_on  # the loop's thread built nothing
    await eventually(lambda: _swapped(built_on), "the patterns built in a thread and swapped in")
    assert redact.outbound(said) == expected
    assert redact.outbound("Rot8/key000042+abcdefghijklmn") == MARKER  # the others too


async def _swapped(built_on: list[threading.Thread]) -> bool:
    return bool(built_on) and await _settled()


_KEYISH = "aB1+/=_-.%"
_values = st.lists(st.text(_KEYISH + "xyz", min_size=8, max_size=24), min_size=1, max_size=12, unique=True)


@settings(max_examples=300, deadline=None)
@given(values=_values, text=st.text(_KEYISH + " :xyzXYZ", max_size=120))
def test_the_gap_replaces_what_the_built_patterns_replace(values: list[str], text: str) -> None:
    """While a build runs, the plain-string search of the new forms replaces what the patterns
    will (no words anywhere in any case, words as whole tokens, leftmost and longest first)."""
    matchers, gap = redact._Matchers(values, True), redact._Gap(values, True)
    for candidate in (text, "x".join(values), text + "".join(reversed(values)).upper() + text):
        assert gap.sub(candidate) == matchers.sub(candidate)
        assert gap.found_in(candidate) == matchers.found_in(candidate)


# An old secret holding one a change adds: a compound credential (an account's id and its key)
# whose key alone becomes a secret too (another provider given that key by a reload).
INNER = "Kq5/innerKEY+7d2fWmZx3"
OLD = f"acct-Hq7Rv2Lm9Tx4:{INNER}:sig-Pw8Ns3Jc6Bf1"


async def _quoting_its_key(request: web.Request) -> web.Response:
    await request.read()
    said = f"Unsupported value in header, got: {request.headers['Authorization'][7:]}"
    return web.json_response({"error": {"message": said, "type": "invalid_request_error"}}, status=400)


def _pieces_of(secret: str, seen: str) -> list[str]:
    """The pieces of `secret` of 6 characters or more that `seen` holds, in any case."""
    low = seen.lower()
    return [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6].lower() in low]


@pytest.mark.usefixtures("known_values_restored")
async def test_an_old_secret_holding_a_new_one_is_redacted_whole_while_the_patterns_build(
    serve_routes: ServeRoutes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a build runs the new forms were replaced first, as plain strings: inside an old secret
    they left the old one's other pieces in clear for the patterns, which no longer matched it."""
    up = await serve_routes(web.post("/v1/chat/completions", _quoting_its_key))
    cfg = {
        "providers": {"p": {"base_url": up.url + "/v1", "api_key": OLD}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
        "retry": {"base_ms": 1, "max_ms": 2},
    }
    async with cost_proxy(cfg) as proxy:
        redact._KNOWN.settle()  # OLD is in the patterns
        release = threading.Event()
        real_build = redact._Known._build

        def held(known: redact._Known, *args: object) -> None:
            release.wait(30)  # the build takes as long as the test needs
            real_build(known, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(redact._Known, "_build", held)
        redact.register(INNER)  # a reload's new secret
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        try:
            seen = []
            for _ in range(2):  # while the build is held, then once it is swapped in
                with pytest.raises(openai.APIStatusError) as err:
                    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                seen.append(err.value.response.text)
                assert redact._KNOWN.building or release.is_set()
                release.set()
                await eventually(_settled, "the build swapped in")
        finally:
            release.set()
            await client.close()
    for body in seen:
        assert "Unsupported value in header" in body and not _pieces_of(OLD, body), body
    logged = redact.text(f"upstream said: {OLD}")
    assert logged == f"upstream said: {MARKER}", logged


def test_a_secret_holding_another_is_redacted_whole_by_the_built_patterns() -> None:
    """A value with other characters than a key's (`:`) was looked for after the runs of key
    characters: a run's value inside it was replaced first, and the rest of it was left in clear."""
    matchers = redact._Matchers([OLD, INNER], True)
    assert matchers.sub(f"got {OLD}, {INNER} and {OLD.upper()}") == f"got {MARKER}, {MARKER} and {MARKER}"


_around = st.text(_KEYISH + ":xyz", min_size=0, max_size=6)
# Values that are no words (replaced anywhere): a word is replaced as a whole token, and a marker
# written beside one makes it whole whichever replaces first (the interim replaces more then).
_no_words = st.lists(
    st.text(_KEYISH + "xyz", min_size=16, max_size=24).filter(redact._anywhere), min_size=1, max_size=6, unique=True
)


@settings(max_examples=300, deadline=None)
@given(
    new=_no_words,
    around=st.lists(st.tuples(_around, _around), min_size=1, max_size=4),
    glue=st.sampled_from([" ", "", ":"]),
)
def test_while_a_build_runs_old_secrets_holding_new_ones_are_replaced_as_the_built_patterns_replace_them(
    new: list[str], around: list[tuple[str, str]], glue: str
) -> None:
    old = [a + new[i % len(new)] + b for i, (a, b) in enumerate(around)]
    interim = redact._Matchers(old, True), redact._Gap(new, True)
    built = redact._Matchers([*old, *new], True)
    for text in (glue.join(old), glue.join([*new, *old]).upper(), f"x {glue.join(reversed(old))} y"):
        assert redact._sub_all(text, *interim) == built.sub(text), text


def test_a_new_secret_held_by_many_old_ones_leaves_none_of_them_in_pieces() -> None:
    """Past 64 old forms holding a new one, the old ones are replaced first (a plain string search
    of thousands a text would cost milliseconds until the swap)."""
    old = [f"Rot8/key{i:06d}+{INNER}+tail" for i in range(100)]
    gap, matchers = redact._Gap([INNER], True), redact._Matchers(old, True)
    text = f"got {old[42]}, {INNER} and {old[7].lower()}"
    assert redact._sub_all(text, gap, matchers) == f"got {MARKER}, {MARKER} and {MARKER}"
