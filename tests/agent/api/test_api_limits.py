"""The local API holds its descriptors against slow and half-sent requests (issue 14, item 6).

Real uvicorn on loopback, real sockets: a slowloris client opens many connections and never
finishes a request. Before the guard, 300 such connections held 300 descriptors for as long as
the client wished. Now connections beyond ``max_connections`` get 503 at once, and the rest
are closed ``header_timeout_s`` / ``body_timeout_s`` after they stall.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import Request

from agent.api.app import create_app
from agent.api.server import ApiServer
from agent.config import parse_config
from tests.harness.util import wait_for

HEADER_S, BODY_S, CAP = 0.8, 0.8, 20


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    app = create_app([])

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:  # a route that reads its whole body
        return {"bytes": len(await request.body())}

    srv = ApiServer(
        app,
        "127.0.0.1",
        0,
        http=request.param,
        max_connections=CAP,
        header_timeout_s=HEADER_S,
        body_timeout_s=BODY_S,
    )
    srv.start()
    yield srv
    srv.stop()


def _connect(srv: ApiServer, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    if first:
        s.sendall(first)
    return s


def _closed_by_server(s: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    s.settimeout(within)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        return got


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_slowloris_is_capped_and_timed_out(server: ApiServer) -> None:
    base = _fds()
    half = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    socks = [_connect(server, half) for _ in range(3 * CAP)]
    try:
        # the first CAP are held (for now); every one beyond gets 503 and is closed at once
        answers = [_closed_by_server(s, 0.3) for s in socks[CAP:]]
        assert all(a is not None and a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
        assert server.guard_stats.refused == 2 * CAP
        # the held ones are closed once their headers are late, without a response
        held = [_closed_by_server(s, HEADER_S + 3) for s in socks[:CAP]]
        assert held == [b""] * CAP
        assert server.guard_stats.timed_out == CAP
        # the server's descriptors are back (client sockets are ours: close them first)
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: _fds() <= base + 2, timeout=5), (_fds(), base)
    r = httpx.get(f"{server.url}/healthz", timeout=5)
    assert r.status_code == 200


def test_idle_connection_and_slow_body_are_closed(server: ApiServer) -> None:
    idle = _connect(server)
    body = _connect(
        server,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc",
    )
    try:
        assert _closed_by_server(idle, HEADER_S + 3) == b""
        assert _closed_by_server(body, HEADER_S + BODY_S + 3) == b""
    finally:
        idle.close()
        body.close()
    assert server.guard_stats.timed_out == 2


def test_keep_alive_then_a_stalled_second_request(server: ApiServer) -> None:
    s = _connect(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        s.settimeout(5)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next request stalls mid-header
        assert _closed_by_server(s, HEADER_S + 3) == b""
    finally:
        s.close()


def test_a_slow_but_timely_client_is_served(server: ApiServer) -> None:
    s = _connect(server, b"GET /healthz HTTP/1.1\r\n")
    try:
        time.sleep(HEADER_S / 3)
        s.sendall(b"Host: x\r\n")
        time.sleep(HEADER_S / 3)
        s.sendall(b"\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    assert server.guard_stats.timed_out == 0


def test_a_body_sent_in_time_is_read(server: ApiServer) -> None:
    r = httpx.post(f"{server.url}/echo", content=b"x" * 100_000, timeout=5)
    assert r.status_code == 200 and r.json() == {"bytes": 100_000}


def test_limits_are_config_with_bounds() -> None:
    cfg = parse_config(
        {
            "device_id": "d",
            "pipelines": [],
            "api": {"port": 0, "max_connections": 8, "header_timeout_s": 2},
        }
    )
    assert cfg.api is not None
    assert (cfg.api.max_connections, cfg.api.header_timeout_s, cfg.api.body_timeout_s) == (
        8, 2.0, 30.0)  # fmt: skip
    with pytest.raises(Exception, match="max_connections"):
        parse_config({"device_id": "d", "pipelines": [], "api": {"port": 0, "max_connections": 0}})
