"""Pure: rollout stages (``5%``, ``25%``, ``10``) and the deterministic choice of devices.

Devices are ordered by ``sha256("ROLLOUT_ID:DEVICE_ID")``: the same rollout id always picks
the same canaries, another id picks others, and a stage covers a prefix of that order. Stage
sizes are cumulative — a stage of ``25%`` covers a quarter of the targeted devices, the 5 % of
the stage before included.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, model_validator

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")


class Stage(BaseModel):
    """One stage: a share of the targeted devices (``percent``) or a number of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float | None = Field(None, gt=0, le=100, description="Share of targeted devices, %")
    count: int | None = Field(None, ge=1, le=10_000_000, description="Number of devices")

    @model_validator(mode="after")
    def _one(self) -> Stage:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a stage is either a percentage or a device count, not both/neither")
        return self

    @property
    def is_all(self) -> bool:
        """Whether this stage covers every targeted device (``100%``)."""
        return self.percent == 100

    def size(self, n: int) -> int:
        """Devices this stage covers out of ``n`` targeted ones: ``ceil(pct·n)``, at least 1,
        at most ``n`` (0 when ``n`` is 0)."""
        if n <= 0:
            return 0
        if self.count is not None:
            return min(n, self.count)
        # exact decimal arithmetic: 7% of 100 must be 7, not ceil(7.000000000000001) = 8
        share = Fraction(repr(self.percent)) / 100
        return min(n, max(1, math.ceil(share * n)))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.percent:g}%"


def parse_stage(text: str) -> Stage:
    """``"5%"`` (share of the targeted devices, 0 < p ≤ 100) or ``"10"`` (device count ≥ 1).

    Raises:
        ValueError: neither form, or out of range; the message names the text.
    """
    if m := _PERCENT.match(text):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"bad stage {text!r}: a percentage must be above 0% and at most 100%")
        return Stage(percent=pct)
    if m := _COUNT.match(text):
        count = int(m.group(1))
        if count < 1:
            raise ValueError(f"bad stage {text!r}: a device count must be at least 1")
        return Stage(count=count)
    raise ValueError(f"bad stage {text!r}: use a share like '5%' or a device count like '10'")


def normalize_stages(stages: Iterable[Stage | str]) -> tuple[Stage, ...]:
    """Parse and check a stage list; a final ``100%`` is **added when missing**.

    Percentages must increase from stage to stage, and so must device counts; a ``100%``
    stage must be the last. Mixed lists (``10``, ``25%``) are allowed: at run time each
    stage covers at least as many devices as the one before (``stage_sizes``).

    Raises:
        ValueError: a stage does not parse, or the list does not increase.
    """
    out = [s if isinstance(s, Stage) else parse_stage(s) for s in stages]
    last_pct: float | None = None
    last_count: int | None = None
    for i, s in enumerate(out):
        if last_pct == 100:
            raise ValueError(f"stage {i + 1} ({s}) comes after 100%, which must be the last")
        if s.percent is not None:
            if last_pct is not None and s.percent <= last_pct:
                raise ValueError(f"stages must increase: stage {i + 1} is {s}, after {last_pct:g}%")
            last_pct = s.percent
        elif s.count is not None:
            if last_count is not None and s.count <= last_count:
                raise ValueError(f"stages must increase: stage {i + 1} is {s}, after {last_count}")
            last_count = s.count
    if not out or not out[-1].is_all:
        out.append(Stage(percent=100))
    return tuple(out)


def stage_sizes(stages: Sequence[Stage], n: int) -> list[int]:
    """Cumulative device counts of each stage out of ``n``: never shrinking, the last = ``n``."""
    sizes: list[int] = []
    for s in stages:
        sizes.append(max(s.size(n), sizes[-1] if sizes else 0))
    return sizes


def rank(rollout_id: str, device_id: str) -> str:
    """The sort key that decides when ``device_id`` is picked in rollout ``rollout_id``."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def selection_order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """``device_ids`` in the order rollout ``rollout_id`` picks them."""
    return sorted(device_ids, key=lambda d: (rank(rollout_id, d), d))


def select(
    rollout_id: str, eligible: Iterable[str], already: Iterable[str], size: int
) -> list[str]:
    """Devices to add so that ``size`` are selected, in picking order.

    ``already`` selected devices stay selected (even when no longer eligible); new ones come
    from ``eligible`` in hash order. With a fixed fleet the selection is always a prefix of
    ``selection_order``; a growing fleet never unpicks anyone.
    """
    have = set(already)
    room = size - len(have)
    if room <= 0:
        return []
    return selection_order(rollout_id, (d for d in set(eligible) if d not in have))[:room]


__all__ = [
    "Stage",
    "normalize_stages",
    "parse_stage",
    "rank",
    "select",
    "selection_order",
    "stage_sizes",
]
