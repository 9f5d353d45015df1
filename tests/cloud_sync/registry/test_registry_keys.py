"""Registry keys live outside the served repository; serving refuses keys it must not hold.

``registry init`` writes the online keys to ``DIR.keys`` and the root key to
``DIR.keys/offline``; ``registry serve`` refuses to start while it can read a root key or finds
keys inside the repository; the chunk server never serves a file outside ``metadata/`` and
``targets/``, symlinks resolved.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_sync.cli import main
from cloud_sync.registry.keys import RegistryError, check_serving_keys, default_keys_dir
from cloud_sync.registry.repo import Repository
from cloud_sync.registry.serve import ChunkServer, resolve_repo_path
from tests.harness.broker import Mosquitto
from tests.harness.fetch import RawDevice

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "registry")


def _take_root_offline(repo: Repository, to: Path) -> Path:
    """What the operator does after init: the root key leaves the host."""
    shutil.move(str(repo.keys_dir / "offline"), str(to))
    return to


def test_default_keys_dir_is_beside_the_repository(tmp_path: Path) -> None:
    assert default_keys_dir(tmp_path / "registry") == tmp_path / "registry.keys"
    assert default_keys_dir("reg/") == Path.cwd() / "reg.keys"
    with pytest.raises(RegistryError, match="its own folder"):
        default_keys_dir("/")


def test_init_refuses_keys_inside_the_repository_or_over_old_keys(tmp_path: Path) -> None:
    for inside in ("registry", "registry/keys", "registry/targets/k"):
        with pytest.raises(RegistryError, match="inside the repository") as e:
            Repository.init(tmp_path / "registry", keys_dir=tmp_path / inside)
        assert e.value.reason == "usage"
    assert not (tmp_path / "registry").exists()
    Repository.init(tmp_path / "a", keys_dir=tmp_path / "shared")
    with pytest.raises(RegistryError, match="already holds keys") as e:
        Repository.init(tmp_path / "b", keys_dir=tmp_path / "shared")
    assert e.value.reason == "exists"


def test_serve_refuses_while_it_can_read_the_root_key(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root_key = repo.keys_dir / "offline" / "root.pem"
    with pytest.raises(RegistryError) as e:
        check_serving_keys(repo.path, repo.keys_dir)
    assert e.value.reason == "key" and e.value.path == str(root_key)
    assert str(root_key) in str(e.value) and "renew-root --keys-dir" in str(e.value)
    argv = ["registry", "serve", "--repo", str(repo.path), "--broker", "mqtt://127.0.0.1:1"]
    assert main(argv) == 2  # refused before connecting to anything
    err = capsys.readouterr().err
    assert "refuses to start" in err and str(root_key) in err and "offline storage" in err
    # a root key copied next to the online keys is found too
    shutil.copy2(root_key, repo.keys_dir / "root.pem")
    offline = _take_root_offline(repo, tmp_path / "usb")
    with pytest.raises(RegistryError, match=str(repo.keys_dir / "root.pem")):
        check_serving_keys(repo.path, repo.keys_dir)
    (repo.keys_dir / "root.pem").unlink()
    # without it: serving starts (a warning about the desired key, which deploys need)
    assert "desired" in check_serving_keys(repo.path, repo.keys_dir)
    # and the offline steps read the root key from where it went
    renewed = ["registry", "renew-root", "--repo", str(repo.path), "--keys-dir", str(offline)]
    assert main(renewed) == 0
    assert Repository(repo.path).versions().root == 2
    assert main(["registry", "renew-root", "--repo", str(repo.path)]) == 2  # no root key here
    assert "root of root v2 needs 1 signing key" in capsys.readouterr().err


def test_keys_inside_the_served_repository_refuse_serving(repo: Repository) -> None:
    # the layout before keys moved out: REPO/keys
    legacy = repo.path / "keys"
    shutil.move(str(repo.keys_dir), str(legacy))
    for f in (legacy / "offline").iterdir():
        f.rename(legacy / f.name)
    (legacy / "offline").rmdir()
    old = Repository(repo.path)  # still opens, and signs, from REPO/keys
    assert old.keys_dir == legacy and old.has_key("timestamp")
    assert old.refresh_timestamp(datetime.now(timezone.utc) + timedelta(days=2))
    with pytest.raises(RegistryError, match="inside the served repository") as e:
        check_serving_keys(repo.path, default_keys_dir(repo.path))
    assert str(legacy / "root.pem") in str(e.value) and "mv " in str(e.value)
    # a keys folder inside the repository, or a key file among the targets
    shutil.move(str(legacy), str(repo.path / "secret"))
    with pytest.raises(RegistryError, match="is inside the served repository"):
        check_serving_keys(repo.path, repo.path / "secret")
    shutil.move(str(repo.path / "secret"), str(default_keys_dir(repo.path)))
    (repo.keys_dir / "root.pem").unlink()
    (repo.targets_dir / "models").mkdir()
    (repo.targets_dir / "models" / "snapshot.pem").write_bytes(b"-----BEGIN PRIVATE KEY")
    with pytest.raises(RegistryError, match=r"models/snapshot\.pem"):
        check_serving_keys(repo.path, default_keys_dir(repo.path))


@pytest.mark.broker
def test_symlinks_out_of_metadata_and_targets_are_not_served(
    repo: Repository, broker: Mosquitto
) -> None:
    """The old layout's keys inside the repository, and links to them from the served tree:
    nothing but metadata/ and targets/ is served, whatever a link says."""
    keys = repo.path / "keys"
    shutil.copytree(repo.keys_dir, keys)
    (repo.targets_dir / "k").symlink_to("../keys")
    (repo.targets_dir / "r.pem").symlink_to("../keys/offline/root.pem")
    (repo.metadata_dir / "m").symlink_to("..")
    (repo.targets_dir / "ok.json").symlink_to("../metadata/1.root.json")  # inside: served
    root = repo.path.resolve()
    for path in ("targets/k/offline/root.pem", "targets/r.pem", "metadata/m/keys/snapshot.pem",
                 "metadata/m/repo.json", "targets/k/timestamp.pem"):  # fmt: skip
        assert resolve_repo_path(root, path) is None, path
    escapes = [
        "targets/k/offline/root.pem",
        "targets/r.pem",
        "metadata/m/keys/timestamp.pem",
        "metadata/m/root.json",
    ]
    server = ChunkServer(repo.path, broker.url, client_id="registry-1")
    server.start()
    raw = RawDevice(broker, "attacker")
    try:
        for i, path in enumerate(escapes):
            header = raw.ask(f"s{i}", path)
            assert (header.status, header.total) == ("bad_request", 0), path
            assert "outside the served metadata/ and targets/" in header.error
        header = raw.ask("ok", "targets/ok.json")
        assert header.status == "ok" and header.total == len(repo.trusted_root_bytes())
    finally:
        raw.close()
        server.stop()
    stats = server.stats()
    assert stats.bad_requests == 4 and stats.bytes_sent == len(repo.trusted_root_bytes())


@pytest.mark.broker
def test_registry_serve_starts_with_only_the_online_keys(
    repo: Repository, broker: Mosquitto, tmp_path: Path
) -> None:
    _take_root_offline(repo, tmp_path / "usb")
    status = ["registry", "status", "--repo", str(repo.path), "--json"]
    serve = ["registry", "serve", "--repo", str(repo.path), "--broker", broker.url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.cli", *serve, "--workers", "0", "--device-rate", "100"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), (line, proc.stderr.read() if proc.stderr else "")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "desired-state key" in err  # the warning, not a refusal
    online = {r["role"]: r["online_key"] for r in json.loads(_run_json(status))}
    assert online == {"root": False, "targets": True, "snapshot": True, "timestamp": True}


def _run_json(argv: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cloud_sync.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout
