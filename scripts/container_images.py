"""Build edgefleet's container images with podman, on a fresh Debian machine (as root).

No image registry is reachable from these machines, so the base image is made here:
``debootstrap --variant=minbase bookworm`` and ``podman import``, kept under its tag and made
again only with ``--rebuild-base``. On it: the Python images (``ingest``, ``registry``,
``controller``, ``agent``: stages of ``deploy/containers/Containerfile.python``, the project
installed from the wheel built here from this checkout), ``mosquitto`` (the config
``edgefleet ca broker-config`` writes) and ``postgres`` (Debian's PostgreSQL 15)::

    python -m scripts.container_images                   # all of them
    python -m scripts.container_images --only ingest,mosquitto
    python -m scripts.container_images --rebuild-base    # debootstrap again

podman runs with ``deploy/containers/containers.conf`` (runc, cgroupfs, no default ulimits:
what podman needs on these machines) through ``CONTAINERS_CONF``, and builds with
``--network host`` so apt and pip reach their mirrors. Images are tagged
``localhost/edgefleet-NAME:VERSION`` and ``:latest``, or only ``:TAG`` with ``--tag TAG`` (the
container test's own tag, so a concurrent run's images are not touched).
``docs/containers.md`` is the walkthrough.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "containers"
CONTAINERS_CONF = DEPLOY / "containers.conf"
BASE_TAG = "localhost/edgefleet-base:bookworm"
PYTHON_TARGETS = ("ingest", "registry", "controller", "agent")
OTHER_IMAGES = {"mosquitto": "Containerfile.mosquitto", "postgres": "Containerfile.postgres"}
ALL_IMAGES = (*PYTHON_TARGETS, *OTHER_IMAGES)
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
LOCAL_CAS = "/usr/local/share/ca-certificates"


def podman_env() -> dict[str, str]:
    """The environment every podman call here runs in (containers.conf for these machines)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def _run(cmd: list[str], **kw: object) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=podman_env(), **kw)  # type: ignore[call-overload]


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(["podman", "image", "exists", tag], env=podman_env(), check=False).returncode
        == 0
    )


def ensure_base(mirror: str, security_mirror: str, *, rebuild: bool = False) -> float:
    """``BASE_TAG`` from ``debootstrap --variant=minbase bookworm``, unless it exists; seconds."""
    if image_exists(BASE_TAG) and not rebuild:
        print(f"base image {BASE_TAG} exists (--rebuild-base to make it again)")
        return 0.0
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed: apt-get install debootstrap")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-base-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror],
             stdout=subprocess.DEVNULL)  # fmt: skip
        # updates and security fixes for every image built on it
        (root / "etc/apt/sources.list").write_text(
            f"deb {mirror} bookworm main\n"
            f"deb {mirror} bookworm-updates main\n"
            f"deb {security_mirror} bookworm-security main\n"
        )
        subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            _run(["podman", "import", "--change", "CMD /bin/bash", "-", BASE_TAG],
                 stdin=tar.stdout, stdout=subprocess.DEVNULL)  # fmt: skip
        if tar.returncode != 0:
            raise SystemExit(f"tar of {root} failed with exit {tar.returncode}")
    return time.monotonic() - t0


def build_wheel(out: Path) -> Path:
    """The project's wheel, built from a clean copy of the checkout's tracked files (so no
    ``build/`` or ``*.egg-info`` lands in the work tree)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-src-") as tmp:
        src = Path(tmp) / "src"
        files = subprocess.run(
            ["git", "ls-files", "-z", "pyproject.toml", "README.md", "agent", "cloud_sync",
             "device_profiles"],
            cwd=ROOT, check=True, capture_output=True,
        ).stdout.decode().split("\0")  # fmt: skip
        for name in filter(None, files):
            if (ROOT / name).is_file():  # tracked files deleted in the work tree are skipped
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
            check=True,
        )
    (wheel,) = out.glob("edgefleet-*.whl")
    return wheel


def _pyproject() -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["project"])


def project_version() -> str:
    """``version`` of ``pyproject.toml`` (the images' tag beside ``latest``)."""
    return str(_pyproject()["version"])


def requirements() -> str:
    """The images' pip requirements: the project's dependencies and its ``postgres`` extra
    (installed in a layer of their own, before the wheel)."""
    project = _pyproject()
    return "\n".join([*project["dependencies"], *project["optional-dependencies"]["postgres"]])


def build_images(names: list[str], tags: list[str]) -> dict[str, float]:
    """Build ``names`` (of ``ALL_IMAGES``), each tagged ``localhost/edgefleet-NAME:TAG`` for
    each of ``tags``; seconds per image."""
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-ctx-") as tmp:
        ctx = Path(tmp)
        for f in DEPLOY.iterdir():
            if f.is_file():
                shutil.copy2(f, ctx / f.name)
        # the machine's own CAs (a TLS-inspecting proxy between pip and PyPI, say): pip in
        # the build trusts them for its one step (Containerfile.python)
        (ctx / "requirements.txt").write_text(requirements() + "\n")
        (ctx / "build-ca").mkdir()
        (ctx / "build-ca" / "README").write_text("CAs pip trusts while the image is built\n")
        for crt in sorted(Path(LOCAL_CAS).glob("*.crt")):
            shutil.copy2(crt, ctx / "build-ca" / crt.name)
        if any(n in PYTHON_TARGETS for n in names):
            t0 = time.monotonic()
            print(f"wheel: {build_wheel(ctx).name}")
            times["wheel"] = time.monotonic() - t0
        for name in names:
            t0 = time.monotonic()
            common = ["podman", "build", "--network", "host", "--format", "docker",
                      "--build-arg", f"BASE={BASE_TAG}"]  # fmt: skip
            for tag in tags:
                common += ["-t", f"localhost/edgefleet-{name}:{tag}"]
            if name in PYTHON_TARGETS:
                _run([*common, "--target", name, "-f", str(ctx / "Containerfile.python"), str(ctx)])
            else:
                _run([*common, "-f", str(ctx / OTHER_IMAGES[name]), str(ctx)])
            times[name] = time.monotonic() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(ALL_IMAGES),
                    help=f"images to build (comma-separated): {','.join(ALL_IMAGES)}")  # fmt: skip
    ap.add_argument("--rebuild-base", action="store_true", help="debootstrap the base again")
    ap.add_argument("--mirror", default=os.environ.get("EDGEFLEET_DEBIAN_MIRROR", MIRROR))
    ap.add_argument("--security-mirror", default=SECURITY_MIRROR)
    ap.add_argument("--tag", help="tag the images NAME:TAG only (default: VERSION and latest)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_IMAGES))
    if unknown:
        ap.error(f"unknown image(s) {', '.join(unknown)}; choose from {', '.join(ALL_IMAGES)}")
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed: apt-get install podman runc")
    t0 = time.monotonic()
    times = {"base": ensure_base(args.mirror, args.security_mirror, rebuild=args.rebuild_base)}
    tags = [args.tag] if args.tag else [project_version(), "latest"]
    times.update(build_images(names, tags))
    total = time.monotonic() - t0
    each = ", ".join(f"{k} {v:.1f}" for k, v in times.items())
    print(f"seconds: {each}; total {total:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
