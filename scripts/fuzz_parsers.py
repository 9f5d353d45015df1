#!/usr/bin/env python3
"""Fuzz every parser of untrusted input: wire messages on every topic, chunk answers, desired
state (decode + signature verification), model cards, agent config files, tegrastats lines,
ingest rows, and the operator-facing syntaxes (broker URLs, durations, rollout targets, stages
and gates).

Each target gets ``--cases`` inputs from hypothesis (random bytes and text, random JSON, and
mutations of a real, valid example), and must either accept the input or raise its documented
error type. Anything else — another exception, or one input taking longer than ``--hang-s`` —
is a failure, printed with the input.

    python scripts/fuzz_parsers.py                      # 10,000 cases per target
    python scripts/fuzz_parsers.py --cases 500 --only config --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import load_config
from agent.errors import BadDataError, ConfigError
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec, VariantSpec
from agent.protocol.fetch import BadMessage, FetchRequest, decode_response
from agent.protocol.schema import EXAMPLES, MESSAGES
from agent.protocol.state import SignedDesired
from agent.protocol.telemetry import InferenceEvent, Snapshot, Telemetry
from agent.sync.mqtt import parse_broker_url
from agent.telemetry.tegrastats import parse_tegrastats
from agent.update.desired import sign_desired, verify_desired
from cloud_sync.ingest.store import event_row, snapshot_row, telemetry_rows
from cloud_sync.rollout import parse_gate, parse_stage, parse_target
from cloud_sync.units import parse_duration

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=20,
)



def _mutations(doc: Any) -> st.SearchStrategy[Any]:
    """A valid document with one value replaced, one key dropped, or one key added, anywhere."""

    def paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [prefix]
        if isinstance(d, dict):
            for k, v in d.items():
                out += paths(v, (*prefix, k))
        elif isinstance(d, list):
            for i, v in enumerate(d):
                out += paths(v, (*prefix, i))
        return out

    all_paths = [p for p in paths(doc) if p]

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


def _payloads(example: Any) -> st.SearchStrategy[bytes]:
    doc = json.loads(example.encode()) if hasattr(example, "encode") else example
    return (
        st.binary(max_size=400)
        | JSON.map(_json_bytes)
        | _mutations(doc).map(_json_bytes)
    )


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
        Target("wire:fetch_response", decode_response,
               st.binary(max_size=400) | st.builds(lambda n, h, d: n.to_bytes(4, "big") + h + d,
                                                   st.integers(0, 2**32 - 1), JSON.map(_json_bytes),
                                                   st.binary(max_size=50)),
               (BadMessage,)),
        _verify_target(),
        Target("card", ModelCard.model_validate_json,
               _payloads(_card_example()),
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
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-fuzz-") as tmp:
        for t in targets(Path(tmp)):
            if args.only and not any(o in t.name for o in args.only):
                continue
            r = run(t, args.cases, args.hang_s)
            results.append(r)
            if not args.json:
                status = "ok" if r.failure is None else f"FAIL: {r.failure.splitlines()[0]}"
                print(f"{r.name:<24} {r.cases:>6} cases ({r.accepted} accepted, {r.rejected} "
                      f"rejected) in {r.seconds:>6.1f} s, slowest {r.slowest_ms:7.1f} ms  {status}",
                      flush=True)  # fmt: skip
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.gettempdir() + "/hyp-fuzz")
    sys.exit(0 if all(r.failure is None for r in main()) else 1)
