"""Test helper: NVIDIA's real TensorRT Python bindings, importable without a GPU.

The ``tensorrt-cuXX-bindings`` wheel on PyPI is the genuine pybind11 module (every class, enum
member, property and signature), linked against ``libnvinfer``/``libnvonnxparser``/
``libnvinfer_plugin``. It needs only nine C entry points from them; ``stub_libs`` compiles
stand-ins whose factories return NULL (so ``trt.Builder(...)`` raises exactly as on a machine
whose GPU is unusable). ``scripts/test`` downloads the wheels into ``.cache/trt-bindings``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness.util import ROOT

WHEELS = ROOT / ".cache" / "trt-bindings"

_STUBS = {
    "nvinfer": """
void* createInferBuilder_INTERNAL(void* l, int v) { return 0; }
void* createInferRefitter_INTERNAL(void* e, void* l, int v) { return 0; }
void* createInferRuntime_INTERNAL(void* l, int v) { return 0; }
void* getBuilderPluginRegistry(int c) { return 0; }
void* getPluginRegistry(void) { return 0; }
""",
    "nvonnxparser": """
void* createNvOnnxParser_INTERNAL(void* n, void* l, int v) { return 0; }
void* createNvOnnxParserRefitter_INTERNAL(void* r, void* l, int v) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
""",
    "nvinfer_plugin": "int initLibNvInferPlugins(void* l, const char* ns) { return 1; }\n",
}


def wheels() -> dict[str, Path]:
    """Downloaded binding wheels by version (``10.3.0``, ``11.4.0.106``...)."""
    out = {}
    for w in sorted(WHEELS.glob("tensorrt_cu*_bindings-*.whl")):
        m = re.match(r"tensorrt_cu\d+_bindings-([0-9.]+(?:\.post\d+)?)-", w.name)
        if m:
            out[m.group(1)] = w
    return out


def stub_libs(out: Path, major: int) -> Path:
    """Compile the stand-in libraries (``lib*.so.MAJOR``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, code in _STUBS.items():
        so = out / f"lib{name}.so.{major}"
        if so.is_file():
            continue
        src = out / f"{name}.c"
        src.write_text(code)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(so), str(src), f"-Wl,-soname,{so.name}"],
            check=True,
            capture_output=True,
        )
    return out


_PROBE = r"""
import json, sys
import tensorrt_bindings as trt
names = json.loads(sys.argv[1])
def has(path):
    obj = trt
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
out = {"version": trt.__version__, "present": {n: has(n) for n in names}}
try:
    trt.Builder(trt.Logger())
    out["builder"] = "created"
except Exception as e:
    out["builder"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def probe(version: str, names: list[str], work: Path) -> dict[str, object]:
    """Import the real bindings of ``version`` (in a subprocess, against the stubs) and say
    which of ``names`` (dotted paths, e.g. ``BuilderFlag.FP16``) exist."""
    wheel = wheels()[version]
    site = work / f"site-{version}"
    if not (site / "tensorrt_bindings").is_dir():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    libs = stub_libs(work / f"libs-{version.split('.')[0]}", int(version.split(".")[0]))
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs), "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"importing tensorrt {version} bindings failed: {res.stderr[-2000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))
