"""The simulator's models and registry: tiny ONNX models of a chosen size (image → Flatten →
MatMul → scores, task ``raw``) published as ``sim@VERSION`` into a real signed TUF registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

INPUT_SHAPE = (1, 3, 16, 16)


def build_sim_model(path: Path, size_bytes: int, seed: int) -> Path:
    """An ONNX model of about ``size_bytes``: image → Flatten → MatMul(W) → scores.

    The weights differ per ``seed``, so each version has its own bytes.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_in = int(np.prod(INPUT_SHAPE))
    n_out = max(1, size_bytes // (4 * n_in))
    w = np.random.default_rng(seed).standard_normal((n_in, n_out)).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        ],
        "sim",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, n_out])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_sim_registry(repo_dir: Path, work: Path, versions: Sequence[str], size_bytes: int) -> None:
    """A TUF repository with model ``sim`` at each of ``versions``."""
    from cloud_sync.registry.publish import publish
    from cloud_sync.registry.repo import Repository

    repo = Repository.init(repo_dir)
    for i, version in enumerate(versions):
        model = build_sim_model(work / f"sim-{version}" / "model.onnx", size_bytes, seed=i + 1)
        publish(repo, model, name="sim", version=version, task="raw")
