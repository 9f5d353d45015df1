"""The local inference API against a running Agent on a loopback port: real ONNX Runtime models,
real JPEG/PNG made by OpenCV, a real HTTP client (httpx), schemathesis on the served document."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.openapi import render_openapi
from agent.api.payload import PayloadError, identify, image_size, parse_npy
from agent.api.server import resolve_token
from agent.common.errors import ConfigError, ModelError
from agent.config import parse_config
from agent.engine.base import Backend
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.model import RunnableModel, card_for_local_model
from agent.pipeline.runner import Pipeline
from agent.service import Agent

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "s3cret-token-for-tests-0123456789"

pytestmark = pytest.mark.video


# --- helpers ----------------------------------------------------------------------------------


def _runnable(
    path: Path, wrap: Callable[[Backend], Backend] | None = None, **card: Any
) -> RunnableModel:
    real = OnnxRuntimeBackend(path)
    c = card_for_local_model(path, real)
    if card:
        c = c.model_copy(update=card)
    return RunnableModel(c, wrap(real) if wrap is not None else real)


class _Wrap(Backend):
    """Delegates to a real backend; subclasses add behaviour around ``_run``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.inputs, self.outputs, self.info = inner.inputs, inner.outputs, inner.info
        self.closed = False

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.inner.run(feeds)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class StrictClose(_Wrap):
    """Fails every run after ``close`` (as a TensorRT engine whose buffers were freed would),
    and takes long enough that swaps land while requests are in flight."""

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.closed:
            raise ModelError("backend used after close", reason="closed")
        time.sleep(0.003)
        if self.closed:
            raise ModelError("backend closed during run", reason="closed")
        return self.inner.run(feeds)


class Blocking(_Wrap):
    """Blocks each run until ``release`` is set; ``entered`` tells a run is waiting."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.entered.set()
        self.release.wait(30)
        return self.inner.run(feeds)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for this module's agents (one at a time): engines are built once."""
    return tmp_path_factory.mktemp("api-data")


def _agent(data_dir: Path, pipelines: list[dict[str, Any]], api: dict[str, Any]) -> Agent:
    cfg = parse_config(
        {
            "device_id": "api-test",
            "data_dir": str(data_dir),
            "profile": "x86-cpu",
            "engine": {"type": "onnxruntime"},
            "pipelines": pipelines,
            "api": {"port": 0, **api},
        }
    )
    agent = Agent(cfg)
    agent.start()
    return agent


def _pipe(name: str, model: str | Path, video: Path) -> dict[str, Any]:
    return {"name": name, "source": str(video), "model": str(model), "loop": True}


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


def _expected(model: RunnableModel, pipeline: str, image: np.ndarray) -> dict[str, Any]:
    result, _ = model.infer(image)
    return {
        "pipeline": pipeline,
        "model": model.card.name,
        "version": model.card.version,
        **result.to_dict(),
    }


def _strip(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "latency_ms"}


