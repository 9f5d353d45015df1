"""Adapter: the ``digits`` sample — a small CNN trained in NumPy on scikit-learn's 8x8 digits.

conv3x3x16 -> ReLU -> maxpool2 -> dense10 -> softmax, exported by writing the ONNX graph by hand,
plus a static INT8 QDQ variant (``model.int8.onnx``), ``accuracy.json`` and the held-out
``test_set.npz`` (uint8 images 0..255 and labels).

scikit-learn is a test-only dependency, imported only when the data set is loaded; an installed
``edgefleet`` without it can still import this module and build the other samples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from agent.common.fsutil import sha256_file
from agent.protocol.card import InputSpec, ModelCard, PostprocessSpec, VariantSpec
from cloud_sync.registry.artifacts import ort_session, write_card, write_golden
from cloud_sync.samples.common import SEED, init_tensor, save_model

SKLEARN_MISSING = "the digits sample needs scikit-learn: pip install 'edgefleet[test]'"


DIGITS_CHANNELS = 16


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as uint8 0..255 [n,8,8] (round(v/16*255)); first 75 % train, last 25 % test.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(SKLEARN_MISSING, name=e.name) from e

    ds = load_digits()
    images = np.round(ds.images / 16.0 * 255.0).astype(np.uint8)
    labels = ds.target.astype(np.int64)
    n_train = round(len(images) * 0.75)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def _im2col3x3(x: np.ndarray) -> np.ndarray:
    """[N,8,8] -> [N,8,8,9] patches of a 3x3 window with zero padding 1 (ky-major)."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
    return win.reshape(*x.shape, 9)


