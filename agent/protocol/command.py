"""Pure: the signed command contract on ``cmd`` (cloud→device) and ``cmd/result`` (device→cloud).

An operator's command is a ``Command`` body in a ``SignedCommand`` envelope
(``{"signed": …, "signatures": […]}``), signed like the desired state, by the keys and
threshold the signed TUF root names for desired states (``x-edgefleet-desired``; see
``agent.protocol.signing``). A device answers every command on ``cmd/result`` with one or two
``CommandResult`` messages: ``accepted`` when it starts on it, then ``succeeded`` or
``failed``; or one ``refused`` with the reason.

``verify_command`` checks, in this order (a forged message is refused for its signature,
never described by the claims it makes):

1. a threshold of distinct trusted keys signed the body (``unsigned``/``signature``/``threshold``);
2. it names this device (``device``) and our contract major version (``contract``);
3. its lifetime is at most ``MAX_LIFETIME`` (``lifetime``: the replay memory keeps each nonce
   until its command expires, so this bounds that memory), it was not issued more than
   ``MAX_CLOCK_SKEW`` in the device's future (``early``) and has not expired (``expired``);
4. its nonce was not seen before (``replay``).

The caller then records the nonce (``ReplayMemory.add``; ``replay_full`` when the memory is
full) and parses the arguments (``parse_args``: ``unknown`` command, malformed ``args``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

# securesystemslib re-exports these without __all__ or "as" (mypy --strict: no implicit re-export)
from securesystemslib.signer import (  # type: ignore[attr-defined,unused-ignore]
    Key,
    Signer,
)

from agent.common.errors import BadDataError
from agent.protocol import CONTRACT_VERSION
from agent.protocol.signing import canonical_body, count_valid, sign_body
from agent.protocol.state import (
    MAX_ERROR_TEXT,
    MAX_SIGNATURES,
    Contract,
    DeviceId,
    PipelineName,
    SignatureEntry,
    contract_major,
)
from agent.protocol.wire import WireMessage, describe_validation_error

COMMAND_NAMES = (
    "restart_pipeline",
    "restart_agent",
    "snapshot",
    "upload_logs",
    "check",
    "cancel_update",
)
MAX_LIFETIME = timedelta(hours=1)
MAX_CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_LIFETIME = timedelta(minutes=5)
MAX_LOG_BYTES = 4 << 20  # what one upload_logs may collect (the newest lines after 'since')
MAX_OUTPUT = 32 * 1024  # characters of a result's output (a check report is ~2 kB)
MAX_REPLAY_ENTRIES = 10_000  # nonces remembered at once (at most one hour's commands)
COMMAND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# any lower-case name parses, so that an unknown one gets a 'refused' result with its id
COMMAND_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
NONCE_PATTERN = r"^[0-9a-f]{32,128}$"  # 128 to 512 random bits, hex

CommandId = Annotated[str, StringConstraints(pattern=COMMAND_ID_PATTERN)]
CommandName = Annotated[str, StringConstraints(pattern=COMMAND_NAME_PATTERN)]
ArgKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ArgValue = Annotated[str, StringConstraints(max_length=256)] | int | bool | None

RefuseReason = Literal[
    "malformed", "unsigned", "signature", "threshold", "device", "contract", "lifetime",
    "early", "expired", "replay", "replay_full", "unknown", "args",
]  # fmt: skip


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (UTC expected), got a naive one")
    return value.astimezone(timezone.utc)


class Command(WireMessage):
    """One operator command for one device: the body that gets signed."""

    type: Literal["command"] = Field("command", description="Message kind, always 'command'")
    device_id: DeviceId = Field(description="The one device this command is for")
    id: CommandId = Field(description="Command id, echoed in its results")
    name: CommandName = Field(description=f"What to do: one of {', '.join(COMMAND_NAMES)}")
    args: dict[ArgKey, ArgValue] = Field(
        default_factory=dict,
        max_length=8,
        description=(
            "Arguments by command: restart_pipeline and snapshot {pipeline}; upload_logs"
            f" {{since (UTC ISO time), max_bytes (≤ {MAX_LOG_BYTES})}}; cancel_update"
            " {reason} (optional); the others none"
        ),
    )
    nonce: str = Field(
        pattern=NONCE_PATTERN, description="Random, at least 128 bits (hex); never reused"
    )
    issued_at: datetime = Field(description="When the operator issued it (UTC)")
    expires_at: datetime = Field(
        description=f"Refused from then on; at most {MAX_LIFETIME} after issued_at"
    )
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version MAJOR.MINOR")

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _times_utc(cls, v: datetime) -> datetime:
        return _utc(v)


class SignedCommand(WireMessage):
    """The envelope on ``…/devices/D/cmd``: body plus signatures (as the desired state)."""

    signed: Command = Field(description="The command that was signed")
    signatures: list[SignatureEntry] = Field(
        default_factory=list, max_length=MAX_SIGNATURES, description="Signatures over 'signed'"
    )


class ResultStatus(str, Enum):
    ACCEPTED = "accepted"  # started; a final result follows
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"  # never started: see 'reason'


class CommandResult(WireMessage):
    """A device's answer to one command on ``…/devices/D/cmd/result``."""

    type: Literal["command_result"] = Field(
        "command_result", description="Message kind, always 'command_result'"
    )
    device_id: DeviceId = Field(description="The device that answers")
    id: CommandId | None = Field(description="The command's id; null if it could not be read")
    name: CommandName | None = Field(None, description="The command's name, if it could be read")
    status: ResultStatus = Field(description="accepted, succeeded, failed or refused")
    reason: str = Field("", max_length=MAX_ERROR_TEXT, description="Why it was refused or failed")
    output: str = Field("", max_length=MAX_OUTPUT, description="Text the command produced")
    data: dict[ArgKey, ArgValue] = Field(
        default_factory=dict, max_length=16, description="Values such as an upload id"
    )
    finished_at: datetime = Field(description="When this result was made (UTC)")
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version MAJOR.MINOR")

    @field_validator("finished_at")
    @classmethod
    def _finished_utc(cls, v: datetime) -> datetime:
        return _utc(v)

    @property
    def final(self) -> bool:
        return self.status is not ResultStatus.ACCEPTED


