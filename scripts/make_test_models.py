"""Adapter (build tool): the test models, built deterministically — a CLI on cloud_sync.samples.

The models and videos are made in ``cloud_sync.samples`` (so an installed ``edgefleet`` can build
them too); this script is its command line and keeps the names the tests and the harness
import (``scripts.make_test_models``): ``build_all``, ``write_digit_video``,
``write_blob_video``, ``blob_track``, ``blob_frame``, ``letterbox_nchw`` and ``main``.

    python -m scripts.make_test_models --out DIR [--only digits] [--bench]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from cloud_sync.samples import (
    MODELS,
    blob_frame,
    blob_track,
    build_all,
    letterbox_nchw,
    write_blob_video,
    write_digit_video,
)
from cloud_sync.samples.blobdet import bench_blobdet

__all__ = [
    "blob_frame",
    "blob_track",
    "build_all",
    "letterbox_nchw",
    "main",
    "write_blob_video",
    "write_digit_video",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Build the models named on the command line (all by default); returns the exit code."""
    ap = argparse.ArgumentParser(description="the project's test models, built deterministically")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--only", action="append", choices=list(MODELS), help="build just this")
    ap.add_argument("--bench", action="store_true", help="time blobdet under ONNX Runtime")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    built = build_all(args.out, args.only)
    print(f"built {', '.join(built)} into {args.out} in {time.perf_counter() - t0:.1f} s")
    if "digits" in built:
        print("digits accuracy:", (built["digits"] / "accuracy.json").read_text().strip())
    if args.bench and "blobdet" in built:
        for threads, ms, ms_light in bench_blobdet(built["blobdet"] / "model.onnx"):
            print(
                f"blobdet threads={threads or 'default'}: {ms:.1f} ms "
                f"(without the conv stack: {ms_light:.1f} ms)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
