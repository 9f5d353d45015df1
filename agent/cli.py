"""Adapter: the ``edgefleet-agent`` command line (run, check, bench, status)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

from agent import __version__
from agent.common.errors import EdgefleetError


class JournalFormatter(logging.Formatter):
    """One line per event with the sd-daemon(3) priority prefix (``<3>`` error … ``<7>``
    debug) that journald turns into the entry's priority; journald adds the time."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
    }  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 7)
        text = super().format(record).replace("\n", " | ")  # one journal entry per event
        return f"<{prio}>{text}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # stderr is connected to journald (systemd sets it)
        handler.setFormatter(JournalFormatter("%(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    from agent.protocol.sealed import install_redaction

    install_redaction()  # camera passwords and sealed tokens never reach the journal


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import AgentConfig, load_config
    from agent.service import Agent
    from agent.supervisor import Supervisor
    from agent.testhooks import TestHooks

    cfg = load_config(args.config, env=os.environ)
    path = Path(args.config) if args.config else None
    # Test-only hooks for fault tests that run the agent as a child process: read here, once
    hooks = TestHooks.from_env(os.environ)

    # the agent's own log file, so logs can be pulled remotely without journald (upload_logs)
    from agent.telemetry.logfile import install_file_log

    install_file_log(cfg.data_dir)

    def make_agent(c: AgentConfig) -> Agent:
        agent = Agent(c, hooks=hooks)
        agent.config_path = path  # what the 'check' command checks
        return agent

    sup = Supervisor(path, cfg, make_agent=make_agent,
                     exit_when_sources_end=args.exit_when_sources_end)  # fmt: skip
    return sup.run(duration_s=args.duration)


def cmd_check(args: argparse.Namespace) -> int:
    from agent.check import check_report

    report = check_report(args.config, env=os.environ)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_check(report)
    return 0 if report["ok"] else 1


def _print_check(r: dict[str, Any]) -> None:
    from agent.check import format_check

    print("\n".join(format_check(r)))


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.bench import format_report, run_bench
    from agent.models import open_local_model, resolve_profile

    def progress(msg: str) -> None:
        if not args.json:
            print(f"… {msg}", file=sys.stderr)

    profile_name, profile, why = resolve_profile(args.profile)
    progress(f"device profile {profile_name} ({why})")
    model = open_local_model(
        Path(args.model),
        profile=profile,
        task=args.task,
        input_size=args.input_size,
        engine=args.backend,
        progress=progress,
    )
    try:
        report = run_bench(model, source=args.source, frames=args.frames, progress=progress)
    finally:
        model.close()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.service import read_status

    cfg = load_config(args.config, env=os.environ)
    status = read_status(cfg.data_dir)
    if status is None:
        print(f"no status in {cfg.data_dir}: is the agent running?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    import datetime as dt

    when = dt.datetime.fromtimestamp(status["time"], dt.timezone.utc).isoformat(timespec="seconds")
    broker = status.get("broker")
    link = ""
    if broker is not None:
        link = "  broker " + ("connected" if broker["connected"] else "DISCONNECTED")
        if broker.get("last_error"):
            link += f" ({broker['last_error']})"
    print(f"device {status['device_id']}  profile {status['profile']}  updated {when}{link}")
    conf = status.get("config") or {}
    if conf:  # remote configuration: which runs, how the last attempt went
        running = f"remote {conf['hash'][:12]}" if conf.get("hash") else "local file"
        last = f"  last {conf['status']} {(conf.get('target_hash') or '')[:12]}".rstrip()
        print(f"  config {running}{last if conf.get('status') else ''}"
              + (f": {conf['reason']}" if conf.get("reason") else ""))  # fmt: skip
    phases = {r["name"]: r for r in (status.get("reported") or {}).get("pipelines", [])}
    for p in status["pipelines"]:
        rep = phases.get(p["name"])
        if rep is not None:
            target = f"{rep['target_model']}@{rep['target_version']}" if rep["target_model"] else ""
            print(f"  {p['name']:<12} update {rep['phase']} {target}".rstrip())
            if rep.get("last_error"):
                print(f"  {'':<12} {rep['last_error']}")
        lat = p["latency_ms"].get("infer", {})
        print(
            f"  {p['name']:<12} {p['source_state']:<10} model {p['model']}  "
            f"fps {p['fps_out']:.1f}/{p['fps_in']:.1f}  dropped {p['frames_dropped']}  "
            f"infer p95 {lat.get('p95', '-')} ms  errors {p['errors']}"
            + (f"  last error: {p['last_error']}" if p.get("last_error") else "")
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet device agent")
    ap.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the pipelines from a config file")
    r.add_argument("--config", required=True, help="agent TOML config")
    r.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after S seconds (or when every source has ended)",
    )
    r.add_argument("--exit-when-sources-end", action="store_true",
                   help="exit 0 when every source has ended (files without loop); by default "
                   "the agent keeps serving updates and commands")  # fmt: skip
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("check", help="validate config, show the profile and available backends")
    c.add_argument("--config", default=None, help="agent TOML config (optional)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_check)

    b = sub.add_parser("bench", help="backend vs full-pipeline throughput, same run")
    b.add_argument("--model", required=True, help="ONNX file (card.json beside it is used)")
    b.add_argument("--source", default=None, help="video source; default a synthetic video")
    b.add_argument("--frames", type=int, default=300, help="frames to infer per phase")
    b.add_argument("--input-size", default=None, help="WxH for dynamic model inputs")
    b.add_argument(
        "--task", default=None, choices=["classification", "detection", "heatmap", "raw"]
    )
    b.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    b.add_argument("--profile", default="auto", help="profile name or .toml (default: detect)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(fn=cmd_bench)

    s = sub.add_parser("status", help="what the running agent reports")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    return ap


def dispatch(prog: str, args: argparse.Namespace) -> int:
    """Run a parsed command: exit 2 with one clear line for edgefleet errors, 130 on Ctrl-C.

    Shared by both console scripts (``edgefleet-agent`` and ``edgefleet``).
    """
    try:
        return int(args.fn(args))
    except EdgefleetError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def no_vendor_telemetry() -> None:
    """Turn off ONNX Runtime's usage telemetry (1.2x writes a device id under
    ``$XDG_CACHE_HOME/Microsoft`` and sends usage events) unless the environment says otherwise;
    before any import of onnxruntime, and inherited by the engine build children."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def main(argv: list[str] | None = None) -> int:
    no_vendor_telemetry()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return dispatch("edgefleet-agent", args)


if __name__ == "__main__":
    sys.exit(main())
