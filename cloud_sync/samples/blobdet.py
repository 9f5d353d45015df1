"""Adapter: the ``blobdet`` sample — a hand-designed YOLOv5-style detector of bright squares.

Input [1,3,640,640] RGB /255 letterboxed; output [1,1600,6] rows ``[cx, cy, w, h, obj, cls]`` in
input pixels, one per cell of a 40x40 grid. A seeded conv stack whose (negligible) output is
added to the logits makes it cost real, unfoldable compute. Needs only NumPy, ONNX, ONNX Runtime
and OpenCV, so ``edgefleet demo`` can build it on any install.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.common.fsutil import sha256_file
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec, VariantSpec
from cloud_sync.registry.artifacts import write_card, write_golden
from cloud_sync.samples.common import SEED, init_tensor, save_model, time_model

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels, x2/y2 exclusive

BLOB_SIZE = 640
BLOB_CELL = 16  # grid of 40x40 cells
BLOB_WINDOW = 9  # cells per side of the window whose moments give the box (144 px)
# (out channels, stride) of the seeded 3x3 conv stack that adds compute; ends on the 40x40 grid
BLOB_HEAVY = ((32, 2), (64, 2), (64, 1), (64, 2), (64, 1), (64, 2))


_Part = tuple[list[onnx.NodeProto], list[TensorProto]]


def _blob_box_part() -> _Part:
    """images -> cx, cy, w, h, logit_base, cls on the 40x40 grid.

    Pixels are 'bright' where the channel mean is >= 0.6 (ramp 0.55..0.65, so letterbox grey
    114/255 and a dark background read 0). Per cell, exact moments of that mask (count, first,
    second, in cell units about the cell centre) via a stride-16 conv; summing them over a 9x9-cell
    window gives the centroid and the variance of the bright pixels, and a uniform rectangle of
    width w has variance (w^2 - 1)/12 on a pixel grid. Every cell in the window of a square thus
    predicts the square's own box, and NMS collapses them. Objectness rewards bright area and the
    centroid being near the cell centre (the YOLO 'responsible cell').
    """
    return _blob_box_nodes(), _blob_box_inits()


def _blob_box_inits() -> list[TensorProto]:
    """The box part's weights: moment and window kernels, the cell grid and the constants."""
    g, cell, k = BLOB_SIZE // BLOB_CELL, BLOB_CELL, BLOB_WINDOW
    rel = (np.arange(cell) + 0.5 - cell / 2) / cell  # pixel centre offset, in cells
    ry, rx = np.meshgrid(rel, rel, indexing="ij")
    wm = np.stack([np.ones_like(rx), rx, ry, rx * rx, ry * ry])[:, None]  # [5,1,16,16]
    off = np.arange(k) - k // 2  # neighbour-cell offset, in cells
    dy, dx = np.meshgrid(off, off, indexing="ij")
    z, o = np.zeros((k, k)), np.ones((k, k))
    # rows: S0, Sx, Sy, Sxx, Syy ; columns: M0, Mx, My, Mxx, Myy of each neighbour cell
    ws = np.array(
        [
            [o, z, z, z, z],
            [dx, o, z, z, z],
            [dy, z, o, z, z],
            [dx * dx, 2 * dx, z, o, z],
            [dy * dy, z, 2 * dy, z, o],
        ]
    )
    gy, gx = np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5, indexing="ij")
    return [
        init_tensor("w_bright", np.full((1, 3, 1, 1), 10.0 / 3.0)),
        init_tensor("b_bright", [-5.5]),
        init_tensor("w_mom", wm),
        init_tensor("w_win", ws),
        init_tensor("grid_x", gx[None, None]),
        init_tensor("grid_y", gy[None, None]),
        init_tensor("zero", 0.0),
        init_tensor("one", 1.0),
        init_tensor("eps", 1e-6),
        init_tensor("cell", float(cell)),
        init_tensor("var_to_w2", 12.0 * cell * cell),
        init_tensor("inv_cell_area", 1.0 / (cell * cell)),
        init_tensor("inv_min_area", 1.0 / 64.0),
        init_tensor("k_fill", 16.0),
        init_tensor("k_dist", -6.0),
        init_tensor("bias", -0.5),
        helper.make_tensor("split5", TensorProto.INT64, [5], [1] * 5),
    ]


