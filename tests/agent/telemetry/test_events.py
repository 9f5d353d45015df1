"""Event policies (pure tables) and events end to end into the ingest store."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from agent.telemetry.events import EventPolicy, signature


def _cls(label: str) -> dict[str, Any]:
    return {"classifications": [{"label_id": 0, "label": label, "score": 0.9}]}


def _det(*labels: str) -> dict[str, Any]:
    return {
        "detections": [
            {"box": [0, 0, 1, 1], "score": 0.9, "label_id": 0, "label": x} for x in labels
        ]
    }


def test_every_sends_all() -> None:
    p = EventPolicy("every")
    assert all(p.allow(_cls("a"), now=float(t)) for t in range(10))


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([_cls("3"), _cls("3"), _cls("5"), _cls("5"), _cls("3")], [True, False, True, False, True]),
        (
            [_det("car"), _det("car"), _det("car", "car"), _det("car", "car"), _det()],
            [True, False, True, False, True],
        ),
        ([_det("b", "a"), _det("a", "b")], [True, False]),  # same multiset, other order
    ],
)
def test_change_sends_only_when_what_is_seen_changes(
    events: list[dict[str, Any]], expected: list[bool]
) -> None:
    p = EventPolicy("change")
    assert [p.allow(e, now=0.0) for e in events] == expected


def test_rate_is_a_token_bucket() -> None:
    p = EventPolicy("rate", max_per_s=2.0)
    # 30 fps for frames at 0 .. 59/30 s: sends at 0, 0.5, 1.0 and 1.5 s
    sent = [t for t in range(60) if p.allow(_cls("x"), now=t / 30)]
    assert sent == [0, 15, 30, 45]
    gaps = [(b - a) / 30 for a, b in itertools.pairwise(sent)]
    assert all(g >= 0.5 - 1e-9 for g in gaps)


def test_signature_distinguishes_classification_and_detection() -> None:
    assert signature(_cls("car")) != signature(_det("car"))
    assert signature({}) == ("det",)
