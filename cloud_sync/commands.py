"""Adapter: ``edgefleet device cmd DEVICE ACTION …`` — send a signed command, print its result.

The command (``agent.protocol.command``) is signed with the registry's desired-state key (the
key ``edgefleet deploy`` signs desired states with; devices trust it through the signed TUF
root), published on ``ROOT/devices/D/cmd`` (QoS 1, not retained: a command is for now, and
expires in minutes), and the answer awaited on ``cmd/result``: ``accepted``, then
``succeeded`` or ``failed``; or ``refused`` with the reason. A log extract or snapshot the
device made is then fetched with the clips' chunk protocol (``uploads/ID`` on
``clips/req``/``clips/resp``). Exit code 0 only when the command succeeded.
"""

from __future__ import annotations

import argparse
import queue
import re
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.common.errors import BadDataError, TransportError
from agent.common.mqtt import CallbackGuard, connect_service, service_client
from agent.protocol.command import (
    DEFAULT_LIFETIME,
    MAX_LOG_BYTES,
    CommandResult,
    ResultStatus,
    new_command,
    sign_command,
)
from agent.protocol.topics import DEFAULT_ROOT, Topics, valid_device_id
from agent.protocol.wire import BadMessage
from cloud_sync.registry.repo import Repository

_SPAN = re.compile(r"^(\d+)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Progress = Callable[[str], None]


def parse_since(text: str, now: datetime) -> datetime:
    """``1h``, ``30m``, ``2d``, ``90s`` before ``now``, or an ISO time (UTC if no zone).

    Raises:
        ValueError: neither.
    """
    m = _SPAN.match(text.strip())
    if m:
        return now - timedelta(seconds=int(m[1]) * _UNIT_S[m[2]])
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected e.g. 1h, 30m, 2d or an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def send_command(
    repo_dir: Path,
    broker_url: str,
    device_id: str,
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    topic_root: str = DEFAULT_ROOT,
    timeout_s: float = 30.0,
    lifetime: timedelta = DEFAULT_LIFETIME,
    progress: Progress | None = None,
    fetch_to: Path | None = None,
) -> CommandResult:
    """Sign and send one command; its final result. With ``fetch_to``, the upload the result
    names (``data.upload``) is downloaded there (atomically).

    Raises:
        ValueError: a device id that is not topic-safe, or args out of their bounds.
        RegistryError: no desired-state key in the registry.
        TransportError: the broker is unreachable, or no final result within ``timeout_s``.
        BadDataError, RemoteNotFoundError …: the upload could not be fetched.
    """
    if not valid_device_id(device_id):
        raise ValueError(f"device id {device_id!r} is not topic-safe")
    say = progress or (lambda _m: None)
    signer = Repository(repo_dir).desired_signer()
    cmd = new_command(device_id, name, args, now=datetime.now(timezone.utc), lifetime=lifetime)
    envelope = sign_command(cmd, [signer])
    topics = Topics(topic_root)
    results: queue.Queue[CommandResult] = queue.Queue()

    def on_result(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            res = CommandResult.decode(bytes(msg.payload))
        except BadMessage:
            return  # someone else's garbage on the topic: not our answer
        if res.id == cmd.id:  # a refusal of a body the device could not read still has its id
            results.put(res)

    client = service_client(f"edgefleet-cmd-{device_id}-{cmd.id[-6:]}", broker_url)
    guard = CallbackGuard(f"cmd device={device_id}")
    client.message_callback_add(topics.device(device_id, "cmd/result"), guard.wrap(on_result))
    connect_service(client, broker_url)
    try:
        # one connection's packets are handled in order: subscribed before the command goes out
        client.subscribe(topics.device(device_id, "cmd/result"), qos=1)
        info = client.publish(topics.device(device_id, "cmd"), envelope.encode(), qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            raise TransportError(f"broker {broker_url} did not acknowledge the command")
        say(f"sent {name} ({cmd.id}) to device {device_id}, waiting up to {timeout_s:.0f} s")
        result = _await_final(results, device_id, name, timeout_s, say)
        upload = result.data.get("upload")
        if fetch_to is not None and result.status is ResultStatus.SUCCEEDED and upload:
            from cloud_sync.clips import fetch_upload

            n = fetch_upload(client, device_id, str(upload), fetch_to, topic_root=topic_root,
                             progress=say)  # fmt: skip
            say(f"{fetch_to}: {n} bytes")
        return result
    finally:
        client.disconnect()
        client.loop_stop()


def _await_final(
    results: queue.Queue[CommandResult], device_id: str, name: str, timeout_s: float, say: Progress
) -> CommandResult:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            res = results.get(timeout=max(0.0, left))
        except queue.Empty:
            raise TransportError(
                f"device {device_id} did not answer {name} within {timeout_s:.0f} s: is it"
                " online (`edgefleet fleet status`) and does its agent have a [trust] section?"
            ) from None
        if res.final:
            return res
        say(f"device {device_id} accepted {name}, working on it")


# --- command line -----------------------------------------------------------------------------

ACTIONS = {
    "restart-pipeline": "restart_pipeline",
    "restart-agent": "restart_agent",
    "snapshot": "snapshot",
    "check": "check",
    "logs": "upload_logs",
    "cancel-update": "cancel_update",
}


def add_cmd_command(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edgefleet device cmd DEVICE ACTION …`` under the ``device`` group."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", required=True, type=Path, help="registry directory (its key)")
    common.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    common.add_argument("--topic-root", default=DEFAULT_ROOT)
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
    c = dsub.add_parser("cmd", help="send a signed command to a device and print its result")
    c.add_argument("device", metavar="DEVICE")
    asub = c.add_subparsers(dest="action", required=True)
    p = asub.add_parser("restart-pipeline", parents=[common], help="restart one pipeline")
    p.add_argument("pipeline", metavar="NAME")
    asub.add_parser("restart-agent", parents=[common], help="the agent exits; systemd restarts it")
    s = asub.add_parser("snapshot", parents=[common], help="a JPEG of a pipeline's next frame")
    s.add_argument("pipeline", metavar="NAME")
    s.add_argument("-o", "--output", type=Path, default=None, help="also download the JPEG")
    asub.add_parser("check", parents=[common], help="run `edgefleet-agent check` on the device")
    lg = asub.add_parser("logs", parents=[common], help="download the agent's log since a time")
    lg.add_argument("--since", default="1h", help="1h, 30m, 2d or an ISO time (default 1h)")
    lg.add_argument("--max-bytes", type=int, default=MAX_LOG_BYTES, help="newest N bytes (4 MiB)")
    lg.add_argument("-o", "--output", type=Path, default=None, help="file (DEVICE-logs.log.gz)")
    cu = asub.add_parser("cancel-update", parents=[common], help="stop the update in progress")
    cu.add_argument("--reason", default="cancelled by operator")
    c.set_defaults(fn=_cmd)


def _args_of(a: argparse.Namespace, now: datetime) -> tuple[dict[str, Any], Path | None]:
    if a.action in ("restart-pipeline", "snapshot"):
        return {"pipeline": a.pipeline}, getattr(a, "output", None)
    if a.action == "logs":
        since = parse_since(a.since, now)
        out = a.output or Path(f"{a.device}-logs-{now.strftime('%Y%m%dT%H%M%SZ')}.log.gz")
        return {"since": since.isoformat(), "max_bytes": a.max_bytes}, out
    if a.action == "cancel-update":
        return {"reason": a.reason}, None
    return {}, None


def _cmd(a: argparse.Namespace) -> int:
    prog = f"edgefleet device cmd {a.device} {a.action}"
    try:
        args, dest = _args_of(a, datetime.now(timezone.utc))
        res = send_command(a.repo, a.broker, a.device, ACTIONS[a.action], args,
                           topic_root=a.topic_root, timeout_s=a.timeout, fetch_to=dest,
                           progress=lambda m: print(f"… {m}", file=sys.stderr))  # fmt: skip
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except BadDataError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return print_result(a.device, res)


def print_result(device_id: str, res: CommandResult) -> int:
    """Print a final result (the reason on stderr unless it succeeded); the exit code."""
    print(f"device {device_id}: {res.name or '?'} {res.id or '?'}: {res.status.value}")
    if res.output:
        print(res.output)
    for k, v in res.data.items():
        print(f"  {k}: {v}")
    if res.status is ResultStatus.SUCCEEDED:
        return 0
    print(f"{res.status.value}: {res.reason}", file=sys.stderr)
    return 1
