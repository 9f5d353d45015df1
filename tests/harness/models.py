"""The project's test models (``scripts/make_test_models.py``, cached in ``.models``), the
digit video made from their test set, and padded copies for long transfers."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

import numpy as np

from scripts import make_test_models
from tests.harness.util import ROOT

MODEL_SCRIPT = ROOT / "scripts" / "make_test_models.py"


def build_test_models() -> dict[str, Path]:
    """Models built by scripts/make_test_models.py, cached in .models/<hash of their code>
    (the ``test_models`` fixture; the fault-suite scripts call it too)."""
    h = hashlib.sha256(MODEL_SCRIPT.read_bytes())
    for f in sorted((ROOT / "cloud_sync" / "samples").glob("*.py")):
        h.update(f.read_bytes())
    out = ROOT / ".models" / h.hexdigest()[:16]
    done = out / ".complete"
    if not done.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # one builder at a time: pytest-xdist workers (and scripts) may ask at once
        with open(out.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                if out.exists():
                    shutil.rmtree(out)
                built = make_test_models.build_all(out)
                done.write_text("\n".join(f"{k}={Path(v).name}" for k, v in built.items()))
    # entries name folders inside ``out`` (older caches wrote absolute paths: their last part
    # is the same folder), so a checkout that moved, or a cache shared by worktrees, still works
    return {
        line.split("=", 1)[0]: out / Path(line.split("=", 1)[1]).name
        for line in done.read_text().splitlines()
    }


def write_digit_loop(models: dict[str, Path], path: Path) -> Path:
    """A video of 60 test-set digits (the fault-suite scripts use it too)."""
    z = np.load(models["digits"] / "test_set.npz")
    images = next(z[k] for k in z.files if z[k].ndim == 3)[:60]
    labels = next(z[k] for k in z.files if z[k].ndim == 1)[:60]
    make_test_models.write_digit_video(path, images, labels)
    return path


def padded_model(src: Path, dest: Path, floats: int, seed: int = 0) -> Path:
    """The model folder ``src`` copied to ``dest``, its model grown by ``floats`` float32 of
    an initializer the graph does not use (a bigger transfer, the same outputs)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dest)
    m = onnx.load(str(dest / "model.onnx"))
    pad = np.random.default_rng(seed).standard_normal(floats).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    onnx.save(m, str(dest / "model.onnx"))
    return dest / "model.onnx"


def big_model(src: Path, dest: Path, megabytes: int) -> Path:
    """The digits model padded with an unused initializer to ``megabytes`` (real transfer size)."""
    return padded_model(src, dest, megabytes * (1 << 18))
