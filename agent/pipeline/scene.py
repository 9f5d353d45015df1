"""Pure + small IO: a scripted scene with known ground truth, for tracking tests and benchmarks.

Squares move along piecewise-linear paths across a 640x480 frame: they cross a counting line
both ways, pass behind a pillar that hides them (while crossing the line), cross each other,
stand in a zone past its dwell time, and leave. ``SCENE`` is the script; from it come:

* ``ground_truth(scene)``: per frame, the visible objects' boxes and ids, and the line
  crossings and zone entries/exits/dwells a perfect counter reports (once per object);
* ``detections(scene, seed)``: what a detector would report, per frame — boxes with pixel
  jitter, scores, random misses, and occlusion: an object mostly hidden (by the pillar or a
  nearer object) is missed, a partly hidden one is reported smaller with a low score (ByteTrack's
  second association exists for those), plus the odd low-score false positive;
* ``render(scene, t)``: the frame as OpenCV draws it (white squares on a dark background, the
  pillar drawn over them), so the same scene runs through a real detector (``blobdet``).

``crowd(n, frames, seed)`` makes ``n`` objects bouncing around for cost measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.pipeline.postprocess import Detection

__all__ = [
    "SCENE",
    "SPARSE_SCENE",
    "Scene",
    "ScriptedObject",
    "crowd",
    "detections",
    "ground_truth",
    "render",
    "write_scene_video",
]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ScriptedObject:
    """One object: a square of ``side`` pixels whose centre follows ``path`` [(frame, x, y)],
    linearly between waypoints; it exists from the first waypoint's frame to the last's."""

    oid: int
    path: tuple[tuple[int, float, float], ...]
    side: int = 40
    label: str = "blob"

    def box(self, t: int) -> Box | None:
        """Its box at frame ``t`` (clipped to nothing outside its life), or None."""
        fs = [p[0] for p in self.path]
        if t < fs[0] or t > fs[-1]:
            return None
        x = float(np.interp(t, fs, [p[1] for p in self.path]))
        y = float(np.interp(t, fs, [p[2] for p in self.path]))
        h = self.side / 2
        return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class Scene:
    """The script: objects, frame size, fps, the pillar, and the regions to count."""

    objects: tuple[ScriptedObject, ...]
    frames: int
    size: tuple[int, int] = (640, 480)
    fps: float = 25.0
    occluders: tuple[Box, ...] = ()
    line: tuple[tuple[float, float], tuple[float, float]] = ((40.0, 240.0), (600.0, 240.0))
    zone: tuple[tuple[float, float], ...] = ((360, 300), (620, 300), (620, 470), (360, 470))
    dwell_s: float = 2.0


SCENE = Scene(
    objects=(
        # down across the line behind the pillar (hidden ~1 s), then out at the bottom
        ScriptedObject(1, ((0, 175, 60), (150, 175, 430), (175, 175, 500))),
        # up across the line, out at the top
        ScriptedObject(2, ((20, 300, 420), (200, 300, 40), (215, 300, -30))),
        # down across the line into the zone, stays ~4 s, leaves to the right
        ScriptedObject(3, ((10, 480, 60), (90, 480, 380), (200, 484, 382), (240, 700, 382))),
        # two that cross each other above the line
        ScriptedObject(4, ((30, 60, 110), (200, 580, 110))),
        ScriptedObject(5, ((30, 580, 125), (200, 60, 125))),
        # stands in the zone the whole time
        ScriptedObject(6, ((0, 570, 430), (250, 572, 431))),
        # through the bottom of the zone without stopping, out at the right
        ScriptedObject(7, ((100, 330, 440), (170, 700, 440))),
        # late ones: from the zone up across the line, and down across it
        ScriptedObject(8, ((110, 420, 330), (240, 420, 40))),
        ScriptedObject(9, ((150, 250, 60), (250, 250, 330))),
    ),
    frames=250,
    occluders=((150.0, 205.0, 200.0, 255.0),),
)

# Three objects at least 200 px apart whenever they coexist, so the ``blobdet`` sample model
# (which merges squares closer than its 144-px window) sees each alone: one passes behind the
# pillar while crossing the line and leaves, one stays in the zone past dwell_s and leaves,
# one crosses the line the other way and leaves.
SPARSE_SCENE = Scene(
    objects=(
        ScriptedObject(1, ((0, 175, 40), (60, 175, 400), (70, 175, 520))),
        ScriptedObject(2, ((0, 520, 60), (35, 520, 380), (100, 522, 382), (118, 700, 382))),
        ScriptedObject(3, ((72, 300, 430), (120, 300, 40), (130, 300, -30))),
    ),
    frames=135,
    occluders=((150.0, 205.0, 200.0, 255.0),),
)


@dataclass
class GroundTruth:
    """Per frame: {object id: box} of the visible objects; and what a counter should report."""

    boxes: list[dict[int, Box]] = field(default_factory=list)
    crossed: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    entered: int = 0
    left: int = 0
    dwell: int = 0


def _visible(box: Box, covers: Sequence[Box]) -> tuple[float, Box]:
    """The share of ``box`` left by the one of ``covers`` that hides most, and the visible
    part's box (the uncovered band when the cover spans the box's width or height)."""
    x1, y1, x2, y2 = box
    area = max((x2 - x1) * (y2 - y1), 1e-9)
    hidden, part = 0.0, box
    for c in covers:
        w = max(0.0, min(x2, c[2]) - max(x1, c[0]))
        h = max(0.0, min(y2, c[3]) - max(y1, c[1]))
        if w * h / area <= hidden:
            continue
        hidden, part = w * h / area, box
        if c[0] <= x1 and c[2] >= x2:  # a horizontal band is hidden: keep the larger rest
            part = (x1, y1, x2, c[1]) if c[1] - y1 >= y2 - c[3] else (x1, c[3], x2, y2)
        elif c[1] <= y1 and c[3] >= y2:
            part = (x1, y1, c[0], y2) if c[0] - x1 >= x2 - c[2] else (c[2], y1, x2, y2)
    return 1.0 - hidden, part


def _in_frame(box: Box, size: tuple[int, int]) -> Box | None:
    w, h = size
    c = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(w)), min(box[3], float(h)))
    full = (box[2] - box[0]) * (box[3] - box[1])
    part = max(0.0, c[2] - c[0]) * max(0.0, c[3] - c[1])
    return c if part >= 0.5 * full else None


def _frame_objects(scene: Scene, t: int) -> list[tuple[ScriptedObject, Box, float, Box]]:
    """(object, box in frame, visible fraction, visible part) of the objects present at ``t``;
    nearer objects (lower on screen) hide farther ones, the pillar hides all."""
    present = []
    for o in scene.objects:
        b = o.box(t)
        clipped = _in_frame(b, scene.size) if b is not None else None
        if clipped is not None:
            present.append((o, clipped))
    out = []
    for o, b in present:
        nearer = [c for p, c in present if p is not o and c[3] > b[3]]
        out.append((o, b, *_visible(b, [*scene.occluders, *nearer])))
    return out


def _anchor(b: Box) -> tuple[float, float]:
    return ((b[0] + b[2]) / 2, b[3])


def _side(p: tuple[float, float], line: tuple[tuple[float, float], tuple[float, float]]) -> float:
    (ax, ay), (bx, by) = line
    return (p[0] - ax) * (by - ay) * -1 + (p[1] - ay) * (bx - ax)


def _inside(p: tuple[float, float], poly: Sequence[tuple[float, float]]) -> bool:
    contour = np.array(poly, dtype=np.float32).reshape(-1, 1, 2)
    return cv2.pointPolygonTest(contour, p, False) > 0


def ground_truth(scene: Scene = SCENE) -> GroundTruth:
    """What a perfect tracker and counter see: every object present (hidden or not) keeps its
    id; each object's first line crossing, zone entry, exit and dwell count once."""
    gt = GroundTruth()
    side: dict[int, float] = {}
    entered_at: dict[int, int] = {}
    done: dict[int, set[str]] = {}
    for t in range(scene.frames):
        frame = _frame_objects(scene, t)
        gt.boxes.append({o.oid: b for o, b, _, _ in frame})
        for o, b, _, _ in frame:
            p, marks = _anchor(b), done.setdefault(o.oid, set())
            s = _side(p, scene.line)
            if o.oid in side and side[o.oid] * s < 0 and "crossed" not in marks:
                marks.add("crossed")
                gt.crossed["in" if s > 0 else "out"] += 1
            side[o.oid] = s if s != 0 else side.get(o.oid, 0.0)
            inside = _inside(p, scene.zone)
            if inside and "entered" not in marks:
                marks.add("entered")
                entered_at[o.oid] = t
                gt.entered += 1
            if "entered" in marks and not inside and "left" not in marks:
                marks.add("left")
                gt.left += 1
            stayed = (t - entered_at.get(o.oid, t)) / scene.fps
            if inside and stayed >= scene.dwell_s and not marks & {"left", "dwell"}:
                marks.add("dwell")
                gt.dwell += 1
        gone = {o.oid for o in scene.objects if o.box(t) is not None} - set(gt.boxes[-1])
        for oid in gone & set(entered_at):
            if "left" not in done[oid]:  # left the frame from inside the zone
                done[oid].add("left")
                gt.left += 1
    return gt


