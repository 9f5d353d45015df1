"""Adapter: the ingest store, SQLAlchemy Core over SQLite (default) or PostgreSQL (at scale).

``Store`` is its writes (``writes.py``) and reads (``reads.py``) over one engine (``db.py``);
messages become rows in ``rows.py``, the tables and their migrations are in ``schema.py``, and
``open_store`` applies the missing migrations.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.reads import StoreReads
from cloud_sync.ingest.schema import migrate
from cloud_sync.ingest.writes import StoreWrites


class Store(StoreWrites, StoreReads):
    """Writes and reads of the ingest database; one per process, thread-safe (engine pool)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()


def open_store(url: str) -> Store:
    """Open (and migrate to ``LATEST``) the store at ``sqlite:///path`` or
    ``postgresql+psycopg://user@host:port/db``.

    Raises:
        StoreUnavailable: the database cannot be reached.
        BadDataError: its schema is newer than this code.
    """
    engine = make_engine(url)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)