# --- typed arguments ----------------------------------------------------------------------------


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: PipelineName = Field(description="The pipeline to act on")


class UploadLogsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since: datetime = Field(description="Collect the log lines written from then on (UTC)")
    max_bytes: int = Field(
        MAX_LOG_BYTES, ge=1024, le=MAX_LOG_BYTES, description="Keep at most the newest N bytes"
    )

    @field_validator("since")
    @classmethod
    def _since_utc(cls, v: datetime) -> datetime:
        return _utc(v)


class CancelUpdateArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field("cancelled by operator", min_length=1, max_length=200)


COMMAND_ARGS: dict[str, type[BaseModel]] = {
    "restart_pipeline": PipelineArgs,
    "restart_agent": NoArgs,
    "snapshot": PipelineArgs,
    "upload_logs": UploadLogsArgs,
    "check": NoArgs,
    "cancel_update": CancelUpdateArgs,
}


class CommandRefused(BadDataError):
    """A command the device will not run; reported on ``cmd/result``, never retried.

    Attributes:
        reason: what check failed (``RefuseReason``).
        command_id: the command's id, None when it could not be read.
        name: the command's name, None when it could not be read.
    """

    def __init__(
        self, message: str, *, reason: RefuseReason, command_id: str | None, name: str | None
    ) -> None:
        super().__init__(message)
        self.reason: RefuseReason = reason
        self.command_id = command_id
        self.name = name


# --- making and checking commands ---------------------------------------------------------------


