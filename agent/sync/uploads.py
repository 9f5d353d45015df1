"""Adapter: files a command made for the cloud to fetch (``DATA_DIR/uploads``): gzip'd log
extracts and snapshot JPEGs, served by the clip responder as ``uploads/ID``.

An upload id is its file name and says what it is: ``logs-MILLIS-RAND.log.gz`` or
``snapshot-MILLIS-RAND.jpg``. Ids are checked against that pattern before the disk is touched,
so no id can name a path outside the folder. Files are written atomically; the folder keeps
at most ``max_files`` of them, none older than ``max_age_s``.
"""

from __future__ import annotations

import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from agent.common.fsutil import atomic_write_bytes, remove_stale_temps

UPLOAD_ID_PATTERN = r"^(logs|snapshot)-[0-9]{10,16}-[0-9a-f]{6}\.(log\.gz|jpg)$"
_ID = re.compile(UPLOAD_ID_PATTERN[:-1] + r"\Z")
KINDS = {"logs": ".log.gz", "snapshot": ".jpg"}


class UploadNotFound(LookupError):
    """No such upload (never made, or cleaned up)."""


def valid_upload_id(upload_id: str) -> bool:
    return bool(_ID.match(upload_id))


class UploadStore:
    """The ``uploads`` folder: ``put`` a file, look one up by id, keep the folder bounded."""

    def __init__(
        self,
        root: Path,
        *,
        max_files: int = 8,
        max_age_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.max_files = max_files
        self.max_age_s = max_age_s
        self.clock = clock
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)

    def put(self, kind: str, data: bytes) -> str:
        """Store ``data`` as a new upload of ``kind`` (``logs`` or ``snapshot``); its id.

        Raises:
            ValueError: unknown kind.
            OSError: the file cannot be written (nothing half-written is left).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown upload kind {kind!r}; expected one of {sorted(KINDS)}")
        upload_id = f"{kind}-{int(self.clock() * 1000)}-{secrets.token_hex(3)}{KINDS[kind]}"
        atomic_write_bytes(self.root / upload_id, data, mode=0o600)
        self.clean()
        return upload_id

    def path(self, upload_id: str) -> Path:
        """The file of an upload.

        Raises:
            ValueError: not an upload id (paths, ``..``: refused before the disk is touched).
            UploadNotFound: no such upload.
        """
        if not valid_upload_id(upload_id):
            raise ValueError(
                f"{upload_id!r} is not an upload id (e.g. logs-1764793537123-ab12cd.log.gz)"
            )
        p = self.root / upload_id
        try:
            st = p.lstat()
        except FileNotFoundError:
            raise UploadNotFound(f"no upload {upload_id} (never made, or cleaned up)") from None
        if not stat.S_ISREG(st.st_mode):  # a symlink planted in the folder is not followed
            raise UploadNotFound(f"upload {upload_id} is not a regular file")
        return p

    def clean(self) -> list[str]:
        """Remove uploads past ``max_age_s`` and all but the newest ``max_files``; their ids."""
        files = []
        for p in self.root.iterdir():
            if valid_upload_id(p.name):
                try:
                    files.append((p.stat().st_mtime, p))
                except FileNotFoundError:
                    continue
        files.sort(reverse=True)
        cutoff = self.clock() - self.max_age_s
        gone = [p for i, (mtime, p) in enumerate(files) if i >= self.max_files or mtime < cutoff]
        for p in gone:
            p.unlink(missing_ok=True)
        return [p.name for p in gone]
