"""Adapter: engine builds in a child process, and opening a ready backend through the cache.

A TensorRT build can take minutes, use most of a Jetson's memory and die (OOM killer, driver
crash), so it runs in a ``spawn``-ed child with a time limit. The child writes into a
temporary path inside the cache (``EngineCache.path_for_build``) and reports progress and
its outcome over a pipe; the parent installs the file only after the child said it succeeded
and exited cleanly, and removes the temporary folder otherwise. A killed or crashed build
therefore never leaves a partial engine under a final name.

ONNX Runtime's "build" is session creation with ``optimized_model_filepath``: the optimised
graph becomes the cached artifact, loaded later with optimisations off
(``OnnxRuntimeBackend(..., optimized_cache=path)``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.common.errors import EngineBuildError, ModelError
from agent.common.fsutil import sha256_file
from agent.engine.base import Backend
from agent.engine.cache import (
    EngineCache,
    EngineKey,
    canonical_options,
    canonical_profiles,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]

BACKENDS = ("onnxruntime", "tensorrt")
TIMING_CACHE_NAME = "tensorrt-timing.cache"

# Execution providers that compile subgraphs: ONNX Runtime cannot serialise their fused
# nodes ("Unable to serialize model as it contains compiled nodes"), so the optimised model
# is produced without them, at the portable "basic" level.
_COMPILING_EPS = ("TensorrtExecutionProvider",)
_GPU_EPS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ORT_LEVELS = ("basic", "extended", "all")
_ORT_OPTS = ("providers", "graph_optimization_level")
_TRT_OPTS = ("workspace_bytes", "dla_core", "profiles", "timing_cache_path")
# Test-only hooks honoured by the child (see _apply_test_hooks); never set them in production.
_TEST_OPTS = ("_test_sleep_s", "_test_crash")
# Options that change how long a build takes (or test hooks that make it slow or crash) but
# not the engine it produces: not part of the cache key.
_NOT_IN_KEY = ("timing_cache_path", *_TEST_OPTS)
# Load failures a rebuild can cure (corrupt or incompatible artifact).
_REBUILDABLE = ("load", "engine")

_build_locks: dict[tuple[str, str], threading.Lock] = {}
_build_locks_guard = threading.Lock()
# One child build at a time per agent: two TensorRT builds at once can exhaust a Jetson's
# shared CPU/GPU memory. Waiting for the slot does not count against a build's time limit.
_build_slot = threading.Lock()


def disk_full(e: OSError) -> bool:
    """The file system is out of space or quota: wait and retry, the model is not at fault."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _normalise_opts(backend: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the builder options of ``backend`` with defaults filled in.

    Raises:
        ValueError: unknown backend or option, or an option outside its values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    allowed = (_ORT_OPTS if backend == "onnxruntime" else _TRT_OPTS) + _TEST_OPTS
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {backend} builder options {unknown}; allowed: {list(allowed)}")
    out = dict(opts)
    if backend == "onnxruntime":
        providers = list(out.get("providers") or ["CPUExecutionProvider"])
        out["providers"] = providers
        compiling = any(p in _COMPILING_EPS for p in providers)
        level = out.get("graph_optimization_level") or ("basic" if compiling else "all")
        if level not in _ORT_LEVELS:
            raise ValueError(
                f"graph_optimization_level must be one of {_ORT_LEVELS}, got {level!r}"
            )
        out["graph_optimization_level"] = level
    else:
        out.setdefault("workspace_bytes", 1 << 30)
        out.setdefault("dla_core", None)
        out["profiles"] = {
            p[0]: [list(p[1]), list(p[2]), list(p[3])]
            for p in canonical_profiles(out.get("profiles"))
        }
        out.setdefault("timing_cache_path", None)
        if int(out["workspace_bytes"]) <= 0:
            raise ValueError(f"workspace_bytes must be > 0, got {out['workspace_bytes']}")
    return out


