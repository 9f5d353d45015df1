"""A planted retained desired state never reaches a signature (issue 14, item 2).

Anyone who can write a device's ``desired`` topic (a misconfigured ACL, a compromised broker)
can leave an unsigned message there. ``edgefleet deploy`` and the rollout publisher build the
next state on what the broker retains, so they must build only on a validly signed one; and no
single message, even a signed one, may push a device's revision out of reach.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.desired import (
    DesiredRejected,
    Verdict,
    desired_keys_from_root,
    sign_desired,
    verify_desired,
)
from agent.protocol.state import (
    MAX_REVISION,
    MAX_REVISION_STEP,
    DesiredState,
    PipelineTarget,
    SignedDesired,
)
from agent.protocol.topics import Topics
from cloud_sync.deploy import DesiredPublisher, deploy, last_issued
from cloud_sync.registry.keys import RegistryError, generate_signer
from cloud_sync.registry.repo import Repository
from tests.harness.broker import Mosquitto

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
DEVICE = "cam-7"


def make_registry(path: Path) -> Repository:
    repo = Repository.init(path)
    files = {}
    for v in ("1.0.0", "2.0.0"):
        f = path.parent / f"det-{v}.onnx"
        f.write_bytes(f"model {v}".encode())
        files[f"models/det/{v}/model.onnx"] = str(f)
    repo.add_targets(files)
    return repo


def plant(broker: Mosquitto, topic: str, payload: bytes) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="planter")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def forged(revision: int, pipelines: dict[str, PipelineTarget], signed_by_us: bool = False,
           repo: Repository | None = None) -> bytes:  # fmt: skip
    state = DesiredState(device_id=DEVICE, revision=revision, issued_at=T0, pipelines=pipelines)
    signer = repo.desired_signer() if (signed_by_us and repo) else generate_signer()
    return sign_desired(state, [signer]).encode()


def unsigned(revision: int, pipelines: dict[str, PipelineTarget]) -> bytes:
    """The attack message: a well-formed envelope with no signature at all."""
    state = DesiredState(device_id=DEVICE, revision=revision, issued_at=T0, pipelines=pipelines)
    return SignedDesired(signed=state, signatures=[]).encode()


DET1 = PipelineTarget(model="det", version="1.0.0")
DET2 = PipelineTarget(model="det", version="2.0.0")
EVIL = PipelineTarget(model="det", version="0.0.1")


@pytest.mark.parametrize("how", ["unsigned", "foreign key"])
def test_deploy_ignores_a_planted_retained_state(
    tmp_path: Path, broker: Mosquitto, how: str
) -> None:
    repo_dir = tmp_path / "repo"
    make_registry(repo_dir)
    topic = Topics().device(DEVICE, "desired")
    first = deploy(repo_dir, broker.url, DEVICE, "det@1.0.0", pipeline="front", now=T0)
    assert first.signed.revision == 1
    planted = {"front": DET1, "rear": EVIL}  # another pipeline's downgrade
    payload = (unsigned if how == "unsigned" else forged)(MAX_REVISION, planted)
    plant(broker, topic, payload)

    out = deploy(repo_dir, broker.url, DEVICE, "det@2.0.0", pipeline="front", now=T0)

    assert out.signed.revision == 2  # not MAX_REVISION + 1, not stuck
    assert dict(out.signed.pipelines) == {"front": DET2}  # the planted 'rear' never signed
    rec = last_issued(repo_dir, DEVICE)
    assert rec is not None and rec.revision == 2


def test_deploy_continues_from_a_signed_retained_state_when_the_record_is_lost(
    tmp_path: Path, broker: Mosquitto
) -> None:
    repo_dir = tmp_path / "repo"
    make_registry(repo_dir)
    deploy(repo_dir, broker.url, DEVICE, "det@1.0.0", pipeline="front", now=T0)
    deploy(repo_dir, broker.url, DEVICE, "det@1.0.0", pipeline="rear", now=T0)
    (repo_dir / "desired" / f"{DEVICE}.json").unlink()
    out = deploy(repo_dir, broker.url, DEVICE, "det@2.0.0", pipeline="front", now=T0)
    assert out.signed.revision == 3
    assert dict(out.signed.pipelines) == {"front": DET2, "rear": DET1}


def test_rollout_publisher_ignores_a_planted_retained_state(
    tmp_path: Path, broker: Mosquitto
) -> None:
    repo_dir = tmp_path / "repo"
    make_registry(repo_dir)
    with DesiredPublisher(repo_dir, broker.url) as pub:
        pub.publish({DEVICE: {"front": DET1}}, now=T0)
    (repo_dir / "desired" / f"{DEVICE}.json").unlink()  # only the broker remembers now
    plant(broker, Topics().device(DEVICE, "desired"), unsigned(MAX_REVISION, {"rear": EVIL}))
    with DesiredPublisher(repo_dir, broker.url) as pub:
        out = pub.publish({DEVICE: {"front": DET2}}, now=T0)
    assert out[DEVICE].signed.revision == 1
    assert dict(out[DEVICE].signed.pipelines) == {"front": DET2}


def test_device_refuses_a_revision_jump(tmp_path: Path) -> None:
    """Even a validly signed message cannot move a device more than MAX_REVISION_STEP ahead."""
    repo = make_registry(tmp_path / "repo")
    keys, threshold = desired_keys_from_root(repo.root())

    def check(rev: int) -> Verdict:
        env = SignedDesired.decode(forged(rev, {"front": DET1}, signed_by_us=True, repo=repo))
        return verify_desired(
            env, trusted_keys=keys, threshold=threshold, device_id=DEVICE, last_revision=5
        )

    assert check(5 + MAX_REVISION_STEP) is Verdict.ACCEPT
    with pytest.raises(DesiredRejected, match="at most 1000000 allowed") as e:
        check(6 + MAX_REVISION_STEP)
    assert e.value.reason == "jump"
    with pytest.raises(DesiredRejected) as e:
        check(MAX_REVISION)
    assert e.value.reason == "jump"


def test_revision_space_exhausted_is_a_clear_error(tmp_path: Path, broker: Mosquitto) -> None:
    repo_dir = tmp_path / "repo"
    repo = make_registry(repo_dir)
    # a record at the very top (only a registry key could have signed it)
    (repo_dir / "desired").mkdir(exist_ok=True)
    (repo_dir / "desired" / f"{DEVICE}.json").write_bytes(
        forged(MAX_REVISION, {"front": DET1}, signed_by_us=True, repo=repo)
    )
    with pytest.raises(RegistryError, match="maximum") as e:
        deploy(repo_dir, broker.url, DEVICE, "det@2.0.0", pipeline="front", now=T0)
    assert e.value.reason == "revision"
