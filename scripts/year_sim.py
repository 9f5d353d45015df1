"""A year in minutes: registry, CA, broker and a device driven through simulated time.

The timeline ends at the real "now": it starts ``--days`` ago, and everything the cloud signs
is dated on it (TUF metadata by ``Repository(now=…)`` and the ``registry serve`` keeper's
ticks, certificates and CRLs by ``FleetCA(now=…)``, desired states by ``deploy(now=…)``). The
device is the real agent (``Agent``) whose wall clock, the one its TUF client judges expiry by
and its update records carry, is the simulated one. Along the way:

- the keeper re-signs the online roles every ``--step-h`` hours (what ``registry serve`` does);
- the CRL timer runs daily (``ca refresh-crl``);
- a new model version is published and deployed every ``--publish-every-d`` days, and the run
  waits, in real time, until the device commits it;
- the operator does the only things that need an offline key, when a warning says so:
  renewing the root metadata (``registry renew-root``) and a device certificate
  (``device renew``);
- one device certificate is revoked; once, the device's disk is full when a version arrives.

At every tick it checks that no role's metadata, no live certificate and no CRL has expired at
that simulated time; after every commit, what the device keeps on disk. At the end (simulated
time = real time) a real TLS Mosquitto with the CA's CRL admits the kept and the renewed
devices and refuses the revoked one. The device talks to a plain Mosquitto during the run:
OpenSSL judges certificate and CRL dates by the real clock, so TLS can only be tried at the
end of the timeline.

  python -m scripts.year_sim                 # 400 days, a version every 30 days (~2-3 min)
  python -m scripts.year_sim --days 120 --publish-every-d 40 --json

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.service import Agent
from cloud_sync.cli import metadata_keeper
from cloud_sync.deploy import deploy
from cloud_sync.enroll import ca_warnings
from cloud_sync.registry.publish import publish
from cloud_sync.registry.repo import Repository
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto
from tests.harness.models import build_test_models, write_digit_loop
from tests.harness.tls import AgedFleet
from tests.harness.util import fill, wait_for

DEVICE = "cam-year"
WARN = timedelta(days=30)  # what `ca status` / `registry status` warn ahead by


@dataclass
class YearConfig:
    days: int = 400
    step_h: float = 6.0
    publish_every_d: int = 30
    revoke_day: int = 150
    full_disk_day: int | None = 200  # the publish on or after this day meets a full disk
    short_cert_days: int = 200  # one device certificate this short must be renewed
    keep_engines: int = 3
    disk_mb: int = 64  # the device's data dir is a tmpfs this big (as root)
    commit_timeout_s: float = 120.0


@dataclass
class Deploy:
    day: float
    version: str
    phase: str
    seconds: float
    disk_kb: int
    models_on_disk: int
    engines_on_disk: int
    note: str = ""
    disk_by_dir_kb: dict[str, int] = field(default_factory=dict)


@dataclass
class YearResult:
    days: int
    ticks: int = 0
    deploys: list[Deploy] = field(default_factory=list)
    resigned: dict[str, int] = field(default_factory=dict)
    crl_rewrites: int = 0
    root_renewals: list[float] = field(default_factory=list)
    cert_renewals: list[float] = field(default_factory=list)
    revoked_day: float | None = None
    min_remaining_h: dict[str, float] = field(default_factory=dict)
    expired_at: list[str] = field(default_factory=list)  # "day 12.5: snapshot" etc.
    device_errors: list[str] = field(default_factory=list)
    final_tls: dict[str, bool] = field(default_factory=dict)
    full_disk: str = "not run"
    wall_s: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)


class SimClock:
    """The simulated wall clock: what the device and every signer read as 'now'."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@contextlib.contextmanager
