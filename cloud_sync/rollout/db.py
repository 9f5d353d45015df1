"""Adapter: rollouts in the ingest database (table ``rollouts``, schema version 5).

One row per rollout: the operator's ``RolloutSpec`` and the ``RolloutState`` the last decision
returned, both as JSON, plus an integer ``rev`` for optimistic concurrency. ``save`` writes
only when the row still has the ``rev`` the caller read, so two controllers (or a controller
and an operator's ``pause``) never overwrite each other's decision: the loser gets
``ConcurrentUpdate`` and decides again from the fresh row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from agent.common.errors import BadDataError, TransportError
from cloud_sync.ingest.db import guard
from cloud_sync.ingest.schema import ROLLOUTS
from cloud_sync.ingest.store import Store
from cloud_sync.rollout.lease import Fence
from cloud_sync.rollout.lease_db import check_fence
from cloud_sync.rollout.state import ACTIVE, RolloutSpec, RolloutState


class RolloutNotFound(BadDataError):
    """No rollout with this id.

    Attributes:
        rollout_id: the id asked for.
    """

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"no rollout {rollout_id!r} in the database; `edgefleet rollout status` lists them"
        )
        self.rollout_id = rollout_id


class RolloutExists(BadDataError):
    """A rollout with this id is already recorded."""


class ConcurrentUpdate(TransportError):
    """The rollout changed since it was read (another controller or an operator command).

    A retryable error (the ``TransportError`` root): read the row again and decide again.

    Attributes:
        rollout_id: the rollout.
        expected_rev: the revision the caller read.
        actual_rev: the revision in the database now (None: the row is gone).
    """

    def __init__(self, rollout_id: str, expected_rev: int, actual_rev: int | None) -> None:
        super().__init__(
            f"rollout {rollout_id} changed while this decision was made (read revision "
            f"{expected_rev}, database has {actual_rev}); nothing saved, decide again"
        )
        self.rollout_id = rollout_id
        self.expected_rev = expected_rev
        self.actual_rev = actual_rev


@dataclass(frozen=True)
class RolloutRow:
    """One stored rollout.

    Attributes:
        spec: what the operator asked for.
        state: where it stands.
        created_at: when it was recorded.
        updated_at: when its state was last saved.
        rev: the row's revision; pass it back to ``save``.
    """

    spec: RolloutSpec
    state: RolloutState
    created_at: datetime
    updated_at: datetime
    rev: int

    @property
    def id(self) -> str:
        """The rollout id."""
        return self.spec.id


def _row(r: sa.Row[tuple[object, ...]]) -> RolloutRow:
    m = r._mapping
    return RolloutRow(
        spec=RolloutSpec.model_validate(m["spec"]),
        state=RolloutState.model_validate(m["state"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        rev=int(m["rev"]),
    )


def create(store: Store, spec: RolloutSpec, state: RolloutState, now: datetime) -> RolloutRow:
    """Record a new rollout (``rev`` 1).

    Raises:
        RolloutExists: the id is taken.
        StoreUnavailable: the database cannot be reached.
    """
    # a configuration rollout fills the (NOT NULL) model columns with "(config)" and its hash
    model = spec.model if spec.config is None else "(config)"
    version = spec.version if spec.config is None else spec.config.hash[:12]
    row = {
        "id": spec.id, "model": model, "version": version, "pipeline": spec.pipeline,
        "status": state.status, "spec": spec.model_dump(mode="json"),
        "state": state.model_dump(mode="json"), "created_at": now, "updated_at": now, "rev": 1,
    }  # fmt: skip
    with guard(f"create rollout {spec.id}"), store.engine.begin() as conn:
        taken = conn.execute(sa.select(ROLLOUTS.c.id).where(ROLLOUTS.c.id == spec.id)).first()
        if taken is not None:
            raise RolloutExists(f"rollout id {spec.id!r} is taken; choose another with --id")
        conn.execute(sa.insert(ROLLOUTS).values(row))
    return RolloutRow(spec, state, now, now, 1)


def get(store: Store, rollout_id: str) -> RolloutRow:
    """The rollout ``rollout_id``.

    Raises:
        RolloutNotFound: there is none.
        StoreUnavailable: the database cannot be reached.
    """
    with guard(f"read rollout {rollout_id}"), store.engine.connect() as conn:
        r = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).first()
    if r is None:
        raise RolloutNotFound(rollout_id)
    return _row(r)


def head(store: Store, rollout_id: str) -> tuple[int, str]:
    """``(rev, status)`` of the rollout: one small query, no JSON read.

    Raises:
        RolloutNotFound: there is none.
        StoreUnavailable: the database cannot be reached.
    """
    q = sa.select(ROLLOUTS.c.rev, ROLLOUTS.c.status).where(ROLLOUTS.c.id == rollout_id)
    with guard(f"read rollout {rollout_id}"), store.engine.connect() as conn:
        r = conn.execute(q).first()
    if r is None:
        raise RolloutNotFound(rollout_id)
    return int(r.rev), str(r.status)


def list_rollouts(
    store: Store, *, active_only: bool = False, known: Mapping[str, RolloutRow] | None = None
) -> list[RolloutRow]:
    """Rollouts, active ones (running, paused) first, each part newest first.

    ``known`` rows (by id) are returned as they are when the database still has their
    ``rev``: only changed rows are read and parsed (a rollout of 1,000 devices is a large JSON
    state, and a controller lists the active ones every tick).
    """
    cols = [ROLLOUTS.c.id, ROLLOUTS.c.rev]
    q = sa.select(*cols) if known else sa.select(ROLLOUTS)
    if active_only:
        q = q.where(ROLLOUTS.c.status.in_(sorted(ACTIVE)))
    active_first = sa.case((ROLLOUTS.c.status.in_(sorted(ACTIVE)), 0), else_=1)
    q = q.order_by(active_first, ROLLOUTS.c.created_at.desc(), ROLLOUTS.c.id)
    with guard("list rollouts"), store.engine.connect() as conn:
        if not known:
            return [_row(r) for r in conn.execute(q)]
        heads = conn.execute(q).all()
        stale = [r.id for r in heads if r.id not in known or known[r.id].rev != r.rev]
        fresh: dict[str, RolloutRow] = {}
        if stale:
            full = sa.select(ROLLOUTS).where(ROLLOUTS.c.id.in_(stale))
            fresh = {r.id: _row(r) for r in conn.execute(full)}
    out = []
    for r in heads:  # a stale row deleted between the two reads is left out
        row = fresh.get(r.id) if r.id in stale else known[r.id]
        if row is not None:
            out.append(row)
    return out


def save(
    store: Store,
    row: RolloutRow,
    state: RolloutState,
    now: datetime,
    *,
    fence: Fence | None = None,
) -> RolloutRow:
    """Store ``state`` as the rollout's new state if nobody saved since ``row`` was read.

    With ``fence`` (a controller's lease), only while that lease is still the holder's,
    checked in the same transaction (``lease_db.check_fence``).

    Returns:
        The row as stored (``rev`` one higher).

    Raises:
        ConcurrentUpdate: the stored ``rev`` is no longer ``row.rev``; nothing was written.
        LeaseLost: ``fence`` no longer holds the lease; nothing was written.
        StoreUnavailable: the database cannot be reached.
    """
    stmt = (
        sa.update(ROLLOUTS)
        .where(ROLLOUTS.c.id == row.id, ROLLOUTS.c.rev == row.rev)
        .values(
            status=state.status,
            state=state.model_dump(mode="json"),
            updated_at=now,
            rev=row.rev + 1,
        )
    )
    with guard(f"save rollout {row.id}"), store.engine.begin() as conn:
        if fence is not None:
            check_fence(conn, fence)
        if conn.execute(stmt).rowcount != 1:
            q = sa.select(ROLLOUTS.c.rev).where(ROLLOUTS.c.id == row.id)
            actual = conn.execute(q).scalar()
            raise ConcurrentUpdate(row.id, row.rev, None if actual is None else int(actual))
    return RolloutRow(row.spec, state, row.created_at, now, row.rev + 1)


__all__ = [
    "ConcurrentUpdate",
    "RolloutExists",
    "RolloutNotFound",
    "RolloutRow",
    "create",
    "get",
    "head",
    "list_rollouts",
    "save",
]