def _key_fields(backend: str, precision: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the key fields a build with these (normalised) options must carry."""
    rest = {k: v for k, v in opts.items() if k not in _NOT_IN_KEY}
    if backend == "onnxruntime":
        device = "gpu" if any(p in _GPU_EPS for p in opts["providers"]) else "cpu"
        return {
            "backend": backend,
            "precision": precision,
            "device": device,
            "workspace_bytes": 0,
            "profiles": (),
            "builder_options": canonical_options(rest),
        }
    dla = opts["dla_core"]
    for k in ("workspace_bytes", "dla_core", "profiles"):
        rest.pop(k, None)
    return {
        "backend": backend,
        "precision": precision,
        "device": f"dla:{dla}" if dla is not None else "gpu",
        "workspace_bytes": int(opts["workspace_bytes"]),
        "profiles": canonical_profiles(opts["profiles"]),
        "builder_options": canonical_options(rest),
    }


def backend_version(backend: str) -> str:
    """The installed version of ``backend``.

    Raises:
        ModelError: the backend cannot be imported (reason ``"unavailable"``).
    """
    try:
        if backend == "onnxruntime":
            import onnxruntime as ort

            return str(ort.__version__)
        import tensorrt as trt

        return str(trt.__version__)
    except Exception as e:
        raise ModelError(f"backend {backend} unavailable: {e}", reason="unavailable") from e


def make_key(
    model_sha256: str,
    *,
    backend: str,
    precision: str,
    version: str | None = None,
    platform: Mapping[str, str] | None = None,
    **builder_opts: Any,
) -> EngineKey:
    """The cache key for building ``model_sha256`` with these options on this platform.

    Args:
        model_sha256: sha256 of the ONNX file.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        version: backend version; detected when ``None``.
        platform: ``trt_version``, ``cuda_version``, ``l4t_version``, ``gpu_name``,
            ``compute_capability`` (missing ones are ``""``).
        **builder_opts: as for ``get_or_build``.

    Raises:
        ValueError: bad options or key fields.
        ModelError: the backend is unavailable (only when ``version`` is ``None``).
    """
    opts = _normalise_opts(backend, builder_opts)
    plat = dict(platform or {})
    fields: dict[str, Any] = _key_fields(backend, precision, opts)
    for name in ("trt_version", "cuda_version", "l4t_version", "gpu_name", "compute_capability"):
        fields[name] = str(plat.get(name, ""))
    return EngineKey(
        model_sha256=model_sha256,
        backend_version=version if version is not None else backend_version(backend),
        **fields,
    )


def _check_key(key: EngineKey, backend: str, precision: str, opts: Mapping[str, Any]) -> None:
    want = _key_fields(backend, precision, opts)
    for name, value in want.items():
        if getattr(key, name) != value:
            raise ValueError(
                f"cache key does not describe this build: key.{name} is {getattr(key, name)!r}, "
                f"the build options give {value!r}; an entry under this key would be wrong"
            )


def _build_lock(cache: EngineCache, key: EngineKey) -> threading.Lock:
    with _build_locks_guard:
        return _build_locks.setdefault((str(cache.root.resolve()), key.digest()), threading.Lock())


def get_or_build(
    cache: EngineCache,
    key: EngineKey,
    onnx_path: str | os.PathLike[str],
    *,
    backend: str,
    precision: str,
    timeout_s: float,
    progress: ProgressFn | None = None,
    **builder_opts: Any,
) -> Path:
    """The cached engine for ``key``, building it in a child process when missing or bad.

    Args:
        cache: the engine cache.
        key: the key (see ``make_key``); checked against the backend, precision and options.
        onnx_path: the ONNX model.
        backend: ``"onnxruntime"`` (options ``providers``, ``graph_optimization_level``) or
            ``"tensorrt"`` (``workspace_bytes``, ``dla_core``, ``profiles``,
            ``timing_cache_path``, default ``<cache root>/tensorrt-timing.cache``).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        timeout_s: wall-clock limit of the child, start-up included; killed on expiry.
        progress: called as ``(phase, fraction)`` from this thread while the child works.
        **builder_opts: backend options above; ``_test_sleep_s`` and ``_test_crash`` are
            test-only hooks (sleep before building; write a partial file then exit with that
            code, or ``"SIGKILL"`` to kill itself).

    Returns:
        The verified engine file inside the cache.

    Raises:
        ValueError: unknown options, or a key that does not match them.
        EngineBuildError: the build failed (reason from the child, e.g. ``"parse"``,
            ``"load"``, ``"build"``), timed out (``"timeout"``) or crashed (``"crash"``, exit
            code or signal in the message). No partial file is left behind.
        OSError: the cache cannot be written.
    """
    opts = _normalise_opts(backend, builder_opts)
    _check_key(key, backend, precision, opts)
    model = str(onnx_path)
    if not Path(onnx_path).is_file():
        raise EngineBuildError(
            f"model file {onnx_path} does not exist; nothing to build", model=model, reason="load"
        )
    with _build_lock(cache, key):  # one build per key at a time; the others wait and hit
        found = cache.lookup_ex(key)
        if found.path is not None:
            return found.path
        if found.discarded:
            log.warning("model=%s engine cache entry was bad (%s); rebuilding", model, found.reason)
        if backend == "tensorrt" and opts["timing_cache_path"] is None:
            opts["timing_cache_path"] = str(cache.root / TIMING_CACHE_NAME)
        tmp = cache.path_for_build(key)
        try:
            with _build_slot:
                started = time.monotonic()
                _run_child(
                    backend, Path(onnx_path), tmp, precision, opts, timeout_s, progress, model
                )
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise EngineBuildError(
                    f"{backend} build of {model} reported success but wrote no engine",
                    model=model,
                    reason="build",
                )
            path = cache.install(key, tmp)
        except BaseException:
            cache.discard_build(tmp)
            raise
        log.info(
            "model=%s backend=%s precision=%s engine built in %.1f s: %s",
            model,
            backend,
            precision,
            time.monotonic() - started,
            path,
        )
        return path


def _run_child(
    backend: str,
    onnx_path: Path,
    out_path: Path,
    precision: str,
    opts: dict[str, Any],
    timeout_s: float,
    progress: ProgressFn | None,
    model: str,
) -> None:
    """Run ``_child_main`` in a spawned process; forward progress; raise on any failure."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork: the agent has threads (camera readers, MQTT)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(send, backend, str(onnx_path), str(out_path), precision, opts, os.getpid()),
        name=f"engine-build-{backend}",
        daemon=True,
    )
    deadline = time.monotonic() + timeout_s
    outcome: tuple[Any, ...] | None = None
    try:
        proc.start()
        send.close()  # the child holds the only write end now: EOF means it is gone
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not recv.poll(min(remaining, 0.25)):
                continue
            try:
                msg = recv.recv()
            except EOFError:
                break
            if msg[0] == "progress" and progress is not None:
                try:
                    progress(str(msg[1]), float(msg[2]))
                except Exception:
                    log.exception("model=%s build progress callback failed; build continues", model)
            elif msg[0] in ("ok", "error"):
                outcome = msg
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise EngineBuildError(
                f"{backend} build of {model} exceeded its time limit of {timeout_s:g} s; "
                "killed the build process; the engine was not cached",
                model=model,
                reason="timeout",
            )
        code = proc.exitcode
    finally:
        if proc.is_alive():  # KeyboardInterrupt or an error above: never leave it running
            proc.kill()
            proc.join()
        send.close()
        recv.close()
        proc.close()
    if outcome is not None and outcome[0] == "error" and outcome[2] == "nospace":
        raise OSError(
            errno.ENOSPC, f"{backend} build of {model} ran out of disk space: {outcome[1]}"
        )
    if outcome is not None and outcome[0] == "error":
        raise EngineBuildError(
            f"{backend} build of {model} failed: {outcome[1]}",
            model=model,
            reason=str(outcome[2]) or "build",
        )
    if code is not None and code < 0:
        try:
            sig = f"{signal.Signals(-code).name} ({-code})"
        except ValueError:
            sig = str(-code)
        hint = (
            "; the kernel OOM killer does this when memory runs out"
            if -code == signal.SIGKILL
            else ""
        )
        raise EngineBuildError(
            f"{backend} build process of {model} was killed by signal {sig}{hint}; "
            "the engine was not cached",
            model=model,
            reason="crash",
        )
    if code != 0 or outcome is None:
        raise EngineBuildError(
            f"{backend} build process of {model} exited with code {code} without "
            "reporting success; the engine was not cached",
            model=model,
            reason="crash",
        )


