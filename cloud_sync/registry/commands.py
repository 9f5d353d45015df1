"""Adapter: the ``registry`` and ``model`` commands of the ``edgefleet`` operator CLI.

Hook them in with ``add_registry_commands(sub)`` on the CLI's sub-parsers; each command sets
``fn`` to a handler taking the parsed ``argparse.Namespace`` and returning an exit code, and
raises ``RegistryError`` (an ``EdgefleetError``) on failure, which the CLI prints as
``edgefleet: error: …``::

    edgefleet registry init DIR [--keys-dir KEYS] [--expiry-days ROLE=DAYS]...
        [--threshold ROLE=N]...
    edgefleet registry status --repo DIR [--keys-dir KEYS] [--json]
    edgefleet registry renew-root --repo DIR [--keys-dir KEYS]
    edgefleet model publish MODEL.onnx --repo DIR [--keys-dir KEYS] --name NAME --version SEMVER
        [--task T] [--input-size WxH] [--labels FILE] [--calibration DIR] [--quantize int8]
        [--max-accuracy-drop X] [--force] [--format F] [--set FIELD=VALUE]...
    edgefleet model inspect MODEL.onnx [--format F] [--set FIELD=VALUE]... [--json]
    edgefleet model list --repo DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import IO, Any, get_args

from agent.protocol.card import Task
from cloud_sync.registry.keys import RegistryError

__all__ = [
    "ProgressBar",
    "add_registry_commands",
    "parse_card_fields",
    "parse_pairs",
    "parse_size",
]


def parse_pairs(items: list[str] | None, what: str, convert: type[Any]) -> dict[str, Any]:
    """Pure: ``["root=365", "timestamp=1"]`` → ``{"root": 365.0, ...}`` (values converted).

    Raises:
        RegistryError: (reason ``"usage"``) an item is not ``ROLE=VALUE`` or its value is not
            a number.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        role, sep, value = item.partition("=")
        try:
            if not sep or not role:
                raise ValueError("missing '='")
            out[role.strip()] = convert(value)
        except ValueError as e:
            raise RegistryError(
                f"{what} {item!r} is invalid, expected ROLE=VALUE (e.g. timestamp=1): {e}",
                reason="usage",
            ) from e
    return out


def parse_size(text: str) -> tuple[int, int]:
    """Pure: ``"640x480"`` → ``(640, 480)``.

    Raises:
        RegistryError: (reason ``"usage"``) not ``WxH`` with positive integers.
    """
    m = re.fullmatch(r"([1-9][0-9]{0,4})[xX]([1-9][0-9]{0,4})", text.strip())
    if m is not None:
        return int(m.group(1)), int(m.group(2))
    raise RegistryError(
        f"input size {text!r} is invalid, expected WxH (e.g. 640x480)", reason="usage"
    )


class ProgressBar:
    """A one-line progress bar redrawn in place on a terminal; silent elsewhere."""

    def __init__(self, stream: IO[str], width: int = 24) -> None:
        """Draw on ``stream`` only when it is a TTY."""
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty()

    def __call__(self, done: int, total: int, label: str) -> None:
        """Redraw: ``[#######.........] 3/8 quantize``; a newline once ``done == total``."""
        if not self.enabled:
            return
        fill = self.width * done // max(total, 1)
        bar = "#" * fill + "." * (self.width - fill)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r[{bar}] {done}/{total} {label:<12}{end}")
        self.stream.flush()


def add_registry_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]:
    """Add ``registry init``, ``model publish`` and ``model list`` to a CLI.

    Args:
        subparsers: the CLI's ``add_subparsers()`` result.

    Returns:
        The ``registry`` and ``model`` sub-parser groups, for more commands under them.
    """
    return {"registry": _add_registry(subparsers), "model": _add_model(subparsers)}


