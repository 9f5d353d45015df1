"""Adapter: ``edgefleet ingest`` and ``edgefleet fleet status|counts|retention``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent.protocol.topics import DEFAULT_ROOT
from cloud_sync.secrets import redact_url, resolve_db_url
from cloud_sync.units import argparse_type, parse_duration

DEFAULT_DB = "sqlite:///edgefleet.db"
PARTITIONS_EVERY_S = 3600.0  # ingest checks the days ahead have partitions this often
DURATION = argparse_type(parse_duration)
DB_HELP = (
    "sqlite:///file or postgresql+psycopg://…; default: the systemd credential db-url, else "
    f"EDGEFLEET_DB, else {DEFAULT_DB} (keeps a password off the command line)"
)


def db_url(args: argparse.Namespace) -> str:
    """``--db``, else the ``db-url`` credential, else ``EDGEFLEET_DB`` (read at start-up)."""
    return resolve_db_url(args.db, DEFAULT_DB)


def add_ingest_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ing = sub.add_parser("ingest", help="store device state, telemetry and events in a database")
    ing.add_argument("--broker", required=True, help="mqtt://host:port")
    ing.add_argument("--db", default=None, help=DB_HELP)
    ing.add_argument("--topic-root", default=DEFAULT_ROOT)
    ing.add_argument("--worker", default="1", help="worker name (run several to scale out)")
    ing.add_argument("--share-group", default=None, metavar="NAME",
                     help="the workers' shared-subscription group (default: the deployment's, "
                          "from share-group next to EDGEFLEET_TLS_CERT, else 'ingest'); 'none': "
                          "one worker on plain subscriptions (kept across Mosquitto 2.0 "
                          "restarts)")  # fmt: skip
    ing.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    ing.add_argument("--volume-only", action="store_true",
                     help="take only telemetry, events and snapshots; leave state and reported"
                          " to the group's other workers (run one or two without it)")  # fmt: skip
    ing.add_argument("--metrics-addr", default="127.0.0.1", help="address for the metrics port")
    ing.add_argument("--http", type=int, default=None, metavar="PORT",
                     help="serve the fleet web page on this port")  # fmt: skip
    ing.add_argument("--http-addr", default="127.0.0.1", help="address for the web page")
    ing.add_argument("--keep", type=DURATION, default=None, metavar="DURATION",
                     help="retention: delete telemetry, events and dead letters older than this "
                          "(e.g. 30d), checked every --retention-every; on PostgreSQL by whole "
                          "days (day partitions dropped)")  # fmt: skip
    ing.add_argument("--retention-every", type=DURATION, default=3600.0, metavar="DURATION",
                     help="how often to apply --keep (default 1h)")  # fmt: skip
    ing.add_argument("--max-unacked", type=int, default=10_000, metavar="N",
                     help="messages received and not yet stored, at most; then the worker stops "
                          "reading and the broker keeps the rest (default 10000)")  # fmt: skip
    ing.add_argument("--max-unacked-mb", type=float, default=64.0, metavar="MB",
                     help="the same bound in MiB (default 64)")  # fmt: skip
    ing.add_argument("--dead-letter-bytes", type=int, default=4096, metavar="N",
                     help="bytes of a refused payload kept in dead_letters, with its length and "
                          "SHA-256 (default 4096)")  # fmt: skip
    ing.set_defaults(fn=_ingest)

    fleet = sub.add_parser("fleet", help="fleet state from the ingest database")
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True)
    st = fsub.add_parser("status", help="one row per device")
    st.add_argument("--db", default=None, help=DB_HELP)
    st.add_argument(
        "--repo",
        type=Path,
        default=None,
        help="also warn about registry metadata near expiry (registry directory)",
    )
    st.add_argument(
        "--ca",
        type=Path,
        default=None,
        help="also warn about certificates and the CRL near expiry (CA directory)",
    )
    st.add_argument("--warn-days", type=int, default=30, help="warn this far ahead")  # fmt: skip
    st.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="filter")
    st.add_argument("--json", action="store_true", help="print a JSON list")
    st.add_argument("--watch", type=float, default=None, metavar="S", help="refresh every S s")
    st.set_defaults(fn=_fleet_status)
    ct = fsub.add_parser("counts", help="zone and line counts per device (contract 1.1 agents)")
    ct.add_argument("--db", default=None, help=DB_HELP)
    ct.add_argument("--device", default=None, metavar="ID", help="one device only")
    ct.add_argument("--since", type=DURATION, default=None, metavar="DURATION",
                    help="also show how much each count grew in this window, e.g. 1h (agent "
                         "restarts, which start counts from zero, are handled)")  # fmt: skip
    ct.add_argument("--json", action="store_true", help="print a JSON list")
    ct.set_defaults(fn=_fleet_counts)
    rt = fsub.add_parser("retention", help="delete history older than --keep, once")
    rt.add_argument("--db", default=None, help=DB_HELP)
    rt.add_argument("--keep", type=DURATION, required=True, metavar="DURATION",
                    help="history to keep, e.g. 30d (devices and current state stay)")  # fmt: skip
    rt.set_defaults(fn=_retention)


def apply_retention(store: Any, keep_s: float) -> dict[str, int]:
    """Delete history older than ``keep_s`` seconds and print what went."""
    from datetime import datetime, timedelta, timezone

    cut = datetime.now(timezone.utc) - timedelta(seconds=keep_s)
    counts: dict[str, int] = store.retention(cut)
    print(f"retention: deleted rows older than {cut.isoformat(timespec='seconds')}: {counts}",
          flush=True)  # fmt: skip
    return counts


def _retention(args: argparse.Namespace) -> int:
    from cloud_sync.ingest.store import open_store

    store = open_store(db_url(args))
    try:
        apply_retention(store, args.keep)
    finally:
        store.close()
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from agent.common.errors import TransportError
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import SHARE_GROUP, IngestWorker, freeze_startup_heap
    from cloud_sync.pki import service_share_group

    store = open_store(db_url(args))
    share = args.share_group or service_share_group(SHARE_GROUP)
    worker = IngestWorker(
        args.broker, store, topic_root=args.topic_root, client_id=f"edgefleet-ingest-{args.worker}",
        share_group=None if share == "none" else share, control=not args.volume_only,
        max_unacked=args.max_unacked, max_unacked_bytes=int(args.max_unacked_mb * 2**20),
        dead_letter_keep=args.dead_letter_bytes,
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    freeze_startup_heap()
    worker.start()
    if args.metrics_port is not None:
        from cloud_sync.ingest.metrics import serve_metrics

        serve_metrics(worker, args.metrics_port, args.metrics_addr)
        print(f"metrics on http://{args.metrics_addr}:{args.metrics_port}/metrics", flush=True)
    print(f"ingesting from {args.broker} into {redact_url(db_url(args))}; Ctrl-C stops",
          flush=True)  # fmt: skip
    web = None
    try:
        if args.http is not None:
            from cloud_sync.ingest.web import serve_web

            web = serve_web(store, args.http, args.http_addr)
            print(f"fleet page on http://{args.http_addr}:{args.http}/", flush=True)
        next_retention = next_partitions = time.monotonic()
        while True:
            if time.monotonic() >= next_partitions:  # PostgreSQL: the days ahead exist
                next_partitions = time.monotonic() + PARTITIONS_EVERY_S
                try:
                    store.maintain_partitions()
                except TransportError as e:
                    print(f"partition maintenance postponed: {e}", flush=True)
            if args.keep is not None and time.monotonic() >= next_retention:
                try:
                    apply_retention(store, args.keep)
                except TransportError as e:  # database briefly gone: try again next round
                    print(f"retention postponed: {e}", flush=True)
                next_retention = time.monotonic() + args.retention_every
            if stop.wait(10):
                break
            if worker.error is not None:  # a bug ended the writer: exit, the unit restarts us
                print(f"ingest writer died: {worker.error!r}", flush=True)
                return 1
            print(f"ingest counts: {dict(worker.counts)}; unacknowledged "
                  f"{worker.backlog()}", flush=True)  # fmt: skip
    finally:
        if web is not None:
            web.stop()
        worker.stop()
        store.close()
    return 0


def _row(d: dict[str, Any]) -> list[str]:
    lines = []
    seen = d.get("last_seen")
    head = f"{d['device_id']:<16} {'online' if d.get('online') else 'OFFLINE':<8} {seen or '-'}"
    for p in d.get("pipelines") or [{}]:
        model = f"{p.get('model')}@{p.get('version')}" if p.get("model") else "-"
        fps = f"{p['fps']:.1f}" if isinstance(p.get("fps"), (int, float)) else "-"
        p95 = f"{p['p95_ms']:.1f}" if isinstance(p.get("p95_ms"), (int, float)) else "-"
        lines.append(
            f"{head}  {p.get('name', '-'):<10} {model:<20} {p.get('phase') or '-':<11} "
            f"fps {fps:>6}  p95 {p95:>7} ms  errors {p.get('errors', '-')}"
        )
        head = " " * len(head)
        notes = [f"waits: {p['waiting']}"] if p.get("waiting") else []
        notes += ["source ended"] if p.get("source_ended") else []
        lines += [f"{head}  {p.get('name', '-'):<10} {n}" for n in notes]
    config = config_summary(d.get("config"))
    if config:
        lines.append(f"{' ' * len(head)}  config {config}")
    return lines


def config_summary(c: dict[str, Any] | None) -> str:
    """``1a2b3c4d5e6f applied`` / ``local file; last 9f86d081884c rejected: why``: the hash
    running (12 hex digits) and how the last remote configuration went; '' when none reported.
    Never the document (it may hold sealed secrets)."""
    if not c:
        return ""
    running = c["hash"][:12] if c.get("hash") else "local file"
    status, target = c.get("status"), c.get("target_hash")
    if not status:
        return running
    if target and target == c.get("hash"):
        out = f"{running} {status}"
    else:
        out = f"{running}; last {target[:12] if target else '-'} {status}"
    return out + (f": {c['reason']}" if c.get("reason") else "")


def expiry_warnings(repo: Path | None, ca: Path | None, warn_days: int) -> list[dict[str, str]]:
    """What in the registry (``repo``) and the CA (``ca``) expires within ``warn_days`` or has
    expired: ``{"component", "what", "level", "expires", "message"}`` each, worst first."""
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    out: list[dict[str, str]] = []
    if repo is not None:
        from cloud_sync.registry.repo import Repository

        for st in Repository(repo).freshness(now):
            if st.level != "ok":
                out.append({"component": "registry", "what": st.role, "level": st.level,
                            "expires": st.expires.isoformat(), "message": st.message})  # fmt: skip
    if ca is not None:
        from cloud_sync.enroll import ca_warnings
        from cloud_sync.pki import FleetCA

        for what, exp, level in ca_warnings(FleetCA(ca), now, timedelta(days=warn_days)):
            if level != "ok":
                left = exp - now
                msg = (
                    f"expired {exp:%Y-%m-%d}"
                    if level == "expired"
                    else f"expires {exp:%Y-%m-%d} ({left.days} d left); `edgefleet ca status`"
                )
                out.append({"component": "ca", "what": what, "level": level,
                            "expires": exp.isoformat(), "message": msg})  # fmt: skip
    return sorted(out, key=lambda w: (w["level"] != "expired", w["expires"]))


def _fleet_counts(args: argparse.Namespace) -> int:
    from datetime import datetime, timedelta, timezone

    from cloud_sync.ingest.counts_view import format_counts, merge_counts
    from cloud_sync.ingest.store import open_store
    from cloud_sync.units import format_duration

    store = open_store(db_url(args))
    try:
        latest = store.latest_counts(args.device)
        increase = None
        if args.since is not None:
            since = datetime.now(timezone.utc) - timedelta(seconds=args.since)
            increase = store.count_increase(since, args.device)
    finally:
        store.close()
    rows = merge_counts(latest, increase)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        window = None if args.since is None else format_duration(args.since)
        print(format_counts(rows, window))
    return 0


def _fleet_status(args: argparse.Namespace) -> int:
    from cloud_sync.ingest.store import open_store

    tags = dict(t.split("=", 1) for t in args.tag if "=" in t)
    store = open_store(db_url(args))
    try:
        while True:
            fleet = store.fleet(tag_filter=tags or None)
            warnings = expiry_warnings(args.repo, args.ca, args.warn_days)
            if args.json:
                if args.repo is None and args.ca is None:
                    print(json.dumps(fleet, indent=2, default=str))
                else:
                    out = {"devices": fleet, "warnings": warnings}
                    print(json.dumps(out, indent=2, default=str))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                for w in warnings:
                    print(f"{w['level'].upper()}: {w['component']} {w['what']}: {w['message']}")
                for d in fleet:
                    print("\n".join(_row(d)))
                if not fleet:
                    print("no devices yet")
            if not args.watch:
                return 0
            time.sleep(args.watch)
    finally:
        store.close()
