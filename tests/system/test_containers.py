"""The cloud side in podman containers, from the compose file, with two real agents.

Builds the images (``scripts.container_images``: debootstrap base, cached by tag), makes a
stack folder the way docs/containers.md does (every operator command run in the ingest
image as uid 10001), starts Mosquitto (TLS + ACL), PostgreSQL, ingest, the registry and the
rollout controller with podman-compose, publishes ``blobdet@1.0.0`` and enrolls two devices
in the group ``lobby``: ``cam-1`` runs ``edgefleet-agent`` on this host, ``cam-2`` runs in the
agent image (read-only root, non-root, its bundle mounted read-only, its state on a named
volume, a video ffmpeg made here, ONNX Runtime on the CPU). Both talk to the containerised
broker over mutual TLS. A detached rollout that the containerised controller drives must
commit on both, their telemetry must be in the containerised PostgreSQL, the agent image's
health check must pass, and ``cam-2`` must stop gracefully and come back on the committed
model from its volume without downloading it again.

Images, compose project and containers carry this run's own names (``test-<random>``), so a
concurrent run of the same test on the machine is not disturbed.

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
from typing import Any

import pytest

from scripts import container_images as ci
from tests.harness.util import free_port, terminate, wait_for

pytestmark = [pytest.mark.containers, pytest.mark.slow]

UID = 10001
KEEP_IMAGES = os.environ.get("EDGEFLEET_KEEP_IMAGES") == "1"
RUN_ID = secrets.token_hex(3)
# kept images keep one tag, so warm reruns reuse (and replace) them
TAG = "test-kept" if KEEP_IMAGES else f"test-{RUN_ID}"
PROJECT = f"efct{RUN_ID}"  # the compose project: containers are PROJECT_SERVICE_1
COMPOSE_FILE = ci.DEPLOY / "compose.yaml"
SERVICES = ("mosquitto", "postgres", "ingest", "registry", "controller")
AGENT_BOX = f"{PROJECT}_cam-2"
AGENT_VOLUME = f"{PROJECT}-cam-2-data"


def image(name: str) -> str:
    return f"localhost/edgefleet-{name}:{TAG}"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=ci.podman_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def _why_not() -> str | None:
    if os.environ.get("EDGEFLEET_CONTAINER_TESTS") != "1":
        return "container test is opt-in: run scripts/test_containers (EDGEFLEET_CONTAINER_TESTS=1)"
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    for tool in ("podman", "debootstrap", "ffmpeg"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test_containers installs podman, debootstrap)"
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

    @property
    def broker(self) -> str:
        return f"mqtts://127.0.0.1:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        return {
            **ci.podman_env(),
            "EDGEFLEET_STACK": str(self.root),
            "EDGEFLEET_IMAGE_TAG": TAG,
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
        r = podman("run", "--rm", "--network", "host", "-v", f"{self.root}:/stack",
                   "-v", f"{self.root}/secrets/services:/run/secrets/edgefleet:ro",
                   "-w", "/stack", *tls, image("ingest"), *args, timeout=timeout)  # fmt: skip
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r.stdout

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(_compose_bin()), "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
        return subprocess.run(cmd, env=self.env(), capture_output=True, timeout=timeout)

    def healthy(self, service: str) -> bool:
        return podman("healthcheck", "run", f"{PROJECT}_{service}_1").returncode == 0

    def logs(self) -> str:
        out = []
        for name in [f"{PROJECT}_{s}_1" for s in SERVICES] + [AGENT_BOX]:
            r = podman("logs", "--tail", "30", name)
            out.append(f"--- {name}\n{r.stdout}{r.stderr}")
        agent_log = self.root / "agent.log"
        if agent_log.exists():
            out.append(f"--- cam-1 (outside)\n{agent_log.read_text()[-3000:]}")
        return "\n".join(out)

    def fleet(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in json.loads(self.ef("fleet", "status", "--json"))}

    def committed(self, device: str, ref: str = "blobdet@1.0.0") -> bool:
        dev = self.fleet().get(device)
        model, version = ref.split("@")
        return dev is not None and any(
            p["model"] == model and p["version"] == version and p["phase"] == "committed"
            for p in dev["pipelines"]
        )


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
    assert ci.main(["--tag", TAG]) == 0
    took = time.monotonic() - t0
    base = "cached" if base_cached else "made"
    print(f"\nimages :{TAG} built in {took:.1f} s (base image {base})")
    size = podman("image", "inspect", "--format", "{{.Size}}", image("agent")).stdout.strip()
    print(f"agent image {int(size) / 1e6:.0f} MB")
    yield {"build_s": took}
    if not KEEP_IMAGES:
        podman("rmi", "-f", *[image(name) for name in ci.ALL_IMAGES])
        podman("image", "prune", "-f")


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
        podman("rm", "-f", "-t", "5", AGENT_BOX)
        podman("volume", "rm", "-f", AGENT_VOLUME)
        s.compose("down", "-t", "5")
        shutil.rmtree(root, ignore_errors=True)


def _pipeline_toml(source: str) -> str:
    return (f'\n[[pipelines]]\nname = "front"\nsource = "{source}"\nmodel = "blobdet"\n'
            "loop = true\n[update]\nhealth_window_s = 2\nhealth_min_frames = 5\n"
            "[telemetry]\ninterval_s = 1\n")  # fmt: skip


def enroll(stack: Stack, device: str, conf_dir: str) -> Path:
    """``device enroll`` into ``bundles/DEVICE`` (group lobby), files named under ``conf_dir``;
    returns the bundle folder."""
    stack.ef("device", "enroll", device, "--ca", "ca", "--broker", stack.broker,
             "--root", "registry/root.json", "--out", "bundles", "--group", "lobby",
             "--conf-dir", conf_dir)  # fmt: skip
    return stack.root / "bundles" / device


def start_outside_agent(stack: Stack, video: Path) -> subprocess.Popen[bytes]:
    """``cam-1``: edgefleet-agent on this host, its data in the stack folder."""
    bundle = enroll(stack, "cam-1", str(stack.root / "bundles" / "cam-1"))
    conf = bundle / "agent.toml"
    text = conf.read_text().replace(
        'data_dir = "/var/lib/edgefleet"', f'data_dir = "{stack.root / "agent-data"}"'
    )
    conf.write_text(text + _pipeline_toml(str(video)))
    agent_bin = Path(sys.executable).parent / "edgefleet-agent"
    with (stack.root / "agent.log").open("wb") as log:
        return subprocess.Popen([str(agent_bin), "run", "--config", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


def make_video(path: Path) -> Path:
    """Four seconds of H.264 (what cameras send) from ffmpeg: a white square on black."""
    r = subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "color=black:s=320x240:r=15:d=4",
         "-f", "lavfi", "-i", "color=white:s=40x40:r=15:d=4",
         "-filter_complex", "[0][1]overlay=x='t*60':y=100", "-c:v", "libx264",
         "-pix_fmt", "yuv420p", str(path)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    path.chmod(0o644)
    return path


def start_agent_container(stack: Stack) -> None:
    """``cam-2`` in the agent image, as docs/containers.md runs it: bundle read-only, state on
    a named volume, the video read-only, root filesystem read-only, no capabilities."""
    bundle = enroll(stack, "cam-2", "/etc/edgefleet")
    conf = bundle / "agent.toml"
    text = conf.read_text() + _pipeline_toml("/media/front.mp4")
    text += '[engine]\ntype = "onnxruntime"\nproviders = ["CPUExecutionProvider"]\nthreads = 1\n'
    conf.write_text(text)  # the bundle is uid 10001's (enroll ran as 10001): it stays so
    video = make_video(stack.root / "front.mp4")
    assert podman("volume", "create", AGENT_VOLUME).returncode == 0
    r = podman("run", "-d", "--name", AGENT_BOX, "--init", "--network", "host", "--read-only",
               "--cap-drop", "all", "--security-opt", "no-new-privileges", "--stop-timeout", "30",
               "-v", f"{bundle}:/etc/edgefleet:ro", "-v", f"{AGENT_VOLUME}:/var/lib/edgefleet",
               "-v", f"{video}:/media/front.mp4:ro", image("agent"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def box_status() -> dict[str, Any] | None:
    """``edgefleet-agent status --json`` in the agent container (None when it has none)."""
    r = podman("exec", AGENT_BOX, "edgefleet-agent", "status", "--json",
               "--config", "/etc/edgefleet/agent.toml")  # fmt: skip
    return json.loads(r.stdout) if r.returncode == 0 else None


def box_healthy() -> bool:
    return podman("healthcheck", "run", AGENT_BOX).returncode == 0


def inferring_on(status: dict[str, Any] | None, ref: str, since: float) -> bool:
    """``status`` was written after ``since`` and pipeline front runs ``ref`` on ONNX Runtime
    with frames inferred."""
    if status is None or status["time"] <= since or len(status["pipelines"]) != 1:
        return False
    front = status["pipelines"][0]
    return bool(
        front["model"] == ref and front["backend"] == "onnxruntime" and front["frames_inferred"] > 0
    )


def check_restart(stack: Stack) -> None:
    """SIGTERM stops cam-2 with exit 0; started again it runs the committed model from its
    volume (no second install), healthy, and the fleet still shows it committed."""
    assert podman("stop", AGENT_BOX, timeout=60).returncode == 0
    state = podman("inspect", "--format", "{{.State.ExitCode}}", AGENT_BOX).stdout.strip()
    assert state == "0", f"graceful stop expected exit 0, got {state}\n{stack.logs()}"
    restarted = time.time()
    assert podman("start", AGENT_BOX).returncode == 0
    assert wait_for(lambda: inferring_on(box_status(), "blobdet@1.0.0", restarted), 120,
                    interval=2), stack.logs()  # fmt: skip
    assert wait_for(box_healthy, 60, interval=2), stack.logs()
    logs = podman("logs", AGENT_BOX)
    installs = (logs.stdout + logs.stderr).count("store: installed blobdet@1.0.0")
    assert installs == 1, f"installed {installs} times (expected once, before the restart)"
    assert stack.committed("cam-2")


def check_box(stack: Stack) -> None:
    """cam-2 runs as 10001 on a read-only root, its health check passes and it infers with
    the rolled-out model on ONNX Runtime."""
    assert podman("exec", AGENT_BOX, "id", "-u").stdout.strip() == str(UID)
    ro = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", AGENT_BOX)
    assert ro.stdout.strip() == "true"
    assert wait_for(box_healthy, 60, interval=2), stack.logs()
    assert wait_for(lambda: inferring_on(box_status(), "blobdet@1.0.0", 0), 60, interval=2), (
        json.dumps(box_status()) + stack.logs()
    )


def telemetry_rows(stack: Stack) -> dict[str, int]:
    """Telemetry rows per device in the containerised PostgreSQL."""
    import psycopg

    url = (stack.root / "secrets/services/db-url").read_text().replace("+psycopg", "")
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT device_id, count(*) FROM telemetry GROUP BY device_id")
        return {str(d): int(n) for d, n in rows.fetchall()}


def test_compose_stack_rolls_out_to_agents_outside_and_in_a_container(
    stack: Stack, synthetic_video: Path
) -> None:
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
    outside = start_outside_agent(stack, synthetic_video)
    try:
        start_agent_container(stack)
        both = ("cam-1", "cam-2")
        assert wait_for(lambda: set(both) <= set(stack.fleet()), 90, interval=2), stack.logs()
        stack.ef("rollout", "start", "blobdet@1.0.0", "--target", "group:lobby", "--detach",
                 "--id", "first", "--soak", "2s", "--repo", "registry", "--broker", stack.broker,
                 identity="op-admin")  # fmt: skip
        ok = wait_for(lambda: all(stack.committed(d) for d in both), 180, interval=2)
        assert ok, stack.logs()

        def rollout() -> dict[str, object]:
            return dict(json.loads(stack.ef("rollout", "status", "first", "--json")))

        assert wait_for(lambda: rollout()["status"] == "completed", 60, interval=2), json.dumps(
            rollout()
        )
        print(f"rolled out to both {time.monotonic() - t0:.1f} s after the first command")
        check_box(stack)
        # telemetry of both devices landed in the containerised PostgreSQL
        assert wait_for(lambda: all(telemetry_rows(stack).get(d, 0) > 0 for d in both), 60,
                        interval=2), telemetry_rows(stack)  # fmt: skip
        print(f"telemetry rows in PostgreSQL: {telemetry_rows(stack)}")
    finally:
        terminate(outside)
    t1 = time.monotonic()
    check_restart(stack)
    print(
        f"cam-2 stopped, restarted, inferring on its committed model in "
        f"{time.monotonic() - t1:.1f} s; whole stack test {time.monotonic() - t0:.1f} s"
    )
