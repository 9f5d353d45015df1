"""Model delivery end to end: registry → Mosquitto → agent, with attacks and faults.

Real parts throughout: a Mosquitto broker, a TUF repository signed with real ed25519 keys,
the registry's chunk server, the agent's ngclient over MQTT, ONNX Runtime, and OpenCV
decoding a looping video.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol.desired import sign_desired
from agent.protocol.state import DesiredState, PipelineTarget
from agent.service import Agent
from agent.testhooks import TestHooks
from cloud_sync.registry.keys import generate_signer
from cloud_sync.registry.publish import publish
from tests.harness.fleet import DEVICE, Fleet
from tests.harness.models import big_model
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]


def test_publish_deploy_commit_then_hot_swap_to_a_new_version(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    agent = fleet.start_agent()
    assert fleet.running() is None and fleet.last().phase.value == "waiting"
    rep = fleet.commit("digits@1.0.0")
    assert fleet.running() == "digits@1.0.0"
    assert rep.active_version == "1.0.0" and rep.last_error is None
    # events flow from the delivered model
    assert wait_for(lambda: fleet.pipe.metrics.counters["frames_inferred"] > 10, 20)

    fleet.publish("digits", "1.1.0")
    rep = fleet.commit("digits@1.1.0")
    assert rep.target_version == "1.1.0" and fleet.running() == "digits@1.1.0"
    assert agent.updates.state.pipelines["front"].previous == PipelineTarget(
        model="digits", version="1.0.0"
    )
    # the retained reported state a dashboard sees says the same
    assert wait_for(
        lambda: any(
            r.pipelines[0].phase.value == "committed" and r.pipelines[0].active_version == "1.1.0"
            for r in fleet.reported
        ),
        10,
    )
    phases = [r.pipelines[0].phase.value for r in fleet.reported]
    for p in ("fetching", "verified", "building", "trial", "active", "committed"):
        assert p in phases, phases


def test_restart_runs_the_committed_model_without_the_broker(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.start_agent()
    fleet.commit("digits@1.0.0")
    fleet.stop_agent()
    fleet.broker.stop()
    f = fleet
    cfg = f.config()  # same data dir and config, broker down: nothing to fetch
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.pipelines[0].model is not None
        assert agent.pipelines[0].model.ref == "digits@1.0.0"
        assert wait_for(lambda: agent.pipelines[0].metrics.counters["frames_inferred"] > 5, 20)
    finally:
        agent.stop()
        f.broker.start()


def test_tampered_artifact_is_rejected_and_the_old_model_keeps_running(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    fleet.start_agent()
    fleet.commit("digits@1.0.0")
    target = fleet.repo.targets()["models/digits/1.1.0/model.onnx"]
    stored = fleet.repo.target_path(target)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    fleet.deploy("digits@1.1.0")
    rep = fleet.wait_phase("rejected", version="1.1.0")
    assert fleet.running() == "digits@1.0.0"
    assert "1.1.0" in rep.last_error and "keeping front: digits@1.0.0" in rep.last_error
    assert "hash" in rep.last_error.lower() or "verification" in rep.last_error.lower()
    assert not list((fleet.tmp / "data" / "tuf" / "targets").rglob("*model.onnx*")), (
        "partial file left"
    )


def test_desired_state_signed_by_a_foreign_key_is_refused(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.start_agent()
    forged = sign_desired(
        DesiredState(
            device_id=DEVICE,
            revision=99,
            issued_at=datetime.now(timezone.utc),
            pipelines={"front": PipelineTarget(model="digits", version="1.0.0")},
        ),
        [generate_signer()],
    )
    fleet.inject_desired(forged)
    assert wait_for(
        lambda: (fleet.last().last_error or "").startswith("desired state rejected"), 20
    )
    assert "signature" in fleet.last().last_error
    assert fleet.running() is None


def test_replayed_older_desired_state_is_refused(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    fleet.start_agent()
    old = fleet.deploy("digits@1.0.0")
    fleet.wait_phase("committed", version="1.0.0")
    fleet.commit("digits@1.1.0")
    assert fleet.running() == "digits@1.1.0"
    fleet.inject_desired(old)
    assert wait_for(lambda: "replay" in (fleet.last().last_error or ""), 20), fleet.last()
    assert fleet.running() == "digits@1.1.0"


def test_expired_timestamp_freezes_nothing_in(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.start_agent()
    # The registry stops re-signing: its timestamp expired a day ago (a freeze attack).
    long_ago = datetime.now(timezone.utc) - timedelta(days=3)
    fleet.repo.refresh_timestamp(long_ago, min_remaining=timedelta(days=3650))
    fleet.deploy("digits@1.0.0")
    assert wait_for(lambda: "expired" in (fleet.last().last_error or "").lower(), 30), fleet.last()
    assert "waiting" in (fleet.last().last_error or "")
    assert fleet.running() is None
    # Expired is not rejected: once the registry re-signs, the same desired state goes through
    # (it was kept, and retried with backoff), with no new deploy.
    fleet.repo.refresh_expiring(datetime.now(timezone.utc), min_remaining=timedelta(days=3650))
    rep = fleet.wait_phase("committed", version="1.0.0", timeout=60)
    assert fleet.running() == "digits@1.0.0" and rep.last_error is None


def test_golden_mismatch_is_rejected(fleet: Fleet, tmp_path: Path) -> None:
    fleet.publish("digits", "1.0.0")
    # A version whose golden outputs do not match its model (a registry-side mistake).
    fleet.publish("digits", "1.2.0")
    gold_t = fleet.repo.targets()["models/digits/1.2.0/golden.npz"]
    z = dict(np.load(fleet.repo.target_path(gold_t)))
    for k in z:
        if k.startswith("output_"):
            z[k] = z[k] + 0.5
    bad = tmp_path / "golden.npz"
    np.savez(bad, **z)
    base = "models/digits/1.2.0"
    custom = {f"{base}/golden.npz": gold_t.custom}
    fleet.repo.add_targets({f"{base}/golden.npz": bad}, custom)
    fleet.start_agent()
    fleet.commit("digits@1.0.0")
    fleet.deploy("digits@1.2.0")
    rep = fleet.wait_phase("rejected", version="1.2.0")
    assert "golden" in rep.last_error and "max abs error" in rep.last_error
    assert fleet.running() == "digits@1.0.0"
    # not retried in a loop: the same desired state again changes nothing
    n = len(fleet.reported)
    fleet.agent.updates.submit_desired(json.dumps({}).encode())  # junk is reported, not fatal
    assert wait_for(lambda: "malformed" in (fleet.last().last_error or ""), 10)
    assert fleet.running() == "digits@1.0.0" and len(fleet.reported) >= n


def test_artifact_longer_than_signed_is_rejected(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    fleet.start_agent()
    fleet.commit("digits@1.0.0")
    stored = fleet.repo.target_path(fleet.repo.targets()["models/digits/1.1.0/model.onnx"])
    with open(stored, "ab") as fh:  # endless-data attack: more bytes than the signed length
        fh.write(b"\0" * 100_000)
    fleet.deploy("digits@1.1.0")
    rep = fleet.wait_phase("rejected", version="1.1.0")
    assert "length" in rep.last_error.lower() or "larger" in rep.last_error.lower(), rep.last_error
    assert fleet.running() == "digits@1.0.0"


def test_root_key_rotation_is_followed(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.start_agent()  # provisioned with root v1
    fleet.commit("digits@1.0.0")
    assert fleet.repo.rotate_root_key("root") == 2
    assert fleet.repo.rotate_root_key("desired") == 3  # desired-state key rotated too
    fleet.publish("digits", "1.1.0")
    fleet.deploy("digits@1.1.0")  # signed with the new desired key only
    fleet.wait_phase("committed", version="1.1.0")
    assert fleet.running() == "digits@1.1.0"
    roots = sorted(p.name for p in (fleet.tmp / "data" / "tuf" / "metadata").rglob("*root.json"))
    assert any(n.startswith("3.") for n in roots), roots


def test_model_with_nan_outputs_is_rejected_at_trial(fleet: Fleet, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    fleet.publish("digits", "1.0.0")
    # A model that loads and runs but answers NaN: sqrt(-(|x W| + 1)).
    w = helper.make_tensor("W", TensorProto.FLOAT, [64, 10], [0.01] * 640)
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["m"]),
        helper.make_node("Abs", ["m"], ["a"]),
        helper.make_node("Add", ["a", "one"], ["b"]),
        helper.make_node("Neg", ["b"], ["n"]),
        helper.make_node("Sqrt", ["n"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [w, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    d = tmp_path / "nanmodel"
    shutil.copytree(fleet.models["digits"], d)
    (d / "model.int8.onnx").unlink(missing_ok=True)
    onnx.save(model, str(d / "model.onnx"))
    card = json.loads((d / "card.json").read_text())
    card["variants"] = []
    (d / "card.json").write_text(json.dumps(card))
    publish(fleet.repo, d / "model.onnx", name="digits", version="1.3.0")
    fleet.start_agent()
    fleet.commit("digits@1.0.0")
    fleet.deploy("digits@1.3.0")
    rep = fleet.wait_phase("rejected", version="1.3.0")
    assert "NaN" in rep.last_error, rep.last_error
    assert fleet.running() == "digits@1.0.0"


@pytest.mark.slow
def test_registry_outage_mid_transfer_resumes_without_refetching(
    fleet: Fleet, tmp_path: Path
) -> None:
    big = big_model(fleet.models["digits"], tmp_path / "big", 8)
    publish(fleet.repo, big, name="digits", version="2.0.0")
    agent = fleet.start_agent(request_timeout_s=0.5, retry_s=1.0)
    fleet.deploy("digits@2.0.0")
    assert wait_for(lambda: fleet.server.stats().bytes_sent > 3 << 20, 60)
    fleet.server.stop()  # the registry goes away in the middle of model.onnx
    assert wait_for(lambda: fleet.last().phase.value == "waiting", 60), fleet.last()
    assert "fetch interrupted" in (fleet.last().last_error or "")
    fleet.start_server()  # registry-2
    fleet.wait_phase("committed", version="2.0.0", timeout=120)
    assert fleet.running() == "digits@2.0.0"
    chunks = agent.updates.tuf.fetcher.chunks
    window_bytes = chunks.window * chunks.chunk_size
    # Everything needed: the version's targets once, and each metadata file at most once per
    # refresh (two refreshes: before and after the outage).
    targets = sum(t.length for p, t in fleet.repo.targets().items() if "/2.0.0/" in p)
    metadata = sum(f.stat().st_size for f in (fleet.repo_dir / "metadata").iterdir())
    needed = targets + 2 * metadata
    again = chunks.bytes_received - needed
    assert again <= window_bytes, f"{again} bytes received again, more than one window"
    assert chunks.bytes_received >= targets


@pytest.mark.slow
def test_stop_ends_a_stalled_transfer_at_once_and_keeps_the_partial(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The update manager's stop event is the chunk client's: stopping the agent while a
    transfer waits on a silent registry does not wait out the request timeouts (30 s each
    here), and the partial download survives for the next start."""
    big = big_model(fleet.models["digits"], tmp_path / "big", 8)
    publish(fleet.repo, big, name="digits", version="2.0.0")
    agent = fleet.start_agent(request_timeout_s=30.0, retry_s=60.0)
    fleet.deploy("digits@2.0.0")
    assert wait_for(lambda: fleet.server.stats().bytes_sent > 3 << 20, 60)
    fleet.server.stop()  # silent registry: the outstanding requests get no answer
    assert agent.updates is not None and agent.updates._thread is not None
    time.sleep(0.5)
    assert agent.updates._thread.is_alive()
    agent.updates.stop(timeout=5.0)
    assert not agent.updates._thread.is_alive(), "the transfer ignored the stop event"
    partial = fleet.tmp / "data" / "tuf" / "partial"
    assert any(p.stat().st_size > 0 for p in partial.iterdir()), "partial download lost"
    fleet.stop_agent()
    fleet.start_server()  # registry-2
    fleet.start_agent()
    fleet.wait_phase("committed", version="2.0.0", timeout=120)
    targets = sum(t.length for p, t in fleet.repo.targets().items() if "/2.0.0/" in p)
    assert fleet.server.stats().bytes_sent < targets, "the restart fetched everything again"


