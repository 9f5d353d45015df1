"""Adapter: the on-disk, content-verified engine cache.

An engine (a serialized TensorRT plan, or ONNX Runtime's optimised graph) is only safe to
reuse on the exact stack that built it. ``EngineKey`` (``agent.engine.cache_key``, the pure
part) holds every fact that makes a cached engine unsafe to reuse; its ``digest()`` names the
cache entry. ``EngineCache`` is the IO edge:

    root/<digest>/engine.bin   the artifact
    root/<digest>/meta.json    the key, sha256 and size of engine.bin, creation time

Entries appear atomically: a build writes under a temporary ``.build-*`` folder inside
``root``, ``install`` writes ``meta.json`` beside it, fsyncs both, and renames the folder to its
final name. A partial file is therefore never visible under a final name. ``lookup`` re-checks
the meta against the key and the file's sha256 on every call; anything wrong discards the whole
entry and says why, so the caller can log it and rebuild.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.fsutil import sha256_file
from agent.engine.cache_key import KEY_SCHEMA, EngineKey

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.bin"
META_FILE = "meta.json"
_BUILD_PREFIX = ".build-"
_STAGE_PREFIX = ".stage-"
_TRASH_PREFIX = ".trash-"
_TEMP_PREFIXES = (_BUILD_PREFIX, _STAGE_PREFIX, _TRASH_PREFIX)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")  # an entry folder: a key digest


@dataclass(frozen=True)
class LookupResult:
    """What ``EngineCache.lookup_ex`` found.

    Attributes:
        path: the verified engine file, or ``None``.
        reason: why there is no usable entry (``""`` on a hit, ``"missing"`` when nothing was
            cached, otherwise what was wrong with the entry that was discarded).
        discarded: whether a bad entry was removed.
    """

    path: Path | None
    reason: str
    discarded: bool = False


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EngineCache:
    """IO: content-addressed engine cache under one root folder.

    Safe for several threads of one process; entries are replaced by renames, so a reader in
    another process sees an entry completely or not at all. One agent process per root:
    concurrent builds of the same key are coordinated in-process (``agent.engine.build``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Open (and create) the cache root.

        Raises:
            OSError: the root cannot be created.
        """
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.last_reason = ""
        self._lock = threading.Lock()

    def entry_dir(self, key: EngineKey) -> Path:
        """The final folder of ``key``'s entry (may not exist)."""
        return self.root / key.digest()

    def lookup(self, key: EngineKey) -> Path | None:
        """The verified engine for ``key``, or ``None``; ``last_reason`` says why not.

        Prefer ``lookup_ex`` from several threads: ``last_reason`` is shared.
        """
        res = self.lookup_ex(key)
        self.last_reason = res.reason
        return res.path

    def lookup_ex(self, key: EngineKey) -> LookupResult:
        """Find and verify ``key``'s entry; discard it if anything is wrong.

        Checks, in order: the folder exists; ``meta.json`` parses; its key equals ``key``
        (field by field); ``engine.bin`` exists with the recorded size and sha256. A failed
        check removes the whole entry so the caller rebuilds.
        """
        d = self.entry_dir(key)
        if not d.is_dir():
            return LookupResult(None, "missing")
        problem = self._verify(d, key)
        if problem:
            self.discard(key, problem)
            return LookupResult(None, problem, discarded=True)
        # Touch meta so prune() keeps recently used entries (LRU by mtime).
        with contextlib.suppress(OSError):
            os.utime(d / META_FILE)
        return LookupResult(d / ENGINE_FILE, "")

    def _verify(self, d: Path, key: EngineKey) -> str:
        meta_path = d / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return f"{META_FILE} missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{META_FILE} unreadable: {e}"
        if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
            return f"{META_FILE} has no key object"
        want = key.to_dict()
        got: dict[str, Any] = meta["key"]
        for name in sorted(set(want) | set(got)):
            if got.get(name) != want.get(name):
                return f"meta mismatch: {name} is {got.get(name)!r}, key says {want.get(name)!r}"
        engine = d / ENGINE_FILE
        try:
            size = engine.stat().st_size
        except FileNotFoundError:
            return f"{ENGINE_FILE} missing"
        except OSError as e:
            return f"{ENGINE_FILE} unreadable: {e}"
        if size != meta.get("size"):
            return f"{ENGINE_FILE} is {size} bytes, meta says {meta.get('size')!r}"
        try:
            actual = sha256_file(engine)
        except OSError as e:
            return f"{ENGINE_FILE} unreadable: {e}"
        if actual != meta.get("sha256"):
            return (
                f"{ENGINE_FILE} sha256 is {actual[:12]}…, meta says {str(meta.get('sha256'))[:12]}…"
            )
        return ""

    def path_for_build(self, key: EngineKey) -> Path:
        """A fresh temporary file path inside ``root`` for a build to write to.

        The folder is created; the file is not. It stays invisible to ``lookup`` until
        ``install``; ``discard_build`` removes it after a failure.
        """
        d = self.root / f"{_BUILD_PREFIX}{key.digest()[:16]}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d / ENGINE_FILE

    def _is_build_path(self, p: Path) -> bool:
        return p.parent.parent == self.root and p.parent.name.startswith(_BUILD_PREFIX)

    def discard_build(self, built_file: str | os.PathLike[str]) -> None:
        """Remove a failed build's temporary file (and its ``.build-*`` folder)."""
        p = Path(built_file)
        if self._is_build_path(p):
            shutil.rmtree(p.parent, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def install(
        self, key: EngineKey, built_file: str | os.PathLike[str], *, now: float | None = None
    ) -> Path:
        """Atomically make ``built_file`` the entry for ``key``; return the final engine path.

        The file is moved (renamed when on the same filesystem, else copied and the source
        left alone) into a staging folder with ``meta.json``, both fsynced, and the folder
        renamed to ``root/<digest>``. An existing entry for the key is replaced. A
        ``path_for_build`` folder is removed once its file is installed.

        Raises:
            FileNotFoundError: ``built_file`` does not exist.
            OSError: the cache folder cannot be written.
        """
        src = Path(built_file)
        size = src.stat().st_size
        digest = key.digest()
        stage = self.root / f"{_STAGE_PREFIX}{digest[:16]}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            dst = stage / ENGINE_FILE
            try:
                os.replace(src, dst)
            except OSError:  # another filesystem: copy, the source stays the caller's
                shutil.copyfile(src, dst)
            _fsync_file(dst)
            meta = {
                "schema": KEY_SCHEMA,
                "digest": digest,
                "key": key.to_dict(),
                "sha256": sha256_file(dst),
                "size": size,
                "created": time.time() if now is None else now,
            }
            meta_path = stage / META_FILE
            with open(meta_path, "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(stage)
            final = self.root / digest
            with self._lock:
                if final.exists():
                    self._trash(final)
                os.replace(stage, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if self._is_build_path(src):
            shutil.rmtree(src.parent, ignore_errors=True)  # the now-empty .build-* folder
        return final / ENGINE_FILE

    def discard(self, key: EngineKey, reason: str) -> None:
        """Remove ``key``'s entry (atomically: rename away, then delete) and log why."""
        d = self.entry_dir(key)
        with self._lock:
            if not d.exists():
                return
            self._trash(d)
        log.warning(
            "engine cache entry discarded: digest=%s backend=%s model_sha256=%s reason=%s",
            d.name[:16],
            key.backend,
            key.model_sha256[:12],
            reason,
        )

    def _trash(self, d: Path) -> None:
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            os.replace(d, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[Path]:
        """Final entry folders (named by a digest), in no particular order."""
        return [p for p in self.root.iterdir() if p.is_dir() and _SHA256_RE.match(p.name)]

    def prune(
        self,
        keep: int,
        *,
        protect: Iterable[EngineKey] = (),
        now: float | None = None,
        temp_max_age_s: float = 24 * 3600.0,
    ) -> list[str]:
        """Remove all but the ``keep`` most recently used entries, and stale temp folders.

        Args:
            keep: entries to keep (by last use: ``lookup`` touches ``meta.json``).
            protect: keys never removed (the engines in use), counted within ``keep``.
            now: current time (seconds since the epoch); default ``time.time()``.
            temp_max_age_s: ``.build-*``/``.stage-*``/``.trash-*`` folders older than this are
                leftovers of a crash and removed; younger ones may be builds in progress.

        Returns:
            Names of the removed folders.

        Raises:
            ValueError: ``keep`` is negative.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        now = time.time() if now is None else now
        protected = {k.digest() for k in protect}
        removed: list[str] = []

        def last_use(p: Path) -> float:
            try:
                return (p / META_FILE).stat().st_mtime
            except OSError:
                return 0.0

        ranked = sorted(self.entries(), key=last_use, reverse=True)
        kept = [p for p in ranked if p.name in protected]
        for p in ranked:
            if p.name in protected:
                continue
            if len(kept) < keep:
                kept.append(p)
                continue
            with self._lock:
                self._trash(p)
            removed.append(p.name)
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
                try:
                    age = now - p.stat().st_mtime
                except OSError:
                    continue
                if age > temp_max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed
