"""Adapter: the fleet web page and its JSON API, a WSGI app over the ingest ``Store``.

``GET /`` is a static page (``fleet.html``, vanilla JS) that polls ``GET /api/fleet`` (each
device with its pipelines and its configuration: the running one's hash, how the last remote
one went and why; never the document) and
``GET /api/counts?minutes=N`` (zone and line counts, and how much they grew in the last N
minutes) and draws ``GET /api/devices/<id>/telemetry?minutes=N`` as SVG charts. Served by the
standard library (``wsgiref`` with one thread per request, so a slow client does not hold up
the others) on loopback by default: the page has no authentication, put a proxy in front to
share it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qsl
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from agent.common.errors import BadDataError
from agent.protocol.sealed import redact
from agent.protocol.topics import valid_device_id
from cloud_sync.ingest.db import StoreUnavailable
from cloud_sync.ingest.store import Store

log = logging.getLogger(__name__)

MINUTES_DEFAULT, MINUTES_MAX = 60, 7 * 24 * 60
StartResponse = Callable[..., Any]
# The page is inline script and style only; it may talk to this server and nothing else.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


class HttpError(Exception):
    """An answer other than 200, with the message the JSON body carries."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parse_minutes(raw: str | None) -> int:
    """The ``minutes`` query parameter: an integer in 1..MINUTES_MAX, MINUTES_DEFAULT if absent.

    Raises:
        HttpError: 400 with what was expected and what came.
    """
    if raw is None or raw == "":
        return MINUTES_DEFAULT
    try:
        minutes = int(raw)
    except ValueError:
        minutes = 0
    if not 1 <= minutes <= MINUTES_MAX:
        raise HttpError(
            400, f"minutes must be an integer from 1 to {MINUTES_MAX}, got {raw[:40]!r}"
        )
    return minutes


def parse_tags(values: Iterable[str]) -> dict[str, str]:
    """``tag=KEY=VALUE`` query parameters → a tag filter.

    Raises:
        HttpError: 400 for a tag without ``=``.
    """
    tags = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise HttpError(400, f"tag must be KEY=VALUE, got {v[:80]!r}")
        tags[key] = value
    return tags


def _masked(device: dict[str, Any]) -> dict[str, Any]:
    """``device`` with its configuration's reason ``redact``-ed once more (URL passwords,
    sealed tokens): agents mask it, but an older or faulty one must not put a secret on the
    page."""
    config = device.get("config")
    if isinstance(config, dict) and isinstance(config.get("reason"), str):
        device = {**device, "config": {**config, "reason": redact(config["reason"])}}
    return device


class FleetApp:
    """The WSGI application: routes, JSON encoding, and store errors mapped to statuses."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._page = (resources.files("cloud_sync.ingest") / "fleet.html").read_bytes()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        try:
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"{method} not allowed, only GET")
            if path in ("/", "/index.html"):
                return self._send(start_response, 200, "text/html; charset=utf-8", self._page)
            parts = path.split("/")  # "", "api", "devices", ID, "snapshot.jpg"
            if parts[:3] == ["", "api", "devices"] and parts[4:] == ["snapshot.jpg"]:
                jpeg = self._snapshot(parts[3], dict(query).get("pipeline"))
                return self._send(start_response, 200, "image/jpeg", jpeg)
            body = self._api(path, query)
            status = 200
        except HttpError as e:
            status, body = e.status, {"error": str(e)}
        except StoreUnavailable as e:
            status, body = 503, {"error": str(e)}
        except BadDataError as e:  # e.g. a database schema newer than this code
            status, body = 500, {"error": str(e)}
        except Exception:
            log.exception("fleet web: %s %s failed", method, path)
            status, body = 500, {"error": f"internal error answering {path}; see the server log"}
        data = json.dumps(body, default=_json_default).encode()
        return self._send(start_response, status, "application/json", data)

    def _api(self, path: str, query: list[tuple[str, str]]) -> Any:
        """The JSON body for an API path.

        Raises:
            HttpError: 404 for an unknown path or device, 400 for bad parameters.
        """
        if path == "/api/fleet":
            tags = parse_tags(v for k, v in query if k == "tag")
            return [_masked(d) for d in self.store.fleet(tag_filter=tags or None)]
        if path == "/api/counts":
            return self._counts(dict(query).get("minutes"))
        parts = path.split("/")  # "", "api", "devices", ID, "telemetry"
        if len(parts) == 5 and parts[:3] == ["", "api", "devices"] and parts[4] == "telemetry":
            return self._telemetry(parts[3], dict(query).get("minutes"))
        raise HttpError(404, f"no such page: {path[:200]}")

    def _snapshot(self, device_id: str, pipeline: str | None) -> bytes:
        """The newest camera snapshot (JPEG) of a device that opted in to snapshots."""
        snap = None
        if valid_device_id(device_id):
            snap = self.store.latest_snapshot(device_id, pipeline)
        if snap is None:
            which = f" pipeline {pipeline[:64]!r}" if pipeline else ""
            raise HttpError(404, f"no snapshot of device {device_id[:64]!r}{which}")
        return bytes(snap["jpeg"])

    def _counts(self, minutes_raw: str | None) -> dict[str, Any]:
        """Every device's latest zone/line counts and their increase over ``minutes``."""
        from cloud_sync.ingest.counts_view import merge_counts

        minutes = parse_minutes(minutes_raw)
        since = self.clock() - timedelta(minutes=minutes)
        rows = merge_counts(self.store.latest_counts(), self.store.count_increase(since))
        return {"minutes": minutes, "since": since, "counts": rows}

    def _telemetry(self, device_id: str, minutes_raw: str | None) -> dict[str, Any]:
        minutes = parse_minutes(minutes_raw)
        since = self.clock() - timedelta(minutes=minutes)
        series = self.store.series(device_id, since) if valid_device_id(device_id) else None
        if series is None:
            raise HttpError(404, f"unknown device {device_id[:64]!r}")
        return {"device_id": device_id, "minutes": minutes, "since": since, **series}

    @staticmethod
    def _send(start: StartResponse, status: int, ctype: str, body: bytes) -> list[bytes]:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]  # fmt: skip
        start(f"{status} {reason}", [
            ("Content-Type", ctype), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", CSP),
        ])  # fmt: skip
        return [body]


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log, not stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fleet web %s %s", self.address_string(), format % args)


class FleetWebServer(ThreadingMixIn, WSGIServer):
    """``wsgiref``'s server with a thread per request; ``stop()`` shuts it down and closes it."""

    daemon_threads = True  # a hung client must not keep the process alive
    thread: threading.Thread | None = None

    def stop(self) -> None:
        """Stop serving, close the listening socket and wait for the serving thread."""
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(5)


def serve_web(store: Store, port: int, addr: str = "127.0.0.1") -> FleetWebServer:
    """Serve the fleet page on ``http://addr:port/`` from a daemon thread; ``stop()`` ends it.

    Raises:
        OSError: the port cannot be bound.
    """
    server = make_server(
        addr, port, FleetApp(store), server_class=FleetWebServer, handler_class=_QuietHandler
    )
    server.thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fleet-web", daemon=True
    )
    server.thread.start()
    log.info("fleet web page on http://%s:%s/", addr, port)
    return server