def _rollback_timestamp(fleet: Fleet, saved: bytes) -> None:
    (fleet.repo_dir / "metadata" / "timestamp.json").write_bytes(saved)


def _mix_and_match(fleet: Fleet, saved: bytes) -> None:
    meta = fleet.repo_dir / "metadata"
    newest = max(int(p.name.split(".")[0]) for p in meta.glob("*.targets.json"))
    # serve the previous targets metadata under the name the snapshot points to
    (meta / f"{newest}.targets.json").write_bytes(
        (meta / f"{newest - 1}.targets.json").read_bytes()
    )


def _foreign_key(fleet: Fleet, saved: bytes) -> None:
    from tuf.api.metadata import Metadata

    path = fleet.repo_dir / "metadata" / "timestamp.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    md.sign(generate_signer())  # a well-formed signature, by a key the root does not name
    path.write_bytes(md.to_bytes())


@pytest.mark.parametrize(
    ("attack", "expect"),
    [
        (_rollback_timestamp, "BadVersionNumberError"),
        (_mix_and_match, "LengthOrHashMismatchError"),
        (_foreign_key, "UnsignedMetadataError"),
    ],
)
def test_tuf_metadata_attacks_are_refused(fleet: Fleet, attack: Any, expect: str) -> None:
    fleet.publish("digits", "1.0.0")
    saved_timestamp = (fleet.repo_dir / "metadata" / "timestamp.json").read_bytes()
    fleet.publish("digits", "1.1.0")
    fleet.start_agent()
    fleet.commit("digits@1.1.0")  # the device has seen the newest metadata
    fleet.publish("digits", "1.2.0")
    signer = fleet.repo.desired_signer()
    attack(fleet, saved_timestamp)
    # the operator's genuine desired state (the broker-side attack is on the TUF metadata)
    desired = sign_desired(
        DesiredState(
            device_id=DEVICE,
            revision=2,
            issued_at=datetime.now(timezone.utc),
            pipelines={"front": PipelineTarget(model="digits", version="1.2.0")},
        ),
        [signer],
    )
    fleet.inject_desired(desired)
    assert wait_for(lambda: expect in (fleet.last().last_error or ""), 30), fleet.last()
    assert "TUF metadata rejected" in fleet.last().last_error
    assert fleet.running() == "digits@1.1.0"


