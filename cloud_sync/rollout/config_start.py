"""Adapter: what ``edgefleet rollout start --config`` reads at the operator's desk.

The TOML file, the secret values (``--secret NAME=@FILE`` reads a file, ``NAME=env:VAR`` an
environment variable; a value on the command line itself is refused: every local user can
read ``/proc/PID/cmdline``), and, when secrets are used, the devices the target matches now,
each sealed for with its enrolled key (``cloud_sync.sealing.seal_for_device``). Plaintext
values live only in this process, for the time it takes to validate and seal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from cloud_sync.ingest.store import Store
from cloud_sync.rollout.configdoc import ConfigRefused, RolloutConfig, build
from cloud_sync.rollout.snapshot import SnapshotReader
from cloud_sync.rollout.target import parse_target

_SECRET_ARG = re.compile(r"^(?P<name>[A-Za-z0-9_.-]{1,64})=(?P<how>@|env:)(?P<where>.+)\Z")


def read_secrets(items: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``NAME=@FILE`` / ``NAME=env:VAR`` → name → value (one trailing newline of a file cut).

    Raises:
        ConfigRefused: another form (the message never repeats what follows '='), a name
            given twice, an unreadable file, an unset or empty variable.
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for item in items:
        m = _SECRET_ARG.match(item)
        name = item.split("=", 1)[0]
        if m is None:
            raise ConfigRefused(
                f"--secret {name}=…: give the value as NAME=@FILE or NAME=env:VAR, never on "
                "the command line itself"
            )
        if name in out:
            raise ConfigRefused(f"--secret {name} given twice")
        if m["how"] == "@":
            try:
                value = Path(m["where"]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigRefused(f"--secret {name}: cannot read {m['where']}: {e}") from None
            value = value[:-1] if value.endswith("\n") else value
        else:
            value = env.get(m["where"], "")
        if not value:
            raise ConfigRefused(f"--secret {name}: {m['where']} is empty or not set")
        out[name] = value
    return out


def targeted_devices(store: Store, target: str, now: datetime) -> list[str]:
    """The devices ``target`` matches in the ingest database now."""
    t = parse_target(target)
    return [
        v.device_id for v in SnapshotReader(store).read(now, now, metrics=False) if t.matches(v)
    ]


def _sealer(ca_dir: Path) -> Callable[[str, str], str]:
    # imported here: the sealing module comes with the secrets work, and a configuration
    # without secrets must not need it
    from cloud_sync.sealing import seal_for_device

    return lambda device_id, plaintext: seal_for_device(ca_dir, device_id, plaintext)


def load_rollout_config(
    path: Path,
    secret_args: Sequence[str],
    *,
    store: Store,
    target: str,
    ca_dir: Path | None,
    now: datetime,
    on_skip: Callable[[str, str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> RolloutConfig:
    """Read, check and (with secrets) seal the configuration file for the targeted devices.

    Raises:
        ConfigRefused: the file cannot be read or is refused (see ``configdoc.build``); secrets
            without ``--ca``; no targeted device could be sealed for.
        StoreUnavailable: the database cannot be read (only with secrets).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigRefused(f"cannot read configuration {path}: {e}") from None
    values = read_secrets(secret_args, env)
    if not values:
        return build(text, {}, source=path.name)
    if ca_dir is None:
        raise ConfigRefused("--secret needs --ca DIR: secrets are sealed to each device's key")
    devices = targeted_devices(store, target, now)
    config = build(
        text, values, source=path.name, seal=_sealer(ca_dir), device_ids=devices,
        on_skip=on_skip,
    )  # fmt: skip
    if not config.sealed:
        raise ConfigRefused(
            f"target {target!r} matches {len(devices)} devices, none with an enrolled key in "
            f"{ca_dir} to seal the secrets for; nothing published"
        )
    return config


__all__ = ["load_rollout_config", "read_secrets", "targeted_devices"]
