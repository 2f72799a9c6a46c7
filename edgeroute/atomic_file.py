"""Files replaced whole: a reader, a crash or a power cut sees the old file or the new one."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`.
    A file replaced keeps its mode and owner (a config kept 0600 stays so); a new one is 0600.
    `durable=False` skips both syncs, for a file that need not outlive the machine (a run
    directory's state): readers still see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            was = os.stat(path)
        except FileNotFoundError:
            was = None
        if was is not None:
            os.fchmod(fd, stat.S_IMODE(was.st_mode))
            if (was.st_uid, was.st_gid) != (os.getuid(), os.getgid()):
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.fchown(fd, was.st_uid, was.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