def test_engine_build_that_dies_is_rejected(fleet: Fleet) -> None:
    """The device cannot build the model (as when a TensorRT build is OOM-killed): rejected,
    reported with the exit code, the running model stays."""
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    agent = fleet.start_agent()
    fleet.commit("digits@1.0.0")
    agent.hooks = TestHooks(build_crash="SIGKILL")  # the build's child process is killed
    fleet.deploy("digits@1.1.0")
    rep = fleet.wait_phase("rejected", version="1.1.0")
    assert "1.1.0 rejected" in rep.last_error and "build" in rep.last_error.lower(), rep.last_error
    assert fleet.running() == "digits@1.0.0"
    engines = fleet.tmp / "data" / "engines"
    leftovers = [p for p in engines.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, leftovers


def test_update_of_one_pipeline_keeps_a_shared_local_model_running(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    local = str(fleet.models["digits"] / "model.onnx")
    cfg = fleet.config()
    both = [
        cfg.pipelines[0].model_copy(update={"model": local}),
        cfg.pipelines[0].model_copy(update={"name": "back", "model": local}),
    ]
    fleet.agent = Agent(cfg.model_copy(update={"pipelines": both}))
    fleet.agent.start()
    front, back = fleet.agent.pipelines
    assert front.model is back.model  # one backend shared by both pipelines
    # ONNX Runtime frees nothing on close() (a TensorRT engine would): spy on it instead
    closed: list[int] = []
    back.model.backend.close = lambda: closed.append(1)  # type: ignore[method-assign]
    fleet.deploy("digits@1.0.0")  # the desired state moves only "front" to a registry version
    fleet.wait_phase("committed", version="1.0.0")
    assert fleet.running() == "digits@1.0.0"
    before = back.metrics.counters["frames_inferred"]
    assert wait_for(lambda: back.metrics.counters["frames_inferred"] > before + 10, 20)
    assert back.metrics.counters["errors"] == 0, back.last_error
    assert closed == [], "the model 'back' still runs was closed"


def test_a_device_that_took_many_updates_keeps_about_three_versions(fleet: Fleet) -> None:
    """After each settled update the device keeps what can still run (committed, previous,
    in flight) and the most recent engines ([storage] keep_engines), and removes the rest."""
    fleet.publish("digits", "1.0.0")
    agent = fleet.start_agent()
    agent.updates.prune_engines = _pruner(fleet, keep=3)  # as [storage] keep_engines = 3
    data = fleet.tmp / "data"
    for i in range(8):
        version = f"1.{i}.0" if i else "1.0.0"
        if i:
            fleet.publish("digits", version)
        fleet.deploy(f"digits@{version}")
        fleet.wait_phase("committed", version=version)
        installed = sorted(str(r) for r in agent.updates.store.installed())
        want = {f"digits@{version}"} | ({f"digits@1.{i - 1}.0"} if i else set())
        assert set(installed) == want, installed  # committed + previous (nothing in flight)
        folders = [p for p in (data / "models" / "versions" / "digits").iterdir() if p.is_dir()]
        assert len(folders) <= 2, folders
        engines = [p for p in (data / "engines").iterdir() if not p.name.startswith(".")]
        assert len(engines) <= 3, engines
    objects = list((data / "models" / "objects").iterdir())
    assert 0 < len(objects) <= 2 * 4  # the files of two versions at most
    assert not list((data / "tuf" / "targets" / "incoming").rglob("*.onnx"))


def _pruner(fleet: Fleet, keep: int) -> Any:
    from agent.engine.cache import EngineCache

    return lambda: len(EngineCache(fleet.tmp / "data" / "engines").prune(keep=keep))
