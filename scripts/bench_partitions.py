"""Benchmark: retention by dropping day partitions against DELETE, on PostgreSQL.

Two databases on one throw-away PostgreSQL server (Debian's binaries, the test harness's:
``fsync=off``): one at the latest schema (telemetry tables partitioned by day), one stopped at
schema 10 (plain tables, as before). The same ``--days`` days of telemetry, ``--messages``
messages a day from ``--devices`` devices (2 pipeline rows and 1 device row each), are written
into both through the store's batch path (``add_telemetry_batch``, 500 messages a batch, the
batches alternating between the databases so both see the same machine load); ``--bulk``
adds server-made rows to each day, for sizes the store path is too slow to write here. Then
retention of the oldest ``--drop`` days runs on both: ``DROP TABLE`` of whole days against
``DELETE`` (and the ``VACUUM`` that a ``DELETE`` leaves to do). Reports the times, their
ratios and the row counts (which must be the same)::

    python -m scripts.bench_partitions --days 6 --messages 10000 --drop 3 [--bulk 1000000]

Ratios against a baseline in the same run carry over between machines; the seconds do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

BATCH = 500  # the ingest worker's batch size


def messages(day: datetime, n: int, devices: int) -> list[dict[str, Any]]:
    """``n`` telemetry messages spread over ``day`` from ``devices`` devices."""
    from tests.harness.ingest_messages import telemetry

    step = 86_400 / max(1, n)
    return [telemetry(f"cam-{i % devices}", day + timedelta(seconds=step * i)) for i in range(n)]


def write(
    stores: dict[str, Any], days: list[datetime], args: argparse.Namespace
) -> dict[str, float]:
    """Write every day's messages into each store, batch by batch in turn; seconds each."""
    took = dict.fromkeys(stores, 0.0)
    for day in days:
        msgs = messages(day, args.messages, args.devices)
        for i in range(0, len(msgs), BATCH):
            for name, store in stores.items():
                t = time.perf_counter()
                store.add_telemetry_batch(msgs[i : i + BATCH], now=day)
                took[name] += time.perf_counter() - t
    return took


def bulk(stores: dict[str, Any], days: list[datetime], rows: int, devices: int) -> None:
    """``rows`` more telemetry rows a day (and half as many device rows) into each store, made
    by the server (``generate_series``): retention at sizes the store path takes too long to
    write on a small machine. The same rows in each."""
    tele = (
        "INSERT INTO telemetry (device_id, ts, pipeline, fps_in, fps_out, p95_ms)"
        " SELECT 'bulk-' || (g % :devices), CAST(:day AS timestamptz)"
        " + (g * 86400.0 / :n) * interval '1 second', 'front', 30, 25, 12.5"
        " FROM generate_series(0, :n - 1) AS g"
    )
    dev = (
        "INSERT INTO device_telemetry (device_id, ts, cpu_percent, mem_used_mb)"
        " SELECT 'bulk-' || (g % :devices), CAST(:day AS timestamptz)"
        " + (g * 86400.0 / :n) * interval '1 second', 50, 900"
        " FROM generate_series(0, :n - 1) AS g"
    )
    for store in stores.values():
        with store.engine.begin() as c:
            for day in days:
                c.execute(sa.text(tele), {"day": day, "n": rows, "devices": devices})
                c.execute(sa.text(dev), {"day": day, "n": rows // 2, "devices": devices})


def vacuum(store: Any) -> float:
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        t = time.perf_counter()
        c.execute(sa.text("VACUUM telemetry, device_telemetry"))
        return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cloud_sync.ingest.db import make_engine
    from cloud_sync.ingest.partitions import ensure
    from cloud_sync.ingest.schema import LATEST, migrate
    from cloud_sync.ingest.store import Store
    from tests.harness.postgres import Postgres

    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    days = [today - timedelta(days=args.days - i) for i in range(args.days)]
    pg = Postgres()
    try:
        pg.start()
        engines = {"partitioned": make_engine(pg.new_database()),
                   "plain": make_engine(pg.new_database())}  # fmt: skip
        migrate(engines["partitioned"])
        migrate(engines["plain"], upto=10)
        ensure(engines["partitioned"], days[0], days_ahead=args.days + 1)
        stores = {k: Store(e) for k, e in engines.items()}
        took = write(stores, days, args)
        if args.bulk:
            bulk(stores, days, args.bulk, args.devices)
            for e in engines.values():
                with e.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.execute(sa.text("VACUUM ANALYZE"))  # both start clean
        cut = days[args.drop]
        res: dict[str, Any] = {}
        for name, store in stores.items():
            t = time.perf_counter()
            counts = store.retention(cut)
            res[name] = {"write_s": round(took[name], 3), "retention_s": time.perf_counter() - t,
                         "deleted": counts, "rows_left": store.counts()["telemetry"]}  # fmt: skip
            res[name]["vacuum_s"] = vacuum(store)
        for e in engines.values():
            e.dispose()
    finally:
        pg.stop()
    part, plain = res["partitioned"], res["plain"]
    msgs = args.days * args.messages
    return {
        "schema": LATEST,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg()[0],
        "days": args.days,
        "messages_per_day": args.messages,
        "dropped_days": args.drop,
        "rows_per_day": {
            "telemetry": 2 * args.messages + args.bulk,
            "device_telemetry": args.messages + args.bulk // 2,
        },
        "write_msgs_per_s": {k: round(msgs / v["write_s"]) for k, v in res.items()},
        "write_rate_partitioned_over_plain": round(plain["write_s"] / part["write_s"], 3),
        "retention_s": {k: round(v["retention_s"], 4) for k, v in res.items()},
        "retention_delete_over_drop": round(plain["retention_s"] / part["retention_s"], 1),
        "vacuum_after_s": {k: round(v["vacuum_s"], 4) for k, v in res.items()},
        "retention_and_vacuum_delete_over_drop": round(
            (plain["retention_s"] + plain["vacuum_s"]) / (part["retention_s"] + part["vacuum_s"]),
            1,
        ),
        "deleted": part["deleted"],
        "same_counts": part["deleted"] == plain["deleted"]
        and part["rows_left"] == plain["rows_left"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--days", type=int, default=6, help="days of telemetry written")
    p.add_argument("--messages", type=int, default=10_000, help="telemetry messages a day")
    p.add_argument("--bulk", type=int, default=0, metavar="ROWS",
                   help="more telemetry rows a day made by the server (half as many device "
                        "rows), for retention at size")  # fmt: skip
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--drop", type=int, default=3, help="oldest days retention removes")
    args = p.parse_args(argv)
    if not 0 < args.drop < args.days:
        p.error("--drop must be between 1 and --days - 1")
    logging.basicConfig(level=logging.ERROR)
    out = run(args)
    print(json.dumps(out, indent=2))
    return 0 if out["same_counts"] else 1


if __name__ == "__main__":
    sys.exit(main())
