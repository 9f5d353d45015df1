"""Pure: device profiles (what a class of hardware can do).

A profile is one TOML file in ``device_profiles/`` validated into ``DeviceProfile``. The IO edge
is small and marked: ``load_profile`` (and ``builtin_profiles``/``get_profile`` through it)
reads profile files. ``agent.profile_detect`` finds which profile this machine is.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from agent.common.errors import ConfigError
from device_profiles import PROFILE_DIR, profile_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

# The names of agent.protocol.card.Precision (tests check they stay equal). Not imported from
# there so this strict-typed module does not pull the wire models into its type check.
Precision = Literal["fp32", "fp16", "int8"]
BackendName = Literal["tensorrt", "onnxruntime"]
OrtProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# TensorRT support matrix, hardware precision table: INT8 needs compute capability 6.1 or
# newer (the Nano's 5.3 has FP16 only).
_MIN_INT8_CC = (6, 1)
_GST_PLACEHOLDERS = {"sensor_id": 0, "width": 1, "height": 1, "fps": 1}


def _cross_field(field: str, detail: str) -> PydanticCustomError:
    """A cross-field error that still names its field (``load_profile`` reads ``ctx``)."""
    return PydanticCustomError("cross_field", "{detail}", {"field": field, "detail": detail})


class CameraDefaults(BaseModel):
    """Default capture settings for the device class's usual camera."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(ge=16, le=8192, description="Capture width in pixels")
    height: int = Field(ge=16, le=8192, description="Capture height in pixels")
    fps: int = Field(ge=1, le=240, description="Capture frame rate")
    gstreamer: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="GStreamer pipeline template for a CSI camera, with {sensor_id}, {width}, "
        "{height}, {fps} placeholders; ends in an appsink for OpenCV",
    )

    @model_validator(mode="after")
    def _check_template(self) -> CameraDefaults:
        if self.gstreamer is None:
            return self
        try:
            self.gstreamer.format(**_GST_PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as e:
            raise _cross_field(
                "gstreamer",
                f"template placeholders must be among {sorted(_GST_PLACEHOLDERS)}; "
                f"formatting failed on {e!r}",
            ) from e
        if "appsink" not in self.gstreamer:
            raise _cross_field(
                "gstreamer", "pipeline must end in an appsink for OpenCV; none found"
            )
        return self

    def gstreamer_pipeline(self, sensor_id: int = 0) -> str | None:
        """The CSI pipeline string for one sensor, or ``None`` when the class has no template."""
        if self.gstreamer is None:
            return None
        return self.gstreamer.format(
            sensor_id=sensor_id, width=self.width, height=self.height, fps=self.fps
        )


class TensorRTSettings(BaseModel):
    """TensorRT builder settings for the device class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workspace_mb: int = Field(ge=16, le=1_048_576, description="Builder workspace memory limit")


class MatchRules(BaseModel):
    """How detection recognises the device class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dt_model: tuple[str, ...] = Field(
        (), description="Case-insensitive substrings of /proc/device-tree/model"
    )


class DeviceProfile(BaseModel):
    """What one class of device can do, and its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$", description="Device class"
    )
    description: str = Field(min_length=1, max_length=200, description="One line for humans")
    soc: str = Field(min_length=1, max_length=100, description="SoC or host type")
    gpu: str | None = Field(None, min_length=1, max_length=100, description="GPU, if any")
    compute_capability: str | None = Field(
        None, pattern=r"^\d{1,2}\.\d$", description="CUDA compute capability, e.g. '8.7'"
    )
    memory_mb: int = Field(ge=256, le=4_194_304, description="Memory (shared on Jetson), MB")
    dla_cores: int = Field(0, ge=0, le=4, description="NVDLA cores usable by TensorRT")
    precisions: tuple[Precision, ...] = Field(
        min_length=1, max_length=3, description="Precisions the hardware runs well"
    )
    backends: tuple[BackendName, ...] = Field(
        min_length=1, max_length=2, description="Inference backends, most preferred first"
    )
    onnxruntime_providers: tuple[OrtProvider, ...] = Field(
        ("CPUExecutionProvider",),
        min_length=1,
        max_length=3,
        description="ONNX Runtime execution providers, most preferred first",
    )
    tensorrt: TensorRTSettings | None = Field(
        None, description="TensorRT settings; required when 'tensorrt' is a backend"
    )
    cpu_threads: int = Field(0, ge=0, le=1024, description="Inference threads, 0 = auto")
    camera: CameraDefaults = Field(description="Default camera settings")
    match: MatchRules = Field(default_factory=MatchRules, description="Detection rules")

    @property
    def cc_tuple(self) -> tuple[int, int] | None:
        """Compute capability as ``(major, minor)``, or ``None`` without a GPU."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @model_validator(mode="after")
    def _check(self) -> DeviceProfile:
        for field in ("precisions", "backends", "onnxruntime_providers"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise _cross_field(field, f"entries must be unique, got {list(values)}")
        cc = self.cc_tuple
        gpu_things: list[str] = [
            p for p in self.onnxruntime_providers if p != "CPUExecutionProvider"
        ]
        if "tensorrt" in self.backends:
            gpu_things.insert(0, "backend 'tensorrt'")
        if "fp16" in self.precisions:
            gpu_things.append("precision 'fp16'")
        if self.dla_cores:
            gpu_things.append(f"dla_cores={self.dla_cores}")
        if cc is None and gpu_things:
            raise _cross_field(
                "compute_capability", f"{gpu_things} need a GPU; compute_capability is not set"
            )
        if cc is not None and cc < _MIN_INT8_CC and "int8" in self.precisions:
            raise _cross_field(
                "precisions",
                f"int8 needs compute capability >= 6.1 for TensorRT, profile has "
                f"{self.compute_capability}; remove 'int8'",
            )
        if self.dla_cores and "tensorrt" not in self.backends:
            raise _cross_field(
                "dla_cores",
                f"{self.dla_cores} DLA cores need 'tensorrt' in backends, "
                f"got {list(self.backends)}",
            )
        if ("tensorrt" in self.backends) != (self.tensorrt is not None):
            raise _cross_field(
                "tensorrt",
                "a [tensorrt] table is required exactly when 'tensorrt' is in backends; "
                f"backends={list(self.backends)}, [tensorrt] "
                f"{'present' if self.tensorrt else 'missing'}",
            )
        if self.tensorrt is not None and self.tensorrt.workspace_mb > self.memory_mb:
            raise _cross_field(
                "tensorrt.workspace_mb",
                f"{self.tensorrt.workspace_mb} MB exceeds memory_mb {self.memory_mb}",
            )
        return self


def _format_errors(source: str, err: ValidationError) -> ConfigError:
    """One ``ConfigError`` naming the file and each failing field."""
    parts: list[str] = []
    first_field = ""
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "cross_field":
            loc = ".".join(p for p in (loc, str(ctx.get("field", ""))) if p)
        first_field = first_field or loc
        parts.append(f"field '{loc}': {e['msg']}" if loc else e["msg"])
    return ConfigError(f"{source}: {'; '.join(parts)}", path=source, field=first_field)


def validate_profile(data: Mapping[str, Any], *, source: str) -> DeviceProfile:
    """Pure: validate profile data already parsed from TOML (or merged from config).

    Args:
        data: the profile as a mapping.
        source: where it came from, for messages (a file path or ``"<config>"``).

    Returns:
        The validated profile.

    Raises:
        ConfigError: a field is missing, unknown, out of bounds, or breaks a cross-field rule;
            the message names ``source`` and the field.
    """
    try:
        return DeviceProfile.model_validate(dict(data))
    except ValidationError as e:
        raise _format_errors(source, e) from e


def load_profile(path: str | Path) -> DeviceProfile:
    """IO: read and validate one profile TOML file.

    Args:
        path: the ``.toml`` file.

    Returns:
        The validated profile.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, or does not validate; the
            message names the file and (for validation errors) the field.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read profile: {e.strerror or e}", path=source) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}", path=source) from e
    return validate_profile(data, source=source)


def override_profile(
    profile: DeviceProfile, overrides: Mapping[str, Any], *, source: str = "<config>"
) -> DeviceProfile:
    """Pure: a copy of ``profile`` with config overrides merged in and validated again.

    Nested tables (``camera``, ``tensorrt``, ``match``) merge key by key.

    Args:
        profile: the base profile.
        overrides: fields to replace, e.g. ``{"dla_cores": 2, "camera": {"fps": 60}}``.
        source: where the overrides came from, for messages.

    Returns:
        The merged profile.

    Raises:
        ConfigError: the merged profile does not validate.
    """
    merged: dict[str, Any] = profile.model_dump(exclude_none=True)
    for key, value in overrides.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, Mapping):
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return validate_profile(merged, source=f"{source} (overrides on {profile.name})")


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[tuple[str, DeviceProfile], ...]:
    out = []
    for path in sorted(PROFILE_DIR.glob("*.toml")):
        prof = load_profile(path)
        if prof.name != path.stem:
            raise ConfigError(
                f"{path}: field 'name': is {prof.name!r}, expected the file name {path.stem!r}",
                path=str(path),
                field="name",
            )
        out.append((prof.name, prof))
    return tuple(out)


def builtin_profiles() -> dict[str, DeviceProfile]:
    """IO (package data, read once): every built-in profile by name.

    Raises:
        ConfigError: a shipped profile does not validate (a packaging bug).
    """
    return dict(_builtin())


def get_profile(name_or_path: str | Path) -> DeviceProfile:
    """IO: a built-in profile by name (``"jetson-nano"``) or a profile file by path.

    Args:
        name_or_path: a built-in name, or a path to a ``.toml`` file.

    Returns:
        The validated profile.

    Raises:
        ConfigError: unknown name, or the file is missing or invalid.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text:
        return load_profile(name_or_path)
    known = builtin_profiles()
    if text not in known:
        raise ConfigError(
            f"unknown device profile {text!r}; expected one of {sorted(known)} or a .toml path",
            path=str(profile_path(text)),
            field="profile",
        )
    return known[text]
