"""Adapter: the project's sample models and test videos, built deterministically.

Models (each in ``OUT/NAME/`` with ``model.onnx``, ``card.json``, ``golden.npz`` and, when it has
labels, ``labels.txt``):

* ``digits``: a small CNN trained with plain NumPy on scikit-learn's bundled 8x8 digits, plus an
  INT8 QDQ variant (``model.int8.onnx``), ``accuracy.json`` and the held-out ``test_set.npz``.
  Needs scikit-learn (the ``test`` extra), imported only when this model is built.
* ``blobdet``: a hand-designed YOLOv5-style detector of bright squares on a dark background.
* ``tinyseg``: a heat-map of dark pixels with dynamic input height and width.

``golden.npz`` holds ``input_0``.. and ``output_0``.. (batch 1 each, the model's input layout),
computed by ONNX Runtime on the FP32 model. Fewer than 10 pairs, so key order sorts correctly.

The same inputs always give byte-identical model files: every random draw is seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cloud_sync.samples.blobdet import Box, blob_frame, build_blobdet, letterbox_nchw
from cloud_sync.samples.digits import build_digits
from cloud_sync.samples.tinyseg import build_tinyseg
from cloud_sync.samples.video import blob_track, write_blob_video, write_digit_video

__all__ = [
    "BUILDERS",
    "MODELS",
    "Box",
    "blob_frame",
    "blob_track",
    "build_all",
    "build_model",
    "letterbox_nchw",
    "write_blob_video",
    "write_digit_video",
]

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "digits": build_digits,
    "blobdet": build_blobdet,
    "tinyseg": build_tinyseg,
}
MODELS: tuple[str, ...] = tuple(BUILDERS)


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in BUILDERS:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")


def build_model(name: str, out_dir: Path) -> Path:
    """Build one sample model into ``out_dir/name``; returns that folder.

    Raises:
        KeyError: ``name`` is not one of ``MODELS``.
        ImportError: ``name`` is ``digits`` and scikit-learn is not installed.
        RuntimeError: the digits model misses its accuracy floor.
    """
    _check_names([name])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](out_dir)


def build_all(out_dir: Path, only: Sequence[str] | None = None) -> dict[str, Path]:
    """Build the sample models (all, or those in ``only``, in that order) into ``out_dir``.

    Returns:
        Model name -> model folder.

    Raises:
        KeyError: ``only`` names an unknown model (checked before anything is built).
        ImportError: the digits model is asked for and scikit-learn is not installed.
        RuntimeError: the digits model misses its accuracy floor.
    """
    names = list(BUILDERS) if only is None else list(only)
    _check_names(names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: BUILDERS[name](out_dir) for name in names}
