"""The agent's log file and its extracts, the uploads folder, and the responder serving uploads
on clips/req: real files, real logging, the real chunk-protocol answer function."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.protocol.fetch import FetchRequest
from agent.protocol.wire import BadMessage
from agent.sync.clips import answer
from agent.sync.uploads import UploadNotFound, UploadStore, valid_upload_id
from agent.telemetry.logfile import collect_since, install_file_log, log_files

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@pytest.fixture
def file_log(tmp_path: Path) -> Iterator[logging.Logger]:
    """The agent's file log under ``tmp_path`` (removed after the test) and a logger into it."""
    handler = install_file_log(tmp_path)
    log = logging.getLogger("test.filelog")
    log.setLevel(logging.INFO)
    yield log
    handler.flush()
    logging.getLogger().removeHandler(handler)
    handler.close()


def log_text(tmp_path: Path) -> str:
    for h in logging.getLogger().handlers:
        h.flush()
    return (tmp_path / "logs" / "agent.log").read_text()


def test_the_file_log_has_utc_stamps_and_rotates(file_log: logging.Logger, tmp_path: Path) -> None:
    file_log.info("known line %s", "xyz")
    assert "INFO test.filelog known line xyz" in log_text(tmp_path)
    lines, n = collect_since(log_files(tmp_path), datetime.now(timezone.utc)
                             - timedelta(minutes=1), 1 << 20)  # fmt: skip
    assert b"known line xyz" in lines and n >= 1


def test_the_file_log_masks_camera_passwords(file_log: logging.Logger, tmp_path: Path) -> None:
    # the file is what upload_logs sends off the device: it must get the redaction filter too
    file_log.info("opening %s", "rtsp://admin:hunter2pw@10.0.0.5/stream")
    text = log_text(tmp_path)
    assert "rtsp://admin:***@10.0.0.5/stream" in text and "hunter2pw" not in text


def test_collect_since_keeps_newest_whole_lines_and_continuations(tmp_path: Path) -> None:
    old, new = tmp_path / "agent.log.1", tmp_path / "agent.log"
    old.write_text(f"{stamp(T0 - timedelta(hours=2))} INFO a too old\n"
                   f"{stamp(T0 - timedelta(minutes=30))} ERROR a boom\n"
                   "Traceback (most recent call last):\n  File x\n")  # fmt: skip
    new.write_text("".join(f"{stamp(T0 + timedelta(seconds=i))} INFO a line {i}\n"
                           for i in range(100)))  # fmt: skip
    text, n = collect_since([old, tmp_path / "gone.log", new], T0 - timedelta(hours=1), 1 << 20)
    assert b"too old" not in text and b"boom\nTraceback" in text and b"  File x\n" in text
    assert n == 3 + 100
    tail, m = collect_since([old, new], T0 - timedelta(hours=1), 200)
    assert len(tail) <= 200 and tail.endswith(b"line 99\n")
    assert tail.startswith(stamp(T0)[:4].encode()) and m == tail.count(b"\n")


def test_uploads_are_bounded_and_ids_cannot_escape(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    store = UploadStore(tmp_path / "uploads", max_files=3, max_age_s=3600, clock=lambda: now[0])
    ids = []
    for i in range(5):
        now[0] += 1
        ids.append(store.put("logs", b"x" * i))
    assert all(valid_upload_id(u) for u in ids)
    kept = sorted(p.name for p in (tmp_path / "uploads").iterdir())
    assert len(kept) == 3 and set(kept) <= set(ids)
    (tmp_path / "secret.txt").write_text("no")
    for bad in ["../secret.txt", "logs-1/../../secret.txt", "secret.txt", "", ".."]:
        with pytest.raises(ValueError):
            store.path(bad)
    with pytest.raises(UploadNotFound):
        store.path("logs-1700000000000-abcdef.log.gz")
    link = tmp_path / "uploads" / "snapshot-1700000000000-abcdef.jpg"
    os.symlink(tmp_path / "secret.txt", link)
    with pytest.raises(UploadNotFound):
        store.path(link.name)  # a planted symlink is not followed
    os.utime(store.path(kept[0]), (0, 0))  # older than max_age_s
    store.clean()
    assert not (tmp_path / "uploads" / kept[0]).exists()


def test_the_responder_serves_uploads_and_refuses_other_paths(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads")
    upload = store.put("logs", b"0123456789")

    def ask(path: str, offset: int = 0) -> tuple[str, bytes]:
        req = FetchRequest(id="r1", path=path, offset=offset, length=4)
        header, data = answer(None, req.model_dump_json().encode(), store)
        return header.status, data

    assert ask(f"uploads/{upload}", 4) == ("ok", b"4567")
    assert ask("uploads/logs-1700000000000-abcdef.log.gz")[0] == "not_found"
    assert ask("uploads/agent.log")[0] == "bad_request"
    assert ask("uploads/commands/replay.json")[0] == "bad_request"
    with pytest.raises(BadMessage):  # '..' does not even parse as a request
        ask("uploads/x/../../commands/replay.json")
    assert ask("clips/gate.1700000000000.mp4")[0] == "not_found"  # no pipeline records clips
    header, _ = answer(None, FetchRequest(id="r", path=f"uploads/{upload}", offset=0,
                                          length=4).model_dump_json().encode())  # fmt: skip
    assert header.status == "not_found"  # a responder without an upload store
