"""The fleet web page: its JSON API over a real store, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from agent.protocol.topics import Topics
from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.schema import TELEMETRY
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.web import FleetWebServer, serve_web
from tests.harness.broker import Mosquitto
from tests.harness.ingest_messages import counts_msg, line, reported, state, telemetry, zone
from tests.harness.util import free_port, terminate, wait_for

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
POINTS = 6  # telemetry messages per device, one a minute


def populate(store: Store, now: datetime) -> None:
    """cam-1 online, cam-2 offline (last will), each with POINTS telemetry messages."""
    store.upsert_state(state("cam-1", site="berlin"), now=now)
    store.upsert_state(state("cam-2", online=False, site="paris"), now=now)
    store.upsert_reported(reported("cam-1"), now=now)
    store.upsert_reported(reported("cam-2", phase="rolled_back"), now=now)
    for i in range(POINTS):
        at = now - timedelta(minutes=POINTS - 1 - i)
        store.add_telemetry(telemetry("cam-1", at, fps=20.0 + i), now=now)
        store.add_telemetry(telemetry("cam-2", at, fps=5.0), now=now)


@pytest.fixture
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def store(tmp_path: Path, now: datetime) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'ingest.db'}")
    populate(s, now)
    yield s
    s.close()


def serve(store: Store) -> tuple[FleetWebServer, str]:
    port = free_port()
    return serve_web(store, port), f"http://127.0.0.1:{port}"


@pytest.fixture
def base(store: Store) -> Iterator[str]:
    """The URL of a fleet web server over ``store``."""
    server, url = serve(store)
    yield url
    server.stop()


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], Any]:
    """Status, headers and decoded body (JSON when it is JSON)."""
    try:
        with urlopen(Request(url, method=method), timeout=10) as resp:
            status, headers, raw = resp.status, dict(resp.headers), resp.read()
    except HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
        e.close()
    ctype = headers.get("Content-Type", "")
    return status, headers, json.loads(raw) if ctype == "application/json" else raw.decode()


# --- the API, no browser ---------------------------------------------------------------------


def test_fleet_json(base: str, now: datetime) -> None:
    status, headers, fleet = get(f"{base}/api/fleet")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert [d["device_id"] for d in fleet] == ["cam-1", "cam-2"]
    cam1, cam2 = fleet
    assert (cam1["online"], cam2["online"]) == (True, False)
    assert datetime.fromisoformat(cam1["last_seen"]) == now  # ISO 8601 with the zone
    front = cam1["pipelines"][0]
    assert (front["name"], front["model"], front["version"], front["phase"]) == (
        "front", "det", "1.4.0", "committed")  # fmt: skip
    assert front["fps"] == 20.0 + POINTS - 1 and front["p95_ms"] == 12.5 and front["errors"] == 2
    assert datetime.fromisoformat(front["telemetry_ts"]) == now
    assert cam2["pipelines"][0]["phase"] == "rolled_back"
    _, _, paris = get(f"{base}/api/fleet?tag=site=paris")
    assert [d["device_id"] for d in paris] == ["cam-2"]
    status, _, body = get(f"{base}/api/fleet?tag=site")
    assert status == 400 and body["error"] == "tag must be KEY=VALUE, got 'site'"


def test_series_content_and_order(base: str, store: Store, now: datetime) -> None:
    store.add_telemetry(telemetry("cam-1", now - timedelta(hours=2)), now=now)  # outside 60 min
    status, _, body = get(f"{base}/api/devices/cam-1/telemetry")
    assert status == 200 and body["minutes"] == 60 and body["device_id"] == "cam-1"
    assert set(body["pipelines"]) == {"front", "rear"}
    front = body["pipelines"]["front"]
    times = [datetime.fromisoformat(p["ts"]) for p in front]
    assert times == [now - timedelta(minutes=m) for m in range(POINTS - 1, -1, -1)]  # oldest 1st
    assert [p["fps_out"] for p in front] == [20.0 + i for i in range(POINTS)]
    assert front[0] == {"ts": front[0]["ts"], "fps_out": 20.0, "p95_ms": 12.5, "errors": 2}
    assert len(body["device"]) == POINTS and body["truncated"] is False
    dev = body["device"][-1]
    assert dev["cpu_percent"] == 41.5 and dev["temperatures"] == {"cpu": 51.2, "gpu": 49.0}
    _, _, wider = get(f"{base}/api/devices/cam-1/telemetry?minutes=180")
    assert len(wider["pipelines"]["front"]) == POINTS + 1
    _, _, narrow = get(f"{base}/api/devices/cam-1/telemetry?minutes=3")
    assert len(narrow["pipelines"]["rear"]) == 3  # now-2, now-1, now (the clock moved on)


@pytest.mark.parametrize("device", ["cam-404", "bad%20id", ".."])
def test_unknown_device_is_404(base: str, device: str) -> None:
    status, _, body = get(f"{base}/api/devices/{device}/telemetry")
    assert status == 404 and body["error"].startswith("unknown device")


@pytest.mark.parametrize("minutes", ["abc", "0", "-5", "10081", "1.5"])
def test_bad_minutes_is_400(base: str, minutes: str) -> None:
    status, _, body = get(f"{base}/api/devices/cam-1/telemetry?minutes={minutes}")
    assert status == 400
    assert body["error"] == f"minutes must be an integer from 1 to 10080, got {minutes!r}"


def test_page_unknown_path_and_method(base: str) -> None:
    status, headers, page = get(f"{base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'id="fleet-body"' in page and "connect-src 'self'" in headers["Content-Security-Policy"]
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing external
    status, _, body = get(f"{base}/api/nope")
    assert status == 404 and body == {"error": "no such page: /api/nope"}
    status, _, body = get(f"{base}/api/fleet", method="POST")
    assert status == 405


def broken_store(tmp_path: Path) -> Store:
    """A store whose database cannot be opened (its folder does not exist)."""
    return Store(make_engine(f"sqlite:///{tmp_path / 'missing' / 'ingest.db'}"))


def test_store_unavailable_is_503(tmp_path: Path) -> None:
    store = broken_store(tmp_path)
    server, url = serve(store)
    try:
        status, _, body = get(f"{url}/api/fleet")
        assert status == 503 and "database unavailable" in body["error"]
        status, _, body = get(f"{url}/api/devices/cam-1/telemetry")
        assert status == 503 and body["error"].startswith("series of cam-1 failed")
    finally:
        server.stop()
        store.close()


# --- Store.series on both backends -----------------------------------------------------------


def test_store_series(db_url: str) -> None:
    t0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    s = open_store(db_url)
    try:
        for i in (3, 0, 4, 1, 2):  # out of order on purpose
            s.add_telemetry(telemetry("cam-1", t0 + timedelta(minutes=i), fps=float(i)), now=t0)
        s.add_telemetry(telemetry("cam-1", t0 - timedelta(minutes=1)), now=t0)  # before `since`
        s.add_telemetry(telemetry("cam-2", t0), now=t0)  # another device
        got = s.series("cam-1", t0)
        assert got is not None and set(got["pipelines"]) == {"front", "rear"}
        front = got["pipelines"]["front"]
        assert [p["ts"] for p in front] == [t0 + timedelta(minutes=i) for i in range(5)]
        assert [p["fps_out"] for p in front] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert front[0]["p95_ms"] == 12.5 and front[0]["errors"] == 2
        assert got["pipelines"]["rear"][0]["p95_ms"] == 25.0
        assert [d["ts"] for d in got["device"]] == [p["ts"] for p in front]
        assert got["device"][0]["temperatures"] == {"cpu": 51.2, "gpu": 49.0}
        assert got["truncated"] is False
        newest = s.series("cam-1", t0, limit=4)  # the newest 4 rows: 2 times x 2 pipelines
        assert newest is not None and newest["truncated"] is True
        assert [p["fps_out"] for p in newest["pipelines"]["front"]] == [3.0, 4.0]
        assert s.series("cam-9", t0) is None
        empty = s.series("cam-2", t0 + timedelta(hours=1))
        assert empty == {"pipelines": {}, "device": [], "truncated": False}
    finally:
        s.close()


# --- the page in headless Chromium -----------------------------------------------------------


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from Debian's packages; Selenium Manager is never asked for a driver."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"browser tests skipped: {', '.join(missing)} missing "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--no-proxy-server",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def until(drv: Any, fn: Callable[[Any], Any], timeout: float = 10) -> Any:
    """``fn(driver)`` once truthy; the table re-renders every refresh, so stale elements retry."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(drv, timeout, ignored_exceptions=ignored).until(fn)


