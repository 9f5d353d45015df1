"""Multi-object tracking: stable ids through occlusion, crossings and misses; ids on the wire."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.pipeline.analytics import FrameAnalytics
from agent.pipeline.config import LineConfig, TrackingConfig, ZoneConfig
from agent.pipeline.postprocess import Detection, Result
from agent.pipeline.scene import SCENE, detections, ground_truth, id_switches
from agent.pipeline.tracking import Tracker, TrackParams, TrackState, tracker_from_config
from agent.protocol.telemetry import InferenceEvent


def det(x: float, y: float, score: float = 0.9, label: str = "car", side: float = 40) -> Detection:
    return Detection((x, y, x + side, y + side), score, 0 if label == "car" else 1, label)


def test_ids_are_stable_and_come_after_min_hits() -> None:
    tr = Tracker(TrackParams(min_hits=2))
    first = tr.update([det(10, 10), det(300, 10)], 0.0)
    assert first.ids == [None, None]  # tentative: no id yet, nothing reported
    for f in range(1, 20):
        u = tr.update([det(10 + 5 * f, 10), det(300 - 5 * f, 10)], f / 25)
        assert u.ids == [1, 2]
    assert tr.active == 2 and tr.started == 2


def test_track_survives_missed_frames_and_ends_after_lost_frames() -> None:
    tr = Tracker(TrackParams(min_hits=1, lost_frames=5))
    for f in range(10):
        tr.update([det(10 + 4 * f, 50)], f / 25)
    for f in range(10, 14):  # 4 frames unseen: lost, predicted along
        u = tr.update([], f / 25)
        assert [t.track_id for t in u.lost] == [1]
    u = tr.update([det(10 + 4 * 14, 50)], 14 / 25)
    assert u.ids == [1]  # found again where the motion model expected it
    for f in range(15, 21):
        u = tr.update([], f / 25)
    assert [t.track_id for t in u.ended] == [1] and tr.active == 0


def test_low_score_boxes_keep_a_track_but_never_start_one() -> None:
    tr = Tracker(TrackParams(min_hits=1))
    assert tr.update([det(0, 0, score=0.3)], 0.0).ids == [None]
    assert tr.update([det(100, 0, score=0.9)], 0.04).ids == [1]
    for f in range(2, 10):  # partly hidden: confidence drops below high_score
        u = tr.update([det(100 + f, 0, score=0.3)], f / 25)
        assert u.ids == [1]
    assert tr.tracks[0].best_score == pytest.approx(0.9)


def test_association_is_class_aware_and_per_class_thresholds_apply() -> None:
    person = TrackParams(high_score=0.3, new_track_score=0.3, min_hits=1)
    tr = Tracker(TrackParams(min_hits=1), per_class={"person": person})
    assert tr.update([det(0, 0, label="car")], 0.0).ids == [1]
    # a person where the car was predicted does not take the car's id
    u = tr.update([det(1, 0, label="person", score=0.35)], 0.04)
    assert u.ids == [2]
    assert {t.track_id: t.label for t in tr.tracks} == {1: "car", 2: "person"}
    # 0.35 starts a person (its threshold) but not a car (the pipeline's 0.6)
    assert tr.update([det(300, 0, label="car", score=0.35)], 0.08).ids == [None]


def test_classes_not_tracked_get_no_id() -> None:
    tr = Tracker(TrackParams(min_hits=1), classes=["car"])
    assert tr.update([det(0, 0, label="car"), det(200, 0, label="person")], 0.0).ids == [1, None]


def test_a_flood_of_detections_is_capped() -> None:
    tr = Tracker(TrackParams(min_hits=1), max_tracks=10)
    u = tr.update([det(50 * i, 0) for i in range(30)], 0.0)
    assert len(tr.tracks) == 10 and len(u.ended) == 20


def test_tracker_from_config_applies_per_class_overrides() -> None:
    cfg = TrackingConfig.model_validate(
        {"high_score": 0.6, "per_class": {"person": {"high_score": 0.3, "lost_frames": 90}}}
    )
    tr = tracker_from_config(cfg)
    assert tr.params.high_score == 0.6
    p = tr.params_for("person")
    assert (p.high_score, p.lost_frames, p.low_score) == (0.3, 90, 0.1)


@pytest.mark.parametrize("seed", range(8))
def test_scripted_scene_every_object_keeps_one_id(seed: int) -> None:
    """Moving, crossing each other, behind a pillar, leaving: zero identity switches and one
    id per object, with a detector that jitters, misses 3 % and loses the hidden."""
    gt = ground_truth(SCENE)
    tr = Tracker()
    tracked = []
    for t, dets in enumerate(detections(SCENE, seed)):
        u = tr.update(dets, t / SCENE.fps)
        tracked.append([(d.box, i) for d, i in zip(dets, u.ids, strict=True)])
    assert id_switches(gt, tracked) == (0, 0)
    assert tr.started == len(SCENE.objects)


def test_same_detections_without_a_tracker_switch_ids() -> None:
    """The baseline the benchmark compares with: identity by position in the frame's list."""
    gt = ground_truth(SCENE)
    by_order = [[(d.box, i + 1) for i, d in enumerate(dets)] for dets in detections(SCENE, 0)]
    switches, extra = id_switches(gt, by_order)
    assert switches > 50 and extra > 10


def test_track_ids_ride_in_the_event_contract() -> None:
    a = FrameAnalytics(Tracker(TrackParams(min_hits=1)))
    result = Result("detection", detections=[det(10, 10), det(200, 10, score=0.05)])
    event = {
        "pipeline": "p", "model": "m", "version": "1.0.0", "frame_seq": 1, "frame_time": 1e9,
        "latency_ms": 1.0, **result.to_dict(),
    }  # fmt: skip
    a.apply(event, result, (640, 480), 0.0, 1e9)
    assert [d.get("track_id") for d in event["detections"]] == [1, None]
    msg = InferenceEvent.from_pipeline_event("cam-1", event)
    assert [d.track_id for d in msg.detections] == [1, None]
    assert InferenceEvent.decode(msg.encode()) == msg


def test_tracks_end_in_tracked_lost_or_ended_states_only() -> None:
    tr = Tracker(TrackParams(min_hits=3))
    tr.update([det(0, 0)], 0.0)
    tr.update([det(1, 0)], 0.04)
    assert tr.tracks[0].state is TrackState.TENTATIVE and tr.active == 0
    tr.update([], 0.08)  # a tentative track unmatched is dropped without an event
    assert tr.tracks == []


def test_pipeline_config_turns_tracking_on_with_zones(tmp_path: Path) -> None:
    from agent.pipeline.config import PipelineConfig

    cfg = PipelineConfig.model_validate(
        {"name": "p", "source": 0, "model": "m.onnx",
         "lines": [{"name": "gate", "start": [0, 100], "end": [640, 100]}]}
    )  # fmt: skip
    assert cfg.tracking == TrackingConfig()
    assert isinstance(cfg.lines[0], LineConfig) and not isinstance(cfg.lines[0], ZoneConfig)


@pytest.mark.parametrize("seed", range(30))
def test_assignment_shortcuts_are_optimal(seed: int) -> None:
    """The matcher's shortcuts (each row's own cheapest column; independent groups solved
    apart) give what LAPJV gives on the whole matrix: as many pairs, the same total cost."""
    import lap
    import numpy as np

    from agent.pipeline.assign import assign

    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(1, 12, 2)
    cost = rng.uniform(0, 1, (rows, cols))
    cost[rng.uniform(size=cost.shape) < 0.6] = 2.0  # sparse, like IoU between boxes
    limit = 0.8
    pairs, rest_r, rest_c = assign(cost, limit)
    _, x, _ = lap.lapjv(cost, extend_cost=True, cost_limit=limit)
    ref = [(i, int(j)) for i, j in enumerate(x) if j >= 0]
    assert len(pairs) == len(ref)
    assert sum(cost[p] for p in pairs) == pytest.approx(sum(cost[p] for p in ref))
    assert all(cost[p] <= limit for p in pairs)
    assert sorted([r for r, _ in pairs] + rest_r) == list(range(rows))
    assert sorted([c for _, c in pairs] + rest_c) == list(range(cols))


def test_degenerate_boxes_keep_the_filter_finite() -> None:
    import numpy as np

    tr = Tracker(TrackParams(min_hits=1, lost_frames=3))
    for f in range(10):  # a box clipped to a line at the frame's edge, beside a normal one
        dets = [Detection((0.0, 10.0 + f, 0.0, 50.0 + f), 0.9, 0, "car"),
                Detection((100.0 + f, 10.0, 140.0 + f, 50.0), 0.9, 0, "car")]  # fmt: skip
        u = tr.update(dets, f / 25)
    assert u.ids[1] == 2  # the normal one keeps its id
    assert all(np.isfinite(v) for t in tr.tracks for v in t.box)
    assert len(tr.tracks) <= 6  # zero-area boxes match nothing: they start and end tracks
