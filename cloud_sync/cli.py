"""Adapter: the ``edgefleet`` operator command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from agent.protocol.topics import DEFAULT_ROOT
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
    d.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="MQTT broker to start (auto: Mosquitto when installed, else amqtt in-process)",
    )
    d.set_defaults(fn=_demo)

    from cloud_sync.registry.commands import add_registry_commands

    groups = add_registry_commands(sub)
    from cloud_sync.schema_cmd import add_schema_command

    add_schema_command(sub)
    from cloud_sync.ingest.commands import add_ingest_commands

    add_ingest_commands(sub)
    from cloud_sync.rollout.cli import add_rollout_commands

    add_rollout_commands(sub)
    from cloud_sync.enroll import add_pki_commands

    add_pki_commands(sub)
    from cloud_sync.sealing import add_secret_commands

    add_secret_commands(sub)
    from cloud_sync.clips import add_clip_commands

    add_clip_commands(sub)
    _add_serve(groups["registry"])

    dp = sub.add_parser("deploy", help="set a device's desired model version (signed, retained)")
    dp.add_argument("ref", metavar="NAME@VERSION")
    dp.add_argument("--device", required=True, help="device id")
    dp.add_argument("--pipeline", default=None, help="pipeline (default: all of the device's)")
    dp.add_argument("--repo", required=True, help="registry directory")
    dp.add_argument("--broker", required=True, help="mqtt://host:port")
    dp.add_argument("--topic-root", default=DEFAULT_ROOT)
    dp.set_defaults(fn=_deploy)
    return ap


def _add_serve(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = rsub.add_parser("serve", help="serve the registry's metadata and targets over MQTT")
    s.add_argument("--repo", required=True, help="registry directory")
    s.add_argument(
        "--keys-dir", default=None,
        help="online keys (timestamp, snapshot, targets) to re-sign with; default: REPO.keys."
             " Serving refuses to start while it can read the root key",
    )  # fmt: skip
    s.add_argument("--broker", required=True, help="mqtt://host:port")
    s.add_argument("--topic-root", default=DEFAULT_ROOT)
    s.add_argument("--replica", default="1", help="replica name (several share the load)")
    s.add_argument("--workers", type=int, default=4, help="threads answering chunk requests")
    s.add_argument(
        "--textfile", type=Path, default=None, metavar="FILE",
        help="write each role's expiry as Prometheus metrics here (node_exporter textfile "
             "collector), refreshed after every re-sign and every 6 h",
    )  # fmt: skip
    s.add_argument(
        "--max-transfers", type=int, default=None,
        help="downloads served at once (others are told to wait: 'busy'); 0 = no limit;"
             " default 32",
    )  # fmt: skip
    for flag, kind, text in (
        ("--device-transfers", int, "downloads one device is served at once (default 2)"),
        ("--device-rate", float, "requests per second one device may send (default 1000)"),
        ("--device-mb-per-s", float, "MiB/s one device may draw after a 64 MiB burst (default 16)"),
        ("--queue-mb", int, "MiB of answers queued for the broker, all devices (default 64)"),
        ("--device-queue-mb", int, "MiB of answers queued for one device (default 8)"),
    ):
        s.add_argument(flag, type=kind, default=None, help=text)
    s.set_defaults(fn=_serve)


def serve_limits(args: argparse.Namespace) -> Any:
    """The ``ServeLimits`` the ``registry serve`` flags ask for (defaults where unset).

    Raises:
        RegistryError: (reason ``"usage"``) a value out of range.
    """
    from pydantic import ValidationError

    from cloud_sync.registry.admission import ServeLimits
    from cloud_sync.registry.keys import RegistryError

    mib = 1024 * 1024

    def scaled(value: float | None, unit: int) -> int | None:
        return None if value is None else int(value * unit)

    given = {
        "max_transfers": args.max_transfers,
        "device_transfers": args.device_transfers,
        "device_rate": args.device_rate,
        "device_byte_rate": scaled(args.device_mb_per_s, mib),
        "max_queued_bytes": scaled(args.queue_mb, mib),
        "device_queued_bytes": scaled(args.device_queue_mb, mib),
    }
    try:
        return ServeLimits(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise RegistryError(
            f"registry serve: {err['loc'][0] if err['loc'] else 'limits'}: {err['msg']}",
            reason="usage",
        ) from e


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cloud_sync.registry.keys import check_serving_keys, default_keys_dir
    from cloud_sync.registry.repo import Repository
    from cloud_sync.registry.serve import ChunkServer

    keys_dir = Path(args.keys_dir) if args.keys_dir else default_keys_dir(args.repo)
    warning = check_serving_keys(Path(args.repo), keys_dir)  # raises: keys it must not hold
    if warning:
        logging.getLogger("edgefleet.registry").warning("%s", warning)
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    limits = serve_limits(args)
    repo = Repository(Path(args.repo), keys_dir=keys_dir)
    keep_fresh = metadata_keeper(repo, textfile=args.textfile)

    def tick(now: float) -> None:
        from datetime import datetime, timezone

        keep_fresh(datetime.fromtimestamp(now, timezone.utc))

    server = ChunkServer(
        Path(args.repo),
        args.broker,
        root=args.topic_root,
        client_id=f"edgefleet-registry-{args.replica}",
        on_tick=tick,
        workers=args.workers,
        limits=limits,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    print(
        f"serving {args.repo} on {args.broker} (replica {args.replica}); Ctrl-C stops", flush=True
    )
    server.serve_forever(stop)
    return 0


def metadata_keeper(
    repo: Any, *, warn_every_s: float = 6 * 3600, textfile: Path | None = None
) -> Any:
    """A ``tick(now)`` for ``registry serve``: re-sign the online roles at half their lifetime
    (``Repository.refresh_thresholds``) and log a warning for any role near expiry (root
    and offline roles weeks ahead), at most every ``warn_every_s``; with ``textfile``, also
    write every role's expiry there as Prometheus metrics (``cloud_sync.expiry``) after each
    re-sign and each check."""
    import logging
    from datetime import datetime

    from cloud_sync.registry.keys import SERVING_ROLES, RegistryError

    log = logging.getLogger("edgefleet.registry")
    last_warned: list[datetime] = []

    def tick(now: datetime) -> tuple[str, ...]:
        online = tuple(r for r in SERVING_ROLES if repo.has_key(r))
        try:
            done: tuple[str, ...] = repo.refresh_expiring(
                now, min_remaining=repo.refresh_thresholds(), roles=online
            )
        except RegistryError as e:
            log.error("registry metadata not re-signed: %s; retrying at the next tick", e)
            done = ()
        if done:
            log.warning("re-signed %s before expiry", ", ".join(done))
            print(f"re-signed {', '.join(done)} before expiry", flush=True)
        if done or not last_warned or (now - last_warned[0]).total_seconds() >= warn_every_s:
            rows = repo.freshness(now)
            if not last_warned or (now - last_warned[0]).total_seconds() >= warn_every_s:
                for st in rows:
                    if st.level != "ok":
                        log.warning("registry %s", st.message)
                last_warned[:] = [now]
            if textfile is not None:
                from cloud_sync.expiry import write_textfile

                try:
                    write_textfile(
                        textfile, [("registry", r.role, r.expires, r.level) for r in rows]
                    )
                except OSError as e:
                    log.error("cannot write the expiry metrics to %s: %s", textfile, e)
        return done

    return tick


def _deploy(args: argparse.Namespace) -> int:

    from cloud_sync.deploy import deploy

    env = deploy(
        Path(args.repo),
        args.broker,
        args.device,
        args.ref,
        pipeline=args.pipeline,
        topic_root=args.topic_root,
    )
    d = env.signed
    targets = ", ".join(f"{k}={v.model}@{v.version}" for k, v in d.pipelines.items())
    print(f"device {d.device_id}: desired revision {d.revision}: {targets}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cloud_sync.demo import run_demo

    return run_demo(duration_s=args.duration, workdir=args.workdir, broker=args.broker)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    from agent.protocol.sealed import install_redaction

    install_redaction()  # URL passwords and sealed tokens never reach a log line


def main(argv: list[str] | None = None) -> int:
    from agent.cli import dispatch, no_vendor_telemetry

    no_vendor_telemetry()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return dispatch("edgefleet", args)


if __name__ == "__main__":
    sys.exit(main())
