"""Adapter: what the sample builders share — ONNX saving, ORT sessions, card and golden files.

Everything a builder writes into its model folder goes through here, so every sample gets the same
opset, IR version, card layout and ``golden.npz`` key scheme.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from agent.protocol.card import ModelCard

OPSET = 17
IR_VERSION = 8  # the IR that goes with opset 17; older ONNX Runtime / TensorRT parsers accept it
SEED = 20240611


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def init_tensor(name: str, value: np.ndarray | float | Sequence[float]) -> TensorProto:
    """A float32 initializer named ``name``."""
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def save_model(graph: onnx.GraphProto, path: Path) -> None:
    """Wrap ``graph`` in an opset-17 / IR-8 model, check it fully and write it to ``path``.

    Raises:
        onnx.checker.ValidationError: the graph is not valid ONNX.
    """
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


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


def time_model(path: Path, x: np.ndarray, *, threads: int, runs: int = 20) -> float:
    """Median ms per inference under ONNX Runtime (threads 0 = ORT default), after 3 warm-ups."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)
