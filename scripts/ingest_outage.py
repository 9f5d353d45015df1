"""Scenario: a long database outage under ``edgefleet ingest`` loses no acknowledged message.

Runs ``tests.harness.outage.outage_run`` (the same scenario
``tests/cloud_sync/ingest/test_ingest_backpressure.py``
runs for seconds) for as long as asked: a real Mosquitto on a loopback port, ``edgefleet
ingest`` as a child process, simulated devices publishing telemetry QoS 1 at ``--rate``
messages/s in all, and a real database outage of ``--outage-s`` (default one hour): SQLite
with another connection holding the write lock, or a PostgreSQL server of its own refusing
connections to the database. With ``--kill`` (default) the worker is SIGKILLed halfway through
the outage and started again once the database is back.

Reports messages published, acknowledged by the broker to the devices, stored (distinct and
rows), missing, the worker's peak RSS and unacknowledged messages per phase (before, outage,
after), and the time to catch up. Passes when nothing the broker acknowledged is missing and
the unacknowledged window never exceeded ``--max-unacked``.

The broker's queue for the worker's session is sized for the whole outage
(``max_queued_messages`` = rate x (outage + after + 60 s) x 1.2): a broker that drops what it
cannot queue loses messages that no ingest worker ever saw.

    python -m scripts.ingest_outage [--outage-s 3600] [--db sqlite|postgresql] [--rate 100]
        [--devices 100] [--max-unacked 10000] [--no-kill] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.harness.broker import Mosquitto
from tests.harness.outage import (
    Outage,
    PostgresRefuses,
    SqliteLock,
    outage_run,
)


def say(line: str, to_stderr: bool) -> None:
    print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outage-s", type=float, default=3600.0, help="database down time")
    ap.add_argument("--before-s", type=float, default=10.0, help="steady state before it")
    ap.add_argument("--after-s", type=float, default=30.0, help="publishing after it")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--rate", type=float, default=100.0, help="messages/s from all devices")
    ap.add_argument("--max-unacked", type=int, default=10_000, help="the worker's window")
    ap.add_argument("--no-kill", action="store_true", help="do not SIGKILL the worker")
    ap.add_argument("--drain-s", type=float, default=1800.0, help="catch-up time allowed")
    ap.add_argument("--json", action="store_true", help="JSON on stdout, lines on stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="ingest-outage-"))
    pg: Any = None
    (tmp / "broker").mkdir()
    broker = Mosquitto(tmp / "broker")
    queued = int(args.rate * (args.outage_s + args.after_s + 60) * 1.2) + args.max_unacked
    conf = broker.conf.read_text().replace(
        "max_queued_messages 100000", f"max_queued_messages {queued}"
    )
    broker.conf.write_text(conf)
    try:
        broker.start()
        outage: Outage
        if args.db == "sqlite":
            outage = SqliteLock(tmp / "ingest.db")
        else:
            from tests.harness.postgres import Postgres

            pg = Postgres()
            pg.start()
            outage = PostgresRefuses(pg.new_database())
        from cloud_sync.ingest.store import open_store

        open_store(outage.url).close()
        result = outage_run(
            broker.url, outage, tmp, devices=args.devices, rate_hz=args.rate,
            before_s=args.before_s, outage_s=args.outage_s, after_s=args.after_s,
            max_unacked=args.max_unacked, kill=not args.no_kill, drain_s=args.drain_s,
            say=lambda line: say(line, args.json),
        )  # fmt: skip
    finally:
        broker.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["db"] = args.db
    result["broker_max_queued_messages"] = queued
    bounded = all(p["unacked"] <= args.max_unacked for p in result["peaks"].values())
    result["pass"] = result["missing"] == 0 and result["caught_up"] and bounded
    peaks = ", ".join(
        f"{phase}: RSS {p['rss_mb']:.0f} MB, unacked {p['unacked']:.0f}"
        for phase, p in result["peaks"].items()
    )
    say(
        f"{args.db} outage {args.outage_s:g} s at {args.rate:g} msg/s"
        f"{' (worker killed halfway)' if not args.no_kill else ''}: published "
        f"{result['published']}, acknowledged by the broker {result['acknowledged_by_broker']}, "
        f"stored {result['stored']} ({result['stored_rows']} rows), missing {result['missing']}; "
        f"caught up {result['drain_s']} s after the database came back; peaks {peaks}: "
        f"{'PASS' if result['pass'] else 'FAIL'}",
        args.json,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
