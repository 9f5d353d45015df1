"""Adapter: the content-addressed model store and the durable update state, on disk.

Layout under ``DATA_DIR/models/``::

    objects/<sha256>                 file contents, read-only, named by their hash
    versions/<name>/<version>.json   version record: {name, version, files: {file → sha256}, card}
    versions/<name>/<version>/       materialized: model.onnx, card.json, … (hard links)
    state.json                       UpdateState (agent.update.machine)
    tmp/                             work files of ``put``

Crash safety: every file appears by ``os.replace``/``rename`` of a fsynced temporary in the
same file system (objects, records and ``state.json`` atomically; a materialized version as a
whole directory), so a crash leaves the old or the new state, never half of one. Temporaries
end in ``.tmp``; whatever a killed process left behind is removed when the store is opened.
One agent owns the data dir (systemd runs one); two processes must not open it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.common.errors import BadDataError
from agent.common.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from agent.protocol.wire import describe_validation_error
from agent.update.machine import ModelRef, UpdateState

log = logging.getLogger(__name__)

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20
_TMP = ".tmp"

StoreReason = Literal["hash", "missing", "name", "state", "record"]


class StoreError(BadDataError):
    """The store refuses or cannot find something.

    Attributes:
        reason: ``"hash"``, ``"missing"``, ``"name"``, ``"state"`` or ``"record"``.
        model: ``name@version`` or file concerned, when known.
    """

    def __init__(self, message: str, *, reason: StoreReason, model: str = "") -> None:
        super().__init__(message)
        self.reason: StoreReason = reason
        self.model = model


class VersionRecord(BaseModel):
    """What makes up one installed model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=128, description="Model name")
    version: str = Field(max_length=64, description="Model version")
    files: dict[str, str] = Field(max_length=64, description="File name → sha256 of its object")
    card: dict[str, Any] = Field(description="The model card (JSON form)")


@dataclass
class GcResult:
    """What ``gc`` removed."""

    versions: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0


