"""Adapter: publish a model version into the registry (``catalog`` lists what is published).

A version is the targets ``models/NAME/VERSION/{model.onnx, model.int8.onnx, labels.txt,
golden.npz, card.json}`` (INT8 only with ``quantize="int8"``, labels only when the card has
some); every one carries the card, with each variant's sha256 and accuracy, in its signed
``custom`` field as ``{"edgefleet": {"card_json": "<the card as JSON text>"}}`` (TUF signs
canonical JSON, which has no floats; ``agent.update.tuf_client.TufClient.card_of`` reads it).

Publishing checks everything before it writes anything (a refused publish leaves the
repository byte-for-byte unchanged):

1. name and semantic version; the version must be new and above the latest of that name;
2. the ONNX file: ``onnx.checker`` full check, default-domain opset >= 7 (the original bytes
   are published; only the INT8 variant of a model below opset 13 is made from a copy converted
   by onnx's version converter, and the card's variant says so), one image input plus any
   constant inputs the card feeds, loadable by ONNX Runtime, no external data;
3. the card: ``card.json`` beside the model if present, else inferred from the model's
   metadata and output shapes (``cloud_sync.registry.formats``: task, output format, input
   contract, labels); explicit arguments (``task``, ``fmt``, ``labels``, ``card_fields``)
   override either;
4. samples (``cloud_sync.registry.calibration``): images (``*.jpg``/``*.jpeg``/``*.png``) in
   ``calibration_dir``, preprocessed as the card says, or model inputs in ``calibration.npz``
   (key ``inputs``, [N, ...]) beside the model. Sorted by file name, every 5th sample (index %
   5 == 4) is held back for the gate, the rest calibrate. ``quantize="int8"`` needs at least
   ``MIN_SAMPLES`` of them;
5. INT8 quantization and the accuracy gate (refused above ``max_accuracy_drop`` unless
   ``force``);
6. ``golden.npz`` (``input_0``.. / ``output_0``.., FP32 outputs of the first output by ONNX
   Runtime, the key scheme of ``cloud_sync.registry.artifacts``) from up to 4 held-back
   samples (fewer when one input tensor is large: 8 MiB of inputs at most, at least 1), or,
   with no samples, from seeded frames of random 8x8-pixel blocks (seed 0) preprocessed like
   camera frames.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from agent.common.errors import ModelError
from agent.common.fsutil import sha256_file
from agent.protocol.card import ModelCard, Task, VariantSpec
from cloud_sync.registry.artifacts import ort_session, write_card, write_golden
from cloud_sync.registry.calibration import golden_count, random_inputs, split_samples
from cloud_sync.registry.catalog import SemVer, check_new_version, custom_for, parse_semver
from cloud_sync.registry.model_file import QUANT_OPSET, OnnxInfo, build_card, validate_onnx
from cloud_sync.registry.quantize import GateResult, accuracy_gate, quantize_int8
from cloud_sync.registry.repo import RegistryError, Repository, Versions

__all__ = ["MIN_SAMPLES", "ProgressFn", "PublishResult", "publish"]

ProgressFn = Callable[[int, int, str], None]
"""``progress(step_done, steps_total, label)``, called before each step and once at the end."""

MIN_SAMPLES = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # ModelCard.name


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` signed into the registry."""

    name: str
    version: str
    card: ModelCard
    files: dict[str, int]
    gate: GateResult | None
    forced: bool
    versions: Versions
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Request:
    """What ``publish`` was asked for, its arguments checked."""

    model: Path
    name: str
    version: SemVer
    task: Task | None
    input_size: tuple[int, int] | None
    labels: str | os.PathLike[str] | None
    fmt: str | None
    card_fields: dict[str, Any] | None
    calibration_dir: str | os.PathLike[str] | None
    quantize: bool
    max_drop: float
    force: bool


@dataclass
class _Steps:
    labels: list[str]
    progress: ProgressFn | None
    done: int = field(default=0)

    def __call__(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.done, len(self.labels), label)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(len(self.labels), len(self.labels), "done")


def _check_args(quantize: str | None, max_accuracy_drop: float, name: str) -> None:
    if quantize not in (None, "int8"):
        raise RegistryError(f"quantize is {quantize!r}, expected None or 'int8'", reason="usage")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise RegistryError(
            f"max accuracy drop is {max_accuracy_drop}, expected 0..1", reason="usage"
        )
    if not _NAME.fullmatch(name):
        raise RegistryError(
            f"model name {name!r} is invalid: expected 1-128 of [A-Za-z0-9._-], starting with "
            "a letter or digit",
            reason="usage",
        )


