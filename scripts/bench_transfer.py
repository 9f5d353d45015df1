"""Adapter: throughput of ChunkClient.fetch_file against plain paho publish/subscribe.

Starts its own Mosquitto on a free loopback port (twice: with the broker's default Nagle
setting and with ``set_tcp_nodelay true``), writes a random file, and measures in the same run:

- ``fetch_file``: a ``ChunkServer`` answering a ``ChunkClient`` (64 KiB windows, 8 in flight),
  for each server mode (on paho's thread, and a thread pool);
- ``raw``: one paho client publishing the same bytes as 64 KiB QoS 1 messages to another that
  is subscribed (no requests, no file I/O: the ceiling for MQTT through this broker).

Prints one JSON document; ``ratio`` is fetch_file MB/s over raw MB/s (target ≥ 0.5).

    python -m scripts.bench_transfer [--mb 10] [--runs 3] [--workers 0 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.common.mqtt import make_client
from agent.update.transfer.client import ChunkClient
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto

CHUNK = 64 * 1024


def _client(port: int, client_id: str, inflight: int = 20) -> Any:
    c = make_client(client_id)
    c.max_inflight_messages_set(inflight)  # paho refuses this once connected
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not c.is_connected():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client_id} did not connect")
        time.sleep(0.01)
    return c


def bench_fetch(
    port: int, repo: Path, size: int, workers: int, window: int, runs: int, tmp: Path
) -> tuple[float, float]:
    """Best MB/s of ``runs`` fetch_file calls (no resume dir) and of ``iter_file`` (no disk)."""
    server = ChunkServer(
        repo, f"mqtt://127.0.0.1:{port}", client_id=f"bench-reg-{workers}", workers=workers
    )
    server.start()
    dev = _client(port, f"bench-dev-{workers}")
    try:
        cc = ChunkClient(dev, "bench", chunk_size=CHUNK, window=window)
        cc.fetch_range("targets/blob.bin", 0, 1)  # warm up: subscription, page cache
        best_file = best_iter = 0.0
        for _ in range(runs):
            t = time.perf_counter()
            cc.fetch_file("targets/blob.bin", tmp / "out.bin", max_length=size)
            best_file = max(best_file, size / (time.perf_counter() - t) / 1e6)
            t = time.perf_counter()
            n = sum(len(c) for c in cc.iter_file("targets/blob.bin"))
            best_iter = max(best_iter, n / (time.perf_counter() - t) / 1e6)
        cc.close()
        return best_file, best_iter
    finally:
        dev.disconnect()
        dev.loop_stop()
        server.stop()


def bench_raw(port: int, blob: bytes, runs: int) -> float:
    """Best MB/s of publishing ``blob`` as 64 KiB QoS 1 messages to a subscribed client."""
    n = (len(blob) + CHUNK - 1) // CHUNK
    done = threading.Event()
    got = [0]
    sub = _client(port, "bench-raw-sub")
    pub = _client(port, "bench-raw-pub", inflight=100)  # as the chunk server
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        got[0] += 1
        if got[0] == n:
            done.set()

    sub.on_message = on_message
    sub.subscribe("bench/raw", qos=1)
    subscribed.wait(10)
    best = 0.0
    try:
        for _ in range(runs):
            got[0] = 0
            done.clear()
            t = time.perf_counter()
            for i in range(n):
                pub.publish("bench/raw", blob[i * CHUNK : (i + 1) * CHUNK], qos=1)
            if not done.wait(60):
                raise RuntimeError(f"raw pub/sub: {got[0]} of {n} messages arrived")
            best = max(best, len(blob) / (time.perf_counter() - t) / 1e6)
        return best
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="file size in MB (10^6 bytes)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (best is kept)")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 4],
        help="ChunkServer modes: 0 = paho's thread, N = pool of N",
    )
    ap.add_argument(
        "--window", type=int, nargs="+", default=[8, 16], help="ChunkClient windows in flight"
    )
    args = ap.parse_args()
    size = int(args.mb * 1e6)
    blob = os.urandom(size)
    out: dict[str, Any] = {"file_bytes": size, "chunk": CHUNK, "results": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo"
        (repo / "targets").mkdir(parents=True)
        (repo / "targets" / "blob.bin").write_bytes(blob)
        for nodelay in (False, True):
            broker = Mosquitto(tmp, nodelay=nodelay)
            broker.start()
            try:
                raw = bench_raw(broker.port, blob, args.runs)
                for w, win in ((w, win) for w in args.workers for win in args.window):
                    fetch, stream = bench_fetch(broker.port, repo, size, w, win, args.runs, tmp)
                    out["results"].append(
                        {
                            "broker_set_tcp_nodelay": nodelay,
                            "server_workers": w,
                            "window": win,
                            "fetch_file_MBps": round(fetch, 1),
                            "iter_file_MBps": round(stream, 1),
                            "raw_pubsub_MBps": round(raw, 1),
                            "ratio": round(fetch / raw, 2),
                            "ratio_without_disk": round(stream / raw, 2),
                        }
                    )
            finally:
                broker.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
