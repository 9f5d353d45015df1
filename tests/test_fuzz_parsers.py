"""Every parser of untrusted input under scripts/fuzz_parsers.py (a short run; the benchmark
run uses 10,000 cases per target, see the README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from tests.conftest import load_module_from_path

FUZZ = load_module_from_path(
    "fuzz_parsers", Path(__file__).resolve().parents[1] / "scripts" / "fuzz_parsers.py"
)


def test_every_parser_accepts_or_refuses_cleanly() -> None:
    results = FUZZ.main(["--cases", "150", "--json"])
    names = {r.name for r in results}
    assert {"wire:telemetry", "wire:signed_desired", "desired:verify", "config", "card",
            "ingest:event", "rollout:target", "wire:fetch_response"} <= names  # fmt: skip
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
