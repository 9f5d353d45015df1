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

BIN = Path(sys.executable).parent


class AgentProcess:
    def __init__(
        self, fleet: Fleet, health_window_s: float, *, max_tries: int = 3, retry_s: float = 10
    ) -> None:
        self.fleet = fleet
        self.data = fleet.tmp / "data"
        self.config = fleet.tmp / "agent.toml"
        self.config.write_text(
            f'device_id = "{fleet.device}"\n'
            f'data_dir = "{self.data}"\n'
            'profile = "x86-cpu"\n'
            "[[pipelines]]\n"
            'name = "front"\n'
            f'source = "{fleet.video}"\n'
            'model = "digits"\n'
            "loop = true\n"
            "[broker]\n"
            f'url = "{fleet.broker.url}"\n'
            "[trust]\n"
            f'root = "{fleet.repo_dir / "root.json"}"\n'
            "[update]\n"
            f"health_window_s = {health_window_s}\n"
            "health_min_frames = 5\n"
            # no test here is about latency: a loaded machine's jitter must not roll back
            "max_latency_ratio = 20.0\n"
            f"max_tries = {max_tries}\n"
            f"retry_s = {retry_s}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

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
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.data / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def running(self) -> str | None:
        pipes = self.status().get("pipelines") or [{}]
        return pipes[0].get("model")
