"""Adapter: what a model file is, as publish reads it — ONNX checks, its signature, and the card
built from it (a ``card.json`` beside the model, or what ``formats.infer_format`` reads from
metadata and output shapes, overridden by explicit fields); ``inspect_model`` shows that card
without writing anything. ``publish`` (``cloud_sync.registry.publish``) signs what this makes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import uses_external_data
from pydantic import ValidationError

from agent.common.errors import ModelError
from agent.protocol.card import InputSpec, ModelCard, Task
from cloud_sync.registry.artifacts import ort_session
from cloud_sync.registry.formats import (
    FormatError,
    Inferred,
    ModelSignature,
    TensorInfo,
    infer_format,
)
from cloud_sync.registry.repo import RegistryError

__all__ = [
    "MIN_OPSET",
    "QUANT_OPSET",
    "OnnxInfo",
    "build_card",
    "inspect_model",
    "set_field",
    "static_dim",
    "validate_onnx",
]

MIN_OPSET = 7  # the oldest opset ONNX Runtime still runs
QUANT_OPSET = 13  # QuantizeLinear with a per-channel axis needs 13

_IMAGE_DTYPES = ("float32", "float16", "uint8")
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose"}
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


@dataclass(frozen=True)
class OnnxInfo:
    """What publishing needs to know about a validated ONNX model (its image input first)."""

    input_name: str
    input_shape: tuple[int | str | None, ...]
    input_dtype: str
    output_shapes: tuple[tuple[int | str | None, ...], ...]
    opset: int
    signature: ModelSignature


def validate_onnx(path: str | os.PathLike[str]) -> OnnxInfo:
    """Adapter: check an ONNX file fully before it may enter the registry.

    Raises:
        RegistryError: (reason ``"model"``) the file is missing, not ONNX, fails the full
            checker, has a default-domain opset below 7, uses external data, has no single
            image (rank-4) input, or ONNX Runtime cannot load it. The message names the file.
    """
    p = Path(path)

    def bad(why: str, e: BaseException | None = None) -> RegistryError:
        err = RegistryError(f"model {p} rejected: {why}", path=str(p), reason="model")
        err.__cause__ = e
        return err

    if not p.is_file():
        raise bad("no such file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise bad(f"not a readable ONNX model ({type(e).__name__}: {e})", e) from e
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise bad("it stores weights as external data; expected one self-contained file")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        raise bad(f"onnx.checker failed: {e}", e) from e
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets or max(opsets) < MIN_OPSET:
        raise bad(f"default-domain opset is {max(opsets, default=None)}, expected >= {MIN_OPSET}")
    try:
        sess = ort_session(p)
    except Exception as e:  # ORT's pybind errors
        raise bad(f"ONNX Runtime cannot load it: {e}", e) from e
    sig = _signature(model, sess, max(opsets))
    images = [t for t in sig.inputs if len(t.shape) == 4] if len(sig.inputs) > 1 else sig.inputs
    if len(images) != 1:
        shapes = [f"{t.name} {list(t.shape)}" for t in sig.inputs]
        raise bad(f"it has inputs {shapes}; expected one image input (rank 4) and constants")
    inp = images[0]
    if inp.dtype not in _IMAGE_DTYPES:
        raise bad(f"input type is {inp.dtype}, expected one of {sorted(_IMAGE_DTYPES)}")
    outs = tuple(o.shape for o in sig.outputs)
    return OnnxInfo(inp.name, inp.shape, inp.dtype, outs, max(opsets), sig)


def _signature(model: onnx.ModelProto, sess: Any, opset: int) -> ModelSignature:
    nodes = {o: n for n in model.graph.node for o in n.output}

    def producer(name: str) -> str:
        """The op that computes an output, looking through shape-only ops (Paddle ends
        every graph with Identity; Ultralytics classifiers with Reshape)."""
        for _ in range(16):
            n = nodes.get(name)
            if n is None:
                return ""
            if n.op_type not in _PASS_THROUGH or not n.input:
                return str(n.op_type)
            name = n.input[0]
        return ""

    def info(nodes: Any) -> tuple[TensorInfo, ...]:
        return tuple(
            TensorInfo(n.name, tuple(n.shape), _ORT_DTYPES.get(n.type, n.type)) for n in nodes
        )

    outputs = info(sess.get_outputs())
    return ModelSignature(
        inputs=info(sess.get_inputs()),
        outputs=outputs,
        metadata={m.key: m.value for m in model.metadata_props},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        output_ops=tuple(producer(o.name) for o in outputs),
        opset=opset,
    )


# ------------------------------------------------------------------------------------ card
def static_dim(d: int | str | None) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _check_card_input(spec: InputSpec, shape: tuple[int | str | None, ...], where: str) -> None:
    if len(shape) != 4:
        raise RegistryError(f"model input shape {list(shape)} is not rank 4 (an image tensor)")
    c, h, w = (shape[1], shape[2], shape[3]) if spec.layout == "nchw" else shape[3:] + shape[1:3]
    want = {"channels": (spec.channels, c), "height": (spec.height, h), "width": (spec.width, w)}
    for what, (card_v, model_v) in want.items():
        if static_dim(model_v) is not None and card_v != model_v:
            raise RegistryError(
                f"{where} says input {what} {card_v}, the model's input shape {list(shape)} "
                f"({spec.layout}) has {model_v}; fix the card or --input-size",
                reason="model",
            )


def _read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryError(f"cannot read labels file {path}: {e}", path=str(path)) from e
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise RegistryError(f"labels file {path} is empty, expected one label per line")
    return tuple(line.strip() for line in lines)


def set_field(fields: dict[str, Any], path: str, value: Any) -> None:
    """Pure: ``fields["input"]["color"] = value`` for ``path`` ``"input.color"``.

    Raises:
        RegistryError: (reason ``"usage"``) an empty path part.
    """
    parts = path.split(".")
    if not all(parts):
        raise RegistryError(
            f"card field {path!r} is invalid, expected e.g. input.color", reason="usage"
        )
    d = fields
    for part in parts[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            d[part] = nxt
        d = nxt
    if isinstance(d.get(parts[-1]), (list, tuple)) and not isinstance(value, (list, tuple)):
        value = [value]  # input.mean=0.5 for a per-channel tuple
    d[parts[-1]] = value


def _inferred_fields(
    model: Path,
    info: OnnxInfo,
    *,
    task: Task | None,
    fmt: str | None,
    input_size: tuple[int, int] | None,
    notes: list[str],
) -> dict[str, Any]:
    """Card fields from the model itself: metadata, output shapes, input shape."""
    from agent.pipeline.preprocess import input_spec_from_shape

    try:
        inf: Inferred | None = infer_format(
            info.signature,
            fmt=fmt or (task if task in ("raw", "heatmap", "classification") else None),
            input_size=input_size,
        )
    except FormatError as e:
        if task is None:
            raise RegistryError(
                f"model {model}: {e}; or publish with --task raw to run it without a reader",
                path=str(model),
                reason="format",
            ) from e
        inf = None
    size = input_size
    if size is None and inf is not None and "width" in inf.input:
        size = (inf.input["width"], inf.input["height"])
    try:
        spec = input_spec_from_shape(info.input_shape, input_size=size, dtype=info.input_dtype)
    except ModelError as e:
        raise RegistryError(f"model {model}: {e}", path=str(model), reason="model") from e
    if inf is None:
        return {"input": spec.model_dump(), "task": task}
    notes.extend(inf.reasons)
    fields: dict[str, Any] = {
        "input": {**spec.model_dump(), **inf.input},
        "task": inf.task,
        "postprocess": inf.postprocess,
    }
    if inf.labels:
        fields["labels"] = inf.labels
    return fields


def build_card(
    model: Path,
    info: OnnxInfo,
    *,
    name: str,
    version: str,
    task: Task | None,
    input_size: tuple[int, int] | None,
    labels: str | os.PathLike[str] | None,
    fmt: str | None = None,
    card_fields: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> ModelCard:
    """The card without variants: card.json beside the model, or what the model itself says,
    overridden by the arguments (``card_fields``: dotted paths, e.g. ``input.color``)."""
    card_file = model.parent / "card.json"
    notes = notes if notes is not None else []
    fields: dict[str, Any]
    if card_file.is_file():
        try:
            fields = ModelCard.model_validate_json(card_file.read_bytes()).model_dump()
        except (OSError, ValidationError) as e:
            raise RegistryError(f"card {card_file} is invalid: {e}", path=str(card_file)) from e
        where = str(card_file)
        if input_size is not None:
            fields["input"] = {**fields["input"], "width": input_size[0], "height": input_size[1]}
        if fmt is not None:
            fields["postprocess"] = {**fields["postprocess"], "format": fmt}
    else:
        fields = _inferred_fields(
            model, info, task=task, fmt=fmt, input_size=input_size, notes=notes
        )
        where = "--input-size"
    fields.update(name=name, version=version, variants=())
    if task is not None:
        fields["task"] = task
    if labels is not None:
        fields["labels"] = _read_labels(labels)
    for path, value in (card_fields or {}).items():
        set_field(fields, path, value)
    try:
        card = ModelCard.model_validate(fields)
    except ValidationError as e:
        raise RegistryError(f"the model card for {name}@{version} is invalid: {e}") from e
    _check_card_input(card.input, info.input_shape, where)
    _check_constants(card, info)
    classes = static_dim(info.output_shapes[0][-1]) if info.output_shapes[0] else None
    if card.task == "classification" and card.labels and classes not in (None, len(card.labels)):
        raise RegistryError(
            f"{len(card.labels)} labels given, the model's first output has {classes} classes",
            reason="model",
        )
    return card


def _check_constants(card: ModelCard, info: OnnxInfo) -> None:
    from agent.pipeline.preprocess import image_input_name

    names = tuple(t.name for t in info.signature.inputs)
    try:
        image = image_input_name(card.input, names)
    except ModelError as e:
        raise RegistryError(
            f'{e} (e.g. --set \'input.constants=[{{"name": "N", "shape": [1, 2], '
            f'"values": [1, 1]}}]\')',
            reason="model",
        ) from e
    if image != info.input_name:
        raise RegistryError(
            f"the card feeds a constant to {info.input_name!r}, the image input", reason="model"
        )
    for c in card.input.constants:
        t = next(t for t in info.signature.inputs if t.name == c.name)
        if len(t.shape) != len(c.shape) or any(
            static_dim(d) not in (None, v) for d, v in zip(t.shape, c.shape, strict=True)
        ):
            raise RegistryError(
                f"constant input {c.name!r} has shape {list(c.shape)} in the card, the model "
                f"declares {list(t.shape)}",
                reason="model",
            )


# ------------------------------------------------------------------------------------ inspect
def inspect_model(
    model_path: str | os.PathLike[str],
    *,
    task: Task | None = None,
    fmt: str | None = None,
    input_size: tuple[int, int] | None = None,
    labels: str | os.PathLike[str] | None = None,
    card_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Adapter: what ``publish`` would infer for a model, writing nothing.

    Returns:
        A JSON-able dict: ``opset``, ``producer``, ``inputs``/``outputs`` (name, shape, dtype),
        ``dynamic_axes``, ``metadata_keys``, ``card`` (the card publish would sign, without
        variants) and ``reasons``; or, when the format cannot be told, ``error`` instead of
        ``card``.

    Raises:
        RegistryError: the file is not a model publish accepts (``validate_onnx``).
    """
    path = Path(model_path)
    info = validate_onnx(path)
    sig = info.signature

    def tensors(ts: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]

    out: dict[str, Any] = {
        "model": str(path),
        "opset": info.opset,
        "producer": sig.producer,
        "inputs": tensors(sig.inputs),
        "outputs": tensors(sig.outputs),
        "dynamic_axes": {
            t.name: [i for i, d in enumerate(t.shape) if static_dim(d) is None]
            for t in (*sig.inputs, *sig.outputs)
            if any(static_dim(d) is None for d in t.shape)
        },
        "metadata_keys": sorted(sig.metadata),
    }
    if info.opset < QUANT_OPSET:
        out["note"] = (
            f"opset {info.opset}: published as is; --quantize int8 converts a copy to opset "
            f"{QUANT_OPSET} first"
        )
    notes: list[str] = []
    try:
        card = build_card(
            path,
            info,
            name="inspect",
            version="0.0.0",
            task=task,
            input_size=input_size,
            labels=labels,
            fmt=fmt,
            card_fields=card_fields,
            notes=notes,
        )
    except RegistryError as e:
        out["error"] = str(e)
    else:
        card_dict = card.model_dump(mode="json", exclude={"name", "version", "variants"})
        out["card"] = card_dict
        out["format"] = card.postprocess.detection_format if card.task == "detection" else None
    out["reasons"] = notes
    return out
