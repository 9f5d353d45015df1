"""Adapter: the published model versions, read back from the registry's signed targets.

Pure parts: semantic versions (``SemVer``, ``parse_semver``) and the card a target carries in its
signed ``custom`` field (``custom_for``, ``card_from_custom``). ``list_models`` and
``check_new_version`` read a ``Repository``'s targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agent.protocol.card import ModelCard
from cloud_sync.registry.repo import RegistryError, Repository

__all__ = [
    "ModelVersion",
    "SemVer",
    "card_from_custom",
    "check_new_version",
    "custom_for",
    "list_models",
    "parse_semver",
]

_NUM = r"(?:0|[1-9][0-9]*)"
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(rf"({_NUM})\.({_NUM})\.({_NUM})(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?")
_MODEL_TARGET = re.compile(r"^models/([^/]+)/([^/]+)/([^/]+)\Z")


@dataclass(frozen=True)
class SemVer:
    """Pure: a semantic version 2.0.0 without build metadata (``+`` cannot be in a target path)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    def key(self) -> tuple[Any, ...]:
        """Sort key with semver precedence (a pre-release sorts before its release)."""
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{'.'.join(self.prerelease)}" if self.prerelease else base


def parse_semver(text: str) -> SemVer:
    """Pure: parse ``MAJOR.MINOR.PATCH[-PRERELEASE]``.

    Raises:
        RegistryError: (reason ``"usage"``) not such a version, or with ``+build`` metadata.
    """
    m = _SEMVER.fullmatch(text)
    if m is None:
        raise RegistryError(
            f"version {text!r} is not a semantic version: expected MAJOR.MINOR.PATCH with an "
            "optional -PRERELEASE (e.g. 1.2.0 or 1.2.0-rc.1), no leading zeros, no +BUILD",
            reason="usage",
        )
    pre = tuple(m.group(4).split(".")) if m.group(4) else ()
    return SemVer(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)


@dataclass(frozen=True)
class ModelVersion:
    """One published model version, as ``list_models`` reports it."""

    name: str
    version: str
    task: str
    variants: tuple[str, ...]
    sizes: dict[str, int]
    card: ModelCard | None = None


def custom_for(card: ModelCard) -> dict[str, Any]:
    """Pure: a target's signed ``custom`` field: ``{"edgefleet": {"card_json": "<card JSON>"}}``.

    TUF signs OLPC canonical JSON, which has no floats, so the card (scales, means, accuracy)
    rides as JSON text; the device reads it back with ``TufClient.card_of``.
    """
    return {"edgefleet": {"card_json": card.model_dump_json()}}


def card_from_custom(custom: Any) -> ModelCard | None:
    """Pure: the card in a target's ``custom`` field; None when absent or invalid."""
    edgefleet = custom.get("edgefleet") if isinstance(custom, dict) else None
    text = edgefleet.get("card_json") if isinstance(edgefleet, dict) else None
    if not isinstance(text, str):
        return None
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError:
        return None


def list_models(repo: Repository) -> list[ModelVersion]:
    """Adapter: the published model versions, sorted by name then semantic version."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for path, target in repo.targets().items():
        m = _MODEL_TARGET.fullmatch(path)
        if m is None:
            continue
        g = groups.setdefault((m.group(1), m.group(2)), {"sizes": {}, "card": None})
        g["sizes"][m.group(3)] = target.length
        # A version without a valid card is listed without details (devices refuse it).
        g["card"] = g["card"] or card_from_custom(target.custom)
    out = []
    for (name, version), g in groups.items():
        card = g["card"]
        out.append(
            ModelVersion(
                name=name,
                version=version,
                task=card.task if card else "?",
                variants=tuple(v.precision for v in card.variants) if card else (),
                sizes=dict(sorted(g["sizes"].items())),
                card=card,
            )
        )
    return sorted(out, key=lambda v: (v.name, _version_key(v.version)))


def _version_key(text: str) -> tuple[Any, ...]:
    try:
        return (1, parse_semver(text).key())
    except RegistryError:
        return (0, text)


def check_new_version(repo: Repository, name: str, version: SemVer) -> None:
    """Adapter: refuse a version of ``name`` that exists or is not above the latest published.

    Raises:
        RegistryError: (reason ``"exists"`` or ``"older"``) the version cannot be published.
    """
    mine = [v for v in list_models(repo) if v.name == name]
    for v in mine:
        if v.version == str(version):
            raise RegistryError(
                f"model {name}@{version} already exists in the registry {repo.path}; published "
                "versions are immutable: publish a higher version",
                reason="exists",
            )
    known = [(_version_key(v.version), v.version) for v in mine]
    if known and max(known)[0] >= (1, version.key()):
        latest = max(known)[1]
        raise RegistryError(
            f"version {version} of {name} is lower than the latest published {name}@{latest}; "
            f"expected a version above {latest}",
            reason="older",
        )
