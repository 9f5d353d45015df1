"""Pure + small IO: the JSON Schemas of the wire messages, their topics and example payloads.

``MESSAGES`` names every JSON wire message; ``schemas()`` renders their JSON Schemas (draft
2020-12, as pydantic emits them) with an ``$id`` that carries ``CONTRACT_VERSION``;
``export_schemas(dir)`` writes them for dashboard builders (``edgefleet schema export DIR``),
deterministically, so that CI can compare the committed ``docs/schema/`` with a fresh export.
``EXAMPLES`` holds one real, validated instance per message; ``render_protocol_doc()`` builds
``docs/protocol.md`` from the topic table and those examples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.common.fsutil import atomic_write_bytes
from agent.protocol import CONTRACT_VERSION
from agent.protocol.command import CommandResult, SignedCommand
from agent.protocol.examples import EXAMPLES, EXTRA_EXAMPLES
from agent.protocol.fetch import MAX_CHUNK, MAX_FILE, MAX_HEADER, MAX_REQUEST, FetchRequest
from agent.protocol.state import (
    DeviceState,
    ReportedState,
    SignedDesired,
)
from agent.protocol.telemetry import (
    MAX_SNAPSHOT_BYTES,
    InferenceEvent,
    Snapshot,
    Telemetry,
)
from agent.protocol.topics import DEFAULT_ROOT
from agent.protocol.wire import MAX_MESSAGE

__all__ = [
    "EXAMPLES",
    "MESSAGES",
    "TOPICS",
    "TopicInfo",
    "export_schemas",
    "render",
    "render_protocol_doc",
    "schema_id",
    "schemas",
]

MESSAGES: dict[str, type[BaseModel]] = {
    "device_state": DeviceState,
    "signed_desired": SignedDesired,
    "reported_state": ReportedState,
    "telemetry": Telemetry,
    "inference_event": InferenceEvent,
    "snapshot": Snapshot,
    "fetch_request": FetchRequest,
    "signed_command": SignedCommand,
    "command_result": CommandResult,
}
"""Schema name → model of every JSON message on the wire."""

INDEX_FILE = "index.json"
SUFFIX = ".schema.json"


@dataclass(frozen=True)
class TopicInfo:
    """One topic of the contract (ARCHITECTURE.md "Wire contract")."""

    kind: str
    direction: str
    qos: int
    retained: bool
    message: str | None  # key of MESSAGES, None when the payload has no JSON schema (yet)
    content: str


TOPICS: tuple[TopicInfo, ...] = (
    TopicInfo("state", "dev→cloud", 1, True, "device_state", "birth message; LWT: online=false"),
    TopicInfo("desired", "cloud→dev", 1, True, "signed_desired", "signed desired state"),
    TopicInfo("reported", "dev→cloud", 1, True, "reported_state", "per-pipeline update phase"),
    TopicInfo("telemetry", "dev→cloud", 1, False, "telemetry", "periodic metrics"),
    TopicInfo("events", "dev→cloud", 1, False, "inference_event", "inference results"),
    TopicInfo(
        "snapshots", "dev→cloud", 1, False, "snapshot", "JPEG frames, from opted-in pipelines"
    ),
    TopicInfo(
        "fetch/req",
        "dev→cloud",
        1,
        False,
        "fetch_request",
        "chunk request (shared by the registry replicas; `fetch/req/R` for replica R: sticky)",
    ),
    TopicInfo(
        "fetch/resp",
        "cloud→dev",
        1,
        False,
        None,
        "binary: 4-byte big-endian header length, header JSON, data (agent/protocol/fetch.py)",
    ),
    TopicInfo(
        "clips/req",
        "cloud→dev",
        1,
        False,
        "fetch_request",
        "chunk request for one of the device's event clips (`clips/ID.mp4`; contract 1.2)",
    ),
    TopicInfo(
        "clips/resp", "dev→cloud", 1, False, None, "binary answers in the `fetch/resp` format"
    ),
    TopicInfo(
        "cmd",
        "cloud→dev",
        1,
        False,
        "signed_command",
        "operator command, signed like the desired state; nonce and expiry (contract 1.3)",
    ),
    TopicInfo(
        "cmd/result",
        "dev→cloud",
        1,
        False,
        "command_result",
        "accepted, then succeeded/failed; or refused with the reason (contract 1.3)",
    ),
)


def topic_template(kind: str) -> str:
    """``edgefleet/v1/devices/{device_id}/KIND`` under the default root."""
    return f"{DEFAULT_ROOT}/devices/{{device_id}}/{kind}"


def schema_id(name: str) -> str:
    """The ``$id`` of one schema: a URN naming the contract version."""
    return f"urn:edgefleet:contract:{CONTRACT_VERSION}:{name}"


def schemas() -> dict[str, dict[str, Any]]:
    """Schema name → JSON Schema dict of every message in ``MESSAGES``."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in MESSAGES.items():
        s = model.model_json_schema()
        s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        s["$id"] = schema_id(name)
        out[name] = s
    return out


