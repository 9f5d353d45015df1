"""Adapter: the files of a model version — sha256, a CPU ONNX Runtime session, card and golden.

Publish writes a version's ``card.json``, ``labels.txt`` and ``golden.npz`` through here, and the
sample builders (``cloud_sync.samples``) do too, so every model folder has the same card layout
and ``golden.npz`` key scheme (``input_0``.. / ``output_0``..).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.protocol.card import ModelCard

__all__ = ["ort_session", "write_card", "write_golden"]


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (``threads`` 0 = ORT's default intra-op thread count)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def write_golden(
    model_dir: Path,
    inputs: Sequence[np.ndarray],
    constants: dict[str, np.ndarray] | None = None,
) -> None:
    """Run the FP32 model on ``inputs`` (batch-1 tensors) and store inputs and outputs.

    Args:
        model_dir: holds ``model.onnx``; ``golden.npz`` is written there.
        inputs: image-input tensors.
        constants: the card's constant extra inputs (fed, not stored: the card has them).

    Raises:
        ValueError: 10 or more inputs (``input_10`` would sort before ``input_2``).
    """
    if len(inputs) >= 10:
        raise ValueError(f"golden.npz takes at most 9 inputs (key sort order), got {len(inputs)}")
    sess = ort_session(model_dir / "model.onnx")
    consts = constants or {}
    name = next(i.name for i in sess.get_inputs() if i.name not in consts)
    arrays: dict[str, np.ndarray] = {}
    for i, x in enumerate(inputs):
        arrays[f"input_{i}"] = x
        arrays[f"output_{i}"] = sess.run(None, {**consts, name: x})[0]
    np.savez_compressed(model_dir / "golden.npz", **arrays)  # type: ignore[arg-type]


def write_card(model_dir: Path, card: ModelCard) -> None:
    """Write ``card.json`` and, when the card has labels, ``labels.txt`` (one per line)."""
    (model_dir / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    if card.labels:
        (model_dir / "labels.txt").write_text("".join(f"{lb}\n" for lb in card.labels))
