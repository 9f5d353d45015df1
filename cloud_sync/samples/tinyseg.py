"""Adapter: the ``tinyseg`` sample — a heat-map of dark pixels, any input height and width.

Input [1,3,H,W] RGB /255; output [1,1,H,W], sigmoid(20 * (0.25 - 3x3 box blur of the channel
mean)): a pixel is "dark" below 0.25. Needs only NumPy, ONNX and ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from agent.common.fsutil import sha256_file
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec, VariantSpec
from cloud_sync.registry.artifacts import write_card, write_golden
from cloud_sync.samples.common import SEED, init_tensor, save_model


def build_tinyseg(out: Path) -> Path:
    """Write the tinyseg model, card and golden pairs into ``out/tinyseg``; returns that folder."""
    d = out / "tinyseg"
    d.mkdir(parents=True, exist_ok=True)
    # 3x3 box blur of the channel mean, then sigmoid(20 * (0.25 - blurred)): dark = below 0.25.
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["z"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Sigmoid", ["z"], ["heatmap"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tinyseg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [init_tensor("w", np.full((1, 3, 3, 3), -20.0 / 27.0)), init_tensor("b", [20.0 * 0.25])],
    )
    save_model(graph, d / "model.onnx")
    card = ModelCard(
        name="tinyseg",
        version="1.0.0",
        task="heatmap",
        input=InputSpec(width=320, height=240, color="rgb", resize="stretch", scale=1.0 / 255.0),
        postprocess=PostprocessSpec(heatmap_threshold=0.5, min_area=4),
        labels=("dark",),
        variants=(
            VariantSpec(precision="fp32", file="model.onnx", sha256=sha256_file(d / "model.onnx")),
        ),
    )
    write_card(d, card)
    rng = np.random.default_rng(SEED + 2)
    goldens = []
    for h, w in ((240, 320), (64, 96)):
        img = np.full((h, w, 3), 200, np.uint8)
        img[h // 4 : h // 2, w // 3 : w // 2] = 10
        img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255)
        goldens.append((img.transpose(2, 0, 1)[None] / np.float32(255.0)).astype(np.float32))
    write_golden(d, goldens)
    return d
