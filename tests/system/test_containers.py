"""The cloud side in podman containers, from the compose file, with a real agent outside.

Builds the images (``scripts.container_images``: debootstrap base, cached by tag), makes a
stack folder the way docs/containers.md does (every operator command run in the ingest
image as uid 10001), starts Mosquitto (TLS + ACL), PostgreSQL, ingest, the registry and the
rollout controller with podman-compose, enrolls ``cam-1``, runs ``edgefleet-agent`` on this
host against the containerised broker over mutual TLS, publishes ``blobdet@1.0.0``, starts a
detached rollout that the containerised controller drives, and checks that the device
reports the version committed and that its telemetry is in the containerised PostgreSQL.

Opt-in: a cold run builds the images (minutes). ``scripts/test_containers`` installs podman,
debootstrap and podman-compose and runs this alone; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import container_images as ci
from tests.harness.util import free_port, terminate, wait_for

pytestmark = [pytest.mark.containers, pytest.mark.slow]

UID = 10001
IMAGE = "localhost/edgefleet-ingest:latest"
COMPOSE_FILE = ci.DEPLOY / "compose.yaml"
SERVICES = ("mosquitto", "postgres", "ingest", "registry", "controller")


def _why_not() -> str | None:
    if os.environ.get("EDGEFLEET_CONTAINER_TESTS") != "1":
        return "container test is opt-in: run scripts/test_containers (EDGEFLEET_CONTAINER_TESTS=1)"
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test_containers installs it)"
    if _compose_bin() is None:
        return "podman-compose not found (EDGEFLEET_PODMAN_COMPOSE or PATH)"
    r = subprocess.run(["podman", "info"], env=ci.podman_env(), capture_output=True, check=False)
    if r.returncode != 0:
        return f"podman does not run here: {r.stderr.decode()[-300:]}"
    return None


def _compose_bin() -> str | None:
    return os.environ.get("EDGEFLEET_PODMAN_COMPOSE") or shutil.which("podman-compose")


class Stack:
    """A stack folder owned by uid 10001 and the commands of the walkthrough on it."""

    def __init__(self, root: Path, mqtt_port: int, pg_port: int) -> None:
        self.root = root
        self.mqtt_port = mqtt_port
        self.pg_port = pg_port
        self.metrics_port = free_port()
        self.http_port = free_port()

    def env(self) -> dict[str, str]:
        return {
            **ci.podman_env(),
            "EDGEFLEET_STACK": str(self.root),
            "EDGEFLEET_MQTT_PORT": str(self.mqtt_port),
            "EDGEFLEET_PG_PORT": str(self.pg_port),
            "EDGEFLEET_METRICS_PORT": str(self.metrics_port),
            "EDGEFLEET_HTTP_PORT": str(self.http_port),
            "EDGEFLEET_CONTROLLER_EVERY": "1",
        }

    def ef(self, *args: str, identity: str | None = None, timeout: float = 120) -> str:
        """``edgefleet ARGS`` (or ``sh``/``python3`` ARGS) in the ingest image, in the stack
        folder, as uid 10001."""
        if args[0] not in ("sh", "python3"):
            args = ("edgefleet", *args)
        tls = []
        if identity:
            d = f"/stack/ca/identities/{identity}"
            tls = ["-e", f"EDGEFLEET_TLS_CA={d}/ca.crt", "-e", f"EDGEFLEET_TLS_CERT={d}/client.crt",
                   "-e", f"EDGEFLEET_TLS_KEY={d}/client.key"]  # fmt: skip
        cmd = ["podman", "run", "--rm", "--network", "host", "-v", f"{self.root}:/stack",
               "-v", f"{self.root}/secrets/services:/run/secrets/edgefleet:ro",
               "-w", "/stack", *tls, IMAGE, *args]  # fmt: skip
        r = subprocess.run(cmd, env=ci.podman_env(), capture_output=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout.decode()[-2000:], r.stderr.decode()[-3000:])
        return r.stdout.decode()

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(_compose_bin()), "-f", str(COMPOSE_FILE), *args]
        return subprocess.run(cmd, env=self.env(), capture_output=True, timeout=timeout)

    def healthy(self, service: str) -> bool:
        r = subprocess.run(["podman", "healthcheck", "run", f"edgefleet_{service}_1"],
                           env=ci.podman_env(), capture_output=True, check=False)  # fmt: skip
        return r.returncode == 0

    def logs(self) -> str:
        out = []
        for s in SERVICES:
            r = subprocess.run(["podman", "logs", "--tail", "30", f"edgefleet_{s}_1"],
                               env=ci.podman_env(), capture_output=True, check=False)  # fmt: skip
            out.append(f"--- {s}\n{r.stdout.decode()}{r.stderr.decode()}")
        return "\n".join(out)


def prepare(stack: Stack) -> None:
    """docs/containers.md steps 2-4: CA, identities, broker config, registry, secrets."""
    ef = stack.ef
    ef("ca", "init", "--dir", "ca")
    ef("ca", "server", "--dir", "ca", "--host", "127.0.0.1", "--host", "localhost")
    ef("ca", "identity", "ingest", "--role", "ingest", "--dir", "ca")
    ef("ca", "identity", "registry", "--role", "registry", "--dir", "ca")
    ef("ca", "identity", "controller", "--role", "operator", "--dir", "ca")
    ef("ca", "identity", "admin", "--role", "operator", "--dir", "ca")
    ef("ca", "broker-config", "--dir", "ca", "--out", "broker", "--port", str(stack.mqtt_port))
    ef("sh", "-c", "cp ca/ca.crt ca/crl.pem ca/server/server.crt ca/server/server.key broker/")
    ef("registry", "init", "registry")
    # the root key goes offline: serve refuses to start while it can read it
    ef("sh", "-c", "mkdir -p offline && mv registry.keys/offline offline/registry-root")
    pw = secrets.token_hex(16)
    ef("sh", "-c", f"umask 077 && printf %s {pw} > secrets/postgres/pg-password && printf %s "
       f"'postgresql+psycopg://edgefleet:{pw}@127.0.0.1:{stack.pg_port}/edgefleet' "
       "> secrets/services/db-url && mkdir -p broker-data db")  # fmt: skip


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, float]]:
    why = _why_not()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    base_cached = ci.image_exists(ci.BASE_TAG)
    assert ci.main([]) == 0
    took = time.monotonic() - t0
    print(f"\nimages built in {took:.1f} s (base image {'cached' if base_cached else 'made'})")
    yield {"build_s": took}
    if os.environ.get("EDGEFLEET_KEEP_IMAGES") != "1":
        for name in ci.ALL_IMAGES:
            subprocess.run(["podman", "rmi", "-f", f"localhost/edgefleet-{name}:latest",
                            f"localhost/edgefleet-{name}:{ci.project_version()}"],
                           env=ci.podman_env(), capture_output=True, check=False)  # fmt: skip
        subprocess.run(["podman", "image", "prune", "-f"], env=ci.podman_env(),
                       capture_output=True, check=False)  # fmt: skip


@pytest.fixture
def stack(images: dict[str, float]) -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="edgefleet-stack-", dir="/var/tmp"))
    for d in (root, root / "secrets", root / "secrets/postgres", root / "secrets/services"):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, UID, UID)
    s = Stack(root, free_port(), free_port())
    try:
        yield s
    finally:
        s.compose("down", "-t", "5")
        shutil.rmtree(root, ignore_errors=True)


def _agent_config(stack: Stack, video: Path) -> Path:
    """The enrolled bundle's agent.toml, with a data folder and one pipeline on ``video``."""
    bundle = stack.root / "bundles" / "cam-1"
    conf = bundle / "agent.toml"
    text = conf.read_text().replace(
        'data_dir = "/var/lib/edgefleet"', f'data_dir = "{stack.root / "agent-data"}"'
    )
    text += (f'\n[[pipelines]]\nname = "front"\nsource = "{video}"\nmodel = "blobdet"\n'
             "loop = true\n[update]\nhealth_window_s = 2\nhealth_min_frames = 5\n"
             "[telemetry]\ninterval_s = 1\n")  # fmt: skip
    conf.write_text(text)
    return conf


