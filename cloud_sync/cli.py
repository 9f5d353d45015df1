"""Adapter: the ``edgefleet`` operator command line."""

from __future__ import annotations

import argparse
import logging
import sys

from cloud_sync import __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgefleet", description="edgefleet fleet operator CLI")
    ap.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="run a model on a generated video end to end, on embedded defaults"
    )
    d.add_argument(
        "--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)"
    )
    d.add_argument(
        "--workdir", default=None, help="keep models, video and results here (default: a temp dir)"
    )
    d.set_defaults(fn=_demo)
    return ap


def _demo(args: argparse.Namespace) -> int:
    from cloud_sync.demo import run_demo

    return run_demo(duration_s=args.duration, workdir=args.workdir)


def main(argv: list[str] | None = None) -> int:
    from agent.errors import EdgefleetError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.fn(args))
    except EdgefleetError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
