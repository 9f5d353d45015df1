"""Adapter: python-tuf's ``FetcherInterface`` over a ``ChunkClient``.

``_fetch`` yields chunks so that ngclient's own length caps apply, and errors become the
``tuf.api.exceptions`` ngclient knows (``not_found`` → ``DownloadHTTPError(…, 404)``, which
ngclient reads as "no newer root" when it probes ``N+1.root.json``). Content is never trusted
here: ngclient verifies length and hashes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from agent.common.errors import BadDataError, TransportError
from agent.update.transfer.client import ChunkClient, Progress
from agent.update.transfer.errors import (
    FileTooLargeError,
    RemoteNotFoundError,
    RequestRefusedError,
    SlowTransferError,
)
from agent.update.transfer.transfer import check_path


class MqttFetcher(FetcherInterface):
    """python-tuf's network abstraction over a ``ChunkClient``.

    ``base_url`` (default ``mqtt://registry/``) is stripped from ngclient's URLs, so the
    Updater is built with ``metadata_base_url="mqtt://registry/metadata/"`` and
    ``target_base_url="mqtt://registry/targets/"``: ``mqtt://registry/metadata/2.root.json``
    becomes the registry path ``metadata/2.root.json``.

    Args:
        chunks: the device's chunk client.
        base_url: URL prefix of the registry.
        resume_dir: where ``download_to`` keeps partial downloads.
    """

    def __init__(
        self,
        chunks: ChunkClient,
        *,
        base_url: str = "mqtt://registry/",
        resume_dir: Path | None = None,
    ) -> None:
        self.chunks = chunks
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.resume_dir = resume_dir

    def url_to_path(self, url: str) -> str:
        """Registry path of an ngclient URL.

        Raises:
            tuf.api.exceptions.DownloadError: a URL outside ``base_url`` or not a registry path.
        """
        if not url.startswith(self.base_url):
            raise tuf_exc.DownloadError(f"{url} is not under {self.base_url}")
        path = url[len(self.base_url) :]
        try:
            check_path(path)
        except BadDataError as e:
            raise tuf_exc.DownloadError(f"{url}: {e}") from e
        return path

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Chunks of ``url``; the first window is asked for before returning, so a missing
        file raises here (``DownloadHTTPError`` 404), as an HTTP fetcher's would.

        Raises:
            tuf.api.exceptions.DownloadHTTPError: 404 not found, 400 refused.
            tuf.api.exceptions.SlowRetrievalError: the minimum-rate guard tripped.
            tuf.api.exceptions.DownloadError: any other failure (also while iterating).
        """
        path = self.url_to_path(url)
        chunks = self.chunks.iter_file(path)
        with _as_download_error(url):
            first = next(chunks, None)
        if first is None:
            return iter(())
        return _mapped_stream(url, first, chunks)

    def download_to(
        self,
        url: str,
        dest: Path,
        max_length: int,
        progress: Progress | None = None,
    ) -> Path:
        """Resumable download of ``url`` to ``dest`` (in ``resume_dir`` when set).

        Nothing is verified here: pass ``dest`` to ngclient's
        ``Updater.find_cached_target(targetinfo, str(dest))``, which checks length and hashes
        against the signed ``TargetFile`` and returns None on a mismatch (then delete ``dest``).

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: larger than ``max_length``.
            tuf.api.exceptions.DownloadHTTPError: 404 not found, 400 refused.
            tuf.api.exceptions.SlowRetrievalError, tuf.api.exceptions.DownloadError.
        """
        path = self.url_to_path(url)
        with _as_download_error(url):
            self.chunks.fetch_file(
                path, dest, max_length=max_length, resume_dir=self.resume_dir, progress=progress
            )
        return dest


@contextlib.contextmanager
def _as_download_error(url: str) -> Iterator[None]:
    """Map edgefleet errors to the ``tuf.api.exceptions`` ngclient handles."""
    try:
        yield
    except RemoteNotFoundError as e:
        raise tuf_exc.DownloadHTTPError(f"{url}: not found on the registry", 404) from e
    except RequestRefusedError as e:
        raise tuf_exc.DownloadHTTPError(f"{url}: {e}", 400) from e
    except FileTooLargeError as e:
        raise tuf_exc.DownloadLengthMismatchError(str(e)) from e
    except SlowTransferError as e:
        raise tuf_exc.SlowRetrievalError(str(e)) from e
    except (TransportError, BadDataError) as e:
        raise tuf_exc.DownloadError(f"{url}: {e}") from e


def _mapped_stream(url: str, first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    """Yield ``first`` then ``rest``; errors mapped, since ``FetcherInterface.fetch`` wraps
    only what ``_fetch`` raises, not what the iterator raises later."""
    try:
        yield first
        with _as_download_error(url):
            yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()
