"""Adapter: the local inference API served by uvicorn on a thread of the agent.

The socket is bound here, before uvicorn starts, so a taken port or a bad address is an
``EdgefleetError`` raised by ``start()`` (uvicorn itself would ``sys.exit`` in its thread).
``stop()`` sets uvicorn's ``should_exit`` and joins; the worker pool is shut down after the
server, so requests in flight finish first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Sequence

from fastapi import FastAPI

from agent.api.app import create_app
from agent.api.guard import GuardStats, guarded_protocol
from agent.common.errors import ConfigError, EdgefleetError
from agent.config import ApiConfig
from agent.pipeline.clips import ClipLibrary
from agent.pipeline.runner import Pipeline

log = logging.getLogger(__name__)


def resolve_token(cfg: ApiConfig) -> str | None:
    """The bearer token: ``token``, or read from ``token_file`` (once, at start-up).

    Raises:
        ConfigError: the token file is unreadable or holds fewer than 16 characters.
    """
    if cfg.token_file is None:
        return cfg.token
    try:
        token = cfg.token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"[api] token_file {cfg.token_file}: {e}", field="api.token_file") from e
    if len(token) < 16:
        raise ConfigError(
            f"[api] token_file {cfg.token_file} holds {len(token)} characters, "
            "expected a token of at least 16",
            field="api.token_file",
        )
    return token


def _protocol_class(http: str) -> type[asyncio.Protocol]:
    if http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    raise ValueError(f"http must be 'httptools' or 'h11', got {http!r}")


class ApiServer:
    """uvicorn ``Server`` for one app, on a daemon thread."""

    def __init__(
        self,
        app: FastAPI,
        addr: str,
        port: int,
        *,
        http: str = "httptools",
        max_connections: int = 64,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.http = http  # uvicorn's HTTP parser: "httptools" (a dependency) or "h11"
        self.guard_stats = GuardStats()
        self.protocol = guarded_protocol(
            _protocol_class(http),
            max_connections=max_connections,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
            stats=self.guard_stats,
        )
        self.addr = addr
        self.requested_port = port
        self.port = port
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @classmethod
    def from_config(
        cls, cfg: ApiConfig, pipelines: Sequence[Pipeline], clips: ClipLibrary | None = None
    ) -> ApiServer:
        """The server for ``[api]``; reads the token (file) once, here.

        Raises:
            ConfigError: the token file is unusable.
        """
        app = create_app(
            pipelines,
            token=resolve_token(cfg),
            max_concurrent=cfg.max_concurrent,
            max_queue=cfg.max_queue,
            max_body_bytes=int(cfg.max_body_mb * (1 << 20)),
            max_image_pixels=int(cfg.max_image_mpix * 1e6),
            clips=clips,
            max_streams=cfg.max_streams,
            stream_queue=cfg.stream_queue,
        )
        return cls(
            app,
            cfg.addr,
            cfg.port,
            max_connections=cfg.max_connections,
            header_timeout_s=cfg.header_timeout_s,
            body_timeout_s=cfg.body_timeout_s,
        )

    def pipelines_changed(self) -> None:
        """The agent added, removed or restarted pipelines: result feeds follow (the routes
        read the live list at each request)."""
        self.app.state.streams.sync()

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind and serve; returns once uvicorn accepts connections.

        Raises:
            EdgefleetError: the address cannot be bound or the server did not start in time.
        """
        import uvicorn

        family = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted sockets
        # only when proto says TCP; without it every keep-alive response waited for the
        # client's delayed ACK (44 ms per request, measured here).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.addr.strip("[]"), self.requested_port))
        except OSError as e:
            sock.close()
            raise EdgefleetError(f"[api] cannot bind {self.addr}:{self.requested_port}: {e}") from e
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            http=self.protocol,  # uvicorn's protocol for self.http, with the guard's limits
            lifespan="off",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="api-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise EdgefleetError(f"[api] server on {self.url} did not start")
            time.sleep(0.01)
        log.info("local inference API on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """End the result streams, stop accepting, let requests in flight finish (up to
        uvicorn's grace), join."""
        # streams first: each sends its end event and completes, so uvicorn's graceful
        # shutdown does not wait its grace period out on them
        self.app.state.streams.close()
        server = self._server
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.app.state.gate.close()
