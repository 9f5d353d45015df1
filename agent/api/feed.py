"""Adapter: the stream pipelines' results as the local API serves them — the latest result of
each pipeline and live subscriptions to its results — fed from the inference thread without
ever making it wait for a client.

``ResultFeed`` is a pipeline sink: ``emit`` numbers the event, keeps it as the latest and
appends it to each subscriber's bounded queue, dropping that subscriber's oldest result when
the queue is full (counted, and told to the client before its next result), then wakes the
subscriber's event loop with one ``call_soon_threadsafe``. Nothing in ``emit`` waits on a
client or encodes JSON: the pipeline does not change an event once the sinks have it, so the
event loop encodes it. A slow client therefore costs at most its queue (``stream_queue``
results) plus the transport's write buffer, and the pipeline runs at its own pace.

``StreamHub`` attaches one feed to each of the API's pipelines (also to those a remote
configuration adds later), caps the streams open at once (``[api] max_streams``) and ends
every stream when the API stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.api.gate import ApiError
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import Sink

FPS_FRAMES = 64  # the results the fps estimate looks back over


@dataclass(frozen=True)
class Latest:
    """A pipeline's newest result: its number in the feed, the event, and when (monotonic)."""

    seq: int
    event: dict[str, Any]
    t: float


@dataclass(frozen=True)
class Item:
    """One result for a subscriber, with how many were dropped just before it."""

    seq: int
    event: dict[str, Any]
    dropped: int


