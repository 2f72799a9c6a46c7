"""An upstream's error may quote internal addresses that are not its own (a provider's load
balancer naming the backend that failed, a gateway naming its metadata service): whatever
path the error takes to the client, an address at a private, loopback or link-local IP (or
`localhost`) is replaced, public ones kept; and a redacted `Authorization` value leaves no
stray bracket behind (`Authorization: [REDACTED]]`)."""

from __future__ import annotations

import pytest

from tests.security.conftest import Leaky, leaky_config
from tests.security.test_credential_leak import _openai_error_text
from tests.security.test_upstream_addresses import _midstream_error

INTERNAL = (
    "http://10.0.0.5:8443/internal",
    "172.20.3.4:9000",
    "http://169.254.169.254/latest/meta-data",
    "http://[fd00::7]:8000/v1",
    "localhost:11434",
    "100.64.0.9",
)


@pytest.mark.parametrize("mode", [400, 500, "midstream-error", "stream-error"])
async def test_internal_addresses_never_reach_a_client(leaky: Leaky, start_proxy, mode: int | str) -> None:
    leaky.extra = f" (backend {', '.join(INTERNAL)} failed; status at https://status.example.com/x 8.8.8.8)"
    leaky.mode = mode
    proxy = await start_proxy(leaky_config(leaky))
    if mode == "midstream-error":
        text = await _midstream_error(proxy.url)
    else:
        text = await _openai_error_text(proxy.url, stream=mode == "stream-error")
    for address in INTERNAL:
        assert address not in text, (address, text)
    assert "10.0.0.5" not in text and "169.254" not in text
    assert "https://status.example.com/x" in text and "8.8.8.8" in text  # public: the client may need them
    assert "Authorization: [REDACTED]" in text and "[REDACTED]]" not in text
