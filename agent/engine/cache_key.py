"""Pure: the engine cache key — every fact that makes a built engine unsafe to reuse elsewhere.

``EngineKey`` is stored canonically (profiles and builder options sorted), so its
``canonical_json()`` and ``digest()`` (the cache entry's folder name, ``agent.engine.cache``)
never depend on the order options were given in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "KEY_SCHEMA",
    "PRECISIONS",
    "EngineKey",
    "Profile",
    "ProfileSpec",
    "canonical_options",
    "canonical_profiles",
]

# Bump when the meaning of a key field or the entry layout changes: old entries then miss.
KEY_SCHEMA = 1

PRECISIONS = ("fp32", "fp16", "int8")
_DEVICE_RE = re.compile(r"^(cpu|gpu|dla:\d+)\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")

# (input name, min shape, opt shape, max shape)
Profile = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]
ProfileSpec = Mapping[str, Sequence[Sequence[int]]]


def canonical_profiles(
    profiles: ProfileSpec | Iterable[Sequence[Any]] | None,
) -> tuple[Profile, ...]:
    """Pure: optimization profiles in one canonical form, sorted by input name.

    Args:
        profiles: ``{input: (min, opt, max)}``, or an iterable of ``(input, min, opt, max)``
            (the canonical form itself), or ``None`` for none.

    Returns:
        A tuple of ``(input, min, opt, max)`` with int tuples, sorted by input name.

    Raises:
        ValueError: a profile whose shapes differ in rank, have a negative dimension, or do
            not satisfy ``min <= opt <= max``; or an input named twice.
    """
    if profiles is None:
        return ()
    items: list[Sequence[Any]]
    if isinstance(profiles, Mapping):
        items = []
        for name, shapes in profiles.items():
            if len(shapes) != 3:
                raise ValueError(f"profile for {name!r} must be (min, opt, max), got {shapes!r}")
            items.append((name, *shapes))
    else:
        items = list(profiles)
    out: dict[str, Profile] = {}
    for item in items:
        if len(item) != 4:
            raise ValueError(f"profile entry must be (input, min, opt, max), got {item!r}")
        name = str(item[0])
        mn, opt, mx = (tuple(int(d) for d in s) for s in item[1:])
        if not len(mn) == len(opt) == len(mx):
            raise ValueError(f"profile for {name!r}: ranks differ: min {mn}, opt {opt}, max {mx}")
        for a, b, c in zip(mn, opt, mx, strict=True):
            if not 0 <= a <= b <= c:
                raise ValueError(
                    f"profile for {name!r}: expected 0 <= min <= opt <= max per dimension, "
                    f"got min {mn}, opt {opt}, max {mx}"
                )
        if name in out:
            raise ValueError(f"profile for input {name!r} given twice")
        out[name] = (name, mn, opt, mx)
    return tuple(out[k] for k in sorted(out))


def canonical_options(
    options: Mapping[str, Any] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    """Pure: builder options as sorted ``(name, canonical JSON of value)`` pairs.

    Args:
        options: a mapping of JSON-encodable values, or already-canonical pairs.

    Raises:
        ValueError: a value that JSON cannot encode.
    """
    if options is None:
        return ()
    if isinstance(options, Mapping):
        pairs: list[tuple[str, str]] = []
        for k, v in options.items():
            try:
                pairs.append((str(k), json.dumps(v, sort_keys=True, separators=(",", ":"))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"builder option {k!r}={v!r} is not JSON-encodable: {e}") from e
        return tuple(sorted(pairs))
    return tuple(sorted((str(k), str(v)) for k, v in options))


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a built engine unsafe to reuse elsewhere.

    Construct with plain values; ``profiles`` and ``builder_options`` may be given as mappings
    and are stored canonically (so option order never changes the digest).

    Attributes:
        model_sha256: sha256 of the ONNX file the engine was built from.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        backend_version: version of the backend that built it.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        device: ``"cpu"``, ``"gpu"`` or ``"dla:N"``.
        trt_version: TensorRT version, ``""`` when no TensorRT is involved.
        cuda_version: CUDA driver/runtime version, ``""`` on CPU.
        l4t_version: Jetson L4T release (``"36.3.0"``), ``""`` elsewhere.
        gpu_name: GPU name, ``""`` on CPU.
        compute_capability: ``"8.7"`` etc., ``""`` on CPU.
        profiles: optimization profiles ``(input, min, opt, max)``, canonical.
        workspace_bytes: builder workspace limit (0 when not applicable).
        builder_options: other builder options as ``(name, JSON value)`` pairs, canonical.
    """

    model_sha256: str
    backend: str
    backend_version: str
    precision: str
    device: str = "cpu"
    trt_version: str = ""
    cuda_version: str = ""
    l4t_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""
    profiles: tuple[Profile, ...] = field(default=())
    workspace_bytes: int = 0
    builder_options: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        """Canonicalise and validate.

        Raises:
            ValueError: a field outside its allowed values.
        """
        if not _SHA256_RE.match(self.model_sha256):
            raise ValueError(
                f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}"
            )
        if not self.backend:
            raise ValueError("backend must not be empty")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'gpu' or 'dla:N', got {self.device!r}")
        if self.workspace_bytes < 0:
            raise ValueError(f"workspace_bytes must be >= 0, got {self.workspace_bytes}")
        # frozen: canonicalise through object.__setattr__ (the dataclass-documented way).
        object.__setattr__(self, "profiles", canonical_profiles(self.profiles))
        object.__setattr__(self, "builder_options", canonical_options(self.builder_options))

    def to_dict(self) -> dict[str, Any]:
        """Pure: the key as JSON-native values (lists, not tuples)."""
        out: dict[str, Any] = {"schema": KEY_SCHEMA}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        out["profiles"] = [[n, list(a), list(b), list(c)] for n, a, b, c in self.profiles]
        out["builder_options"] = [[k, v] for k, v in self.builder_options]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        """Pure: the inverse of ``to_dict``.

        Raises:
            ValueError: missing or wrong fields, or another schema version.
        """
        if data.get("schema") != KEY_SCHEMA:
            raise ValueError(f"key schema is {data.get('schema')!r}, expected {KEY_SCHEMA}")
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"key fields missing: {sorted(missing)}")
        try:
            kwargs = {n: data[n] for n in names}
            kwargs["profiles"] = [tuple(p) for p in data["profiles"]]
            kwargs["builder_options"] = [tuple(p) for p in data["builder_options"]]
            return cls(**kwargs)
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed key: {e}") from e

    def canonical_json(self) -> str:
        """Pure: the key as canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Pure: sha256 hex of ``canonical_json()``; the cache entry's folder name."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