def _for_quantization(stage: Path, opset: int, notes: list[str]) -> Path:
    """The FP32 model to quantize: ``stage/model.onnx``, or below opset 13 a copy converted
    by onnx's version converter (outside ``stage``: it is not published).

    Raises:
        RegistryError: (reason ``"model"``) the converter fails or its result does not load.
    """
    src = stage / "model.onnx"
    if opset >= QUANT_OPSET:
        return src
    from onnx import version_converter

    dst = stage.parent / f"{stage.name}.opset{QUANT_OPSET}.onnx"
    try:
        converted = version_converter.convert_version(onnx.load(str(src)), QUANT_OPSET)
        onnx.checker.check_model(converted, full_check=True)
        dst.write_bytes(converted.SerializeToString())
        ort_session(dst)
    except Exception as e:  # the converter raises RuntimeError/ValidationError/ORT errors
        raise RegistryError(
            f"the model's opset {opset} is below {QUANT_OPSET}, which INT8 QDQ per channel "
            f"needs, and onnx's version converter could not convert it: {type(e).__name__}: "
            f"{e}; publish without --quantize (the FP32 model runs at opset {opset})",
            reason="model",
        ) from e
    notes.append(
        f"int8: converted opset {opset} -> {QUANT_OPSET} before quantization (onnx version "
        f"converter); model.onnx keeps the original opset {opset} bytes"
    )
    return dst


