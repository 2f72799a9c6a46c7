"""TLS settings checked while the config loads: the files exist and load as certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

from edgeroute.config.schema import Tls
from edgeroute.upstream_http.tls import tls_context


def check_tls(where: str, tls: Tls) -> list[tuple[str, str]]:
    files = {"ca_bundle": tls.ca_bundle, "client_cert": tls.client_cert, "client_key": tls.client_key}
    missing = [
        (f"{where}.{field}", f"no readable file at {path}")
        for field, path in files.items()
        if path is not None and not Path(path).expanduser().is_file()
    ]
    if missing:
        return missing
    if tls.client_key is not None and tls.client_cert is None:
        return [(f"{where}.client_key", "a client_key needs a client_cert")]
    try:
        tls_context(tls.ca_bundle, tls.client_cert, tls.client_key)
    except (OSError, ssl.SSLError) as e:
        return [(where, f"cannot load the certificates: {e}")]
    return []
