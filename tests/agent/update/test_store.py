"""Model store: content addressing, atomic materialization, crash leftovers, durable state."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.state import UpdatePhase
from agent.update.machine import ModelRef, PipelineSlot, UpdateAttempt, UpdateState
from agent.update.store import ModelStore, StoreError

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
OLD = ModelRef(model="det", version="1.3.2")
NEW = ModelRef(model="det", version="1.4.0")
CARD = {"name": "det", "version": "1.4.0", "task": "detection", "input": {"width": 8, "height": 8}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = {}
    for name, data in {
        "model.onnx": b"onnx-fp32" * 1000,
        "model.int8.onnx": b"onnx-int8" * 500,
        "golden.npz": b"golden",
        "labels.txt": b"person\ncar\n",
    }.items():
        (src / name).write_bytes(data)
        out[name] = src / name
    return out


def unlock_and_write(path: Path, data: bytes) -> None:
    """What bit rot or a careless tool does to a read-only object."""
    path.chmod(0o644)
    path.write_bytes(data)


def test_put_is_content_addressed_and_idempotent(tmp_path: Path, files: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "data")
    h = store.put(files["model.onnx"])
    assert h == sha(files["model.onnx"].read_bytes())
    assert store.path(h) == tmp_path / "data" / "models" / "objects" / h
    assert store.has(h) and store.verify(h)
    assert store.put(files["model.onnx"], expected_sha256=h) == h
    assert sorted(p.name for p in store.path(h).parent.iterdir()) == [h]
    assert list((tmp_path / "data" / "models" / "tmp").iterdir()) == []
    assert stat.S_IMODE(store.path(h).stat().st_mode) == 0o444  # shared by hard links


def test_put_refuses_wrong_hash_and_stores_nothing(tmp_path: Path, files: dict[str, Path]) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="expected 41aa") as ei:
        store.put(files["golden.npz"], expected_sha256="41aa" + "0" * 60)
    assert ei.value.reason == "hash"
    assert not store.has(sha(b"golden"))
    assert list((tmp_path / "models" / "tmp").iterdir()) == []


def test_put_link_stores_the_download_itself(tmp_path: Path, files: dict[str, Path]) -> None:
    """A download is linked into the store, not written a second time (flash wear, time)."""
    store = ModelStore(tmp_path / "data")
    src = files["model.onnx"]
    h = store.put(src, link=True)
    assert h == sha(src.read_bytes()) and store.verify(h)
    obj, st = store.path(h).stat(), src.stat()
    assert (obj.st_ino, obj.st_dev) == (st.st_ino, st.st_dev) and obj.st_nlink == 2
    assert stat.S_IMODE(st.st_mode) == 0o444  # the download is read-only now too
    assert store.put(src, link=True, expected_sha256=h) == h  # idempotent
    assert list((tmp_path / "data" / "models" / "tmp").iterdir()) == []
    src.unlink()  # the manager removes its download dir after the install
    assert store.verify(h) and store.path(h).stat().st_nlink == 1


def test_put_link_refuses_wrong_hash_and_leaves_the_source(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path)
    src = files["golden.npz"]
    with pytest.raises(StoreError, match="expected 41aa"):
        store.put(src, link=True, expected_sha256="41aa" + "0" * 60)
    assert not store.has(sha(b"golden")) and src.read_bytes() == b"golden"
    assert src.stat().st_nlink == 1 and list((tmp_path / "models" / "tmp").iterdir()) == []


def test_put_link_copies_across_file_systems(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        store = ModelStore(shm / f"edgefleet-test-{os.getpid()}")  # a real second file system
    else:  # no tmpfs here: make os.link fail as it does across file systems

        def no_link(*_a: Any, **_k: Any) -> None:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
        store = ModelStore(tmp_path / "data")
    try:
        src = files["model.onnx"]
        h = store.put(src, link=True)
        assert store.verify(h) and src.stat().st_nlink == 1
        assert store.path(h).stat().st_ino != src.stat().st_ino
    finally:
        if str(store.root).startswith("/dev/shm/"):
            shutil.rmtree(store.root.parent, ignore_errors=True)


def test_corrupt_object_is_detected_and_repaired_by_put(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path)
    h = store.put(files["model.onnx"])
    unlock_and_write(store.path(h), b"flipped bits")
    assert store.has(h) and not store.verify(h)
    problems = store.verify_all()
    assert len(problems) == 1 and f"object {h[:12]}… is corrupt" in problems[0]
    store.put(files["model.onnx"])
    assert store.verify(h) and store.verify_all() == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 63, "g" * 64, ""])
def test_path_refuses_non_digests(tmp_path: Path, bad: str) -> None:
    with pytest.raises(StoreError) as ei:
        ModelStore(tmp_path).path(bad)
    assert ei.value.reason == "name"


def test_install_and_materialize(tmp_path: Path, files: dict[str, Path]) -> None:
    store = ModelStore(tmp_path)
    rec = store.install_version("det", "1.4.0", files, CARD)
    assert rec.files["golden.npz"] == sha(b"golden")
    assert store.version_record("det", "1.4.0") == rec
    assert store.version_record("det", "9.9.9") is None
    d = store.materialize("det", "1.4.0")
    assert d == tmp_path / "models" / "versions" / "det" / "1.4.0"
    assert sorted(p.name for p in d.iterdir()) == sorted([*files, "card.json"])
    for name, src in files.items():
        assert (d / name).read_bytes() == src.read_bytes()
        assert (d / name).samefile(store.path(rec.files[name]))  # hard link, no copy
    assert json.loads((d / "card.json").read_text()) == CARD
    assert store.materialize("det", "1.4.0") == d  # idempotent
    assert store.installed() == [NEW]
    assert store.verify_all() == []


def test_install_linked_survives_removing_the_downloads(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path / "data")
    rec = store.install_version("det", "1.0.0", files, {"name": "det"}, link=True)
    for fname, path in files.items():
        assert store.path(rec.files[fname]).stat().st_ino == path.stat().st_ino
    for path in files.values():
        path.unlink()
    d = store.materialize("det", "1.0.0")
    assert (d / "model.onnx").read_bytes() == b"onnx-fp32" * 1000
    assert store.verify_all() == []


def test_signed_card_file_wins_over_the_record(tmp_path: Path, files: dict[str, Path]) -> None:
    card_file = files["golden.npz"].parent / "card.json"
    card_file.write_text('{"signed": "card"}')
    store = ModelStore(tmp_path)
    store.install_version("det", "1.4.0", {**files, "card.json": card_file}, json.dumps(CARD))
    d = store.materialize("det", "1.4.0")
    assert (d / "card.json").read_text() == '{"signed": "card"}'


@pytest.mark.parametrize(
    ("name", "version", "fname"),
    [("../det", "1.0.0", "model.onnx"), ("det", "../../x", "model.onnx"),
     ("det", "1.0", "model.onnx"), ("det", "1.0.0", "../model.onnx"),
     ("det", "1.0.0", "sub/model.onnx"), ("det", "1.0.0", "x.tmp")],
)  # fmt: skip
def test_install_refuses_unsafe_names(
    tmp_path: Path, files: dict[str, Path], name: str, version: str, fname: str
) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError) as ei:
        store.install_version(name, version, {fname: files["golden.npz"]}, CARD)
    assert ei.value.reason == "name"
    assert list((tmp_path / "models" / "versions").iterdir()) == []


def test_materialize_refuses_missing_or_corrupt_objects(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="not installed") as ei:
        store.materialize("det", "1.4.0")
    assert ei.value.reason == "missing"
    rec = store.install_version("det", "1.4.0", files, CARD)
    unlock_and_write(store.path(rec.files["model.int8.onnx"]), b"truncated")
    with pytest.raises(StoreError, match="missing or corrupt") as ei:
        store.materialize("det", "1.4.0")
    assert ei.value.reason == "hash"
    assert sorted(p.name for p in (tmp_path / "models" / "versions" / "det").iterdir()) == [
        "1.4.0.json"
    ]  # no half-built directory, no temporary left


def test_materialize_is_all_or_nothing_when_interrupted(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    store.install_version("det", "1.4.0", files, CARD)
    calls = []

    def dying_link(src: Path, dest: Path) -> None:
        calls.append(dest.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a signal in the middle of building
        os.link(src, dest)

    monkeypatch.setattr(ModelStore, "_link_or_copy", staticmethod(dying_link))
    with pytest.raises(KeyboardInterrupt):
        store.materialize("det", "1.4.0")
    parent = tmp_path / "models" / "versions" / "det"
    assert sorted(p.name for p in parent.iterdir()) == ["1.4.0.json"]
    monkeypatch.undo()
    assert sorted(p.name for p in store.materialize("det", "1.4.0").iterdir()) == sorted(
        [*files, "card.json"]
    )


def state_with(committed: ModelRef, attempt_phase: UpdatePhase | None = None) -> UpdateState:
    attempt = (
        UpdateAttempt("front", NEW, 9, started_at=T0, updated_at=T0, phase=attempt_phase)
        if attempt_phase
        else None
    )
    return UpdateState(
        accepted_revision=9,
        applied_revision=8,
        pipelines={"front": PipelineSlot(committed=committed, active=committed, attempt=attempt)},
    )


def test_state_round_trip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.load_state() == UpdateState()
    s = state_with(OLD, UpdatePhase.BUILDING)
    store.save_state(s)
    assert ModelStore(tmp_path).load_state() == s


def test_crash_leftovers_are_cleaned_and_old_state_survives(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path)
    store.install_version("det", "1.3.2", files, CARD)
    old_dir = store.materialize("det", "1.3.2")
    old_state = state_with(OLD)
    store.save_state(old_state)

    # What a process killed mid-way leaves behind: a half-copied object, a half-built
    # version directory, and half-written state files under both temp-name styles.
    m = tmp_path / "models"
    (m / "tmp" / "put-x1y2.tmp").write_bytes(b"half an onn")
    half = m / "versions" / "det" / ".1.4.0.abcd.tmp"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"partial")
    new_json = state_with(NEW).model_dump_json().encode()
    (m / ".state.json.k3j2.tmp").write_bytes(new_json[: len(new_json) // 2])
    (m / "state.json.tmp").write_bytes(new_json[:10])
    (m / "objects" / ".deadbeef.tmp").write_bytes(b"?")

    reopened = ModelStore(tmp_path)
    assert len(reopened.cleaned) == 5
    assert reopened.load_state() == old_state
    assert list((m / "tmp").iterdir()) == []
    assert sorted(p.name for p in m.iterdir()) == ["objects", "state.json", "tmp", "versions"]
    assert sorted(p.name for p in (m / "versions" / "det").iterdir()) == [
        "1.3.2",
        "1.3.2.json",
    ]
    assert old_dir.is_dir() and reopened.verify_all() == []


def test_crash_at_the_rename_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    old_state = state_with(OLD)
    store.save_state(old_state)

    def killed(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save_state(state_with(NEW))
    monkeypatch.undo()
    assert ModelStore(tmp_path).load_state() == old_state


def test_damaged_state_is_reported_not_guessed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.state_path.write_text('{"pipelines": {"front": {"committed": "det"}}}')
    with pytest.raises(StoreError, match="damaged") as ei:
        store.load_state()
    assert ei.value.reason == "state"
    assert store.state_path.exists()
    assert any("damaged" in p for p in store.verify_all())


def test_gc_keeps_what_is_asked_and_what_the_state_names(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path)
    only_old = files["labels.txt"].parent / "old.onnx"
    only_old.write_bytes(b"old model")
    store.install_version("det", "1.3.2", {"model.onnx": only_old}, CARD)
    store.install_version("det", "1.4.0", files, CARD)
    store.install_version("cls", "0.1.0", {"model.onnx": files["golden.npz"]}, CARD)
    store.materialize("det", "1.3.2")
    stray = files["labels.txt"].parent / "stray.bin"
    stray.write_bytes(b"fetched, never installed")
    stray_sha = store.put(stray)
    store.save_state(state_with(OLD))  # det@1.3.2 is committed

    result = store.gc(keep=[NEW])
    assert sorted(result.versions) == ["cls@0.1.0"]
    assert result.objects == 1 and result.bytes == len(b"fetched, never installed")
    assert not store.has(stray_sha)
    assert store.has(sha(b"golden"))  # shared with det@1.4.0, still referenced
    assert sorted(map(str, store.installed())) == ["det@1.3.2", "det@1.4.0"]
    assert store.verify_all() == []

    store.save_state(UpdateState())
    result = store.gc(keep=[])
    assert sorted(result.versions) == ["det@1.3.2", "det@1.4.0"]
    assert list((tmp_path / "models" / "objects").iterdir()) == []
    assert list((tmp_path / "models" / "versions" / "det").iterdir()) == []