class Subscription:
    """One client's bounded queue of results. ``push`` and ``end`` may be called from any
    thread; ``next`` runs on the event loop given."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxlen: int) -> None:
        self.maxlen = maxlen
        self.dropped = 0  # in all, over the stream's life
        self.delivered = 0
        self._loop = loop
        self._items: deque[tuple[int, dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._unreported = 0  # dropped since the last result handed out
        self._end: str | None = None
        self._ready = asyncio.Event()  # touched on the loop only
        self._woken = False  # a wake-up is scheduled or pending: no need for another

    def push(self, seq: int, event: dict[str, Any]) -> None:
        """Queue a result, dropping the oldest when full; never blocks."""
        with self._lock:
            if self._end is not None:
                return
            if len(self._items) >= self.maxlen:
                self._items.popleft()
                self.dropped += 1
                self._unreported += 1
            self._items.append((seq, event))
            if self._woken:
                return
            self._woken = True
        self._wake()

    def end(self, reason: str) -> None:
        """End the stream after what is queued (first reason wins)."""
        with self._lock:
            if self._end is None:
                self._end = reason
        self._wake()

    def _wake(self) -> None:
        # a closed loop (the server is gone) has nobody to wake
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._ready.set)

    @property
    def queued(self) -> int:
        return len(self._items)

    async def next(self, timeout: float) -> Item | str | None:
        """The next result; the end reason (``str``) once ended and drained; None when
        nothing came within ``timeout`` seconds (time for a heartbeat)."""
        while True:
            with self._lock:
                if self._items:
                    seq, event = self._items.popleft()
                    dropped, self._unreported = self._unreported, 0
                    self.delivered += 1
                    return Item(seq, event, dropped)
                if self._end is not None:
                    return self._end
                self._ready.clear()
                self._woken = False
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None


class ResultFeed(Sink):
    """A pipeline's results for the API: the latest, its rate, and live subscriptions."""

    def __init__(self, pipeline: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline = pipeline
        self._clock = clock
        self._lock = threading.Lock()  # held for microseconds: orders emit and subscribe
        self._seq = 0
        self._latest: Latest | None = None
        self._times: deque[float] = deque(maxlen=FPS_FRAMES)
        self._subs: tuple[Subscription, ...] = ()
        self.ended: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        now = self._clock()
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._latest = Latest(seq, event, now)
            self._times.append(now)
            subs = self._subs
        for sub in subs:
            sub.push(seq, event)

    @property
    def latest(self) -> Latest | None:
        return self._latest

    def fps(self, now: float) -> float:
        """Results per second over the last ``FPS_FRAMES``; 0 once they have stopped coming
        (nothing for 2 s and four of the recent intervals)."""
        times = list(self._times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        interval = (times[-1] - times[0]) / (len(times) - 1)
        if now - times[-1] > max(2.0, 4 * interval):
            return 0.0
        return round(1.0 / interval, 2)

    def subscribe(self, sub: Subscription) -> None:
        """Add ``sub``, starting with the latest result (if any) so a client sees one at once."""
        with self._lock:
            if self.ended is not None:
                sub.end(self.ended)
                return
            if self._latest is not None:
                sub.push(self._latest.seq, self._latest.event)
            self._subs = (*self._subs, sub)

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def end(self, reason: str) -> None:
        """End every subscription (after what each has queued) and refuse new ones."""
        with self._lock:
            if self.ended is None:
                self.ended = reason
            subs, self._subs = self._subs, ()
        for sub in subs:
            sub.end(reason)

    def close(self) -> None:
        """The pipeline stopped: its streams end."""
        self.end("pipeline stopped")


class StreamHub:
    """The feeds of the API's pipelines and the cap on streams open at once.

    ``pipelines`` is the agent's live list: ``sync()`` (called whenever the agent's pipeline
    set changes) gives a pipeline added since a feed and forgets the feeds of those removed
    (their streams ended when the pipeline stopped and closed its sinks). A restarted
    pipeline keeps its feed: the restart moves sinks it did not build to the new pipeline.
    """

    def __init__(self, pipelines: Sequence[Pipeline], *, max_streams: int, queue_size: int):
        self.max_streams = max_streams
        self.queue_size = queue_size
        self.feeds: dict[str, ResultFeed] = {}
        self._live = pipelines
        self._lock = threading.Lock()
        self._open: set[Subscription] = set()
        self.refused = 0
        self.closed = False
        self.sync()

    @property
    def pipelines(self) -> list[Pipeline]:
        """The pipelines running now (a copy: another thread may add or remove one)."""
        return list(self._live)

    def sync(self) -> None:
        """A feed for every running pipeline, none for pipelines that are gone."""
        with self._lock:
            if self.closed:
                return
            feeds: dict[str, ResultFeed] = {}
            for pipe in self.pipelines:
                feed = self.feeds.get(pipe.name)
                # ended: that pipeline was removed (it closed its sinks), this one is new
                if feed is None or feed.ended is not None:
                    feed = ResultFeed(pipe.name)
                    # a new list, not append: the inference thread may be iterating the old one
                    pipe.sinks = [*pipe.sinks, feed]
                feeds[pipe.name] = feed
            self.feeds = feeds

    def running(self) -> list[tuple[Pipeline, ResultFeed]]:
        """Each pipeline running now with its feed."""
        pipes = self.pipelines
        if any(p.name not in self.feeds for p in pipes):
            self.sync()  # the set changed a moment ago
        feeds = self.feeds
        return [(p, feeds[p.name]) for p in pipes if p.name in feeds]

    def feed(self, pipe: Pipeline) -> ResultFeed:
        """``pipe``'s feed (made now when the pipeline set changed a moment ago).

        Raises:
            ApiError: 404 when ``pipe`` is not running any more.
        """
        feed = self.feeds.get(pipe.name)
        if feed is None:
            self.sync()
            feed = self.feeds.get(pipe.name)
        if feed is None:
            raise ApiError(404, f"pipeline {pipe.name!r} is not running any more")
        return feed

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def subscriptions(self) -> list[Subscription]:
        """The streams open now (for stats and tests)."""
        with self._lock:
            return list(self._open)

    def subscribe(self, pipe: Pipeline) -> tuple[ResultFeed, Subscription]:
        """A new subscription to ``pipe``'s results, on the running event loop.

        Raises:
            ApiError: 429 with ``max_streams`` open, 503 when the API is stopping.
        """
        feed = self.feed(pipe)
        sub = Subscription(asyncio.get_running_loop(), self.queue_size)
        with self._lock:
            if self.closed:
                raise ApiError(503, "the agent is stopping")
            if len(self._open) >= self.max_streams:
                self.refused += 1
                raise ApiError(
                    429,
                    f"{len(self._open)} result streams open, the most allowed "
                    f"([api] max_streams {self.max_streams}); close one or retry later",
                    headers={"Retry-After": "5"},
                )
            self._open.add(sub)
        feed.subscribe(sub)
        return feed, sub

    def release(self, feed: ResultFeed, sub: Subscription) -> None:
        """The stream is over (ended, or the client went away)."""
        feed.unsubscribe(sub)
        with self._lock:
            self._open.discard(sub)

    def close(self) -> None:
        """End every stream (clients get an ``end`` event) and detach from the pipelines."""
        with self._lock:
            self.closed = True
            feeds = list(self.feeds.values())
        for feed in feeds:
            feed.end("the agent's local API is stopping")
        for pipe in self.pipelines:
            pipe.sinks = [s for s in pipe.sinks if all(s is not f for f in feeds)]
