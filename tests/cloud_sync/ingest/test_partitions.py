"""Day partitions of the time series on a real PostgreSQL server (docs/scaling.md): routing,
the default partition, migration 11 with data, maintenance by several processes, retention by
dropping days, and partition pruning. SQLite stays one table each (last test)."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.partitions import (
    DAYS_AHEAD,
    PARTITIONED,
    day_partition,
    day_partitions,
    default_partition,
)
from cloud_sync.ingest.schema import LATEST, migrate
from cloud_sync.ingest.store import Store, open_store
from tests.harness.broker import Mosquitto
from tests.harness.ingest_messages import counts_msg, event, line, telemetry
from tests.harness.postgres import Postgres
from tests.harness.util import terminate, wait_for

NOW = datetime.now(timezone.utc).replace(microsecond=0)
TODAY = NOW.date()


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), timezone.utc)


def days_ago(n: int) -> date:
    return TODAY - timedelta(days=n)


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    return postgres.new_database()


@pytest.fixture
def pg(pg_url: str) -> Any:
    s = open_store(pg_url)
    yield s
    s.close()


def where(store: Store, table: str) -> dict[str, int]:
    """Rows of ``table`` per partition they are stored in."""
    with store.engine.connect() as c:
        q = f"SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"
        return {name: n for name, n in c.execute(sa.text(q)).all()}


def children(store: Store, table: str) -> set[str]:
    with store.engine.connect() as c:
        return set(c.execute(sa.text(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = to_regclass(:t)"
        ), {"t": table}).scalars())  # fmt: skip


def fill(store: Store, at: datetime, seq: int) -> None:
    """Two telemetry messages (3 pipeline rows, 1 device row, 1 count row) and 1 event."""
    counts = counts_msg(at=at, lines=[line("gate", "car", seq)], pipeline="side")
    store.add_telemetry(counts, now=at)
    store.add_telemetry(telemetry(at=at), now=at)
    store.add_events([event(seq, at)])


def test_rows_go_to_their_day_and_the_rest_to_default(pg: Store) -> None:
    pg.maintain_partitions(NOW)
    for table in PARTITIONED:
        days = {day_partition(table, TODAY + timedelta(days=i)) for i in range(DAYS_AHEAD + 1)}
        assert children(pg, table) == days | {default_partition(table)}
    fill(pg, NOW, 1)
    fill(pg, NOW + timedelta(days=2), 2)
    fill(pg, NOW - timedelta(days=40), 3)  # no partition for that day
    for table, per_msg in (("telemetry", 3), ("device_telemetry", 1), ("events", 1),
                           ("region_counts", 1)):  # fmt: skip
        assert where(pg, table) == {
            day_partition(table, TODAY): per_msg,
            day_partition(table, TODAY + timedelta(days=2)): per_msg,
            default_partition(table): per_msg,
        }
    # redelivery is still refused by the unique key, in a day and in the default partition
    assert pg.add_telemetry(telemetry(at=NOW), now=NOW) == 0
    assert pg.add_telemetry(telemetry(at=NOW - timedelta(days=40))) == 0


def test_migration_11_keeps_every_row(pg_url: str) -> None:
    engine = make_engine(pg_url)
    assert migrate(engine, upto=10) == 10
    v10 = Store(engine)
    at = [NOW, NOW - timedelta(days=3), NOW - timedelta(days=40), NOW - timedelta(days=400),
          NOW + timedelta(days=30)]  # fmt: skip
    for i, t in enumerate(at):
        fill(v10, t, i)

    def dump(table: str) -> list[Any]:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))]

    before = {t: dump(t) for t in PARTITIONED}
    assert migrate(engine) == LATEST == 11
    for table in PARTITIONED:
        assert dump(table) == before[table] and before[table]
        with engine.connect() as c:
            got = day_partitions(c, table).keys()  # (and today's, by the server's clock)
        want = {days_ago(0), days_ago(3), days_ago(40)}
        assert want <= got <= want | {days_ago(-1)}
        # 400 days back is past BACKFILL_DAYS, 30 ahead past DAYS_AHEAD: the default partition
        assert where(v10, table)[default_partition(table)] == len(before[table]) * 2 // 5
    # the ids go on from the old table's sequence; the unique key still refuses a redelivery
    assert v10.add_telemetry(telemetry(at=NOW + timedelta(seconds=1))) == 2
    assert min(r[0] for r in dump("telemetry")[-2:]) > max(r[0] for r in before["telemetry"])
    assert v10.add_telemetry(telemetry(at=NOW - timedelta(days=3))) == 0
    with engine.connect() as c:
        assert not sa.inspect(c).has_table("telemetry_v10")
        pk = sa.inspect(c).get_pk_constraint("telemetry")["constrained_columns"]
    assert pk == ["id", "ts"]
    engine.dispose()


def test_a_day_in_default_gets_its_rows_moved_to_its_new_partition(pg: Store) -> None:
    later = NOW + timedelta(days=DAYS_AHEAD + 3)  # beyond the days made ahead: default
    pg.maintain_partitions(NOW)
    fill(pg, later, 1)
    fill(pg, NOW + timedelta(days=100), 2)  # stays in default
    assert where(pg, "telemetry") == {default_partition("telemetry"): 6}
    made = pg.maintain_partitions(later)  # PostgreSQL would refuse a plain CREATE … PARTITION OF
    assert day_partition("telemetry", later.date()) in made
    for table, n in (("telemetry", 3), ("device_telemetry", 1), ("events", 1),
                     ("region_counts", 1)):  # fmt: skip
        assert where(pg, table) == {day_partition(table, later.date()): n,
                                    default_partition(table): n}  # fmt: skip
    assert pg.counts()["telemetry"] == 6 and pg.add_telemetry(telemetry(at=later)) == 0


def at_once(calls: list[Any]) -> list[Any]:
    """Run ``calls`` in threads released together; their results, or raise the first error."""
    gate = threading.Barrier(len(calls))
    out: list[Any] = []
    errors: list[BaseException] = []

    def run(call: Any) -> None:
        try:
            gate.wait(10)
            out.append(call())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    assert len(out) == len(calls), "a call did not return in 60 s"
    return out


def test_maintenance_from_two_processes_at_once(pg_url: str, pg: Store) -> None:
    """Two ingest processes (own engines) make the same days at the same moment, one of them
    with rows to move from the default partition: each partition is made once, none fails."""
    other = open_store(pg_url)
    try:
        for rnd in range(2):
            start = NOW + timedelta(days=30 + 20 * rnd)
            fill(pg, start + timedelta(days=1), rnd)  # default now; moved by whoever comes first
            made = at_once([lambda s=s, t=start: s.maintain_partitions(t) for s in (pg, other)])
            want = {day_partition(t, start.date() + timedelta(days=i))
                    for t in PARTITIONED for i in range(DAYS_AHEAD + 1)}  # fmt: skip
            assert sorted(made[0] + made[1]) == sorted(want)  # each made by exactly one
            tele = where(pg, "telemetry")
            assert tele.get(day_partition("telemetry", (start + timedelta(days=1)).date())) == 3
    finally:
        other.close()


def test_retention_drops_old_days_and_deletes_from_default(pg_url: str, pg: Store) -> None:
    pg.maintain_partitions(noon(days_ago(45)))  # days 45 … 38 ago
    pg.maintain_partitions(NOW)
    for i, n in enumerate((45, 40, 38, 100, 30, 0)):  # 100: default; 30: the cut's day
        fill(pg, noon(days_ago(n)) - timedelta(hours=1), i)
    cut = noon(days_ago(30))
    other = open_store(pg_url)  # two processes' retention at once: each row counted once
    try:
        both = at_once([lambda s=s: s.retention(cut) for s in (pg, other)])
    finally:
        other.close()
    counts = {k: both[0][k] + both[1][k] for k in both[0]}
    # three dropped days and the default's row; the cut's own day stays (in default) for now
    assert counts == {"telemetry": 12, "device_telemetry": 4, "events": 4, "region_counts": 4,
                      "snapshots": 0, "dead_letters": 0}  # fmt: skip
    old = {day_partition("telemetry", days_ago(n)) for n in range(38, 46)}
    assert not children(pg, "telemetry") & old
    assert pg.counts()["telemetry"] == 6 and pg.counts()["events"] == 2
    assert pg.retention(cut) == dict.fromkeys(counts, 0)  # nothing left to drop: no-op
    exact = pg.retention(cut, exact=True)  # the row an hour before the cut, in its day
    assert (exact["telemetry"], exact["events"]) == (3, 1)
    assert pg.counts()["telemetry"] == 3


def test_a_one_day_query_reads_only_that_days_partition(pg: Store) -> None:
    pg.maintain_partitions(NOW)
    fill(pg, NOW, 1)
    lo = datetime.combine(TODAY, time(), timezone.utc)
    with pg.engine.connect() as c:
        plan = "\n".join(c.execute(sa.text(
            "EXPLAIN SELECT * FROM telemetry WHERE device_id = 'cam-1' AND ts >= :lo AND ts < :hi"
        ), {"lo": lo, "hi": lo + timedelta(days=1)}).scalars())  # fmt: skip
    assert day_partition("telemetry", TODAY) in plan
    others = children(pg, "telemetry") - {day_partition("telemetry", TODAY)}
    assert len(others) == DAYS_AHEAD + 1 and not [p for p in others if p in plan], plan


@pytest.mark.broker
def test_ingest_makes_the_days_ahead_and_drops_old_days(pg_url: str, broker: Mosquitto) -> None:
    """``edgefleet ingest --keep`` on PostgreSQL: the week ahead at start, old days dropped."""
    s = open_store(pg_url)
    try:
        s.maintain_partitions(noon(days_ago(40)))
        fill(s, noon(days_ago(40)), 1)
    finally:
        s.close()
    cmd = [str(Path(sys.executable).parent / "edgefleet"), "ingest", "--broker", broker.url,
           "--db", pg_url, "--keep", "30d"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    want = {day_partition("telemetry", TODAY + timedelta(days=i)) for i in range(DAYS_AHEAD)}
    s = open_store(pg_url)
    try:
        assert wait_for(lambda: want <= children(s, "telemetry") and not s.counts()["events"], 60)
        assert day_partition("telemetry", days_ago(40)) not in children(s, "telemetry")
    finally:
        s.close()
        terminate(proc)
        if proc.stdout:
            out = proc.stdout.read()
            proc.stdout.close()
    assert "retention: deleted rows older than" in out and "'telemetry': 3" in out


def test_sqlite_stays_unpartitioned(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'ingest.db'}")
    try:
        assert s.version() == 11 and s.maintain_partitions(NOW) == []
        fill(s, NOW - timedelta(days=40), 1)
        fill(s, noon(days_ago(30)) - timedelta(hours=1), 2)
        fill(s, NOW, 3)
        with s.engine.connect() as c:
            names = set(sa.inspect(c).get_table_names())
        assert not {n for n in names if n.endswith("_default") or "_p20" in n}
        counts = s.retention(noon(days_ago(30)))  # SQLite deletes to the exact cut
        assert (counts["telemetry"], counts["events"], counts["region_counts"]) == (6, 2, 2)
    finally:
        s.close()
