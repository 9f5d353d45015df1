"""The Grafana dashboard in docs/grafana/: its structure, and every query run on real PostgreSQL.

The queries are expanded the way Grafana's PostgreSQL datasource expands them (template
variables first, then the ``$__`` macros; see ``expand``) and run against a database the ingest
store created and filled, so a wrong column or table name, a type error or a query that returns
the wrong numbers fails here instead of on an operator's screen.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_sync.ingest.store import Store, open_store
from tests.harness.ingest_messages import counts_msg, line, reported, state, telemetry, zone
from tests.harness.postgres import Postgres

GRAFANA = Path(__file__).resolve().parents[3] / "docs" / "grafana"
DASHBOARD = GRAFANA / "edgefleet-fleet.json"
DS_UID = "edgefleet-pg"
DS_TYPE = "grafana-postgresql-datasource"
DS_REF = {"type": DS_TYPE, "uid": "${DS_EDGEFLEET}"}

SAMPLES = 60  # telemetry messages per device in the last hour, one a minute
ERROR = "model det@1.4.0 rejected: golden outputs differ (max abs 0.31 > 0.05); keeping det@1.3.2"


def load_dashboard() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that runs queries (rows only group panels)."""
    return [p for p in dash["panels"] if p["type"] != "row"]


def panel(dash: dict[str, Any], title: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in dash["panels"] if p.get("title") == title]
    [p] = found
    return p


def variable(dash: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in dash["templating"]["list"] if v["name"] == name]
    [v] = found
    return v


# --- Grafana's PostgreSQL macro and variable expansion ---------------------------------------


class Range:
    """A dashboard time range and the interval Grafana would pick for it."""

    def __init__(self, frm: datetime, to: datetime, interval: str) -> None:
        self.frm, self.to, self.interval = frm, to, interval

    @staticmethod
    def rfc3339(t: datetime) -> str:
        # what Grafana writes into the SQL: UTC, second precision
        return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text: str) -> int:
    m = re.fullmatch(r"'?(\d+)(ms|s|m|h|d)'?", text.strip())
    if not m:
        raise AssertionError(f"interval {text!r} is not like 30s, 5m or 1h")
    return max(1, int(int(m.group(1)) * _UNITS[m.group(2)]))


def sql_quote(values: list[str]) -> str:
    """A multi-value variable in a SQL datasource: 'a','b' with quotes doubled."""
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


def expand(sql: str, rng: Range, variables: dict[str, list[str]]) -> str:
    """Expand template variables, then macros, as Grafana's PostgreSQL datasource does.

    Only what the dashboard uses is implemented; anything left starting with ``$`` fails.
    """

    def var(m: re.Match[str]) -> str:
        name, fmt = m.group("name") or m.group("bare"), m.group("fmt")
        if name == "__interval":
            return rng.interval
        if name not in variables:
            return m.group(0)  # a macro, or unknown: checked below
        if fmt not in (None, "sqlstring"):
            raise AssertionError(f"variable format {fmt!r} of ${name} not supported here")
        return sql_quote(variables[name])

    sql = re.sub(r"\$\{(?P<name>\w+)(?::(?P<fmt>\w+))?\}|\$(?P<bare>\w+)(?!\()", var, sql)

    frm, to = f"'{Range.rfc3339(rng.frm)}'", f"'{Range.rfc3339(rng.to)}'"

    def macro(m: re.Match[str]) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",") if a.strip()]
        if name == "timeFilter" and len(args) == 1:
            return f"{args[0]} BETWEEN {frm} AND {to}"
        if name == "time" and len(args) == 1:
            return f'{args[0]} AS "time"'
        if name in ("timeGroup", "timeGroupAlias") and len(args) == 2:
            n = interval_seconds(args[1])
            expr = f"floor(extract(epoch from {args[0]})/{n})*{n}"
            return expr + (' AS "time"' if name == "timeGroupAlias" else "")
        if name == "timeFrom" and not args:
            return frm
        if name == "timeTo" and not args:
            return to
        raise AssertionError(f"macro $__{name}({m.group(2)}) not supported by this test")

    sql = re.sub(r"\$__(\w+)\(([^()]*)\)", macro, sql)
    left = re.findall(r"\$\{?\w+", sql)
    assert not left, f"unexpanded variables or macros {left} in:\n{sql}"
    return sql


def run(store: Store, sql: str) -> list[dict[str, Any]]:
    """Run one expanded query read-only, as a Grafana datasource user with SELECT only would."""
    with store.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        res = conn.exec_driver_sql(sql)  # no parameters: '%' and ':' reach PostgreSQL as is
        return [dict(r._mapping) for r in res]


