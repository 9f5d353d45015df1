"""A throw-away PostgreSQL server for tests (Debian's postgresql binaries, loopback port).

The ``postgres`` fixture is session-wide; ``Postgres.new_database()`` gives each test its own
database. Tests skip visibly, naming the reason, only where the server cannot start here.
``db_url`` runs a test on SQLite and on PostgreSQL; ``store`` is the ingest store on it.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.ingest.store import Store, open_store
from tests.harness.util import free_port, reap

PG_BIN = Path(os.environ.get("EDGEFLEET_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Postgres:
    """A throw-away PostgreSQL server on a free loopback port (``postgres`` user when root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None
        self._dbs = itertools.count()

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(
                f"PostgreSQL tests skipped: no {PG_BIN}/initdb (apt-get install postgresql-15)"
            )
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("PostgreSQL tests skipped: running as root and no 'postgres' user")
            self.user = "postgres"
            shutil.chown(self.dir, "postgres")
        init = subprocess.run(
            self._cmd(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "edgefleet",
                      "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"),
            capture_output=True, cwd=self.dir, timeout=60, check=False,
        )  # fmt: skip
        if init.returncode != 0:
            pytest.skip(f"PostgreSQL tests skipped: initdb failed: {init.stderr.decode()[-500:]}")
        self.proc = subprocess.Popen(
            self._cmd(str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                      "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                      "-c", "fsync=off", "-c", "full_page_writes=off"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=self.dir,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with self._admin() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return
            except sa.exc.OperationalError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode()[-500:] if self.proc.stderr else ""
                    pytest.skip(f"PostgreSQL tests skipped: postgres exited: {err}")
                time.sleep(0.1)
        pytest.skip(f"PostgreSQL tests skipped: postgres did not listen on {self.port} in 20 s")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://edgefleet@127.0.0.1:{self.port}/{db}"

    def _admin(self) -> sa.Connection:
        eng = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT",
                               poolclass=sa.pool.NullPool)  # fmt: skip
        return eng.connect()

    def new_database(self) -> str:
        name = f"t{next(self._dbs)}"
        with self._admin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            # Signal the postmaster itself: runuser does not pass SIGINT on. SIGINT is the
            # "fast" shutdown (disconnects clients); its pid is line 1 of postmaster.pid.
            try:
                pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
                os.kill(pid, signal.SIGINT)
            except (OSError, ValueError):
                self.proc.send_signal(signal.SIGINT)
            reap(self.proc, 15)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ingest.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.new_database()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """The ingest store (migrated) on ``db_url``."""
    s = open_store(db_url)
    yield s
    s.close()
