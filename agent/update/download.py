"""Adapter: fetching one model version through TUF — every target of the version downloaded
and verified by the TUF client, and its signed card checked (``agent.update.checks``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.protocol.card import ModelCard
from agent.protocol.state import PipelineTarget, Progress
from agent.update.checks import Rejected, check_signed_card
from agent.update.tuf_client import TufClient

REQUIRED_FILES = ("model.onnx", "card.json", "golden.npz")
OPTIONAL_FILES = ("model.int8.onnx", "labels.txt")


def download_dir(tuf: TufClient, target: PipelineTarget) -> Path:
    """Where ``target``'s files are downloaded to (removed once the attempt settles)."""
    return tuf.target_dir / "incoming" / target.model / target.version


def fetch_version(
    tuf: TufClient,
    target: PipelineTarget,
    set_progress: Callable[[Progress], None],
    report: Callable[[], None],
) -> tuple[dict[str, Path], ModelCard]:
    """Download every target of ``target`` into ``download_dir``; check its signed card.

    ``set_progress`` gets the bytes done before each file (then ``report`` is called) and,
    without a report, once all are done.

    Returns:
        File name → downloaded path, and the card.

    Raises:
        Rejected: a required target or the signed card is missing, or the card is wrong.
        TransportError, BadDataError, OSError: as ``TufClient.download``.
    """
    base = f"models/{target.model}/{target.version}"
    infos = {}
    for fname in (*REQUIRED_FILES, *OPTIONAL_FILES):
        info = tuf.target_info(f"{base}/{fname}")
        if info is None and fname in REQUIRED_FILES:
            raise Rejected(f"the registry has no signed target {base}/{fname}")
        if info is not None:
            infos[fname] = info
    total = sum(i.length for i in infos.values())
    done = 0
    dest = download_dir(tuf, target)
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for fname, info in infos.items():
        set_progress(Progress(done=done, total=total))
        report()
        files[fname] = tuf.download(info, dest / fname)
        done += info.length
    set_progress(Progress(done=done, total=total))
    signed_card = tuf.card_of(infos["model.onnx"])
    card = check_signed_card(signed_card, files["card.json"].read_bytes(), target)
    return files, card
