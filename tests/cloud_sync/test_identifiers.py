"""Identifier checks take the whole string: a trailing newline is not part of a valid id.

Python's ``$`` also matches before a final newline, so ``re.match(r"^…$", "cam-1\\n")``
succeeds; a device id, target path or model reference with a newline would then reach topics,
file names and logs.
"""

from __future__ import annotations

import pytest

from agent.engine.cache import _SHA256_RE
from agent.protocol.topics import valid_device_id
from cloud_sync.deploy import parse_ref
from cloud_sync.registry.keys import RegistryError
from cloud_sync.registry.metadata import ROOT_FILE, TARGET_PATH
from cloud_sync.rollout.target import _NAME


@pytest.mark.parametrize("good", ["cam-1", "a", "jetson.orin_07"])
def test_device_ids_accepted(good: str) -> None:
    assert valid_device_id(good)


@pytest.mark.parametrize("bad", ["cam-1\n", "cam-1\r\n", "\ncam-1", "cam 1", "cam/1", ""])
def test_device_ids_with_newlines_refused(bad: str) -> None:
    assert not valid_device_id(bad)


def test_other_identifiers_refuse_a_trailing_newline() -> None:
    assert TARGET_PATH.match("models/det/1.0.0/model.onnx")
    assert not TARGET_PATH.match("models/det/1.0.0/model.onnx\n")
    assert ROOT_FILE.match("2.root.json") and not ROOT_FILE.match("2.root.json\n")
    assert _SHA256_RE.match("a" * 64) and not _SHA256_RE.match("a" * 64 + "\n")
    assert _NAME.match("canary") and not _NAME.match("canary\n")
    assert parse_ref("det@1.4.0").version == "1.4.0"
    with pytest.raises(RegistryError):
        parse_ref("det@1.4.0\n")
