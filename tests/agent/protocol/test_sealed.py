"""Sealed secrets: real P-256 keys, every region of a token altered, malformed input, the
JSON paths unseal_tree names, redaction of text and of log records through real handlers."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.sealed import (
    MAX_PLAINTEXT_BYTES,
    MAX_TOKEN_CHARS,
    NONCE_BYTES,
    POINT_BYTES,
    SEALED_PREFIX,
    TAG_BYTES,
    RedactingFilter,
    SealedError,
    install_redaction,
    is_sealed,
    redact,
    seal,
    unseal,
    unseal_tree,
)
from agent.protocol.state import (
    MAX_ERROR_TEXT,
    ConfigReport,
    PipelineReport,
    ReportedState,
    UpdatePhase,
)

SECRET = "rtsp://admin:Tr0ub4dor-3xyz@10.0.0.7:554/stream1"
PASSWORD = "Tr0ub4dor-3xyz"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def raw(token: str) -> bytearray:
    body = token[len(SEALED_PREFIX) :]
    return bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def encode(data: bytes) -> str:
    return SEALED_PREFIX + base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode()


def test_round_trip_and_each_seal_differs(key: ec.EllipticCurvePrivateKey) -> None:
    a = seal(SECRET, key.public_key(), device_id="cam-1")
    b = seal(SECRET, key.public_key(), device_id="cam-1")
    assert a != b  # fresh ephemeral key and nonce each time
    assert is_sealed(a) and "=" not in a
    assert unseal(a, key, device_id="cam-1") == SECRET == unseal(b, key, device_id="cam-1")
    assert PASSWORD not in a and PASSWORD.encode() not in raw(a)


@pytest.mark.parametrize("text", ["", "ü-ß-密码", "x" * MAX_PLAINTEXT_BYTES])
def test_round_trip_edges(key: ec.EllipticCurvePrivateKey, text: str) -> None:
    token = seal(text, key.public_key(), device_id="cam-1")
    assert len(token) <= MAX_TOKEN_CHARS
    assert unseal(token, key, device_id="cam-1") == text


def test_padded_token_is_accepted(key: ec.EllipticCurvePrivateKey) -> None:
    token = seal("a", key.public_key(), device_id="cam-1")
    padded = token + "=" * (-len(token[len(SEALED_PREFIX) :]) % 4)
    assert unseal(padded, key, device_id="cam-1") == "a"


def test_other_device_id_does_not_open(key: ec.EllipticCurvePrivateKey) -> None:
    # same key on both "devices": only the device id differs, and the AAD/HKDF refuse it
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    with pytest.raises(SealedError) as e:
        unseal(token, key, device_id="cam-2")
    assert e.value.reason == "auth" and "cam-2" in str(e.value)
    assert PASSWORD not in str(e.value)


def test_other_key_does_not_open(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    with pytest.raises(SealedError) as e:
        unseal(token, other_key, device_id="cam-1")
    assert e.value.reason == "auth"


REGIONS = {
    "point-prefix": 0,
    "point-x": 10,
    "point-y": POINT_BYTES - 1,
    "nonce": POINT_BYTES + 3,
    "ciphertext": POINT_BYTES + NONCE_BYTES + 2,
    "tag": -TAG_BYTES // 2,
}


@pytest.mark.parametrize("region", list(REGIONS))
def test_every_region_tampered_is_refused(key: ec.EllipticCurvePrivateKey, region: str) -> None:
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    data = raw(token)
    data[REGIONS[region]] ^= 0x01
    with pytest.raises(SealedError) as e:
        unseal(encode(data), key, device_id="cam-1")
    assert e.value.reason in ("auth", "format")
    assert PASSWORD not in str(e.value)


def test_valid_other_point_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    # a well-formed but different ephemeral point: GCM authentication fails
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    data = raw(token)
    from cryptography.hazmat.primitives import serialization

    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    data[:POINT_BYTES] = other
    with pytest.raises(SealedError) as e:
        unseal(encode(data), key, device_id="cam-1")
    assert e.value.reason == "auth"


@pytest.mark.parametrize(
    ("token", "reason", "words"),
    [
        ("plain-text", "format", "not a sealed value"),
        (SEALED_PREFIX, "format", "truncated"),
        (SEALED_PREFIX + "AAAA", "format", "truncated"),
        (SEALED_PREFIX + "abc!def", "format", "not base64url"),
        (SEALED_PREFIX + "ab+/cd", "format", "not base64url"),
        (SEALED_PREFIX + "A", "format", "base64url"),
        (SEALED_PREFIX + "AB", "format", "canonical"),
        (SEALED_PREFIX + "A" * MAX_TOKEN_CHARS, "size", "at most"),
    ],
)
def test_malformed_tokens_say_why(
    key: ec.EllipticCurvePrivateKey, token: str, reason: str, words: str
) -> None:
    with pytest.raises(SealedError) as e:
        unseal(token, key, device_id="cam-1")
    assert e.value.reason == reason and words in str(e.value)


def test_truncated_real_token(key: ec.EllipticCurvePrivateKey) -> None:
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    for cut in (len(SEALED_PREFIX) + 20, len(SEALED_PREFIX) + 100, len(token) - 4):
        with pytest.raises(SealedError):
            unseal(token[:cut], key, device_id="cam-1")


def test_oversized_plaintext_refused_without_echo(key: ec.EllipticCurvePrivateKey) -> None:
    big = "pw-" + "z" * MAX_PLAINTEXT_BYTES
    with pytest.raises(SealedError) as e:
        seal(big, key.public_key(), device_id="cam-1")
    assert e.value.reason == "size" and "zzzz" not in str(e.value)


def test_bad_keys_and_ids(key: ec.EllipticCurvePrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SealedError, match="P-256"):
        seal("x", p384.public_key(), device_id="cam-1")
    token = seal("x", key.public_key(), device_id="cam-1")
    with pytest.raises(SealedError, match="P-256"):
        unseal(token, p384, device_id="cam-1")
    with pytest.raises(SealedError, match="device id"):
        seal("x", key.public_key(), device_id="bad id/+")
    with pytest.raises(SealedError, match="P-256"):  # a private key where the public one goes
        seal("x", key, device_id="cam-1")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_string_is_opened_or_refused_cleanly(text: str) -> None:
    with contextlib.suppress(SealedError):
        unseal(SEALED_PREFIX + text, _FUZZ_KEY, device_id="cam-1")


_FUZZ_KEY = ec.generate_private_key(ec.SECP256R1())


# --- unseal_tree ------------------------------------------------------------------------------


def test_unseal_tree_opens_every_value_and_copies(key: ec.EllipticCurvePrivateKey) -> None:
    pub = key.public_key()
    tree = {
        "pipelines": [
            {"name": "front", "source": seal(SECRET, pub, device_id="cam-1"), "threshold": 0.5},
            {
                "name": "back",
                "source": "file.mp4",
                "extra": [1, seal("tok", pub, device_id="cam-1")],
            },
        ]
    }
    opened: list[str] = []
    out = unseal_tree(tree, key, device_id="cam-1", opened=opened)
    assert opened == [SECRET, "tok"]  # every plaintext, in tree order: what callers mask
    assert out["pipelines"][0]["source"] == SECRET
    assert out["pipelines"][0]["threshold"] == 0.5
    assert out["pipelines"][1] == {"name": "back", "source": "file.mp4", "extra": [1, "tok"]}
    assert is_sealed(tree["pipelines"][0]["source"])  # the input is untouched


@pytest.mark.parametrize(
    ("tree", "path"),
    [
        ({"pipelines": [{"name": "a"}, {"source": "BAD"}]}, "pipelines[1].source"),
        ({"a b": {"x": ["ok", "BAD"]}}, "['a b'].x[1]"),
        ("BAD", ""),
    ],
)
def test_unseal_tree_names_the_failing_path(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey, tree: object, path: str
) -> None:
    wrong = seal(SECRET, other_key.public_key(), device_id="cam-1")

    def put(node: object) -> object:
        if node == "BAD":
            return wrong
        if isinstance(node, dict):
            return {k: put(v) for k, v in node.items()}
        if isinstance(node, list):
            return [put(v) for v in node]
        return node

    with pytest.raises(SealedError) as e:
        unseal_tree(put(tree), key, device_id="cam-1")
    assert e.value.path == path and e.value.reason == "auth"
    assert str(e.value).startswith(f"{path or '(root)'}: ")
    assert PASSWORD not in str(e.value)


def test_unseal_tree_refuses_deep_nesting(key: ec.EllipticCurvePrivateKey) -> None:
    tree: object = "x"
    for _ in range(100):
        tree = [tree]
    with pytest.raises(SealedError, match="deeper"):
        unseal_tree(tree, key, device_id="cam-1")


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://admin:secret@cam:554/s", "rtsp://admin:***@cam:554/s"),
        ("rtsp://cam:554/s", "rtsp://cam:554/s"),
        ("rtsp://admin@cam/s", "rtsp://admin@cam/s"),
        ("rtsp://:secret@cam/s", "rtsp://:***@cam/s"),
        ("rtsp://admin:p%40ss%3Aw@cam/s", "rtsp://admin:***@cam/s"),
        ("rtsp://admin:p@ss@cam/s", "rtsp://admin:***@cam/s"),  # raw '@' in a password
        ("rtsp://admin:a:b@cam/s", "rtsp://admin:***@cam/s"),
        (
            "opening rtsp://u:one@a/x then http://v:two@b:80/y.",
            "opening rtsp://u:***@a/x then http://v:***@b:80/y.",
        ),
        ("mail me@host: fine", "mail me@host: fine"),
        ("no url here", "no url here"),
    ],
)
def test_redact_urls(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_sealed_tokens_inside_text(key: ec.EllipticCurvePrivateKey) -> None:
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    text = f"source={token}, next={token}."
    assert redact(text) == f"source={SEALED_PREFIX}…, next={SEALED_PREFIX}…."


@pytest.fixture
def stream_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    parent = logging.getLogger("edgefleet-test-redaction")
    child = logging.getLogger("edgefleet-test-redaction.child")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    parent.propagate = False
    yield child, buf
    parent.removeHandler(handler)


def test_log_records_are_redacted_through_a_real_handler(
    stream_logger: tuple[logging.Logger, io.StringIO], key: ec.EllipticCurvePrivateKey
) -> None:
    child, buf = stream_logger
    parent = logging.getLogger("edgefleet-test-redaction")
    n = install_redaction(parent)
    assert n == len(parent.handlers) >= 1  # (pytest adds its own capture handlers too)
    assert install_redaction(parent) == n  # idempotent: one filter per handler
    for h in parent.handlers:
        assert sum(isinstance(f, RedactingFilter) for f in h.filters) == 1
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    child.info("camera %s opened", SECRET)  # in the args
    child.warning(f"source {SECRET} lost")  # in the message itself
    child.info("config %s", {"source": token})
    try:
        raise ValueError(f"cannot open {SECRET}")
    except ValueError:
        child.exception("pipeline failed")
    child.info("bad %d format", SECRET)  # arguments that do not fit the format
    out = buf.getvalue()
    assert PASSWORD not in out
    assert out.count("rtsp://admin:***@10.0.0.7:554/stream1") == 4
    assert "ValueError: cannot open rtsp://admin:***@" in out  # the traceback is kept, masked
    assert token not in out and f"{SEALED_PREFIX}…" in out


HOSTILE = ["a://b:" + "c" * 100_000, "x" * 100_000, "a://b:@" * 20_000, "a://" * 30_000]


@pytest.mark.parametrize("text", HOSTILE)
def test_redact_is_linear_on_hostile_text(text: str) -> None:
    # quadratic before the scheme was bounded: the first case took 71 s (no timing assertion:
    # a regression shows as a test that takes minutes)
    assert redact(text) == text.replace(":@", ":***@")


def test_reports_never_carry_a_password(key: ec.EllipticCurvePrivateKey) -> None:
    """What a device reports and what ingest decodes (the fleet page shows it) is masked,
    also when the text is cut to its limit right inside the URL."""
    token = seal(SECRET, key.public_key(), device_id="cam-1")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rep = PipelineReport(
        name="front", phase=UpdatePhase.REJECTED, updated_at=now,
        last_error="x" * (MAX_ERROR_TEXT - 20) + f" cannot open {SECRET}",
        waiting=f"camera {SECRET} reconnecting",
    )  # fmt: skip
    cfg = ConfigReport(reason=f"source {token} of {SECRET}: refused", updated_at=now)
    wire = ReportedState(device_id="cam-1", pipelines=[rep], config=cfg).encode()
    assert PASSWORD.encode() not in wire and token.encode() not in wire
    # a device that does not redact (old or hostile): ingest's decode masks it anyway
    raw_json = wire.replace(b"***", PASSWORD.encode())
    assert PASSWORD.encode() in raw_json
    decoded = ReportedState.decode(raw_json)
    assert decoded.config is not None and decoded.config.reason is not None
    assert PASSWORD not in (decoded.pipelines[0].waiting or "")
    assert PASSWORD not in decoded.config.reason