# --- data ------------------------------------------------------------------------------------


@pytest.fixture
def fleet_db(postgres: Postgres) -> Iterator[tuple[Store, datetime]]:
    """Two devices as the ingest worker would have stored them; returns (store, now).

    cam-1: online, pipelines front (det@1.4.0) and rear (cls@2.0.0), both committed.
    cam-2: offline (last will), front rolled back to det@1.3.2 with an error.
    Telemetry once a minute over the last hour, plus one sample two hours ago (out of range);
    one dead letter in range and one out of it.
    """
    store = open_store(postgres.new_database())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        store.upsert_state(state("cam-1"), now=now - timedelta(hours=3))
        store.upsert_state({**state("cam-2"), "pipelines": ["front"]}, now=now - timedelta(hours=3))
        rep1 = reported("cam-1")
        rep1["pipelines"].append({**rep1["pipelines"][0], "name": "rear", "active_model": "cls",
                                  "active_version": "2.0.0", "precision": "fp32"})  # fmt: skip
        store.upsert_reported(rep1, now=now - timedelta(hours=1))
        rep2 = reported("cam-2", phase="rolled_back")
        rep2["pipelines"][0].update(active_version="1.3.2", target_model="det",
                                    target_version="1.4.0", last_error=ERROR)  # fmt: skip
        store.upsert_reported(rep2, now=now - timedelta(minutes=20))
        msgs = []
        for k in [*range(SAMPLES), 120]:  # k minutes (and 30 s) before now; 120: out of range
            at = now - timedelta(seconds=30 + 60 * k)
            m1 = telemetry("cam-1", at, fps=20.0 + k % 7)
            # counters since start: 15 frames dropped a minute; the agent restarted 10 min ago
            front = m1["pipelines"][0]
            m1["pipelines"][0] = {**front, "frames_dropped": 5000 - 15 * k,
                                  "errors": 4 if k < 10 else 30}  # fmt: skip
            msgs.append(m1)
            m2 = telemetry("cam-2", at, fps=5.0)
            m2["pipelines"] = m2["pipelines"][:1]
            m2["device"] = {**m2["device"], "cpu_percent": 90.0, "gpu_load_pct": None}
            m2["outbox"] = {**m2["outbox"], "depth": 40 + k, "dropped": 7}
            msgs.append(m2)
        store.add_telemetry_batch(msgs, now=now - timedelta(minutes=3))
        store.upsert_state(state("cam-2", online=False), now=now - timedelta(minutes=2))  # LWT
        topic = "edgefleet/v1/devices/cam-2/telemetry"
        store.dead_letter(topic, b"{oops", "bad Telemetry: invalid JSON",
                          now=now - timedelta(minutes=5))  # fmt: skip
        store.dead_letter(topic, b"old", "bad Telemetry: invalid JSON",
                          now=now - timedelta(hours=2))  # fmt: skip
        yield store, now
    finally:
        store.close()


# --- structure -------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)), f"panel titles repeat: {titles}"
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g) and all(isinstance(g[k], int) for k in "xywh"), p
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in query_panels(dash):
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF and t["rawQuery"] is True, p["title"]
            assert t["rawSql"].strip() and t["format"] in ("table", "time_series"), p["title"]
            if p["type"] == "timeseries":
                assert t["format"] == "time_series", p["title"]
    ds = variable(dash, "DS_EDGEFLEET")
    assert ds["type"] == "datasource" and ds["query"] == DS_TYPE
    assert ds["current"]["value"] == DS_UID
    for name in ("device", "pipeline"):
        v = variable(dash, name)
        assert v["type"] == "query" and v["datasource"] == DS_REF and v["multi"], name
        assert v["query"]["rawSql"] == v["definition"]
    assert variable(dash, "device")["definition"].startswith("SELECT device_id FROM devices")
    # nothing outside the datasource variable names a datasource uid
    text = DASHBOARD.read_text()
    assert text.count(DS_UID) == 1 and text.count('"uid": "${DS_EDGEFLEET}"') > 10


def test_provisioning_files() -> None:
    yaml = pytest.importorskip("yaml")
    ds = yaml.safe_load((GRAFANA / "datasource.yaml").read_text())
    [src] = ds["datasources"]
    assert src["uid"] == DS_UID and src["type"] == DS_TYPE and src["jsonData"]["database"]
    prov = yaml.safe_load((GRAFANA / "dashboards.yaml").read_text())
    [provider] = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    readme = (GRAFANA / "README.md").read_text()
    for p in query_panels(load_dashboard()):
        assert p["title"] in readme, f"panel {p['title']!r} not described in README.md"
    assert "edgefleet ingest" in readme and "postgresql+psycopg://" in readme


