"""Adapter: the device's own Prometheus endpoint — the telemetry message, as metrics.

Off by default; ``[telemetry] prometheus_port`` turns it on, bound to loopback unless
``prometheus_addr`` says otherwise. Each scrape builds one ``Telemetry`` snapshot (its own
reader, so it does not shorten the MQTT reporter's fps windows) and maps every field to a
metric: the same numbers the cloud gets, for a local Prometheus or node-exporter-style setup.
Units follow Prometheus conventions (seconds, bytes); names start with ``edgefleet_``.

Stage latency is a summary (``edgefleet_pipeline_latency_seconds{stage,quantile}`` with
``_sum``/``_count``): quantiles over the recent frames (the telemetry's rings), sum and count
since the start, as client-side summaries are (a gauge may not carry ``quantile``: promtool
refuses it). Zone and line counts are counters per pipeline, zone or line, and class;
``tests/system/test_promtool.py`` runs ``promtool check metrics`` on a real scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from agent.protocol.telemetry import Telemetry
from agent.telemetry.reporter import TelemetrySnapshot

MIB = 1024 * 1024
_COUNTERS = (
    ("frames_read", "Frames read from the source"),
    ("frames_inferred", "Frames inferred"),
    ("frames_dropped", "Frames overwritten in the latest-frame slot"),
    ("reconnects", "Source reconnects"),
    ("errors", "Inference and sink errors"),
)


def _pipeline_metrics(t: Telemetry) -> Iterator[Any]:
    lab = ["pipeline"]
    info = InfoMetricFamily("edgefleet_pipeline_model", "Model running in the pipeline", labels=lab)
    fps = GaugeMetricFamily(
        "edgefleet_pipeline_fps", "Frames per second since the last scrape", labels=[*lab, "stage"]
    )
    up = GaugeMetricFamily(
        "edgefleet_pipeline_source_up", "1 while the source is streaming", labels=lab
    )
    lat = SummaryMetricFamily(
        "edgefleet_pipeline_latency_seconds",
        "Per-stage latency: quantiles over the recent frames, sum and count since start",
        labels=[*lab, "stage"],
    )
    counters = {
        k: CounterMetricFamily(f"edgefleet_pipeline_{k}", doc, labels=lab) for k, doc in _COUNTERS
    }
    skipped = CounterMetricFamily(
        "edgefleet_pipeline_frames_skipped",
        "Frames not inferred, by reason (max_fps, no_motion)",
        labels=[*lab, "reason"],
    )
    for p in t.pipelines:
        info.add_metric([p.name], {
            "model": p.model or "", "version": p.version or "",
            "backend": p.backend or "", "precision": p.precision or "",
        })  # fmt: skip
        fps.add_metric([p.name, "in"], p.fps_in)
        fps.add_metric([p.name, "out"], p.fps_out)
        up.add_metric([p.name], 1.0 if p.source_state == "streaming" else 0.0)
        for key, fam in counters.items():
            fam.add_metric([p.name], float(getattr(p, key)))
        for reason, n in sorted(p.frames_skipped.items()):
            skipped.add_metric([p.name, reason], n)
        for stage, q in p.latency_ms.items():
            for name, ms in (("0.5", q.p50), ("0.95", q.p95), ("0.99", q.p99)):
                lat.add_sample(
                    lat.name, {"pipeline": p.name, "stage": stage, "quantile": name}, ms / 1e3
                )
            lat.add_metric([p.name, stage], q.count or 0, (q.sum_ms or 0.0) / 1e3)
    yield from (info, fps, up, lat, *counters.values(), skipped)
    yield from _analytics_metrics(t)


def _analytics_metrics(t: Telemetry) -> Iterator[Any]:
    """Tracks and the running zone/line counts of every pipeline."""
    tracks = GaugeMetricFamily(
        "edgefleet_pipeline_tracks", "Tracks alive (seen or briefly lost)", labels=["pipeline"]
    )
    started = CounterMetricFamily(
        "edgefleet_pipeline_tracks_started", "Track ids issued", labels=["pipeline"]
    )
    zl = ["pipeline", "zone", "class"]
    zone = {
        k: CounterMetricFamily(f"edgefleet_zone_{k}", doc, labels=zl)
        for k, doc in (
            ("entered", "Tracks that entered the zone"),
            ("left", "Tracks that left the zone (or ended inside it)"),
            ("dwell", "Tracks that stayed in the zone its dwell time"),
        )
    }
    inside = GaugeMetricFamily("edgefleet_zone_objects", "Tracks inside the zone now", labels=zl)
    crossed = CounterMetricFamily(
        "edgefleet_line_crossed",
        "Tracks that crossed the line, by direction (in, out)",
        labels=["pipeline", "line", "class", "direction"],
    )
    for p in t.pipelines:
        if p.tracks_active is not None:
            tracks.add_metric([p.name], p.tracks_active)
            started.add_metric([p.name], p.tracks_started or 0)
        for z in p.zones:
            key = [p.name, z.zone, z.label]
            for k, fam in zone.items():
                fam.add_metric(key, getattr(z, k))
            inside.add_metric(key, z.inside)
        for ln in p.lines:
            crossed.add_metric([p.name, ln.line, ln.label, "in"], ln.crossed_in)
            crossed.add_metric([p.name, ln.line, ln.label, "out"], ln.crossed_out)
    yield from (tracks, started, *zone.values(), inside, crossed)


def _device_metrics(t: Telemetry) -> Iterator[Any]:
    d = t.device

    def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"edgefleet_device_{name}", doc)
        if value is not None:
            g.add_metric([], value)
        return g

    yield gauge("cpu_ratio", "CPU use over all cores (0..1)", d.cpu_percent / 100)
    yield gauge("load1", "1-minute load average", d.load1)
    yield gauge("memory_used_bytes", "Memory in use", d.mem_used_mb * MIB)
    yield gauge("memory_total_bytes", "Memory installed", d.mem_total_mb * MIB)
    yield gauge("disk_used_ratio", "Data-dir filesystem use (0..1)", d.disk_used_pct / 100)
    gpu = None if d.gpu_load_pct is None else d.gpu_load_pct / 100
    yield gauge("gpu_load_ratio", "GPU load (0..1), absent where not exposed", gpu)
    emc = None if d.emc_load_pct is None else d.emc_load_pct / 100
    yield gauge("emc_load_ratio", "Jetson memory-controller load (0..1)", emc)
    temp = GaugeMetricFamily(
        "edgefleet_device_temperature_celsius", "Thermal zone temperature", labels=["zone"]
    )
    for zone, c in sorted(d.temperatures_c.items()):
        temp.add_metric([zone], c)
    yield temp
    power = GaugeMetricFamily("edgefleet_device_power_watts", "Power rail", labels=["rail"])
    for rail, mw in sorted(d.power_mw.items()):
        power.add_metric([rail], mw / 1e3)
    yield power
    yield gauge("outbox_depth", "Messages waiting in the outbox", t.outbox.depth)
    yield gauge("outbox_bytes", "Payload bytes waiting in the outbox", t.outbox.bytes)
    dropped = CounterMetricFamily(
        "edgefleet_device_outbox_dropped", "Messages dropped because the outbox was full"
    )
    dropped.add_metric([], t.outbox.dropped)
    yield dropped


class TelemetryCollector(Collector):
    """Maps one ``Telemetry`` snapshot per scrape to Prometheus metric families."""

    def __init__(self, snapshot: TelemetrySnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        t = self.snapshot.build()
        yield from _pipeline_metrics(t)
        yield from _device_metrics(t)


def serve_device_metrics(snapshot: TelemetrySnapshot, port: int, addr: str) -> WSGIServer:
    """Serve ``http://addr:port/metrics``; ``shutdown()`` and ``server_close()`` stop it."""
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(snapshot))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
