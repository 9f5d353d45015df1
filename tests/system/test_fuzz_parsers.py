"""Every parser of untrusted input and every MQTT callback under scripts/fuzz_parsers.py (a
short run; the benchmark run uses 10,000 cases per target, see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, find, settings

import scripts.fuzz_parsers
from agent.common.errors import ConfigError
from agent.common.mqtt import CallbackGuard, make_client
from agent.config import load_config
from agent.protocol.schema import EXAMPLES

FUZZ = scripts.fuzz_parsers


def test_every_parser_accepts_or_refuses_cleanly() -> None:
    results = FUZZ.main(["--cases", "150", "--json"])
    names = {r.name for r in results}
    assert {"wire:telemetry", "wire:signed_desired", "desired:verify", "config", "card",
            "wire:signed_command", "command:verify",
            "ingest:event", "rollout:target", "wire:fetch_response", "callback:session",
            "callback:fetcher", "callback:publisher"} <= names  # fmt: skip
    failures = {r.name: r.failure for r in results if r.failure}
    assert failures == {}
    assert all(r.cases >= 100 for r in results), {r.name: r.cases for r in results}
    # the mutations reach past the first check: some inputs are accepted, most refused
    assert all(r.rejected > 0 for r in results)


def test_the_harness_catches_a_parser_that_raises_the_wrong_error() -> None:
    def broken(data: bytes) -> None:
        if len(data) > 3:
            raise KeyError("boom")

    t = FUZZ.Target("broken", broken, FUZZ.st.binary(max_size=20), (ValueError,))
    r = FUZZ.run(t, 200, 1.0)
    assert r.failure is not None and "KeyError" in r.failure


def test_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # found by the fuzzer: a UnicodeDecodeError escaped load_config
    p = tmp_path / "agent.toml"
    p.write_bytes(b'device_id = "\xb1"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def _depth(data: bytes) -> int:
    depth = deepest = 0
    for b in data:  # brackets inside strings do not occur in these inputs
        depth += (b in b"[{") - (b in b"]}")
        deepest = max(deepest, depth)
    return deepest


def _features(data: bytes) -> dict[str, bool]:
    """What a payload is, in a few booleans (hypothesis prints what it finds: not MBs)."""
    depth = _depth(data)
    return {
        "1,500+ levels deep": len(data) < (1 << 20) and depth >= 1500,
        "10**5000 as JSON text": b"1" + b"0" * 5000 in data,
        "1e999": b"1e999" in data,
        "several MB": len(data) >= 3 << 20,
        "invalid UTF-8": _not_utf8(data),
        "deep inside a valid message": data.startswith(b'{"signed"') and depth >= 1500,
    }


FIND = settings(max_examples=2000, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.mark.parametrize("kind", list(_features(b"")))
def test_the_fuzzer_generates_hostile_payloads(kind: str) -> None:
    """The payloads that ended paho's thread and their kin are in the mix, for every wire
    message (here the desired state's) and so for every callback target."""
    strategy = FUZZ._payloads(EXAMPLES["signed_desired"]).map(_features)
    assert find(strategy, lambda f: f[kind], settings=FIND)[kind]


def test_the_fuzzer_generates_the_chunk_header_of_the_issue() -> None:
    def header(data: bytes) -> bytes:
        n = int.from_bytes(data[:4], "big")
        return data[4 : 4 + n] if n <= FUZZ.MAX_HEADER and len(data) >= 4 + n else b""

    found = find(FUZZ._fetch_responses(FUZZ._HEADER).map(header), lambda h: _depth(h) >= 1500,
                 settings=FIND)  # fmt: skip
    with pytest.raises(RecursionError):
        json.loads(found)  # what the parser used before the fix


def test_a_callback_target_reports_an_exception_that_gets_out() -> None:
    """The harness is not blind: an unguarded callback that raises fails the target."""

    client = FUZZ._quiet_client(make_client("fuzz-self-test"))
    client.message_callback_add("t", lambda c, u, m: json.loads(m.payload))
    guard = CallbackGuard("x")

    def feed(case: tuple[bytes, bytes]) -> None:
        FUZZ._deliver(client, guard, *case)

    topics = FUZZ.st.just(b"t")
    t = FUZZ.Target("unguarded", feed, FUZZ.st.tuples(topics, FUZZ._hostile([1])), ())
    r = FUZZ.run(t, 200, 5.0)
    assert r.failure is not None and "Error" in r.failure
