"""Files replaced whole: a reader, a crash or a power cut sees the old file or the new one."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Staged:
    """A file's new content, written (and synced) beside it but not in place yet: `publish`
    renames it over the file, `discard` removes it. Between the two a caller can do what must
    happen first (record a config version), leaving only the rename after it; `persist` syncs
    the directory later, off that step."""

    path: Path
    tmp: Path
    data: bytes
    durable: bool = True
    published: bool = False

    def publish(self) -> None:
        """Renames the file in place: at once seen by readers, and by a restart after a kill."""
        os.replace(self.tmp, self.path)
        self.published = True

    def persist(self) -> None:
        """Syncs the directory once published, so that the rename survives a power cut too."""
        if not (self.published and self.durable):
            return
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if not self.published:
            self.tmp.unlink(missing_ok=True)


def stage_file(path: Path, data: bytes, *, durable: bool = True, prefix: str | None = None) -> Staged:
    """Writes `data` to a temporary file beside `path` (synced unless not `durable`), named
    `prefix` (by default `.NAME.`) and a random part. A file replaced keeps its mode and owner
    (a config kept 0600 stays so); a new one is 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", dir=path.parent)
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Staged(path, Path(tmp), data, durable)


def replace_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`.
    `durable=False` skips both syncs, for a file that need not outlive the machine (a run
    directory's state): readers still see the old content or the new, never a part."""
    staged = stage_file(path, data, durable=durable)
    try:
        staged.publish()
    finally:
        staged.discard()
    staged.persist()
