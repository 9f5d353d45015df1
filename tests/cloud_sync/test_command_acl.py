"""The broker ACL for commands, enforced by a real TLS Mosquitto with the rendered ACL:
operators write ``cmd`` and read ``cmd/result``; each device reads only its own ``cmd`` and
writes only its own ``cmd/result``; no device can send a command, to itself or another."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.tls import ROOT, TlsFleet
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker]


def topic(device: str, kind: str) -> str:
    return f"{ROOT}/devices/{device}/{kind}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[TlsFleet]:
    f = TlsFleet(tmp_path)
    for role, name in [("device", "dev-a"), ("device", "dev-b"), ("operator", "alice")]:
        f.issue(role, name)  # type: ignore[arg-type]
    f.start()
    yield f
    f.close()


def test_only_operators_command_and_each_device_answers_only_its_own(fleet: TlsFleet) -> None:
    alice = fleet.connect("op:alice", "alice")
    a = fleet.connect("dev-a", "dev-a")
    b = fleet.connect("dev-b", "dev-b")
    alice.subscribe(topic("dev-a", "cmd/result"), topic("dev-b", "cmd/result"))
    # Mosquitto 2.0 grants every SUBSCRIBE and checks each message as it is delivered
    a.subscribe(topic("dev-a", "cmd"), topic("dev-b", "cmd"), topic("dev-b", "cmd/result"))
    b.subscribe(topic("dev-b", "cmd"))

    a.publish(topic("dev-b", "cmd"), b"forged by dev-a")  # a device commanding another
    a.publish(topic("dev-a", "cmd"), b"dev-a to itself")  # nor itself
    a.publish(topic("dev-b", "cmd/result"), b"dev-a posing as dev-b")
    alice.publish(topic("dev-b", "cmd"), b"for dev-b")
    alice.publish(topic("dev-a", "cmd"), b"for dev-a")
    b.publish(topic("dev-b", "cmd/result"), b"result of dev-b")
    a.publish(topic("dev-a", "cmd/result"), b"result of dev-a")

    assert wait_for(lambda: len(alice.got) >= 2 and a.got and b.got, 5)
    time.sleep(0.5)  # let anything that slipped through arrive
    assert a.payloads() == [b"for dev-a"]  # not dev-b's command, not its own write, no results
    assert b.payloads() == [b"for dev-b"]
    assert sorted(alice.got) == [
        (topic("dev-a", "cmd/result"), b"result of dev-a"),
        (topic("dev-b", "cmd/result"), b"result of dev-b"),
    ]
