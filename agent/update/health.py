"""Adapter: a new model's first minutes in a pipeline — swapped in between two frames, its
frames fed to a ``HealthWindow`` until the window decides (commit or roll back).

A pipeline may be restarted meanwhile from another thread (the ``restart_pipeline``
command): the restart builds a new ``Pipeline`` on the model the old one runs and carries the
old one's ``observer`` over (``agent.running``). So every swap here happens under ``lock``,
the lock restarts hold, on the pipeline that is *now* called ``name``: a restart then sees
either the model before the swap (and the swap lands on the new pipeline after it) or the one
after, never a swap into a pipeline being stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline
from agent.update.machine import HealthVerdict, HealthWindow

Lock = AbstractContextManager[Any]


def swap_in(
    pipes: Mapping[str, Pipeline], name: str, model: RunnableModel | None, lock: Lock
) -> RunnableModel | None:
    """Swap ``model`` into the pipeline now named ``name``; returns the model swapped out
    (``model`` itself when there is no such pipeline any more: nothing runs it)."""
    with lock:
        pipe = pipes.get(name)
        return pipe.swap_model(model) if pipe is not None else model


def swap_and_watch(
    pipes: Mapping[str, Pipeline],
    name: str,
    model: RunnableModel,
    window: HealthWindow,
    *,
    lock: Lock,
    clock: Callable[[], float],
    stop: threading.Event,
    on_active: Callable[[], None],
) -> tuple[RunnableModel | None, HealthVerdict | None]:
    """Swap ``model`` into pipeline ``name`` (``on_active`` runs right after), watch its
    frames — on whichever pipeline carries that name as restarts replace it.

    The latency baseline is the pipeline's p95 before the swap (none without a model).

    Returns:
        The model swapped out, and the window's verdict; ``None`` when ``stop`` was set first
        (the model stays active: after a restart, crash recovery rolls it back).
    """
    seen = threading.Lock()

    def observe(m: RunnableModel, ok: bool, nan: bool, ms: float) -> None:
        if m is model:
            with seen:
                window.observe(ok, nan, ms, now=clock())

    with lock:
        pipe = pipes[name]
        infer = pipe.metrics.latency().get("infer", {})
        baseline = infer.get("p95") if pipe.model is not None else None
        pipe.observer = observe  # a restart hands it to the new pipeline
        old = pipe.swap_model(model)  # between two frames: the stream never stops
    try:
        on_active()
        while not stop.is_set():
            with seen:
                verdict = window.verdict(clock(), baseline)
            if verdict.outcome != "pending":
                return old, verdict
            stop.wait(0.1)
        return old, None
    finally:
        with lock:
            now = pipes.get(name)
            if now is not None and now.observer is observe:
                now.observer = None
