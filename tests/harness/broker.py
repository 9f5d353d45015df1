"""A real Mosquitto on a loopback port for the tests, benchmarks and fault suites: the demo's
``cloud_sync.localbroker.MosquittoBroker`` with what a test machine needs on top."""

from __future__ import annotations

import os
from pathlib import Path

from cloud_sync.localbroker import MosquittoBroker, mosquitto_path


class Mosquitto(MosquittoBroker):
    """``stop``/``start`` simulate outages (the port is kept); ``nodelay=False`` runs it with
    Mosquitto's default ``set_tcp_nodelay false`` (the transfer benchmarks compare both)."""

    def __init__(self, workdir: Path, port: int | None = None, *, nodelay: bool = True) -> None:
        super().__init__(workdir, port)
        conf = self.conf.read_text()
        if not nodelay:
            conf = conf.replace("set_tcp_nodelay true", "set_tcp_nodelay false")
        if os.geteuid() == 0:
            # as root Mosquitto drops to the 'mosquitto' user, which cannot write persistence
            # files or read keys in pytest's root-only temp dirs
            conf += "user root\n"
        self.conf.write_text(conf)

    def start(self) -> None:
        if mosquitto_path() is None:
            import pytest

            pytest.fail(
                "mosquitto is not installed; scripts/test installs it (apt-get install mosquitto)"
            )
        super().start()
