"""Adapter: signed operator commands on ``cmd``, answered on ``cmd/result`` (contract 1.3).

paho's thread only queues a payload (bounded; an oversized one is dropped there); one worker
thread verifies each command (``agent.protocol.command.verify_command``: signatures by the
desired-state keys of the trusted root, device, contract, lifetime, expiry, nonce), records
its nonce in the replay memory (``DATA_DIR/commands/replay.json``, written atomically before
the command runs, so a replay is refused across restarts too), runs its handler
(``agent.sync.command_handlers``) and publishes the results at QoS 1: ``accepted``, then
``succeeded`` or ``failed``; or one ``refused`` with the reason. Every refusal and failure is
logged too. Handlers run one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel

from agent.common.errors import BadDataError, EdgefleetError
from agent.common.fsutil import atomic_write_json
from agent.common.mqtt import CallbackGuard
from agent.protocol.command import (
    MAX_OUTPUT,
    CommandRefused,
    CommandResult,
    ReplayMemory,
    ResultStatus,
    SignedCommand,
    decode_command,
    parse_args,
    verify_command,
)
from agent.protocol.state import MAX_ERROR_TEXT
from agent.protocol.topics import DEFAULT_ROOT, Topics

if TYPE_CHECKING:
    from securesystemslib.signer import Key  # type: ignore[attr-defined,unused-ignore]

    from agent.sync.command_handlers import Agent

log = logging.getLogger(__name__)

REPLAY_FILE = "commands/replay.json"
MAX_QUEUED = 16


class CommandFailed(EdgefleetError):
    """A command that ran and could not do what it was asked (the message says why)."""


@dataclass
class Outcome:
    """What a handler did: text for the operator, values (an upload id), and what to do once
    the result is on its way (``restart_agent`` exits only then)."""

    output: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    then: Callable[[], None] | None = None


Handler = Callable[[BaseModel], Outcome]
Keys = Callable[[], "tuple[Mapping[str, Key], int]"]


class CommandService:
    """Subscribes to this device's ``cmd`` topic and answers each command.

    Args:
        client: the device session's paho client (its loop running).
        device_id: this device.
        handlers: command name → handler.
        keys: the trusted desired-state keys and threshold (read for each command, so a root
            rotation applies at once).
        data_dir: where the replay memory lives.
        wall: the device's UTC wall clock.
        root: topic root.

    Call ``subscribe()`` after each (re)connect, ``start()`` once, ``stop()`` at the end.
    """

    def __init__(
        self,
        client: mqtt.Client,
        device_id: str,
        *,
        handlers: Mapping[str, Handler],
        keys: Keys,
        data_dir: Path,
        wall: Callable[[], datetime],
        root: str = DEFAULT_ROOT,
    ) -> None:
        topics = Topics(root)
        self.cmd_topic = topics.device(device_id, "cmd")
        self.result_topic = topics.device(device_id, "cmd/result")
        self.client = client
        self.device_id = device_id
        self.handlers = dict(handlers)
        self.keys = keys
        self.wall = wall
        self.replay_path = data_dir / REPLAY_FILE
        self.replay, self.not_before = self._load_replay()
        self.results: dict[str, int] = {}  # status → count (tests, status)
        self._queue: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self.guard = CallbackGuard(f"device={device_id} commands")
        client.message_callback_add(self.cmd_topic, self.guard.wrap(self._on_message))

    def _load_replay(self) -> tuple[ReplayMemory, datetime | None]:
        """The persisted memory; when it is unreadable, an empty one and the time before which
        commands are refused (they could be replays of commands it held)."""
        try:
            data = json.loads(self.replay_path.read_text())
        except FileNotFoundError:
            return ReplayMemory(), None
        except (OSError, ValueError) as e:
            now = self.wall()
            log.error(
                "device=%s replay memory %s unreadable (%s): commands issued before %s are"
                " refused", self.device_id, self.replay_path, e, now.isoformat(),
            )  # fmt: skip
            return ReplayMemory(), now
        return ReplayMemory.from_json(data), None

    def subscribe(self) -> None:
        self.client.subscribe(self.cmd_topic, qos=1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.client.message_callback_remove(self.cmd_topic)
        if self._thread is not None:
            # when the queue is full the worker is busy: it is a daemon thread, the session closes
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(timeout)
            self._thread = None

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        if len(msg.payload) > SignedCommand.max_bytes:
            raise BadDataError(
                f"command of {len(msg.payload)} bytes is over the {SignedCommand.max_bytes}-byte"
                " limit; dropped unanswered"
            )
        try:
            self._queue.put_nowait(bytes(msg.payload))
        except queue.Full:
            log.error("device=%s %d commands already queued: one dropped unanswered",
                      self.device_id, MAX_QUEUED)  # fmt: skip

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            try:
                self.handle(payload)
            except Exception:  # the worker must survive anything a command does
                log.exception("device=%s command handling failed", self.device_id)

    # --- one command ----------------------------------------------------------------------

    def _publish(
        self, cid: str | None, name: str | None, status: ResultStatus, **fields: Any
    ) -> mqtt.MQTTMessageInfo:
        if "reason" in fields:
            fields["reason"] = fields["reason"][:MAX_ERROR_TEXT]
        if "output" in fields:
            fields["output"] = fields["output"][-MAX_OUTPUT:]  # the end says how it finished
        result = CommandResult(device_id=self.device_id, id=cid, name=name, status=status,
                               finished_at=self.wall(), **fields)  # fmt: skip
        self.results[status.value] = self.results.get(status.value, 0) + 1
        return self.client.publish(self.result_topic, result.encode(), qos=1)

    def _admit(self, payload: bytes) -> tuple[SignedCommand, BaseModel]:
        """Verify, remember the nonce, parse the args.

        Raises:
            CommandRefused: the command may not run.
        """
        envelope = decode_command(payload)
        cmd = envelope.signed
        now = self.wall()
        keys, threshold = self.keys()
        verify_command(envelope, trusted_keys=keys, threshold=threshold,
                       device_id=self.device_id, now=now, seen=self.replay.seen)  # fmt: skip
        if self.not_before is not None and cmd.issued_at < self.not_before:
            raise CommandRefused(
                f"command {cmd.id} refused: issued before {self.not_before.isoformat()}, when"
                " the replay memory was lost; send it again",
                reason="replay", command_id=cmd.id, name=cmd.name,
            )  # fmt: skip
        self.replay.add(cmd, now)
        atomic_write_json(self.replay_path, self.replay.to_json(), mode=0o600)
        return envelope, parse_args(cmd)

    def handle(self, payload: bytes) -> None:
        """Admit one command, run it, publish its results (on the worker thread)."""
        try:
            envelope, args = self._admit(payload)
        except CommandRefused as e:
            log.warning("device=%s command=%s name=%s refused (%s): %s", self.device_id,
                        e.command_id, e.name, e.reason, e)  # fmt: skip
            self._publish(e.command_id, e.name, ResultStatus.REFUSED, reason=f"{e.reason}: {e}")
            return
        except BadDataError as e:  # the trust root names no usable keys
            log.error("device=%s command refused: %s", self.device_id, e)
            self._publish(None, None, ResultStatus.REFUSED, reason=f"keys: {e}")
            return
        cmd = envelope.signed
        log.info("device=%s command=%s name=%s args=%s accepted", self.device_id, cmd.id,
                 cmd.name, dict(cmd.args))  # fmt: skip
        self._publish(cmd.id, cmd.name, ResultStatus.ACCEPTED)
        try:
            outcome = self.handlers[cmd.name](args)
        except Exception as e:  # every failure is answered, whatever raised it
            why = str(e) if isinstance(e, EdgefleetError) else f"{type(e).__name__}: {e}"
            log.error("device=%s command=%s name=%s failed: %s", self.device_id, cmd.id,
                      cmd.name, why)  # fmt: skip
            self._publish(cmd.id, cmd.name, ResultStatus.FAILED, reason=why)
            return
        info = self._publish(cmd.id, cmd.name, ResultStatus.SUCCEEDED, output=outcome.output,
                             data=outcome.data)  # fmt: skip
        log.info("device=%s command=%s name=%s succeeded %s", self.device_id, cmd.id, cmd.name,
                 outcome.data or "")  # fmt: skip
        if outcome.then is not None:
            # not connected: the result is lost, the action still happens
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(5.0)
            outcome.then()


def failed_unless(ok: bool, message: str) -> None:
    """Raise ``CommandFailed(message)`` when not ``ok``."""
    if not ok:
        raise CommandFailed(message)


def wire_commands(agent: Agent) -> CommandService:
    """The command service for ``agent`` on its session (subscribed on each connect, started);
    needs ``agent.updates`` (its TUF client's trusted root names the keys)."""
    from agent.sync.command_handlers import agent_handlers, trusted_command_keys

    session = agent.session
    service = CommandService(
        session.client, agent.cfg.device_id, handlers=agent_handlers(agent),
        keys=trusted_command_keys(agent.updates.tuf), data_dir=agent.cfg.data_dir,
        wall=agent.wall, root=session.topics.root,
    )  # fmt: skip
    session.on_connected.append(service.subscribe)
    service.start()
    return service
