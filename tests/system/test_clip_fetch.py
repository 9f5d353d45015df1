"""Event clips fetched on demand: the local API (list, stream, auth, bad ids) and the cloud's
``edgefleet clip get`` through a real Mosquitto to the device's clip responder, with the chunk
protocol, refusals of path tricks, and the broker ACL that lets only operators ask."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.api.app import create_app
from agent.api.server import ApiServer
from agent.common.mqtt import make_client
from agent.pipeline.clips import ClipLibrary
from agent.protocol.fetch import FetchRequest, decode_response
from agent.protocol.topics import Topics
from agent.sync.clips import ClipResponder, answer
from cloud_sync.acl import render_acl
from cloud_sync.cli import main as edgefleet
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

CLIP = "gate.1700000000000"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def clips_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clip as the cutter leaves it: ``ROOT/gate/ID.mp4`` (real H.264, several chunks long)
    and its sidecar."""
    root = tmp_path_factory.mktemp("clips")
    folder = root / "gate"
    folder.mkdir()
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=640x480:rate=25", "-t", "3", "-c:v", "libx264", "-preset", "ultrafast",
         "-crf", "8", "-pix_fmt", "yuv420p", "-f", "mp4", str(folder / f"{CLIP}.mp4")],
        check=True,
    )  # fmt: skip
    meta = {"id": CLIP, "pipeline": "gate", "start": 1699999995.0, "end": 1700000005.0,
            "stream_start": 0.0, "stream_end": 3.0, "first_event": 1700000000.0,
            "last_event": 1700000000.0, "pre_s": 5.0, "post_s": 5.0, "kinds": ["crossed"],
            "complete": True}  # fmt: skip
    (folder / f"{CLIP}.json").write_text(json.dumps(meta))
    (root / "secret.txt").write_text("not a clip")
    assert (folder / f"{CLIP}.mp4").stat().st_size > 3 * 64 * 1024  # several windows
    return root


# --- the local API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(clips_root: Path) -> Iterator[str]:
    app = create_app([], token=TOKEN, clips=ClipLibrary(clips_root))
    server = ApiServer(app, "127.0.0.1", 0)
    server.start()
    yield server.url
    server.stop()
    app.state.gate.close()


