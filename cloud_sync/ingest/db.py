"""Adapter: the connection to the ingest database — engine settings per backend, error mapping.

``make_engine`` opens SQLite (WAL, real transactions, a busy timeout) or PostgreSQL; ``guard``
maps driver errors to the project's two roots (bad data, or a store that may come back). The
store (``store.py``), the migrations (``schema.py``) and the rollout adapters go through both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from agent.common.errors import BadDataError, TransportError

SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits this long for SQLite's lock (URL ?timeout=S)


class StoreUnavailable(TransportError):
    """The database could not be reached or was busy; the write may be retried."""


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` (WAL, foreign keys, real transactions) or PostgreSQL.

    A SQLite writer waits ``SQLITE_BUSY_TIMEOUT_S`` for another writer's lock, or what the URL
    says (``sqlite:///path?timeout=2``), then fails as ``StoreUnavailable``.
    """
    if url.startswith("sqlite"):
        given = sa.engine.make_url(url).query.get("timeout", str(SQLITE_BUSY_TIMEOUT_S))
        timeout = float(given if isinstance(given, str) else given[-1])
        engine = sa.create_engine(url, connect_args={"timeout": timeout})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # The sqlite3 module's own transaction handling skips BEGIN before DDL, which would
            # make migrations non-atomic: take control of BEGIN ourselves (SQLAlchemy recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint, never corrupt
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE: take the write lock up front, so a writer waits (busy timeout) instead
            # of failing when its read snapshot goes stale mid-transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Wrap driver errors into the two roots: bad data or a store that may come back.

    Besides the driver's own errors: a pool that hands out no connection in time is a store
    that may come back; a value the driver cannot bind (a StatementError, or sqlite3's bare
    OverflowError for an integer beyond 64 bits) is bad data.
    """
    try:
        yield
    except (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError) as e:
        raise BadDataError(f"{what} rejected by the database: {str(e.orig)[:300]}") from e
    except sa_exc.DBAPIError as e:
        raise StoreUnavailable(f"{what} failed, database unavailable: {str(e.orig)[:300]}") from e
    except (sa_exc.TimeoutError, sa_exc.DisconnectionError) as e:
        raise StoreUnavailable(f"{what} failed, no database connection: {e}") from e
    except sa_exc.StatementError as e:
        raise BadDataError(f"{what} rejected by the driver: {str(e.orig)[:300]}") from e
    except OverflowError as e:  # sqlite3 raises it as is; SQLAlchemy does not wrap it
        raise BadDataError(f"{what} rejected by the driver: {e}") from e
