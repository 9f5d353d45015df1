"""The registry's TUF repository with real keys, real signatures and real ONNX models, checked by
python-tuf's own client (``tuf.ngclient.Updater``) reading the repository folder.

The device side is ``tests.harness.registry.TufFileClient``: ngclient with ``FileFetcher``,
which reads ``file://`` URLs, answers 404 for missing files and records every URL, so the tests
also pin the file names ngclient asks for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.card import ModelCard
from agent.update.tuf_client import TufClient
from cloud_sync.registry.catalog import card_from_custom, list_models, parse_semver
from cloud_sync.registry.commands import ProgressBar, parse_size
from cloud_sync.registry.keys import load_signer
from cloud_sync.registry.metadata import DESIRED_FIELD, parse_desired_trust
from cloud_sync.registry.publish import PublishResult, publish
from cloud_sync.registry.repo import RegistryError, Repository
from tests.harness.registry import TufFileClient, run_registry_cli


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture(scope="module")
def digits_pngs(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    """The digits held-out images as 8x8 grey PNGs (the 'deployment frames')."""
    out = tmp_path_factory.mktemp("digits_png")
    with np.load(test_models["digits"] / "test_set.npz") as z:
        images = z["images"]
    for i, img in enumerate(images):
        cv2.imwrite(str(out / f"{i:04d}.png"), img)
    return out


# --------------------------------------------------------------------------------- init
def test_init_makes_0600_keys_and_metadata_ngclient_accepts(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", expiry_days={"timestamp": 2}, thresholds={"root": 2})
    # keys beside the served repository, never in it; the root key apart, to be taken offline
    assert repo.keys_dir == tmp_path / "repo.keys"
    assert not (repo.path / "keys").exists()
    keys = sorted(str(p.relative_to(repo.keys_dir)) for p in repo.keys_dir.rglob("*.pem"))
    assert keys == [
        "desired.pem",
        "offline/root.2.pem",
        "offline/root.pem",
        "snapshot.pem",
        "targets.pem",
        "timestamp.pem",
    ]
    for p in repo.keys_dir.rglob("*.pem"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    for d in (repo.keys_dir, repo.keys_dir / "offline"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "timestamp.json",
    ]
    assert repo.trusted_root_bytes() == (repo.metadata_dir / "1.root.json").read_bytes()
    root = repo.root()
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 2

    client = TufFileClient(repo, tmp_path / "dev")
    client.updater().refresh()
    # 2.root.json answers 404 (no newer root); then the consistent-snapshot names.
    assert client.names() == ["2.root.json", "timestamp.json", "1.snapshot.json", "1.targets.json"]

    trust = parse_desired_trust(client.trusted_root())  # what a device reads, signed by root
    assert list(trust.keys) == [repo.desired_signer().public_key.keyid]
    assert trust.threshold == 1
    assert DESIRED_FIELD in json.loads(repo.trusted_root_bytes())["signed"]


def test_init_refuses_an_existing_registry_and_bad_policy(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="already holds a registry") as e:
        Repository.init(repo.path)
    assert e.value.reason == "exists"
    with pytest.raises(RegistryError, match="expected 0 < days"):
        Repository.init(tmp_path / "other", expiry_days={"timestamp": 0})
    with pytest.raises(RegistryError, match="unknown role"):
        Repository.init(tmp_path / "other", thresholds={"mirror": 1})
    with pytest.raises(RegistryError, match="not a readable registry"):
        Repository(tmp_path / "nothing")


def test_key_files_readable_by_others_are_refused(repo: Repository) -> None:
    key = repo.keys_dir / "targets.pem"
    os.chmod(key, 0o644)
    with pytest.raises(RegistryError, match="mode 0644, expected 0600") as e:
        load_signer(key)
    assert e.value.reason == "key"


# --------------------------------------------------------------------------------- publish
def test_publish_digits_int8_then_a_device_downloads_every_target(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path], digits_pngs: Path
) -> None:
    model = test_models["digits"] / "model.onnx"
    # The gate's unit is one held-back image in ~90 (1.1 %): 0.05 keeps the test about the
    # plumbing, test_quantize.py pins the quantizer's accuracy.
    rc = run_registry_cli(
        *("model", "publish", str(model), "--repo", str(repo.path), "--name", "digits"),
        *("--version", "1.0.0", "--calibration", str(digits_pngs), "--quantize", "int8"),
        *("--max-accuracy-drop", "0.05"),
    )
    assert rc == 0

    client = TufFileClient(repo, tmp_path / "dev")
    updater = client.updater()
    updater.refresh()
    files = ["card.json", "golden.npz", "labels.txt", "model.int8.onnx", "model.onnx"]
    got: dict[str, bytes] = {}
    cards, device_cards = [], []
    for f in files:
        info = updater.get_targetinfo(f"models/digits/1.0.0/{f}")
        assert info is not None, f
        got[f] = Path(updater.download_target(info)).read_bytes()
        cards.append(card_from_custom(info.custom))
        device_cards.append(TufClient.card_of(info))  # what the device's update manager reads
        sha = hashlib.sha256(got[f]).hexdigest()
        assert client.fetcher.urls[-1].endswith(f"/targets/models/digits/1.0.0/{sha}.{f}")
        assert (repo.targets_dir / "models/digits/1.0.0" / f"{sha}.{f}").is_file()
    assert client.names()[:4] == [
        "2.root.json",
        "timestamp.json",
        "2.snapshot.json",
        "2.targets.json",
    ]

    card = json.loads(got["card.json"])
    # The card signed in every target's custom metadata is card.json (as JSON text: TUF signs
    # canonical JSON, which has no floats).
    assert all(c == ModelCard.model_validate(card) for c in cards)
    assert all(c == card for c in device_cards)
    assert card["name"] == "digits" and card["version"] == "1.0.0"
    assert card["task"] == "classification"
    variants = {v["precision"]: v for v in card["variants"]}
    assert set(variants) == {"fp32", "int8"}
    for v in variants.values():
        assert v["sha256"] == hashlib.sha256(got[v["file"]]).hexdigest()
    assert 0.95 <= variants["int8"]["accuracy"] <= 1.0
    assert got["model.onnx"] == model.read_bytes()
    assert got["labels.txt"].decode().split() == [str(i) for i in range(10)]

    # golden.npz: FP32 outputs of held-back digits; the INT8 variant agrees on the class.
    golden_path = tmp_path / "golden.npz"
    golden_path.write_bytes(got["golden.npz"])
    int8_path = tmp_path / "int8.onnx"
    int8_path.write_bytes(got["model.int8.onnx"])
    sess8 = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    with np.load(golden_path) as g:
        assert sorted(g.files) == [f"{k}_{i}" for k in ("input", "output") for i in range(4)]
        x = g["input_0"]
        assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5  # a real digit, scaled
        y8 = sess8.run(None, {"input": x})[0]
        assert np.argmax(y8) == np.argmax(g["output_0"])


def test_list_models_sorted_by_name_then_semver(
    repo: Repository, test_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    digits, tinyseg = test_models["digits"] / "model.onnx", test_models["tinyseg"] / "model.onnx"
    for version in ("1.2.0-rc.1", "1.2.0", "1.10.0"):
        publish(repo, digits, name="digits", version=version)
    publish(repo, tinyseg, name="ant", version="0.1.0")
    found = [(m.name, m.version, m.task, m.variants) for m in list_models(repo)]
    assert found == [
        ("ant", "0.1.0", "heatmap", ("fp32",)),
        ("digits", "1.2.0-rc.1", "classification", ("fp32",)),
        ("digits", "1.2.0", "classification", ("fp32",)),
        ("digits", "1.10.0", "classification", ("fp32",)),
    ]
    assert run_registry_cli("model", "list", "--repo", str(repo.path), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["0.1.0", "1.2.0-rc.1", "1.2.0", "1.10.0"]
    assert set(rows[0]["sizes"]) == {"card.json", "golden.npz", "labels.txt", "model.onnx"}


def test_same_or_lower_version_is_refused(repo: Repository, test_models: dict[str, Path]) -> None:
    model = test_models["digits"] / "model.onnx"
    publish(repo, model, name="digits", version="1.0.0")
    before = snapshot_tree(repo.path)
    with pytest.raises(RegistryError, match=r"digits@1\.0\.0 already exists") as e:
        publish(repo, model, name="digits", version="1.0.0")
    assert e.value.reason == "exists"
    for lower in ("0.9.0", "1.0.0-rc.1"):
        with pytest.raises(RegistryError, match=r"lower than the latest published digits@1\.0\.0"):
            publish(repo, model, name="digits", version=lower)
    with pytest.raises(RegistryError, match="not a semantic version"):
        publish(repo, model, name="digits", version="1.1")
    assert snapshot_tree(repo.path) == before
    assert publish(repo, model, name="digits", version="1.0.1").versions.targets == 3


def test_broken_onnx_is_refused_naming_the_file_and_nothing_is_written(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    data = (test_models["digits"] / "model.onnx").read_bytes()
    broken = tmp_path / "broken" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])
    before = (repo.versions(), snapshot_tree(repo.path))
    with pytest.raises(RegistryError, match=f"model {broken} rejected: not a readable ONNX") as e:
        publish(repo, broken, name="digits", version="1.0.0")
    assert e.value.reason == "model" and e.value.path == str(broken)
    assert (Repository(repo.path).versions(), snapshot_tree(repo.path)) == before


def test_accuracy_gate_refuses_a_bad_calibration_unless_forced(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    # A real failure: calibrated on black frames only (every 5th file, the held-back ones,
    # are real digits), the INT8 ranges clip every real digit.
    with np.load(test_models["digits"] / "test_set.npz") as z:
        images = z["images"][:100]
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(images):
        cv2.imwrite(str(calib / f"{i:04d}.png"), img if i % 5 == 4 else np.zeros_like(img))
    model = test_models["digits"] / "model.onnx"

    def attempt(force: bool) -> PublishResult:
        return publish(
            repo,
            model,
            name="digits",
            version="1.0.0",
            calibration_dir=calib,
            quantize="int8",
            force=force,
        )

    before = snapshot_tree(repo.path)
    with pytest.raises(RegistryError, match="refused by the accuracy gate: top-1 agreement") as e:
        attempt(force=False)
    assert e.value.reason == "accuracy"
    assert snapshot_tree(repo.path) == before

    result = attempt(force=True)
    assert result.forced and result.gate is not None and not result.gate.passed
    int8 = next(v for v in result.card.variants if v.precision == "int8")
    assert int8.accuracy is not None and int8.accuracy < 0.9
    assert "models/digits/1.0.0/model.int8.onnx" in repo.targets()


def test_quantize_without_calibration_is_a_usage_error(
    repo: Repository, test_models: dict[str, Path]
) -> None:
    with pytest.raises(RegistryError, match="needs at least 10 calibration samples") as e:
        publish(
            repo, test_models["digits"] / "model.onnx", name="d", version="1.0.0", quantize="int8"
        )
    assert e.value.reason == "usage"


def test_bare_model_gets_a_card_from_its_shape_and_flags(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    bare = tmp_path / "bare" / "seg.onnx"  # no card.json beside it
    bare.parent.mkdir()
    bare.write_bytes((test_models["tinyseg"] / "model.onnx").read_bytes())
    with pytest.raises(RegistryError, match="pass --input-size WxH"):
        publish(repo, bare, name="seg", version="1.0.0")
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\n")
    r = publish(
        repo, bare, name="seg", version="1.0.0", task="heatmap", input_size=(64, 48), labels=labels
    )
    assert (r.card.task, r.card.input.width, r.card.input.height) == ("heatmap", 64, 48)
    assert r.card.labels == ("dark",)
    assert parse_size("64x48") == (64, 48)


# --------------------------------------------------------------------------------- expiry
def test_refresh_timestamp_only_when_close_to_expiry(tmp_path: Path) -> None:
    t0 = datetime.now(timezone.utc).replace(microsecond=0)
    repo = Repository.init(tmp_path / "repo", now=t0)  # timestamp valid 1 day
    assert (
        repo.refresh_timestamp(t0 + timedelta(hours=1), min_remaining=timedelta(hours=6)) is False
    )
    assert repo.versions().timestamp == 1
    later = t0 + timedelta(hours=20)
    assert repo.refresh_timestamp(later, min_remaining=timedelta(hours=6)) is True
    assert repo.versions().timestamp == 2
    assert repo.versions().snapshot == 1
    assert repo.timestamp_expires() == later + timedelta(days=1)
    reopened = Repository(repo.path)
    assert reopened.versions() == repo.versions()
    assert reopened.refresh_timestamp(later, min_remaining=timedelta(hours=6)) is False

    # snapshot (7 days) close to expiry: snapshot and timestamp are re-signed, not targets
    assert repo.refresh_expiring(t0 + timedelta(days=6, hours=20)) == ("snapshot", "timestamp")
    assert repo.versions().snapshot == 2 and repo.versions().targets == 1
    client = TufFileClient(repo, tmp_path / "dev")
    client.updater().refresh()  # all of it still verifies (and is unexpired today)
    assert client.names()[1:] == ["timestamp.json", "2.snapshot.json", "1.targets.json"]


# --------------------------------------------------------------------------------- rotation
def test_root_key_rotation_reaches_a_device_holding_the_old_root(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    old_root = repo.trusted_root_bytes()
    old_root_key = load_signer(repo.keys_dir / "offline" / "root.pem").public_key.keyid
    old_desired = repo.desired_signer().public_key.keyid
    assert repo.rotate_root_key("root") == 2
    assert repo.rotate_root_key("timestamp") == 3
    assert repo.rotate_root_key("desired") == 4
    assert sorted(p.name for p in repo.keys_dir.rglob("*pending*")) == []
    new_root_key = load_signer(repo.keys_dir / "offline" / "root.pem").public_key.keyid
    assert new_root_key != old_root_key and repo.root().roles["root"].keyids == [new_root_key]

    # v2 is signed by both the old and the new root key: the chain a device verifies
    v2 = json.loads((repo.metadata_dir / "2.root.json").read_bytes())
    assert {s["keyid"] for s in v2["signatures"]} == {old_root_key, new_root_key}

    reopened = Repository(repo.path)
    reopened.add_targets({"models/x/1.0.0/card.json": test_models["digits"] / "card.json"})

    client = TufFileClient(reopened, tmp_path / "dev", root=old_root)
    updater = client.updater()
    updater.refresh()
    assert client.names()[:5] == [
        "2.root.json",
        "3.root.json",
        "4.root.json",
        "5.root.json",
        "timestamp.json",
    ]
    trusted = client.trusted_root()
    assert trusted.version == 4
    new_desired = parse_desired_trust(trusted).keys
    assert list(new_desired) == [reopened.desired_signer().public_key.keyid] != [old_desired]
    assert updater.get_targetinfo("models/x/1.0.0/card.json") is not None


def test_rotating_an_unknown_role_is_refused(repo: Repository) -> None:
    with pytest.raises(RegistryError, match="unknown role 'mirror'"):
        repo.rotate_root_key("mirror")


# --------------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    "path",
    ["../x", "/abs/x", "a//b", "a/.hidden", "a/../b", "with space", "a+b", "", "a/", "x" * 401],
)
def test_bad_target_paths_are_refused(repo: Repository, tmp_path: Path, path: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(RegistryError, match="is invalid") as e:
        repo.add_targets({path: f})
    assert e.value.reason == "usage"


@given(st.tuples(*[st.integers(0, 10**6)] * 3), st.tuples(*[st.integers(0, 10**6)] * 3))
def test_semver_release_order_is_numeric(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    text_a = ".".join(map(str, a))
    va, vb = parse_semver(text_a), parse_semver(".".join(map(str, b)))
    assert str(va) == text_a
    assert (va.key() < vb.key()) == (a < b)


@given(st.text(max_size=40))
def test_semver_parser_fails_only_with_registry_error(text: str) -> None:
    try:
        v = parse_semver(text)
    except RegistryError:
        return
    assert str(v) == text


def test_semver_prerelease_precedence() -> None:
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2"]
    chain += ["1.0.0-beta.11", "1.0.0-rc.1", "1.0.0"]  # the example of semver.org item 11
    keys = [parse_semver(v).key() for v in chain]
    assert keys == sorted(keys)
    for bad in ("01.0.0", "1.0.0+build", "1.0", "v1.0.0", "1.0.0-", "1.0.0-01"):
        with pytest.raises(RegistryError):
            parse_semver(bad)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_tty() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar(stream, width=4)
        bar(1, 2, "quantize")
        bar(2, 2, "done")
    assert tty.getvalue() == "\r[##..] 1/2 quantize    \r[####] 2/2 done        \n"
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("bad", ["640", "0x10", "ax2", "64x48x3", "-1x2", "١x2"])
def test_input_size_parser_refuses_junk(bad: str) -> None:
    with pytest.raises(RegistryError, match="expected WxH"):
        parse_size(bad)


def test_interrupted_rotation_is_finished_by_the_next(repo: Repository) -> None:
    repo.rotate_root_key("snapshot")
    # simulate a crash between writing the new root and renaming the key into place
    current = repo.keys_dir / "snapshot.pem"
    os.replace(current, repo.keys_dir / "snapshot.pending.pem")
    from cloud_sync.registry.keys import generate_signer, save_signer

    save_signer(generate_signer(), current)  # stands in for the revoked old key
    assert repo.rotate_root_key("snapshot") == 3
    assert load_signer(current).public_key.keyid in repo.root().roles["snapshot"].keyids


# --------------------------------------------------------------------------------- old opsets
def test_an_opset_11_model_publishes_as_is_and_its_int8_is_made_at_opset_13(
    repo: Repository, tmp_path: Path, test_models: dict[str, Path], digits_pngs: Path
) -> None:
    """Publish keeps the original bytes of an old-opset model; only the INT8 variant is made
    from a copy converted to opset 13 (QDQ per channel needs it), and the card says so."""
    import onnx

    m = onnx.load(str(test_models["digits"] / "model.onnx"))
    # Conv/Relu/MaxPool/Flatten/Gemm/Softmax on (1, 10) mean the same at opset 11: the
    # digits graph re-declared at 11 is what an old exporter would have written.
    del m.opset_import[:]
    m.opset_import.append(onnx.helper.make_opsetid("", 11))
    m.ir_version = 6
    onnx.checker.check_model(m, full_check=True)
    old = tmp_path / "old" / "model.onnx"
    old.parent.mkdir()
    old.write_bytes(m.SerializeToString())
    (old.parent / "card.json").write_bytes((test_models["digits"] / "card.json").read_bytes())

    result = publish(
        repo,
        old,
        name="digits11",
        version="1.0.0",
        calibration_dir=digits_pngs,
        quantize="int8",
        max_accuracy_drop=0.05,
    )
    variants = {v.precision: v for v in result.card.variants}
    assert variants["fp32"].opset == 11 and variants["int8"].opset == 13
    assert any("converted opset 11 -> 13" in n for n in result.notes), result.notes
    fp32 = repo.targets_dir / "models/digits11/1.0.0" / f"{variants['fp32'].sha256}.model.onnx"
    assert fp32.read_bytes() == old.read_bytes()
    int8 = (
        repo.targets_dir / "models/digits11/1.0.0" / (f"{variants['int8'].sha256}.model.int8.onnx")
    )
    q = onnx.load(str(int8))
    assert [o.version for o in q.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert result.gate is not None and result.gate.passed
