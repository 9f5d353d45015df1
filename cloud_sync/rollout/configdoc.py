"""Pure: the pipeline configuration a rollout carries, and the document each device is sent.

The operator writes ``[[pipelines]]`` tables exactly as in the agent's config file. They are
checked here with the device's own models (``agent.config.AgentConfig``, which holds
``agent.pipeline.config.PipelineConfig`` and the cross-checks: unique names, the watchdog's
``stall_s`` at its default — the device's own value is not known at the operator's desk), so
a bad file is refused before anything is published.

A string may hold ``${secret:NAME}`` placeholders. Such a string is substituted *as a whole*
and sealed for each device (``sealed:v1:…``, opened only on the device), so a rollout keeps:

* ``template``: JSON text ``{"pipelines": [...]}`` with the placeholders as written (no value);
* ``sealed``: per device, one sealed string per secret-bearing string, in document order.

The document a device gets is the template with those strings put in (``document_for``); its
hash is what the device reports back. Without secrets every device gets the template itself.
Plaintext secret values exist only while a rollout starts: never in the rollout row, the
history, logs or output (validation messages are scrubbed of them).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.common.errors import BadDataError
from agent.protocol.state import (
    MAX_CONFIG_TEXT,
    ConfigTarget,
    DeviceId,
    config_hash,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECRET_RE = re.compile(r"\$\{secret:([A-Za-z0-9_.-]{1,64})\}")
SECRET_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# A configuration rollout's one entry in ``DeviceRecord.pipelines``: no pipeline name can
# start with '@' (PIPELINE_PATTERN), so it never collides with a model rollout's pipelines,
# and two configuration rollouts hold the same (device, CONFIG_KEY) pair (``busy``).
CONFIG_KEY = "@config"
CHECK_DEVICE_ID = "config-check"  # the device id the desk-side validation uses


class ConfigRefused(BadDataError):
    """The configuration cannot be rolled out (bad TOML, invalid pipeline, missing secret)."""


def short_hash(value: str | None) -> str:
    """The first 12 hex digits of a configuration hash (``-`` for none)."""
    return value[:12] if value else "-"


def parse_pipelines(text: str, source: str = "<config>") -> list[dict[str, Any]]:
    """The ``[[pipelines]]`` tables of a TOML text.

    Raises:
        ConfigRefused: not TOML, other top-level keys (those stay in the device's local file),
            or no pipeline at all.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigRefused(f"{source}: not valid TOML: {e}; nothing published") from None
    other = sorted(k for k in data if k != "pipelines")
    if other:
        raise ConfigRefused(
            f"{source}: only [[pipelines]] tables can be rolled out, found {other}; device "
            "settings (data_dir, broker, trust, …) stay in each device's local file"
        )
    pipelines = data.get("pipelines")
    if not isinstance(pipelines, list) or not pipelines:
        raise ConfigRefused(f"{source}: no [[pipelines]] table; nothing to roll out")
    return pipelines


def _walk(obj: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a TOML/JSON tree with ``fn`` applied to every string value (keys kept)."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    return obj


def _strings(obj: Any) -> Iterator[str]:
    """Every string value of a tree, in document order (the order ``_walk`` visits)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def secret_names(obj: Any) -> list[str]:
    """The ``${secret:NAME}`` names a tree uses, in order of first use."""
    return list(dict.fromkeys(m for s in _strings(obj) for m in SECRET_RE.findall(s)))


def secret_strings(obj: Any) -> list[str]:
    """The strings holding a placeholder, in document order (one sealed value each)."""
    return [s for s in _strings(obj) if SECRET_RE.search(s)]


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${secret:NAME}`` replaced by ``values[NAME]``."""
    return SECRET_RE.sub(lambda m: values[m.group(1)], text)


def scrub(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every secret value replaced by ``***`` (longest first)."""
    for v in sorted((v for v in values.values() if v), key=len, reverse=True):
        text = text.replace(v, "***")
    return text


def validate(pipelines: list[dict[str, Any]], values: Mapping[str, str], source: str) -> None:
    """Check the tables as a device will, with the secrets substituted.

    Raises:
        ConfigRefused: a placeholder without a value, a value no placeholder uses, or a table
            the device's models refuse (the message names the field, never a secret value).
    """
    names = secret_names(pipelines)
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigRefused(
            f"{source}: no value for secret(s) {missing}; give each with --secret "
            "NAME=@FILE or NAME=env:VAR; nothing published"
        )
    unused = sorted(set(values) - set(names))
    if unused:
        raise ConfigRefused(f"{source}: secret(s) {unused} given but not used by any string")
    from agent.config import AgentConfig  # the device's own models (layering allow-list)

    plain = _walk(pipelines, lambda s: substitute(s, values))
    try:
        AgentConfig.model_validate({"device_id": CHECK_DEVICE_ID, "pipelines": plain})
    except ValidationError as e:
        parts = [
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)[:3]
        ]
        raise ConfigRefused(
            scrub(f"{source}: a device would refuse it: {'; '.join(parts)}; nothing published",
                  values)
        ) from None  # fmt: skip


def document_text(tree: Any) -> str:
    """The JSON text a ``ConfigTarget`` carries: ``{"pipelines": [...]}``, compact.

    Raises:
        ConfigRefused: a value JSON cannot hold (TOML dates and times).
    """
    try:
        return json.dumps(tree, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigRefused(f"configuration holds a value JSON cannot carry: {e}") from None


@lru_cache(maxsize=4096)
def _render(template: str, tokens: tuple[str, ...]) -> str:
    if not tokens:
        return template
    it = iter(tokens)
    tree = json.loads(template)
    return document_text(_walk(tree, lambda s: next(it) if SECRET_RE.search(s) else s))


class RolloutConfig(BaseModel):
    """The configuration of a rollout, as stored in its spec (no plaintext secret in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(
        max_length=MAX_CONFIG_TEXT,
        description='JSON {"pipelines": [...]}, secret placeholders as written, no values',
    )
    source: str = Field("", max_length=256, description="The file it came from, for display")
    secrets: tuple[str, ...] = Field(default=(), description="Secret names it uses")
    sealed: dict[DeviceId, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Per device: one sealed string per secret-bearing string, in order",
    )

    @property
    def hash(self) -> str:
        """sha256 of the template: names this configuration (devices report per-device ones)."""
        return config_hash(self.template)

    @property
    def slots(self) -> int:
        """Strings that hold a secret (each is sealed per device)."""
        return len(secret_strings(json.loads(self.template)))

    def covers(self, device_id: str) -> bool:
        """Whether this rollout can send ``device_id`` its document (sealed values at hand)."""
        return not self.secrets or device_id in self.sealed

    def document_for(self, device_id: str) -> str:
        """The JSON text ``device_id`` is sent.

        Raises:
            KeyError: the configuration holds secrets and none were sealed for this device.
        """
        if not self.secrets:
            return self.template
        return _render(self.template, self.sealed[device_id])

    def hash_for(self, device_id: str) -> str:
        """The hash ``device_id`` reports once it runs this configuration."""
        return config_hash(self.document_for(device_id))

    def target_for(self, device_id: str) -> ConfigTarget:
        """The ``DesiredState.config`` for ``device_id``."""
        doc = self.document_for(device_id)
        return ConfigTarget(document=doc, hash=config_hash(doc))


def build(
    text: str,
    values: Mapping[str, str],
    *,
    source: str = "<config>",
    seal: Callable[[str, str], str] | None = None,
    device_ids: Sequence[str] = (),
    on_skip: Callable[[str, str], None] | None = None,
) -> RolloutConfig:
    """Parse, validate and (with secrets) seal a configuration for ``device_ids``.

    Args:
        text: the TOML text.
        values: secret name → plaintext (used here only, never stored).
        source: the file name, for messages.
        seal: ``seal(device_id, plaintext) -> sealed string``; required when secrets are used.
        device_ids: the devices to seal for (the ones the target matches now).
        on_skip: told ``(device_id, why)`` for a device that cannot be sealed for (e.g. no
            enrolled key); it is left out of the rollout.

    Raises:
        ConfigRefused: as ``parse_pipelines`` and ``validate``; a document too large; secrets
            but no ``seal``.
    """
    pipelines = parse_pipelines(text, source)
    validate(pipelines, values, source)
    template = document_text({"pipelines": pipelines})
    if len(template) > MAX_CONFIG_TEXT:
        raise ConfigRefused(
            f"{source}: the configuration is {len(template)} characters as JSON, at most "
            f"{MAX_CONFIG_TEXT}"
        )
    names = tuple(secret_names(pipelines))
    if not names:
        return RolloutConfig(template=template, source=source)
    if seal is None:
        raise ConfigRefused(f"{source}: uses secrets {list(names)}; sealing needs --ca")
    plain = [substitute(s, values) for s in secret_strings(pipelines)]
    sealed: dict[str, tuple[str, ...]] = {}
    for d in device_ids:
        try:
            sealed[d] = tuple(seal(d, p) for p in plain)
        except (BadDataError, OSError, ValueError, KeyError) as e:
            if on_skip is not None:
                on_skip(d, scrub(str(e), values))
            continue
        if len(_render(template, sealed[d])) > MAX_CONFIG_TEXT:
            raise ConfigRefused(
                f"{source}: with its sealed secrets the configuration for {d} exceeds "
                f"{MAX_CONFIG_TEXT} characters"
            )
    return RolloutConfig(template=template, source=source, secrets=names, sealed=sealed)


__all__ = [
    "CONFIG_KEY",
    "SECRET_NAME_PATTERN",
    "ConfigRefused",
    "RolloutConfig",
    "build",
    "document_text",
    "parse_pipelines",
    "scrub",
    "secret_names",
    "secret_strings",
    "short_hash",
    "substitute",
    "validate",
]