def detections(
    scene: Scene = SCENE, seed: int = 0, *, jitter: float = 1.5, miss: float = 0.03
) -> list[list[Detection]]:
    """A detector's output per frame for the scene (see the module docstring)."""
    rng = np.random.default_rng(seed)
    w, h = scene.size
    out: list[list[Detection]] = []
    for t in range(scene.frames):
        dets = []
        for o, b, vis, part in _frame_objects(scene, t):
            if vis < 0.4 or rng.random() < miss:
                continue
            score = rng.uniform(0.7, 0.95)
            if vis < 0.75:  # partly hidden: the visible part, low score
                b, score = part, rng.uniform(0.2, 0.45)
            x1, y1, x2, y2 = (float(v) for v in np.array(b) + rng.normal(0, jitter, 4))
            dets.append(Detection((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)), score, 0, o.label))
        if rng.random() < 0.1:  # a stray low-score box
            x, y = rng.uniform(0, w - 30), rng.uniform(0, h - 30)
            dets.append(Detection((x, y, x + 30, y + 30), float(rng.uniform(0.15, 0.4)), 0, "blob"))
        out.append(dets)
    return out


def render(scene: Scene, t: int, *, background: int = 20) -> np.ndarray:
    """Frame ``t`` as BGR uint8: white squares on a dark background, the pillar over them."""
    w, h = scene.size
    img = np.full((h, w, 3), background, np.uint8)
    for o in scene.objects:
        b = o.box(t)
        if b is not None:
            x1, y1, x2, y2 = (round(v) for v in b)
            cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), (255, 255, 255), thickness=-1)
    for c in scene.occluders:
        p1, p2 = (round(c[0]), round(c[1])), (round(c[2]) - 1, round(c[3]) - 1)
        cv2.rectangle(img, p1, p2, (60, 60, 60), -1)
    return img


