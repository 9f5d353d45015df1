"""Adapter: ``edgefleet rollout …`` — start, controller, status, pause, resume, promote, abort."""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.common.errors import BadDataError
from agent.protocol.topics import DEFAULT_ROOT
from cloud_sync.ingest.commands import DB_HELP
from cloud_sync.ingest.commands import db_url as _db
from cloud_sync.secrets import redact_url
from cloud_sync.units import argparse_type as _arg


def _soak(text: str) -> float:
    from cloud_sync.units import parse_duration

    return 0.0 if text.strip() in ("0", "0s") else parse_duration(text)


def _target(text: str) -> str:
    from cloud_sync.rollout.target import parse_target

    parse_target(text)
    return text


def _stage(text: str) -> str:
    from cloud_sync.rollout.stages import parse_stage

    parse_stage(text)
    return text


def _gate(text: str) -> str:
    from cloud_sync.rollout.gates import parse_gate

    parse_gate(text)
    return text


def add_rollout_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``edgefleet rollout`` and its subcommands."""
    ro = sub.add_parser("rollout", help="staged rollouts of a model version or a configuration")
    rsub = ro.add_subparsers(dest="rollout_cmd", required=True)
    _add_start(rsub)
    c = rsub.add_parser("controller", help="drive every active rollout (long-running)")
    _common(c, broker=True)
    c.add_argument("--every", type=float, default=5.0, metavar="S", help="tick interval (s)")
    _lease_arg(c)
    c.set_defaults(fn=_controller)
    st = rsub.add_parser("status", help="one rollout in detail, or all of them")
    st.add_argument("id", nargs="?", default=None, metavar="ID")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--db", default=None, help=DB_HELP)
    st.set_defaults(fn=_status)
    for name, what in (
        ("pause", "stop sending updates (outcomes are still tracked)"),
        ("resume", "go on (after a gate paused it: accept that stage's failing gates)"),
        ("promote", "skip the rest of the current soak"),
        ("abort", "stop for good and revert every touched device"),
    ):
        p = rsub.add_parser(name, help=what)
        p.add_argument("id", metavar="ID")
        _common(p, broker=name == "abort")
        p.add_argument("--why", default="operator", help="reason, kept in the history")
        p.set_defaults(fn=_command, command=name)


def _lease_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-s", type=float, default=None, metavar="S",
                   help="controller lease length: one controller acts at a time; another "
                        "takes over this long after it dies (default 3 ticks)")  # fmt: skip


def _common(p: argparse.ArgumentParser, *, broker: bool) -> None:
    p.add_argument("--db", default=None, help=DB_HELP)
    if broker:
        p.add_argument("--repo", required=True, help="registry directory")
        p.add_argument("--broker", required=True, help="mqtt://host:port")
        p.add_argument("--topic-root", default=DEFAULT_ROOT)


def _add_start(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = rsub.add_parser("start", help="record a rollout and drive it (unless --detach)")
    s.add_argument("ref", metavar="NAME@VERSION", nargs="?", default=None,
                   help="model version to roll out (or --config)")  # fmt: skip
    s.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="roll out these [[pipelines]] tables instead of a model")  # fmt: skip
    s.add_argument("--secret", action="append", default=[], metavar="NAME=@FILE|NAME=env:VAR",
                   help="value of ${secret:NAME} in --config, sealed per device")  # fmt: skip
    s.add_argument("--ca", type=Path, default=None, metavar="DIR",
                   help="fleet CA directory (enrolled keys), to seal secrets")  # fmt: skip
    s.add_argument("--target", required=True, type=_arg(_target),
                   help="devices: '*', 'cam-1', 'group:lobby & !tag:site=berlin', …")  # fmt: skip
    s.add_argument("--pipeline", default=None, help="pipeline to update (default: all)")
    s.add_argument("--stage", action="append", default=[], type=_arg(_stage), metavar="STAGE",
                   help="cumulative '5%%' or device count (repeat; 100%% is added)")  # fmt: skip
    s.add_argument("--soak", type=_arg(_soak), default=600.0, metavar="DURATION",
                   help="watch each stage this long before its gates (default 10m)")  # fmt: skip
    s.add_argument("--gate", action="append", default=[], type=_arg(_gate), metavar="GATE",
                   help="e.g. 'failures<2%%', 'error_rate<1%%', 'p95_latency<+20%%'")  # fmt: skip
    s.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="online devices updating at once")  # fmt: skip
    s.add_argument("--on-fail", choices=["pause", "rollback"], default="pause")
    s.add_argument("--id", default=None, help="rollout id (default: NAME-VERSION-TIME)")
    s.add_argument("--detach", action="store_true",
                   help="only record it; `edgefleet rollout controller` drives it")  # fmt: skip
    s.add_argument("--every", type=float, default=2.0, metavar="S", help="tick interval (s)")
    _lease_arg(s)
    _common(s, broker=True)
    s.set_defaults(fn=_start)


# --- commands ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _spec(args: argparse.Namespace, now: datetime, config: Any = None) -> Any:
    from pydantic import ValidationError

    from agent.protocol.wire import describe_validation_error
    from cloud_sync.deploy import parse_ref
    from cloud_sync.rollout.state import RolloutSpec

    if (args.ref is None) == (config is None):
        raise BadDataError("give a model version NAME@VERSION or --config FILE (one of them)")
    ref = parse_ref(args.ref) if config is None else None
    what = f"{ref.model}-{ref.version}" if ref else f"config-{config.hash[:12]}"
    rid = args.id or re.sub(r"[^A-Za-z0-9_.-]", "-", what)[:48] + f"-{now:%Y%m%d-%H%M%S}"
    try:
        return RolloutSpec(
            id=rid, model=ref.model if ref else None, version=ref.version if ref else None,
            config=config,
            pipeline=args.pipeline,
            target=args.target, stages=tuple(args.stage), soak_s=args.soak,
            gates=tuple(args.gate), max_concurrent=args.max_concurrent, on_fail=args.on_fail,
        )  # fmt: skip
    except ValidationError as e:
        raise BadDataError(f"bad rollout: {describe_validation_error(e)}") from None


def _start(args: argparse.Namespace) -> int:
    from cloud_sync.deploy import check_published
    from cloud_sync.ingest.store import open_store
    from cloud_sync.registry.repo import Repository
    from cloud_sync.rollout import db
    from cloud_sync.rollout.commands import start

    now = _now()
    if args.config is None and (args.secret or args.ca):
        raise BadDataError("--secret and --ca go with --config")
    store = open_store(_db(args))
    try:
        spec = _spec(args, now, _config(args, store, now) if args.config else None)
        if spec.config is None:
            check_published(Repository(Path(args.repo)), [spec.ref])
        row = db.create(store, spec, start(spec, now), now)
        print(row.state.history[-1].message, flush=True)
        if args.detach:
            shown = redact_url(_db(args))
            print(f"recorded; `edgefleet rollout controller --db {shown} --repo {args.repo} "
                  f"--broker {args.broker}` drives it", flush=True)  # fmt: skip
            return 0
        return _drive(args, store, spec.id)
    finally:
        store.close()


def _config(args: argparse.Namespace, store: Any, now: datetime) -> Any:
    """The ``--config`` file checked (and sealed), before anything is recorded or published."""
    from cloud_sync.rollout.config_start import load_rollout_config

    def skip(device_id: str, why: str) -> None:
        print(f"  {device_id}: left out, cannot seal for it: {why}", flush=True)

    config = load_rollout_config(
        args.config, args.secret, store=store, target=args.target, ca_dir=args.ca, now=now,
        on_skip=skip,
    )  # fmt: skip
    sealed = f"; secrets {list(config.secrets)} sealed for {len(config.sealed)} devices"
    print(f"configuration {args.config.name} checked: {config.hash[:12]}"
          f"{sealed if config.secrets else ''}", flush=True)  # fmt: skip
    return config


def _stopper() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    return stop


def _drive(args: argparse.Namespace, store: Any, rollout_id: str) -> int:
    """Tick one rollout in the foreground until it ends or pauses; print each change."""
    from cloud_sync.ingest.db import StoreUnavailable
    from cloud_sync.rollout import db
    from cloud_sync.rollout.report import progress_line

    leader = _leased(args, store, lambda m: print(f"  {m}", flush=True))
    stop = _stopper()
    shown, shown_at = "", 0.0
    try:
        while True:
            now = _now()
            try:
                for res in leader.tick(now):  # holding the lease, it drives every rollout
                    if res.error:
                        print(f"  retrying: {res.error}", flush=True)
                row = db.get(store, rollout_id)
            except StoreUnavailable as e:
                print(f"  retrying: {e}", flush=True)
                if stop.wait(args.every):
                    return 130
                continue
            line = progress_line(row.spec, row.state, now)
            changed = _SOAK.sub("", line) != _SOAK.sub("", shown)
            if changed or ("soak" in line and now.timestamp() - shown_at >= 10):
                print(line, flush=True)
                shown, shown_at = line, now.timestamp()
            if row.state.status != "running":
                return _final(row.spec.id, row.state.status, config=row.spec.config is not None)
            if stop.wait(args.every):
                print(f"stopped; rollout {rollout_id} stays {row.state.status}: "
                      "`edgefleet rollout controller` goes on with it", flush=True)  # fmt: skip
                return 130
    finally:
        leader.close()


_SOAK = re.compile(r"; soak \d+s left")


def _final(rollout_id: str, status: str, *, config: bool = False) -> int:
    """Exit code of a foreground rollout (0 only when completed), with what to do next."""
    if status == "paused":
        # a configuration rollout has nothing to revert: each device kept what worked for it
        abort = "stops it (configuration rollouts do not revert)" if config else "reverts"
        print(f"rollout {rollout_id} paused: `edgefleet rollout resume {rollout_id}` goes on "
              f"(accepting a failed gate), `edgefleet rollout abort {rollout_id}` {abort}",
              flush=True)  # fmt: skip
    return 0 if status == "completed" else 1


def _leased(args: argparse.Namespace, store: Any, say: Any) -> Any:
    """A ``LeasedController``: the rollout controller that acts only holding the lease."""
    from cloud_sync.rollout.controller import RolloutController
    from cloud_sync.rollout.leader import LeasedController
    from cloud_sync.rollout.lease import lease_seconds
    from cloud_sync.rollout.lease_db import ControllerLease

    try:
        ttl = lease_seconds(args.every, args.lease_s)
    except ValueError as e:
        raise BadDataError(str(e)) from None
    lease = ControllerLease(store, ttl)
    ctl = RolloutController(store, Path(args.repo), args.broker, topic_root=args.topic_root,
                            on_log=say, lease=lease)  # fmt: skip
    return LeasedController(ctl, lease, say=say)


def _controller(args: argparse.Namespace) -> int:
    from cloud_sync.ingest.store import open_store

    store = open_store(_db(args))
    try:
        leader = _leased(args, store, lambda m: print(m, flush=True))
        stop = _stopper()
        print(f"rollout controller {leader.lease.label} on {redact_url(_db(args))}, ticking "
              f"every {args.every:g}s, lease {leader.lease.ttl_s:g}s; SIGTERM stops",
              flush=True)  # fmt: skip
        leader.run(stop, every_s=args.every)
    finally:
        store.close()
    print("rollout controller stopped", flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    from cloud_sync.ingest.store import open_store
    from cloud_sync.rollout import db, lease_db
    from cloud_sync.rollout.lease import describe
    from cloud_sync.rollout.report import progress_line, summary

    store = open_store(_db(args))
    try:
        now = _now()
        rows = [db.get(store, args.id)] if args.id else db.list_rollouts(store)
        lease, db_now = lease_db.read(store)
    finally:
        store.close()
    if args.json:
        out = [summary(r.spec, r.state, now) for r in rows]
        print(json.dumps(out[0] if args.id else out, indent=2, default=str))
        return 0
    print(describe(lease, db_now))
    if not rows:
        print("no rollouts")
    for r in rows:
        print(progress_line(r.spec, r.state, now))
        if args.id and r.spec.config is not None:
            for line in _config_devices(args, r):
                print(f"  {line}")
        if args.id:
            for e in r.state.history[-15:]:
                print(f"  {e.at:%Y-%m-%d %H:%M:%S} {e.kind}: {e.message}")
    return 0


def _config_devices(args: argparse.Namespace, row: Any) -> list[str]:
    from cloud_sync.ingest.store import open_store
    from cloud_sync.rollout.report import config_devices
    from cloud_sync.rollout.snapshot import SnapshotReader

    store = open_store(_db(args))
    try:
        now = _now()
        fleet = SnapshotReader(store).read(now, now, metrics=False)
    finally:
        store.close()
    return config_devices(row.spec, row.state, fleet)


def _command(args: argparse.Namespace) -> int:
    from cloud_sync.ingest.store import open_store
    from cloud_sync.rollout import db
    from cloud_sync.rollout.controller import COMMANDS, RolloutController
    from cloud_sync.rollout.report import progress_line

    store = open_store(_db(args))
    try:
        if args.command == "abort":
            ctl = RolloutController(store, Path(args.repo), args.broker,
                                    topic_root=args.topic_root)  # fmt: skip
            try:
                row = ctl.command(args.id, "abort", why=args.why)
            finally:
                ctl.close()
        else:
            row = db.get(store, args.id)
            try:
                decision = COMMANDS[args.command](row, _now(), args.why)
            except ValueError as e:
                raise BadDataError(f"rollout {args.id}: {e}") from None
            row = db.save(store, row, decision.new_state, _now())
        print(row.state.history[-1].message)
        print(progress_line(row.spec, row.state, _now()))
    finally:
        store.close()
    return 0
