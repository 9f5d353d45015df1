"""Adapter: the samples a publish calibrates, gates and makes golden files from.

Images (``*.jpg``/``*.jpeg``/``*.png``) in a folder, preprocessed as the card says, or model
inputs in ``calibration.npz`` (key ``inputs``, [N, ...]) beside the model. Sorted by file name,
every 5th sample (index % 5 == 4) is held back for the gate, the rest calibrate. With no samples,
``random_inputs`` makes seeded frames of random 8x8-pixel blocks for the golden file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from agent.protocol.card import ModelCard
from cloud_sync.registry.model_file import OnnxInfo, static_dim
from cloud_sync.registry.repo import RegistryError

__all__ = ["GOLDEN_COUNT", "HOLD_BACK_EVERY", "golden_count", "random_inputs", "split_samples"]

MAX_SAMPLES = 640  # more files are thinned evenly: MinMax calibration saturates long before
HOLD_BACK_EVERY = 5
GOLDEN_COUNT = 4
GOLDEN_MAX_BYTES = 8 << 20  # uncompressed golden inputs: one 640x640 RGB float32 input, not 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _load_images(folder: Path, card: ModelCard) -> np.ndarray:
    import cv2

    from agent.pipeline.preprocess import Preprocessor

    if not folder.is_dir():
        raise RegistryError(f"calibration folder {folder} does not exist", path=str(folder))
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) > MAX_SAMPLES:
        files = files[:: math.ceil(len(files) / MAX_SAMPLES)]
    pre = Preprocessor(card.input)
    tensors = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            raise RegistryError(f"calibration image {f} cannot be decoded", path=str(f))
        tensors.append(pre(np.asarray(img))[0])
    if not tensors:
        raise RegistryError(
            f"no {'/'.join(IMAGE_SUFFIXES)} files in calibration folder {folder}", path=str(folder)
        )
    return np.concatenate(tensors)


def _load_npz(path: Path, info: OnnxInfo) -> np.ndarray:
    try:
        with np.load(path) as z:
            arr = np.asarray(z["inputs"])
    except (OSError, KeyError, ValueError) as e:
        raise RegistryError(
            f"{path} must hold an array 'inputs' [N, ...] of model inputs: {e}", path=str(path)
        ) from e
    sample = (1, *arr.shape[1:])
    if len(sample) != len(info.input_shape) or any(
        static_dim(d) not in (None, s) for d, s in zip(info.input_shape, sample, strict=True)
    ):
        raise RegistryError(
            f"{path} inputs have sample shape {list(sample)}, model input is "
            f"{list(info.input_shape)}",
            path=str(path),
        )
    return arr


def random_inputs(card: ModelCard) -> np.ndarray:
    """``GOLDEN_COUNT`` seeded frames of random 8x8-pixel blocks, preprocessed as the card says.

    Blocks rather than per-pixel noise: flat areas and edges like a camera frame's, and a
    ``golden.npz`` that compresses (noise at 640x640 would not).
    """
    import cv2

    from agent.pipeline.preprocess import Preprocessor

    rng = np.random.default_rng(0)
    pre = Preprocessor(card.input)
    w, h = card.input.width, card.input.height
    small = (max(1, -(-h // 8)), max(1, -(-w // 8)), 3)
    frames = [
        cv2.resize(
            rng.integers(0, 256, small, dtype=np.uint8), (w, h), interpolation=cv2.INTER_NEAREST
        )
        for _ in range(GOLDEN_COUNT)
    ]
    return np.concatenate([pre(np.asarray(f))[0] for f in frames])


def golden_count(sample: np.ndarray) -> int:
    """How many golden pairs to ship: up to 4, fewer for big inputs (at least 1)."""
    return max(1, min(GOLDEN_COUNT, GOLDEN_MAX_BYTES // max(1, sample.nbytes)))


def split_samples(
    model: Path, info: OnnxInfo, card: ModelCard, calibration_dir: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(calibration part, held-back part) of the samples, or None when there are none."""
    if calibration_dir is not None:
        samples = _load_images(Path(calibration_dir), card)
    elif (model.parent / "calibration.npz").is_file():
        samples = _load_npz(model.parent / "calibration.npz", info)
    else:
        return None
    held = np.arange(len(samples)) % HOLD_BACK_EVERY == HOLD_BACK_EVERY - 1
    return samples[~held], samples[held]