def new_command(
    device_id: str,
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> Command:
    """A command with a fresh id and a 128-bit random nonce.

    Raises:
        pydantic.ValidationError: a field out of its bounds (a caller bug or bad input).
    """
    stamp = int(now.timestamp() * 1000)
    return Command(
        device_id=device_id,
        id=f"c{stamp}-{secrets.token_hex(3)}",
        name=name,
        args=dict(args or {}),
        nonce=secrets.token_hex(16),
        issued_at=now,
        expires_at=now + lifetime,
    )


def sign_command(cmd: Command, signers: Sequence[Signer]) -> SignedCommand:
    """Sign a command with every signer.

    Raises:
        ValueError: no signers given.
    """
    return SignedCommand(signed=cmd, signatures=sign_body(cmd, signers))


def decode_command(payload: bytes) -> SignedCommand:
    """Parse a ``cmd`` payload.

    Raises:
        CommandRefused: (``malformed``) it does not parse; ``command_id`` and ``name`` are
            those of the payload when they can be read, so the refusal can still be answered.
    """
    from agent.protocol.wire import BadMessage

    try:
        return SignedCommand.decode(payload)
    except BadMessage as e:
        cid, name = _salvage(payload)
        raise CommandRefused(str(e), reason="malformed", command_id=cid, name=name) from e


def _salvage(payload: bytes) -> tuple[str | None, str | None]:
    """The id and name of a payload that did not validate, when they are valid themselves."""
    import re

    try:
        body = json.loads(bytes(payload[: SignedCommand.max_bytes]))["signed"]
        cid, name = body.get("id"), body.get("name")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None, None
    ok_id = isinstance(cid, str) and re.fullmatch(COMMAND_ID_PATTERN[1:-1], cid)
    ok_name = isinstance(name, str) and re.fullmatch(COMMAND_NAME_PATTERN[1:-1], name)
    return (cid if ok_id else None), (name if ok_name else None)


def verify_command(
    envelope: SignedCommand,
    *,
    trusted_keys: Mapping[str, Key],
    threshold: int,
    device_id: str,
    now: datetime,
    seen: Callable[[str], bool],
) -> None:
    """Decide whether a command may run (steps 1-4 of the module docstring).

    Args:
        envelope: the decoded ``cmd`` message.
        trusted_keys: keyid → public key (``desired_keys_from_root``).
        threshold: distinct trusted keys that must have signed.
        device_id: this device.
        now: the device's wall clock (UTC).
        seen: whether a nonce is in the replay memory.

    Raises:
        CommandRefused: with ``reason`` set.
        ValueError: ``threshold`` below 1 (a caller bug, not bad data).
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    cmd = envelope.signed
    what = f"command {cmd.id} ({cmd.name})"

    def refuse(reason: RefuseReason, message: str) -> CommandRefused:
        return CommandRefused(f"{what} refused: {message}", reason=reason, command_id=cmd.id,
                              name=cmd.name)  # fmt: skip

    if not envelope.signatures:
        raise refuse("unsigned", "it carries no signature")
    valid, signed_by = count_valid(canonical_body(cmd), envelope.signatures, trusted_keys)
    if valid == 0:
        raise refuse(
            "signature",
            f"no valid signature from a trusted key ({len(envelope.signatures)} signatures,"
            f" {signed_by} by trusted keys, 0 valid; {threshold} needed)",
        )
    if valid < threshold:
        raise refuse(
            "threshold", f"{valid} valid signature(s) from trusted keys, {threshold} needed"
        )
    if cmd.device_id != device_id:
        raise refuse("device", f"it is for device {cmd.device_id!r}, this is {device_id!r}")
    if contract_major(cmd.contract) != contract_major(CONTRACT_VERSION):
        raise refuse("contract", f"contract {cmd.contract}, this agent speaks {CONTRACT_VERSION}")
    life = cmd.expires_at - cmd.issued_at
    if life <= timedelta(0) or life > MAX_LIFETIME:
        raise refuse(
            "lifetime",
            f"it expires {life.total_seconds():.0f} s after it was issued; at most"
            f" {MAX_LIFETIME.total_seconds():.0f} s allowed",
        )
    if cmd.issued_at > now + MAX_CLOCK_SKEW:
        raise refuse(
            "early",
            f"issued at {cmd.issued_at.isoformat()}, more than {MAX_CLOCK_SKEW} after this"
            f" device's time {now.isoformat()} (check the clocks)",
        )
    if now >= cmd.expires_at:
        raise refuse(
            "expired", f"it expired at {cmd.expires_at.isoformat()}, now is {now.isoformat()}"
        )
    if seen(cmd.nonce):
        raise refuse("replay", f"nonce {cmd.nonce[:12]}… was already used")


def parse_args(cmd: Command) -> BaseModel:
    """The command's typed arguments (``COMMAND_ARGS``).

    Raises:
        CommandRefused: ``unknown`` command name, or ``args`` that do not fit its model.
    """
    model = COMMAND_ARGS.get(cmd.name)
    if model is None:
        raise CommandRefused(
            f"command {cmd.id} refused: unknown command {cmd.name!r}; this agent knows"
            f" {', '.join(COMMAND_NAMES)}",
            reason="unknown", command_id=cmd.id, name=cmd.name,
        )  # fmt: skip
    try:
        return model.model_validate(cmd.args)
    except ValidationError as e:
        raise CommandRefused(
            f"command {cmd.id} ({cmd.name}) refused: bad args: {describe_validation_error(e)}",
            reason="args", command_id=cmd.id, name=cmd.name,
        ) from e  # fmt: skip


# --- replay memory ------------------------------------------------------------------------------


class ReplayMemory:
    """Nonces of accepted commands, each kept until its command expires; bounded.

    Pure: the adapter persists ``to_json()`` atomically after each ``add`` and loads it at
    start-up, so a command cannot be replayed across an agent restart either.
    """

    def __init__(self, max_entries: int = MAX_REPLAY_ENTRIES) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}  # nonce → expiry (epoch seconds)

    def __len__(self) -> int:
        return len(self._until)

    def seen(self, nonce: str) -> bool:
        return nonce in self._until

    def prune(self, now: datetime) -> int:
        """Forget nonces whose commands expired (``verify_command`` refuses those anyway)."""
        t = now.timestamp()
        old = [n for n, until in self._until.items() if until <= t]
        for n in old:
            del self._until[n]
        return len(old)

    def add(self, cmd: Command, now: datetime) -> None:
        """Remember ``cmd``'s nonce until it expires.

        Raises:
            CommandRefused: (``replay_full``) the memory holds ``max_entries`` live nonces.
        """
        self.prune(now)
        if len(self._until) >= self.max_entries:
            raise CommandRefused(
                f"command {cmd.id} refused: {len(self._until)} commands of the last"
                f" {MAX_LIFETIME} are remembered, the most allowed; try again later",
                reason="replay_full", command_id=cmd.id, name=cmd.name,
            )  # fmt: skip
        self._until[cmd.nonce] = cmd.expires_at.timestamp()

    def to_json(self) -> dict[str, Any]:
        return {"nonces": dict(sorted(self._until.items()))}

    @classmethod
    def from_json(cls, data: Any, max_entries: int = MAX_REPLAY_ENTRIES) -> ReplayMemory:
        """A memory from ``to_json()`` output; entries that are not (nonce, number) are skipped,
        and at most ``max_entries`` of the latest-expiring are kept."""
        mem = cls(max_entries)
        nonces = data.get("nonces") if isinstance(data, dict) else None
        if isinstance(nonces, dict):
            good = [
                (n, float(u))
                for n, u in nonces.items()
                if isinstance(n, str) and isinstance(u, (int, float)) and not isinstance(u, bool)
            ]
            good.sort(key=lambda item: item[1], reverse=True)
            mem._until = dict(good[:max_entries])
        return mem