# ---- child process side ---------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A SIGKILLed or OOM-killed agent runs no clean-up, and an orphaned build would go on using
    the Jetson's memory while the restarted agent builds the same engine again. If the parent
    died before this call, exit now (the signal would never come).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def _apply_test_hooks(opts: dict[str, Any], out_path: str) -> None:
    """Test-only hooks, applied before any heavy import so the tests stay fast."""
    sleep_s = opts.pop("_test_sleep_s", None)
    if sleep_s:
        time.sleep(float(sleep_s))
    crash = opts.pop("_test_crash", None)
    if crash is not None:
        Path(out_path).write_bytes(b"partial engine")  # what a build dying mid-write leaves
        if str(crash).upper() == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(crash))


def _build_onnxruntime(
    onnx_path: str, out_path: str, opts: Mapping[str, Any], progress: ProgressFn
) -> None:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    providers = [p for p in opts["providers"] if p not in _COMPILING_EPS] or [
        "CPUExecutionProvider"
    ]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[opts["graph_optimization_level"]]
    so.optimized_model_filepath = out_path
    progress("optimize", 0.0)
    try:
        ort.InferenceSession(onnx_path, so, providers=providers)
    except Exception as e:
        # ONNX Runtime reports a full disk while writing the optimised model as a protobuf
        # serialization error: say that the disk is full, not that the model is bad
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(out_path))).free
        need = os.path.getsize(onnx_path)
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for the optimised model ({free} bytes free, the model "
                f"is {need}); onnxruntime said: {e}",
            ) from e
        raise ModelError(
            f"onnxruntime cannot load {onnx_path}: {e}", model=onnx_path, reason="load"
        ) from e
    with open(out_path, "rb") as fh:
        os.fsync(fh.fileno())
    progress("optimize", 1.0)


