"""Adapter: the device's storage after an update settles — what can no longer run is removed,
and the models and engines left are measured against the ``[storage]`` budget."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, MutableMapping
from pathlib import Path

from agent.protocol.state import PipelineTarget
from agent.update.store import GcResult, ModelStore

log = logging.getLogger(__name__)


def collect_garbage(
    store: ModelStore,
    incoming: Path,
    prune_engines: Callable[[], int] | None,
    budget_mb: int | None,
    errors: MutableMapping[str, str],
    device_id: str,
) -> None:
    """``clean_storage``, then the storage budget; the outcome goes into ``errors["storage"]``.
    Runs after each settled update and before retrying on a full disk. Never raises: a failed
    clean-up is logged and reported."""
    try:
        result, engines = clean_storage(store, incoming, prune_engines)
        log.info(
            "device=%s storage: removed %d versions, %d bytes of models, %d engines",
            device_id, len(result.versions), result.bytes, engines,
        )  # fmt: skip
        if budget_mb is not None:
            problem = over_budget(store, budget_mb)
            if problem is not None:
                errors["storage"] = problem
            else:
                errors.pop("storage", None)
    except Exception as e:  # never let clean-up take an update down
        log.exception("storage clean-up failed")
        errors["storage"] = f"storage clean-up failed: {e}"


def clean_storage(
    store: ModelStore, incoming: Path, prune_engines: Callable[[], int] | None
) -> tuple[GcResult, int]:
    """Keep what can still run (committed, previous, active, in flight) and remove the rest:
    other model versions and their objects, partial downloads under ``incoming`` of versions
    no longer wanted, and engines beyond what ``prune_engines`` keeps.

    Returns:
        What the store removed, and how many engines went.

    Raises:
        StoreError, OSError: the store cannot be read or cleaned.
    """
    result = store.gc(keep=())
    wanted = store.referenced()
    if incoming.is_dir():
        for model_dir in incoming.iterdir():
            for version_dir in model_dir.iterdir() if model_dir.is_dir() else ():
                ref = PipelineTarget(model=model_dir.name, version=version_dir.name)
                if ref not in wanted:
                    shutil.rmtree(version_dir, ignore_errors=True)
    engines = prune_engines() if prune_engines is not None else 0
    return result, engines


def over_budget(store: ModelStore, budget_mb: int) -> str | None:
    """Why the models and engines under the data dir are over ``budget_mb`` (``None``: they
    are not)."""
    used = sum(
        f.stat().st_size
        for root in (store.root, store.root.parent / "engines")
        if root.is_dir()
        for f in root.rglob("*")
        if f.is_file()
    )
    if used > budget_mb << 20:
        return (
            f"models and engines use {used >> 20} MiB after clean-up, over the "
            f"[storage] max_mb budget of {budget_mb} MiB: only what can still "
            "run is kept; raise the budget or run fewer/smaller models"
        )
    return None
