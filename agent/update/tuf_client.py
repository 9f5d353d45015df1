"""Adapter: python-tuf's ``ngclient.Updater`` over MQTT, on the device's data dir.

Every check (signatures and thresholds, rollback, freeze, mix-and-match, endless data, root
rotation) comes from the reference client; this module only wires it: the provisioned trust
root is the bootstrap, metadata and targets live under ``DATA_DIR/tuf``, and bytes arrive
through ``MqttFetcher``. An ``Updater`` refreshes once in its life, so each update cycle makes
a new one (ngclient keeps its verified metadata on disk between them).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.common.errors import BadDataError, TransportError
from agent.common.fsutil import TUF_TEMP, remove_stale_temps

log = logging.getLogger(__name__)

METADATA_URL = "mqtt://registry/metadata/"
TARGETS_URL = "mqtt://registry/targets/"
RESUMABLE_BYTES = 1 << 20


class UpdateRejected(BadDataError):
    """Metadata or a target failed TUF verification (never retried as is)."""


class MetadataExpired(TransportError):
    """The registry's newest metadata has expired: it has not re-signed it (down, or its key
    offline), or a broker replays old metadata (a freeze). Either way nothing is trusted; the
    device keeps what runs and asks again later, when a re-signed copy may be there."""


@contextlib.contextmanager
def _metadata_errors(what: str) -> Iterator[None]:
    """Map ngclient's metadata errors onto the two roots (bad data vs transport)."""
    try:
        yield
    except tuf_exc.DownloadLengthMismatchError as e:  # a DownloadError, but bad data
        raise UpdateRejected(f"TUF metadata longer than allowed: {e}") from e
    except tuf_exc.DownloadError as e:
        raise TransportError(f"registry unreachable during {what}: {e}") from e
    except tuf_exc.ExpiredMetadataError as e:
        raise MetadataExpired(
            f"registry metadata expired during {what} ({e}): the registry has not re-signed "
            "it yet (or an old copy is replayed); nothing from it is trusted meanwhile"
        ) from e
    except tuf_exc.RepositoryError as e:
        raise UpdateRejected(f"TUF metadata rejected: {type(e).__name__}: {e}") from e


class TufClient:
    """One device's TUF state and the ngclient calls the update manager needs."""

    def __init__(
        self,
        data_dir: Path,
        trust_root: Path,
        fetcher: FetcherInterface,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Raises: UpdateRejected when the provisioned trust root cannot be read.

        ``clock``: the time metadata expiry is judged at (default: ngclient's own reading of
        the system clock); the year-long simulation passes its simulated time.
        """
        self.clock = clock
        self.metadata_dir = data_dir / "tuf" / "metadata"
        self.target_dir = data_dir / "tuf" / "targets"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.target_dir.mkdir(parents=True, exist_ok=True)
        # what a kill in the middle of ngclient's metadata persist left (it has no sweep)
        for p in remove_stale_temps(self.metadata_dir, TUF_TEMP):
            log.info("tuf: removed %s left by an interrupted write", p.name)
        try:
            self.bootstrap = trust_root.read_bytes()
        except OSError as e:
            raise UpdateRejected(f"trust root {trust_root} cannot be read: {e}") from e
        self.fetcher = fetcher
        self._updater: Updater | None = None

    def refresh(self) -> None:
        """A new ``Updater`` and its refresh (TUF client workflow 5.1–5.6).

        Raises:
            UpdateRejected: metadata failed verification (tampered, expired, rolled back…).
            TransportError: the registry could not be reached.
        """
        with _metadata_errors("TUF refresh"):
            updater = Updater(
                str(self.metadata_dir),
                METADATA_URL,
                str(self.target_dir),
                TARGETS_URL,
                fetcher=self.fetcher,
                bootstrap=self.bootstrap,
            )
            if self.clock is not None:
                # ngclient reads the clock once, into the trusted set it builds in its
                # constructor, and judges every expiry by it; it has no parameter for it
                updater._trusted_set.reference_time = self.clock()
            updater.refresh()
        self._updater = updater

    def trusted_root(self) -> Root:
        """The newest root ngclient verified (``root.json`` it keeps after a refresh)."""
        md = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
        return md.signed

    def target_info(self, path: str) -> TargetFile | None:
        """Signed info of a target (None when the repository does not list it).

        Raises:
            UpdateRejected, TransportError: as ``refresh``.
        """
        if self._updater is None:
            self.refresh()
        updater = self._updater
        if updater is None:  # refresh raised or set it
            raise TransportError("TUF refresh did not complete")
        with _metadata_errors(f"lookup of {path}"):
            return updater.get_targetinfo(path)

    def download(
        self,
        info: TargetFile,
        dest: Path,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download one target to ``dest``, verified against its signed length and hashes.

        Targets above ``RESUMABLE_BYTES`` go through the fetcher's resumable path (partial
        files survive restarts and broker outages) and are then verified by ngclient's
        ``find_cached_target`` (length and every signed hash), so no TUF check is skipped;
        smaller ones through ``download_target``. A file that fails verification is deleted.

        Raises:
            UpdateRejected: length or hash mismatch (tampered, truncated or padded artifact).
            TransportError: the registry could not be reached (partial data is kept).
        """
        updater = self._updater
        if updater is None:
            raise TransportError("refresh() first")
        cached = updater.find_cached_target(info, str(dest))
        if cached is not None:
            return Path(cached)
        download_to = getattr(self.fetcher, "download_to", None)
        try:
            if download_to is not None and info.length > RESUMABLE_BYTES:
                url = TARGETS_URL + info.get_prefixed_paths()[0]
                download_to(url, dest, info.length, progress)
                ok = updater.find_cached_target(info, str(dest))
                if ok is None:
                    dest.unlink(missing_ok=True)
                    raise UpdateRejected(
                        f"artifact {info.path} does not match its signed length/hashes"
                    )
                return Path(ok)
            return Path(updater.download_target(info, str(dest)))
        except (tuf_exc.DownloadLengthMismatchError, tuf_exc.RepositoryError, BadDataError) as e:
            dest.unlink(missing_ok=True)
            if isinstance(e, UpdateRejected):
                raise
            raise UpdateRejected(
                f"artifact {info.path} failed verification: {type(e).__name__}: {e}"
            ) from e
        except tuf_exc.DownloadError as e:
            raise TransportError(f"download of {info.path} failed: {e}") from e

    @staticmethod
    def card_of(info: TargetFile) -> dict[str, Any] | None:
        """The model card the registry signed into a target's custom metadata.

        TUF signs canonical JSON, which has no floats, so the card (scales, means,
        tolerances) rides as JSON text under ``custom.edgefleet.card_json``.
        """
        custom = info.custom.get("edgefleet") if isinstance(info.custom, dict) else None
        text = custom.get("card_json") if isinstance(custom, dict) else None
        if not isinstance(text, str):
            return None
        try:
            card = json.loads(text)
        except ValueError:
            return None
        return card if isinstance(card, dict) else None
