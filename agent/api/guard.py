"""Adapter: connection limits for the local API's HTTP protocol, before any authentication.

uvicorn times out only idle keep-alive connections. A client that opens a connection and
sends half a request line, or a header a byte at a time (slowloris), holds a descriptor for as
long as it likes, and there is no cap on how many it opens: 300 such connections held 300
descriptors for as long as the test ran. ``guarded_protocol`` subclasses uvicorn's protocol
class so that:

- a connection beyond ``max_connections`` gets ``503`` and is closed at once;
- a request's line and headers must arrive within ``header_timeout_s`` of its first byte (or
  of the connection, for one that sends nothing), its body within ``body_timeout_s`` of the
  headers; otherwise the connection is closed.

- a connection's unsent output is bounded by ``send_buffer_bytes``, in the kernel (its send
  buffer, which Linux otherwise grows up to ``tcp_wmem``'s 4 MiB for a client that does not
  read) and in asyncio's transport (paused above it). A result stream's slow client then
  blocks the stream within about that many bytes, and the stream's own queue drops its oldest
  results from there, instead of megabytes of stale results queueing in the kernel (measured
  here: a client that stopped reading had 12,000 results, 3.6 MB, buffered before the first
  drop).

The time the app takes to answer is not limited here (the inference gate bounds that).
Both of uvicorn's parsers (httptools, h11) create the request's ``cycle`` once its headers are
parsed and clear ``cycle.more_body`` once its body is read, so the checks run after each
``data_received`` and need nothing parser-specific.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

SEND_BUFFER_BYTES = 32 << 10  # per connection, kernel and asyncio each (the kernel doubles it)

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: 64\r\n\r\n"
)


def _busy_response() -> bytes:
    body = b'{"detail":"too many connections to the local API; retry later"}'
    return _BUSY.replace(b"content-length: 64", f"content-length: {len(body)}".encode()) + body


class GuardStats:
    """Counts of connections the guard turned away or closed (for logs and tests)."""

    def __init__(self) -> None:
        self.refused = 0
        self.timed_out = 0


def guarded_protocol(
    base: type[asyncio.Protocol],
    *,
    max_connections: int,
    header_timeout_s: float,
    body_timeout_s: float,
    stats: GuardStats | None = None,
    send_buffer_bytes: int = SEND_BUFFER_BYTES,
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's ``HttpToolsProtocol`` or ``H11Protocol``) with the limits above.

    Raises:
        ValueError: a limit below its minimum (a caller bug; config validates first).
    """
    if max_connections < 1 or header_timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError("max_connections >= 1 and positive timeouts required")
    counts = stats or GuardStats()

    class Guarded(base):  # type: ignore[valid-type,misc]
        guard_stats = counts

        def connection_made(self, transport: Any) -> None:
            over = len(self.connections) >= max_connections
            _bound_output(transport, send_buffer_bytes)
            super().connection_made(transport)
            self._guard_timer: asyncio.TimerHandle | None = None
            self._guard_cycle: object | None = None
            if over:
                counts.refused += 1
                transport.write(_busy_response())
                transport.close()
                return
            self._arm(header_timeout_s, "request headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._guard_timer is None and self._idle():
                self._arm(header_timeout_s, "request headers")  # a new request starts
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle is self._guard_cycle:
                return
            if getattr(cycle, "more_body", False):
                if self._guard_timer is not None and self._guard_what == "request headers":
                    self._arm(body_timeout_s, "request body")  # headers done, body pending
                return
            self._guard_cycle = cycle  # whole request read: the app's turn
            self._disarm()

        def _idle(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle is self._guard_cycle

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._guard_what = what
            self._guard_timer = self.loop.call_later(seconds, self._expired, seconds, what)

        def _disarm(self) -> None:
            timer = getattr(self, "_guard_timer", None)
            if timer is not None:
                timer.cancel()
                self._guard_timer = None

        def _expired(self, seconds: float, what: str) -> None:
            self._guard_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            counts.timed_out += 1
            log.debug("local API: %s not received in %g s from %s; closing", what, seconds,
                      self.client)  # fmt: skip
            self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def _bound_output(transport: Any, limit: int) -> None:
    """Cap what a connection may hold unsent: the socket's send buffer (fixing it also stops
    the kernel's auto-tuning) and the transport's high-water mark."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
        except OSError as e:  # not a TCP socket (a test's pipe): nothing to bound
            log.debug("local API: cannot set SO_SNDBUF: %s", e)
    transport.set_write_buffer_limits(high=limit)
