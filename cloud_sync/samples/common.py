"""Adapter: what the sample builders share — ONNX saving, initializers and timing.

Every sample graph is saved through here, so every sample gets the same opset and IR version;
card, golden and sha256 files come from ``cloud_sync.registry.artifacts``, as publish's do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cloud_sync.registry.artifacts import ort_session

OPSET = 17
IR_VERSION = 8  # the IR that goes with opset 17; older ONNX Runtime / TensorRT parsers accept it
SEED = 20240611


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
