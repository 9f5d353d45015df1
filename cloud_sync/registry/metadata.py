"""Pure: the registry's TUF metadata rules — roles and policy, desired-state trust, targets.

What ``repo.Repository`` checks before it signs: the roles and their default expiry, the
policy (expiry days, thresholds), the desired-state trust a root names (``x-edgefleet-desired``)
and the keys of each role, and target paths, names and ``custom`` metadata. Signing itself is
in ``signing.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

# securesystemslib and tuf re-export these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import Key  # type: ignore[attr-defined,unused-ignore]
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Root,
    TargetFile,
)
from tuf.api.serialization.json import JSONSerializer

from cloud_sync.registry.keys import RegistryError

ROLES = ("root", "targets", "snapshot", "timestamp")
DESIRED = "desired"
KEY_ROLES = (*ROLES, DESIRED)
DESIRED_FIELD = "x-edgefleet-desired"
DEFAULT_EXPIRY_DAYS: Mapping[str, float] = {
    "root": 365.0,
    "targets": 90.0,
    "snapshot": 7.0,
    "timestamp": 1.0,
}
MAX_THRESHOLD = 16
# Target paths must survive the MQTT fetch request pattern (agent/protocol/fetch.py:
# ``targets/`` + 64 hex + ``.`` + path within 512 characters of [A-Za-z0-9._/-]); no segment
# starts with a dot, so ``..`` and hidden files cannot occur.
TARGET_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*\Z")
MAX_TARGET_PATH = 400
ROOT_FILE = re.compile(r"^([1-9][0-9]*)\.root\.json\Z")  # metadata/N.root.json
_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class DesiredTrust:
    """The desired-state signing keys a root delegates to, and how many must sign."""

    keys: dict[str, Key]
    threshold: int


def parse_desired_trust(root: Root) -> DesiredTrust:
    """The desired-state keys and threshold named in a (verified) root.

    Args:
        root: the signed part of a root the caller already trusts (e.g. ngclient's).

    Returns:
        Key id → key, and the threshold.

    Raises:
        RegistryError: (reason ``"metadata"``) the field is missing or malformed.
    """
    field = root.unrecognized_fields.get(DESIRED_FIELD)
    try:
        if not isinstance(field, dict):
            raise TypeError(f"expected an object, got {type(field).__name__}")
        raw_keys, threshold = field["keys"], field["threshold"]
        if not isinstance(raw_keys, dict) or not raw_keys:
            raise TypeError("'keys' must be a non-empty object")
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise TypeError(f"'threshold' must be an integer, got {threshold!r}")
        if not 1 <= threshold <= len(raw_keys):
            raise ValueError(f"'threshold' is {threshold}, expected 1..{len(raw_keys)}")
        # Key.from_dict pops fields off the dict it is given: hand it a deep copy.
        keys = {kid: Key.from_dict(kid, json.loads(json.dumps(kd))) for kid, kd in raw_keys.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(
            f"root v{root.version} field {DESIRED_FIELD!r} is invalid: {e!s}; expected "
            '{"keys": {keyid: key}, "threshold": n}',
            reason="metadata",
        ) from e
    return DesiredTrust(keys, threshold)


def role_keys(role: str, root: Root) -> tuple[set[str], int]:
    """The key ids ``root`` lists for ``role`` (``"desired"`` included) and its threshold."""
    if role == DESIRED:
        trust = parse_desired_trust(root)
        return set(trust.keys), trust.threshold
    r = root.roles[role]
    return set(r.keyids), r.threshold


def target_file_name(target: TargetFile) -> str:
    """Where a target lives under ``targets/`` (ngclient's consistent-snapshot name).

    ``models/d/1.0.0/model.onnx`` with sha256 ``ab…`` → ``models/d/1.0.0/ab….model.onnx``,
    as ``Updater.download_target`` builds it from the first (here the only) hash.
    """
    dirname, sep, basename = target.path.rpartition("/")
    return f"{dirname}{sep}{target.hashes['sha256']}.{basename}"


def check_target_path(path: str) -> None:
    """Raises ``RegistryError`` (reason ``"usage"``) unless ``path`` is a valid target path."""
    if len(path) > MAX_TARGET_PATH or not TARGET_PATH.fullmatch(path):
        raise RegistryError(
            f"target path {path!r} is invalid: expected at most {MAX_TARGET_PATH} characters "
            "of [A-Za-z0-9._-] in '/'-separated segments not starting with '.'",
            reason="usage",
        )


def check_targets(files: Mapping[str, Any], custom: Mapping[str, Mapping[str, Any]]) -> None:
    """Check the target paths of ``add_targets`` and the ``custom`` metadata signed with them.

    Raises:
        RegistryError: (reason ``"usage"``) no files, an invalid path, ``custom`` for a path
            not added, or ``custom`` that canonical JSON cannot encode (floats).
    """
    if not files:
        raise RegistryError("add_targets got no files, expected at least one", reason="usage")
    for path in files:
        check_target_path(path)
    if extra := sorted(set(custom) - set(files)):
        raise RegistryError(f"custom metadata for targets not added: {extra}", reason="usage")
    for path, c in custom.items():
        try:  # what TUF signs: OLPC canonical JSON (no floats)
            encode_canonical(json.loads(json.dumps(c, allow_nan=False)))
        except (TypeError, ValueError, FormatError) as e:
            raise RegistryError(
                f"custom metadata of {path} cannot be signed: {e}; expected JSON of "
                "objects, arrays, strings, integers, booleans and null (no floats)",
                reason="usage",
            ) from e


def check_policy(
    expiry_days: Mapping[str, float] | None, thresholds: Mapping[str, int] | None
) -> tuple[dict[str, float], dict[str, int]]:
    """Days each role stays valid and signatures each needs, defaults filled in.

    Raises:
        RegistryError: (reason ``"usage"``) an unknown role or a value out of bounds.
    """
    days = dict(DEFAULT_EXPIRY_DAYS)
    for role, d in (expiry_days or {}).items():
        if role not in ROLES:
            raise RegistryError(
                f"expiry for unknown role {role!r}, expected one of {ROLES}", reason="usage"
            )
        if not 0 < d <= 3650:
            raise RegistryError(
                f"expiry of {role} is {d} days, expected 0 < days <= 3650", reason="usage"
            )
        days[role] = float(d)
    thr = dict.fromkeys(KEY_ROLES, 1)
    for role, n in (thresholds or {}).items():
        if role not in KEY_ROLES:
            raise RegistryError(
                f"threshold for unknown role {role!r}, expected one of {KEY_ROLES}",
                reason="usage",
            )
        if not 1 <= n <= MAX_THRESHOLD:
            raise RegistryError(
                f"threshold of {role} is {n}, expected 1..{MAX_THRESHOLD}", reason="usage"
            )
        thr[role] = int(n)
    return days, thr


__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "DESIRED",
    "DESIRED_FIELD",
    "KEY_ROLES",
    "MAX_TARGET_PATH",
    "MAX_THRESHOLD",
    "ROLES",
    "ROOT_FILE",
    "TARGET_PATH",
    "DesiredTrust",
    "check_policy",
    "check_target_path",
    "check_targets",
    "parse_desired_trust",
    "role_keys",
    "target_file_name",
]
