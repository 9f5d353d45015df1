"""Adapter: what each operator command does on the agent (``agent.sync.commands`` admits and
answers them; the arguments arrive parsed, ``agent.protocol.command.COMMAND_ARGS``).

- ``restart_pipeline``: ``Agent.restart_pipeline`` (a new ``Pipeline`` on the same config).
- ``restart_agent``: the agent exits with ``RESTART_EXIT_CODE`` once the result is sent;
  the systemd unit restarts it (``RestartForceExitStatus=75``, ``SuccessExitStatus=75``).
- ``snapshot``: the pipeline's next inferred frame as a JPEG (``agent.telemetry.snapshots``),
  sent on ``snapshots`` like the periodic ones and kept as an upload for ``clips/req``.
- ``check``: ``edgefleet-agent check``'s report (``agent.check``).
- ``upload_logs``: the agent's log lines since a time (``agent.telemetry.logfile``), gzip'd
  into an upload the cloud fetches with the chunk protocol.
- ``cancel_update``: ``UpdateManager.cancel_current``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from agent.protocol.command import CancelUpdateArgs, PipelineArgs, UploadLogsArgs
from agent.protocol.desired import desired_keys_from_root
from agent.sync.commands import CommandFailed, Handler, Keys, Outcome
from agent.systemd import RESTART_EXIT_CODE

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.pipeline.runner import Pipeline

SNAPSHOT_WAIT_S = 10.0
SNAPSHOT_MAX_WIDTH = 1280
SNAPSHOT_QUALITY = 85


class Agent(Protocol):
    """What the handlers use of the agent (``agent.service.Agent``); a protocol, so that the
    sync package does not import the service that wires it."""

    cfg: AgentConfig
    pipelines: list[Pipeline]
    session: Any  # DeviceSession
    outbox: Any  # Outbox
    updates: Any  # UpdateManager, None without [trust]
    uploads: Any  # UploadStore
    config_path: Path | None
    wall: Callable[[], datetime]

    def restart_pipeline(self, name: str) -> None: ...

    def request_restart(self) -> None: ...


def trusted_command_keys(tuf: Any) -> Keys:
    """The desired-state keys of the newest trusted root (the provisioned one before the first
    TUF refresh): commands are signed by the same keys as desired states."""

    def keys() -> tuple[Mapping[str, Any], int]:
        try:
            root = tuf.trusted_root()
        except (OSError, DeserializationError):  # no refresh yet: the provisioned root
            root = Metadata[Root].from_bytes(tuf.bootstrap).signed
        return desired_keys_from_root(root)

    return keys


def agent_handlers(agent: Agent) -> dict[str, Handler]:
    """Command name → handler acting on ``agent``."""
    return {
        "restart_pipeline": lambda a: restart_pipeline(agent, cast(PipelineArgs, a)),
        "restart_agent": lambda _a: restart_agent(agent),
        "snapshot": lambda a: snapshot(agent, cast(PipelineArgs, a)),
        "check": lambda _a: check(agent),
        "upload_logs": lambda a: upload_logs(agent, cast(UploadLogsArgs, a)),
        "cancel_update": lambda a: cancel_update(agent, cast(CancelUpdateArgs, a)),
    }


def _pipeline(agent: Agent, name: str) -> Pipeline:
    for pipe in agent.pipelines:
        if pipe.name == name:
            return pipe
    names = ", ".join(p.name for p in agent.pipelines) or "none"
    raise CommandFailed(f"no pipeline {name!r} on device {agent.cfg.device_id} (it runs: {names})")


def restart_pipeline(agent: Agent, args: PipelineArgs) -> Outcome:
    _pipeline(agent, args.pipeline)
    agent.restart_pipeline(args.pipeline)
    return Outcome(f"pipeline {args.pipeline} restarted", {"pipeline": args.pipeline})


def restart_agent(agent: Agent) -> Outcome:
    return Outcome(
        f"agent exits with code {RESTART_EXIT_CODE}; its service manager starts it again",
        {"exit_code": RESTART_EXIT_CODE},
        then=agent.request_restart,
    )


def snapshot(agent: Agent, args: PipelineArgs) -> Outcome:
    from agent.telemetry.snapshots import FrameGrab, snapshot_message

    pipe = _pipeline(agent, args.pipeline)
    grab = FrameGrab()
    pipe.sinks = [*pipe.sinks, grab]  # a new list: the inference thread reads the old one whole
    try:
        got = grab.got.wait(SNAPSHOT_WAIT_S)
    finally:
        pipe.sinks = [s for s in pipe.sinks if s is not grab]
    if not got:
        model = pipe.model.ref if pipe.model is not None else "none (waiting for delivery)"
        raise CommandFailed(
            f"pipeline {args.pipeline} inferred no frame in {SNAPSHOT_WAIT_S:.0f} s (model"
            f" {model}, last error: {pipe.last_error or 'none'}): no snapshot"
        )
    msg, jpeg = snapshot_message(
        agent.cfg.device_id, grab.event, grab.image, max_width=SNAPSHOT_MAX_WIDTH,
        quality=SNAPSHOT_QUALITY,
    )  # fmt: skip
    if agent.outbox is not None and agent.session is not None:
        topic = agent.session.topics.device(agent.cfg.device_id, "snapshots")
        agent.outbox.put(topic, msg.encode(), qos=1)
    upload = agent.uploads.put("snapshot", jpeg)
    return Outcome(
        f"snapshot of pipeline {args.pipeline}: frame {msg.frame_seq}, {msg.width}x{msg.height},"
        f" {len(jpeg)} bytes JPEG, upload {upload}",
        {"upload": upload, "frame_seq": msg.frame_seq, "width": msg.width, "height": msg.height,
         "bytes": len(jpeg), "model": msg.model},
    )  # fmt: skip


def check(agent: Agent) -> Outcome:
    from agent.check import check_report, format_check

    path = str(agent.config_path) if agent.config_path is not None else None
    report = check_report(path, env=os.environ)
    text = "\n".join(format_check(report))
    if not report["ok"]:
        failing = [k for k in ("config", "profile") if not report[k]["ok"]]
        failing += [f"pipeline {p['name']}" for p in report["pipelines"] if not p["ok"]]
        raise CommandFailed(f"check found problems ({', '.join(failing)}):\n{text}")
    return Outcome(text, {"ok": True})


def upload_logs(agent: Agent, args: UploadLogsArgs) -> Outcome:
    from agent.telemetry.logfile import collect_since, log_files

    files = log_files(agent.cfg.data_dir)
    if not files:
        raise CommandFailed(
            f"no log file under {agent.cfg.data_dir / 'logs'}: only `edgefleet-agent run`"
            " writes one"
        )
    text, lines = collect_since(files, args.since, args.max_bytes)
    packed = gzip.compress(text, mtime=0)
    upload = agent.uploads.put("logs", packed)
    return Outcome(
        f"{lines} log lines since {args.since.isoformat()}: {len(text)} bytes,"
        f" {len(packed)} gzip'd, upload {upload}",
        {"upload": upload, "lines": lines, "bytes": len(text), "gzip_bytes": len(packed)},
    )


def cancel_update(agent: Agent, args: CancelUpdateArgs) -> Outcome:
    if agent.updates is None:
        raise CommandFailed("this agent has no update manager (no [trust] section)")
    cancelled = agent.updates.cancel_current(args.reason)
    if cancelled is None:
        return Outcome("no update in progress: nothing to cancel", {"cancelled": None})
    return Outcome(f"cancelled: {cancelled}", {"cancelled": str(cancelled)[:256]})


__all__ = ["RESTART_EXIT_CODE", "agent_handlers", "trusted_command_keys"]
