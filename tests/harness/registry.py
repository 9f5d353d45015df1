"""A device's TUF client reading a registry's folder (python-tuf's own ``ngclient.Updater``),
and the registry commands run in-process.

ngclient's default fetcher speaks HTTP(S) only (urllib3), so the client here gets
``FileFetcher``, a test-only ``FetcherInterface`` that reads ``file://`` URLs and answers 404
for missing files (ngclient probes ``N+1.root.json`` until a 404). It records every URL, so
the tests also pin the file names ngclient asks for.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from cloud_sync.registry.commands import add_registry_commands
from cloud_sync.registry.repo import Repository


class FileFetcher(FetcherInterface):
    """Test-only: serves ``file://`` URLs from disk, 404 for missing files."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        path = Path(unquote(urlparse(url).path))
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


class TufFileClient:
    """A device's ngclient state: a metadata dir seeded with a root, and its updater."""

    def __init__(self, repo: Repository, where: Path, root: bytes | None = None) -> None:
        self.repo = repo
        self.meta = where / "meta"
        self.targets = where / "targets"
        self.meta.mkdir(parents=True, exist_ok=True)
        (self.meta / "root.json").write_bytes(root or repo.trusted_root_bytes())
        self.fetcher = FileFetcher()

    def updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.meta),
            metadata_base_url=f"file://{self.repo.metadata_dir}/",
            target_dir=str(self.targets),
            target_base_url=f"file://{self.repo.targets_dir}/",
            fetcher=self.fetcher,
            bootstrap=None,  # the root.json seeded above, as a provisioned device has it
        )

    def trusted_root(self) -> Root:
        md = Metadata[Root].from_file(str(self.meta / "root.json"))
        return md.signed

    def names(self) -> list[str]:
        return [u.rsplit("/", 1)[1] for u in self.fetcher.urls]


def run_registry_cli(*argv: str) -> int:
    """``edgefleet ARGV…`` with only the registry commands, in this process; its exit code."""
    ap = argparse.ArgumentParser(prog="edgefleet")
    add_registry_commands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(list(argv))
    return int(args.fn(args))