def _child_main(
    conn: Connection,
    backend: str,
    onnx_path: str,
    out_path: str,
    precision: str,
    opts: dict[str, Any],
    parent_pid: int = 0,
) -> None:
    """Entry point of the build process: build, then report ``ok`` or ``error`` on ``conn``."""
    if parent_pid:
        die_with_parent(parent_pid)
    lock = threading.Lock()  # TensorRT's progress monitor calls from several threads

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    def progress(phase: str, frac: float) -> None:
        send(("progress", phase, frac))

    try:
        _apply_test_hooks(opts, out_path)
        progress("start", 0.0)
        if backend == "onnxruntime":
            _build_onnxruntime(onnx_path, out_path, opts, progress)
        else:
            from agent.engine.trt_build import build_engine  # no pycuda: build side only

            build_engine(
                onnx_path,
                out_path,
                precision=precision,
                workspace_bytes=int(opts["workspace_bytes"]),
                dla_core=opts["dla_core"],
                profiles=opts["profiles"],
                timing_cache_path=opts["timing_cache_path"],
                progress=progress,
            )
        progress("done", 1.0)
        send(("ok", os.path.getsize(out_path)))
    except ModelError as e:
        send(("error", str(e), e.reason or "build"))
    except OSError as e:  # a full disk is the device's trouble, not the model's: retried
        send(("error", f"{type(e).__name__}: {e}", "nospace" if disk_full(e) else "build"))
    except BaseException as e:  # report everything: the parent turns it into EngineBuildError
        send(("error", f"{type(e).__name__}: {e}", "build"))
    finally:
        conn.close()


# ---- parent convenience -------------------------------------------------------------------


def _l4t_version() -> str:
    from agent.profiles import TEGRA_RELEASE_FILE, parse_l4t_release

    try:
        text = Path(TEGRA_RELEASE_FILE).read_text(errors="replace")
    except OSError:
        return ""
    rel = parse_l4t_release(text)
    return ".".join(str(x) for x in rel) if rel else ""


def _open(
    backend: str,
    engine: Path,
    onnx_path: Path,
    *,
    precision: str,
    threads: int,
    providers: Sequence[str],
    dla_core: int | None,
    model_name: str,
) -> Backend:
    if backend == "onnxruntime":
        from agent.engine.onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            onnx_path,
            providers=providers,
            precision=precision,
            threads=threads,
            optimized_cache=engine,
            model_name=model_name,
        )
    from agent.engine.tensorrt import TensorRTBackend

    return TensorRTBackend.from_engine_file(
        engine, precision=precision, model_name=model_name, dla_core=dla_core
    )


