"""Adapter: one engine build in a ``spawn``-ed child process, and the parent's end of it.

A TensorRT build can take minutes, use most of a Jetson's memory and die (OOM killer, driver
crash), so it runs in a child with a time limit. ``run_child`` starts ``_child_main``, forwards
its progress and turns every way it can end (error message, timeout, signal, exit code) into
one exception; the child writes the engine to the path it is given and reports ``ok`` or
``error`` over a pipe. Which path, and what happens to the file afterwards, is the caller's
business (``agent.engine.build.get_or_build``: a temporary inside the engine cache).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.common.errors import EngineBuildError, ModelError
from agent.common.interrupt import Interrupted, build_stop_requested
from agent.testhooks import NO_HOOKS, TestHooks

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]

# Execution providers that compile subgraphs: ONNX Runtime cannot serialise their fused
# nodes ("Unable to serialize model as it contains compiled nodes"), so the optimised model
# is produced without them, at the portable "basic" level.
COMPILING_EPS = ("TensorrtExecutionProvider",)


def disk_full(e: OSError) -> bool:
    """The file system is out of space or quota: wait and retry, the model is not at fault."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


# ---- parent side ----------------------------------------------------------------------------


def run_child(
    backend: str,
    onnx_path: Path,
    out_path: Path,
    precision: str,
    opts: dict[str, Any],
    timeout_s: float,
    progress: ProgressFn | None,
    model: str,
    hooks: TestHooks = NO_HOOKS,
) -> None:
    """Run ``_child_main`` in a spawned process; forward progress; raise on any failure.

    Raises:
        EngineBuildError: the child reported an error, timed out (``"timeout"``, killed) or
            died (``"crash"``, with the exit code or signal).
        Interrupted: ``agent.common.interrupt.stop_builds_on`` asked it to stop (killed).
        OSError: (``ENOSPC``) the child ran out of disk space.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork: the agent has threads (camera readers, MQTT)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(send, backend, str(onnx_path), str(out_path), precision, opts, os.getpid(), hooks),
        name=f"engine-build-{backend}",
        daemon=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        proc.start()
        send.close()  # the child holds the only write end now: EOF means it is gone
        outcome = _follow(recv, deadline, progress, model)
        if build_stop_requested():  # a newer desired state, or the operator's cancel
            proc.kill()
            proc.join()
            raise Interrupted(f"{backend} build of {model} stopped on request; not cached")
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise EngineBuildError(
                f"{backend} build of {model} exceeded its time limit of {timeout_s:g} s; "
                "killed the build process; the engine was not cached",
                model=model,
                reason="timeout",
            )
        code = proc.exitcode
    finally:
        if proc.is_alive():  # KeyboardInterrupt or an error above: never leave it running
            proc.kill()
            proc.join()
        send.close()
        recv.close()
        proc.close()
    _raise_unless_ok(backend, model, outcome, code)


def _follow(
    recv: Connection, deadline: float, progress: ProgressFn | None, model: str
) -> tuple[Any, ...] | None:
    """Read the child's messages until it closes the pipe or the deadline passes; forward
    progress; return its ``ok``/``error`` outcome (``None`` when it never said)."""
    outcome: tuple[Any, ...] | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or build_stop_requested():
            return outcome
        if not recv.poll(min(remaining, 0.25)):
            continue
        try:
            msg = recv.recv()
        except EOFError:
            return outcome
        if msg[0] == "progress" and progress is not None:
            try:
                progress(str(msg[1]), float(msg[2]))
            except Exception:
                log.exception("model=%s build progress callback failed; build continues", model)
        elif msg[0] in ("ok", "error"):
            outcome = msg


def _raise_unless_ok(
    backend: str, model: str, outcome: tuple[Any, ...] | None, code: int | None
) -> None:
    """Pure: the exception for how the child ended, if it did not end well."""
    if outcome is not None and outcome[0] == "error" and outcome[2] == "nospace":
        raise OSError(
            errno.ENOSPC, f"{backend} build of {model} ran out of disk space: {outcome[1]}"
        )
    if outcome is not None and outcome[0] == "error":
        raise EngineBuildError(
            f"{backend} build of {model} failed: {outcome[1]}",
            model=model,
            reason=str(outcome[2]) or "build",
        )
    if code is not None and code < 0:
        try:
            sig = f"{signal.Signals(-code).name} ({-code})"
        except ValueError:
            sig = str(-code)
        hint = (
            "; the kernel OOM killer does this when memory runs out"
            if -code == signal.SIGKILL
            else ""
        )
        raise EngineBuildError(
            f"{backend} build process of {model} was killed by signal {sig}{hint}; "
            "the engine was not cached",
            model=model,
            reason="crash",
        )
    if code != 0 or outcome is None:
        raise EngineBuildError(
            f"{backend} build process of {model} exited with code {code} without "
            "reporting success; the engine was not cached",
            model=model,
            reason="crash",
        )


# ---- child process side ---------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A SIGKILLed or OOM-killed agent runs no clean-up, and an orphaned build would go on using
    the Jetson's memory while the restarted agent builds the same engine again. If the parent
    died before this call, exit now (the signal would never come).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def _apply_test_hooks(hooks: TestHooks, out_path: str) -> None:
    """Test-only hooks, applied before any heavy import so the tests stay fast."""
    if hooks.build_sleep_s:
        time.sleep(float(hooks.build_sleep_s))
    crash = hooks.build_crash
    if crash is not None:
        Path(out_path).write_bytes(b"partial engine")  # what a build dying mid-write leaves
        if str(crash).upper() == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(crash))


def _build_onnxruntime(
    onnx_path: str, out_path: str, opts: Mapping[str, Any], progress: ProgressFn
) -> None:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    providers = [p for p in opts["providers"] if p not in COMPILING_EPS] or ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[opts["graph_optimization_level"]]
    so.optimized_model_filepath = out_path
    progress("optimize", 0.0)
    try:
        ort.InferenceSession(onnx_path, so, providers=providers)
    except Exception as e:
        # ONNX Runtime reports a full disk while writing the optimised model as a protobuf
        # serialization error: say that the disk is full, not that the model is bad
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(out_path))).free
        need = os.path.getsize(onnx_path)
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for the optimised model ({free} bytes free, the model "
                f"is {need}); onnxruntime said: {e}",
            ) from e
        raise ModelError(
            f"onnxruntime cannot load {onnx_path}: {e}", model=onnx_path, reason="load"
        ) from e
    with open(out_path, "rb") as fh:
        os.fsync(fh.fileno())
    progress("optimize", 1.0)


def _child_main(
    conn: Connection,
    backend: str,
    onnx_path: str,
    out_path: str,
    precision: str,
    opts: dict[str, Any],
    parent_pid: int = 0,
    hooks: TestHooks = NO_HOOKS,
) -> None:
    """Entry point of the build process: build, then report ``ok`` or ``error`` on ``conn``."""
    if parent_pid:
        die_with_parent(parent_pid)
    lock = threading.Lock()  # TensorRT's progress monitor calls from several threads

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    def progress(phase: str, frac: float) -> None:
        send(("progress", phase, frac))

    try:
        _apply_test_hooks(hooks, out_path)
        progress("start", 0.0)
        if backend == "onnxruntime":
            _build_onnxruntime(onnx_path, out_path, opts, progress)
        else:
            from agent.engine.trt_build import build_engine  # no pycuda: build side only

            build_engine(
                onnx_path,
                out_path,
                precision=precision,
                workspace_bytes=int(opts["workspace_bytes"]),
                dla_core=opts["dla_core"],
                profiles=opts["profiles"],
                timing_cache_path=opts["timing_cache_path"],
                progress=progress,
            )
        progress("done", 1.0)
        send(("ok", os.path.getsize(out_path)))
    except ModelError as e:
        send(("error", str(e), e.reason or "build"))
    except OSError as e:  # a full disk is the device's trouble, not the model's: retried
        send(("error", f"{type(e).__name__}: {e}", "nospace" if disk_full(e) else "build"))
    except BaseException as e:  # report everything: the parent turns it into EngineBuildError
        send(("error", f"{type(e).__name__}: {e}", "build"))
    finally:
        conn.close()
