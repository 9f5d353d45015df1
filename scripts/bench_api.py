"""Benchmark: the local inference API against calling the model directly, in one run.

Builds a 224x224 image classifier with ``onnx.helper`` (a strided conv stack, global pooling
and a 1000-class head: no download), opens it as a ``RunnableModel`` on ONNX Runtime and
measures, on the same JPEG image:

1. direct: ``RunnableModel.infer(frame)`` from ``--clients`` threads (the frame decoded once);
   and direct+decode: ``cv2.imdecode`` of the JPEG, then ``infer``, per call (what an app
   linking the model in-process would pay for the same bytes);
2. API: ``POST /v1/models/bench/infer`` with the JPEG bytes from ``--clients`` keep-alive
   HTTP connections in a separate client process (an app on the device is its own process),
   served by the agent's ``ApiServer`` over a ``Pipeline`` holding the same model.

The two phases alternate for ``--rounds`` rounds of ``--seconds`` each (after a warm-up), so
both see the same background load on a shared machine; the report gives each round's ratio and
the medians. Besides wall-clock throughput it reports the CPU time this process spends per
request (``time.process_time``: inference threads, and for the API also the server, JPEG
decoding and JSON; the client process is not counted), which a busy machine disturbs far less.
The API path decodes the JPEG per request (the direct path does not): that is part of what
the API costs. Prints one JSON document on stdout (``--json``) or a summary.

    python -m scripts.bench_api [--clients 4] [--rounds 5] [--seconds 4] [--width 32] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from onnx import TensorProto, helper

from agent.api.app import create_app
from agent.api.payload import parse_npy
from agent.api.server import ApiServer
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline, claim_cores_for_inference
from agent.pipeline.sources import parse_source
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec
from cloud_sync.samples.common import init_tensor, save_model

GOAL_RATIO = 0.8
SIZE = 224
CLASSES = 1000


def build_classifier(out_dir: Path, width: int = 32) -> Path:
    """A 224x224x3 → 1000-logit classifier: 5 stride-2 3x3 convs (ReLU), GAP, Gemm.

    Returns the model folder (``model.onnx`` and ``card.json``).
    """
    rng = np.random.default_rng(7)
    nodes, inits = [], []
    chans = [3, width, width * 2, width * 4, width * 8, width * 8]
    x = "input"
    for i in range(5):
        cin, cout = chans[i], chans[i + 1]
        w = rng.normal(0, (2 / (9 * cin)) ** 0.5, (cout, cin, 3, 3))
        inits += [init_tensor(f"w{i}", w), init_tensor(f"b{i}", np.zeros(cout))]
        nodes.append(
            helper.make_node(
                "Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2, 2]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    inits += [
        init_tensor("fc_w", rng.normal(0, 0.05, (chans[-1], CLASSES))),
        init_tensor("fc_b", np.zeros(CLASSES)),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench224",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        inits,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(graph, out_dir / "model.onnx")
    card = ModelCard(
        name="bench224",
        version="1.0.0",
        task="classification",
        input=InputSpec(
            width=SIZE,
            height=SIZE,
            resize="stretch",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        postprocess=PostprocessSpec(top_k=5, softmax=True),
        labels=tuple(f"class_{i}" for i in range(CLASSES)),
    )
    (out_dir / "card.json").write_text(card.model_dump_json(indent=2))
    return out_dir


def test_image() -> bytes:
    """A 640x480 JPEG with some structure (gradients, shapes, noise)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([(xx * 255 / 640), (yy * 255 / 480), ((xx + yy) % 256)], axis=-1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    cv2.circle(img, (320, 240), 90, (20, 200, 60), -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _stats(latencies_ms: list[float], seconds: float) -> dict[str, float]:
    arr = np.asarray(latencies_ms)
    return {
        "requests": len(arr),
        "rps": round(len(arr) / seconds, 1),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p95_ms": round(float(np.percentile(arr, 95)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
    }


def _decode(body: bytes, kind: str) -> np.ndarray:
    if kind == "npy":
        return parse_npy(body)
    return np.asarray(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR))


def bench_direct(
    model: RunnableModel,
    frame: np.ndarray,
    clients: int,
    seconds: float,
    body: bytes = b"",
    kind: str = "jpeg",
) -> dict:
    """``clients`` threads calling ``model.infer`` (``infer_tensor`` for npy) for ``seconds``,
    decoding ``body`` first each time when given."""
    run = model.infer_tensor if kind == "npy" else model.infer
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            run(_decode(body, kind) if body else frame)
            lat[i].append((time.perf_counter() - t) * 1e3)

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = _stats([x for part in lat for x in part], time.perf_counter() - t0)
    out["cpu_ms_per_request"] = round((time.process_time() - c0) * 1e3 / out["requests"], 3)
    return out


def _client_process(
    port: int, body: bytes, ctype: str, clients: int, seconds: float, q: Any
) -> None:
    """In a child process: ``clients`` keep-alive connections posting ``body``."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    headers = {"Content-Type": ctype}
    path = "/v1/models/bench/infer"

    def loop(i: int, until: float, record: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while time.perf_counter() < until:
                t = time.perf_counter()
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if record:
                    lat[i].append((time.perf_counter() - t) * 1e3)
                    if resp.status != 200:
                        errors[i] += 1
        finally:
            conn.close()

    def phase(until: float, record: bool) -> float:
        t0 = time.perf_counter()
        ts = [threading.Thread(target=loop, args=(i, until, record)) for i in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0

    phase(time.perf_counter() + 1.0, False)  # warm-up
    q.put("measuring")
    elapsed = phase(time.perf_counter() + seconds, True)
    q.put({**_stats([x for part in lat for x in part], elapsed), "errors": sum(errors)})


def bench_api(port: int, body: bytes, ctype: str, clients: int, seconds: float) -> dict:
    """One API phase against the server on ``port``, driven from a client process; the
    server's CPU time (this process) is taken over the measured part only."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(port, body, ctype, clients, seconds, q))
    proc.start()
    try:
        assert q.get(timeout=120) == "measuring"
        c0 = time.process_time()
        result: dict = q.get(timeout=seconds + 120)
        cpu = time.process_time() - c0
    finally:
        proc.join(30)
    result["cpu_ms_per_request"] = round(cpu * 1e3 / max(1, result["requests"]), 3)
    return result


def _median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating direct/API rounds")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured time per phase")
    ap.add_argument("--width", type=int, default=32, help="first conv's channels (model cost)")
    ap.add_argument("--max-concurrent", type=int, default=2, help="[api] max_concurrent")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    ap.add_argument("--payload", choices=["jpeg", "npy"], default="jpeg", help="request body")
    ap.add_argument("--http", default="httptools", help="uvicorn HTTP parser: httptools, h11")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)

    claim_cores_for_inference()  # as the agent does
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_classifier(Path(tmp) / "bench224", args.width)
        backend = OnnxRuntimeBackend(folder / "model.onnx", threads=args.threads)
        card = ModelCard.model_validate_json((folder / "card.json").read_text())
        model = RunnableModel(card, backend)
        jpeg = test_image()
        frame = _decode(jpeg, "jpeg")
        kind, ctype, body = args.payload, "image/jpeg", jpeg
        if kind == "npy":  # the preprocessed tensor: the API skips decoding and preprocessing
            frame, _ = model.preprocessor(frame)
            out = io.BytesIO()
            np.save(out, frame, allow_pickle=False)
            ctype, body = "application/x-npy", out.getvalue()
        run = model.infer_tensor if kind == "npy" else model.infer
        for _ in range(20):
            _, times = run(frame)
        t0 = time.perf_counter()
        for _ in range(100):
            _decode(body, kind)
        decode_ms = (time.perf_counter() - t0) / 100 * 1e3
        pipe = Pipeline("bench", parse_source("0"), model)  # never started: no camera here
        app = create_app([pipe], max_concurrent=args.max_concurrent, max_queue=64)
        server = ApiServer(app, "127.0.0.1", 0, http=args.http)
        server.start()
        direct, decode, api = [], [], []
        try:
            for _ in range(args.rounds):
                direct.append(bench_direct(model, frame, args.clients, args.seconds, b"", kind))
                decode.append(bench_direct(model, frame, args.clients, args.seconds, body, kind))
                api.append(bench_api(server.port, body, ctype, args.clients, args.seconds))
        finally:
            server.stop()
            model.close()
    ratios = [round(a["rps"] / d["rps"], 3) for a, d in zip(api, direct, strict=True)]
    ratios_decode = [round(a["rps"] / d["rps"], 3) for a, d in zip(api, decode, strict=True)]
    summary = {
        name: {k: _median(rows, k) for k in ("rps", "p50_ms", "p95_ms", "cpu_ms_per_request")}
        for name, rows in (("direct", direct), ("direct_decode", decode), ("api", api))
    }
    ratio = statistics.median(ratios)
    ratio_decode = statistics.median(ratios_decode)
    cpu_ratio = summary["direct"]["cpu_ms_per_request"] / summary["api"]["cpu_ms_per_request"]
    errors = sum(a["errors"] for a in api)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        },
        "model": {
            "input": f"1x3x{SIZE}x{SIZE}",
            "classes": CLASSES,
            "width": args.width,
            "backend": backend.info.name,
            "version": backend.info.version,
            "infer_ms": round(times.infer, 2),
            "preprocess_ms": round(times.preprocess, 2),
        },
        "payload": {
            "kind": kind,
            "bytes": len(body),
            "image": "640x480 JPEG" if kind == "jpeg" else "none (preprocessed tensor)",
            "decode_ms": round(decode_ms, 2),
        },
        "http": args.http,
        "clients": args.clients,
        "max_concurrent": args.max_concurrent,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "median": summary,
        "throughput_ratio_per_round": ratios,
        "throughput_ratio": round(ratio, 3),
        "throughput_ratio_per_round_vs_direct_decode": ratios_decode,
        "throughput_ratio_vs_direct_decode": round(ratio_decode, 3),
        "cpu_ratio": round(cpu_ratio, 3),
        "p95_overhead_ms": round(summary["api"]["p95_ms"] - summary["direct"]["p95_ms"], 2),
        "api_errors": errors,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO and errors == 0,
        "direct": direct,
        "direct_decode": decode,
        "api": api,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in summary.items():
            print(
                f"{name:>13}: {row['rps']} req/s, p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms,"
                f" {row['cpu_ms_per_request']} ms CPU/request"
            )
        print(
            f"API/direct {ratio:.2f} (rounds {ratios}; goal {GOAL_RATIO}), API/direct+decode "
            f"{ratio_decode:.2f} (rounds {ratios_decode}); CPU ratio {cpu_ratio:.2f}; "
            f"{errors} API errors; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
