"""Adapter: the agent's own log file under ``DATA_DIR/logs`` and extracts of it since a time.

The agent logs to stderr (journald under systemd) and, for ``edgefleet-agent run``, also to
``DATA_DIR/logs/agent.log``: rotating, ``BACKUPS + 1`` files of at most ``MAX_FILE_BYTES`` each,
so logs can be pulled remotely (``upload_logs``) on devices and in containers without
journald. Each line starts with its UTC time (``2026-01-15T08:30:00.123Z``), which is how
``collect_since`` picks lines; lines without one (a traceback's) go with the line before.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import time
from datetime import datetime, timezone
from pathlib import Path

LOG_DIR = "logs"
LOG_FILE = "agent.log"
MAX_FILE_BYTES = 1 << 20
BACKUPS = 3
_STAMP = re.compile(rb"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3})Z ")


class UtcFormatter(logging.Formatter):
    """``2026-01-15T08:30:00.123Z LEVEL logger message``, one line per event."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed: (float | None) -> …

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s",
                         "%Y-%m-%dT%H:%M:%S")  # fmt: skip


def install_file_log(data_dir: Path, level: int | None = None) -> logging.Handler:
    """Add the rotating ``DATA_DIR/logs/agent.log`` handler to the root logger; returns it.

    Raises:
        OSError: the folder or file cannot be created.
    """
    folder = data_dir / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        folder / LOG_FILE, maxBytes=MAX_FILE_BYTES, backupCount=BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(UtcFormatter())
    if level is not None:
        handler.setLevel(level)
    logging.getLogger().addHandler(handler)
    from agent.protocol.sealed import install_redaction

    install_redaction()  # camera passwords never reach the file the cloud can pull
    return handler


def log_files(data_dir: Path) -> list[Path]:
    """The log files, oldest first (``agent.log.3`` … ``agent.log``)."""
    folder = data_dir / LOG_DIR
    names = [f"{LOG_FILE}.{i}" for i in range(BACKUPS, 0, -1)] + [LOG_FILE]
    return [folder / n for n in names if (folder / n).is_file()]


def _line_time(line: bytes) -> float | None:
    m = _STAMP.match(line)
    if m is None:
        return None
    try:
        t = datetime.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S.%f")
    except ValueError:
        return None
    return t.replace(tzinfo=timezone.utc).timestamp()


def collect_since(files: list[Path], since: datetime, max_bytes: int) -> tuple[bytes, int]:
    """The lines written at or after ``since``, the newest ``max_bytes`` of them (whole lines);
    with their number.

    A file that vanishes meanwhile (rotated away) is skipped.
    """
    start = since.timestamp()
    kept: list[bytes] = []
    keep = False
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.splitlines(keepends=True):
            t = _line_time(line)
            if t is not None:
                keep = t >= start
            if keep:
                kept.append(line)
    total, first = 0, len(kept)
    while first > 0 and total + len(kept[first - 1]) <= max_bytes:
        first -= 1
        total += len(kept[first])
    out = kept[first:]
    return b"".join(out), len(out)
