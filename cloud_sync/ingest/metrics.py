"""Adapter: Prometheus metrics of an ingest worker — its counters and fleet gauges.

A custom collector reads the worker's counters and the store's fleet view at scrape time, so
nothing is double-counted and the gauges are always as fresh as the database (prometheus_client
does the exposition format and the HTTP server).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.common.errors import TransportError
from cloud_sync.ingest.worker import IngestWorker


class IngestCollector(Collector):
    """``edgefleet_ingest_messages_total{kind}``, the back-pressure figures
    (``edgefleet_ingest_unacked_*``, ``_window_full_seconds_total``, ``_store_failures_total``,
    ``_store_up``), the ``edgefleet_device_*`` and ``edgefleet_fleet_pipeline_*`` gauges and the
    ``edgefleet_fleet_zone_*``/``_line_*`` counts (skipped while the database is down)."""

    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Any]:
        msgs = CounterMetricFamily(
            "edgefleet_ingest_messages",
            "Messages stored (or dead-lettered) by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.worker.counts.items()):
            msgs.add_metric([kind], n)
        yield msgs
        yield from self._flow()
        try:
            fleet = self.worker.store.fleet()
            counts = self.worker.store.latest_counts()
        except TransportError:  # the database is down: the worker's own figures still count
            return
        online = GaugeMetricFamily("edgefleet_devices_online", "Devices whose last state is online")
        online.add_metric([], sum(1 for d in fleet if d.get("online")))
        yield online
        total = GaugeMetricFamily("edgefleet_devices", "Devices known to the ingest database")
        total.add_metric([], len(fleet))
        yield total
        labels = ["device_id", "pipeline", "model", "version"]
        # edgefleet_fleet_*: the device's own endpoint has edgefleet_pipeline_* with other labels
        fps = GaugeMetricFamily("edgefleet_fleet_pipeline_fps", "Latest output fps",
                                labels=labels)  # fmt: skip
        p95 = GaugeMetricFamily("edgefleet_fleet_pipeline_latency_p95_seconds",
                                "Latest p95 latency per frame", labels=labels)  # fmt: skip
        errors = GaugeMetricFamily("edgefleet_fleet_pipeline_errors", "Latest error count",
                                   labels=labels)  # fmt: skip
        for d in fleet:
            for p in d.get("pipelines") or []:
                key = [
                    d["device_id"],
                    str(p.get("name")),
                    str(p.get("model")),
                    str(p.get("version")),
                ]
                for family, field, scale in ((fps, "fps", 1.0), (p95, "p95_ms", 1e-3),
                                             (errors, "errors", 1.0)):  # fmt: skip
                    value = p.get(field)
                    if isinstance(value, (int, float)):
                        family.add_metric(key, float(value) * scale)
        yield fps
        yield p95
        yield errors
        yield from _count_metrics(counts)

    def _flow(self) -> Iterator[Any]:
        """Back-pressure: the unacknowledged window, time spent full, store failures."""
        w = self.worker
        window = w.window
        yield GaugeMetricFamily(
            "edgefleet_ingest_unacked_messages",
            "Messages received and not yet acknowledged (stored or dead-lettered first)",
            value=window.messages,
        )
        yield GaugeMetricFamily(
            "edgefleet_ingest_unacked_bytes", "Bytes of the unacknowledged messages",
            value=window.bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "edgefleet_ingest_window_full_seconds",
            "Time the MQTT reader waited for room (the broker held the rest meanwhile)",
            value=window.full_s,
        )
        yield CounterMetricFamily(
            "edgefleet_ingest_store_failures", "Writes that failed with the database unavailable",
            value=w.store_failures,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "edgefleet_ingest_store_up", "1 while writes succeed, else 0",
            value=0 if w.store_down_since is not None else 1,
        )  # fmt: skip


def _count_metrics(rows: list[dict[str, Any]]) -> Iterator[Any]:
    """The latest zone/line counts of every device, named as on the device's own endpoint
    with ``fleet_`` added: counters that restart from zero with the agent, which Prometheus'
    ``rate``/``increase`` handle."""
    zl = ["device_id", "pipeline", "zone", "class"]
    zone = {
        col: CounterMetricFamily(f"edgefleet_fleet_zone_{name}", doc, labels=zl)
        for col, name, doc in (
            ("entered", "entered", "Tracks that entered the zone, since the agent started"),
            ("exited", "left", "Tracks that left the zone (or ended inside it), since start"),
            ("dwell", "dwell", "Tracks that stayed in the zone its dwell time, since start"),
        )
    }
    inside = GaugeMetricFamily(
        "edgefleet_fleet_zone_objects", "Tracks inside the zone at the latest telemetry", labels=zl
    )
    crossed = CounterMetricFamily(
        "edgefleet_fleet_line_crossed",
        "Tracks that crossed the line, by direction (in, out), since the agent started",
        labels=["device_id", "pipeline", "line", "class", "direction"],
    )
    for r in rows:
        key = [r["device_id"], r["pipeline"], r["region"], r["label"]]
        if r["kind"] == "zone":
            for col, fam in zone.items():
                fam.add_metric(key, r[col])
            inside.add_metric(key, r["inside"])
        else:
            crossed.add_metric([*key, "in"], r["crossed_in"])
            crossed.add_metric([*key, "out"], r["crossed_out"])
    yield from (*zone.values(), inside, crossed)


def serve_metrics(worker: IngestWorker, port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Expose the worker's metrics on ``http://addr:port/metrics``; ``shutdown()`` stops it."""
    registry = CollectorRegistry()
    registry.register(IngestCollector(worker))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
