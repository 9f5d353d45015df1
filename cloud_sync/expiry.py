"""Adapter: what expires when, as Prometheus metrics for node_exporter's textfile collector.

``edgefleet ca status --textfile F`` (run by the daily CRL timer) and ``edgefleet registry
status --textfile F`` write, for everything the fleet's trust hangs on (the CA, the broker's
and every identity's certificate, the CRL, each TUF role)::

    edgefleet_expiry_timestamp_seconds{component="ca",what="crl"} 1.7968e+09
    edgefleet_expiry_level{component="registry",what="root"} 1    # 0 ok, 1 warn, 2 expired

so a dashboard shows the days left and an alert fires weeks ahead, e.g.
``edgefleet_expiry_level > 0`` or ``edgefleet_expiry_timestamp_seconds - time() < 14 * 86400``.
The file is written with prometheus_client's ``write_to_textfile`` (temp file + rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

LEVELS = {"ok": 0, "warn": 1, "expired": 2}

Row = tuple[str, str, datetime, str]  # (component, what, expires, level)


def expiry_registry(rows: Iterable[Row]) -> CollectorRegistry:
    """A registry holding the two gauges for ``rows``.

    Raises:
        ValueError: a level other than ok / warn / expired.
    """
    reg = CollectorRegistry()
    when = Gauge("edgefleet_expiry_timestamp_seconds", "When it expires (Unix time)",
                 ["component", "what"], registry=reg)  # fmt: skip
    level = Gauge("edgefleet_expiry_level", "0 ok, 1 expires soon (warn), 2 expired",
                  ["component", "what"], registry=reg)  # fmt: skip
    for component, what, expires, lv in rows:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r} for {component} {what}")
        when.labels(component, what).set(expires.timestamp())
        level.labels(component, what).set(LEVELS[lv])
    return reg


def write_textfile(path: Path, rows: Iterable[Row]) -> Path:
    """Write ``rows`` to ``path`` in the text format (atomically); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), expiry_registry(rows))
    # readable by node_exporter's user whatever the writer's umask (the CRL unit's is 0077):
    # dates and levels, nothing secret
    os.chmod(path, 0o644)
    return path
