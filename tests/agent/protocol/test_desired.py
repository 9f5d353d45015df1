"""Signed desired state: real ed25519 signatures, replay/threshold/device rules, parsers fuzzed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from agent.common.errors import BadDataError
from agent.protocol.desired import (
    ROOT_FIELD,
    DesiredKeysError,
    DesiredRejected,
    Verdict,
    desired_keys_from_root,
    sign_desired,
    verify_desired,
)
from agent.protocol.state import (
    DesiredState,
    DeviceState,
    PipelineReport,
    PipelineTarget,
    Progress,
    ReportedState,
    SignatureEntry,
    SignedDesired,
    UpdatePhase,
)
from agent.protocol.wire import MAX_MESSAGE, BadMessage

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def signers() -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(3)]


def state(revision: int = 8, device: str = "cam-1", **kw: Any) -> DesiredState:
    return DesiredState(
        device_id=device,
        revision=revision,
        issued_at=T0,
        pipelines={"front": PipelineTarget(model="det", version="1.4.0")},
        **kw,
    )


def keys(*ss: CryptoSigner) -> dict[str, Any]:
    return {s.public_key.keyid: s.public_key for s in ss}


def wire(envelope: SignedDesired) -> SignedDesired:
    """Through the broker and back: what the device really verifies."""
    return SignedDesired.decode(envelope.encode())


def verify(env: SignedDesired, trusted: dict[str, Any], *, threshold: int = 1,
           last: int | None = 7, device: str = "cam-1") -> Verdict:  # fmt: skip
    return verify_desired(
        env, trusted_keys=trusted, threshold=threshold, device_id=device, last_revision=last
    )


def test_valid_signature_accepted_after_wire_round_trip(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(), [signers[0]]))
    assert verify(env, keys(signers[0])) is Verdict.ACCEPT
    assert verify(env, keys(signers[0]), last=None) is Verdict.ACCEPT


def test_same_revision_is_not_an_error(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(revision=7), [signers[0]]))
    assert verify(env, keys(signers[0]), last=7) is Verdict.SAME


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["signed"].__setitem__("revision", 9),
        lambda d: d["signed"]["pipelines"]["front"].__setitem__("version", "1.3.0"),
        lambda d: d["signed"]["pipelines"].__setitem__(
            "back", {"model": "det", "version": "0.1.0"}
        ),
        lambda d: d["signed"].__setitem__("issued_at", "2030-01-01T00:00:00Z"),
    ],
    ids=["revision", "version", "extra-pipeline", "issued_at"],
)
def test_tampered_body_fails(signers: list[CryptoSigner], edit: Any) -> None:
    doc = json.loads(sign_desired(state(), [signers[0]]).encode())
    edit(doc)
    env = SignedDesired.decode(json.dumps(doc).encode())
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]))
    assert ei.value.reason == "signature"
    assert "no valid signature" in str(ei.value) and "keeping revision 7" in str(ei.value)


def test_equivalent_timestamp_spelling_still_verifies(signers: list[CryptoSigner]) -> None:
    # the signature covers the value, not one spelling of it: "+00:00" == "Z"
    doc = json.loads(sign_desired(state(), [signers[0]]).encode())
    doc["signed"]["issued_at"] = "2024-05-01T12:00:00+00:00"
    env = SignedDesired.decode(json.dumps(doc).encode())
    assert verify(env, keys(signers[0])) is Verdict.ACCEPT


def test_wrong_key_fails(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(), [signers[1]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]))
    assert ei.value.reason == "signature"


def test_signature_under_trusted_keyid_by_other_key_fails(signers: list[CryptoSigner]) -> None:
    good = sign_desired(state(), [signers[1]])
    forged = SignedDesired(
        signed=good.signed,
        signatures=[SignatureEntry(keyid=signers[0].public_key.keyid, sig=good.signatures[0].sig)],
    )
    with pytest.raises(DesiredRejected) as ei:
        verify(wire(forged), keys(signers[0]))
    assert ei.value.reason == "signature"


@pytest.mark.parametrize("sig", ["", "00", "ab" * 64, "f" * 127])
def test_malformed_signature_bytes_fail_cleanly(signers: list[CryptoSigner], sig: str) -> None:
    env = SignedDesired(
        signed=state(), signatures=[SignatureEntry(keyid=signers[0].public_key.keyid, sig=sig)]
    )
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]))
    assert ei.value.reason == "signature"


def test_two_of_two_below_threshold(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(), [signers[0]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0], signers[1]), threshold=2)
    assert ei.value.reason == "threshold"
    assert "1 valid signature(s)" in str(ei.value) and "2 needed" in str(ei.value)


def test_two_of_two_met(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(), [signers[0], signers[1]]))
    assert verify(env, keys(signers[0], signers[1]), threshold=2) is Verdict.ACCEPT


def test_duplicate_signatures_count_once(signers: list[CryptoSigner]) -> None:
    env = sign_desired(state(), [signers[0], signers[0]])
    doubled = SignedDesired(signed=env.signed, signatures=[*env.signatures, *env.signatures])
    assert len(doubled.signatures) == 4
    with pytest.raises(DesiredRejected) as ei:
        verify(wire(doubled), keys(signers[0], signers[1]), threshold=2)
    assert ei.value.reason == "threshold"


def test_unknown_keyids_are_ignored(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(), [signers[2], signers[0]]))
    assert verify(env, keys(signers[0])) is Verdict.ACCEPT


def test_replayed_lower_revision_refused(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(revision=3), [signers[0]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]), last=7)
    e = ei.value
    assert (e.reason, e.revision, e.last_revision) == ("rollback", 3, 7)
    assert str(e) == (
        "desired state revision 3 is older than the applied revision 7: replay refused,"
        " keeping revision 7"
    )
    assert isinstance(e, BadDataError)


def test_forged_old_revision_is_reported_as_signature_not_rollback(
    signers: list[CryptoSigner],
) -> None:
    env = wire(sign_desired(state(revision=3), [signers[1]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]), last=7)
    assert ei.value.reason == "signature"


def test_other_devices_desired_refused(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(device="cam-2"), [signers[0]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]), device="cam-1")
    assert ei.value.reason == "device"
    assert "'cam-2'" in str(ei.value) and "'cam-1'" in str(ei.value)


def test_other_contract_major_refused(signers: list[CryptoSigner]) -> None:
    env = wire(sign_desired(state(contract="2.0"), [signers[0]]))
    with pytest.raises(DesiredRejected) as ei:
        verify(env, keys(signers[0]))
    assert ei.value.reason == "contract"
    assert wire(sign_desired(state(contract="1.9"), [signers[0]])).signed.contract == "1.9"
    assert verify(wire(sign_desired(state(contract="1.9"), [signers[0]])), keys(signers[0])) is (
        Verdict.ACCEPT
    )


def test_threshold_below_one_is_a_caller_bug(signers: list[CryptoSigner]) -> None:
    env = sign_desired(state(), [signers[0]])
    with pytest.raises(ValueError):
        verify(env, keys(signers[0]), threshold=0)
    with pytest.raises(ValueError):
        sign_desired(state(), [])


# --- keys from the TUF root ------------------------------------------------------------------


def root_field(*ss: CryptoSigner, threshold: int = 1) -> dict[str, Any]:
    return {
        ROOT_FIELD: {
            "keys": {s.public_key.keyid: s.public_key.to_dict() for s in ss},
            "threshold": threshold,
        }
    }


def test_keys_from_a_signed_tuf_root(signers: list[CryptoSigner]) -> None:
    root_signer = CryptoSigner.generate_ed25519()
    root = Root(expires=T0 + timedelta(days=365))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(root_signer.public_key, role)
    root.unrecognized_fields.update(root_field(signers[0], signers[1], threshold=2))
    md = Metadata(root)
    md.sign(root_signer)
    raw = md.to_bytes()

    parsed = Metadata[Root].from_bytes(raw)
    parsed.signed.verify_delegate("root", parsed.signed_bytes, parsed.signatures)
    for source in (parsed.signed, parsed.signed.unrecognized_fields, json.loads(raw)["signed"]):
        trusted, threshold = desired_keys_from_root(source)
        assert threshold == 2
        assert set(trusted) == {signers[0].public_key.keyid, signers[1].public_key.keyid}
        env = wire(sign_desired(state(), [signers[0], signers[1]]))
        assert verify(env, trusted, threshold=threshold) is Verdict.ACCEPT


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (None, "has no 'x-edgefleet-desired' field"),
        ({"keys": {}, "threshold": 1}, "non-empty"),
        ({"keys": "x", "threshold": 1}, "non-empty"),
        ("KEYS", "threshold"),
        ("THRESHOLD3", "only 2 keys"),
        ("BOOL", "threshold"),
        ("BADKEY", "not a usable key"),
        ("DUPKEY", "same public key"),
        ([1], "must be an object"),
    ],
)
def test_bad_root_field(signers: list[CryptoSigner], field: Any, message: str) -> None:
    good = root_field(signers[0], signers[1])[ROOT_FIELD]
    pk = signers[0].public_key.to_dict()
    special = {
        "KEYS": {"keys": good["keys"]},
        "THRESHOLD3": {**good, "threshold": 3},
        "BOOL": {**good, "threshold": True},
        "BADKEY": {"keys": {"k": {"keytype": "ed25519"}}, "threshold": 1},
        "DUPKEY": {"keys": {"a": pk, "b": pk}, "threshold": 1},
    }
    value = special.get(field, field) if isinstance(field, str) else field
    root: dict[str, Any] = {"_type": "root"} if value is None else {ROOT_FIELD: value}
    with pytest.raises(DesiredKeysError, match=message):
        desired_keys_from_root(root)


# --- parsers of untrusted bytes --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
desired_keys = st.sampled_from(
    ["type", "device_id", "revision", "issued_at", "contract", "pipelines", "signed",
     "signatures", "keyid", "sig", "model", "version", "front"]
)  # fmt: skip
near_desired = st.fixed_dictionaries(
    {
        "signed": st.dictionaries(desired_keys, json_values, max_size=7),
        "signatures": st.lists(st.dictionaries(desired_keys, json_values, max_size=3)),
    }
)
reported_keys = st.sampled_from(
    ["type", "device_id", "desired_revision", "pipelines", "contract", "name", "phase",
     "progress", "done", "total", "updated_at", "last_error", "precision"]
)  # fmt: skip
near_reported = st.dictionaries(
    reported_keys,
    json_values | st.lists(st.dictionaries(reported_keys, json_values, max_size=6), max_size=3),
    max_size=6,
)
PARSERS = [SignedDesired.decode, ReportedState.decode, DeviceState.decode]


@pytest.mark.parametrize("decode", PARSERS)
@given(payload=st.binary(max_size=512))
@settings(max_examples=150)
def test_random_bytes_only_bad_message(decode: Any, payload: bytes) -> None:
    try:
        decode(payload)
    except BadMessage as e:
        assert str(e)


@pytest.mark.parametrize("decode", PARSERS)
@given(doc=json_values | near_desired | near_reported)
@settings(max_examples=300)
def test_random_json_only_bad_message(decode: Any, doc: Any) -> None:
    try:
        payload = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        decode(payload)
    except BadMessage as e:
        assert str(e)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "Invalid JSON"),
        (b"\xff\xfe", "Invalid JSON"),
        (b"[" * 5000, "Invalid JSON"),
        (b"x" * (MAX_MESSAGE + 1), "more than the 65536 allowed"),
        (b'{"signed": {}, "signatures": []}', "field 'signed.device_id'"),
        (b'{"signed": 1, "signatures": [], "extra": 1}', "field 'signed'"),
    ],
)
def test_bad_desired_messages_say_why(payload: bytes, fragment: str) -> None:
    with pytest.raises(BadMessage, match=fragment):
        SignedDesired.decode(payload)


@pytest.mark.parametrize(
    "change",
    [
        {"revision": 0},
        {"device_id": "a/b"},
        {"issued_at": "2024-05-01T12:00:00"},
        {"contract": "one"},
        {"pipelines": {"front": {"model": "det", "version": "1.4"}}},
        {"pipelines": {"../x": {"model": "det", "version": "1.4.0"}}},
        {"pipelines": {"front": {"model": "../det", "version": "1.4.0"}}},
        {"pipelines": {"front": {"model": "det", "version": "١.٢.٣"}}},
        {"type": "reported"},
        {"surprise": True},
    ],
)
def test_desired_schema_rejects(change: dict[str, Any]) -> None:
    doc = json.loads(SignedDesired(signed=state()).encode())
    doc["signed"].update(change)
    with pytest.raises(BadMessage):
        SignedDesired.decode(json.dumps(doc).encode())


def test_issued_at_normalized_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    s = DesiredState(device_id="d", revision=1, issued_at=datetime(2024, 1, 1, 13, tzinfo=cet))
    assert s.issued_at == datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    assert s.issued_at.utcoffset() == timedelta(0)


def test_reported_and_device_state_round_trip() -> None:
    rep = ReportedState(
        device_id="cam-1",
        desired_revision=8,
        pipelines=[
            PipelineReport(
                name="front",
                phase=UpdatePhase.BUILDING,
                active_model="det",
                active_version="1.3.2",
                backend="tensorrt",
                precision="fp16",
                target_model="det",
                target_version="1.4.0",
                progress=Progress(done=3, total=10),
                updated_at=T0,
            )
        ],
    )
    assert ReportedState.decode(rep.encode()) == rep
    dev = DeviceState(
        device_id="cam-1",
        online=False,
        agent_version="0.1.0",
        profile="jetson-orin-nano",
        pipelines=["front"],
        tags={"site": "berlin"},
    )
    assert DeviceState.decode(dev.encode()) == dev


@pytest.mark.parametrize(
    "doc",
    [
        {"device_id": "cam-1", "pipelines": [{"name": "a", "phase": "bogus", "updated_at": 0}]},
        {"device_id": "cam-1", "pipelines": [{"name": "a", "phase": "trial", "updated_at": 0,
                                              "progress": {"done": 5, "total": 2}}]},
        {"device_id": "cam-1", "pipelines": [{"name": "a", "phase": "trial", "updated_at": 0}] * 2},
        {"device_id": "cam-1", "desired_revision": 0},
    ],
)  # fmt: skip
def test_reported_schema_rejects(doc: dict[str, Any]) -> None:
    with pytest.raises(BadMessage):
        ReportedState.decode(json.dumps(doc).encode())


def test_long_error_is_cut_so_the_report_still_fits() -> None:
    rep = PipelineReport(name="a", phase=UpdatePhase.REJECTED, last_error="x" * 10_000,
                         updated_at=T0)  # fmt: skip
    assert rep.last_error is not None and len(rep.last_error) == 500
    assert rep.last_error.endswith("…")
    full = ReportedState(
        device_id="cam-1",
        pipelines=[rep.model_copy(update={"name": f"p{i}"}) for i in range(64)],
    )
    assert len(full.encode()) <= MAX_MESSAGE


def test_encode_refuses_what_receivers_would_drop() -> None:
    huge = DeviceState(device_id="d", online=True, agent_version="0", profile="x",
                       tags={f"k{i}": "v" * 256 for i in range(64)})  # fmt: skip
    assert len(huge.model_dump_json()) < MAX_MESSAGE  # 64 tags of 256 fit
    rep = PipelineReport(name="a", phase=UpdatePhase.REJECTED, last_error="\x00" * 499,
                         updated_at=T0)  # fmt: skip
    bloated = ReportedState(
        device_id="cam-1", pipelines=[rep.model_copy(update={"name": f"p{i}"}) for i in range(64)]
    )
    with pytest.raises(BadMessage, match="more than the 65536 a receiver accepts"):
        bloated.encode()