def small_disk(path: Path, mb: int) -> Iterator[bool]:
    """A real tmpfs of ``mb`` MiB at ``path`` (True), or a plain directory where mounting is
    not allowed (False: the full-disk episode is then skipped and said so)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)  # fmt: skip
        mounted = r.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def du_kb(path: Path, skip: str = "filler") -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != skip:
            total += p.stat().st_size
    return total // 1024


def disk_by_dir(data: Path) -> dict[str, int]:
    """KiB per top-level entry of the data dir, and per folder of ``tuf/``."""
    out = {}
    for p in sorted(data.iterdir()):
        if p.name == "filler":
            continue
        out[p.name] = du_kb(p) if p.is_dir() else p.stat().st_size // 1024
    tuf = data / "tuf"
    for p in sorted(tuf.iterdir()) if tuf.is_dir() else []:
        out[f"tuf/{p.name}"] = du_kb(p) if p.is_dir() else p.stat().st_size // 1024
    return out


class Year:
    """The pieces and the timeline."""

    def __init__(self, cfg: YearConfig, work: Path, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.work = work
        self.log = log
        self.res = YearResult(days=cfg.days)
        (work / "pki").mkdir(parents=True, exist_ok=True)
        self.ca_fleet = AgedFleet(work / "pki", days=cfg.days)  # CA, broker cert, identities
        self.start = self.ca_fleet.start
        self.clock = SimClock(self.start)
        ca = self.ca_fleet.ca
        ids = work / "pki" / "id"
        creds = self.ca_fleet.creds
        creds["dev-b"] = ca.issue("device", "dev-b", ids / "dev-b", now=self.start)
        creds["dev-c"] = ca.issue(
            "device", "dev-c", ids / "dev-c", days=cfg.short_cert_days, now=self.start
        )
        self.models = build_test_models()
        (work / "mqtt").mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(work / "mqtt")
        self.repo_dir = work / "registry"
        self.repo = Repository.init(self.repo_dir, now=self.start)
        self.keeper = metadata_keeper(self.repo, warn_every_s=7 * 86400)
        self.server = ChunkServer(self.repo_dir, self.broker.url, client_id="registry-1", workers=2)
        self.video = write_digit_loop(self.models, work / "digits.mkv")
        self.data = work / "device"
        self.agent: Agent | None = None
        self.version = 0

    # --- the device --------------------------------------------------------------------

    def start_agent(self) -> Agent:
        cfg = parse_config({
            "device_id": DEVICE,
            "data_dir": str(self.data),
            "profile": "x86-cpu",
            "pipelines": [{"name": "front", "source": str(self.video), "model": "digits",
                           "loop": True}],
            "broker": {"url": self.broker.url},
            "trust": {"root": str(self.repo_dir / "root.json")},
            "update": {"health_window_s": 0.5, "health_min_frames": 5, "max_latency_ratio": 20.0,
                       "retry_s": 0.5},
            "storage": {"keep_engines": self.cfg.keep_engines},
        })  # fmt: skip
        agent = Agent(cfg, wall=self.clock)
        agent.start()
        self.agent = agent
        return agent

    def last(self) -> Any:
        assert self.agent is not None
        return self.agent.updates.reported().pipelines[0]

    def running(self) -> str | None:
        assert self.agent is not None
        m = self.agent.pipelines[0].model
        return m.ref if m is not None else None

    def committed(self, version: str) -> bool:
        p = self.last()
        return (
            p.phase.value == "committed"
            and p.target_version == version
            and self.agent is not None
            and self.agent.updates.idle.is_set()
        )

    # --- cloud-side actions at simulated time ------------------------------------------

    def publish_and_deploy(self, day: float, full_disk: bool) -> Deploy:
        import onnx

        self.version += 1
        version = f"1.{self.version}.0"
        now = self.clock.now
        src = self.work / "src" / version
        shutil.copytree(self.models["digits"], src)
        m = onnx.load(str(src / "model.onnx"))
        m.doc_string = f"digits {version}"  # each version its own bytes and engine
        onnx.save(m, str(src / "model.onnx"))
        publish(self.repo, src / "model.onnx", name="digits", version=version, now=now)
        shutil.rmtree(src)
        t0 = time.monotonic()
        note = ""
        filler: Path | None = None
        if full_disk:
            filler = fill(self.data)
        deploy(self.repo_dir, self.broker.url, DEVICE, f"digits@{version}", pipeline="front",
               now=now)  # fmt: skip
        if filler is not None:
            saw = wait_for(lambda: "no space" in (self.last().last_error or "").lower(), 60)
            p = self.last()
            note = f"full disk: {p.phase.value}, running {self.running()}: {p.last_error}"
            self.res.full_disk = note if saw else f"never reported no space: {note}"
            filler.unlink()
        ok = wait_for(lambda: self.committed(version), self.cfg.commit_timeout_s, interval=0.1)
        p = self.last()
        store = self.agent.updates.store if self.agent is not None else None
        models = len({r.version for r in store.installed()}) if store is not None else -1
        edir = self.data / "engines"
        engines = (
            sum(1 for e in edir.iterdir() if e.is_dir() and not e.name.startswith("."))
            if edir.is_dir()
            else 0
        )
        d = Deploy(day=round(day, 2), version=version,
                   phase=p.phase.value if ok else f"NOT COMMITTED ({p.phase.value})",
                   seconds=round(time.monotonic() - t0, 2), disk_kb=du_kb(self.data),
                   models_on_disk=models, engines_on_disk=engines, note=note,
                   disk_by_dir_kb=disk_by_dir(self.data))  # fmt: skip
        if p.last_error and "expired" in p.last_error.lower():
            self.res.device_errors.append(f"day {day:.1f}: {p.last_error}")
        self.log(f"day {day:6.1f}: digits@{version} {d.phase} in {d.seconds:.1f} s; "
                 f"disk {d.disk_kb} KiB, {models} model versions, {engines} engines")  # fmt: skip
        return d

    def tick(self, day: float, last_crl_day: list[int]) -> None:
        now = self.clock.now
        ca = self.ca_fleet.ca
        # first, as a device would find it one step after the last tick: nothing expired
        for st in self.repo.freshness(now):
            hours = st.remaining.total_seconds() / 3600
            prev = self.res.min_remaining_h.get(st.role)
            self.res.min_remaining_h[st.role] = round(
                hours if prev is None else min(prev, hours), 1
            )
            if st.level == "expired":
                self.res.expired_at.append(f"day {day:.1f}: {st.message}")
        for what, when in ca.expiries().items():
            if when <= now:
                self.res.expired_at.append(f"day {day:.1f}: {what} expired {when:%Y-%m-%d}")
        with contextlib.redirect_stdout(io.StringIO()):  # serve's console lines
            resigned = self.keeper(now)
        for role in resigned:
            self.res.resigned[role] = self.res.resigned.get(role, 0) + 1
        if int(day) != last_crl_day[0]:  # the daily timer
            last_crl_day[0] = int(day)
            self.res.crl_rewrites += ca.refresh_crl(now=now)
            for what, _when, level in ca_warnings(ca, now, WARN):
                if what == "device:dev-c" and level in ("warn", "expired"):
                    # the operator renews the device's certificate (`edgefleet device renew`)
                    creds = ca.renew("dev-c", self.work / "pki/id/dev-c-renewed", now=now)
                    self.ca_fleet.creds["dev-c"] = creds
                    self.res.cert_renewals.append(round(day, 2))
                    self.log(f"day {day:6.1f}: device certificate dev-c renewed ({level})")
            if any(st.role == "root" and st.level != "ok" for st in self.repo.freshness(now)):
                # the operator re-signs root with the offline key (`registry renew-root`)
                v = self.repo.renew_root(now=now)
                self.res.root_renewals.append(round(day, 2))
                self.log(f"day {day:6.1f}: root renewed to v{v}")
        self.res.ticks += 1

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> YearResult:
        cfg = self.cfg
        wall0 = time.monotonic()
        self.broker.start()
        with small_disk(self.data, cfg.disk_mb) as mounted:
            try:
                return self._run(mounted)
            finally:
                if self.agent is not None:
                    self.agent.stop()
                self.server.stop()
                self.broker.stop()
                self.res.wall_s = round(time.monotonic() - wall0, 1)

    def _run(self, mounted: bool) -> YearResult:
        cfg = self.cfg
        end = datetime.now(timezone.utc)
        self.server.start()
        self.start_agent()
        step = timedelta(hours=cfg.step_h)
        next_publish, disk_done, last_crl_day = 0.0, False, [-1]
        while self.clock.now <= end:
            day = (self.clock.now - self.start).total_seconds() / 86400
            self.tick(day, last_crl_day)
            if self.res.revoked_day is None and day >= cfg.revoke_day:
                self.ca_fleet.ca.revoke("dev-b", now=self.clock.now)  # `edgefleet ca revoke`
                self.res.revoked_day = round(day, 2)
                self.log(f"day {day:6.1f}: dev-b revoked")
            if day >= next_publish:
                full = (mounted and not disk_done and cfg.full_disk_day is not None
                        and day >= cfg.full_disk_day)  # fmt: skip
                disk_done = disk_done or full
                self.res.deploys.append(self.publish_and_deploy(day, full))
                next_publish += cfg.publish_every_d
            self.clock.now += step
        if not mounted:
            self.res.full_disk = "skipped: a tmpfs cannot be mounted here (needs root)"
        self.clock.now = datetime.now(timezone.utc)
        self.final_tls()
        self.res.checks = self.checks(mounted)
        return self.res

    def final_tls(self) -> None:
        """At simulated = real time: the real broker, with the CA's files, decides."""
        fleet = self.ca_fleet
        fleet.write_config()
        fleet.broker.start()
        try:
            for who in ("dev-a", "dev-c", "dev-b", "svc:ingest"):
                try:
                    fleet.connect(who, cid=f"year-{who.replace(':', '-')}")
                    self.res.final_tls[who] = True
                except (ConnectionError, OSError):
                    self.res.final_tls[who] = False
        finally:
            fleet.close()

    def checks(self, mounted: bool) -> dict[str, bool]:
        r, cfg = self.res, self.cfg
        deploys = r.deploys
        max_models = max((d.models_on_disk for d in deploys), default=0)
        max_engines = max((d.engines_on_disk for d in deploys), default=0)
        # what storage GC governs: the model store and the engine cache stop growing once the
        # keep window is full (registry metadata grows ~5 KiB per published version, reported)
        kept = [d.disk_by_dir_kb.get("models", 0) + d.disk_by_dir_kb.get("engines", 0)
                for d in deploys]  # fmt: skip
        plateau = len(kept) < 4 or max(kept[3:]) <= 1.25 * max(kept[:3])
        checks = {
            "models and engines on disk stop growing after the third version": plateau,
            f"the run covered {cfg.days} days": r.ticks * cfg.step_h / 24 >= cfg.days - 1,
            "every deploy committed": bool(deploys) and all(
                d.phase == "committed" for d in deploys),
            "nothing expired at any simulated moment": r.expired_at == [],
            "the device never reported expired metadata": r.device_errors == [],
            "the keeper re-signed timestamp and snapshot": r.resigned.get("timestamp", 0) > 0
            and r.resigned.get("snapshot", 0) > 0,
            "root renewed before it expired (runs > 335 days)": bool(r.root_renewals)
            or cfg.days < 335,
            "a short device certificate was renewed in time": bool(r.cert_renewals)
            or cfg.days < cfg.short_cert_days - 30,
            f"at most {cfg.keep_engines} + 1 model versions on disk after a commit":
                max_models <= cfg.keep_engines + 1,
            f"at most {cfg.keep_engines} engines on disk after a commit":
                max_engines <= cfg.keep_engines,
            "the TLS broker admits the kept device today": r.final_tls.get("dev-a") is True,
            "the TLS broker admits the renewed device today": r.final_tls.get("dev-c") is True,
            "the TLS broker admits the ingest service today": r.final_tls.get("svc:ingest") is True,
            "the TLS broker refuses the revoked device": r.final_tls.get("dev-b") is False,
        }  # fmt: skip
        if mounted and cfg.full_disk_day is not None and cfg.full_disk_day <= cfg.days:
            checks["a full disk was waited out, not rejected"] = (
                "no space" in r.full_disk.lower()
                and not r.full_disk.startswith("never")
                and any(d.note and d.phase == "committed" for d in deploys)
            )
        return checks


