"""A network partition between a device and a real broker, on loopback, without root.

``PartitionProxy`` forwards TCP between clients and an upstream (the real Mosquitto). ``cut()``
makes it a black hole, as a failed uplink is: sockets stay open, nothing arrives either way,
new connections are accepted by the kernel but their bytes go nowhere (so an MQTT CONNECT
gets no CONNACK), and only keepalive timeouts tell the client. Bytes read from a socket during
a cut are held, not dropped (TCP would retransmit them), and flow when ``heal()`` is called;
a connection its client gave up on during the cut is closed on both sides then.

iptables/tc would need CAP_NET_ADMIN, which test machines do not give; the proxy needs none.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class PartitionProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self.url = f"mqtt://{self.host}:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.cuts = 0
        threading.Thread(target=self._accept, name="partition-accept", daemon=True).start()

    # --- control -----------------------------------------------------------------------------

    def cut(self) -> None:
        """Partition: from now on nothing passes in either direction."""
        self.cuts += 1
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()  # release pumps waiting for a heal
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    # --- forwarding --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._connect, args=(client,), name="partition-conn", daemon=True
            ).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        self._open.wait()  # a connection made during a cut reaches the broker only on heal
        if self._closed.is_set():
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._drop(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(src, dst), name="partition-pump", daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._open.wait()
                data = src.recv(65536)
                if not data:
                    self._open.wait()  # a close during a cut is seen by the peer on heal
                    break
                self._open.wait()  # read during a cut: held until the heal
                if self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
