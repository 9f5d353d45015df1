"""Pure core + small IO: the engine cache key and the on-disk, content-verified engine cache.

An engine (a serialized TensorRT plan, or ONNX Runtime's optimised graph) is only safe to
reuse on the exact stack that built it. ``EngineKey`` holds every fact that makes a cached
engine unsafe to reuse; its ``digest()`` names the cache entry. The pure part is the key and
its canonical JSON; the IO edge is ``EngineCache``:

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
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the meaning of a key field or the entry layout changes: old entries then miss.
KEY_SCHEMA = 1

ENGINE_FILE = "engine.bin"
META_FILE = "meta.json"
_BUILD_PREFIX = ".build-"
_STAGE_PREFIX = ".stage-"
_TRASH_PREFIX = ".trash-"
_TEMP_PREFIXES = (_BUILD_PREFIX, _STAGE_PREFIX, _TRASH_PREFIX)

PRECISIONS = ("fp32", "fp16", "int8")
_DEVICE_RE = re.compile(r"^(cpu|gpu|dla:\d+)\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")

# (input name, min shape, opt shape, max shape)
Profile = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]
ProfileSpec = Mapping[str, Sequence[Sequence[int]]]


def canonical_profiles(
    profiles: ProfileSpec | Iterable[Sequence[Any]] | None,
) -> tuple[Profile, ...]:
    """Pure: optimization profiles in one canonical form, sorted by input name.

    Args:
        profiles: ``{input: (min, opt, max)}``, or an iterable of ``(input, min, opt, max)``
            (the canonical form itself), or ``None`` for none.

    Returns:
        A tuple of ``(input, min, opt, max)`` with int tuples, sorted by input name.

    Raises:
        ValueError: a profile whose shapes differ in rank, have a negative dimension, or do
            not satisfy ``min <= opt <= max``; or an input named twice.
    """
    if profiles is None:
        return ()
    items: list[Sequence[Any]]
    if isinstance(profiles, Mapping):
        items = []
        for name, shapes in profiles.items():
            if len(shapes) != 3:
                raise ValueError(f"profile for {name!r} must be (min, opt, max), got {shapes!r}")
            items.append((name, *shapes))
    else:
        items = list(profiles)
    out: dict[str, Profile] = {}
    for item in items:
        if len(item) != 4:
            raise ValueError(f"profile entry must be (input, min, opt, max), got {item!r}")
        name = str(item[0])
        mn, opt, mx = (tuple(int(d) for d in s) for s in item[1:])
        if not len(mn) == len(opt) == len(mx):
            raise ValueError(f"profile for {name!r}: ranks differ: min {mn}, opt {opt}, max {mx}")
        for a, b, c in zip(mn, opt, mx, strict=True):
            if not 0 <= a <= b <= c:
                raise ValueError(
                    f"profile for {name!r}: expected 0 <= min <= opt <= max per dimension, "
                    f"got min {mn}, opt {opt}, max {mx}"
                )
        if name in out:
            raise ValueError(f"profile for input {name!r} given twice")
        out[name] = (name, mn, opt, mx)
    return tuple(out[k] for k in sorted(out))


def canonical_options(
    options: Mapping[str, Any] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    """Pure: builder options as sorted ``(name, canonical JSON of value)`` pairs.

    Args:
        options: a mapping of JSON-encodable values, or already-canonical pairs.

    Raises:
        ValueError: a value that JSON cannot encode.
    """
    if options is None:
        return ()
    if isinstance(options, Mapping):
        pairs: list[tuple[str, str]] = []
        for k, v in options.items():
            try:
                pairs.append((str(k), json.dumps(v, sort_keys=True, separators=(",", ":"))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"builder option {k!r}={v!r} is not JSON-encodable: {e}") from e
        return tuple(sorted(pairs))
    return tuple(sorted((str(k), str(v)) for k, v in options))


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a built engine unsafe to reuse elsewhere.

    Construct with plain values; ``profiles`` and ``builder_options`` may be given as mappings
    and are stored canonically (so option order never changes the digest).

    Attributes:
        model_sha256: sha256 of the ONNX file the engine was built from.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        backend_version: version of the backend that built it.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        device: ``"cpu"``, ``"gpu"`` or ``"dla:N"``.
        trt_version: TensorRT version, ``""`` when no TensorRT is involved.
        cuda_version: CUDA driver/runtime version, ``""`` on CPU.
        l4t_version: Jetson L4T release (``"36.3.0"``), ``""`` elsewhere.
        gpu_name: GPU name, ``""`` on CPU.
        compute_capability: ``"8.7"`` etc., ``""`` on CPU.
        profiles: optimization profiles ``(input, min, opt, max)``, canonical.
        workspace_bytes: builder workspace limit (0 when not applicable).
        builder_options: other builder options as ``(name, JSON value)`` pairs, canonical.
    """

    model_sha256: str
    backend: str
    backend_version: str
    precision: str
    device: str = "cpu"
    trt_version: str = ""
    cuda_version: str = ""
    l4t_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""
    profiles: tuple[Profile, ...] = field(default=())
    workspace_bytes: int = 0
    builder_options: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        """Canonicalise and validate.

        Raises:
            ValueError: a field outside its allowed values.
        """
        if not _SHA256_RE.match(self.model_sha256):
            raise ValueError(
                f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}"
            )
        if not self.backend:
            raise ValueError("backend must not be empty")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'gpu' or 'dla:N', got {self.device!r}")
        if self.workspace_bytes < 0:
            raise ValueError(f"workspace_bytes must be >= 0, got {self.workspace_bytes}")
        # frozen: canonicalise through object.__setattr__ (the dataclass-documented way).
        object.__setattr__(self, "profiles", canonical_profiles(self.profiles))
        object.__setattr__(self, "builder_options", canonical_options(self.builder_options))

    def to_dict(self) -> dict[str, Any]:
        """Pure: the key as JSON-native values (lists, not tuples)."""
        out: dict[str, Any] = {"schema": KEY_SCHEMA}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        out["profiles"] = [[n, list(a), list(b), list(c)] for n, a, b, c in self.profiles]
        out["builder_options"] = [[k, v] for k, v in self.builder_options]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        """Pure: the inverse of ``to_dict``.

        Raises:
            ValueError: missing or wrong fields, or another schema version.
        """
        if data.get("schema") != KEY_SCHEMA:
            raise ValueError(f"key schema is {data.get('schema')!r}, expected {KEY_SCHEMA}")
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"key fields missing: {sorted(missing)}")
        try:
            kwargs = {n: data[n] for n in names}
            kwargs["profiles"] = [tuple(p) for p in data["profiles"]]
            kwargs["builder_options"] = [tuple(p) for p in data["builder_options"]]
            return cls(**kwargs)
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed key: {e}") from e

    def canonical_json(self) -> str:
        """Pure: the key as canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Pure: sha256 hex of ``canonical_json()``; the cache entry's folder name."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


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


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """IO: sha256 hex of a file, read in chunks (engines can be hundreds of MB).

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