def text(drv: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(until(drv, lambda d: d.find_element(By.CSS_SELECTOR, css).text))


def chart_points(drv: Any, chart: str) -> dict[str, int]:
    """Points per pipeline polyline of ``svg#chart``."""
    from selenium.webdriver.common.by import By

    lines = drv.find_elements(By.CSS_SELECTOR, f"svg#{chart} polyline[data-pipeline]")
    return {ln.get_attribute("data-pipeline"): len(ln.get_attribute("points").split())
            for ln in lines}  # fmt: skip


def rows_in_store(store: Store, device: str, pipeline: str) -> int:
    q = sa.select(sa.func.count()).where(
        TELEMETRY.c.device_id == device, TELEMETRY.c.pipeline == pipeline
    )
    with store.engine.connect() as c:
        return int(c.execute(q).scalar_one())


def test_page_table_charts_and_refresh(driver: Any, store: Store, base: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/?refresh=1")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 2)
    cam1, cam2 = 'tr[data-device="cam-1"]', 'tr[data-device="cam-2"]'
    assert text(driver, f'{cam1} [data-pipeline="front"] [data-field="model"]') == "det@1.4.0"
    assert text(driver, f'{cam1} [data-pipeline="rear"] [data-field="model"]') == "cls@2.0.0"
    assert text(driver, f'{cam1} [data-pipeline="front"] [data-field="phase"]') == "committed"
    assert text(driver, f'{cam1} [data-pipeline="front"] [data-field="fps"]') == "25.0"
    assert text(driver, f'{cam2} [data-pipeline="front"] [data-field="phase"]') == "rolled_back"
    assert text(driver, f"{cam1} .badge.online") == "online"
    assert text(driver, f"{cam2} .badge.offline") == "offline"
    assert not driver.find_element(By.ID, "error").is_displayed()

    until(driver, lambda d: d.find_element(By.CSS_SELECTOR, cam1).click() or True)
    until(driver, lambda d: d.find_element(By.CSS_SELECTOR, '#detail[data-device="cam-1"]'))
    want = {p: rows_in_store(store, "cam-1", p) for p in ("front", "rear")}
    assert want == {"front": POINTS, "rear": POINTS}
    assert until(driver, lambda d: chart_points(d, "chart-fps") == want)
    assert until(driver, lambda d: chart_points(d, "chart-p95") == want)
    assert text(driver, "#detail-title").startswith("cam-1")

    store.upsert_state(state("cam-3", site="rome"))  # shows up at the next refresh
    assert text(driver, 'tr[data-device="cam-3"] [data-field="status"]') == "online"
    assert until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 3)
    assert not driver.find_element(By.ID, "error").is_displayed()


def test_page_shows_api_errors(driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    store = broken_store(tmp_path)
    server, url = serve(store)
    try:
        driver.get(url)
        until(driver, lambda d: d.find_element(By.ID, "error").is_displayed())
        error = driver.find_element(By.ID, "error").text
        assert error.startswith("fleet API failed: HTTP 503: fleet view failed, database unavail")
        assert driver.find_elements(By.CSS_SELECTOR, "tr[data-device]") == []
    finally:
        server.stop()
        store.close()


# --- `edgefleet ingest --http` as an operator runs it ------------------------------------------


@pytest.mark.broker
def test_ingest_command_serves_the_page(broker: Mosquitto, tmp_path: Path) -> None:
    port = free_port()
    exe = str(Path(sys.executable).parent / "edgefleet")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "ingest", "--broker", broker.url, "--db", db, "--http", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:

        def fleet() -> Any:
            try:
                return get(f"http://127.0.0.1:{port}/api/fleet")[2]
            except URLError:
                return None

        assert wait_for(lambda: fleet() == [], 30), log.read_text()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="web-test")
        c.connect(broker.host, broker.port)
        c.loop_start()
        payload = json.dumps(state("cam-5")).encode()
        topic = Topics().device("cam-5", "state")
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        assert wait_for(lambda: [d["device_id"] for d in fleet() or []] == ["cam-5"], 20)
    finally:
        terminate(proc)
    assert proc.returncode == 0, log.read_text()
    assert f"fleet page on http://127.0.0.1:{port}/" in log.read_text()


def test_page_shows_counts_per_device(driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    now = datetime.now(timezone.utc).replace(microsecond=0)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    port = free_port()
    server = serve_web(store, port)
    try:
        for k, n in enumerate([5, 9, 2]):  # 9 -> 2: the agent restarted
            at = now - timedelta(minutes=20 - 10 * k)
            msg = counts_msg("cam-1", at, lines=[line("gate", "car", n, 1)],
                             zones=[zone("door", "person", n, 0, 0, 1)])  # fmt: skip
            store.add_telemetry(msg, now=at)
        store.add_telemetry(counts_msg("cam-2", now), now=now)  # no zones or lines
        driver.get(f"http://127.0.0.1:{port}/?refresh=1&minutes=15")
        until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 2)
        gate = 'tr[data-device="cam-1"] .count[data-region="gate"][data-label="car"]'
        assert (
            text(driver, f'{gate} [data-field="counts"]') == "front · line gate · car: in 2 out 1"
        )
        # baseline 5 at -20 min (the last sample before the window), +4, a restart: +2
        assert text(driver, f'{gate} [data-field="change"]') == "(+6, +1 in 15 min, 1 restart(s))"
        door = 'tr[data-device="cam-1"] .count[data-region="door"] [data-field="counts"]'
        assert text(driver, door) == "front · zone door · person: entered 2 left 0 dwell 0 inside 1"
        assert driver.find_elements(By.CSS_SELECTOR, 'tr[data-device="cam-2"] .count') == []
        # a new count shows up at the next refresh
        store.add_telemetry(counts_msg("cam-2", now + timedelta(seconds=1),
                                       lines=[line("exit", "bike", 3)]))  # fmt: skip
        exit_ = 'tr[data-device="cam-2"] .count[data-region="exit"] [data-field="counts"]'
        assert text(driver, exit_) == "front · line exit · bike: in 3 out 0"
        assert not driver.find_element(By.ID, "error").is_displayed()
    finally:
        server.stop()
        store.close()


WAIT = "activation waits for maintenance window 02:00-05:00 (device local time), next opens in 3 h"


def test_fleet_shows_what_each_device_waits_for(driver: Any, store: Store, base: str) -> None:
    """A device's reported ``waiting`` and ``source_ended`` reach /api/fleet and the page."""
    from selenium.webdriver.common.by import By

    msg = reported("cam-1", phase="waiting")
    msg["pipelines"][0].update(waiting=WAIT, source_ended=True)
    store.upsert_reported(msg, now=datetime.now(timezone.utc))
    _, _, fleet = get(f"{base}/api/fleet")
    front = fleet[0]["pipelines"][0]
    assert (front["waiting"], front["source_ended"]) == (WAIT, True)
    assert fleet[1]["pipelines"][0]["waiting"] is None
    driver.get(f"{base}/?refresh=1")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 2)
    shown = text(driver, 'tr[data-device="cam-1"] [data-pipeline="front"] [data-field="waiting"]')
    assert shown == f"waits: {WAIT} · source ended"
    cam2 = 'tr[data-device="cam-2"] [data-field="waiting"]'
    assert not driver.find_elements(By.CSS_SELECTOR, cam2)


