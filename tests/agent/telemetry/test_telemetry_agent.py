"""The agent's telemetry through the outbox, against a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.topics import Topics
from agent.service import Agent
from tests.harness.broker import Mosquitto
from tests.harness.fleet import Collector, looping_agent_config
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]


def test_telemetry_flows_and_survives_a_broker_outage(
    broker: Mosquitto, synthetic_video: Path, test_models: dict[str, Path], tmp_path: Path
) -> None:
    # the broker keeps the dashboard's session across its restart (persistence on)
    conf = broker.conf.read_text().replace("persistence false", "persistence true")
    broker.conf.write_text(conf + f"persistence_location {tmp_path}/\n")
    broker.stop()
    broker.start()
    topic = Topics().device("tele-01", "telemetry")
    dash = Collector(broker, topic)
    model = test_models["blobdet"] / "model.onnx"
    cfg = looping_agent_config("tele-01", tmp_path / "data", synthetic_video, model, broker.url)
    agent = Agent(cfg)
    agent.start()
    try:
        assert wait_for(lambda: len(dash.messages) >= 5, 20)
        last = dash.messages[-1]
        assert last.device_id == "tele-01" and last.pipelines[0].name == "front"
        assert last.pipelines[0].model == "blobdet"
        # fps is per 0.2 s interval: on a loaded machine one interval can see no frame, so ask
        # for some interval with frames (a pipeline that never infers still fails this)
        assert wait_for(lambda: any(m.pipelines[0].fps_out > 0 for m in dash.messages), 20)
        assert last.device.mem_total_mb > 0 and 0 <= last.device.cpu_percent <= 100
        broker.stop()  # outage: telemetry keeps being produced into the outbox
        assert wait_for(lambda: agent.outbox.depth() >= 10, 20)
        queued = agent.outbox.depth()
        broker.start()
        assert wait_for(lambda: agent.outbox.depth() == 0, 30)
        produced = agent.telemetry.sent
        # no loss: every message produced, the ones queued during the outage included, arrived
        # (at least once; duplicates are allowed by the outbox's design)
        assert wait_for(lambda: len({m.ts for m in dash.messages}) >= produced, 10), (
            len({m.ts for m in dash.messages}),
            produced,
            queued,
        )
        # order of first arrival (a redelivered duplicate may come again later)
        firsts = list(dict.fromkeys(m.ts for m in dash.messages))
        assert firsts == sorted(firsts), "telemetry arrived out of order"
        assert agent.outbox.stats()["dropped"] == 0
    finally:
        agent.stop()
        dash.close()