def _add_registry(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``registry init``, ``registry status`` and ``registry renew-root``."""
    reg = subparsers.add_parser("registry", help="manage the signed model registry (TUF)")
    reg_sub = reg.add_subparsers(dest="registry_cmd", required=True)
    init = reg_sub.add_parser("init", help="create keys and version-1 TUF metadata in DIR")
    init.add_argument("dir", metavar="DIR", help="new registry folder")
    _keys_arg(init, "where the keys go: never inside DIR (default: DIR.keys, beside it)")
    init.add_argument(
        "--expiry-days",
        action="append",
        metavar="ROLE=DAYS",
        help="validity of root/targets/snapshot/timestamp metadata (repeatable; defaults "
        "root=365 targets=90 snapshot=7 timestamp=1)",
    )
    init.add_argument(
        "--threshold",
        action="append",
        metavar="ROLE=N",
        help="signatures needed for root/targets/snapshot/timestamp/desired (repeatable; "
        "default 1; N keys are made)",
    )
    init.set_defaults(fn=_init)
    st = reg_sub.add_parser("status", help="each role's version and expiry; warnings ahead")
    st.add_argument("--repo", required=True, metavar="DIR", help="registry folder")
    _keys_arg(st, "where the keys are: roles with a key there show as online")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--textfile", type=Path, default=None, metavar="FILE",
        help="also write the expiries as Prometheus metrics (node_exporter textfile collector)",
    )  # fmt: skip
    st.set_defaults(fn=_status)
    rr = reg_sub.add_parser(
        "renew-root", help="re-sign root with a new expiry (needs the root key; offline step)"
    )
    rr.add_argument("--repo", required=True, metavar="DIR", help="registry folder")
    _keys_arg(rr, "where the root key is: its offline copy (root.pem or offline/root.pem)")
    rr.set_defaults(fn=_renew_root)
    return reg_sub


def _add_model(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``model publish``, ``model inspect`` and ``model list``."""
    model = subparsers.add_parser("model", help="publish and list model versions")
    model_sub = model.add_subparsers(dest="model_cmd", required=True)
    pub = model_sub.add_parser("publish", help="validate, quantize, gate and sign a model")
    pub.add_argument("model", metavar="MODEL.onnx", help="the FP32 ONNX model")
    pub.add_argument("--repo", required=True, metavar="DIR", help="registry folder")
    _keys_arg(pub, "where the targets, snapshot and timestamp keys are")
    pub.add_argument("--name", required=True, help="model name")
    pub.add_argument("--version", required=True, metavar="SEMVER", help="e.g. 1.2.0")
    pub.add_argument("--task", choices=get_args(Task), help="override the card's task")
    pub.add_argument("--input-size", type=str, metavar="WxH", help="model input size")
    pub.add_argument("--labels", metavar="FILE", help="class names, one per line")
    pub.add_argument("--calibration", metavar="DIR", help="jpg/png calibration frames")
    pub.add_argument("--quantize", choices=["int8"], help="add a static QDQ INT8 variant")
    pub.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        metavar="X",
        help="largest INT8 accuracy drop vs FP32 (0..1, default 0.01)",
    )
    pub.add_argument("--force", action="store_true", help="publish INT8 even if the gate fails")
    _card_args(pub)
    pub.set_defaults(fn=_publish)
    ins = model_sub.add_parser(
        "inspect", help="show what publish would infer for a model (writes nothing)"
    )
    ins.add_argument("model", metavar="MODEL.onnx", help="the ONNX model")
    ins.add_argument("--task", choices=get_args(Task), help="override the inferred task")
    ins.add_argument("--input-size", type=str, metavar="WxH", help="model input size")
    ins.add_argument("--labels", metavar="FILE", help="class names, one per line")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument(
        "--card-out",
        metavar="FILE",
        help="write the card (e.g. MODEL.card.json beside MODEL.onnx, which edgefleet-agent "
        "run/bench then use for the local file)",
    )
    _card_args(ins)
    ins.set_defaults(fn=_inspect)

    ls = model_sub.add_parser("list", help="list published model versions")
    ls.add_argument("--repo", required=True, metavar="DIR", help="registry folder")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(fn=_list)
    return model_sub


def _keys_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--keys-dir",
        metavar="KEYS",
        default=None,
        help=f"{text}; default DIR.keys (DIR/keys for a registry made before keys moved out)",
    )