def _topic_of_message() -> dict[str, TopicInfo]:
    """Message → the first topic that carries it (``fetch_request`` rides on ``fetch/req``
    and, for clips, ``clips/req``: the index names the first)."""
    out: dict[str, TopicInfo] = {}
    for t in TOPICS:
        if t.message:
            out.setdefault(t.message, t)
    return out


def index() -> dict[str, Any]:
    """The ``index.json`` content: contract version and, per message, its topic and flags."""
    by_message = _topic_of_message()
    messages = {}
    for name, model in MESSAGES.items():
        t = by_message[name]
        messages[name] = {
            "model": model.__name__,
            "schema": f"{name}{SUFFIX}",
            "topic": topic_template(t.kind),
            "direction": t.direction,
            "qos": t.qos,
            "retained": t.retained,
        }
    return {"contract": CONTRACT_VERSION, "topic_root": DEFAULT_ROOT, "messages": messages}


def render(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, 2-space indent, UTF-8, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def rendered_files() -> dict[str, bytes]:
    """File name → bytes of a full export (pure; ``export_schemas`` writes exactly these)."""
    files = {f"{name}{SUFFIX}": render(s) for name, s in schemas().items()}
    files[INDEX_FILE] = render(index())
    return files


def export_schemas(directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<name>.schema.json`` per message and ``index.json`` into ``directory``.

    Each file is written atomically, and only when its bytes change; ``*.schema.json`` files
    of messages no longer in ``MESSAGES`` are removed so the folder mirrors the contract.

    Returns:
        The paths written or left unchanged, sorted.

    Raises:
        OSError: the directory cannot be created or written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = rendered_files()
    for stale in d.glob(f"*{SUFFIX}"):
        if stale.name not in files:
            stale.unlink()
    paths = []
    for fname, data in sorted(files.items()):
        path = d / fname
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
        paths.append(path)
    return paths


def example_json(model: BaseModel) -> str:
    """Pretty JSON of an example, as it goes on the wire (keys in field order)."""
    return json.dumps(json.loads(model.model_dump_json()), indent=2, ensure_ascii=False)


def _limits_paragraph() -> list[str]:
    """The payload limits every receiver enforces, from the constants that enforce them."""
    return [
        f"**Limits.** A payload over its limit is dropped by the receiver, which counts it and"
        f" logs it without flooding its log; it never costs the receiver its connection. Sizes:"
        f" JSON messages {MAX_MESSAGE:,} bytes (snapshots {Snapshot.max_bytes:,}: a"
        f" {MAX_SNAPSHOT_BYTES >> 20} MiB JPEG in base64), chunk requests {MAX_REQUEST:,} bytes,"
        f" chunk answers a {MAX_HEADER:,}-byte header and {MAX_CHUNK:,} bytes of data. JSON"
        " nests at most about 200 levels (pydantic's JSON parser; real messages nest a few)."
        " Numbers must fit their field's bounds; non-finite ones (`1e999`, `NaN`, `Infinity`)"
        " and integers of more than 4,300 digits are refused wherever they appear. File"
        f" offsets and sizes are at most {MAX_FILE:,} bytes (1 TiB). Text and topics must be"
        " valid UTF-8.",
    ]


def render_protocol_doc() -> str:
    """Pure: the text of ``docs/protocol.md``."""
    lines = [
        "# edgefleet wire protocol",
        "",
        "<!-- Generated by `edgefleet schema export docs/schema --doc docs/protocol.md`"
        " from agent/protocol/schema.py; do not edit by hand. -->",
        "",
        f"Contract version **{CONTRACT_VERSION}** (`agent.protocol.CONTRACT_VERSION`). MQTT"
        f" 3.1.1-compatible. Topic root is configurable, default `{DEFAULT_ROOT}`; `D` is the"
        " device id (`[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`).",
        "",
        "Every JSON message is UTF-8, at most 64 KiB, validated strictly on receipt (unknown"
        " fields are rejected) and carries `contract` (`MAJOR.MINOR`) where it has a body of its"
        " own. JSON Schemas (draft 2020-12) are in [`docs/schema/`](schema/), with"
        " [`index.json`](schema/index.json) mapping each to its topic.",
        "",
        *_limits_paragraph(),
        "",
        "| topic | direction | QoS | retained | payload schema | content |",
        "|---|---|---|---|---|---|",
    ]
    for t in TOPICS:
        schema = f"[`{t.message}{SUFFIX}`](schema/{t.message}{SUFFIX})" if t.message else "—"
        lines.append(
            f"| `{topic_template(t.kind).replace('{device_id}', 'D')}` | {t.direction} | {t.qos}"
            f" | {'yes' if t.retained else 'no'} | {schema} | {t.content} |"
        )
    lines += ["", "## Example payloads", ""]
    by_message = _topic_of_message()
    examples = [(name, name, m) for name, m in EXAMPLES.items()]
    examples += [(title, title.split(" ")[0], m) for title, m in EXTRA_EXAMPLES.items()]
    for title, name, model in examples:
        t = by_message[name]
        lines += [
            f"### {title}: `{type(model).__name__}` on `…/devices/D/{t.kind}`",
            "",
            "```json",
            example_json(model),
            "```",
            "",
        ]
    return "\n".join(lines)