def write_scene_video(
    path: str | Path,
    scene: Scene = SCENE,
    *,
    codec: str = "FFV1",
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """The scene as a video at its fps: lossless FFV1 by default (decoded frames equal
    ``render``'s), or e.g. MJPG like a camera's; ``noise`` adds Gaussian sensor noise (grey
    levels, standard deviation) to every frame.

    Raises:
        OSError: OpenCV cannot write ``codec`` to ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = scene.size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), scene.fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {codec} video to {path}")
    rng = np.random.default_rng(seed)
    try:
        for t in range(scene.frames):
            img = render(scene, t)
            if noise > 0:
                grain = rng.normal(0, noise, img.shape)
                img = np.clip(img + grain, 0, 255).astype(np.uint8)
            writer.write(img)
    finally:
        writer.release()
    return path


def crowd(n: int, frames: int, seed: int = 0, size: tuple[int, int] = (1920, 1080)) -> Scene:
    """``n`` squares bouncing around a ``size`` frame for ``frames`` frames (cost runs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    objects = []
    for i in range(n):
        x, y = rng.uniform(40, w - 40), rng.uniform(40, h - 40)
        vx, vy = rng.uniform(-6, 6, 2)
        path = []
        for t in range(0, frames + 20, 20):
            path.append((t, x, y))
            x, y = x + 20 * vx, y + 20 * vy
            if not 40 <= x <= w - 40:
                vx, x = -vx, min(max(x, 40), w - 40)
            if not 40 <= y <= h - 40:
                vy, y = -vy, min(max(y, 40), h - 40)
        objects.append(ScriptedObject(i + 1, tuple(path), side=int(rng.integers(30, 80))))
    line = ((0.1 * w, 0.5 * h), (0.9 * w, 0.5 * h))
    zone = ((0.55 * w, 0.6 * h), (0.95 * w, 0.6 * h), (0.95 * w, 0.95 * h), (0.55 * w, 0.95 * h))
    return Scene(tuple(objects), frames, size, line=line, zone=zone)


def id_switches(
    gt: GroundTruth, tracked: Sequence[Sequence[tuple[Box, int | None]]], min_iou: float = 0.3
) -> tuple[int, int]:
    """CLEAR-MOT identity switches: per ground-truth object, how often the id of the tracked
    box matched to it (best IoU >= ``min_iou``) differs from the id it had last time.

    Returns:
        (switches, distinct ids given to objects that should each have had one).
    """
    from agent.pipeline.assign import iou_matrix

    last: dict[int, int] = {}
    ids: dict[int, set[int]] = {}
    switches = 0
    for truth, seen in zip(gt.boxes, tracked, strict=True):
        pairs = [(b, i) for b, i in seen if i is not None]
        if not truth or not pairs:
            continue
        oids = list(truth)
        iou = iou_matrix(np.array([truth[o] for o in oids]), np.array([b for b, _ in pairs]))
        for r, oid in enumerate(oids):
            c = int(np.argmax(iou[r]))
            if iou[r, c] < min_iou or int(np.argmax(iou[:, c])) != r:
                continue
            tid = pairs[c][1]
            if oid in last and last[oid] != tid:
                switches += 1
            last[oid] = tid
            ids.setdefault(oid, set()).add(tid)
    return switches, sum(len(v) for v in ids.values()) - len(ids)
