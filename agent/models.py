"""Adapter: opening a model on this device — profile, backend, engine build, precision choice.

``resolve_profile`` names the device profile, ``choose_backend`` the backend it prefers among
those this machine can run, and ``open_local_model`` turns an ONNX file into a
``RunnableModel``: through the engine cache and a child-process build (``agent.engine.build``),
measuring the precision variants its card lists and keeping the fastest that passes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import ConfigError, EdgefleetError, ModelError
from agent.config import EngineConfig, OnnxRuntimeEngine, TensorRTEngine
from agent.engine.base import Backend
from agent.pipeline.model import (
    RunnableModel,
    card_for_local_model,
    card_input_size,
    load_golden,
    parse_size,
)
from agent.pipeline.preprocess import constant_feeds, image_input_name
from agent.profile_detect import detect_profile
from agent.profiles import DeviceProfile, get_profile
from agent.protocol.card import ModelCard
from agent.testhooks import NO_HOOKS, TestHooks

log = logging.getLogger(__name__)

TASKS = ("classification", "detection", "heatmap", "raw")


@dataclass(frozen=True)
class BuildProgress:
    """How far an engine build is, as the build says it: ``phase`` (``"start"``,
    ``"optimize"``, ``"build"``, …) and ``fraction`` of it done, 0 to 1."""

    phase: str
    fraction: float


def resolve_profile(setting: str) -> tuple[str, DeviceProfile, str]:
    """The device profile: detected (``"auto"``) or named/pathed in config.

    Raises:
        ConfigError: an unknown profile name or a bad profile file.
    """
    if setting == "auto":
        return detect_profile()
    prof = get_profile(setting)
    return prof.name, prof, f"set in config: {setting}"


def backend_availability() -> dict[str, dict[str, Any]]:
    """Which backends this machine can run, and why not."""
    from agent.engine.onnxrt import available_providers
    from agent.engine.tensorrt import tensorrt_available

    out: dict[str, dict[str, Any]] = {}
    try:
        import onnxruntime as ort

        provs = available_providers()
        out["onnxruntime"] = {
            "available": True,
            "detail": f"onnxruntime {ort.__version__}, providers {provs}",
        }
    except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency
        out["onnxruntime"] = {"available": False, "detail": f"cannot import onnxruntime: {e}"}
    ok, why = tensorrt_available()
    out["tensorrt"] = {"available": ok, "detail": why}
    return out


def choose_backend(engine: EngineConfig | str, profile: DeviceProfile | None) -> str:
    """The backend to use: the configured one, or the profile's first available.

    Raises:
        ConfigError: the configured backend is not available here.
    """
    kind = engine if isinstance(engine, str) else engine.type
    avail = backend_availability()
    if kind != "auto":
        if not avail[kind]["available"]:
            raise ConfigError(
                f"backend {kind} is configured but not available: {avail[kind]['detail']}",
                field="engine.type",
            )
        return kind
    prefs = list(profile.backends) if profile is not None else ["tensorrt", "onnxruntime"]
    for name in prefs:
        if avail.get(name, {}).get("available"):
            return name
    return "onnxruntime"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "engines"


def _trt_fp16_flag(backend: str) -> bool:
    """TensorRT can build fp16 from an fp32 file (it has ``BuilderFlag.FP16``; 11 has not)."""
    if backend != "tensorrt":
        return False
    try:
        import tensorrt as trt
    except Exception:  # the build will say why TensorRT is unusable
        return True
    from agent.engine.tensorrt import weak_typing

    return weak_typing(trt)


def _backend_settings(
    path: Path,
    backend_name: str,
    engine: EngineConfig | str,
    profile: DeviceProfile | None,
    input_size: str | None,
) -> dict[str, Any]:
    """``load_backend``'s settings from the engine config and the profile: threads,
    providers and workspace; for TensorRT also the DLA core and the input-shape profiles."""
    threads = engine.threads if isinstance(engine, OnnxRuntimeEngine) else 0
    if not threads and profile is not None:
        threads = profile.cpu_threads
    providers = engine.providers if isinstance(engine, OnnxRuntimeEngine) else None
    workspace = (profile.tensorrt.workspace_mb << 20) if profile and profile.tensorrt else 1 << 30
    out: dict[str, Any] = {"threads": threads, "providers": providers}
    if backend_name == "tensorrt":
        from agent.engine.shapes import fixed_profiles, onnx_input_shapes

        trt_engine = engine if isinstance(engine, TensorRTEngine) else None
        if trt_engine is not None and trt_engine.workspace_mb:
            workspace = trt_engine.workspace_mb << 20
        try:
            shapes = onnx_input_shapes(str(path))
        except Exception as e:  # a file onnx cannot read: the build says why, in full
            log.warning("model=%s input shapes unreadable: %s", path, e)
            shapes = {}
        out["dla_core"] = trt_engine.dla_core if trt_engine is not None else None
        out["profiles"] = (
            fixed_profiles(shapes, parse_size(input_size) or card_input_size(path), model=str(path))
            or None
        )
    out["workspace_bytes"] = workspace
    return out


def open_local_model(
    path: Path,
    *,
    task: str | None = None,
    input_size: str | None = None,
    engine: EngineConfig | str = "auto",
    profile: DeviceProfile | None = None,
    cache_dir: Path | None = None,
    build_timeout_s: float = 1800,
    progress: Callable[[str], None] = lambda s: None,
    on_build: Callable[[BuildProgress], None] | None = None,
    hooks: TestHooks = NO_HOOKS,
) -> RunnableModel:
    """Open a local ONNX model ready to serve frames.

    Where the model's card lists several precision variants that the profile allows, each is
    built, measured on this device and checked against ``golden.npz``; the fastest that passes
    is kept (``agent.engine.precision``).

    Args:
        progress: each step in words (opening, build percentage, the precision chosen).
        on_build: each engine build step as is (``BuildProgress``), for machines.
        hooks: test-only engine build hooks.

    Raises:
        ModelError: the model cannot be loaded or built, no variant passes, or its card is
            invalid.
        ConfigError: the configured backend is unavailable.
    """
    from agent.engine.build import load_backend

    if not path.is_file():
        raise ModelError(f"model file {path} does not exist", model=str(path), reason="load")
    if task is not None and task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {TASKS}", model=str(path), reason="card")
    backend_name = choose_backend(engine, profile)
    settings = _backend_settings(path, backend_name, engine, profile, input_size)

    def build_step(phase: str, frac: float) -> None:
        progress(f"build {phase} {frac:.0%}")
        if on_build is not None:
            on_build(BuildProgress(phase, frac))

    def load(file: Path, precision: str) -> Backend:
        progress(f"opening {file.name} ({precision}) on {backend_name}")
        return load_backend(
            file,
            backend=backend_name,
            precision=precision,
            cache_dir=cache_dir or default_cache_dir(),
            timeout_s=build_timeout_s,
            progress=build_step,
            hooks=hooks,
            **settings,
        )

    # DLA runs fp16 or int8 only: the first engine of a DLA pipeline is fp16
    first_prec = "fp16" if settings.get("dla_core") is not None else "fp32"
    first = load(path, first_prec)
    try:
        card = card_for_local_model(
            path,
            first,
            task=task,  # type: ignore[arg-type]  # checked against TASKS above
            input_size=parse_size(input_size),
        )
    except BaseException:
        first.close()
        raise
    variants, cands = _candidates(card, path, profile, first_prec, backend_name)
    golden = path.parent / "golden.npz"
    if len(cands) <= 1 or not golden.is_file():
        return RunnableModel(card, first)
    loaded = _Loaded(path, first, first_prec, load)
    return RunnableModel(card, _fastest_passing(card, loaded, variants, cands, golden, progress))


def _candidates(
    card: ModelCard, path: Path, profile: DeviceProfile | None, first_prec: str, backend: str
) -> tuple[dict[str, str], list[str]]:
    """The card's variant files present beside ``path`` (precision → file), and the
    precisions worth measuring here (the profile's, which the backend can build)."""
    from agent.engine.precision import candidate_precisions

    variants: dict[str, str] = {
        v.precision: v.file for v in card.variants if (path.parent / v.file).is_file()
    }
    allowed = list(profile.precisions) if profile is not None else [first_prec]
    if first_prec != "fp32":
        allowed = [p for p in allowed if p != "fp32"]
    cands = (
        candidate_precisions(allowed, variants, backend, fp16_from_fp32=_trt_fp16_flag(backend))
        if variants
        else []
    )
    return variants, cands


@dataclass
class _Loaded:
    """The first backend opened, and how to open the others."""

    path: Path
    first: Backend
    first_prec: str
    load: Callable[[Path, str], Backend]


def _fastest_passing(
    card: ModelCard,
    loaded: _Loaded,
    variants: Mapping[str, str],
    cands: list[str],
    golden: Path,
    progress: Callable[[str], None],
) -> Backend:
    """Several variants: measure each on this device, on the golden inputs; keep the fastest
    that passes and close the others.

    Raises:
        ModelError: no variant passes.
    """
    from agent.engine.precision import Measurement, choose_precision, measure_variant, variant_file

    first, path = loaded.first, loaded.path
    ins, outs = load_golden(golden)
    image = image_input_name(card.input, tuple(i.name for i in first.inputs))
    feeds = {**constant_feeds(card.input), image: ins[0]}
    backends: dict[str, Backend] = {}
    measurements = []
    try:
        for prec in cands:
            try:
                file = variant_file(prec, variants)
                b = (
                    first
                    if file == path.name and prec == loaded.first_prec
                    else loaded.load(path.parent / file, prec)
                )
            except EdgefleetError as e:
                measurements.append(Measurement(prec, None, None, error=str(e)))
                continue
            backends[prec] = b
            atol = card.golden_atol.get(prec, 1e-1)
            measurements.append(measure_variant(b, feeds, outs[:1], atol=atol))
        choice = choose_precision(measurements)
    except BaseException:
        for b in {id(b): b for b in [first, *backends.values()]}.values():
            b.close()
        raise
    progress(f"precision {choice.precision}: {choice.reason}")
    keep = backends[choice.precision]
    for b in {id(b): b for b in [first, *backends.values()]}.values():
        if b is not keep:
            b.close()
    return keep