def run_year(cfg: YearConfig, workdir: Path, log: Callable[[str], None] = print) -> YearResult:
    return Year(cfg, workdir, log).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--step-h", type=float, default=6.0, help="keeper tick (hours)")
    ap.add_argument("--publish-every-d", type=int, default=30)
    ap.add_argument("--revoke-day", type=int, default=150)
    ap.add_argument("--full-disk-day", type=int, default=200)
    ap.add_argument("--keep-engines", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = ap.parse_args(argv)
    cfg = YearConfig(days=args.days, step_h=args.step_h, publish_every_d=args.publish_every_d,
                     revoke_day=args.revoke_day, full_disk_day=args.full_disk_day,
                     keep_engines=args.keep_engines)  # fmt: skip
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-year-"))
    res = run_year(cfg, work, log=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(asdict(res), indent=1, default=str))
    else:
        print(
            f"\n{res.days} days in {res.wall_s} s of real time; {res.ticks} keeper ticks; "
            f"re-signed {res.resigned}; CRL rewritten {res.crl_rewrites} times; root renewed "
            f"on days {res.root_renewals}; dev-c renewed on days {res.cert_renewals}"
        )
        print(f"closest to expiry (hours left, per role): {res.min_remaining_h}")
        print(f"full disk: {res.full_disk}")
        print(f"TLS at the end: {res.final_tls}")
        for name, ok in res.checks.items():
            print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if res.checks and all(res.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
