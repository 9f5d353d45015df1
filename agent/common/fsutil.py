"""Adapter: crash-safe file writes (temp file in the same folder, fsync, ``os.replace``), and
the sha256 of a file read in chunks.

After a power cut a reader sees either the old file or the new one, never a half-written one
(the pattern python-tuf uses to persist metadata). A process killed between creating the temp
file and the rename leaves the temp file; ``remove_stale_temps`` sweeps them at start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# atomic_write_bytes' temp names: ".{target name}.{mkstemp's 8 characters}.tmp"
OUR_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp\Z")
# python-tuf's _persist_file: tempfile.NamedTemporaryFile in the metadata folder, "tmp" + 8
TUF_TEMP = re.compile(r"^tmp[a-z0-9_]{8}\Z")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o644) -> None:
    """``atomic_write_bytes`` of pretty JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode(), mode=mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, pattern: re.Pattern[str] = OUR_TEMP) -> list[Path]:
    """Delete the temp files an interrupted atomic write left in ``directory`` (not recursive).

    Call it before anything in this process writes there: a temp file of a running write
    matches too."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        if pattern.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """IO: sha256 hex of a file, read in chunks (models and engines can be hundreds of MB).

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
