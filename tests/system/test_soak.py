"""The memory soak (scripts/soak.py): its arithmetic, and a short run of the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import soak


def test_growth_compares_window_medians_after_the_warmup() -> None:
    # flat at 100 MB after a warm-up ramp, one outlier spike: no growth
    flat = [(t, 50_000 + 500 * t if t < 100 else 100_000) for t in range(0, 1000, 10)]
    flat[60] = (600, 400_000)
    g = soak.growth(flat, warmup_s=100, window_s=200)
    assert g["baseline_kb"] == 100_000 and g["final_kb"] == 100_000 and g["growth_pct"] == 0.0
    # a steady leak of 10 % over the run is seen
    leak = [(t, 100_000 + 12 * t) for t in range(0, 1000, 10)]
    assert soak.growth(leak, warmup_s=100, window_s=200)["growth_pct"] > 5.0


def test_growth_refuses_a_run_too_short_for_its_windows() -> None:
    with pytest.raises(ValueError, match="too short"):
        soak.growth([(t, 1000) for t in range(0, 300, 10)], warmup_s=100, window_s=200)


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.video
def test_short_soak_drops_the_stream_updates_the_model_and_samples_rss(tmp_path: Path) -> None:
    result = soak.run_soak(
        26.0, tmp_path, drop_every_s=8.0, drop_for_s=2.5, update_every_s=14.0,
        sample_every_s=1.0, health_window_s=1.0,
    )  # fmt: skip
    summary = soak.summarize(result, warmup_s=4.0, window_s=7.0, max_growth=50.0)
    assert not summary["problems"], summary
    assert summary["drops"] >= 2 and summary["reconnects"] >= 1, summary
    assert summary["updates"] >= 1 and summary["updates_committed"] == summary["updates"]
    assert all(s.rss_kb > 10_000 for s in result.samples)
    assert {s.source_state for s in result.samples} >= {"streaming"}
    assert result.samples[-1].model == f"digits@1.{summary['updates']}.0"
