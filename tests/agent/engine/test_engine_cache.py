"""Engine cache key and on-disk cache, and engine builds in a child process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.common.errors import EngineBuildError, ModelError
from agent.common.fsutil import sha256_file
from agent.engine.build import get_or_build, load_backend, make_key
from agent.engine.cache import ENGINE_FILE, META_FILE, EngineCache
from agent.engine.cache_key import EngineKey, canonical_options, canonical_profiles
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.testhooks import TestHooks

CPU = ["CPUExecutionProvider"]

BASE = dict(
    model_sha256="a" * 64,
    backend="tensorrt",
    backend_version="10.3.0",
    precision="fp16",
    device="gpu",
    trt_version="10.3.0",
    cuda_version="12.2",
    l4t_version="36.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    profiles=canonical_profiles({"x": ((1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 16, 16))}),
    workspace_bytes=1 << 30,
    builder_options=canonical_options({"opt": 1}),
)
CHANGED = {
    "model_sha256": "b" * 64,
    "backend": "onnxruntime",
    "backend_version": "10.3.1",
    "precision": "int8",
    "device": "dla:0",
    "trt_version": "10.4.0",
    "cuda_version": "12.6",
    "l4t_version": "36.4.0",
    "gpu_name": "Xavier NX",
    "compute_capability": "7.2",
    "profiles": canonical_profiles({"x": ((1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 32, 32))}),
    "workspace_bytes": 1 << 29,
    "builder_options": canonical_options({"opt": 2}),
}


def key(**changes: object) -> EngineKey:
    return EngineKey(**{**BASE, **changes})  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small Conv + Relu + GlobalAveragePool model, x [1,3,8,8] -> y [1,4,1,1]."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        initializer=[w],
    )
    path = tmp_path / "model.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path
    )
    return path


def installed(cache: EngineCache, k: EngineKey, data: bytes = b"engine bytes " * 100) -> Path:
    tmp = cache.path_for_build(k)
    tmp.write_bytes(data)
    return cache.install(k, tmp, now=1000.0)


# ---------------------------------------------------------------- the key


def test_changed_fields_cover_every_key_field() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(EngineKey)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_digest_changes_when_any_field_changes(field: str) -> None:
    assert key(**{field: CHANGED[field]}).digest() != key().digest()


def test_digest_is_stable_and_canonical() -> None:
    assert key().digest() == key().digest()
    a = key(builder_options=canonical_options({"a": 1, "b": [1, 2]}))
    b = key(builder_options=canonical_options({"b": [1, 2], "a": 1}))
    assert a.digest() == b.digest()
    assert EngineKey.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@pytest.mark.parametrize(
    "changes",
    [
        {"model_sha256": "XYZ"},
        {"precision": "fp64"},
        {"device": "tpu"},
        {"workspace_bytes": -1},
        {"profiles": (("x", (1, 3, 9, 9), (1, 3, 8, 8), (1, 3, 16, 16)),)},
        {"profiles": (("x", (1, 3), (1, 3, 8), (1, 3, 16, 16)),)},
    ],
)
def test_invalid_key_fields_raise(changes: dict) -> None:
    with pytest.raises(ValueError):
        key(**changes)


# ---------------------------------------------------------------- the cache


def test_lookup_after_install_returns_the_file(cache: EngineCache) -> None:
    k = key()
    assert cache.lookup(k) is None and cache.last_reason == "missing"
    path = installed(cache, k, b"plan" * 1000)
    assert path == cache.root / k.digest() / ENGINE_FILE
    found = cache.lookup_ex(k)
    assert found.path == path and found.reason == "" and not found.discarded
    assert path.read_bytes() == b"plan" * 1000
    meta = json.loads((path.parent / META_FILE).read_text())
    assert meta["key"] == k.to_dict() and meta["size"] == 4000 and meta["created"] == 1000.0
    assert meta["sha256"] == hashlib.sha256(b"plan" * 1000).hexdigest()
    assert sorted(p.name for p in cache.root.iterdir()) == [k.digest()]  # no temp left


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _edit_meta(p: Path) -> None:
    meta_path = p.parent / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["key"]["gpu_name"] = "Nano"
    meta_path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "flipped-bytes": (_flip, "sha256"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:10]), "bytes, meta says"),
    "engine-deleted": (lambda p: p.unlink(), "engine.bin missing"),
    "meta-garbage": (lambda p: (p.parent / META_FILE).write_text("{not json"), "unreadable"),
    "meta-deleted": (lambda p: (p.parent / META_FILE).unlink(), "meta.json missing"),
    "meta-mismatch": (_edit_meta, "gpu_name"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_bad_entry_is_discarded_with_reason(cache: EngineCache, corruption: str) -> None:
    corrupt, expected = CORRUPTIONS[corruption]
    k = key()
    path = installed(cache, k)
    corrupt(path)
    found = cache.lookup_ex(k)
    assert found.path is None and found.discarded
    assert expected in found.reason
    assert not path.parent.exists()
    assert list(cache.root.iterdir()) == []
    assert cache.lookup_ex(k).reason == "missing"


def test_build_path_is_invisible_until_installed(cache: EngineCache) -> None:
    k = key()
    tmp = cache.path_for_build(k)
    assert tmp.parent.parent == cache.root and tmp.parent.name.startswith(".")
    tmp.write_bytes(b"half an engi")
    assert cache.lookup(k) is None
    cache.discard_build(tmp)
    assert list(cache.root.iterdir()) == []


def test_install_of_a_file_from_elsewhere(cache: EngineCache, tmp_path: Path) -> None:
    src = tmp_path / "elsewhere" / "model.engine"
    src.parent.mkdir()
    src.write_bytes(b"plan")
    path = cache.install(key(), src)
    assert cache.lookup(key()) == path and path.read_bytes() == b"plan"
    assert not src.exists() or src.read_bytes() == b"plan"  # moved, or copied and left alone


def test_install_replaces_an_existing_entry(cache: EngineCache) -> None:
    k = key()
    installed(cache, k, b"old")
    path = installed(cache, k, b"new")
    assert cache.lookup(k) == path and path.read_bytes() == b"new"
    assert [p.name for p in cache.root.iterdir()] == [k.digest()]


def test_prune_keeps_recently_used_and_removes_stale_temps(cache: EngineCache) -> None:
    keys = [key(gpu_name=f"gpu{i}") for i in range(4)]
    for i, k in enumerate(keys):
        installed(cache, k)
        os.utime(cache.entry_dir(k) / META_FILE, (1000.0 + i, 1000.0 + i))
    cache.lookup(keys[0])  # used now: the most recent
    stale = cache.path_for_build(keys[1]).parent
    os.utime(stale, (0, 0))
    fresh = cache.path_for_build(keys[2]).parent  # a build in progress: kept
    removed = cache.prune(2, protect=[keys[1]], now=time.time())
    assert sorted(p.name for p in cache.entries()) == sorted([keys[0].digest(), keys[1].digest()])
    assert stale.name in removed and not stale.exists() and fresh.exists()


def test_sha256_file_streams(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(3 * 1024 + 17)
    p.write_bytes(data)
    assert sha256_file(p, chunk=1024) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- builds in a child process


def ort_key(model: Path, **opts: object) -> EngineKey:
    return make_key(
        sha256_file(model), backend="onnxruntime", precision="fp32", providers=CPU, **opts
    )


def test_onnxruntime_build_caches_an_optimised_model(cache: EngineCache, model: Path) -> None:
    k = ort_key(model)
    seen: list[tuple[str, float]] = []

    def build() -> Path:
        return get_or_build(
            cache,
            k,
            model,
            backend="onnxruntime",
            precision="fp32",
            timeout_s=60,
            progress=lambda p, f: seen.append((p, f)),
            providers=CPU,
        )

    path = build()
    assert path == cache.root / k.digest() / ENGINE_FILE
    assert ("optimize", 1.0) in seen and all(0.0 <= f <= 1.0 for _, f in seen)
    onnx.checker.check_model(onnx.load(path), full_check=False)  # a real ONNX graph
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with (
        OnnxRuntimeBackend(model, providers=CPU) as plain,
        OnnxRuntimeBackend(model, providers=CPU, optimized_cache=path) as cached,
    ):
        np.testing.assert_allclose(
            cached.run({"x": x})[0], plain.run({"x": x})[0], rtol=1e-5, atol=1e-6
        )
    seen.clear()
    again = build()
    assert again == path and seen == []  # a hit: no child process


def test_build_that_times_out_is_killed_and_leaves_nothing(cache: EngineCache, model: Path) -> None:
    k = ort_key(model)
    started = time.monotonic()
    with pytest.raises(EngineBuildError) as err:
        get_or_build(
            cache,
            k,
            model,
            backend="onnxruntime",
            precision="fp32",
            timeout_s=1.0,
            providers=CPU,
            hooks=TestHooks(build_sleep_s=60),
        )
    assert err.value.reason == "timeout" and "1 s" in str(err.value)
    assert time.monotonic() - started < 10
    assert list(cache.root.iterdir()) == []


@pytest.mark.parametrize(("crash", "expected"), [(3, "code 3"), ("SIGKILL", "SIGKILL")])
def test_build_process_crash_is_reported(
    cache: EngineCache, model: Path, crash: object, expected: str
) -> None:
    k = ort_key(model)
    with pytest.raises(EngineBuildError) as err:
        get_or_build(
            cache,
            k,
            model,
            backend="onnxruntime",
            precision="fp32",
            timeout_s=30,
            providers=CPU,
            hooks=TestHooks(build_crash=crash),
        )
    assert err.value.reason == "crash" and expected in str(err.value)
    assert list(cache.root.iterdir()) == []  # the child's partial file is gone


def test_build_error_in_child_is_reported(cache: EngineCache, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(EngineBuildError) as err:
        get_or_build(
            cache,
            ort_key(broken),
            broken,
            backend="onnxruntime",
            precision="fp32",
            timeout_s=30,
            providers=CPU,
        )
    assert err.value.reason == "load" and "broken.onnx" in str(err.value)
    assert list(cache.root.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp16"}, "key.precision"),
        ({"providers": ["CUDAExecutionProvider"]}, "key.device"),
        ({"nonsense": 1}, "unknown onnxruntime builder options"),
    ],
)
def test_key_must_describe_the_build(
    cache: EngineCache, model: Path, kwargs: dict, message: str
) -> None:
    args = {
        "backend": "onnxruntime",
        "precision": "fp32",
        "timeout_s": 5,
        "providers": CPU,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        get_or_build(cache, ort_key(model), model, **args)
    assert list(cache.root.iterdir()) == []


def _hash_valid_garbage(engine: Path) -> None:
    """Replace the engine with bytes that pass the hash check but do not load."""
    engine.write_bytes(b"\x00garbage that is no ONNX model" * 10)
    meta_path = engine.parent / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(sha256=sha256_file(engine), size=engine.stat().st_size)
    meta_path.write_text(json.dumps(meta))


def test_load_backend_recovers_from_corrupt_cached_engines(
    cache: EngineCache, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with OnnxRuntimeBackend(model, providers=CPU) as plain:
        want = plain.run({"x": x})[0]
    builds: list[str] = []

    def load() -> np.ndarray:
        with load_backend(
            model,
            backend="onnxruntime",
            cache=cache,
            providers=CPU,
            timeout_s=60,
            progress=lambda p, f: builds.append(p),
        ) as b:
            return b.run({"x": x})[0]

    np.testing.assert_allclose(load(), want, rtol=1e-5, atol=1e-6)
    (entry,) = cache.entries()
    # flipped bytes are caught by the hash check; hash-valid garbage only when loading
    for corrupt, logged in ((_flip, "sha256"), (_hash_valid_garbage, "does not load")):
        corrupt(entry / ENGINE_FILE)
        builds.clear()
        caplog.clear()
        np.testing.assert_allclose(load(), want, rtol=1e-5, atol=1e-6)
        assert "optimize" in builds, corrupt.__name__  # it was rebuilt
        assert logged in caplog.text
        assert [p.name for p in cache.root.iterdir()] == [entry.name]


def test_load_backend_raises_only_model_errors(
    cache: EngineCache, model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError) as err:
        load_backend(tmp_path / "missing.onnx", backend="onnxruntime", cache=cache)
    assert err.value.reason == "load"
    with pytest.raises(ModelError) as err:
        load_backend(model, backend="onnxruntime", cache=cache, precision="fp64")
    assert err.value.reason == "config"
    if not __import__("agent.engine.tensorrt", fromlist=["x"]).tensorrt_available()[0]:
        with pytest.raises(ModelError) as err:
            load_backend(model, backend="tensorrt", cache=cache)
        assert err.value.reason == "unavailable"


def test_a_build_child_dies_with_its_agent(tmp_path: Path, test_models: dict[str, Path]) -> None:
    """SIGKILL the process that started a build: the build child goes too (PR_SET_PDEATHSIG),
    so a restarted agent never builds the same engine twice at once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys\n"
        "from agent.engine.build import load_backend\n"
        "from agent.testhooks import TestHooks\n"
        "load_backend(sys.argv[1], backend='onnxruntime', cache_dir=sys.argv[2],"
        " platform={}, hooks=TestHooks(build_sleep_s=60))\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", code, str(test_models["digits"] / "model.onnx"), str(tmp_path)]
    )

    def build_children() -> list[int]:
        # the spawn child runs multiprocessing's spawn main: find it by parent and argv
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                status = (d / "status").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if f"\nPPid:\t{agent.pid}\n" in status and b"spawn_main" in cmd:  # not the tracker
                found.append(int(d.name))
        return found

    try:
        deadline = time.monotonic() + 30
        kids: list[int] = []
        while time.monotonic() < deadline and not kids:
            kids = build_children()
            time.sleep(0.1)
        assert kids, "the build child never started"
        time.sleep(2.0)  # let it get past its start-up and into the (sleeping) build
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        deadline = time.monotonic() + 10
        alive = kids
        while time.monotonic() < deadline and alive:
            alive = [k for k in kids if Path(f"/proc/{k}").exists() and not _zombie(k)]
            time.sleep(0.1)
        assert not alive, f"build child {alive} outlived its agent"
    finally:
        if agent.poll() is None:
            agent.kill()


def _zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
