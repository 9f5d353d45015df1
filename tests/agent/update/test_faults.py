"""Fault suites: kill -9 during updates, a full disk, wall-clock jumps, a camera that goes away.

Real parts: a subprocess agent and Mosquitto (crash suite), a real tmpfs mounted as the data
dir (disk full; needs root and ``mount``, skipped otherwise), SQLite, ONNX Runtime and an
ffmpeg UDP stream.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

import scripts.crash_suite
from agent.common.errors import TransportError
from agent.pipeline.runner import Pipeline
from agent.pipeline.sources import parse_source
from agent.protocol.telemetry import Telemetry
from agent.systemd import Liveness
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import TelemetryReporter
from agent.update.machine import HealthWindow
from tests.harness.broker import Mosquitto
from tests.harness.fleet import Fleet
from tests.harness.pipeline import Collect, udp_pipeline
from tests.harness.util import UdpStream, fill, wait_for

# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small tmpfs at ``path``; skips the test where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def stray_temporaries(data: Path) -> list[Path]:
    """``.tmp``/``.part`` files outside the resume dir (where partial downloads may live)."""
    partial = data / "tuf" / "partial"
    return [
        p
        for p in data.rglob("*")
        if partial not in p.parents and p.name.endswith((".tmp", ".part"))
    ]


# --------------------------------------------------------------------------- (a) kill -9


@pytest.mark.broker
@pytest.mark.video
@pytest.mark.slow
def test_crash_suite_five_kills_keeps_every_invariant(tmp_path: Path) -> None:
    suite: ModuleType = scripts.crash_suite
    summary = suite.run_suite(
        5, tmp_path, seed=5, build_sleep_s=0.5, trial_sleep_s=0.3, model_mb=2,
        health_window_s=0.5, retry_s=1.0,
    )  # fmt: skip
    assert summary["kills"] == 5
    assert summary["failures"] == 0, json.dumps(summary["failed_rounds"], indent=2)
    assert sum(summary["phases"].values()) == 5
    for r in summary["rounds"]:
        assert r["outcome"] in ("committed", "rolled_back", "rejected"), r
        assert r["running"] is not None, r


def test_crash_suite_invariant_checker_catches_a_corrupt_object(tmp_path: Path) -> None:
    """The checker the suite relies on must see a damaged store (it is not vacuous)."""
    suite = scripts.crash_suite
    from agent.update.store import ModelStore

    store = ModelStore(tmp_path)
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model bytes")
    store.install_version("digits", "1.0.0", {"model.onnx": src}, {"name": "digits"})
    from agent.update.machine import ModelRef, PipelineSlot, UpdateState

    ref = ModelRef(model="digits", version="1.0.0")
    store.save_state(UpdateState(pipelines={"front": PipelineSlot(committed=ref)}))
    assert suite.check_data_dir(tmp_path, "digits@1.0.0") == []
    assert suite.check_data_dir(tmp_path, "digits@0.9.0")  # running something uncommitted
    (obj,) = (tmp_path / "models" / "objects").iterdir()
    os.chmod(obj, 0o644)
    obj.write_bytes(b"flipped")
    assert any("hashes to" in p for p in suite.check_data_dir(tmp_path, "digits@1.0.0"))
    old = time.time() - 60
    stray = tmp_path / "models" / "versions" / ".x.tmp"
    stray.write_bytes(b"")
    os.utime(stray, (old, old))
    assert any("left-over temporary" in p for p in suite.check_data_dir(tmp_path, "x"))
    stray.unlink()
    tuf_stray = tmp_path / "tuf" / "metadata" / "tmp3kx9_a0z"
    tuf_stray.parent.mkdir(parents=True)
    tuf_stray.write_bytes(b"")
    os.utime(tuf_stray, (old, old))
    assert any("tmp3kx9_a0z" in p for p in suite.check_data_dir(tmp_path, "digits@1.0.0"))


def test_stale_temps_of_killed_writes_are_swept_at_start(tmp_path: Path) -> None:
    """A kill between an atomic write's temp file and its rename leaves the temp file (the
    crash suite found .status.json.*.tmp piling up, one per unlucky kill): the agent's start
    removes its own, and the TUF client python-tuf's, and nothing else."""
    from agent.common.fsutil import atomic_write_json, remove_stale_temps
    from agent.config import parse_config
    from agent.service import Agent
    from agent.update.tuf_client import TufClient

    data = tmp_path / "data"
    meta = data / "tuf" / "metadata"
    meta.mkdir(parents=True)
    ours = data / ".status.json.k3j_9xq2.tmp"
    tufs = meta / "tmpa8_3kd9z"
    keep = [data / "status.json", data / "notes.tmp", meta / "timestamp.json", data / "tmp"]
    for p in (ours, tufs, *keep[:3]):
        p.write_bytes(b"{}")
    keep[3].mkdir()
    # the sweep matches the temp names atomic_write_bytes makes, and a finished write leaves none
    fd, name = tempfile.mkstemp(prefix=".x.json.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    atomic_write_json(tmp_path / "x.json", {})
    assert remove_stale_temps(tmp_path) == [Path(name)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "x.json"]
    agent = Agent(parse_config({
        "device_id": "d1", "data_dir": str(data), "profile": "x86-cpu", "pipelines": [],
    }))  # fmt: skip
    agent.start()
    agent.stop()
    assert not ours.exists()
    assert tufs.exists()  # not the agent's own folder: the TUF client's sweep takes it
    root = tmp_path / "root.json"
    root.write_bytes(b"{}")
    TufClient(data, root, fetcher=None)  # type: ignore[arg-type]
    assert not tufs.exists()
    assert all(p.exists() for p in keep)


# --------------------------------------------------------------------------- (b) disk full


def test_outbox_on_a_full_disk_refuses_clearly_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as fs:
        box = Outbox(fs / "outbox.sqlite")
        for i in range(5):
            box.put("t/a", f"before {i}".encode())
        filler = fill(fs)
        refused = 0
        for i in range(200):  # SQLite may still have free pages: fill them too
            try:
                box.put("t/a", f"full {i}".encode() * 100)
            except TransportError as e:
                assert "not queued" in str(e) and "full" in str(e), e
                refused += 1
        assert refused > 0, "the outbox never hit the full disk"
        # what it holds is consistent: counters match the rows, old rows intact, FIFO order
        rows = box.peek(0, 1000)
        assert box.depth() == len(rows)
        assert [r.payload for r in rows[:5]] == [f"before {i}".encode() for i in range(5)]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        filler.unlink()
        box.put("t/a", b"after")
        assert box.peek(0, 1000)[-1].payload == b"after"
        assert box.depth() == len(rows) + 1
        box.close()
        reopened = Outbox(fs / "outbox.sqlite")
        assert reopened.depth() == len(rows) + 1
        reopened.close()


@pytest.mark.broker
@pytest.mark.video
def test_model_download_on_a_full_disk_fails_clearly_and_recovers(
    tmp_path: Path,
    broker: Mosquitto,
    digit_loop: Path,
    test_models: dict[str, Path],
) -> None:
    with tmpfs(tmp_path / "data", "48m") as data:
        f = Fleet(tmp_path, broker, digit_loop, test_models)
        f.start_server()
        try:
            f.publish("digits", "1.0.0")
            f.publish("digits", "1.1.0")
            f.start_agent(retry_s=0.5)
            f.commit("digits@1.0.0")
            filler = fill(data)
            f.deploy("digits@1.1.0")
            assert wait_for(lambda: "no space" in (f.last().last_error or "").lower(), 30), (
                f.last().phase.value,
                f.last().last_error,
            )
            err = f.last().last_error
            assert "retrying" in err and "keeping front: digits@1.0.0" in err, err
            assert f.last().phase.value in ("committed", "waiting"), f.last()
            assert f.running() == "digits@1.0.0"
            frames = f.pipe.metrics.counters["frames_inferred"]
            assert wait_for(lambda: f.pipe.metrics.counters["frames_inferred"] > frames + 5, 20)
            assert stray_temporaries(data) == [], "partial files left on the full disk"
            assert not list((data / "tuf" / "targets").rglob("model.onnx")), "partial artifact"
            filler.unlink()
            # space is back: the interrupted update goes through on its own
            f.wait_phase("committed", version="1.1.0", timeout=60)
            assert f.running() == "digits@1.1.0"
            # room for metadata, not for the artifact (256 KiB): the download itself hits ENOSPC
            f.publish("digits", "1.2.0", pad_bytes=256 * 1024)
            filler = fill(data)
            os.truncate(filler, filler.stat().st_size - 48 * 1024)
            f.deploy("digits@1.2.0")
            assert wait_for(
                lambda: (
                    f.last().target_version == "1.2.0"
                    and "no space" in (f.last().last_error or "").lower()
                ),
                30,
            ), (f.last().phase.value, f.last().last_error)
            print("download on a full disk:", f.last().phase.value, f.last().last_error)
            assert f.running() == "digits@1.1.0"
            assert stray_temporaries(data) == [], "partial files left on the full disk"
            filler.unlink()
            # a full disk is waited out, never a reason to reject the version
            f.wait_phase("committed", version="1.2.0", timeout=60)
            assert f.running() == "digits@1.2.0"
            assert f.agent is not None and f.agent.updates.store.verify_all() == []
        finally:
            f.close()


def test_an_engine_build_on_a_full_disk_says_so(
    tmp_path: Path,
    test_models: dict[str, Path],
) -> None:
    """ONNX Runtime reports a full disk while writing the optimised model as "Protobuf
    serialization failed"; the build turns that into ENOSPC (retryable), not a bad model."""
    from agent.engine.build_child import _build_onnxruntime

    with tmpfs(tmp_path / "engines", "1m") as d:
        fill(d)
        opts = {"providers": ["CPUExecutionProvider"], "graph_optimization_level": "all"}
        with pytest.raises(OSError, match="No space left on device") as ei:
            _build_onnxruntime(
                str(test_models["digits"] / "model.onnx"), str(d / "engine.onnx"), opts,
                lambda _p, _f: None,
            )  # fmt: skip
        assert ei.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------- (c) clock jumps


class JumpingWall:
    """A wall clock that jumps by ``jumps[i]`` at its i-th reading."""

    def __init__(self, jumps: dict[int, timedelta]) -> None:
        self.base = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
        self.jumps = jumps
        self.offset = timedelta()
        self.reads = 0

    def __call__(self) -> datetime:
        self.offset += self.jumps.get(self.reads, timedelta())
        self.reads += 1
        return self.base + self.offset + timedelta(seconds=self.reads)


def test_telemetry_order_survives_wall_clock_jumps(tmp_path: Path, synthetic_video: Path) -> None:
    pipe = Pipeline("front", parse_source(str(synthetic_video)), None, [])
    wall = JumpingWall({2: timedelta(hours=-3), 4: timedelta(days=2)})
    box_wall = iter([1e9, 1e9 - 10_800, 1e9 - 10_800, 1e9 + 172_800, 5.0, 6.0])
    box = Outbox(tmp_path / "outbox.sqlite", clock=lambda: next(box_wall))
    mono = iter(float(i) for i in range(100, 200))
    rep = TelemetryReporter(
        "cam-01", [pipe], box, "t/telemetry", interval_s=1.0, data_dir=tmp_path,
        clock=lambda: next(mono), wall=wall,
    )  # fmt: skip
    for _ in range(6):
        rep.tick()
    assert rep.sent == 6 and rep.last_error == ""
    rows = box.peek(0, 100)
    assert [r.id for r in rows] == sorted(r.id for r in rows) and len(rows) == 6
    msgs = [Telemetry.model_validate_json(r.payload) for r in rows]
    # messages stay in the order they were made, whatever the wall clock said meanwhile
    stamps = [m.ts for m in msgs]
    assert stamps[2] < stamps[1] and stamps[4] > stamps[3] + timedelta(days=1)
    assert [m.interval_s for m in msgs] == [1.0] * 6
    # delivery takes rows oldest-first by id, not by timestamp
    assert box.delete([rows[0].id, rows[1].id]) == 2
    assert [r.payload for r in box.peek(0, 100)] == [r.payload for r in rows[2:]]
    box.close()


def test_health_window_runs_on_monotonic_time_across_wall_jumps(
    tmp_path: Path,
    broker: Mosquitto,
    digit_loop: Path,
    test_models: dict[str, Path],
) -> None:
    """A wall clock stepped back an hour, then forward a day, during an update: the window
    still lasts its monotonic length and the attempt commits."""
    f = Fleet(tmp_path, broker, digit_loop, test_models)
    f.start_server()
    try:
        f.publish("digits", "1.0.0")
        agent = f.start_agent(health_window_s=2.0)
        wall = JumpingWall({3: timedelta(hours=-1), 5: timedelta(days=1)})
        agent.updates.wall = wall
        f.deploy("digits@1.0.0")
        assert wait_for(lambda: f.last().phase.value == "active", 60), f.last()
        t_active = time.monotonic()
        rep = f.wait_phase("committed", version="1.0.0", timeout=60)
        assert time.monotonic() - t_active >= 1.5, "health window cut short"
        assert wall.reads > 5, "the wall clock was not consulted: jumps untested"
        assert rep.last_error is None and f.running() == "digits@1.0.0"
        state = json.loads((tmp_path / "data" / "models" / "state.json").read_text())
        assert state["pipelines"]["front"]["committed"] == {"model": "digits", "version": "1.0.0"}
    finally:
        f.close()


def test_health_window_ignores_anything_but_its_own_clock() -> None:
    w = HealthWindow(duration_s=10.0, min_frames=3, max_error_rate=0.1)
    for i in range(5):
        w.observe(True, False, 1.0, now=1000.0 + i)
    assert w.verdict(1005.0, None).outcome == "pending"
    assert w.verdict(1010.0, None).outcome == "commit"
    # a monotonic clock never goes back; if a caller passed a smaller value, no early commit
    assert w.verdict(500.0, None).outcome == "pending"


# --------------------------------------------------------------------------- (d) camera loss


@pytest.mark.video
@pytest.mark.slow
def test_camera_outage_reconnects_without_a_watchdog_stall(
    test_models: dict[str, Path], udp_stream: UdpStream
) -> None:
    stall_s = 3.0
    udp_stream.start()
    sink = Collect()
    # open timeout < stall_s: a silent stream is noticed before the watchdog cares
    pipe = udp_pipeline(udp_stream.url, test_models["blobdet"] / "model.onnx", sink, 1.0)
    live = Liveness(stall_s=stall_s)
    stalls: list[str] = []
    quiet_for = 0.0

    def poll() -> None:
        nonlocal quiet_for
        now = time.monotonic()
        st = pipe.status(now, reader="watchdog")
        stalls.extend(live.check([st], now))
        quiet_for = max(quiet_for, now - last_frame[0])

    last_frame = [time.monotonic()]
    pipe.start()
    try:
        assert wait_for(lambda: len(sink.events) >= 10, 30), pipe.reader.last_error
        udp_stream.stop()
        t_stop = time.monotonic()
        last_frame[0] = t_stop
        while time.monotonic() - t_stop < 3 * stall_s:
            poll()
            time.sleep(0.1)
        assert pipe.metrics.counters["source_failures"] >= 1
        before = len(sink.events)
        udp_stream.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (
            pipe.metrics.counters["reconnects"] >= 1 and len(sink.events) > before + 10
        ):
            poll()
            time.sleep(0.1)
        assert pipe.metrics.counters["reconnects"] >= 1, pipe.metrics.counters
        assert len(sink.events) > before + 10
        assert quiet_for > stall_s, "outage shorter than the stall limit: nothing tested"
        assert stalls == [], stalls
    finally:
        pipe.stop()