def test_compose_stack_rolls_out_to_an_agent_outside(stack: Stack, synthetic_video: Path) -> None:
    t0 = time.monotonic()
    prepare(stack)
    up = stack.compose("up", "-d")
    assert up.returncode == 0, up.stderr.decode()[-3000:]
    ok = wait_for(lambda: all(stack.healthy(s) for s in SERVICES), 120)
    assert ok, stack.logs()
    print(f"stack healthy {time.monotonic() - t0:.1f} s after the first command")
    # a model: the project's sample blob detector, made and published in the image
    stack.ef("python3", "-c", "from pathlib import Path; from cloud_sync.samples import build_all;"
             " build_all(Path('models'), only=['blobdet'])")  # fmt: skip
    stack.ef("model", "publish", "models/blobdet/model.onnx", "--repo", "registry",
             "--name", "blobdet", "--version", "1.0.0")  # fmt: skip
    broker = f"mqtts://127.0.0.1:{stack.mqtt_port}"
    stack.ef("device", "enroll", "cam-1", "--ca", "ca", "--broker", broker,
             "--root", "registry/root.json", "--out", "bundles", "--group", "lobby",
             "--conf-dir", str(stack.root / "bundles" / "cam-1"))  # fmt: skip
    conf = _agent_config(stack, synthetic_video)
    agent_bin = Path(sys.executable).parent / "edgefleet-agent"
    log = (stack.root / "agent.log").open("wb")
    agent = subprocess.Popen([str(agent_bin), "run", "--config", str(conf)], stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def fleet() -> list[dict[str, object]]:
            return list(json.loads(stack.ef("fleet", "status", "--json")))

        assert wait_for(lambda: any(d["device_id"] == "cam-1" for d in fleet()), 60, interval=2), (
            stack.logs() + (stack.root / "agent.log").read_text()[-3000:]
        )
        stack.ef("rollout", "start", "blobdet@1.0.0", "--target", "group:lobby", "--detach",
                 "--id", "first", "--soak", "2s", "--repo", "registry", "--broker", broker,
                 identity="op-admin")  # fmt: skip

        def committed() -> bool:
            dev = next(d for d in fleet() if d["device_id"] == "cam-1")
            pipes = dev["pipelines"]
            assert isinstance(pipes, list)
            return any(p["model"] == "blobdet" and p["version"] == "1.0.0"
                       and p["phase"] == "committed" for p in pipes)  # fmt: skip

        assert wait_for(committed, 180, interval=2), (
            stack.logs() + (stack.root / "agent.log").read_text()[-4000:]
        )

        def rollout() -> dict[str, object]:
            return dict(json.loads(stack.ef("rollout", "status", "first", "--json")))

        assert wait_for(lambda: rollout()["status"] == "completed", 60, interval=2), json.dumps(
            rollout()
        )
        print(f"rolled out {time.monotonic() - t0:.1f} s after the first command")
    finally:
        terminate(agent)
        log.close()
    # telemetry landed in the containerised PostgreSQL
    import psycopg

    url = (stack.root / "secrets/services/db-url").read_text().replace("+psycopg", "")
    with psycopg.connect(url) as db:
        row = db.execute("SELECT count(*) FROM telemetry WHERE device_id = %s", ("cam-1",))
        count = row.fetchone()
    assert count is not None and count[0] > 0
    print(f"{count[0]} telemetry rows for cam-1 in PostgreSQL")
