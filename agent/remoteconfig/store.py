"""Adapter: the accepted remote configuration on disk, ``DATA_DIR/config/remote.json``.

Written atomically once a configuration passed its health window, exactly as it was received
(sealed values stay sealed: no decrypted secret is ever written), with the desired revision
that carried it. At start-up the agent runs it instead of the local file's ``[[pipelines]]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from agent.common.fsutil import atomic_write_json
from agent.protocol.state import ConfigTarget
from agent.remoteconfig.plan import ConfigInvalid

REMOTE_FILE = Path("config") / "remote.json"


@dataclass(frozen=True)
class StoredConfig:
    target: ConfigTarget
    revision: int
    applied_at: str


class ConfigFile:
    """``remote.json`` under one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / REMOTE_FILE

    def save(self, target: ConfigTarget, revision: int, now: datetime) -> None:
        """Persist (temp file, fsync, rename).

        Raises:
            OSError: the disk refused; the previous file is intact.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {"hash": target.hash, "document": target.document, "revision": revision,
             "applied_at": now.isoformat()},
            mode=0o600,
        )  # fmt: skip

    def load(self) -> StoredConfig | None:
        """The stored configuration; None when there is none.

        Raises:
            ConfigInvalid: the file is unreadable or corrupt (its hash does not match).
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigInvalid(f"stored remote configuration {self.path} unreadable: {e}") from e
        try:
            target = ConfigTarget(hash=raw["hash"], document=raw["document"])
            revision = int(raw["revision"])
            return StoredConfig(target, revision, str(raw.get("applied_at", "")))
        except (ValidationError, KeyError, TypeError, ValueError) as e:
            raise ConfigInvalid(f"stored remote configuration {self.path} is corrupt: {e}") from e
