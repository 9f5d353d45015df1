"""Pure: constant-velocity Kalman filters of boxes, all tracks at once (ByteTrack's motion model).

The state of a box is (cx, cy, w, h) and their velocities, in pixels and pixels per second.
Noise follows ByteTrack: standard deviations proportional to the box size (1/20 for position,
1/160 per frame at 30 fps for velocity), process noise growing with the time elapsed, so a
filter works the same whatever frames the pipeline skips.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["BoxFilter", "xyxy_to_z"]

F64 = npt.NDArray[np.float64]
_POS = 1.0 / 20.0  # position/size standard deviation, as a fraction of the size
_VEL = 30.0 / 160.0  # velocity standard deviation per second (1/160 per frame at 30 fps)
_FRAMES_PER_S = 30.0  # process noise grows with the nominal frames elapsed
_MIN_SIZE = 1.0  # pixels: noise of a zero-width box would be zero, and its gain 0/0


def xyxy_to_z(box: F64) -> F64:
    w, h = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    out: F64 = np.stack([box[..., 0] + w / 2, box[..., 1] + h / 2, w, h], axis=-1)
    return out


class BoxFilter:
    """Constant-velocity Kalman filters of N boxes, one row per track.

    The state of a box is (cx, cy, w, h) and their velocities. With ByteTrack's diagonal
    process and measurement noise, each of the four coordinates is an independent
    position/velocity pair, so the 8x8 covariance is four 2x2 blocks: kept as three [N,4]
    arrays (position variance, covariance, velocity variance), every step is a few element-wise
    operations on [N,4] arrays instead of batched 8x8 matrix products.
    """

    def __init__(self) -> None:
        z = np.zeros((0, 4))
        self.x, self.v, self.pp, self.pv, self.vv = z, z.copy(), z.copy(), z.copy(), z.copy()

    def boxes(self) -> F64:
        """[N,4] x1, y1, x2, y2 of the current estimates."""
        c, wh = self.x[:, :2], np.maximum(self.x[:, 2:], 1e-3) / 2
        out: F64 = np.concatenate([c - wh, c + wh], axis=1)
        return out

    def _size(self) -> F64:
        wh = np.maximum(np.abs(self.x[:, 2:]), _MIN_SIZE)
        return np.concatenate([wh, wh], axis=1)  # scale of cx, cy, w, h: w, h, w, h

    def append(self, z: F64) -> None:
        """New filters at measurements ``z`` [M,4] (cx, cy, w, h), at rest."""
        wh = np.maximum(np.abs(np.concatenate([z[:, 2:], z[:, 2:]], axis=1)), _MIN_SIZE)
        zero = np.zeros_like(z)
        self.x = np.concatenate([self.x, z])
        self.v = np.concatenate([self.v, zero])
        self.pp = np.concatenate([self.pp, (2 * _POS * wh) ** 2])
        self.pv = np.concatenate([self.pv, zero])
        self.vv = np.concatenate([self.vv, (10 * _VEL * wh) ** 2])

    def keep(self, rows: list[int]) -> None:
        self.x, self.v, self.pp, self.pv, self.vv = (
            a[rows] for a in (self.x, self.v, self.pp, self.pv, self.vv)
        )

    def predict(self, dt: float, frozen_size: npt.NDArray[np.bool_]) -> None:
        """Advance every filter by ``dt`` seconds; rows in ``frozen_size`` (lost tracks) keep
        their size (ByteTrack)."""
        self.v[frozen_size, 2:] = 0.0
        self.x += dt * self.v
        k = max(dt * _FRAMES_PER_S, 1e-3)  # process noise grows with the frames elapsed
        size2 = self._size() ** 2
        self.pp += dt * (2 * self.pv + dt * self.vv) + _POS**2 * size2 * k
        self.pv += dt * self.vv
        self.vv += _VEL**2 * size2 * k

    def correct(self, rows: npt.NDArray[np.intp], z: F64) -> None:
        """Update the filters of ``rows`` with measurements ``z`` [M,4] (cx, cy, w, h)."""
        r = (
            _POS * np.maximum(np.abs(np.concatenate([z[:, 2:], z[:, 2:]], axis=1)), _MIN_SIZE)
        ) ** 2
        pp, pv = self.pp[rows], self.pv[rows]
        s = pp + r
        kp, kv = pp / s, pv / s
        y = z - self.x[rows]
        self.x[rows] += kp * y
        self.v[rows] += kv * y
        self.pp[rows] = (1 - kp) * pp
        self.pv[rows] = (1 - kp) * pv
        self.vv[rows] -= kv * pv