def test_expand_macros_like_grafana() -> None:
    rng = Range(datetime(2026, 1, 15, 8, 0, 0, 123000, tzinfo=timezone.utc),
                datetime(2026, 1, 15, 9, 0, tzinfo=timezone.utc), "5m")  # fmt: skip
    sql = (
        "SELECT $__timeGroupAlias(ts, $__interval), $__time(ts) FROM t"
        " WHERE $__timeFilter(ts) AND d IN ($device) AND p IN (${pipeline:sqlstring})"
        " AND ts < $__timeTo()"
    )
    assert expand(sql, rng, {"device": ["a", "o'b"], "pipeline": ["front"]}) == (
        'SELECT floor(extract(epoch from ts)/300)*300 AS "time", ts AS "time" FROM t'
        " WHERE ts BETWEEN '2026-01-15T08:00:00Z' AND '2026-01-15T09:00:00Z'"
        " AND d IN ('a','o''b') AND p IN ('front') AND ts < '2026-01-15T09:00:00Z'"
    )
    with pytest.raises(AssertionError, match="not supported"):
        expand("SELECT $__unixEpochFilter(ts)", rng, {})
    with pytest.raises(AssertionError, match="unexpanded"):
        expand("SELECT 1 WHERE d IN ($site)", rng, {})


# --- every query on real PostgreSQL ----------------------------------------------------------


def run_dashboard(
    store: Store, dash: dict[str, Any], rng: Range, devices: list[str] | None = None
) -> tuple[dict[str, list[str]], dict[str, list[dict[str, Any]]]]:
    """Resolve the variables ('All' selected, or ``devices``) and run every panel query.

    Returns:
        The variable values and, per panel title, the rows of its (single) query.
    """
    variables: dict[str, list[str]] = {}
    for name in ("device", "pipeline"):
        rows = run(store, expand(variable(dash, name)["query"]["rawSql"], rng, variables))
        assert rows and all(len(r) == 1 for r in rows), (name, rows)
        variables[name] = [str(next(iter(r.values()))) for r in rows]
        if name == "device" and devices is not None:
            variables[name] = devices
    results: dict[str, list[dict[str, Any]]] = {}
    for p in query_panels(dash):
        for t in p["targets"]:
            sql = expand(t["rawSql"], rng, variables)
            try:
                rows = run(store, sql)
            except sa.exc.DBAPIError as e:
                raise AssertionError(f"panel {p['title']!r}: {e.orig}\n{sql}") from e
            if t["format"] == "time_series":
                check_time_series(p["title"], rows, rng)
            results[p["title"]] = rows
    return variables, results


def check_time_series(title: str, rows: list[dict[str, Any]], rng: Range) -> None:
    """What Grafana needs of a time_series result: a numeric 'time', numeric value columns."""
    assert rows, f"{title}: no rows"
    assert "time" in rows[0], f"{title}: no 'time' column in {list(rows[0])}"
    values = [c for c in rows[0] if c not in ("time", "metric")]
    assert values, f"{title}: no value column"
    lo = rng.frm.timestamp() - interval_seconds(rng.interval)
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times), f"{title}: not ordered by time"
    assert all(lo <= t <= rng.to.timestamp() for t in times), f"{title}: time out of range"
    for c in values:  # Grafana converts NUMERIC (Decimal here) to float64 too
        assert all(r[c] is None or isinstance(r[c], (int, float, Decimal)) for r in rows), (
            f"{title}: column {c} is not numeric: {rows[0][c]!r}"
        )
    assert any(r[c] is not None for r in rows for c in values), f"{title}: only NULLs"


