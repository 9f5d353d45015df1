"""Adapter: publish a model version into the registry, and list what is published.

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
4. samples: images (``*.jpg``/``*.jpeg``/``*.png``) in ``calibration_dir``, preprocessed as
   the card says, or model inputs in ``calibration.npz`` (key ``inputs``, [N, ...]) beside the
   model. Sorted by file name, every 5th sample (index % 5 == 4) is held back for the gate,
   the rest calibrate. ``quantize="int8"`` needs at least ``MIN_SAMPLES`` of them;
5. INT8 quantization and the accuracy gate (refused above ``max_accuracy_drop`` unless
   ``force``);
6. ``golden.npz`` (``input_0``.. / ``output_0``.., FP32 outputs of the first output by ONNX
   Runtime, the key scheme of ``cloud_sync.samples``) from up to 4 held-back samples (fewer
   when one input tensor is large: 8 MiB of inputs at most, at least 1), or, with no samples,
   from seeded frames of random 8x8-pixel blocks (seed 0) preprocessed like camera frames.
"""

from __future__ import annotations

import math
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
from pydantic import ValidationError

from agent.common.errors import ModelError
from agent.common.fsutil import sha256_file
from agent.protocol.card import ModelCard, Task, VariantSpec
from cloud_sync.quantize import GateResult, accuracy_gate, quantize_int8
from cloud_sync.registry.model_file import (
    MIN_OPSET,
    QUANT_OPSET,
    OnnxInfo,
    build_card,
    inspect_model,
    static_dim,
    validate_onnx,
)
from cloud_sync.registry.repo import RegistryError, Repository, Versions
from cloud_sync.samples.common import ort_session, write_card, write_golden

__all__ = [
    "MIN_OPSET",
    "MIN_SAMPLES",
    "ModelVersion",
    "OnnxInfo",
    "ProgressFn",
    "PublishResult",
    "SemVer",
    "card_from_custom",
    "custom_for",
    "inspect_model",
    "list_models",
    "parse_semver",
    "publish",
    "validate_onnx",
]

ProgressFn = Callable[[int, int, str], None]
"""``progress(step_done, steps_total, label)``, called before each step and once at the end."""

MIN_SAMPLES = 10
MAX_SAMPLES = 640  # more files are thinned evenly: MinMax calibration saturates long before
HOLD_BACK_EVERY = 5
GOLDEN_COUNT = 4
GOLDEN_MAX_BYTES = 8 << 20  # uncompressed golden inputs: one 640x640 RGB float32 input, not 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # ModelCard.name
_NUM = r"(?:0|[1-9][0-9]*)"
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(rf"({_NUM})\.({_NUM})\.({_NUM})(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?")
_MODEL_TARGET = re.compile(r"^models/([^/]+)/([^/]+)/([^/]+)\Z")


@dataclass(frozen=True)
class SemVer:
    """Pure: a semantic version 2.0.0 without build metadata (``+`` cannot be in a target path)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    def key(self) -> tuple[Any, ...]:
        """Sort key with semver precedence (a pre-release sorts before its release)."""
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{'.'.join(self.prerelease)}" if self.prerelease else base


def parse_semver(text: str) -> SemVer:
    """Pure: parse ``MAJOR.MINOR.PATCH[-PRERELEASE]``.

    Raises:
        RegistryError: (reason ``"usage"``) not such a version, or with ``+build`` metadata.
    """
    m = _SEMVER.fullmatch(text)
    if m is None:
        raise RegistryError(
            f"version {text!r} is not a semantic version: expected MAJOR.MINOR.PATCH with an "
            "optional -PRERELEASE (e.g. 1.2.0 or 1.2.0-rc.1), no leading zeros, no +BUILD",
            reason="usage",
        )
    pre = tuple(m.group(4).split(".")) if m.group(4) else ()
    return SemVer(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)


@dataclass(frozen=True)
class ModelVersion:
    """One published model version, as ``list_models`` reports it."""

    name: str
    version: str
    task: str
    variants: tuple[str, ...]
    sizes: dict[str, int]
    card: ModelCard | None = None


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


# ------------------------------------------------------------------------------------ samples
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


def _random_inputs(card: ModelCard) -> np.ndarray:
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


def _golden_count(sample: np.ndarray) -> int:
    """How many golden pairs to ship: up to 4, fewer for big inputs (at least 1)."""
    return max(1, min(GOLDEN_COUNT, GOLDEN_MAX_BYTES // max(1, sample.nbytes)))


def custom_for(card: ModelCard) -> dict[str, Any]:
    """Pure: a target's signed ``custom`` field: ``{"edgefleet": {"card_json": "<card JSON>"}}``.

    TUF signs OLPC canonical JSON, which has no floats, so the card (scales, means, accuracy)
    rides as JSON text; the device reads it back with ``TufClient.card_of``.
    """
    return {"edgefleet": {"card_json": card.model_dump_json()}}


def card_from_custom(custom: Any) -> ModelCard | None:
    """Pure: the card in a target's ``custom`` field; None when absent or invalid."""
    edgefleet = custom.get("edgefleet") if isinstance(custom, dict) else None
    text = edgefleet.get("card_json") if isinstance(edgefleet, dict) else None
    if not isinstance(text, str):
        return None
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError:
        return None


