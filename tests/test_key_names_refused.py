"""Managed key names that would lie in the views are refused (redU L7).

A name is shown beside the key's id everywhere (`k2af… (name)`): a U+202E reversed the label's
text in the console, ESC sequences and newlines reached whatever printed it unescaped, an
empty name named nothing, and `root` passed for the root config key. Each is now a 400 naming
`name`; any other Unicode text (accents, CJK, RTL scripts, emoji sequences) is a name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import simple_config
from tests.governance_support import call
from tests.test_governance_keys import _proxy

ROOT = "tok-root-0123456789"
REFUSED = ["\u202egnp.exe", "a\x1b[31mred", "line1\nline2", "tab\there", "", "   ", "root", "k2af0c1d2e3f4",
           "zero\u200bwidth", "iso\u2066late", "para\u2029graph", "bom\ufeff"]  # fmt: skip
# What looks like a key's id is one (red10 F7): a space or joiner around it, another case,
# Cyrillic or Greek lookalikes, fullwidth letters, `O` for `0`.
LOOKALIKES = ["root ", " root", "Root", "ROOT", "root\u200d", "r\u043e\u043et", "R\u041e\u041eT", "r\u03bf\u03bft",
              "\uff52\uff4f\uff4f\uff54", "k2af0c1d2e3f4 ", "K2AF0C1D2E3F4", "k2af0c1d2e3f4\u200c",
              "k2afOc1d2e3f4"]  # fmt: skip
KEPT = [
    "Équipe données",
    "日本のチーム",
    "مفتاح الفريق",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "ops-1 (eu)",
    "rooter",
    "Ρίζα",
]


async def test_names_with_controls_bidi_or_a_keys_id_are_refused(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg: dict[str, Any] = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True}
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    async with _proxy(cfg) as url:
        for name in [*REFUSED, *LOOKALIKES]:
            status, body = await call("POST", url + "/admin/keys", ROOT, {"name": name})
            assert status == 400, (name, body)
            err = body["error"]
            assert err["param"] == "name" and err["code"] == "invalid_key", (name, err)
            assert err["message"].startswith("name: must not"), (name, err)
        made = {}
        for name in KEPT:
            status, body = await call("POST", url + "/admin/keys", ROOT, {"name": name})
            assert status == 201 and body["name"] == name, (name, body)
            made[name] = body["id"]
        key = made[KEPT[0]]
        status, body = await call("PATCH", url + f"/admin/keys/{key}", ROOT, {"name": "\u202eevil"})
        assert status == 400 and body["error"]["param"] == "name", body
        status, body = await call("PATCH", url + f"/admin/keys/{key}", ROOT, {"name": "renamed", "rpm": 10})
        assert status == 200 and body["name"] == "renamed", body