def test_every_query_runs_and_shows_the_fleet(fleet_db: tuple[Store, datetime]) -> None:
    store, now = fleet_db
    dash = load_dashboard()
    rng = Range(now - timedelta(hours=1), now, "1m")
    variables, res = run_dashboard(store, dash, rng)
    assert variables == {"device": ["cam-1", "cam-2"], "pipeline": ["front", "rear"]}
    assert set(res) == {p["title"] for p in query_panels(dash)}

    def stat(title: str) -> Any:
        [row] = res[title]
        [value] = row.values()
        return value

    assert (stat("Devices total"), stat("Online"), stat("Offline")) == (2, 1, 1)
    assert stat("Dead letters (range)") == 1 and stat("Pipelines updating or failed") == 1

    devices = {r["device_id"]: r for r in res["Devices"]}
    assert list(devices) == ["cam-1", "cam-2"]
    assert devices["cam-1"]["online"] is True and devices["cam-2"]["online"] is False
    assert devices["cam-1"]["pipelines"] == (
        "front: det@1.4.0 (committed), rear: cls@2.0.0 (committed)"
    )
    assert devices["cam-1"]["last_error"] is None
    assert devices["cam-2"]["pipelines"] == "front: det@1.3.2 (rolled_back)"
    assert devices["cam-2"]["last_error"] == f"front: {ERROR}"
    assert devices["cam-2"]["last_seen"] == now - timedelta(minutes=2)
    assert devices["cam-1"]["last_seen"] == now - timedelta(minutes=3)  # the telemetry batch
    assert devices["cam-1"]["agent_version"] == "0.1.0"

    # one point per telemetry message in range (one a minute, 1 m buckets), none from 2 h ago
    fps = res["Frames inferred per second"]
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in fps:
        by_series.setdefault(r["metric"], []).append(r)
    assert {k: len(v) for k, v in by_series.items()} == {
        "cam-1/front": SAMPLES, "cam-1/rear": SAMPLES, "cam-2/front": SAMPLES}  # fmt: skip
    want = sorted(20.0 + k % 7 for k in range(SAMPLES))
    assert sorted(r["fps_out"] for r in by_series["cam-1/front"]) == want
    assert {r["fps_out"] for r in by_series["cam-2/front"]} == {5.0}
    p95 = {r["metric"]: r["p95_ms"] for r in res["p95 latency per frame"]}
    assert p95 == {"cam-1/front": 12.5, "cam-1/rear": 25.0, "cam-2/front": 12.5}
    # increases of the counters: none for a series' first point, a restart counts from zero
    drops: dict[str, list[tuple[Any, Any]]] = {}
    for r in res["Frames dropped and errors"]:
        drops.setdefault(r["metric"], []).append((r["frames_dropped"], r["errors"]))
    assert drops["cam-1/front"] == [(None, None)] + [(15, 0)] * 49 + [(15, 4)] + [(15, 0)] * 9
    assert drops["cam-1/rear"] == [(None, None)] + [(0, 0)] * (SAMPLES - 1)

    assert {r["phase"]: r["pipelines"] for r in res["Pipelines per update phase"]} == {
        "committed": 2, "rolled_back": 1}  # fmt: skip
    [bad] = res["Pipelines not committed"]
    assert (bad["device_id"], bad["pipeline"], bad["phase"]) == ("cam-2", "front", "rolled_back")
    assert (bad["active"], bad["target_model"], bad["target_version"]) == ("det@1.3.2", "det",
                                                                           "1.4.0")  # fmt: skip
    assert bad["last_error"] == ERROR and bad["desired_revision"] == 7

    load = res["CPU and GPU load"]
    assert len(load) == 2 * SAMPLES
    assert {(r["metric"], r["cpu_percent"], r["gpu_load_pct"]) for r in load} == {
        ("cam-1", 41.5, 60.0), ("cam-2", 90.0, None)}  # fmt: skip
    mem = {round(r["mem_used_pct"], 3) for r in res["Memory used"]}
    assert mem == {round(100 * 2100 / 7620, 3)}
    outbox = {r["metric"]: r for r in res["Outbox"] if r["metric"] == "cam-2"}
    assert outbox and outbox["cam-2"]["outbox_dropped"] == 7
    depths = sorted(r["outbox_depth"] for r in res["Outbox"] if r["metric"] == "cam-2")
    assert depths == [40 + k for k in range(SAMPLES)]

    [dl] = res["Dead letters"]
    assert dl["topic"] == "edgefleet/v1/devices/cam-2/telemetry" and dl["bytes"] == 5
    assert dl["reason"] == "bad Telemetry: invalid JSON"


def test_device_and_pipeline_variables_filter(fleet_db: tuple[Store, datetime]) -> None:
    store, now = fleet_db
    dash = load_dashboard()
    rng = Range(now - timedelta(minutes=10), now, "1m")
    variables, res = run_dashboard(store, dash, rng, devices=["cam-2"])
    assert variables["pipeline"] == ["front"]
    assert [r["device_id"] for r in res["Devices"]] == ["cam-2"]
    assert {r["metric"] for r in res["Frames inferred per second"]} == {"cam-2/front"}
    assert len(res["Frames inferred per second"]) == 10  # samples at -30 s … -9 min 30 s
    assert {r["metric"] for r in res["CPU and GPU load"]} == {"cam-2"}
    assert res["Pipelines per update phase"] == [{"phase": "rolled_back", "pipelines": 1}]
    # coarser buckets: 5 minutes average the samples
    _, res = run_dashboard(store, dash, Range(now - timedelta(hours=1), now, "5m"))
    assert 12 <= len({r["time"] for r in res["Frames inferred per second"]}) <= 13