def _cnn_forward(
    params: dict[str, np.ndarray], cols: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    n, c = cols.shape[0], params["w1"].shape[0]
    z1 = cols @ params["w1"].T + params["b1"]  # [N,8,8,C]
    a1 = np.maximum(z1, 0.0)
    a1r = a1.reshape(n, 4, 2, 4, 2, c)
    pooled = a1r.max(axis=(2, 4))  # [N,4,4,C]
    flat = pooled.transpose(0, 3, 1, 2).reshape(n, c * 16)  # CHW order, as ONNX Flatten
    logits = flat @ params["w2"].T + params["b2"]
    return logits, (z1, a1r, pooled, flat)


def _shift_augment(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images plus copies shifted by one pixel up/down/left/right (zero fill)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    out = [images] + [padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy, dx in _SHIFTS]
    return np.concatenate(out), np.tile(labels, len(out))


_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def train_digits_cnn(
    images: np.ndarray, labels: np.ndarray, *, epochs: int = 15, seed: int = SEED
) -> dict[str, np.ndarray]:
    """Train with Adam on uint8 images scaled to 0..1 (plus 1-pixel shifted copies, which take
    held-out accuracy from ~0.94 to ~0.98); returns float32 parameters."""
    images, labels = _shift_augment(images, labels)
    rng = np.random.default_rng(seed)
    c = DIGITS_CHANNELS
    params = {
        "w1": rng.normal(0, np.sqrt(2 / 9), (c, 9)),
        "b1": np.zeros(c),
        "w2": rng.normal(0, np.sqrt(1 / (16 * c)), (10, 16 * c)),
        "b2": np.zeros(10),
    }
    cols_all = _im2col3x3(images.astype(np.float64) / 255.0)
    onehot = np.eye(10)[labels]
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    lr, b1, b2, step, batch = 0.01, 0.9, 0.999, 0, 64
    for epoch in range(epochs):
        lr_e = lr * (0.5 ** (epoch // 10))
        order = rng.permutation(len(images))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            cols, y = cols_all[idx], onehot[idx]
            logits, (z1, a1r, pooled, flat) = _cnn_forward(params, cols)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            dlogits = (p - y) / len(idx)
            grads = {"w2": dlogits.T @ flat, "b2": dlogits.sum(axis=0)}
            dpool = (dlogits @ params["w2"]).reshape(len(idx), c, 4, 4).transpose(0, 2, 3, 1)
            mask = a1r == pooled[:, :, None, :, None, :]
            da1 = (mask * dpool[:, :, None, :, None, :]).reshape(z1.shape)
            dz1 = (da1 * (z1 > 0)).reshape(-1, c)
            grads["w1"] = dz1.T @ cols.reshape(-1, 9)
            grads["b1"] = dz1.sum(axis=0)
            step += 1
            for k, g in grads.items():
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
                params[k] -= lr_e * mhat / (np.sqrt(vhat) + 1e-8)
    return {k: val.astype(np.float32) for k, val in params.items()}


def export_digits_onnx(params: dict[str, np.ndarray], path: Path) -> None:
    """Write the trained parameters as an ONNX graph taking [N,1,8,8] and giving softmax [N,10]."""
    c = DIGITS_CHANNELS
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["z1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [
            init_tensor("w1", params["w1"].reshape(c, 1, 3, 3)),
            init_tensor("b1", params["b1"]),
            init_tensor("w2", params["w2"]),
            init_tensor("b2", params["b2"]),
        ],
    )
    save_model(graph, path)


def predict_digits(model: Path, images_uint8: np.ndarray) -> np.ndarray:
    """Class index per image, by ONNX Runtime, feeding images/255 as [N,1,8,8]."""
    sess = ort_session(model)
    x = (images_uint8.astype(np.float32) / 255.0)[:, None]
    return np.asarray(np.argmax(sess.run(None, {"input": x})[0], axis=1))


def quantize_digits_int8(fp32: Path, int8: Path, calib_images: np.ndarray) -> None:
    """Static QDQ INT8 (what TensorRT builds as explicit INT8), calibrated on training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, images: np.ndarray) -> None:
            self._it = iter(images.astype(np.float32)[:, None, None] / 255.0)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x}

    # The recommended pre-processing, reduced to ONNX shape inference: the graph is already
    # minimal (ORT's optimiser would only add foreign opset imports) and its shapes are static but
    # for the batch (sympy-based symbolic inference not needed, nor installed).
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(int8),
            _Reader(calib_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["Conv", "MaxPool", "Gemm"],
        )


def build_digits(out: Path) -> Path:
    """Train, export, quantize and check the digits CNN into ``out/digits``; returns that folder.

    Raises:
        ImportError: scikit-learn is not installed (nothing is written).
        RuntimeError: the FP32 model's held-out accuracy is below 0.9.
    """
    x_train, y_train, x_test, y_test = load_digits_split()  # first: fail before writing anything
    d = out / "digits"
    d.mkdir(parents=True, exist_ok=True)
    params = train_digits_cnn(x_train, y_train)
    fp32, int8 = d / "model.onnx", d / "model.int8.onnx"
    export_digits_onnx(params, fp32)
    quantize_digits_int8(fp32, int8, x_train[:: max(1, len(x_train) // 256)])
    pred32, pred8 = predict_digits(fp32, x_test), predict_digits(int8, x_test)
    acc = {
        "test_accuracy": float(np.mean(pred32 == y_test)),
        "int8_test_accuracy": float(np.mean(pred8 == y_test)),
        "int8_top1_agreement": float(np.mean(pred8 == pred32)),
        "n_test": len(y_test),
        "n_train": len(y_train),
    }
    if acc["test_accuracy"] < 0.9:
        raise RuntimeError(f"digits CNN test accuracy is {acc['test_accuracy']:.3f}, need >= 0.9")
    (d / "accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")
    np.savez(d / "test_set.npz", images=x_test, labels=y_test)
    card = ModelCard(
        name="digits",
        version="1.0.0",
        task="classification",
        input=InputSpec(
            width=8,
            height=8,
            channels=1,
            color="gray",
            layout="nchw",
            resize="stretch",
            scale=1.0 / 255.0,
            mean=(0.0,),
            std=(1.0,),
        ),
        postprocess=PostprocessSpec(top_k=3, softmax=False),
        labels=tuple(str(i) for i in range(10)),
        # VariantSpec.accuracy is top-1 agreement with FP32 (test accuracy is in accuracy.json).
        variants=(
            VariantSpec(precision="fp32", file=fp32.name, sha256=sha256_file(fp32), accuracy=1.0),
            VariantSpec(
                precision="int8",
                file=int8.name,
                sha256=sha256_file(int8),
                accuracy=acc["int8_top1_agreement"],
            ),
        ),
    )
    write_card(d, card)
    write_golden(d, [(x_test[i : i + 1, None] / np.float32(255.0)) for i in range(4)])
    return d
