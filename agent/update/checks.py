"""Pure: the checks a delivered model version must pass — its signed card, its card against
the device profile, and its golden inputs on the built model.

Each check raises ``Rejected`` with the reason in words; nothing here touches the disk or the
network (the golden check runs the model it is given, and times it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.common.errors import BadDataError
from agent.pipeline.model import RunnableModel
from agent.profiles import DeviceProfile
from agent.protocol.card import ModelCard
from agent.protocol.state import PipelineTarget


class Rejected(BadDataError):
    """This version cannot run here; the reason is for people."""


def check_signed_card(
    signed: Mapping[str, Any] | None, card_json: bytes, target: PipelineTarget
) -> ModelCard:
    """The card signed in the TUF metadata of ``target``'s ``model.onnx``, checked against
    the downloaded ``card.json`` and against the version asked for.

    Raises:
        Rejected: no signed card, an invalid one, a ``card.json`` that differs, or a card of
            another model or version.
        ValueError: ``card.json`` is not a valid card (pydantic's ``ValidationError``).
    """
    base = f"models/{target.model}/{target.version}"
    if signed is None:
        raise Rejected(f"target {base}/model.onnx carries no signed model card")
    try:
        card = ModelCard.model_validate(signed)
    except ValueError as e:
        raise Rejected(f"signed model card of {target} is invalid: {e}") from e
    on_disk = ModelCard.model_validate_json(card_json)
    if on_disk != card:
        raise Rejected(f"card.json of {target} differs from the card signed in its metadata")
    if (card.name, card.version) != (target.model, target.version):
        raise Rejected(f"card says {card.name}@{card.version}, desired state asked for {target}")
    return card


def check_card(card: ModelCard, profile: DeviceProfile) -> None:
    """The card against the device profile: at least one precision it offers runs here.

    Raises:
        Rejected: none does.
    """
    allowed = set(profile.precisions)
    offered = {v.precision for v in card.variants} or {"fp32"}
    if not offered & (allowed | {"fp32"}):
        raise Rejected(
            f"model offers precisions {sorted(offered)}, device profile {profile.name} "
            f"runs {sorted(allowed)}"
        )


def check_golden(
    model: RunnableModel, ins: Sequence[np.ndarray], outs: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Golden inputs within the precision's tolerance, outputs finite, latency measured.

    Returns:
        ``{"latency_ms": median of the golden runs}``.

    Raises:
        Rejected: a mismatch or NaN/inf, in words.
    """
    prec = model.backend.info.precision
    atol = model.card.golden_atol.get(prec, 1e-1)
    times = []
    for i, (x, want) in enumerate(zip(ins, outs, strict=False)):
        t0 = time.perf_counter()
        got = model.backend.run(model.feeds(x))[0]
        times.append((time.perf_counter() - t0) * 1e3)
        if not np.all(np.isfinite(got)):
            raise Rejected(f"golden input {i}: output has NaN/inf ({prec})")
        if got.shape != want.shape:
            raise Rejected(f"golden input {i}: output shape {got.shape}, expected {want.shape}")
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        if err > atol:
            raise Rejected(
                f"golden input {i}: max abs error {err:.3g} > {atol:g} allowed for {prec}"
            )
    return {"latency_ms": float(np.median(times)) if times else 0.0}