def _digits(test_models: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(test_models["digits"] / "test_set.npz")
    return z["images"], z["labels"]


def _blob_image(model_script: Any, x: int = 200, y: int = 150) -> np.ndarray:
    return np.asarray(model_script.blob_frame((640, 480), (x, y, x + 60, y + 60)))


# --- the shared agent: two real pipelines, a 6 MiB body limit -------------------


@pytest.fixture(scope="module")
def agent(test_models: dict[str, Path], synthetic_video: Path, data_dir: Path) -> Iterator[Agent]:
    a = _agent(
        data_dir,
        [
            _pipe("digits", test_models["digits"] / "model.onnx", synthetic_video),
            _pipe("blob", test_models["blobdet"] / "model.onnx", synthetic_video),
        ],
        {"max_body_mb": 6, "max_concurrent": 2, "max_queue": 16},
    )
    yield a
    a.stop()


@pytest.fixture
def client(agent: Agent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.api.url, timeout=30) as c:
        yield c


def _pipeline(agent: Agent, name: str) -> Pipeline:
    return next(p for p in agent.pipelines if p.name == name)


# --- happy paths ------------------------------------------------------------------------------


def test_health_models_and_openapi(client: httpx.Client, agent: Agent) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "reasons": []}
    models = {m["pipeline"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"digits", "blob"}
    d, b = models["digits"], models["blob"]
    assert (d["name"], d["version"], d["task"], d["backend"]) == (
        "digits",
        "1.0.0",
        "classification",
        "onnxruntime",
    )
    assert d["precision"] == _pipeline(agent, "digits").model.backend.info.precision  # type: ignore[union-attr]
    assert d["tensor"] == {"shape": [1, 1, 8, 8], "dtype": "float32"}
    assert d["input"]["width"] == 8 and d["labels"][:2] == ["0", "1"]
    assert (b["task"], b["tensor"]["shape"], b["ready"]) == ("detection", [1, 3, 640, 640], True)
    assert client.get("/openapi.json").json() == json.loads(render_openapi())


def test_committed_openapi_is_current() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert committed == render_openapi(), (
        "docs/openapi.json is stale: run `python -m agent.api.openapi docs/openapi.json` "
        "and commit the result"
    )


@pytest.mark.parametrize("encode", [_jpeg, _png], ids=["jpeg", "png"])
def test_detection_on_an_image_equals_the_pipeline_model(
    client: httpx.Client, agent: Agent, model_script: Any, encode: Any
) -> None:
    pipe = _pipeline(agent, "blob")
    body = encode(_blob_image(model_script))
    ctype = "image/jpeg" if encode is _jpeg else "image/png"
    want = _expected(pipe.model, "blob", cv2.imdecode(np.frombuffer(body, np.uint8), 1))  # type: ignore[arg-type]
    assert want["detections"], "the square must be found"
    for url in ("/v1/models/blob/infer", "/v1/models/blobdet/infer"):  # pipeline or model
        r = client.post(url, content=body, headers={"content-type": ctype})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["latency_ms"] > 0
        assert _strip(got) == want
    # the same as the 'file' part of a multipart form
    r = client.post("/v1/models/blob/infer", files={"file": ("x", body, ctype)})
    assert r.status_code == 200, r.text
    assert _strip(r.json()) == want


def test_classification_accuracy_through_the_api_equals_direct(
    client: httpx.Client, agent: Agent, test_models: dict[str, Path]
) -> None:
    images, labels = _digits(test_models)
    images, labels = images[:120], labels[:120]
    model = _pipeline(agent, "digits").model
    assert model is not None
    direct, api = [], []
    for img in images:
        frame = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        want = _expected(model, "digits", frame)
        r = client.post(
            "/v1/models/digits/infer", content=_png(img), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text
        assert _strip(r.json()) == want
        direct.append(int(want["classifications"][0]["label"]))
        api.append(int(r.json()["classifications"][0]["label"]))
    direct_acc = float(np.mean(np.array(direct) == labels))
    api_acc = float(np.mean(np.array(api) == labels))
    assert direct_acc >= 0.9
    assert api_acc == direct_acc and api == direct


def test_npy_tensor_skips_preprocessing_same_result(
    client: httpx.Client, agent: Agent, test_models: dict[str, Path], model_script: Any
) -> None:
    images, _ = _digits(test_models)
    model = _pipeline(agent, "digits").model
    assert model is not None
    for img in images[:10]:
        frame = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        tensor, _ = model.preprocessor(frame)
        want = _expected(model, "digits", frame)
        r = client.post(
            "/v1/models/digits/infer",
            content=_npy(tensor),
            headers={"content-type": "application/x-npy"},
        )
        assert r.status_code == 200, r.text
        assert _strip(r.json()) == want
    # multipart with a generic type is sniffed; detection boxes stay in model-input pixels
    blob = _pipeline(agent, "blob").model
    assert blob is not None
    tensor, _ = blob.preprocessor(_blob_image(model_script))
    r = client.post("/v1/models/blob/infer", files={"file": ("t.npy", _npy(tensor))})
    assert r.status_code == 200, r.text
    direct, _ = blob.infer_tensor(tensor)
    assert _strip(r.json()) == {
        "pipeline": "blob",
        "model": "blobdet",
        "version": "1.0.0",
        **direct.to_dict(),
    }
    assert direct.detections


# --- errors -----------------------------------------------------------------------------------


def _png_header_only(w: int, h: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )


@pytest.mark.parametrize(
    ("body", "ctype", "status", "words"),
    [
        (b"\xff\xd8\xff\xe0" + b"garbage" * 20, "image/jpeg", 400, "JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 400, "PNG"),
        (_png_header_only(64, 64) + b"junk", "image/png", 400, "decode"),
        (b"hello, not an image", "image/png", 400, "not a JPEG, PNG or .npy"),
        (b"", "image/png", 400, "empty"),
        (_png(np.zeros((8, 8, 3), np.uint8)), "image/jpeg", 400, "says image/jpeg"),
        (b"{}", "application/json", 415, "not supported"),
        (_png_header_only(60000, 60000), "image/png", 413, "megapixels"),
        (_npy(np.zeros((1, 1, 8, 9), np.float32)), "application/x-npy", 422, "shape [1, 1, 8, 9]"),
        (_npy(np.zeros((1, 1, 8, 8), np.float64)), "application/x-npy", 400, "float64"),
        (_npy(np.zeros((1, 1, 8, 8), np.uint8)), "application/x-npy", 422, "dtype uint8"),
        (_npy(np.zeros((1, 1, 8, 8), np.float32))[:-4], "application/x-npy", 400, "body holds"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': 'O'}  \n", "application/x-npy", 400, ".npy"),
        (b"x" * (7 << 20), "image/png", 413, "exceeds the limit"),
    ],
    ids=[
        "bad-jpeg",
        "png-not-image",
        "png-truncated",
        "text-as-png",
        "empty",
        "type-mismatch",
        "json",
        "png-bomb",
        "tensor-shape",
        "tensor-float64",
        "tensor-uint8",
        "tensor-short",
        "npy-object",
        "too-large",
    ],
)
def test_bad_requests_get_a_clear_json_error(
    client: httpx.Client, body: bytes, ctype: str, status: int, words: str
) -> None:
    r = client.post("/v1/models/digits/infer", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_too_large_without_content_length_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"\x89PNG\r\n\x1a\n" + b"y" * (64 << 10)

    r = client.post(
        "/v1/models/digits/infer", content=chunks(), headers={"content-type": "image/png"}
    )
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_unknown_model_and_route(client: httpx.Client) -> None:
    r = client.post("/v1/models/nope/infer", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 404
    assert "no pipeline or model named 'nope'" in r.json()["error"]
    assert "digits" in r.json()["error"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/models/digits/infer", files={"other": ("x", b"y")})
    assert r.status_code == 400 and "'file' part" in r.json()["error"]


def test_over_the_limit_is_429_with_retry_after(
    data_dir: Path, test_models: dict[str, Path], synthetic_video: Path
) -> None:
    a = _agent(
        data_dir,
        [_pipe("digits", test_models["digits"] / "model.onnx", synthetic_video)],
        {"max_concurrent": 1, "max_queue": 0},
    )
    try:
        pipe = a.pipelines[0]
        blocking = _runnable(test_models["digits"] / "model.onnx", Blocking)
        assert isinstance(blocking.backend, Blocking)
        pipe.stop()  # the camera loop would take the blocking model's one slot
        old = pipe.swap_model(blocking)
        body = _png(np.zeros((8, 8), np.uint8))
        with httpx.Client(base_url=a.api.url, timeout=30) as c, ThreadPoolExecutor(1) as ex:
            first = ex.submit(
                c.post,
                "/v1/models/digits/infer",
                content=body,
                headers={"content-type": "image/png"},
            )
            assert blocking.backend.entered.wait(10)
            r = c.post(
                "/v1/models/digits/infer", content=body, headers={"content-type": "image/png"}
            )
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert "max_concurrent 1 + max_queue 0" in r.json()["error"]
            blocking.backend.release.set()
            assert first.result(30).status_code == 200
            # the slot is free again
            r = c.post(
                "/v1/models/digits/infer", content=body, headers={"content-type": "image/png"}
            )
            assert r.status_code == 200
        if old is not None:
            old.close()
    finally:
        a.stop()


# --- security ---------------------------------------------------------------------------------


def test_token_required_and_checked_on_a_network_address(
    data_dir: Path, test_models: dict[str, Path], synthetic_video: Path
) -> None:
    a = _agent(
        data_dir,
        [_pipe("digits", test_models["digits"] / "model.onnx", synthetic_video)],
        {"addr": "0.0.0.0", "token": TOKEN},
    )
    try:
        assert a.api.url.startswith("http://0.0.0.0:")
        base = f"http://127.0.0.1:{a.api.port}"
        body = _png(np.zeros((8, 8), np.uint8))
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/healthz").status_code == 200  # probes need no token
            for headers in (
                {},
                {"authorization": "Bearer wrong-token-0123456789"},
                {"authorization": f"Basic {TOKEN}"},
            ):
                r = c.get("/v1/models", headers=headers)
                assert r.status_code == 401, headers
                assert "bearer token" in r.json()["error"]
                assert r.headers["www-authenticate"] == "Bearer"
                r = c.post(
                    "/v1/models/digits/infer",
                    content=body,
                    headers={**headers, "content-type": "image/png"},
                )
                assert r.status_code == 401
                assert c.get("/readyz", headers=headers).status_code == 401
            ok = {"authorization": f"Bearer {TOKEN}"}
            assert c.get("/v1/models", headers=ok).status_code == 200
            r = c.post(
                "/v1/models/digits/infer", content=body, headers={**ok, "content-type": "image/png"}
            )
            assert r.status_code == 200 and r.json()["model"] == "digits"
    finally:
        a.stop()


def test_network_address_without_token_is_refused(tmp_path: Path) -> None:
    base = {"device_id": "d", "data_dir": str(tmp_path)}
    for addr in ("0.0.0.0", "192.168.1.20", "::", "camera.local"):
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "api": {"port": 8080, "addr": addr}})
        assert e.value.field == "api"
        assert "bearer token is required" in str(e.value) and addr in str(e.value)
    # loopback needs none; the environment's token is enough elsewhere; token_file is read once
    for addr in ("127.0.0.1", "::1", "localhost"):
        assert parse_config({**base, "api": {"port": 8080, "addr": addr}}).api is not None
    cfg = parse_config(
        {**base, "api": {"port": 8080, "addr": "0.0.0.0"}}, env={"EDGEFLEET_API_TOKEN": TOKEN}
    )
    assert cfg.api is not None and resolve_token(cfg.api) == TOKEN
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    cfg = parse_config({**base, "api": {"port": 1, "addr": "0.0.0.0", "token_file": str(tf)}})
    assert cfg.api is not None and resolve_token(cfg.api) == TOKEN
    tf.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token(cfg.api)
    with pytest.raises(ConfigError, match="at least 16"):
        parse_config({**base, "api": {"port": 1, "token": "short"}})
    assert parse_config(base).api is None, "off by default"


# --- readiness, delivery and hot swap ---------------------------------------------------------


def test_readyz_503_until_a_model_is_delivered(
    data_dir: Path, test_models: dict[str, Path], synthetic_video: Path
) -> None:
    a = _agent(
        data_dir,
        [
            _pipe("digits", test_models["digits"] / "model.onnx", synthetic_video),
            _pipe("front", "det", synthetic_video),
        ],  # a registry name: waits for delivery
        {},
    )
    try:
        front = _pipeline(a, "front")
        with httpx.Client(base_url=a.api.url, timeout=30) as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["reasons"] == [
                "pipeline front has no model loaded (waiting for delivery)"
            ]
            models = {m["pipeline"]: m for m in c.get("/v1/models").json()["models"]}
            assert models["front"]["ready"] is False and models["digits"]["ready"] is True
            body = _jpeg(np.full((480, 640, 3), 30, np.uint8))
            r = c.post(
                "/v1/models/front/infer", content=body, headers={"content-type": "image/jpeg"}
            )
            assert r.status_code == 503 and "waiting for delivery" in r.json()["error"]
            # delivery: the update manager swaps the model in
            front.swap_model(_runnable(test_models["blobdet"] / "model.onnx"))
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True
            r = c.post(
                "/v1/models/front/infer", content=body, headers={"content-type": "image/jpeg"}
            )
            assert r.status_code == 200 and r.json()["model"] == "blobdet"
    finally:
        a.stop()


def test_hot_swap_under_load_fails_no_request(
    data_dir: Path, test_models: dict[str, Path], synthetic_video: Path
) -> None:
    path = test_models["digits"] / "model.onnx"
    a = _agent(
        data_dir, [_pipe("digits", path, synthetic_video)], {"max_concurrent": 4, "max_queue": 64}
    )
    try:
        pipe = a.pipelines[0]
        images, _ = _digits(test_models)
        bodies = [_png(img) for img in images[:32]]
        stop = threading.Event()
        results: list[tuple[int, str]] = []
        lock = threading.Lock()

        def client_loop(i: int) -> None:
            with httpx.Client(base_url=a.api.url, timeout=30) as c:
                n = i
                while not stop.is_set():
                    r = c.post(
                        "/v1/models/digits/infer",
                        content=bodies[n % len(bodies)],
                        headers={"content-type": "image/png"},
                    )
                    n += 1
                    with lock:
                        results.append((r.status_code, r.json().get("version", r.text)))

        closed: list[RunnableModel] = []
        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(client_loop, i) for i in range(4)]
            k = 0
            deadline = time.monotonic() + 60
            while (k < 30 or len(results) < 400) and time.monotonic() < deadline:
                k += 1
                new = _runnable(path, StrictClose, version=f"1.0.{k}")
                old = pipe.swap_model(new)
                # what UpdateManager._release does after a commit: close the previous model
                if old is not None:
                    old.close()
                    closed.append(old)
                time.sleep(0.03)
            stop.set()
            for f in futures:
                f.result(30)
        errors = [r for r in results if r[0] != 200]
        assert len(results) >= 400 and k >= 30
        assert not errors, f"{len(errors)} failed requests during swaps: {errors[:3]}"
        assert len({v for _, v in results}) > 5, "requests must have seen many versions"
        assert all(m.closed for m in closed), "every swapped-out model is closed in the end"
        assert pipe.metrics.counters["errors"] == 0, pipe.last_error
    finally:
        a.stop()


def test_lease_defers_close_and_refuses_after(test_models: dict[str, Path]) -> None:
    m = _runnable(test_models["digits"] / "model.onnx", StrictClose)
    backend = m.backend
    assert isinstance(backend, StrictClose)
    assert m.acquire()
    m.close()
    assert not backend.closed and not m.closed, "a lease keeps the backend open"
    assert not m.acquire(), "no new lease once closing"
    result, times = m.infer_tensor(np.zeros((1, 1, 8, 8), np.float32))
    assert result.classifications and times.preprocess == 0.0
    m.release()
    assert backend.closed and m.closed
    m.close()  # idempotent


def test_pipeline_acquire_model_follows_a_swap(test_models: dict[str, Path]) -> None:
    from agent.pipeline.sources import parse_source

    a = _runnable(test_models["digits"] / "model.onnx")
    b = _runnable(test_models["digits"] / "model.onnx")
    pipe = Pipeline("p", parse_source("0"), a)
    a.close()  # closed but still current: shutting down
    assert pipe.acquire_model() is None
    pipe.swap_model(b)
    got = pipe.acquire_model()
    assert got is b
    b.release()
    b.close()


# --- pure parsers -----------------------------------------------------------------------------


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_payload_parsers_never_raise_anything_but_payload_error(data: bytes) -> None:
    for blob in (
        data,
        b"\x89PNG\r\n\x1a\n" + data,
        b"\xff\xd8\xff" + data,
        b"\x93NUMPY\x01\x00" + data,
    ):
        try:
            p = identify(blob, None)
        except PayloadError:
            continue
        try:
            if p.kind == "npy":
                parse_npy(p.data)
            else:
                image_size(p.data, p.kind)
        except PayloadError:
            pass


@given(
    st.sampled_from(["float32", "float16", "uint8"]),
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
    st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_parse_npy_round_trips(dtype: str, shape: list[int], fortran: bool) -> None:
    arr = np.arange(int(np.prod(shape)) if shape else 1, dtype=dtype).reshape(shape)
    if fortran:
        arr = np.asfortranarray(arr)
    got = parse_npy(_npy(arr))
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert np.array_equal(got, arr)


@pytest.mark.parametrize("size", [(1, 1), (640, 480), (17, 3000)])
def test_image_size_from_headers(size: tuple[int, int]) -> None:
    img = np.zeros((size[1], size[0], 3), np.uint8)
    assert image_size(_png(img), "png") == size
    assert image_size(_jpeg(img), "jpeg") == size


# --- schemathesis against the served document -------------------------------------------------


def test_schemathesis_finds_no_server_error(agent: Agent) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
    # the live result stream never ends on its own (tests/agent/api/test_api_streams.py)
    schema = schemathesis.openapi.from_url(f"{agent.api.url}/openapi.json").exclude(
        path="/v1/pipelines/{name}/results"
    )
    strategy = st.one_of(
        schema.as_strategy(),
        schema.as_strategy(path_parameters={"name": "digits"}),
        schema.as_strategy(path_parameters={"name": "blob"}),
        schema.as_strategy(GenerationMode.NEGATIVE),
    )
    seen: list[int] = []

    @given(case=strategy)
    @settings(
        max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def run(case: Any) -> None:
        r = case.call_and_validate(base_url=agent.api.url, checks=[not_a_server_error])
        seen.append(r.status_code)

    run()
    assert 200 in seen and any(400 <= s < 500 for s in seen), sorted(set(seen))


@pytest.mark.parametrize(
    "header", [b"{[]: 1}", b"{{}: 1}", b"{'descr': '<f4', 'fortran_order': False, 'shape': ([],)}"]
)
def test_npy_header_that_cannot_be_built_is_a_payload_error(header: bytes) -> None:
    """A header literal that cannot be built (unhashable key) is a 400, not a 500."""
    body = header + b" " * (118 - len(header)) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body
    with pytest.raises(PayloadError):
        parse_npy(data)
