"""The fleet web page shows each device's zone and line counts (headless Chromium, real store)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.web import serve_web
from tests.cloud_sync.ingest.test_counts import counts_msg, line, zone
from tests.cloud_sync.ingest.test_web import driver, text, until  # noqa: F401
from tests.harness.util import free_port


def test_page_shows_counts_per_device(driver: Any, tmp_path: Path) -> None:  # noqa: F811
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
