"""Flow control of chunk transfers without any broker: ``agent.update.transfer.flow``.

RTT smoothing (RFC 6298), the adaptive timeout's floor, cap and back-off, the AIMD window's
increase, halving, floor and ceiling, the re-send backoff, and the waits after ``busy``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from agent.protocol.fetch import FetchHeader, FetchRequest
from agent.update.transfer import flow
from agent.update.transfer.flow import FlowControl
from agent.update.transfer.transfer import Transfer


def _fc(**kw: float) -> FlowControl:
    args = {"window": 8, "timeout_s": 5.0, "min_timeout_s": 1.0, "max_timeout_s": 60.0}
    args.update(kw)
    return FlowControl(
        window=int(args["window"]),
        timeout_s=args["timeout_s"],
        min_timeout_s=args["min_timeout_s"],
        max_timeout_s=args["max_timeout_s"],
    )


# -- RTT estimate and adaptive timeout --------------------------------------------------------


def test_before_any_sample_the_configured_timeout_and_full_window_apply() -> None:
    fc = _fc()
    assert fc.rto == 5.0 and fc.srtt is None and fc.rttvar == 0.0
    assert fc.cwnd == 8.0 and fc.current_window() == 8


def test_first_sample_sets_srtt_and_half_of_it_as_variation() -> None:
    fc = _fc(min_timeout_s=0.1)
    fc.sample(2.0)
    assert fc.srtt == 2.0 and fc.rttvar == 1.0
    assert fc.rto == pytest.approx(2.0 + 4 * 1.0)  # RFC 6298 2.2: SRTT + 4·RTTVAR


def test_later_samples_are_smoothed_with_rfc_6298_gains() -> None:
    fc = _fc(min_timeout_s=0.1)
    fc.sample(2.0)
    fc.sample(1.0)
    # RTTVAR first, from the old SRTT (2.3): 0.75·1 + 0.25·|2 - 1|; SRTT: 0.875·2 + 0.125·1
    assert fc.rttvar == pytest.approx(1.0)
    assert fc.srtt == pytest.approx(1.875)
    assert fc.rto == pytest.approx(1.875 + 4.0)
    fc.sample(1.875)
    assert fc.rttvar == pytest.approx(0.75)
    assert fc.srtt == pytest.approx(1.875)


def test_steady_round_trips_converge_and_the_timeout_keeps_a_small_margin() -> None:
    fc = _fc(min_timeout_s=0.001)
    for _ in range(200):
        fc.sample(0.05)
    assert fc.srtt == pytest.approx(0.05)
    assert fc.rttvar < 1e-6
    # 4·RTTVAR ~ 0: the margin is the 10 ms granularity floor, not zero
    assert fc.rto == pytest.approx(0.05 + flow.MIN_VARIANCE_S)


def test_timeout_stays_within_its_floor_and_cap() -> None:
    fast = _fc(min_timeout_s=1.0)
    for _ in range(50):
        fast.sample(0.01)
    assert fast.rto == 1.0  # loopback answers: never below the floor
    slow = _fc(max_timeout_s=10.0)
    slow.sample(30.0)
    assert slow.rto == 10.0  # never above the cap


def test_floor_and_cap_bend_to_the_configured_timeout() -> None:
    fc = _fc(timeout_s=0.5, min_timeout_s=1.0, max_timeout_s=60.0)
    assert fc.min_timeout_s == 0.5  # a floor above the starting timeout is lowered to it
    fc = _fc(timeout_s=90.0, min_timeout_s=1.0, max_timeout_s=60.0)
    assert fc.max_timeout_s == 90.0  # a cap below it is raised to it
    fc.sample(200.0)
    assert fc.rto == 90.0


# -- loss: halving once per loss event, timeout back-off -----------------------------------------


def test_a_timeout_halves_the_window_and_doubles_the_timeout() -> None:
    fc = _fc()
    assert fc.timed_out(sent=1.0, now=6.0) is True
    assert fc.cwnd == 4.0 and fc.current_window() == 4
    assert fc.rto == 10.0
    assert fc.last_cut == 6.0


def test_windows_of_one_loss_event_cut_once() -> None:
    fc = _fc()
    assert fc.timed_out(sent=1.0, now=6.0)
    # sent before the cut: the same loss event, no second halving, no second back-off
    assert fc.timed_out(sent=1.5, now=6.2) is False
    assert fc.timed_out(sent=5.9, now=6.3) is False
    assert fc.cwnd == 4.0 and fc.rto == 10.0
    # a window sent after the cut that times out is a new loss event
    assert fc.timed_out(sent=6.0, now=16.0) is True
    assert fc.cwnd == 2.0 and fc.rto == 20.0


def test_window_never_drops_below_one_and_timeout_never_above_its_cap() -> None:
    fc = _fc(max_timeout_s=12.0)
    for i in range(10):
        fc.timed_out(sent=float(i * 100), now=float(i * 100 + 50))
    assert fc.cwnd == 1.0 and fc.current_window() == 1
    assert fc.rto == 12.0


def test_a_new_sample_brings_a_backed_off_timeout_down() -> None:
    fc = _fc(min_timeout_s=0.1)
    fc.sample(0.2)
    fc.timed_out(sent=0.0, now=1.0)
    backed_off = fc.rto
    assert backed_off == pytest.approx(2 * (0.2 + 4 * 0.1))
    fc.sample(0.2)
    assert fc.rto < backed_off


# -- additive increase --------------------------------------------------------------------------


def test_window_grows_by_one_per_answer_up_to_its_ceiling() -> None:
    fc = _fc(window=8)
    fc.timed_out(sent=0.0, now=1.0)
    fc.timed_out(sent=2.0, now=3.0)
    assert fc.cwnd == 2.0
    fc.window_done()
    assert fc.cwnd == 3.0 and fc.current_window() == 3
    for _ in range(20):
        fc.window_done()
    assert fc.cwnd == 8.0 and fc.current_window() == 8


def test_current_window_rounds_down_and_stays_within_one_and_window() -> None:
    fc = _fc(window=5)
    fc.timed_out(sent=0.0, now=1.0)
    assert fc.cwnd == 2.5 and fc.current_window() == 2
    one = _fc(window=1)
    one.timed_out(sent=0.0, now=1.0)
    assert one.current_window() == 1
    one.window_done()
    assert one.cwnd == 1.0


# -- re-send backoff --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.2), (6, 5.0), (30, 5.0)],
)
def test_backoff_doubles_per_attempt_up_to_its_cap(attempts: int, expected: float) -> None:
    assert flow.backoff_s(attempts, 0.2, 5.0) == pytest.approx(expected)


def test_backoff_of_zero_resends_at_once() -> None:
    assert flow.backoff_s(3, 0.0, 5.0) == 0.0


# -- busy / retry_after ---------------------------------------------------------------------


@pytest.mark.parametrize(("hint", "expected"), [(None, 1.0), (0.0, 1.0), (2.5, 2.5), (0.01, 0.01)])
def test_retry_after_defaults_to_one_second(hint: float | None, expected: float) -> None:
    assert flow.retry_after_s(hint) == expected


def test_busy_wait_is_the_hint_with_jitter_within_20_percent() -> None:
    rng = random.Random(7)
    waits = [flow.busy_wait_s(2.0, rng) for _ in range(500)]
    assert all(1.6 <= w <= 2.4 for w in waits)
    assert max(waits) - min(waits) > 0.6  # really jittered, not a constant
    assert sum(waits) / len(waits) == pytest.approx(2.0, rel=0.05)


def test_busy_wait_bounds_the_hint_before_jitter() -> None:
    lo, hi = flow.BUSY_JITTER
    assert lo * 0.05 <= flow.busy_wait_s(0.0001, random.Random(1)) <= hi * 0.05
    assert lo * 3600 <= flow.busy_wait_s(1e9, random.Random(1)) <= hi * 3600


def test_busy_wait_draws_exactly_one_number_of_the_rng() -> None:
    """A seeded client stays reproducible: one draw per busy answer, and the same one."""
    a, b = random.Random(3), random.Random(3)
    w = flow.busy_wait_s(1.0, a)
    assert w == pytest.approx(b.uniform(0.8, 1.2))
    assert a.random() == b.random()


def test_minimum_rate_guard() -> None:
    assert flow.too_slow(99_999, 10_000, 10.0)
    assert not flow.too_slow(100_000, 10_000, 10.0)
    assert not flow.too_slow(0, 0, 10.0)  # min_rate_bps = 0: nothing is too slow


def test_the_wait_in_line_ends_strictly_after_its_limit() -> None:
    assert not flow.waited_too_long(100.0, 100.0 + 1800.0, 1800.0)
    assert flow.waited_too_long(100.0, 100.0 + 1800.001, 1800.0)


# -- a transfer's use of it, through a fake Link (no broker) ------------------------------------


class FakeLink:
    """A ``Link`` whose registry is a function: ``answer(req, n)`` for the n-th request
    returns ``(status, retry_after_s)`` or None (the request is lost)."""

    flow_fields = True
    chunk_size = 4
    retries = 1
    min_rate_bps = 0
    rate_span_s = 10.0
    backoff_s = 0.0
    backoff_max_s = 0.0
    max_busy_wait_s = 60.0
    stop_event = None

    def __init__(self, blob: bytes, answer: Any, *, timeout_s: float = 5.0) -> None:
        self.blob = blob
        self.answer = answer
        self.rng = random.Random(0)
        self.clock = time.monotonic
        self.flow = FlowControl(
            window=2, timeout_s=timeout_s, min_timeout_s=0.01, max_timeout_s=60.0
        )
        self.routes: dict[str, Any] = {}
        self.sent: list[FetchRequest] = []
        self.rtts: list[float] = []
        self.timeouts = 0
        self.counters: dict[str, int] = {}

    @property
    def rto(self) -> float:
        return self.flow.rto

    def connected(self) -> bool:
        return True

    def resubscribe(self) -> None:
        pass

    def open_route(self, answers: Any) -> str:
        rid = f"r{len(self.routes)}"
        self.routes[rid] = answers
        return rid

    def close_route(self, rid: str) -> None:
        pass

    def publish(self, req: FetchRequest, replica: str | None) -> None:
        self.sent.append(req)
        out = self.answer(req, len(self.sent))
        if out is None:
            return
        status, retry = out
        data = self.blob[req.offset : req.offset + req.length] if status == "ok" else b""
        total = len(self.blob) if status == "ok" else 0
        header = FetchHeader(id=req.id, path=req.path, offset=req.offset, total=total,
                             status=status, retry_after_s=retry)  # fmt: skip
        self.routes[req.id].put((header, data))

    def count(self, **deltas: int) -> None:
        for k, n in deltas.items():
            self.counters[k] = self.counters.get(k, 0) + n

    def current_window(self) -> int:
        return self.flow.current_window()

    def on_rtt(self, rtt: float) -> None:
        self.rtts.append(rtt)
        self.flow.sample(rtt)

    def on_window_done(self) -> None:
        self.flow.window_done()

    def on_timeout(self, sent: float, now: float) -> None:
        self.timeouts += 1
        self.flow.timed_out(sent, now)


def _run(link: FakeLink) -> bytes:
    return b"".join(d for _, d in Transfer(link, "targets/f.bin", 0).run())


def test_a_resent_window_is_not_sampled_karn() -> None:
    blob = b"abcdefgh"
    # the first request is lost: its re-send's answer is ambiguous and must not be sampled
    link = FakeLink(blob, lambda req, n: None if n == 1 else ("ok", None), timeout_s=0.05)
    assert _run(link) == blob
    assert link.timeouts == 1 and link.flow.cwnd >= 1.0
    assert [r.offset for r in link.sent] == [0, 0, 4]
    assert len(link.rtts) == 1  # only the window at 4, sent once
    assert link.counters["bytes_refetched"] == 4


def test_busy_parks_the_transfer_without_using_up_retries() -> None:
    blob = b"abcdefgh"
    # retries = 1, yet three busy answers in a row do not end the transfer
    link = FakeLink(blob, lambda req, n: ("busy", 0.01) if n <= 3 else ("ok", None))
    assert _run(link) == blob
    assert link.counters["busy_responses"] == 3
    assert link.counters.get("bytes_refetched", 0) == 0  # probes after busy are not re-sends
    assert link.timeouts == 0 and link.flow.cwnd == 2.0
    assert all(r.busy_ok for r in link.sent)