def _detector(card: ModelCard) -> Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The card's own decoder, in model-input pixels: what the device will make of outputs."""
    from agent.pipeline.postprocess import make_postprocessor
    from agent.pipeline.preprocess import FrameTransform

    inp = card.input
    reader = make_postprocessor(card.task, card.postprocess, card.labels, inp)
    identity = FrameTransform(inp.width, inp.height, 1.0, 1.0, 0.0, 0.0)

    def detect(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        dets = reader([o.astype(np.float32) for o in outputs], identity).detections
        boxes = np.array([d.box for d in dets], np.float64).reshape(-1, 4)
        return boxes, np.array([d.label_id for d in dets], np.int64)

    return detect


def _int8_variant(
    stage: Path,
    card: ModelCard,
    split: tuple[np.ndarray, np.ndarray],
    *,
    opset: int,
    max_drop: float,
    force: bool,
    steps: _Steps,
    notes: list[str],
) -> tuple[VariantSpec, GateResult]:
    """Quantize ``stage/model.onnx`` into ``stage/model.int8.onnx`` and gate it."""
    from agent.pipeline.preprocess import constant_feeds

    where = f"{card.name}@{card.version}"
    int8 = stage / "model.int8.onnx"
    consts = constant_feeds(card.input)
    try:
        steps("quantize")
        fp32 = _for_quantization(stage, opset, notes)
        quantize_int8(fp32, int8, split[0], constants=consts)
        steps("gate")
        gate = accuracy_gate(
            fp32,
            int8,
            split[1],
            task=card.task,
            max_drop=max_drop,
            constants=consts,
            detect=_detector(card) if card.task == "detection" else None,
        )
    except ModelError as e:
        raise RegistryError(f"{where}: {e}", reason="model") from e
    if not gate.passed and not force:
        raise RegistryError(
            f"INT8 variant of {where} refused by the accuracy gate: {gate.detail}; nothing "
            "published (improve the calibration set, raise --max-accuracy-drop, publish "
            "without --quantize, or --force)",
            reason="accuracy",
        )
    spec = VariantSpec(
        precision="int8",
        file=int8.name,
        sha256=sha256_file(int8),
        accuracy=gate.accuracy,
        opset=max(opset, QUANT_OPSET),
    )
    return spec, gate


def publish(
    repo: Repository,
    model_path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    task: Task | None = None,
    input_size: tuple[int, int] | None = None,
    labels: str | os.PathLike[str] | None = None,
    calibration_dir: str | os.PathLike[str] | None = None,
    quantize: Literal["int8"] | None = None,
    max_accuracy_drop: float = 0.01,
    force: bool = False,
    progress: ProgressFn | None = None,
    now: datetime | None = None,
    fmt: str | None = None,
    card_fields: dict[str, Any] | None = None,
) -> PublishResult:
    """Validate, quantize, gate and sign a model version into ``repo``.

    Args:
        repo: the registry.
        model_path: the FP32 ONNX model.
        name: the model name (``[A-Za-z0-9][A-Za-z0-9._-]*``).
        version: its semantic version, above every published version of ``name``.
        task: overrides the card's task (no card: default ``"raw"``).
        input_size: ``(width, height)`` for dynamic inputs, or overriding the card.
        labels: a labels file (one per line), overriding the card's.
        calibration_dir: jpg/png frames like the deployment's (see the module docstring).
        quantize: ``"int8"`` adds a QDQ INT8 variant.
        max_accuracy_drop: the largest accuracy drop the INT8 variant may have (0..1).
        force: publish an INT8 variant that fails the gate (its accuracy is in the card).
        progress: called as steps start.
        now: the signing time (default: the clock).
        fmt: the output format (``formats.FORMAT_NAMES``) when it cannot be inferred.
        card_fields: card fields by dotted path (``{"input.color": "bgr"}``), applied last.

    Returns:
        The card, the files and their sizes, the gate result and the new versions.

    Raises:
        RegistryError: any check failed (reasons ``"usage"``, ``"exists"``, ``"older"``,
            ``"model"``, ``"accuracy"``, ...); nothing was written then.
    """
    _check_args(quantize, max_accuracy_drop, name)
    req = _Request(
        model=Path(model_path),
        name=name,
        version=parse_semver(version),
        task=task,
        input_size=input_size,
        labels=labels,
        fmt=fmt,
        card_fields=card_fields,
        calibration_dir=calibration_dir,
        quantize=quantize is not None,
        max_drop=max_accuracy_drop,
        force=force,
    )
    steps = _Steps(["versions", "validate", "card", "samples"], progress)
    steps.labels += ["quantize", "gate", "golden", "sign"] if quantize else ["golden", "sign"]
    return _publish(repo, req, steps, now)


def _publish(repo: Repository, req: _Request, steps: _Steps, now: datetime | None) -> PublishResult:
    """The steps of ``publish`` for checked arguments: everything is checked, then signed."""
    name, semver = req.name, req.version
    steps("versions")
    check_new_version(repo, name, semver)  # fail fast; checked again under the lock
    steps("validate")
    info = validate_onnx(req.model)
    steps("card")
    notes: list[str] = []
    card = build_card(
        req.model,
        info,
        name=name,
        version=str(semver),
        task=req.task,
        input_size=req.input_size,
        labels=req.labels,
        fmt=req.fmt,
        card_fields=req.card_fields,
        notes=notes,
    )
    steps("samples")
    split = _enough_samples(req, info, card)
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as tmp:
        stage = Path(tmp) / "stage"
        card, gate = _stage(stage, req, info, card, split, steps=steps, notes=notes)
        steps("sign")
        files = {f"models/{name}/{semver}/{f.name}": f for f in sorted(stage.iterdir())}
        with repo.transaction():
            check_new_version(repo, name, semver)
            versions = repo.add_targets(files, dict.fromkeys(files, custom_for(card)), now=now)
    steps.finish()
    current = repo.targets()
    return PublishResult(
        name=name,
        version=str(semver),
        card=card,
        files={p: current[p].length for p in files},
        gate=gate,
        forced=bool(gate is not None and not gate.passed),
        versions=versions,
        notes=tuple(notes),
    )


def _enough_samples(
    req: _Request, info: OnnxInfo, card: ModelCard
) -> tuple[np.ndarray, np.ndarray] | None:
    """The samples split for calibration and gate; at least ``MIN_SAMPLES`` to quantize."""
    split = split_samples(req.model, info, card, req.calibration_dir)
    n = 0 if split is None else len(split[0]) + len(split[1])
    if req.quantize and n < MIN_SAMPLES:
        raise RegistryError(
            f"--quantize int8 needs at least {MIN_SAMPLES} calibration samples, got {n}: pass "
            "--calibration DIR (jpg/png frames like the deployment's) or put calibration.npz "
            "(key 'inputs', [N, ...] model inputs) beside the model",
            reason="usage",
        )
    return split


def _stage(
    stage: Path,
    req: _Request,
    info: OnnxInfo,
    card: ModelCard,
    split: tuple[np.ndarray, np.ndarray] | None,
    *,
    steps: _Steps,
    notes: list[str],
) -> tuple[ModelCard, GateResult | None]:
    """Write the version's files into ``stage``: the model, its INT8 variant, card and golden.

    Returns:
        The card with its variants, and the gate result (None without INT8).
    """
    from agent.pipeline.preprocess import constant_feeds

    stage.mkdir()
    shutil.copyfile(req.model, stage / "model.onnx")
    fp32_sha = sha256_file(stage / "model.onnx")
    variants = [
        VariantSpec(
            precision="fp32",
            file="model.onnx",
            sha256=fp32_sha,
            accuracy=1.0,
            opset=info.opset,
        )
    ]
    gate: GateResult | None = None
    if req.quantize and split is not None:
        int8, gate = _int8_variant(
            stage,
            card,
            split,
            opset=info.opset,
            max_drop=req.max_drop,
            force=req.force,
            steps=steps,
            notes=notes,
        )
        variants.append(int8)
    steps("golden")
    golden = split[1] if split is not None and len(split[1]) else random_inputs(card)
    card = ModelCard.model_validate(
        {**card.model_dump(), "variants": [v.model_dump() for v in variants]}
    )
    write_card(stage, card)
    n_golden = min(len(golden), golden_count(golden[:1]))
    write_golden(stage, [golden[i : i + 1] for i in range(n_golden)], constant_feeds(card.input))
    return card, gate