# ------------------------------------------------------------------------------------ listing
def list_models(repo: Repository) -> list[ModelVersion]:
    """Adapter: the published model versions, sorted by name then semantic version."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for path, target in repo.targets().items():
        m = _MODEL_TARGET.fullmatch(path)
        if m is None:
            continue
        g = groups.setdefault((m.group(1), m.group(2)), {"sizes": {}, "card": None})
        g["sizes"][m.group(3)] = target.length
        # A version without a valid card is listed without details (devices refuse it).
        g["card"] = g["card"] or card_from_custom(target.custom)
    out = []
    for (name, version), g in groups.items():
        card = g["card"]
        out.append(
            ModelVersion(
                name=name,
                version=version,
                task=card.task if card else "?",
                variants=tuple(v.precision for v in card.variants) if card else (),
                sizes=dict(sorted(g["sizes"].items())),
                card=card,
            )
        )
    return sorted(out, key=lambda v: (v.name, _version_key(v.version)))


def _version_key(text: str) -> tuple[Any, ...]:
    try:
        return (1, parse_semver(text).key())
    except RegistryError:
        return (0, text)


def _check_new_version(repo: Repository, name: str, version: SemVer) -> None:
    mine = [v for v in list_models(repo) if v.name == name]
    for v in mine:
        if v.version == str(version):
            raise RegistryError(
                f"model {name}@{version} already exists in the registry {repo.path}; published "
                "versions are immutable: publish a higher version",
                reason="exists",
            )
    known = [(_version_key(v.version), v.version) for v in mine]
    if known and max(known)[0] >= (1, version.key()):
        latest = max(known)[1]
        raise RegistryError(
            f"version {version} of {name} is lower than the latest published {name}@{latest}; "
            f"expected a version above {latest}",
            reason="older",
        )


# ------------------------------------------------------------------------------------ publish
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


def _samples(
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
    from agent.pipeline.preprocess import constant_feeds

    _check_args(quantize, max_accuracy_drop, name)
    semver = parse_semver(version)
    model = Path(model_path)
    steps = _Steps(["versions", "validate", "card", "samples"], progress)
    steps.labels += ["quantize", "gate", "golden", "sign"] if quantize else ["golden", "sign"]

    steps("versions")
    _check_new_version(repo, name, semver)  # fail fast; checked again under the lock
    steps("validate")
    info = validate_onnx(model)
    steps("card")
    notes: list[str] = []
    card = build_card(
        model,
        info,
        name=name,
        version=str(semver),
        task=task,
        input_size=input_size,
        labels=labels,
        fmt=fmt,
        card_fields=card_fields,
        notes=notes,
    )
    steps("samples")
    split = _samples(model, info, card, calibration_dir)
    n = 0 if split is None else len(split[0]) + len(split[1])
    if quantize and n < MIN_SAMPLES:
        raise RegistryError(
            f"--quantize int8 needs at least {MIN_SAMPLES} calibration samples, got {n}: pass "
            "--calibration DIR (jpg/png frames like the deployment's) or put calibration.npz "
            "(key 'inputs', [N, ...] model inputs) beside the model",
            reason="usage",
        )
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        shutil.copyfile(model, stage / "model.onnx")
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
        if quantize and split is not None:
            int8, gate = _int8_variant(
                stage,
                card,
                split,
                opset=info.opset,
                max_drop=max_accuracy_drop,
                force=force,
                steps=steps,
                notes=notes,
            )
            variants.append(int8)
        steps("golden")
        golden = split[1] if split is not None and len(split[1]) else _random_inputs(card)
        card = ModelCard.model_validate(
            {**card.model_dump(), "variants": [v.model_dump() for v in variants]}
        )
        write_card(stage, card)
        n_golden = min(len(golden), _golden_count(golden[:1]))
        write_golden(
            stage, [golden[i : i + 1] for i in range(n_golden)], constant_feeds(card.input)
        )

        steps("sign")
        files = {f"models/{name}/{semver}/{f.name}": f for f in sorted(stage.iterdir())}
        with repo.transaction():
            _check_new_version(repo, name, semver)
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
