"""Hardware check: what the TensorRT backend does on a real GPU, in one report.

For the day a Jetson or an NVIDIA GPU machine is at hand (``scripts/hardware_check`` sets up a
venv that sees the system's TensorRT, then runs this). It refuses, with the reason and exit
code 2, where TensorRT, pycuda or a GPU is missing. Otherwise, in well under 10 minutes:

1. runs the ``tensorrt``-marked backend conformance tests (real engines this time);
2. builds the project's sample models (digits classifier with its QDQ INT8 variant, blob
   detector) and the public PP-OCRv4 text detector (from the rapidocr wheel) at every
   precision this TensorRT can build (fp32, fp16, int8 where a Q/DQ file exists): cold build
   time, cache-hit open time, outputs against ONNX Runtime's on the same input;
3. runs ``edgefleet-agent bench`` on each model (TensorRT backend, profile detected);
4. writes ``hardware-report-HOST-DATE.md`` and ``.json`` (versions, results, figures) to paste
   into an issue.

    python -m scripts.hardware_check [--out DIR] [--frames 100] [--skip-tests] [--models digits]

It runs from the repository checkout's root (the wrapper ``scripts/hardware_check`` changes
there): the conformance tests and the test models (``tests.harness.models``) are the
checkout's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def refuse_without_gpu() -> str:
    """The TensorRT detail line, or exit 2 saying why this machine cannot run the check."""
    from agent.engine.tensorrt import tensorrt_available

    ok, detail = tensorrt_available()
    if not ok:
        print(
            f"hardware_check: no TensorRT GPU here: {detail}\n"
            "Run it on a Jetson (JetPack 6) or a machine with an NVIDIA GPU, TensorRT 10.3-11.x "
            "and pycuda; nothing was built or written.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return detail


def run_conformance() -> dict[str, Any]:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "tensorrt", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_backend_conformance.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return {
        "exit_code": res.returncode,
        "summary": lines[-1] if lines else res.stderr[-500:],
        "seconds": round(time.monotonic() - t0, 1),
    }


def models(work: Path) -> list[dict[str, Any]]:
    """(name, onnx, precision files, input feed) of the models to build."""
    from cloud_sync.registry.quantize import quantize_int8
    from tests.harness.models import build_test_models

    built = build_test_models()
    digits = built["digits"]
    with np.load(digits / "test_set.npz") as z:
        x = np.asarray(z["images"], np.float32)[:, None] / 255.0
    int8 = quantize_int8(digits / "model.onnx", work / "digits.int8.onnx", x[:200])
    out = [
        {
            "name": "digits",
            "files": {"fp32": digits / "model.onnx", "int8": int8},
            "feed": x[:1],
            "size": None,
        },
        {
            "name": "blobdet",
            "files": {"fp32": built["blobdet"] / "model.onnx"},
            "feed": np.random.default_rng(0).random((1, 3, 640, 640), np.float32),
            "size": None,
        },
    ]
    try:
        import importlib.util

        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        det = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx" if spec else None
    except (ImportError, ValueError):
        det = None
    if det is not None and det.is_file():
        out.append(
            {
                "name": "ppocr-v4-det",
                "files": {"fp32": det},
                "feed": np.random.default_rng(1).random((1, 3, 640, 640), np.float32),
                "size": (640, 640),
            }
        )
    return out


def build_and_compare(m: dict[str, Any], precision: str, cache: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from agent.engine.build import load_backend
    from agent.engine.shapes import fixed_profiles, onnx_input_shapes

    src = Path(m["files"].get(precision) or m["files"]["fp32"])
    profiles = fixed_profiles(onnx_input_shapes(str(src)), m["size"] or (640, 640)) or None
    row: dict[str, Any] = {"model": m["name"], "precision": precision, "file": src.name}
    try:
        t0 = time.monotonic()
        b = load_backend(src, backend="tensorrt", precision=precision, cache_dir=cache,
                         profiles=profiles, timeout_s=540)  # fmt: skip
        row["cold_build_s"] = round(time.monotonic() - t0, 2)
        name = b.inputs[0].name
        feed = m["feed"].astype(b.inputs[0].dtype)
        got = b.run({name: feed})
        b.close()
        t0 = time.monotonic()
        b = load_backend(src, backend="tensorrt", precision=precision, cache_dir=cache,
                         profiles=profiles)  # fmt: skip
        row["cache_hit_s"] = round(time.monotonic() - t0, 3)
        b.close()
        sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {sess.get_inputs()[0].name: feed})
        row["max_abs_diff_vs_onnxruntime"] = float(
            max(np.max(np.abs(g.astype(np.float64) - r)) for g, r in zip(got, ref, strict=True))
        )
        row["ok"] = True
    except Exception as e:  # reported, and the check goes on with the next build
        row.update(ok=False, error=f"{type(e).__name__}: {e}")
    return row


def bench(m: dict[str, Any], frames: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "agent.cli", "bench", "--model", str(m["files"]["fp32"]),
           "--backend", "tensorrt", "--frames", str(frames), "--json"]  # fmt: skip
    if m["size"]:
        cmd += ["--input-size", f"{m['size'][0]}x{m['size'][1]}"]
    if m["name"] == "ppocr-v4-det":
        cmd += ["--task", "heatmap"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        return {"model": m["name"], "ok": False, "error": res.stderr[-800:]}
    return {"model": m["name"], "ok": True, "report": json.loads(res.stdout)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path.cwd())
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--models", default="", help="comma-separated subset, e.g. digits")
    args = ap.parse_args()
    wanted = {m for m in args.models.split(",") if m}

    detail = refuse_without_gpu()
    import tensorrt as trt

    from agent.engine.tensorrt import platform_facts, weak_typing

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "tensorrt": detail,
        "platform": platform_facts(),
        "device_model": _read("/proc/device-tree/model"),
        "l4t": _read("/etc/nv_tegra_release"),
    }
    if not args.skip_tests:
        report["conformance"] = run_conformance()
    precisions = ["fp32", "fp16", "int8"]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-hw-"))
    try:
        chosen = [m for m in models(work) if not wanted or m["name"] in wanted]
        builds = []
        for m in chosen:
            for p in precisions:
                if p == "int8" and "int8" not in m["files"]:
                    continue
                if p == "fp16" and not weak_typing(trt):
                    continue  # TensorRT 11: fp16 only from fp16 models
                builds.append(build_and_compare(m, p, work / "cache"))
                print(json.dumps(builds[-1]), flush=True)
        report["builds"] = builds
        report["bench"] = [bench(m, args.frames) for m in chosen]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = f"hardware-report-{report['host']}-{report['date'][:10]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.md and .json")
    failed = [b for b in report["builds"] if not b["ok"]]
    return 1 if failed or report.get("conformance", {}).get("exit_code", 0) else 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# edgefleet hardware check, {r['date']}",
        "",
        f"- host {r['host']} ({r['machine']}), device {r['device_model'] or '-'}, "
        f"L4T {r['l4t'] or '-'}",
        f"- {r['tensorrt']}",
        f"- platform {r['platform']}",
    ]
    if "conformance" in r:
        c = r["conformance"]
        lines.append(f"- conformance (`-m tensorrt`): {c['summary']} (exit {c['exit_code']})")
    lines += ["", "| model | precision | cold build s | cache hit s | max abs diff vs ORT | ok |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for b in r["builds"]:
        lines.append(
            f"| {b['model']} | {b['precision']} | {b.get('cold_build_s', '-')} | "
            f"{b.get('cache_hit_s', '-')} | {b.get('max_abs_diff_vs_onnxruntime', '-')} | "
            f"{'yes' if b['ok'] else 'NO: ' + b.get('error', '')[:200]} |"
        )
    lines += ["", "## bench", ""]
    for b in r["bench"]:
        lines.append(f"- {b['model']}: " + (json.dumps(b["report"]) if b["ok"] else b["error"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
