"""``edgefleet-agent run`` as a child process on a ``Fleet``'s registry, broker and video:
kill -9, restart, and what its ``status.json`` says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness.fleet import Fleet
from tests.harness.util import terminate

BIN = Path(sys.executable).parent


class AgentProcess:
    def __init__(
        self, fleet: Fleet, health_window_s: float, *, max_tries: int = 3, retry_s: float = 10
    ) -> None:
        self.fleet = fleet
        self.health_window_s = health_window_s
        self.data = fleet.tmp / "data"
        self.config = fleet.tmp / "agent.toml"
        self.write_config(
            str(fleet.video),
            pipeline="loop = true\n",
            update=f"max_tries = {max_tries}\nretry_s = {retry_s}\n",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(
        self,
        source: str,
        *,
        pipeline: str = "",
        sections: str = "",
        update: str = "",
        model: str = "digits",
    ) -> None:
        """The agent's config: one pipeline ``front`` running ``model`` (the registry's digits
        model by default, or a local ``.onnx`` file) on ``source``,
        the fleet's broker and root, the health window given at construction; ``pipeline``,
        ``sections`` and ``update`` are TOML lines added to the pipeline, before ``[update]``
        and to it."""
        fleet = self.fleet
        self.config.write_text(
            f'device_id = "{fleet.device}"\n'
            f'data_dir = "{self.data}"\n'
            'profile = "x86-cpu"\n'
            "[[pipelines]]\n"
            'name = "front"\n'
            f'source = "{source}"\n'
            f'model = "{model}"\n'
            f"{pipeline}"
            "[broker]\n"
            f'url = "{fleet.broker.url}"\n'
            "[trust]\n"
            f'root = "{fleet.repo_dir / "root.json"}"\n'
            f"{sections}"
            "[update]\n"
            f"health_window_s = {self.health_window_s}\n"
            "health_min_frames = 5\n"
            # no test here is about latency: a loaded machine's jitter must not roll back
            "max_latency_ratio = 100.0\n"  # as TEST_UPDATE (harness/fleet.py)
            f"{update}"
        )

    def start(self, **env: str) -> None:
        with open(self.fleet.tmp / "agent.log", "ab") as log:  # kept for failure analysis
            self.proc = subprocess.Popen(
                [str(BIN / "edgefleet-agent"), "run", "--config", str(self.config)],
                env={**os.environ, "XDG_CACHE_HOME": str(self.fleet.tmp / "cache"), **env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc, 20)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.data / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def running(self) -> str | None:
        pipes = self.status().get("pipelines") or [{}]
        return pipes[0].get("model")