# --- the configuration column -----------------------------------------------------------------

RUNNING, TRIED = "ab" * 32, "cd" * 32
PASSWORD = "hunter2-camera-pw"
ROLLED_BACK = (
    f"configuration rolled back: pipeline front: source rtsp://viewer:{PASSWORD}@10.0.0.5/main"
    " did not deliver a frame in 3 s; previous one restored"
)


def with_config(device: str, **config: Any) -> dict[str, Any]:
    """A reported state carrying the contract 1.3 ``config`` part."""
    msg = reported(device)
    msg["config"] = {"updated_at": "2026-11-23T11:59:00Z", **config}
    return msg


def test_fleet_shows_each_devices_configuration(driver: Any, store: Store, base: str) -> None:
    """Running hash (short), status, reason on hover; never the document or a password."""
    from selenium.webdriver.common.by import By

    at = datetime.now(timezone.utc)
    cam1_cfg = with_config("cam-1", hash=RUNNING, revision=4, target_hash=TRIED,
                           status="rolled_back", reason=ROLLED_BACK)  # fmt: skip
    cam2_cfg = with_config("cam-2", hash=TRIED, revision=4, target_hash=TRIED,
                           status="applied", reason="restart front (source)")  # fmt: skip
    store.upsert_reported(cam1_cfg, now=at)
    store.upsert_reported(cam2_cfg, now=at)
    store.upsert_state(state("cam-3"), now=at)  # never reported a configuration
    status, _, fleet = get(f"{base}/api/fleet")
    assert status == 200
    by_id = {d["device_id"]: d["config"] for d in fleet}
    assert by_id["cam-1"]["hash"] == RUNNING and by_id["cam-1"]["status"] == "rolled_back"
    assert "rtsp://viewer:***@10.0.0.5/main" in by_id["cam-1"]["reason"]  # masked again here
    assert by_id["cam-3"] is None
    raw = urlopen(f"{base}/api/fleet", timeout=10).read().decode()
    assert PASSWORD not in raw and "document" not in raw

    driver.get(f"{base}/?refresh=1")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 3)
    cam1, cam2 = 'tr[data-device="cam-1"]', 'tr[data-device="cam-2"]'
    assert text(driver, f'{cam1} [data-field="config_hash"]') == RUNNING[:12]
    assert text(driver, f'{cam1} [data-field="config_status"]') == "rolled_back"
    hover = driver.find_element(By.CSS_SELECTOR, f'{cam1} td[data-field="config"]')
    title = hover.get_attribute("title")
    assert title.startswith("configuration rolled back: pipeline front: source rtsp://viewer:***@")
    assert f"last tried {TRIED[:12]}" in title and "desired revision 4" in title
    assert text(driver, f'{cam2} [data-field="config_hash"]') == TRIED[:12]
    assert text(driver, f'{cam2} [data-field="config_status"]') == "applied"
    cam2_title = driver.find_element(By.CSS_SELECTOR, f'{cam2} td[data-field="config"]')
    assert "last tried" not in cam2_title.get_attribute("title")  # it runs what it tried
    assert text(driver, 'tr[data-device="cam-3"] [data-field="config_hash"]') == "–"
    assert PASSWORD not in driver.page_source

    # a new attempt shows at the next refresh: the running hash stays until it is applied
    applying = with_config("cam-2", hash=TRIED, revision=5, target_hash=RUNNING,
                           status="applying", reason="add rear")  # fmt: skip
    store.upsert_reported(applying, now=at)
    assert until(driver, lambda d: text(d, f'{cam2} [data-field="config_status"]') == "applying")
    assert text(driver, f'{cam2} [data-field="config_hash"]') == TRIED[:12]
    assert not driver.find_element(By.ID, "error").is_displayed()
