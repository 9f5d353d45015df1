"""Adapter: the chunk server's worker pool, serving devices in turn rather than in arrival order.

With a first-in, first-out pool, a device that keeps hundreds of requests waiting (within
its rate limit, or aliases of one file) has every honest device's next window queued behind
all of them: measured in ``tests/system/test_bad_device.py``, two honest 4 MiB downloads took 6.4x
as long beside such a device. Here each device has its own line, and the workers take one job
from each device in turn (round robin), so a device with one request waiting is served after
at most one job of each other device, however many the heavy one has queued.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

J = TypeVar("J")
log = logging.getLogger(__name__)


class FairQueue(Generic[J]):
    """Jobs kept per key and handed out one key at a time, in turn."""

    def __init__(self) -> None:
        self._lines: dict[str, deque[J]] = {}
        self._turns: deque[str] = deque()  # keys with jobs, next to serve first
        self._cv = threading.Condition()
        self._closed = False

    def put(self, key: str, job: J) -> None:
        """Queue ``job`` at the end of ``key``'s line.

        Raises:
            RuntimeError: the queue is closed.
        """
        with self._cv:
            if self._closed:
                raise RuntimeError("queue closed")
            line = self._lines.get(key)
            if line is None:
                line = self._lines[key] = deque()
                self._turns.append(key)
            line.append(job)
            self._cv.notify()

    def get(self) -> J | None:
        """The next job in turn; waits for one; None once closed and empty."""
        with self._cv:
            while not self._turns and not self._closed:
                self._cv.wait()
            if not self._turns:
                return None
            key = self._turns.popleft()
            line = self._lines[key]
            job = line.popleft()
            if line:
                self._turns.append(key)  # its next job waits for everyone else's turn
            else:
                del self._lines[key]
            return job

    def close(self) -> list[J]:
        """Stop taking jobs; returns those never handed out (the workers then end)."""
        with self._cv:
            self._closed = True
            left = [job for key in self._turns for job in self._lines[key]]
            self._lines.clear()
            self._turns.clear()
            self._cv.notify_all()
            return left

    def __len__(self) -> int:
        with self._cv:
            return sum(len(line) for line in self._lines.values())


class FairPool(Generic[J]):
    """``workers`` threads running ``run(job)`` for jobs from a ``FairQueue``."""

    def __init__(self, workers: int, run: Callable[[J], None], *, name: str = "chunk") -> None:
        self.queue: FairQueue[J] = FairQueue()
        self._run = run
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, key: str, job: J) -> None:
        """Raises: RuntimeError once shut down."""
        self.queue.put(key, job)

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                self._run(job)
            except Exception:  # run() should not raise; a bug must not end the worker
                log.exception("worker %s: job failed", threading.current_thread().name)

    def shutdown(self, timeout: float = 10.0) -> list[J]:
        """Stop; jobs not started are returned; running ones finish first."""
        left = self.queue.close()
        for t in self._threads:
            t.join(timeout)
        return left