def _blob_box_nodes() -> list[onnx.NodeProto]:
    """The box part's graph: bright mask, moments, window sums, then box, objectness, class."""
    cell, k = BLOB_CELL, BLOB_WINDOW
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "w_bright", "b_bright"], ["bright_lin"], kernel_shape=[1, 1]),
        n("Clip", ["bright_lin", "zero", "one"], ["bright"]),
        n("Conv", ["bright", "w_mom"], ["mom"], kernel_shape=[cell, cell], strides=[cell, cell]),
        n("Conv", ["mom", "w_win"], ["win"], kernel_shape=[k, k], pads=[k // 2] * 4),
        n("Split", ["win", "split5"], ["s0", "sx", "sy", "sxx", "syy"], axis=1),
        n("Add", ["s0", "eps"], ["den"]),
    ]
    for a in ("x", "y"):
        nodes += [
            n("Div", [f"s{a}", "den"], [f"m{a}"]),  # centroid offset from the cell centre
            n("Div", [f"s{a}{a}", "den"], [f"e{a}{a}"]),
            n("Mul", [f"m{a}", f"m{a}"], [f"m{a}2"]),
            n("Sub", [f"e{a}{a}", f"m{a}2"], [f"v{a}_raw"]),
            n("Relu", [f"v{a}_raw"], [f"v{a}"]),  # variance; rounding can make it -0.0001
            n("Mul", [f"v{a}", "var_to_w2"], [f"{a}_w2"]),
            n("Add", [f"{a}_w2", "one"], [f"{a}_w2p"]),
            n("Sqrt", [f"{a}_w2p"], ["w" if a == "x" else "h"]),
            n("Add", [f"m{a}", f"grid_{a}"], [f"c{a}_cells"]),
            n("Mul", [f"c{a}_cells", "cell"], [f"c{a}"]),
            n("Abs", [f"m{a}"], [f"d{a}"]),
        ]
    nodes += [
        n("Max", ["dx", "dy"], ["dist"]),
        n("Mul", ["s0", "inv_cell_area"], ["fill_raw"]),
        n("Min", ["fill_raw", "one"], ["fill"]),
        n("Mul", ["fill", "k_fill"], ["t_fill"]),
        n("Mul", ["dist", "k_dist"], ["t_dist"]),
        n("Add", ["t_fill", "t_dist"], ["t_sum"]),
        n("Add", ["t_sum", "bias"], ["logit_base"]),
        n("Mul", ["s0", "inv_min_area"], ["cls_raw"]),
        n("Clip", ["cls_raw", "zero", "one"], ["cls"]),
    ]
    return nodes


def _blob_heavy_part() -> _Part:
    """images -> heavy [1,1,40,40] in +-1e-6: the seeded conv stack that makes compute real.

    ORT cannot fold it (it depends on the input) and it cannot move a result by more than float
    rounding. Uses the initializers "one" from the box part.
    """
    rng = np.random.default_rng(SEED + 1)
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x, cin = "images", 3
    for i, (cout, stride) in enumerate(BLOB_HEAVY):
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3))
        inits += [init_tensor(f"hw{i}", w), init_tensor(f"hb{i}", np.zeros(cout))]
        conv = n("Conv", [x, f"hw{i}", f"hb{i}"], [f"hz{i}"], kernel_shape=[3, 3], pads=[1] * 4)
        conv.attribute.append(helper.make_attribute("strides", [stride, stride]))
        nodes += [conv, n("Relu", [f"hz{i}"], [f"ha{i}"])]
        x, cin = f"ha{i}", cout
    w_head = rng.normal(0, np.sqrt(1 / cin), (1, cin, 1, 1))
    inits += [init_tensor("hw_head", w_head), init_tensor("tiny", 1e-6), init_tensor("m_one", -1.0)]
    nodes += [
        n("Conv", [x, "hw_head"], ["heavy_raw"], kernel_shape=[1, 1]),
        n("Clip", ["heavy_raw", "m_one", "one"], ["heavy_clip"]),
        n("Mul", ["heavy_clip", "tiny"], ["heavy"]),
    ]
    return nodes, inits


