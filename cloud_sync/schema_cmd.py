"""Adapter: ``edgefleet schema export DIR [--doc FILE]``, the JSON Schemas for dashboard builders.

Hook it in with ``add_schema_command(sub)`` on the CLI's sub-parsers; the handler set as ``fn``
takes the parsed ``argparse.Namespace`` and returns an exit code. The repository keeps the
output in ``docs/schema/`` and ``docs/protocol.md``; a test fails when they drift::

    edgefleet schema export docs/schema --doc docs/protocol.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.common.fsutil import atomic_write_bytes
from agent.protocol import CONTRACT_VERSION
from agent.protocol.schema import export_schemas, render_protocol_doc

__all__ = ["add_schema_command", "run_export"]


def add_schema_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``schema export DIR [--doc FILE]``; returns the ``schema`` parser."""
    sp = subparsers.add_parser("schema", help="wire-contract JSON Schemas")
    ssub = sp.add_subparsers(dest="schema_cmd", required=True)
    ex = ssub.add_parser(
        "export", help="write one JSON Schema per wire message and index.json into DIR"
    )
    ex.add_argument("dir", metavar="DIR", help="output folder, e.g. docs/schema")
    ex.add_argument(
        "--doc", default=None, metavar="FILE", help="also write the protocol doc (docs/protocol.md)"
    )
    ex.set_defaults(fn=run_export)
    return sp


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``schema export``."""
    paths = export_schemas(args.dir)
    print(f"wrote {len(paths)} files for contract {CONTRACT_VERSION} to {args.dir}", flush=True)
    if args.doc:
        atomic_write_bytes(Path(args.doc), render_protocol_doc().encode())
        print(f"wrote {args.doc}", flush=True)
    return 0