def test_api_lists_and_streams_clips_with_the_bearer_token(api: str, clips_root: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api, timeout=30) as c:
        assert c.get("/v1/clips").status_code == 401
        assert c.get(f"/v1/clips/{CLIP}").status_code == 401
        listed = c.get("/v1/clips", headers=auth).json()["clips"]
        assert [m["id"] for m in listed] == [CLIP]
        assert listed[0]["bytes"] == (clips_root / "gate" / f"{CLIP}.mp4").stat().st_size
        assert c.get("/v1/clips?pipeline=other", headers=auth).json() == {"clips": []}
        r = c.get(f"/v1/clips/{CLIP}", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.content == (clips_root / "gate" / f"{CLIP}.mp4").read_bytes()
        part = c.get(f"/v1/clips/{CLIP}", headers={**auth, "Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == r.content[10:20]


@pytest.mark.parametrize(
    "path, status",
    [
        ("/v1/clips/gate.1700000000001", 404),  # well-formed, no such clip
        ("/v1/clips/..%2Fsecret.txt", 404),  # the router decodes %2F: no route matches
        ("/v1/clips/..%2F..%2Fetc%2Fpasswd", 404),
        ("/v1/clips/gate", 400),
        (f"/v1/clips/{CLIP}.mp4", 400),
        ("/v1/clips/%2e%2e", 400),
        ("/v1/clips?pipeline=..%2Fgate", 400),
    ],
)
def test_api_refuses_bad_clip_ids_and_path_traversal(api: str, path: str, status: int) -> None:
    with httpx.Client(base_url=api, timeout=30) as c:
        r = c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == status and "error" in r.json()


# --- the chunk responder -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, status",
    [
        (f"clips/{CLIP}.mp4", "ok"),
        ("clips/gate.1700000000001.mp4", "not_found"),
        ("clips/secret.txt", "bad_request"),
        (f"clips/gate/{CLIP}.mp4", "bad_request"),
        (f"clips/{CLIP}", "bad_request"),
        ("targets/models/det/1.0.0/model.onnx", "bad_request"),
        ("metadata/1.root.json", "bad_request"),
    ],
)
def test_responder_answers_only_clip_paths(clips_root: Path, path: str, status: str) -> None:
    req = FetchRequest(id="r1", path=path, offset=5, length=100).encode()
    header, data = answer(ClipLibrary(clips_root), req)
    assert (header.id, header.status) == ("r1", status)
    if status == "ok":
        assert data == (clips_root / "gate" / f"{CLIP}.mp4").read_bytes()[5:105]
        assert header.total == (clips_root / "gate" / f"{CLIP}.mp4").stat().st_size
    else:
        assert data == b"" and header.error


def test_responder_refuses_climbing_paths_before_the_disk(clips_root: Path) -> None:
    from agent.protocol.wire import BadMessage

    for path in ("clips/../secret.txt", "clips/../../etc/passwd"):
        raw = json.dumps({"id": "r", "path": path, "offset": 0, "length": 10}).encode()
        with pytest.raises(BadMessage, match="climbs out"):
            answer(ClipLibrary(clips_root), raw)


# --- the cloud fetch through a real broker ------------------------------------------------------


@pytest.fixture
def device(broker: Mosquitto, clips_root: Path) -> Iterator[ClipResponder]:
    client = make_client("edgefleet-dev-1")
    responder = ClipResponder(client, "dev-1", ClipLibrary(clips_root))
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: (responder.subscribe(), subscribed.set())
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    assert subscribed.wait(10)
    yield responder
    client.disconnect()
    client.loop_stop()


@pytest.mark.broker
@pytest.mark.video
def test_edgefleet_clip_get_downloads_the_clip_over_mqtt(
    broker: Mosquitto, device: ClipResponder, clips_root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "got.mp4"
    rc = edgefleet(["clip", "get", "dev-1", CLIP, "-o", str(out), "--broker", broker.url])
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes() == (clips_root / "gate" / f"{CLIP}.mp4").read_bytes()
    assert device.answered >= 4  # several windows
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0",
         str(out)],
        capture_output=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == b"h264"
    # a clip the device does not have: a clear error, no file
    missing = tmp_path / "missing.mp4"
    rc = edgefleet(["clip", "get", "dev-1", "gate.1700000000001", "-o", str(missing),
                    "--broker", broker.url, "--timeout", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "has no clip gate.1700000000001" in err and not missing.exists()
    # a malformed id never leaves the operator's machine
    rc = edgefleet(["clip", "get", "dev-1", "../secret", "--broker", broker.url])
    assert rc == 2 and "PIPELINE.MILLISECONDS" in capsys.readouterr().err


@pytest.mark.broker
def test_responder_drops_junk_and_answers_refusals_on_the_broker(
    broker: Mosquitto, device: ClipResponder
) -> None:
    topics = Topics()
    answers: list[bytes] = []
    op = make_client("edgefleet-op")
    op.on_message = lambda _c, _u, m: answers.append(m.payload)
    op.connect("127.0.0.1", broker.port)
    op.loop_start()
    try:
        op.subscribe(topics.device("dev-1", "clips/resp"), qos=1)
        req = topics.device("dev-1", "clips/req")
        op.publish(req, b"\xff not json", qos=1).wait_for_publish(5)
        op.publish(req, json.dumps({"id": "x", "path": "clips/../secret.txt", "offset": 0,
                                    "length": 9}).encode(), qos=1).wait_for_publish(5)  # fmt: skip
        op.publish(req, FetchRequest(id="y", path="clips/secret.txt", offset=0,
                                     length=9).encode(), qos=1).wait_for_publish(5)  # fmt: skip
        assert wait_for(lambda: answers, timeout=30)
        assert wait_for(lambda: device.guard.rejected >= 2, timeout=30)  # junk: no answer
        [only] = answers
        header, data = decode_response(only)
        assert (header.id, header.status, data) == ("y", "bad_request", b"")
    finally:
        op.disconnect()
        op.loop_stop()


def test_acl_lets_operators_ask_and_each_device_answer_only_its_own_clips() -> None:
    acl = render_acl("edgefleet/v1", [("op:alice", "operator"), ("svc:ingest", "ingest"),
                                      ("svc:registry", "registry")])  # fmt: skip
    lines = acl.splitlines()
    assert "pattern write edgefleet/v1/devices/%u/clips/resp" in lines
    assert "pattern read edgefleet/v1/devices/%u/clips/req" in lines
    block = acl.split("user op:alice")[1].split("\n\n")[0]
    assert "topic write edgefleet/v1/devices/+/clips/req" in block
    assert "topic read edgefleet/v1/devices/+/clips/resp" in block
    for other in ("user svc:ingest", "user svc:registry"):
        assert "clips/" not in acl.split(other)[1].split("\n\n")[0]
    # a device may not write requests (its own or anyone's) nor read other devices' answers
    assert not any("clips/req" in ln and ln.startswith("pattern write") for ln in lines)
    assert not any("clips/resp" in ln and ln.startswith("pattern read") for ln in lines)
