"""Signed commands: real ed25519 signatures, every refusal of verify_command and parse_args,
the replay memory's bounds and persistence form, and the decoder fuzzed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from agent.protocol.command import (
    MAX_LIFETIME,
    MAX_LOG_BYTES,
    Command,
    CommandRefused,
    CommandResult,
    PipelineArgs,
    ReplayMemory,
    ResultStatus,
    SignedCommand,
    UploadLogsArgs,
    decode_command,
    new_command,
    parse_args,
    sign_command,
    verify_command,
)
from agent.protocol.state import SignatureEntry

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def signers() -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(3)]


def keys(*ss: CryptoSigner) -> dict[str, Any]:
    return {s.public_key.keyid: s.public_key for s in ss}


def cmd(name: str = "restart_pipeline", args: dict[str, Any] | None = None, **kw: Any) -> Command:
    c = new_command("cam-1", name, {"pipeline": "front"} if args is None else args, now=T0)
    return c.model_copy(update=kw) if kw else c


def wire(env: SignedCommand) -> SignedCommand:
    """Through the broker and back: what the device really verifies."""
    return decode_command(env.encode())


def check(env: SignedCommand, trusted: dict[str, Any], *, threshold: int = 1,
          now: datetime = T0 + timedelta(seconds=1), seen: Any = None) -> None:  # fmt: skip
    verify_command(env, trusted_keys=trusted, threshold=threshold, device_id="cam-1", now=now,
                   seen=seen or (lambda n: False))  # fmt: skip


def reason(env: SignedCommand, trusted: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(CommandRefused) as e:
        check(env, trusted, **kw)
    assert e.value.command_id == env.signed.id  # every refusal can be answered
    return e.value.reason


def test_a_signed_command_passes_and_survives_the_wire(signers: list[CryptoSigner]) -> None:
    env = wire(sign_command(cmd(), signers[:1]))
    check(env, keys(signers[0]))
    assert parse_args(env.signed) == PipelineArgs(pipeline="front")
    assert len(env.signed.nonce) * 4 >= 128


def test_new_commands_have_distinct_ids_and_nonces() -> None:
    a, b = cmd(), cmd()
    assert a.id != b.id and a.nonce != b.nonce


def test_forgeries_are_refused_for_their_signature(signers: list[CryptoSigner]) -> None:
    s0, s1, s2 = signers
    trusted = keys(s0, s1)
    assert reason(SignedCommand(signed=cmd()), trusted) == "unsigned"
    assert reason(wire(sign_command(cmd(), [s2])), trusted) == "signature"  # untrusted key
    # a valid signature moved onto another body: the body says restart_agent now
    good = sign_command(cmd(), [s0])
    forged = SignedCommand(signed=cmd("restart_agent", {}), signatures=good.signatures)
    assert reason(wire(forged), trusted) == "signature"
    # tampered args under the original signature
    tampered = SignedCommand(
        signed=good.signed.model_copy(update={"args": {"pipeline": "back"}}),
        signatures=good.signatures,
    )
    assert reason(wire(tampered), trusted) == "signature"
    bogus = SignedCommand(signed=cmd(), signatures=[SignatureEntry(keyid=s0.public_key.keyid,
                                                                   sig="00" * 64)])  # fmt: skip
    assert reason(wire(bogus), trusted) == "signature"


def test_threshold_counts_distinct_trusted_keys(signers: list[CryptoSigner]) -> None:
    s0, s1, _ = signers
    one_twice = sign_command(cmd(), [s0, s0])
    assert reason(wire(one_twice), keys(s0, s1), threshold=2) == "threshold"
    check(wire(sign_command(cmd(), [s0, s1])), keys(s0, s1), threshold=2)


@pytest.mark.parametrize(
    ("change", "now", "why"),
    [
        ({"device_id": "cam-2"}, None, "device"),
        ({"contract": "2.0"}, None, "contract"),
        ({"expires_at": T0 + MAX_LIFETIME + timedelta(seconds=1)}, None, "lifetime"),
        ({"expires_at": T0}, None, "lifetime"),
        ({}, T0 - timedelta(minutes=6), "early"),  # the device's clock is 6 min behind
        ({}, T0 + timedelta(minutes=5), "expired"),  # the default lifetime is 5 minutes
    ],
)
def test_claims_of_a_validly_signed_command_are_checked(
    signers: list[CryptoSigner], change: dict[str, Any], now: datetime | None, why: str
) -> None:
    env = wire(sign_command(cmd(**change), signers[:1]))
    kw = {"now": now} if now is not None else {}
    assert reason(env, keys(signers[0]), **kw) == why


def test_a_seen_nonce_is_a_replay(signers: list[CryptoSigner]) -> None:
    env = wire(sign_command(cmd(), signers[:1]))
    mem = ReplayMemory()
    check(env, keys(signers[0]), seen=mem.seen)
    mem.add(env.signed, T0)
    assert reason(env, keys(signers[0]), seen=mem.seen) == "replay"


@pytest.mark.parametrize(
    ("name", "args", "why"),
    [
        ("format_disk", {}, "unknown"),
        ("restart_pipeline", {}, "args"),  # pipeline missing
        ("restart_pipeline", {"pipeline": "../etc"}, "args"),
        ("snapshot", {"pipeline": "front", "extra": 1}, "args"),
        ("upload_logs", {"since": "yesterday"}, "args"),
        ("upload_logs", {"since": "2026-05-01T11:00:00"}, "args"),  # naive time
        ("upload_logs", {"since": "2026-05-01T11:00:00Z", "max_bytes": MAX_LOG_BYTES + 1}, "args"),
        ("check", {"verbose": True}, "args"),
    ],
)
def test_unknown_commands_and_malformed_args_are_refused(
    name: str, args: dict[str, Any], why: str
) -> None:
    with pytest.raises(CommandRefused) as e:
        parse_args(cmd(name, args))
    assert e.value.reason == why and e.value.name == name


def test_upload_logs_args_are_typed() -> None:
    a = parse_args(cmd("upload_logs", {"since": "2026-05-01T11:00:00Z"}))
    assert a == UploadLogsArgs(since=T0 - timedelta(hours=1), max_bytes=MAX_LOG_BYTES)


def test_malformed_payloads_are_refused_with_their_id_when_it_can_be_read() -> None:
    good = json.loads(SignedCommand(signed=cmd()).encode())
    good["signed"]["nonce"] = "short"
    with pytest.raises(CommandRefused) as e:
        decode_command(json.dumps(good).encode())
    assert e.value.reason == "malformed" and e.value.command_id == good["signed"]["id"]
    good["signed"]["id"] = "../x"
    with pytest.raises(CommandRefused) as e:
        decode_command(json.dumps(good).encode())
    assert e.value.command_id is None
    with pytest.raises(CommandRefused):
        decode_command(b"\xff" * 10)


def test_replay_memory_forgets_expired_nonces_and_is_bounded() -> None:
    mem = ReplayMemory(max_entries=2)
    a, b, c = cmd(), cmd(), cmd()
    mem.add(a, T0)
    mem.add(b, T0)
    with pytest.raises(CommandRefused) as e:
        mem.add(c, T0)
    assert e.value.reason == "replay_full" and not mem.seen(c.nonce)
    mem.add(c, a.expires_at)  # a and b expired by then: pruned, room again
    assert mem.seen(c.nonce) and not mem.seen(a.nonce) and len(mem) == 1


def test_replay_memory_round_trips_and_skips_junk() -> None:
    mem = ReplayMemory()
    a = cmd()
    mem.add(a, T0)
    data = json.loads(json.dumps(mem.to_json()))
    data["nonces"]["junk"] = "not a number"
    back = ReplayMemory.from_json(data)
    assert back.seen(a.nonce) and not back.seen("junk")
    assert len(ReplayMemory.from_json(["not", "a", "dict"])) == 0


def test_results_are_bounded_and_final_is_known() -> None:
    r = CommandResult(device_id="cam-1", id="c1", name="check", status=ResultStatus.ACCEPTED,
                      finished_at=T0)  # fmt: skip
    assert not r.final
    with pytest.raises(ValueError):
        CommandResult(device_id="cam-1", id="c1", status=ResultStatus.FAILED, finished_at=T0,
                      reason="x" * 501)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_decode_survives_any_bytes(payload: bytes) -> None:
    try:
        decode_command(payload)
    except CommandRefused as e:
        assert e.reason == "malformed"
