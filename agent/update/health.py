"""Adapter: a new model's first minutes in a pipeline — swapped in between two frames, its
frames fed to a ``HealthWindow`` until the window decides (commit or roll back)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline
from agent.update.machine import HealthVerdict, HealthWindow


def swap_and_watch(
    pipe: Pipeline,
    model: RunnableModel,
    window: HealthWindow,
    *,
    clock: Callable[[], float],
    stop: threading.Event,
    on_active: Callable[[], None],
) -> tuple[RunnableModel | None, HealthVerdict | None]:
    """Swap ``model`` into ``pipe`` (``on_active`` runs right after), watch its frames.

    The latency baseline is the pipeline's p95 before the swap (none without a model).

    Returns:
        The model swapped out, and the window's verdict; ``None`` when ``stop`` was set first
        (the model stays active: after a restart, crash recovery rolls it back).
    """
    infer = pipe.metrics.latency().get("infer", {})
    baseline = infer.get("p95") if pipe.model is not None else None
    lock = threading.Lock()

    def observe(m: RunnableModel, ok: bool, nan: bool, ms: float) -> None:
        if m is model:
            with lock:
                window.observe(ok, nan, ms, now=clock())

    pipe.observer = observe
    old = pipe.swap_model(model)  # between two frames: the stream never stops
    try:
        on_active()
        while not stop.is_set():
            with lock:
                verdict = window.verdict(clock(), baseline)
            if verdict.outcome != "pending":
                return old, verdict
            stop.wait(0.1)
        return old, None
    finally:
        pipe.observer = None
