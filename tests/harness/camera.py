"""A password-protected network camera on loopback: an HTTP server with Basic authentication
that streams a video ffmpeg encoded as MPEG-TS, looped at its frame rate, as long as the
client reads (``http://USER:PASSWORD@127.0.0.1:PORT/cam.ts``). OpenCV's FFmpeg backend opens
it with the credentials of the URL (FFmpeg answers the 401 challenge with Basic auth).

Why HTTP and not RTSP: FFmpeg can be an RTSP server only with ``-rtsp_flags listen``, one
client at a time and without authentication; IP cameras serve both, and the device's source
handling (URL with ``user:password@``, FFmpeg, reconnect) is the same code for either.

``set_password`` rotates the camera's password the way a camera does: every stream open
with the old one is cut, the old one is refused (401) from then on. The server never keeps a
password it was sent: it counts accepted and refused requests per password generation.
"""

from __future__ import annotations

import base64
import hmac
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.util import require_binary

TS_PACKET = 188
BURST_LOOPS = 3


def encode_ts(video: Path, out: Path, fps: int) -> Path:
    """``video`` re-encoded by ffmpeg as MPEG-TS (MPEG-2 video, a key frame every frame, so a
    client that joins at any packet decodes at once) at ``fps``."""
    subprocess.run(
        [require_binary("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-i", str(video),
         "-r", str(fps), "-c:v", "mpeg2video", "-q:v", "4", "-g", "1", "-f", "mpegts", str(out)],
        check=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    return out


class AuthCamera:
    """The camera (see the module docstring); ``url(password)`` is what a device opens."""

    def __init__(self, ts: Path, seconds: float, user: str, password: str) -> None:
        self.data = ts.read_bytes()
        self.seconds = seconds  # the file's duration: the stream is paced to it
        self.user = user
        self._password = password
        self.generation = 0  # bumped by set_password: open streams of an older one end
        self.lock = threading.Lock()
        self.accepted: dict[int, int] = {}  # generation -> requests served
        self.refused = 0  # requests with missing or wrong credentials (401)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> AuthCamera:
        self._thread.start()
        return self

    def url(self, password: str) -> str:
        return f"http://{self.user}:{password}@127.0.0.1:{self.port}/cam.ts"

    def set_password(self, password: str) -> None:
        with self.lock:
            self._password = password
            self.generation += 1

    def served(self, generation: int) -> int:
        with self.lock:
            return self.accepted.get(generation, 0)

    def _authorized(self, header: str | None) -> int | None:
        """The password generation ``header`` (``Authorization``) is good for, else None."""
        with self.lock:
            want = base64.b64encode(f"{self.user}:{self._password}".encode()).decode()
            if header and hmac.compare_digest(header.encode(), f"Basic {want}".encode()):
                self.accepted[self.generation] = self.accepted.get(self.generation, 0) + 1
                return self.generation
            self.refused += 1
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the stream ends when the connection does

            def log_message(self, *args: Any) -> None:  # quiet; nothing of a request is kept
                pass

            def do_GET(self) -> None:
                gen = camera._authorized(self.headers.get("Authorization"))
                if gen is None:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.end_headers()
                camera._stream(self.wfile, gen)

        return Handler

    def _stream(self, out: Any, gen: int) -> None:
        """Write the TS file over and over at its own pace until the client goes, the
        password changes or the server stops."""
        chunk = TS_PACKET * 7
        pieces = [self.data[i : i + chunk] for i in range(0, len(self.data), chunk)]
        period = self.seconds / len(pieces)
        try:
            # the first loops at once: FFmpeg probes a few seconds of stream before it opens
            # (analyzeduration), as a camera's buffered GOP lets a client start at once
            for _ in range(BURST_LOOPS):
                out.write(self.data)
            due = time.monotonic()
            while self.generation == gen and not self._closing:
                for piece in pieces:
                    if self.generation != gen or self._closing:
                        return
                    out.write(piece)
                    due += period
                    time.sleep(max(0.0, due - time.monotonic()))
        except OSError:  # the client went away
            return

    _closing = False

    def close(self) -> None:
        self._closing = True
        self.server.shutdown()
        self.server.server_close()
