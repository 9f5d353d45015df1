"""Adapter: the files a registry replica serves — ``metadata/`` and ``targets/``, nothing else.

A request path is first normalised (``canonical_path``: one spelling per file, ``targets/./x``,
``targets//x`` and ``targets/x/`` are ``targets/x``; a path that does not normalise is refused
with the reason), then resolved here with
every symlink followed, and served only when the result still lies in ``REPO/metadata`` or
``REPO/targets`` (each resolved once, at start: either may be a link to another disk). A link
``targets/k -> ../keys``, or to anywhere outside, resolves elsewhere and is refused; the final
``open`` uses ``O_NOFOLLOW``, so a link swapped in after the check is refused too.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from agent.protocol.fetch import MAX_CHUNK

__all__ = [
    "SERVED_DIRS",
    "PathError",
    "ServedTree",
    "canonical_path",
    "fits_one_window",
    "read_window",
    "resolve_repo_path",
]

SERVED_DIRS = ("metadata", "targets")
RESOLVE_TTL_S = 1.0  # how long a resolved request path is reused
RESOLVE_CACHE = 256  # resolved request paths kept


class PathError(ValueError):
    """A request path that does not normalise to a file of the served tree."""


def canonical_path(path: str) -> str:
    """The one spelling of a registry path: empty and ``.`` segments dropped.

    ``targets/./a//b/`` → ``targets/a/b``. The result starts with ``metadata/`` or
    ``targets/`` and names something below it.

    Raises:
        PathError: a ``..`` segment, a hidden segment (``.x``: temporary files of atomic
            writes, never published), no ``metadata``/``targets`` head, or nothing below it.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or parts[0] not in ("metadata", "targets"):
        raise PathError(f"path {path[:80]!r} does not start with metadata/ or targets/")
    if len(parts) < 2:
        raise PathError(f"path {path[:80]!r} names no file below {parts[0]}/")
    for p in parts[1:]:
        if p == "..":
            raise PathError(f"path {path[:80]!r} climbs out of the repository")
        if p.startswith("."):
            raise PathError(f"path {path[:80]!r} has a hidden segment {p[:40]!r}")
    return "/".join(parts)


def served_roots(repo_root: Path) -> tuple[Path, ...]:
    """``repo_root/metadata`` and ``repo_root/targets``, resolved."""
    return tuple((repo_root / d).resolve() for d in SERVED_DIRS)


def resolve_repo_path(
    repo_root: Path, path: str, roots: tuple[Path, ...] | None = None
) -> Path | None:
    """The file ``path`` names in the served tree, or None if it lies anywhere else.

    Args:
        repo_root: the repository folder, already resolved.
        path: a validated contract path (``metadata/…`` or ``targets/…``).
        roots: ``served_roots(repo_root)``, when the caller has them.
    """
    try:
        candidate = (repo_root / path).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError up to Python 3.12)
        return None
    for root in roots if roots is not None else served_roots(repo_root):
        if candidate != root and candidate.is_relative_to(root):
            return candidate
    return None


def read_window(file: Path, offset: int, length: int) -> tuple[int, bytes]:
    """``(file size, bytes [offset, offset + length))``; empty data at or past the end.

    Raises:
        FileNotFoundError: no such file, or not a regular file.
        OSError: the file cannot be read.
    """
    # O_NOFOLLOW: ``file`` is already resolved, so a symlink here was swapped in after the check.
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{file} is not a regular file")
        total = st.st_size
        if offset >= total:
            return total, b""
        return total, os.pread(fd, min(length, MAX_CHUNK, total - offset), offset)
    finally:
        os.close(fd)


def fits_one_window(file: Path, length: int) -> bool:
    """True when ``file`` is at most ``length`` bytes (one window holds all of it)."""
    try:
        return os.stat(file).st_size <= length
    except OSError:
        return True  # answered not_found/error at once: nothing to queue


class ServedTree:
    """``resolve_repo_path`` for one repository, with a small cache of recent answers.

    Resolving walks every component with ``lstat`` (5 calls here, ~90 µs, more than the read
    itself) and a transfer asks for one path many times. An entry lives ``RESOLVE_TTL_S``: a
    symlink the operator re-points inside the repository takes effect that much later.
    Thread-safe.

    Args:
        repo_dir: the repository folder.
    """

    def __init__(self, repo_dir: Path) -> None:
        self.repo_root = Path(repo_dir).resolve()
        self.roots = served_roots(self.repo_root)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[Path | None, float]] = OrderedDict()

    def resolve(self, path: str) -> Path | None:
        """The file a canonical ``path`` names, or None when it lies outside the tree."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and now - hit[1] < RESOLVE_TTL_S:
                return hit[0]
        file = resolve_repo_path(self.repo_root, path, self.roots)
        with self._lock:
            self._cache[path] = (file, now)
            self._cache.move_to_end(path)
            while len(self._cache) > RESOLVE_CACHE:
                self._cache.popitem(last=False)
        return file