def _ref(name: str, version: str) -> ModelRef:
    try:
        return ModelRef(model=name, version=version)
    except ValidationError as e:
        raise StoreError(
            f"model {name!r}@{version!r} is not a valid name@version:"
            f" {describe_validation_error(e)}",
            reason="name",
            model=f"{name}@{version}",
        ) from e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class ModelStore:
    """Content-addressed model files, version records and ``state.json`` under one dir."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        """Open (creating if needed) the store and remove temporaries a crash left behind."""
        self.root = Path(data_dir) / "models"
        self._objects = self.root / "objects"
        self._versions = self.root / "versions"
        self._tmp = self.root / "tmp"
        self.state_path = self.root / "state.json"
        for d in (self._objects, self._versions, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.cleaned = self._clean_temps()

    def _clean_temps(self) -> list[Path]:
        found = list(self._tmp.iterdir())
        for d in (self.root, self._objects, self._versions, *self._versions.iterdir()):
            if d.is_dir():
                found += [p for p in d.iterdir() if p.name.endswith(_TMP)]
        for p in found:
            log.info("store: removing %s left by an interrupted write", p)
            _remove(p)
        return found

    # --- objects -----------------------------------------------------------------------------

    def path(self, sha: str) -> Path:
        """Where the object with this sha256 lives (whether or not it exists).

        Raises:
            StoreError: ``sha`` is not 64 lowercase hex digits.
        """
        if not _SHA_RE.fullmatch(sha):
            raise StoreError(f"{sha[:80]!r} is not a sha256 hex digest", reason="name")
        return self._objects / sha

    def has(self, sha: str) -> bool:
        """Whether the object exists (not checked against its hash)."""
        return self.path(sha).is_file()

    def verify(self, sha: str) -> bool:
        """Whether the object exists and its content hashes to ``sha``."""
        p = self.path(sha)
        try:
            return sha256_file(p) == sha
        except OSError:
            return False

    def put(
        self,
        src: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        link: bool = False,
    ) -> str:
        """Copy a file into the store; idempotent.

        With ``link`` the object becomes a hard link to ``src`` where the file system allows
        it (else a copy, as without): no second copy of the bytes is written, and ``src``
        turns read-only with it. Only for a file nobody rewrites in place (a finished
        download: fetchers replace files, they never write into them). The content is hashed
        either way; the store never trusts a name.

        Args:
            src: the file to store.
            expected_sha256: refuse the file unless it hashes to this.
            link: hard-link instead of copying when possible.

        Returns:
            The file's sha256 (its object name).

        Raises:
            StoreError: the content does not match ``expected_sha256`` (nothing stored).
            OSError: ``src`` unreadable or the disk full.
        """
        linked = self._linked_tmp(src) if link else None
        if linked is not None:
            tmp = linked
        else:
            fd, tmp_name = tempfile.mkstemp(prefix="put-", suffix=_TMP, dir=self._tmp)
            tmp = Path(tmp_name)
        try:
            if linked is not None:
                sha = sha256_file(tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())  # cheap when the fetcher synced it already
            else:
                h = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    for chunk in iter(lambda: inp.read(_CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                sha = h.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256.lower():
                raise StoreError(
                    f"{os.fspath(src)} has sha256 {sha[:12]}…, expected"
                    f" {expected_sha256[:12]}…: not stored",
                    reason="hash",
                    model=os.fspath(src),
                )
            dest = self.path(sha)
            if dest.is_file() and self.verify(sha):
                tmp.unlink()
                return sha
            os.chmod(tmp, 0o444)  # objects are shared by hard links: nobody writes into them
            os.replace(tmp, dest)
            fsync_dir(self._objects)
            return sha
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _linked_tmp(self, src: str | os.PathLike[str]) -> Path | None:
        """A hard link to ``src`` in the store's tmp dir; None where links do not work."""
        tmp = self._tmp / f"link-{os.urandom(8).hex()}{_TMP}"
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or one without hard links: copy instead
            return None
        return tmp

    # --- versions ----------------------------------------------------------------------------

    def _record_path(self, ref: ModelRef) -> Path:
        return self._versions / ref.model / f"{ref.version}.json"

    def install_version(
        self,
        name: str,
        version: str,
        files: Mapping[str, str | os.PathLike[str]],
        card_json: Mapping[str, Any] | str | bytes,
        *,
        link: bool = False,
    ) -> VersionRecord:
        """Store a version's files and write its record (last, so a crash leaves no record).

        Args:
            name: model name.
            version: model version.
            files: target file name (``model.onnx``, ``golden.npz``…) → local file.
            card_json: the model card, as a dict or JSON text.
            link: hard-link the files into the store (see ``put``): for downloads.

        Raises:
            StoreError: bad name, version or file name, or a card that is not a JSON object.
            OSError: a file unreadable or the disk full.
        """
        ref = _ref(name, version)
        if isinstance(card_json, (str, bytes)):
            try:
                card = json.loads(card_json)
            except ValueError as e:
                raise StoreError(f"card of {ref} is not JSON: {e}", reason="record") from e
        else:
            card = dict(card_json)
        if not isinstance(card, dict):
            raise StoreError(f"card of {ref} must be a JSON object", reason="record")
        for fname in files:
            if not _FILE_RE.fullmatch(fname) or fname.endswith(_TMP):
                raise StoreError(
                    f"file name {fname!r} of {ref} is not a plain file name", reason="name"
                )
        shas = {fname: self.put(src, link=link) for fname, src in files.items()}
        record = VersionRecord(name=ref.model, version=ref.version, files=shas, card=card)
        atomic_write_json(self._record_path(ref), record.model_dump(mode="json"))
        log.info("store: installed %s (%d files)", ref, len(shas))
        return record

    def version_record(self, name: str, version: str) -> VersionRecord | None:
        """The record of an installed version, ``None`` if not installed.

        Raises:
            StoreError: the record exists but does not parse.
        """
        path = self._record_path(_ref(name, version))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return VersionRecord.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(
                f"version record {path} is damaged: {describe_validation_error(e)}",
                reason="record",
                model=f"{name}@{version}",
            ) from e

    def materialize(self, name: str, version: str) -> Path:
        """A directory holding the version's files and ``card.json``, built atomically.

        Returns:
            ``versions/<name>/<version>/``; an existing one is returned as is.

        Raises:
            StoreError: the version is not installed or one of its objects is missing or
                corrupt (then nothing is materialized: fetch it again).
        """
        ref = _ref(name, version)
        record = self.version_record(name, version)
        if record is None:
            raise StoreError(f"model {ref} is not installed", reason="missing", model=str(ref))
        final = self._versions / ref.model / ref.version
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{ref.version}.", suffix=_TMP, dir=final.parent))
        try:
            for fname, sha in record.files.items():
                if not self.verify(sha):
                    raise StoreError(
                        f"object of {ref}/{fname} (sha256 {sha[:12]}…) is missing or corrupt:"
                        f" {ref} not materialized; fetch it again",
                        reason="hash",
                        model=str(ref),
                    )
                self._link_or_copy(self.path(sha), tmp / fname)
            if "card.json" not in record.files:
                atomic_write_bytes(tmp / "card.json", json.dumps(record.card, indent=2).encode())
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if final.is_dir():  # built meanwhile by someone else: same content
                    _remove(tmp)
                    return final
                raise
            fsync_dir(final.parent)
        except BaseException:
            _remove(tmp)
            raise
        return final

    @staticmethod
    def _link_or_copy(src: Path, dest: Path) -> None:
        try:
            os.link(src, dest)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, dest)
            with open(dest, "rb") as fh:
                os.fsync(fh.fileno())

    def installed(self) -> list[ModelRef]:
        """Every version that has a record."""
        refs = []
        for d in sorted(self._versions.iterdir()):
            for rec in sorted(d.glob("*.json")) if d.is_dir() else []:
                try:
                    refs.append(ModelRef(model=d.name, version=rec.name[: -len(".json")]))
                except ValidationError:
                    continue
        return refs

    # --- state -------------------------------------------------------------------------------

    def load_state(self) -> UpdateState:
        """The persisted update state (empty if none was saved yet).

        Raises:
            StoreError: ``state.json`` exists but does not parse; it is left in place.
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return UpdateState()
        try:
            return UpdateState.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(
                f"{self.state_path} is damaged ({describe_validation_error(e)}): the committed"
                " models are unknown; move the file aside to start from an empty state",
                reason="state",
            ) from e

    def save_state(self, state: UpdateState) -> None:
        """Persist the update state atomically (old or new after a crash, never half)."""
        atomic_write_json(self.state_path, state.model_dump(mode="json"))

    # --- maintenance -------------------------------------------------------------------------

    def referenced(self) -> set[ModelRef]:
        """Versions the state still needs: committed, previous, active, in flight."""
        return self._referenced_by_state()

    def _referenced_by_state(self) -> set[ModelRef]:
        refs: set[ModelRef] = set()
        for slot in self.load_state().pipelines.values():
            refs.update(r for r in (slot.committed, slot.previous, slot.active) if r)
            if slot.attempt is not None and not slot.attempt.terminal:
                refs.add(slot.attempt.target)
        return refs

    def gc(self, keep: Iterable[ModelRef]) -> GcResult:
        """Remove versions not in ``keep`` (nor named by the state) and unreferenced objects.

        Run it between attempts: objects ``put`` for a version not installed yet are removed.

        Raises:
            StoreError: ``state.json`` or a kept version record is damaged (nothing removed).
        """
        kept = set(keep) | self._referenced_by_state()
        result = GcResult()
        live: set[str] = set()
        for ref in self.installed():
            if ref in kept:
                record = self.version_record(ref.model, ref.version)
                live.update(record.files.values() if record else ())
                continue
            self._record_path(ref).unlink(missing_ok=True)
            mat = self._versions / ref.model / ref.version
            if mat.is_dir():  # rename first: a crash mid-delete leaves a .tmp, cleaned at open
                doomed = mat.with_name(f".{ref.version}.gc{_TMP}")
                os.rename(mat, doomed)
                _remove(doomed)
            result.versions.append(str(ref))
        for obj in self._objects.iterdir():
            if obj.name not in live:
                result.bytes += obj.stat().st_size
                result.objects += 1
                obj.unlink()
        fsync_dir(self._objects)
        log.info(
            "store: gc removed %d versions, %d objects, %d bytes",
            len(result.versions),
            result.objects,
            result.bytes,
        )
        return result

    def verify_all(self) -> list[str]:
        """Check every object, record and materialized file; one line per problem found."""
        problems: list[str] = []
        for obj in sorted(self._objects.iterdir()):
            if not _SHA_RE.fullmatch(obj.name):
                problems.append(f"stray file {obj} in the object store")
            elif (actual := sha256_file(obj)) != obj.name:
                problems.append(
                    f"object {obj.name[:12]}… is corrupt: content hashes to {actual[:12]}…"
                )
        for ref in self.installed():
            try:
                record = self.version_record(ref.model, ref.version)
            except StoreError as e:
                problems.append(str(e))
                continue
            if record is None:
                continue
            mat = self._versions / ref.model / ref.version
            for fname, sha in record.files.items():
                obj = self.path(sha)
                if not obj.is_file():
                    problems.append(f"{ref}/{fname}: object {sha[:12]}… is missing")
                if not mat.is_dir():
                    continue
                f = mat / fname
                if not f.is_file():
                    problems.append(f"{ref}/{fname}: missing from {mat}")
                elif not (obj.is_file() and os.path.samefile(f, obj)) and sha256_file(f) != sha:
                    problems.append(
                        f"{ref}/{fname}: materialized copy does not hash to {sha[:12]}…"
                    )
        try:
            self.load_state()
        except StoreError as e:
            problems.append(str(e))
        return problems