def _card_args(p: argparse.ArgumentParser) -> None:
    from cloud_sync.registry.formats import FORMAT_NAMES

    p.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        help="output format when it cannot be inferred (see the README's compatibility table)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a card field, e.g. input.color=bgr, input.mean=0.485,0.456,0.406, "
        "postprocess.score_threshold=0.4 (repeatable; applied last)",
    )


def parse_card_fields(items: list[str]) -> dict[str, Any]:
    """Pure: ``["input.color=bgr", "input.mean=0.5,0.5,0.5"]`` → ``{"input.color": "bgr",
    "input.mean": [0.5, 0.5, 0.5]}``. A value is JSON when it parses as JSON, a list when it
    has commas, else a string; the card's pydantic model checks and converts it.

    Raises:
        RegistryError: (reason ``"usage"``) an item is not ``FIELD=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RegistryError(
                f"--set {item!r} is invalid, expected FIELD=VALUE (e.g. input.color=bgr)",
                reason="usage",
            )

        def value(t: str) -> Any:
            try:
                return json.loads(t)
            except ValueError:
                return t.strip()

        text = text.strip()
        out[key.strip()] = (
            [value(t) for t in text.split(",")]
            if "," in text and text[:1] not in "[{"
            else value(text)
        )
    return out


def _inspect(args: argparse.Namespace) -> int:
    from cloud_sync.registry.model_file import inspect_model

    report = inspect_model(
        args.model,
        task=args.task,
        fmt=args.format,
        input_size=parse_size(args.input_size) if args.input_size else None,
        labels=args.labels,
        card_fields=parse_card_fields(args.set),
    )
    if args.card_out and "card" in report:
        from agent.common.fsutil import atomic_write_bytes
        from agent.protocol.card import ModelCard

        stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(args.model).stem)
        card = ModelCard.model_validate({**report["card"], "name": stem.lstrip("._-") or "model"})
        atomic_write_bytes(Path(args.card_out), (card.model_dump_json(indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if "card" in report else 1
    print(f"{report['model']}: opset {report['opset']}, producer {report['producer'] or '?'}")
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            print(f"  {kind[:-1]:<6} {t['name']:<28} {t['shape']} {t['dtype']}")
    if report["dynamic_axes"]:
        print(f"  dynamic axes: {report['dynamic_axes']}")
    if report["metadata_keys"]:
        print(f"  metadata: {', '.join(report['metadata_keys'])}")
    if "note" in report:
        print(f"  note: {report['note']}")
    for r in report["reasons"]:
        print(f"  inferred: {r}")
    if "error" in report:
        print(f"cannot publish as is: {report['error']}")
        return 1
    card = report["card"]
    inp, post = card["input"], card["postprocess"]
    print(f"task {card['task']}" + (f", format {report['format']}" if report["format"] else ""))
    print(
        f"input {inp['width']}x{inp['height']} {inp['layout']} {inp['color']} {inp['dtype']}, "
        f"{inp['resize']} (pad {inp['pad_value']}, {inp['pad_position']}), scale "
        f"{inp['scale']:.6g}, mean {inp['mean']}, std {inp['std']}"
        + (f", constants {[c['name'] for c in inp['constants']]}" if inp["constants"] else "")
    )
    labels = card["labels"]
    if labels:
        more = f" ... ({len(labels)})" if len(labels) > 8 else ""
        print(f"labels {', '.join(labels[:8])}{more}")
    if card["task"] == "classification":
        print(f"softmax applied by the agent: {post['softmax']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exit 0 when every role is fine, 1 with a warning, 2 when one has expired."""
    from datetime import datetime, timezone

    from cloud_sync.registry.repo import Repository

    repo = Repository(args.repo, keys_dir=args.keys_dir)
    rows = repo.freshness(datetime.now(timezone.utc))
    if args.json:
        print(json.dumps([
            {"role": r.role, "version": r.version, "expires": r.expires.isoformat(),
             "remaining_s": int(r.remaining.total_seconds()), "online_key": r.online,
             "level": r.level, "message": r.message}
            for r in rows
        ], indent=2))  # fmt: skip
    else:
        print(f"{'ROLE':<10} {'VERSION':>7}  {'EXPIRES (UTC)':<17} {'KEY':<8} STATUS")
        for r in rows:
            key = "online" if r.online else "offline"
            print(f"{r.role:<10} {r.version:>7}  {r.expires:%Y-%m-%d %H:%M} {key:<8} {r.message}")
    if args.textfile is not None:
        from cloud_sync.expiry import write_textfile

        write_textfile(args.textfile, [("registry", r.role, r.expires, r.level) for r in rows])
    levels = {r.level for r in rows}
    return 2 if "expired" in levels else 1 if "warn" in levels else 0


