"""Pure: flow control of chunk transfers (``docs/protocol.md``, ``agent.protocol.fetch``).

The timeout of a window adapts to measured round trips like TCP's (RFC 6298: SRTT + 4·RTTVAR,
Karn's rule, doubled on a timeout, within a floor and a cap); the number of windows in flight
is an AIMD congestion window (halved once per loss event, +1 per window answered, never above
``window``); a re-send waits a backoff doubled per attempt; a ``busy`` answer parks the
transfer for ``retry_after_s`` (with jitter), and the minimum-rate guard does not run then.

No I/O and no clock: times come in as arguments (``now``, ``sent``), jitter from the caller's
``random.Random``. Not thread-safe: ``ChunkClient`` holds its lock around ``FlowControl``.
"""

from __future__ import annotations

import math
import random

DEFAULT_RETRY_AFTER_S = 1.0  # a busy answer without a (non-zero) hint
MIN_BUSY_WAIT_S = 0.05  # bounds of the hint, before jitter
MAX_BUSY_WAIT_S = 3600.0
BUSY_JITTER = (0.8, 1.2)  # the wait after busy is the hint times uniform(*BUSY_JITTER)
MIN_VARIANCE_S = 0.01  # floor of the 4·RTTVAR term (RFC 6298's clock granularity G)


class FlowControl:
    """Round-trip estimate, adaptive timeout and congestion window of one client.

    Args:
        window: most windows in flight (the ceiling of ``cwnd``, and where it starts).
        timeout_s: the timeout until round trips have been measured.
        min_timeout_s: floor of the adaptive timeout (lowered to ``timeout_s`` if above it).
        max_timeout_s: cap of the adaptive timeout (raised to ``timeout_s`` if below it).

    Attributes (read any time): ``rto`` (current timeout), ``srtt`` (None until a sample),
    ``rttvar``, ``cwnd``, ``last_cut`` (``now`` of the latest halving).
    """

    def __init__(
        self, *, window: int, timeout_s: float, min_timeout_s: float, max_timeout_s: float
    ) -> None:
        self.window = window
        self.min_timeout_s = min(min_timeout_s, timeout_s)
        self.max_timeout_s = max(max_timeout_s, timeout_s)
        self.rto = timeout_s
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.cwnd = float(window)
        self.last_cut = -math.inf

    def current_window(self) -> int:
        """Windows allowed in flight now: the congestion window, within ``1..window``."""
        return max(1, min(self.window, int(self.cwnd)))

    def sample(self, rtt: float) -> None:
        """RFC 6298 estimator (2.2, 2.3, 2.4 with the floor and cap of 2.4/2.5); feed it only
        first-attempt answers (Karn's rule: a re-sent window's answer is ambiguous)."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        rto = self.srtt + max(MIN_VARIANCE_S, 4 * self.rttvar)
        self.rto = min(self.max_timeout_s, max(self.min_timeout_s, rto))

    def window_done(self) -> None:
        """Additive increase: +1 per window answered, up to ``window``."""
        self.cwnd = min(float(self.window), self.cwnd + 1.0)

    def timed_out(self, sent: float, now: float) -> bool:
        """A window sent at ``sent`` timed out at ``now``: halve ``cwnd`` (floor 1) and double
        the timeout (capped), once per loss event: only for windows sent after the previous
        cut. True when this was a new loss event (a cut)."""
        if sent < self.last_cut:
            return False
        self.last_cut = now
        self.cwnd = max(1.0, self.cwnd / 2)
        self.rto = min(self.max_timeout_s, self.rto * 2)
        return True


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Wait before re-sending a window sent ``attempts`` times: ``base_s`` doubled per
    attempt after the first, at most ``max_s``."""
    return min(base_s * 2.0 ** (attempts - 1), max_s)


def retry_after_s(hint: float | None) -> float:
    """The wait a ``busy`` answer asks for: its ``retry_after_s``, or 1 s without one."""
    return hint or DEFAULT_RETRY_AFTER_S


def busy_wait_s(retry_after: float, rng: random.Random) -> float:
    """When to probe again after ``busy``: the hint within 50 ms..1 h, times a jitter in
    0.8..1.2 (parked devices must not all come back at once). Draws one number of ``rng``."""
    bounded = min(max(retry_after, MIN_BUSY_WAIT_S), MAX_BUSY_WAIT_S)
    return bounded * rng.uniform(*BUSY_JITTER)


def too_slow(nbytes: int, min_rate_bps: int, span_s: float) -> bool:
    """The minimum-rate guard: fewer than ``min_rate_bps`` bytes per second over ``span_s``."""
    return nbytes < min_rate_bps * span_s


def waited_too_long(waiting_since: float, now: float, max_wait_s: float) -> bool:
    """In the registry's line (``busy``) since ``waiting_since`` for more than ``max_wait_s``."""
    return now - waiting_since > max_wait_s
