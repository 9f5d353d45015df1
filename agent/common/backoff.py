"""Pure: capped exponential backoff with full jitter, driven by an explicit ``now``.

Used for camera reconnects (and later the MQTT session). Full jitter (a uniform draw in
``[0, min(cap, base * 2**n)]``) spreads a fleet's reconnects after a shared outage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Reconnect schedule.

    Attributes:
        base_s: delay ceiling after the first failure.
        cap_s: largest delay ever returned.
        jitter: fraction of the ceiling drawn at random (1.0 = full jitter, 0 = none).
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    jitter: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    next_attempt_at: float = 0.0

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; return the delay before the next attempt."""
        ceiling = min(self.cap_s, self.base_s * (2.0 ** min(self.failures, 32)))
        self.failures += 1
        delay = ceiling * (1.0 - self.jitter) + self.rng.uniform(0.0, ceiling * self.jitter)
        self.next_attempt_at = now + delay
        return delay

    def succeeded(self) -> None:
        """Reset after a success."""
        self.failures = 0
        self.next_attempt_at = 0.0

    def ready(self, now: float) -> bool:
        """Whether an attempt is due at ``now``."""
        return now >= self.next_attempt_at
