"""Adapter: opening a ready backend through the engine cache, building what is missing.

``load_backend`` keys the build (``make_key``: model hash, backend and version, platform,
precision, builder options), takes a valid cached engine or builds one (``get_or_build``), and
rebuilds once when a cached engine does not load. The build itself runs in a child process
(``agent.engine.build_child``) that writes into a temporary path inside the cache
(``EngineCache.path_for_build``); the file is installed only after the child said it succeeded
and exited cleanly, and the temporary folder is removed otherwise. A killed or crashed build
therefore never leaves a partial engine under a final name.

ONNX Runtime's "build" is session creation with ``optimized_model_filepath``: the optimised
graph becomes the cached artifact, loaded later with optimisations off
(``OnnxRuntimeBackend(..., optimized_cache=path)``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.common.errors import EngineBuildError, ModelError
from agent.common.fsutil import sha256_file
from agent.engine.base import Backend
from agent.engine.build_child import COMPILING_EPS, ProgressFn, disk_full, run_child
from agent.engine.cache import EngineCache
from agent.engine.cache_key import EngineKey, canonical_options, canonical_profiles
from agent.testhooks import NO_HOOKS, TestHooks

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
TIMING_CACHE_NAME = "tensorrt-timing.cache"

_GPU_EPS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ORT_LEVELS = ("basic", "extended", "all")
_ORT_OPTS = ("providers", "graph_optimization_level")
_TRT_OPTS = ("workspace_bytes", "dla_core", "profiles", "timing_cache_path")
# Options that change how long a build takes but not the engine it produces: not in the key.
_NOT_IN_KEY = ("timing_cache_path",)
# Load failures a rebuild can cure (corrupt or incompatible artifact).
_REBUILDABLE = ("load", "engine")

_build_locks: dict[tuple[str, str], threading.Lock] = {}
_build_locks_guard = threading.Lock()
# One child build at a time per agent: two TensorRT builds at once can exhaust a Jetson's
# shared CPU/GPU memory. Waiting for the slot does not count against a build's time limit.
_build_slot = threading.Lock()


def _normalise_opts(backend: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the builder options of ``backend`` with defaults filled in.

    Raises:
        ValueError: unknown backend or option, or an option outside its values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    allowed = _ORT_OPTS if backend == "onnxruntime" else _TRT_OPTS
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {backend} builder options {unknown}; allowed: {list(allowed)}")
    out = dict(opts)
    if backend == "onnxruntime":
        providers = list(out.get("providers") or ["CPUExecutionProvider"])
        out["providers"] = providers
        compiling = any(p in COMPILING_EPS for p in providers)
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
    hooks: TestHooks = NO_HOOKS,
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
        hooks: test-only: ``build_sleep_s`` makes the child sleep before building,
            ``build_crash`` makes it write a partial file then exit with that code (or kill
            itself with ``"SIGKILL"``).
        **builder_opts: backend options above.

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
                run_child(
                    backend, Path(onnx_path), tmp, precision, opts, timeout_s, progress, model,
                    hooks,
                )  # fmt: skip
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
            model, backend, precision, time.monotonic() - started, path,
        )  # fmt: skip
        return path


def _l4t_version() -> str:
    from agent.profile_detect import TEGRA_RELEASE_FILE, parse_l4t_release

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
    hooks: TestHooks = NO_HOOKS,
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
        hooks: test-only build hooks (see ``get_or_build``).

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
        opts, plat = _builder_options(
            backend, providers, workspace_bytes, dla_core, profiles, timing_cache_path, platform
        )
        key = make_key(
            sha256_file(onnx_path), backend=backend, precision=precision, platform=plat, **opts
        )

        def build_and_open() -> Backend:
            path = get_or_build(cache, key, onnx_path, backend=backend, precision=precision,
                                timeout_s=timeout_s, progress=progress, hooks=hooks,
                                **opts)  # fmt: skip
            return _open(backend, path, onnx_path, precision=precision, threads=threads,
                         providers=opts.get("providers", ()), dla_core=dla_core,
                         model_name=model)  # fmt: skip

        return _open_rebuilding_once(build_and_open, cache, key, model, backend)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and disk_full(e):
            raise  # the disk, not the model: the update manager waits and retries
        raise ModelError(
            f"cannot open {model} on {backend}: {e}", model=model, reason="config"
        ) from e


def _builder_options(
    backend: str,
    providers: Sequence[str] | None,
    workspace_bytes: int,
    dla_core: int | None,
    profiles: Mapping[str, Sequence[Sequence[int]]] | None,
    timing_cache_path: str | os.PathLike[str] | None,
    platform: Mapping[str, str] | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The builder options of ``backend`` (best providers when none given) and the platform
    facts of its key (detected for TensorRT when ``platform`` is ``None``)."""
    opts: dict[str, Any] = {}
    if backend == "onnxruntime":
        if providers is None:
            from agent.engine.onnxrt import available_providers

            have = available_providers()
            providers = [p for p in (*_GPU_EPS, "CPUExecutionProvider") if p in have]
        opts["providers"] = list(providers)
        return opts, dict(platform or {})
    opts.update(
        workspace_bytes=workspace_bytes,
        dla_core=dla_core,
        profiles=profiles,
        timing_cache_path=str(timing_cache_path) if timing_cache_path else None,
    )
    if platform is None:
        from agent.engine.trt_common import platform_facts

        return opts, {**platform_facts(), "l4t_version": _l4t_version()}
    return opts, dict(platform)


def _open_rebuilding_once(
    build_and_open: Callable[[], Backend],
    cache: EngineCache,
    key: EngineKey,
    model: str,
    backend: str,
) -> Backend:
    """``build_and_open()``; when a cached engine does not load, discard it and once more.

    Raises:
        ModelError: as ``build_and_open``; after the rebuild, saying it was the fresh engine.
    """
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
