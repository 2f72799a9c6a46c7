"""Config file permissions across a rollback (class: credential leak, file permissions).

A config may hold literal client tokens (`keys.*.token`), header values and DSNs, so an
operator keeps it readable by the proxy's user alone (0600). A rollback, or a deployment
changed through the admin API, writes the applied text back over the file: it was written
as a new file with the process's default mode (0644 under the usual umask), readable by
every user of the host from then on.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import simple_config
from tests.governance_support import call, write_config

TOKEN = "tok-literal-admin-secret"


async def test_a_rollback_keeps_the_config_files_mode(start_upstream: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"root": {"token": TOKEN, "role": "admin"}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    path.chmod(0o600)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        path.chmod(0o600)
        assert (await call("POST", url + "/admin/reload", TOKEN))[0] == 200
        status, body = await call("POST", url + "/admin/config/rollback", TOKEN, json={"version": 1})
        assert status == 200 and body["file_updated"] is True, body
    finally:
        await server.close()
    assert "m2" not in path.read_text(), "the rolled-back text is in the file"
    assert TOKEN in path.read_text()
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"the config file is {oct(mode)} after the rollback"