def test_a_wrong_column_name_fails(fleet_db: tuple[Store, datetime]) -> None:
    """The check above would catch a dashboard typo: break one column, the run fails."""
    store, now = fleet_db
    rng = Range(now - timedelta(hours=1), now, "1m")
    for title, good, bad in [("Frames inferred per second", "avg(fps_out)", "avg(fps)"),
                             ("Devices", "d.last_seen", "d.last_seen_at"),
                             ("Outbox", "max(outbox_depth)", "max(outbox)")]:  # fmt: skip
        dash = copy.deepcopy(load_dashboard())
        target = panel(dash, title)["targets"][0]
        assert good in target["rawSql"]
        target["rawSql"] = target["rawSql"].replace(good, bad)
        with pytest.raises(AssertionError, match=re.escape(title)):
            run_dashboard(store, dash, rng)


# --- the zone and line counts panel (issue 18 part B) -------------------------------------

COUNTS_TITLE = "Zone and line counts"
# the store's counters → the panel's columns
COUNTS_COLUMNS = [("crossed_in", "in"), ("crossed_out", "out"), ("entered", "entered"),
           ("exited", "left"), ("dwell", "dwell")]  # fmt: skip


@pytest.fixture
def counts_db(postgres: Postgres) -> Iterator[tuple[Store, datetime]]:
    """cam-1 (front: line gate, zone door) every 5 min for 2 h, restarting 40 min ago; a class
    'bike' first seen 20 min ago; cam-2 with a line. Returns (store, now)."""
    store = open_store(postgres.new_database())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        msgs = []
        for k in range(25):  # k * 5 minutes before now
            at = now - timedelta(minutes=5 * k)
            run = 3 * (24 - k) if k > 8 else 2 * (8 - k)  # restarted 40 min ago
            lines = [line("gate", "car", run, run // 3)]
            if k <= 4:
                lines.append(line("gate", "bike", 5 - k))  # added by the device 20 min ago
            door = zone("door", "person", run, run // 2, run // 4, k % 3)
            msgs.append(counts_msg("cam-1", at, zones=[door], lines=lines))
            msgs.append(counts_msg("cam-2", at, lines=[line("exit", "person", 100 - k)]))
        store.add_telemetry_batch(msgs, now=now)
        yield store, now
    finally:
        store.close()


def by_series(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["device_id"], r["region"].split()[-1], r["label" if "label" in r else "class"]): r
            for r in rows}  # fmt: skip


@pytest.mark.parametrize("minutes", [60, 30, 125])
def test_counts_panel_equals_the_store(counts_db: tuple[Store, datetime], minutes: int) -> None:
    store, now = counts_db
    rng = Range(now - timedelta(minutes=minutes), now, "1m")
    _, res = run_dashboard(store, load_dashboard(), rng)
    got = by_series(res[COUNTS_TITLE])
    want = by_series(store.count_increase(rng.frm))
    latest = by_series(store.latest_counts())
    assert set(got) == set(want) == set(latest)
    for key, row in got.items():
        inc = want[key]
        assert row["restarts"] == inc["resets"], key
        assert row["last_sample"] == inc["last"], key
        for col, panel_col in COUNTS_COLUMNS:
            assert row[f"{panel_col} (range)"] == inc[col], (key, col)
            assert row[panel_col] == latest[key][col], (key, col)  # the range ends now
        assert row["inside"] == latest[key]["inside"], key
    gate = got[("cam-1", "gate", "car")]
    if minutes == 60:
        # baseline 36 at -60 min, +3 three times to -45, the restart at -40 (0), +2 eight times
        assert (gate["in (range)"], gate["restarts"]) == (3 * 3 + 2 * 8, 1)
        assert (gate["in"], gate["out"]) == (16, 5)
    # first seen at -20 min with 1, after reports of the pipeline without it: all 5 count
    assert got[("cam-1", "gate", "bike")]["in (range)"] == 5


def test_counts_panel_is_documented_and_tabled() -> None:
    p = panel(load_dashboard(), COUNTS_TITLE)
    assert p["type"] == "table" and p["targets"][0]["format"] == "table"
    assert "restart" in p["description"]
