"""Adapter: chunk requests checked against the served tree, and the answers read from it.

The server trusts nothing in a request. The path must match the contract's pattern and
normalise (``canonical_path``: ``targets/./x`` and ``targets//x`` are ``targets/x``; ``..``
and hidden segments are refused), and once resolved, symlinks included, it must still lie in
``repo_dir/metadata`` or ``repo_dir/targets`` (``served_tree``): nothing else below
``repo_dir`` is served, so a link ``targets/k -> ../keys`` is refused. Refusals are answered
``bad_request`` with the reason when an id can be recovered, counted and dropped otherwise.
Content is never checked here: devices verify every byte against signed TUF metadata.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.protocol.fetch import FetchHeader, FetchRequest
from agent.protocol.wire import BadMessage
from cloud_sync.registry.served_tree import PathError, ServedTree, canonical_path, read_window

__all__ = ["MAX_REQUEST_BYTES", "RequestReader"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096  # a valid request is < 700 bytes; bigger ones are not even parsed


def _recover_id(payload: bytes) -> tuple[str, str] | None:
    """``(id, path)`` of a request that failed validation, if the id can be trusted to echo."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        return None
    if not isinstance(obj, dict):
        return None
    rid, path = obj.get("id"), obj.get("path")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64:
        return None
    return rid, path[:600] if isinstance(path, str) else ""


class RequestReader:
    """Decodes requests and reads their windows from ``tree``; counts what it refuses.

    Args:
        tree: the served files.
        replica: this replica's name, told to devices that ask for sticky transfers.
        count: ``count(bad_requests=1, …)``, the server's counters.
        warn: ``warn(kind, now, msg, *args)``, the server's rate-limited warning.
    """

    def __init__(
        self,
        tree: ServedTree,
        replica: str | None,
        count: Callable[..., None],
        warn: Callable[..., None],
    ) -> None:
        self.tree = tree
        self.replica = replica
        self._counted = count
        self._warn = warn

    def decode(self, payload: bytes) -> tuple[FetchRequest, Path] | FetchHeader | None:
        """The request and its file; or the ``bad_request`` answer; or None (drop). Counts."""
        if len(payload) > MAX_REQUEST_BYTES:
            self._counted(bad_requests=1, dropped=1)
            return None
        try:
            req = FetchRequest.decode(payload)
        except BadMessage as e:
            self._counted(bad_requests=1)
            recovered = _recover_id(payload)
            if recovered is None:
                self._counted(dropped=1)
                return None
            rid, path = recovered
            return self._status(rid, path, 0, "bad_request", str(e))
        try:
            canon = canonical_path(req.path)
        except PathError as e:
            self._counted(bad_requests=1)
            return self._status(req.id, req.path, req.offset, "bad_request", f"{e}; refused")
        if canon != req.path:
            self._counted(aliases=1)
        file = self.tree.resolve(canon)
        if file is None:
            self._counted(bad_requests=1)
            self._warn(
                "escape",
                time.monotonic(),
                "chunk request %s for %r leads out of metadata/ and targets/; refused",
                req.id,
                req.path,
            )
            return self._status(
                req.id,
                req.path,
                req.offset,
                "bad_request",
                f"path {req.path!r} is outside the served metadata/ and targets/",
            )
        return req, file

    def read(self, req: FetchRequest, file: Path) -> tuple[FetchHeader, bytes]:
        """The answer to a valid request for ``file`` (``ok``, ``not_found`` or ``error``)."""
        try:
            total, data = read_window(file, req.offset, req.length)
        except FileNotFoundError:
            self._counted(not_found=1)
            return self._status(req.id, req.path, req.offset, "not_found", ""), b""
        except OSError as e:
            self._counted(errors=1)
            log.error("chunk request %s: reading %s failed: %s", req.id, file, e)
            return self._status(
                req.id,
                req.path,
                req.offset,
                "error",
                f"registry could not read the file: {e.strerror}",
            ), b""
        replica = self.replica if req.sticky_ok else None
        return FetchHeader(
            id=req.id, path=req.path, offset=req.offset, total=total, replica=replica
        ), data

    @staticmethod
    def _status(rid: str, path: str, offset: int, status: Any, error: str) -> FetchHeader:
        return FetchHeader(
            id=rid, path=path, offset=offset, total=0, status=status, error=error[:500]
        )