def blobdet_graph(heavy: bool = True) -> onnx.GraphProto:
    """The blobdet graph; ``heavy=False`` drops the compute-only path (for timing comparisons)."""
    g = BLOB_SIZE // BLOB_CELL
    nodes, inits = _blob_box_part()
    if heavy:
        h_nodes, h_inits = _blob_heavy_part()
        nodes += [*h_nodes, helper.make_node("Add", ["logit_base", "heavy"], ["logit"])]
        inits += h_inits
    else:
        nodes.append(helper.make_node("Identity", ["logit_base"], ["logit"]))
    inits.append(helper.make_tensor("shape_out", TensorProto.INT64, [3], [1, 6, g * g]))
    nodes += [
        helper.make_node("Sigmoid", ["logit"], ["obj"]),
        helper.make_node("Concat", ["cx", "cy", "w", "h", "obj", "cls"], ["grid_out"], axis=1),
        helper.make_node("Reshape", ["grid_out", "shape_out"], ["rows_t"]),
        helper.make_node("Transpose", ["rows_t"], ["output0"], perm=[0, 2, 1]),
    ]
    return helper.make_graph(
        nodes,
        "blobdet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, BLOB_SIZE, BLOB_SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, g * g, 6])],
        inits,
    )


def blob_frame(size: tuple[int, int], box: Box, *, background: int = 20) -> np.ndarray:
    """A BGR uint8 frame (width, height = size) with a white filled box on a dark background."""
    w, h = size
    frame = np.full((h, w, 3), background, np.uint8)
    x1, y1, x2, y2 = box
    frame[y1:y2, x1:x2] = 255
    return frame


def letterbox_nchw(frame_bgr: np.ndarray, size: int = BLOB_SIZE, pad: int = 114) -> np.ndarray:
    """Letterbox to size x size (centred), BGR->RGB, /255, [1,3,size,size] float32."""
    h, w = frame_bgr.shape[:2]
    r = min(size / w, size / h)
    nw, nh = round(w * r), round(h * r)
    img = cv2.resize(frame_bgr, (nw, nh), interpolation=cv2.INTER_LINEAR) if r != 1 else frame_bgr
    canvas = np.full((size, size, 3), pad, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = img
    x: np.ndarray = canvas[:, :, ::-1].transpose(2, 0, 1)[None] / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_blobdet(out: Path) -> Path:
    """Write the blobdet model, card and golden pairs into ``out/blobdet``; returns that folder."""
    d = out / "blobdet"
    d.mkdir(parents=True, exist_ok=True)
    save_model(blobdet_graph(), d / "model.onnx")
    card = ModelCard(
        name="blobdet",
        version="1.0.0",
        task="detection",
        input=InputSpec(
            width=BLOB_SIZE,
            height=BLOB_SIZE,
            channels=3,
            color="rgb",
            layout="nchw",
            resize="letterbox",
            pad_value=114,
            scale=1.0 / 255.0,
            mean=(0.0,),
            std=(1.0,),
        ),
        postprocess=PostprocessSpec(
            score_threshold=0.5, iou_threshold=0.45, box_format="cxcywh", has_objectness=True
        ),
        labels=("blob",),
        variants=(
            VariantSpec(precision="fp32", file="model.onnx", sha256=sha256_file(d / "model.onnx")),
        ),
    )
    write_card(d, card)
    boxes = [(100, 120, 164, 184), (400, 300, 448, 340), (10, 10, 30, 30)]
    frames = [blob_frame((640, 480), b) for b in boxes]
    write_golden(d, [letterbox_nchw(f) for f in frames])
    return d


def bench_blobdet(model: Path, *, runs: int = 20) -> list[tuple[int, float, float]]:
    """Time ``model`` and the same graph without the conv stack, under ONNX Runtime.

    Returns:
        Per thread setting (1, then 0 = ORT default): threads, median ms of ``model``, median ms
        of the light graph.
    """
    x = letterbox_nchw(blob_frame((640, 480), (100, 100, 164, 164)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        light = Path(tmp) / "light.onnx"
        save_model(blobdet_graph(heavy=False), light)
        for threads in (1, 0):
            ms = time_model(model, x, threads=threads, runs=runs)
            ms_light = time_model(light, x, threads=threads, runs=runs)
            results.append((threads, ms, ms_light))
    return results