def load_backend(
    onnx_path: str | os.PathLike[str],
    *,
    backend: str,
    precision: str = "fp32",
    cache: EngineCache | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout_s: float = 1800.0,
    progress: ProgressFn | None = None,
    threads: int = 0,
    providers: Sequence[str] | None = None,
    workspace_bytes: int = 1 << 30,
    dla_core: int | None = None,
    profiles: Mapping[str, Sequence[Sequence[int]]] | None = None,
    timing_cache_path: str | os.PathLike[str] | None = None,
    platform: Mapping[str, str] | None = None,
    model_name: str = "",
    **test_opts: Any,
) -> Backend:
    """A ready backend for an ONNX model: cached engine if valid, else built in a child.

    If the cached engine does not load (corrupt, or built by another version), the entry is
    discarded and rebuilt once. Options that do not apply to ``backend`` are ignored
    (``threads``/``providers`` for TensorRT; ``workspace_bytes``/``dla_core``/``profiles``/
    ``timing_cache_path`` for ONNX Runtime).

    Args:
        onnx_path: the ONNX model.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        cache: the engine cache, or give ``cache_dir``.
        cache_dir: root of the engine cache when ``cache`` is not given.
        timeout_s: time limit of one build.
        progress: ``(phase, fraction)`` callback during a build.
        threads: ONNX Runtime intra-op threads (0 = its default).
        providers: ONNX Runtime execution providers; ``None`` = best available.
        workspace_bytes, dla_core, profiles, timing_cache_path: TensorRT builder settings.
        platform: key facts (``gpu_name``, ``compute_capability``, ...); detected when ``None``.
        model_name: for messages (default: the path).
        **test_opts: ``_test_*`` hooks, see ``get_or_build``.

    Raises:
        ModelError: the model is missing or cannot be built or loaded, even after one rebuild
            (``EngineBuildError`` for build failures).
        OSError: (``ENOSPC``) the disk is full: a condition to wait out, not the model's fault.
    """
    onnx_path = Path(onnx_path)
    model = model_name or str(onnx_path)
    if not onnx_path.is_file():
        raise ModelError(f"model file {onnx_path} does not exist", model=model, reason="load")
    try:
        if cache is None:
            if cache_dir is None:
                raise ValueError("give cache or cache_dir")
            cache = EngineCache(cache_dir)
        opts: dict[str, Any] = dict(test_opts)
        if backend == "onnxruntime":
            if providers is None:
                from agent.engine.onnxrt import available_providers

                have = available_providers()
                providers = [p for p in (*_GPU_EPS, "CPUExecutionProvider") if p in have]
            opts["providers"] = list(providers)
            plat = dict(platform or {})
        else:
            opts.update(
                workspace_bytes=workspace_bytes,
                dla_core=dla_core,
                profiles=profiles,
                timing_cache_path=str(timing_cache_path) if timing_cache_path else None,
            )
            if platform is None:
                from agent.engine.trt_common import platform_facts

                plat = {**platform_facts(), "l4t_version": _l4t_version()}
            else:
                plat = dict(platform)
        key = make_key(
            sha256_file(onnx_path), backend=backend, precision=precision, platform=plat, **opts
        )

        def build_and_open() -> Backend:
            path = get_or_build(
                cache,
                key,
                onnx_path,
                backend=backend,
                precision=precision,
                timeout_s=timeout_s,
                progress=progress,
                **opts,
            )
            return _open(
                backend,
                path,
                onnx_path,
                precision=precision,
                threads=threads,
                providers=opts.get("providers", ()),
                dla_core=dla_core,
                model_name=model,
            )

        try:
            return build_and_open()
        except ModelError as e:
            if isinstance(e, EngineBuildError) or e.reason not in _REBUILDABLE:
                raise
            with _build_lock(cache, key):
                cache.discard(key, f"cached engine failed to load: {e}")
            log.warning(
                "model=%s cached %s engine does not load (%s); rebuilding once", model, backend, e
            )
        try:
            return build_and_open()
        except ModelError as e:
            raise type(e)(
                f"{e}; this was the freshly rebuilt engine, giving up",
                model=e.model or model,
                reason=e.reason,
            ) from e
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and disk_full(e):
            raise  # the disk, not the model: the update manager waits and retries
        raise ModelError(
            f"cannot open {model} on {backend}: {e}", model=model, reason="config"
        ) from e
