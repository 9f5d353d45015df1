"""Adapter: a download in progress on disk, the ``.part`` file and its sidecar (resume).

With a resume folder, ``<sha256 of path>.part`` holds the verified prefix and
``<sha256 of path>.json`` names it (path, total, contiguous prefix length, sha256 of that
prefix, chunk size), so that a new client, even in a new process, continues from the prefix
on disk without asking for those bytes again. Data is fsynced before the sidecar naming it
is written: the sidecar never claims more than the disk holds. Without a resume folder the
partial is a temporary file beside ``dest`` and nothing survives a failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from agent.common.errors import TransportError
from agent.common.fsutil import atomic_write_json, fsync_dir
from agent.update.transfer.errors import ChunkProtocolError

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1


def resume_key(path: str) -> str:
    """Name of a path's partial download in ``resume_dir``: hex sha256 of the path."""
    return hashlib.sha256(path.encode()).hexdigest()


class Partial:
    """A download in progress: the ``.part`` file, its prefix hash and the sidecar."""

    def __init__(
        self, path: str, dest: Path, part: Path, sidecar: Path | None, chunk_size: int
    ) -> None:
        self.path = path
        self.dest = dest
        self.part = part
        self.sidecar = sidecar
        self.chunk_size = chunk_size
        self.total = 0
        self.have = 0
        self.saved = 0
        self.sha = hashlib.sha256()
        self.fh: IO[bytes] | None = None

    @classmethod
    def open(cls, path: str, dest: Path, resume_dir: Path | None, chunk_size: int) -> Partial:
        """The partial download of ``path``: resumed when its sidecar and prefix check out."""
        if resume_dir is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            p = cls(path, dest, Path(tmp), None, chunk_size)
            p.fh = os.fdopen(fd, "wb")
            return p
        resume_dir.mkdir(parents=True, exist_ok=True)
        key = resume_key(path)
        p = cls(path, dest, resume_dir / f"{key}.part", resume_dir / f"{key}.json", chunk_size)
        p._load()
        return p

    def _load(self) -> None:
        """Trust the sidecar's prefix only if the bytes on disk hash to it; else start over."""
        if self.sidecar is None:
            raise RuntimeError("only resumable partials are loaded")
        state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.sidecar.read_text())
            state = loaded if isinstance(loaded, dict) else {}
        have = state.get("contiguous")
        total = state.get("total")
        ok = (
            state.get("version") == SIDECAR_VERSION
            and state.get("path") == self.path
            and isinstance(have, int)
            and isinstance(total, int)
            and 0 <= have <= total
        )
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            # Another download of the same path (thread or process) would interleave writes.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise TransportError(
                f"{self.path} is being downloaded by someone else into {self.part}; try later"
            ) from e
        self.fh = os.fdopen(fd, "r+b")
        if ok and isinstance(have, int) and isinstance(total, int):
            if self._prefix_sha(have) == state.get("sha256"):
                self.have = self.saved = have
                self.total = total
                log.info("fetch %s: resuming at %d of %d bytes", self.path, have, total)
            else:
                log.warning(
                    "fetch %s: partial download does not match its sidecar; starting over",
                    self.path,
                )
        if self.have == 0:
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()
        self.fh.seek(self.have)
        self.fh.truncate()

    def _prefix_sha(self, n: int) -> str | None:
        """sha256 of the first ``n`` bytes on disk (kept as the running hash), None if short."""
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        sha = hashlib.sha256()
        self.fh.seek(0)
        remaining = n
        while remaining:
            block = self.fh.read(min(remaining, 1 << 20))
            if not block:
                return None
            sha.update(block)
            remaining -= len(block)
        self.sha = sha
        return sha.hexdigest()

    def append(self, data: bytes, total: int, checkpoint_bytes: int) -> None:
        """Write the next contiguous window; checkpoint every ``checkpoint_bytes``, except at
        the end of the file (``finish`` follows: a sidecar written there would be deleted at
        once, after three fsyncs; ``suspend`` still checkpoints if it does not come)."""
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        self.fh.write(data)
        if self.sidecar is not None:  # the prefix hash only matters for a resume
            self.sha.update(data)
        self.have += len(data)
        self.total = total
        if self.have - self.saved >= checkpoint_bytes and self.have < total:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Data first (fsync), then the sidecar naming it: the sidecar never claims more."""
        if self.sidecar is None or self.fh is None or self.have == self.saved:
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        atomic_write_json(
            self.sidecar,
            {
                "version": SIDECAR_VERSION,
                "path": self.path,
                "total": self.total,
                "contiguous": self.have,
                "sha256": self.sha.hexdigest(),
                "chunk_size": self.chunk_size,
            },
        )
        self.saved = self.have

    def suspend(self) -> None:
        """Keep what we have for a later resume (transport trouble, interruption)."""
        if self.fh is None:
            return
        try:
            self._checkpoint()
        finally:
            self.fh.close()
            self.fh = None
            if self.sidecar is None:
                with contextlib.suppress(FileNotFoundError):
                    self.part.unlink()

    def discard(self) -> None:
        """Forget the partial download (bad data: resuming it would be wrong)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for f in (self.part, self.sidecar):
            if f is not None:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def finish(self, total: int) -> None:
        """Move the complete file to ``dest`` atomically and drop the sidecar.

        Raises:
            ChunkProtocolError: fewer bytes on disk than the registry's size.
        """
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        if self.have != total:
            raise ChunkProtocolError(f"{self.path}: {self.have} bytes received of {total}")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        _move_into_place(self.part, self.dest)
        if self.sidecar is not None:
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()


def _move_into_place(src: Path, dest: Path) -> None:
    """``os.replace``, or copy + fsync + replace when ``src`` is on another file system."""
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        src.unlink()
    fsync_dir(dest.parent)
