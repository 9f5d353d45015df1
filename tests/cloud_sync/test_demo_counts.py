"""`edgefleet demo` counts the squares crossing its line on the device and shows the count as the
fleet sees it (read back from the ingest database the demo fills), and fetches the event clip the
device cut around a crossing over MQTT, as `edgefleet clip get` does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.ingest.store import open_store

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
COUNTS = re.compile(r"fleet counts: line middle blob: in (\d+) out (\d+)")
CLIP = re.compile(r"clip (front\.\d+): \d+ kB cut on the device .* to (\S+\.mp4)")


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.video
def test_demo_shows_the_line_count_from_the_ingest_database(tmp_path: Path) -> None:
    """20 s of live output: the square circles once every 10 s and crosses the middle line
    twice a lap, so at least one crossing reaches the fleet side, and its clip (2 s pre and
    post roll) is cut and fetched."""
    r = subprocess.run(
        [EDGEFLEET, "demo", "--duration", "20", "--workdir", str(tmp_path), "--broker",
         "mosquitto"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    seen = [(int(a), int(b)) for a, b in COUNTS.findall(r.stdout)]
    assert seen, r.stdout
    # counts since the agent started never go down; the last one is in the "done" line
    ins, outs = [a for a, _ in seen], [b for _, b in seen]
    assert ins == sorted(ins) and outs == sorted(outs), seen
    assert sum(seen[-1]) >= 1, r.stdout
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        [row] = store.latest_counts("demo-01")
    finally:
        store.close()
    assert (row["kind"], row["region"], row["label"]) == ("line", "middle", "blob")
    # the database holds what was printed, or more if a last telemetry came in as the agent
    # stopped
    assert row["crossed_in"] >= seen[-1][0] and row["crossed_out"] >= seen[-1][1], (row, seen)
    done = r.stdout.strip().splitlines()[-1]
    assert done.startswith("==> done:") and "fleet counts: line middle blob" in done
    # the clip: cut on the device from the H.264 camera stream, fetched over MQTT unchanged
    [(clip_id, fetched)] = CLIP.findall(r.stdout)
    on_device = tmp_path / "data" / "clips" / "front" / f"{clip_id}.mp4"
    assert Path(fetched).read_bytes() == on_device.read_bytes()
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", fetched],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert float(probe.stdout) >= 4.0 - 1.0  # pre + post roll, within a GOP (1 s)
    assert done.endswith(f"clip {clip_id}; everything is kept in {tmp_path}")