def _renew_root(args: argparse.Namespace) -> int:
    from cloud_sync.registry.repo import Repository

    repo = Repository(args.repo, keys_dir=args.keys_dir)
    version = repo.renew_root()
    _, expires = repo.expiries()["root"]
    print(f"root v{version} signed, valid until {expires:%Y-%m-%d}; devices follow it at their "
          f"next refresh")  # fmt: skip
    return 0


def _init(args: argparse.Namespace) -> int:
    from cloud_sync.registry.repo import Repository

    repo = Repository.init(
        args.dir,
        keys_dir=args.keys_dir,
        expiry_days=parse_pairs(args.expiry_days, "--expiry-days", float),
        thresholds=parse_pairs(args.threshold, "--threshold", int),
    )
    trust = repo.desired_trust()
    keys = repo.keys_dir
    print(f"registry created in {repo.path} (root v{repo.versions().root})")
    print(f"  root keys:    {', '.join(k[:16] for k in repo.root().roles['root'].keyids)}")
    print(f"  desired keys: {', '.join(k[:16] for k in trust.keys)}")
    print(f"  provision devices with {repo.path / 'root.json'}")
    print(f"  private keys (mode 0600) in {keys}, outside the served folder:")
    print("    timestamp, snapshot, targets.pem: `registry serve` re-signs with them")
    print("    desired.pem: `deploy` signs desired states with it")
    print("    offline/root.pem: move it to offline storage now (`registry serve` refuses to start")
    print("    while it can read it); `registry renew-root --keys-dir PATH` reads it from there")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from cloud_sync.registry.publish import publish
    from cloud_sync.registry.repo import Repository

    repo = Repository(args.repo, keys_dir=args.keys_dir)
    result = publish(
        repo,
        args.model,
        name=args.name,
        version=args.version,
        task=args.task,
        input_size=parse_size(args.input_size) if args.input_size else None,
        labels=args.labels,
        calibration_dir=args.calibration,
        quantize=args.quantize,
        max_accuracy_drop=args.max_accuracy_drop,
        force=args.force,
        progress=ProgressBar(sys.stderr),
        fmt=args.format,
        card_fields=parse_card_fields(args.set),
    )
    v = result.versions
    print(
        f"published {result.name}@{result.version} (targets v{v.targets}, snapshot "
        f"v{v.snapshot}, timestamp v{v.timestamp})"
    )
    card = result.card
    what = card.postprocess.detection_format if card.task == "detection" else card.task
    print(f"  task {card.task} ({what}), {len(card.labels)} labels")
    for note in result.notes:
        print(f"  {note}")
    for path, size in result.files.items():
        print(f"  {path}  {size} bytes")
    if result.gate is not None:
        forced = " (FORCED past the gate)" if result.forced else ""
        print(f"  int8 gate: {result.gate.detail}{forced}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from cloud_sync.registry.catalog import list_models
    from cloud_sync.registry.repo import Repository

    models = list_models(Repository(args.repo))
    if args.json:
        rows = [
            {
                "name": m.name,
                "version": m.version,
                "task": m.task,
                "variants": list(m.variants),
                "sizes": m.sizes,
            }
            for m in models
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not models:
        print("no models published")
        return 0
    print(f"{'NAME':<20} {'VERSION':<14} {'TASK':<15} {'VARIANTS':<12} SIZE")
    for m in models:
        size = sum(m.sizes.values())
        print(f"{m.name:<20} {m.version:<14} {m.task:<15} {','.join(m.variants):<12} {size}")
    return 0
