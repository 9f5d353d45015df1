"""Adapter: what ``edgefleet-agent check`` shows — config, profile, backends, GStreamer and
every pipeline's source and model, each with ``ok`` and a detail in words."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import __version__
from agent.common.errors import ConfigError, EdgefleetError
from agent.config import AgentConfig, load_config
from agent.models import backend_availability, resolve_profile
from agent.pipeline.config import PipelineConfig
from agent.pipeline.sources import gstreamer_support, parse_source


def check_report(config_path: str | None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything ``edgefleet-agent check`` shows; ``ok`` is False on any hard failure."""
    report: dict[str, Any] = {"agent_version": __version__, "ok": True}
    cfg: AgentConfig | None = None
    if config_path is None:
        report["config"] = {
            "ok": True,
            "path": None,
            "detail": "no config given (profile auto-detected)",
        }
    else:
        try:
            cfg = load_config(config_path, env=env)
            report["config"] = {
                "ok": True,
                "path": config_path,
                "detail": f"device {cfg.device_id}, {len(cfg.pipelines)} pipeline(s)",
            }
        except ConfigError as e:
            report["config"] = {"ok": False, "path": config_path, "detail": str(e)}
            report["ok"] = False
    try:
        name, prof, why = resolve_profile(cfg.profile if cfg else "auto")
        report["profile"] = {
            "ok": True,
            "name": name,
            "detail": why,
            "precisions": list(prof.precisions),
            "backends": list(prof.backends),
        }
    except EdgefleetError as e:
        report["profile"] = {"ok": False, "name": None, "detail": str(e)}
        report["ok"] = False
    report["backends"] = backend_availability()
    gst_ok, gst_why = gstreamer_support()
    report["gstreamer"] = {"available": gst_ok, "detail": gst_why}
    can_deliver = cfg is not None and cfg.broker is not None and cfg.trust is not None
    pipes = [
        _check_pipeline(p, gst_ok, gst_why, can_deliver)
        for p in (cfg.pipelines if cfg is not None else [])
    ]
    if any(not p["ok"] for p in pipes):
        report["ok"] = False
    report["pipelines"] = pipes
    return report


def _check_pipeline(
    p: PipelineConfig, gst_ok: bool, gst_why: str, can_deliver: bool
) -> dict[str, Any]:
    """One pipeline's line: its source and model, or what is wrong with them."""
    src = parse_source(p.source)
    problems = []
    if src.kind == "gstreamer" and not gst_ok:
        problems.append(f"GStreamer source but {gst_why}")
    if src.kind == "file" and not Path(str(src.target)).is_file():
        problems.append(f"video file {src.target} does not exist")
    if Path(p.model).suffix == ".onnx" and not Path(p.model).is_file():
        problems.append(f"model file {p.model} does not exist")
    if Path(p.model).suffix != ".onnx" and not can_deliver:
        problems.append(
            f"model {p.model!r} is a registry name, but there is no [broker] and [trust] "
            "section to deliver it: the pipeline would wait forever"
        )
    detail = "; ".join(problems) or f"{src.kind} source {src.display}, model {p.model}"
    return {"name": p.name, "ok": not problems, "detail": detail}


def format_check(r: dict[str, Any]) -> list[str]:
    """The lines ``edgefleet-agent check`` prints for a ``check_report``."""
    mark = {True: "ok  ", False: "FAIL"}
    out = [f"edgefleet-agent {r['agent_version']}"]
    out.append(f"[{mark[r['config']['ok']]}] config {r['config']['path']}: {r['config']['detail']}")
    p = r["profile"]
    out.append(f"[{mark[p['ok']]}] profile {p.get('name')}: {p['detail']}")
    for name, b in r["backends"].items():
        out.append(f"[{'ok  ' if b['available'] else 'no  '}] backend {name}: {b['detail']}")
    gst = r["gstreamer"]
    out.append(f"[{'ok  ' if gst['available'] else 'no  '}] GStreamer sources: {gst['detail']}")
    for pipe in r.get("pipelines", []):
        out.append(f"[{mark[pipe['ok']]}] pipeline {pipe['name']}: {pipe['detail']}")
    return out
