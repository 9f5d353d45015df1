"""Fuzz every parser of untrusted input: wire messages on every topic, chunk answers, desired
state and commands (decode + signature verification), model cards, agent config files,
tegrastats lines, ingest rows, and the operator-facing syntaxes (broker URLs, durations,
rollout targets, stages and gates); and the MQTT callbacks that receive the wire messages
(``callback:*``).

Each target gets ``--cases`` inputs from hypothesis (random bytes and text, random JSON,
mutations of a real, valid example, and hostile payloads: nesting 1,500 to 5,000 levels deep,
numbers such as 10**5000 and 1e999, payloads of several MB and invalid UTF-8, alone or in place
of one value of the example), and must either accept the input or raise its documented error
type. Anything else — another exception, or one input taking longer than ``--hang-s`` — is a
failure, printed with the input.

A callback target feeds each input as a paho ``MQTTMessage`` through paho's own dispatch into
the real object (device session, chunk client, rollout desired-state publisher) with paho's
exception suppression off: an exception that gets out, or one the callback's guard had to
catch as a bug, is a failure, and so is the object failing to take an honest message next.

    python -m scripts.fuzz_parsers                      # 10,000 cases per target
    python -m scripts.fuzz_parsers --cases 500 --only config --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined,unused-ignore]

from agent.common.errors import BadDataError, ConfigError
from agent.common.mqtt import CallbackGuard, make_client, parse_broker_url
from agent.config import BrokerConfig, load_config
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec, VariantSpec
from agent.protocol.desired import Verdict, sign_desired, verify_desired
from agent.protocol.fetch import (
    MAX_CHUNK,
    MAX_HEADER,
    FetchHeader,
    FetchRequest,
    decode_response,
    encode_response,
)
from agent.protocol.schema import EXAMPLES, MESSAGES
from agent.protocol.state import DeviceState, SignedDesired
from agent.protocol.telemetry import InferenceEvent, Snapshot, Telemetry
from agent.protocol.wire import BadMessage
from agent.sync.session import DeviceSession
from agent.telemetry.tegrastats import parse_tegrastats
from agent.update.transfer.client import ChunkClient
from cloud_sync.deploy import DesiredPublisher
from cloud_sync.ingest.rows import event_row, snapshot_row, telemetry_rows
from cloud_sync.registry.repo import Repository
from cloud_sync.rollout import parse_gate, parse_stage, parse_target
from cloud_sync.units import parse_duration

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=20,
)


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a JSON document, the root's ``()`` first."""
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


def _mutations(doc: Any) -> st.SearchStrategy[Any]:
    """A valid document with one value replaced, one key dropped, or one key added, anywhere."""
    all_paths = [p for p in _paths(doc) if p]

    @st.composite
    def mutate(draw: st.DrawFn) -> Any:
        new = json.loads(json.dumps(doc))
        path = draw(st.sampled_from(all_paths))
        parent = new
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.sampled_from(["replace", "drop", "add"]))
        if how == "replace" or not isinstance(parent, dict):
            parent[path[-1]] = draw(JSON)
        elif how == "drop":
            del parent[path[-1]]
        else:
            parent[draw(st.text(max_size=10))] = draw(JSON)
        return new

    return mutate()


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# --- hostile payloads: what small random JSON never is --------------------------------------

MB = 1 << 20
HUGE_NUMBERS = (
    b"1" + b"0" * 5000,  # 10**5000: past Python's 4,300-digit int-from-text limit
    b"-" + b"9" * 4301,
    b"1" + b"0" * 4000,  # under that limit, far over any field's bound
    b"1e999", b"-1e999", b"1e-999", b"1E+99999999999999999999", b"0." + b"1" * 5000,
    b"NaN", b"Infinity", b"-Infinity",
    b"9007199254740993", b"18446744073709551616", b"-0", b"1.7976931348623157e309",
)  # fmt: skip
BAD_UTF8 = (
    b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82",
)  # fmt: skip
_HOLE = "\u0000hole\u0000"


def _deep(depth: int, kind: str) -> bytes:
    """``depth`` levels of nested lists, of dicts, or of both in turn (json.loads dies near
    1,000 with RecursionError)."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "dict":
        return b'{"a":' * depth + b"0" + b"}" * depth
    return b'[{"a":' * (depth // 2) + b"0" + b"}]" * (depth // 2)


def _around(doc: Any, path: tuple[Any, ...]) -> tuple[bytes, bytes]:
    """``doc``'s JSON before and after the value at ``path`` (root: nothing around it)."""
    if not path:
        return b"", b""
    new = json.loads(json.dumps(doc))
    parent = new
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = _HOLE
    head, _, tail = json.dumps(new).encode().partition(json.dumps(_HOLE).encode())
    return head, tail


def _hostile(doc: Any, max_bytes: int = 8 * MB) -> st.SearchStrategy[bytes]:
    """Deep nesting, huge numbers, payloads of 1 MB (or ``max_bytes`` if less) to
    ``max_bytes`` and invalid UTF-8: the whole payload, or in place of one value of ``doc`` (so
    that they get past the first check)."""
    plain = json.dumps(doc).encode()
    where = st.sampled_from(_paths(doc))

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        head, tail = _around(doc, draw(where))
        kind = draw(st.sampled_from(["deep", "number", "big", "utf8"]))
        if kind == "deep":
            kinds = st.sampled_from(["list", "dict", "mixed"])
            return head + _deep(draw(st.integers(1_500, 5_000)), draw(kinds)) + tail
        if kind == "number":
            return head + draw(st.sampled_from(HUGE_NUMBERS)) + tail
        if kind == "big":  # (strategies are cached by their arguments: none holds MBs)
            n = draw(st.integers(min(MB, max_bytes), max_bytes))
            shape = draw(st.sampled_from(["string", "array", "padding"]))
            if shape == "padding":
                return plain + b" " * n
            value = b'"' + b"A" * n + b'"' if shape == "string" else b"[" + b"0," * (n // 2) + b"0]"
            return head + value + tail
        bad = draw(st.sampled_from(BAD_UTF8))
        if draw(st.booleans()):
            return head + b'"ab' + bad + b'cd"' + tail
        i = draw(st.integers(0, len(plain)))
        return plain[:i] + bad + plain[i:]

    return build()


def _payloads(example: Any, max_bytes: int = 8 * MB) -> st.SearchStrategy[bytes]:
    doc = json.loads(example.encode()) if hasattr(example, "encode") else example
    return (
        st.binary(max_size=400)
        | JSON.map(_json_bytes)
        | _mutations(doc).map(_json_bytes)
        | _hostile(doc, max_bytes)
    )


def _framed(header: bytes, data: bytes = b"") -> bytes:
    """A chunk answer: 4-byte length, header, data (whatever the header holds)."""
    return len(header).to_bytes(4, "big") + header + data


def _fetch_responses(header: FetchHeader) -> st.SearchStrategy[bytes]:
    """Chunk answers: random, mutated and hostile headers (deep ones that fit ``MAX_HEADER``:
    1,500 to 2,040 nested lists), and data past ``MAX_CHUNK``, up to several MB."""
    doc = json.loads(header.model_dump_json(exclude_none=True))
    honest = json.dumps(doc).encode()
    deep_header = st.builds(_deep, st.integers(1_500, MAX_HEADER // 2), st.just("list"))
    return (
        st.binary(max_size=400)
        | st.builds(lambda n, h, d: n.to_bytes(4, "big") + h + d, st.integers(0, 2**32 - 1),
                    JSON.map(_json_bytes), st.binary(max_size=50))
        | _mutations(doc).map(_json_bytes).map(_framed)
        | _hostile(doc, max_bytes=2 * MB).map(_framed)
        | deep_header.map(_framed)
        | st.builds(lambda n: _framed(honest, b"\0" * n), st.integers(MAX_CHUNK + 1, 6 * MB))
    )  # fmt: skip


@dataclass
class Target:
    name: str
    fn: Callable[[Any], Any]
    inputs: st.SearchStrategy[Any]
    allowed: tuple[type[BaseException], ...]


@dataclass
class Result:
    name: str
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    slowest_ms: float = 0.0
    seconds: float = 0.0
    failure: str | None = None
    slow_inputs: list[str] = field(default_factory=list)


def _config_target(tmp: Path) -> Callable[[bytes], Any]:
    path = tmp / "agent.toml"

    def load(data: bytes) -> Any:
        path.write_bytes(data)
        return load_config(path)

    return load


EXAMPLE_TOML = (Path(__file__).resolve().parents[1] / "docs" / "agent.example.toml").read_bytes()
TEGRA_LINE = (
    "RAM 2448/3964MB (lfb 1x2MB) SWAP 0/1982MB (cached 0MB) CPU [4%@1479,2%@1479,1%@1479,"
    "3%@1479] EMC_FREQ 2%@1600 GR3D_FREQ 0%@921 PLL@32C CPU@35C PMIC@50C GPU@33C AO@40.5C "
    "thermal@34.25C POM_5V_IN 2552/2552 POM_5V_GPU 0/0 POM_5V_CPU 320/320"
)


def _mutated_text(base: str) -> st.SearchStrategy[str]:
    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        i = draw(st.integers(0, len(base)))
        j = draw(st.integers(i, min(len(base), i + 20)))
        return base[:i] + draw(st.text(max_size=20)) + base[j:]

    return mutate()


def targets(tmp: Path) -> list[Target]:
    out = []
    for name, model in MESSAGES.items():
        decode = getattr(model, "decode", None) or FetchRequest.decode
        out.append(Target(f"wire:{name}", decode, _payloads(EXAMPLES[name]), (BadMessage,)))
    out += [
        Target("wire:fetch_response", decode_response, _fetch_responses(_HEADER), (BadMessage,)),
        _verify_target(),
        _sealed_target(),
        _command_target(),
        _session_target(),
        _fetcher_target(),
        _publisher_target(tmp),
        # a card arrives in a signed target of bounded length, hence smaller hostile inputs
        Target("card", ModelCard.model_validate_json, _payloads(_card_example(), 256 << 10),
               (ValueError,)),
        Target("config", _config_target(tmp),
               st.binary(max_size=300) | _mutated_text(EXAMPLE_TOML.decode()).map(str.encode),
               (ConfigError,)),
        Target("tegrastats", parse_tegrastats, st.text(max_size=200) | _mutated_text(TEGRA_LINE),
               (ValueError,)),
        # the ingest path: payload → contract → rows (the row builders take validated dicts)
        Target("ingest:telemetry", _ingest(Telemetry, telemetry_rows),
               _payloads(EXAMPLES["telemetry"]), (BadDataError,)),
        Target("ingest:event", _ingest(InferenceEvent, event_row),
               _payloads(EXAMPLES["inference_event"]), (BadDataError,)),
        Target("ingest:snapshot", _ingest(Snapshot, snapshot_row),
               _payloads(EXAMPLES["snapshot"]), (BadDataError,)),
        Target("broker_url", parse_broker_url,
               st.text(max_size=60) | _mutated_text("mqtts://broker.example.com:8883"),
               (ValueError,)),
        Target("duration", parse_duration, st.text(max_size=12) | _mutated_text("10m"),
               (ValueError,)),
        Target("rollout:target", parse_target,
               st.text(max_size=60) | _mutated_text("tag:site=berlin & !group:lab, cam-1"),
               (ValueError,)),
        Target("rollout:stage", parse_stage, st.text(max_size=10) | _mutated_text("25%"),
               (ValueError,)),
        Target("rollout:gate", parse_gate,
               st.text(max_size=30) | _mutated_text("p95_latency<+20%"), (ValueError,)),
    ]  # fmt: skip
    return out


def _verify_target() -> Target:
    """Decode and verify desired states against one real key: forged, replayed and mutated
    envelopes must be refused with ``BadDataError`` (``DesiredRejected``), never crash."""
    signer = CryptoSigner.generate_ed25519()
    keys = {signer.public_key.keyid: signer.public_key}
    example = EXAMPLES["signed_desired"]
    assert isinstance(example, SignedDesired)
    state = example.signed
    genuine = sign_desired(state, [signer])

    def verify(payload: bytes) -> Any:
        return verify_desired(SignedDesired.decode(payload), trusted_keys=keys, threshold=1,
                              device_id=state.device_id, last_revision=None)  # fmt: skip

    return Target("desired:verify", verify, _payloads(genuine), (BadDataError,))


def _sealed_target() -> Target:
    """Open sealed secrets with one real device key: mutated, truncated and foreign tokens
    must be refused with ``SealedError``, never crash or open."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.protocol.sealed import SEALED_PREFIX, SealedError, seal, unseal

    key = ec.generate_private_key(ec.SECP256R1())
    genuine = seal("rtsp://admin:pw@10.0.0.7/s", key.public_key(), device_id=DEVICE)

    def open_token(text: str) -> Any:
        return unseal(text, key, device_id=DEVICE)

    texts = st.text(max_size=300).map(lambda t: SEALED_PREFIX + t) | _mutated_text(genuine)
    return Target("sealed:unseal", open_token, texts, (SealedError,))


def _command_target() -> Target:
    """Decode, verify and parse commands against one real key, as the device's command worker
    does: forged, expired, mutated envelopes must be refused with ``BadDataError``
    (``CommandRefused``), never crash."""
    from datetime import timedelta

    from agent.protocol.command import decode_command, parse_args, sign_command, verify_command

    signer = CryptoSigner.generate_ed25519()
    keys = {signer.public_key.keyid: signer.public_key}
    example = EXAMPLES["signed_command"]
    cmd = example.signed  # type: ignore[attr-defined]
    genuine = sign_command(cmd, [signer])
    now = cmd.issued_at + timedelta(seconds=1)

    def verify(payload: bytes) -> Any:
        env = decode_command(payload)
        verify_command(env, trusted_keys=keys, threshold=1, device_id=cmd.device_id, now=now,
                       seen=lambda n: False)  # fmt: skip
        return parse_args(env.signed)

    return Target("command:verify", verify, _payloads(genuine), (BadDataError,))


# --- the MQTT callbacks: hostile messages through paho's own dispatch ------------------------

DEVICE = "cam-017"  # the examples' device
_HEADER = FetchHeader(id="r-1", path="targets/models/det/1.4.0/model.onnx", offset=0, total=3)


class Dropped(Exception):
    """The callback dropped the message (its "rejected", for the counts)."""


def _messages(topic: str, payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[Any]:
    """``(topic, payload)``: mostly the callback's own topic, now and then one that is not
    UTF-8 (brokers should refuse those; not all do)."""
    own = topic.encode()
    topics = st.sampled_from([own] * 6 + [own + b"\xff", b"\xc3\x28/" + own])
    return st.tuples(topics, payloads)


def _deliver(client: mqtt.Client, guard: CallbackGuard, topic: bytes, payload: bytes) -> None:
    """One PUBLISH into ``client``'s callbacks the way paho's network thread hands it over.

    Raises:
        AssertionError: an exception got out (it would have ended paho's thread), or the
            guard caught one that is not a refusal (a bug it saved the connection from).
    """
    msg = mqtt.MQTTMessage(mid=1, topic=topic)
    msg.payload, msg.qos = payload, 1
    failed = guard.failed
    client._handle_on_message(msg)  # what paho's thread calls per PUBLISH (no public name)
    if guard.failed != failed:
        raise AssertionError(f"the callback's guard caught a bug: {dict(guard.reasons)}")


def _quiet_client(client: mqtt.Client) -> mqtt.Client:
    """Exceptions that get out reach the fuzzer (make_client has paho swallow them)."""
    client.suppress_exceptions = False
    return client


def _session_target() -> Target:
    """The device session's desired-state callback, then what the update manager does with
    the payload (decode and verify, on its own thread in the agent); an honest signed state
    must get through after every input."""
    signer = CryptoSigner.generate_ed25519()
    keys = {signer.public_key.keyid: signer.public_key}
    example = EXAMPLES["signed_desired"]
    birth = EXAMPLES["device_state"]
    assert isinstance(example, SignedDesired) and isinstance(birth, DeviceState)
    state, revisions = example.signed, itertools.count(example.signed.revision + 1)
    got: list[bytes] = []
    session = DeviceSession(BrokerConfig(url="mqtt://127.0.0.1:1"), DEVICE, birth, got.append)
    client = _quiet_client(session.client)
    topic = session.topics.device(DEVICE, "desired")

    def verify(payload: bytes) -> Verdict:
        return verify_desired(SignedDesired.decode(payload), trusted_keys=keys, threshold=1,
                              device_id=DEVICE, last_revision=None)  # fmt: skip

    def feed(case: tuple[bytes, bytes]) -> None:
        got.clear()
        _deliver(client, session.guard, *case)
        taken = bool(got)
        if got:
            try:
                verify(got[0])
            except BadDataError:
                taken = False
        got.clear()
        honest = sign_desired(state.model_copy(update={"revision": next(revisions)}), [signer])
        _deliver(client, session.guard, topic.encode(), honest.encode())
        if got != [honest.encode()] or verify(got[0]) is not Verdict.ACCEPT:
            raise AssertionError("the session no longer passes on an honest desired state")
        if not taken:
            raise Dropped

    genuine = sign_desired(state, [signer])
    return Target("callback:session", feed, _messages(topic, _payloads(genuine)), (Dropped,))


def _fetcher_target() -> Target:
    """The chunk client's answer callback, with a window in flight whose id the mutated
    answers carry; an honest answer must reach that window after every input."""
    client = _quiet_client(make_client("fuzz-fetch"))
    chunks = ChunkClient(client, DEVICE)  # subscribing waits for a connection: fine here
    window: queue.SimpleQueue[tuple[FetchHeader, bytes]] = queue.SimpleQueue()
    rid = chunks.open_route(window)  # a window in flight, as a transfer opens it
    header = _HEADER.model_copy(update={"id": rid})
    honest = encode_response(header, b"abc")
    topic = chunks.resp_topic.encode()

    def feed(case: tuple[bytes, bytes]) -> None:
        _deliver(client, chunks.guard, *case)
        taken = not window.empty()
        while not window.empty():
            window.get_nowait()
        _deliver(client, chunks.guard, topic, honest)
        if window.empty() or window.get_nowait() != (header, b"abc"):
            raise AssertionError("the chunk client no longer routes an honest answer")
        if not taken:
            raise Dropped

    return Target("callback:fetcher", feed, _messages(chunks.resp_topic, _fetch_responses(header)),
                  (Dropped,))  # fmt: skip


def _publisher_target(tmp: Path) -> Target:
    """The rollout controller's desired-state publisher (retained states of every device);
    a state the registry signed must become the device's base after every input."""
    repo = Repository.init(tmp / "registry")
    signer = repo.desired_signer()
    pub = DesiredPublisher(tmp / "registry", "mqtt://127.0.0.1:1", client_id="fuzz-desired")
    client = _quiet_client(make_client("fuzz-desired"))
    pub.attach(client)
    example = EXAMPLES["signed_desired"]
    assert isinstance(example, SignedDesired)
    state, revisions = example.signed, itertools.count(1_000_000)
    topic = pub.topics.device(DEVICE, "desired")

    def feed(case: tuple[bytes, bytes]) -> None:
        before = pub.base(DEVICE)
        _deliver(client, pub.guard, *case)
        taken = pub.base(DEVICE) != before
        revision = next(revisions)
        honest = sign_desired(state.model_copy(update={"revision": revision}), [signer])
        _deliver(client, pub.guard, topic.encode(), honest.encode())
        base = pub.base(DEVICE)
        if base is None or base.revision != revision:
            raise AssertionError("the publisher no longer takes a validly signed state")
        if not taken:
            raise Dropped

    genuine = sign_desired(state, [signer])
    return Target("callback:publisher", feed, _messages(topic, _payloads(genuine)), (Dropped,))


def _ingest(model: Any, rows: Callable[[Any], Any]) -> Callable[[bytes], Any]:
    return lambda payload: rows(model.decode(payload).model_dump(mode="json"))


def _card_example() -> dict[str, Any]:
    """A real card, as the registry signs it (the sample detector's)."""
    card = ModelCard(
        name="blobdet", version="1.0.0", task="detection",
        input=InputSpec(width=640, height=640, channels=3, color="rgb", layout="nchw",
                        resize="letterbox", pad_value=114, scale=1.0 / 255.0),
        postprocess=PostprocessSpec(score_threshold=0.5, iou_threshold=0.45,
                                    box_format="cxcywh", has_objectness=True),
        labels=("blob",),
        variants=(VariantSpec(precision="fp32", file="model.onnx", sha256="0" * 64),),
    )  # fmt: skip
    return dict(json.loads(card.model_dump_json()))


def _timed(target: Target, data: Any) -> tuple[bool, float]:
    """Run one input: ``(accepted, milliseconds)``; refused with an allowed error → False.

    Raises:
        AssertionError: any other exception (the parser's bug).
    """
    t = time.perf_counter()
    try:
        target.fn(data)
        ok = True
    except target.allowed:
        ok = False
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}") from e
    return ok, (time.perf_counter() - t) * 1e3


def run(target: Target, cases: int, hang_s: float) -> Result:
    """Up to ``cases`` inputs through one target; the first failure stops it."""
    res = Result(target.name)
    t_start = time.perf_counter()
    limit_ms = hang_s * 1e3

    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(target.inputs)
    def check(data: Any) -> None:
        res.cases += 1
        ok, ms = _timed(target, data)
        res.accepted += ok
        res.rejected += not ok
        if ms > limit_ms:
            # a shared machine stalls now and then: a hang must reproduce to count
            ms = min(_timed(target, data)[1] for _ in range(2))
            if ms > limit_ms:
                res.slow_inputs.append(repr(data)[:200])
                raise AssertionError(f"one input took {ms:.0f} ms (limit {limit_ms:.0f} ms)")
        res.slowest_ms = max(res.slowest_ms, ms)

    try:
        check()
    except Exception as e:  # AssertionError, or hypothesis' Flaky* groups around one
        res.failure = str(e)[:2000]
    res.seconds = round(time.perf_counter() - t_start, 2)
    res.slowest_ms = round(res.slowest_ms, 2)
    return res


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--hang-s", type=float, default=1.0, help="one input longer than this fails")
    ap.add_argument("--only", action="append", default=[], help="targets whose name contains this")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # the callbacks' guards log the first refusal of each kind: thousands are provoked here
    guard_log = logging.getLogger("agent.common.mqtt")
    level = guard_log.level
    guard_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-fuzz-") as tmp:
            results = _run_all(args, Path(tmp))
    finally:
        guard_log.setLevel(level)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1))
    return results


def _run_all(args: argparse.Namespace, tmp: Path) -> list[Result]:
    results = []
    for t in targets(tmp):
        if args.only and not any(o in t.name for o in args.only):
            continue
        r = run(t, args.cases, args.hang_s)
        results.append(r)
        if not args.json:
            status = "ok" if r.failure is None else f"FAIL: {r.failure.splitlines()[0]}"
            print(f"{r.name:<24} {r.cases:>6} cases ({r.accepted} accepted, {r.rejected} "
                  f"rejected) in {r.seconds:>6.1f} s, slowest {r.slowest_ms:7.1f} ms  {status}",
                  flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.gettempdir() + "/hyp-fuzz")
    sys.exit(0 if all(r.failure is None for r in main()) else 1)
