"""Adapter: ``edgefleet ca …`` and ``edgefleet device enroll`` — identities and device bundles.

A device bundle is everything a device needs to join the fleet, in one directory to copy to
``/etc/edgefleet``: its certificate and key (0600), the fleet CA, the registry's TUF root, and
an ``agent.toml`` pointing at them with the broker URL, tags and groups filled in.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.common.fsutil import atomic_write_bytes
from agent.protocol.topics import DEFAULT_ROOT
from cloud_sync.acl import render_acl, render_mosquitto_conf
from cloud_sync.pki import FleetCA, PkiError, identity_name
from cloud_sync.registry.commands import parse_pairs

SERVICE_ROLES = ("ingest", "registry", "operator")


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_toml(device_id: str, broker_url: str, conf_dir: Path, *, tags: dict[str, str],
               groups: list[str], topic_root: str = DEFAULT_ROOT) -> str:  # fmt: skip
    """Pure: the enrolled device's config, files referenced under ``conf_dir``."""
    lines = [
        f"device_id = {_toml_str(device_id)}",
        'data_dir = "/var/lib/edgefleet"',
        'profile = "auto"',
        f"groups = [{', '.join(_toml_str(g) for g in groups)}]",
        "",
        "[tags]",
        *(f"{k} = {_toml_str(v)}" for k, v in sorted(tags.items())),
        "",
        "[broker]",
        f"url = {_toml_str(broker_url)}",
        f"topic_root = {_toml_str(topic_root)}",
        f"ca_file = {_toml_str(str(conf_dir / 'ca.crt'))}",
        f"cert_file = {_toml_str(str(conf_dir / 'device.crt'))}",
        f"key_file = {_toml_str(str(conf_dir / 'device.key'))}",
        "",
        "[trust]",
        f"root = {_toml_str(str(conf_dir / 'root.json'))}",
        "",
        "# add [[pipelines]] for this device's cameras (see docs/agent.example.toml)",
    ]
    return "\n".join(lines) + "\n"


def enroll_device(ca: FleetCA, device_id: str, out: Path, *, broker_url: str, root_json: Path,
                  tags: dict[str, str] | None = None, groups: list[str] | None = None,
                  conf_dir: Path = Path("/etc/edgefleet")) -> Path:  # fmt: skip
    """Issue the device's certificate and write its bundle to ``out/DEVICE``; returns that dir.

    Raises:
        PkiError: bad id, a live certificate already exists, or the root file is missing.
    """
    if not broker_url.startswith("mqtts://"):
        raise PkiError(f"enrolled devices use TLS: the broker URL must be mqtts://: {broker_url}")
    if not root_json.is_file():
        raise PkiError(f"no TUF root at {root_json} (the registry's root.json)")
    bundle = out / device_id
    ca.issue("device", device_id, bundle)
    shutil.copyfile(root_json, bundle / "root.json")
    text = agent_toml(device_id, broker_url, conf_dir, tags=tags or {}, groups=groups or [])
    atomic_write_bytes(bundle / "agent.toml", text.encode())
    return bundle


def add_pki_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the fleet certificate authority (mutual TLS identities)")
    csub = ca.add_subparsers(dest="ca_cmd", required=True)
    init = csub.add_parser("init", help="create the fleet CA")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--days", type=int, default=3650)
    init.set_defaults(fn=_ca_init)
    srv = csub.add_parser("server", help="issue the broker's server certificate")
    srv.add_argument("--dir", required=True, type=Path)
    srv.add_argument("--host", action="append", required=True, help="DNS name or IP (repeat)")
    srv.set_defaults(fn=_ca_server)
    ident = csub.add_parser("identity", help="issue a service or operator identity")
    ident.add_argument("name")
    ident.add_argument("--dir", required=True, type=Path)
    ident.add_argument("--role", choices=SERVICE_ROLES, required=True)
    ident.add_argument("--out", type=Path, default=None, help="default: DIR/identities/NAME")
    ident.add_argument(
        "--replicas", type=int, default=None, metavar="N",
        help="issue NAME-1 … NAME-N, one per ingest worker or registry replica (the broker "
             "allows one connection per identity)",
    )  # fmt: skip
    ident.set_defaults(fn=_ca_identity)
    rev = csub.add_parser("revoke", help="revoke an identity's certificate, rewrite crl.pem")
    rev.add_argument("name", help="device id, svc:NAME or op:NAME")
    rev.add_argument("--dir", required=True, type=Path)
    rev.set_defaults(fn=_ca_revoke)
    crl = csub.add_parser(
        "refresh-crl", help="re-sign crl.pem when half its validity is gone; reload the broker"
    )
    crl.add_argument("--dir", required=True, type=Path)
    crl.add_argument("--days", type=int, default=30, help="validity of the new CRL")
    crl.add_argument("--force", action="store_true", help="re-sign even when not due")
    crl.add_argument(
        "--install", type=Path, default=None, metavar="PATH",
        help="copy the CRL here (the broker's crlfile) when rewritten or when it differs",
    )  # fmt: skip
    crl.add_argument(
        "--reload", default=None, metavar="CMD",
        help="run after a rewrite, e.g. 'systemctl reload mosquitto' (Mosquitto reads the CRL "
             "at start and on SIGHUP)",
    )  # fmt: skip
    crl.set_defaults(fn=_ca_refresh_crl)
    st = csub.add_parser("status", help="expiry of the CA, broker cert, CRL and identities")
    st.add_argument("--dir", required=True, type=Path)
    st.add_argument("--warn-days", type=int, default=30)
    st.add_argument(
        "--textfile", type=Path, default=None, metavar="FILE",
        help="also write the expiries as Prometheus metrics (node_exporter textfile collector)",
    )  # fmt: skip
    st.set_defaults(fn=_ca_status)
    acl = csub.add_parser("broker-config", help="write the Mosquitto ACL and TLS listener config")
    acl.add_argument("--dir", required=True, type=Path)
    acl.add_argument("--out", required=True, type=Path)
    acl.add_argument("--port", type=int, default=8883)
    acl.add_argument("--bind", default="0.0.0.0")
    acl.add_argument("--topic-root", default=DEFAULT_ROOT)
    acl.set_defaults(fn=_ca_broker_config)

    _add_device_commands(sub)


def _add_device_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edgefleet device enroll|renew|cmd``."""
    dev = sub.add_parser("device", help="device enrollment and commands")
    dsub = dev.add_subparsers(dest="device_cmd", required=True)
    en = dsub.add_parser("enroll", help="issue a device certificate and write its config bundle")
    en.add_argument("device_id")
    en.add_argument("--ca", required=True, type=Path, help="the CA directory")
    en.add_argument("--broker", required=True, help="mqtts://host:8883")
    en.add_argument("--root", required=True, type=Path, help="the registry's root.json")
    en.add_argument("--out", required=True, type=Path, help="bundles go to OUT/DEVICE_ID")
    en.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    en.add_argument("--group", action="append", default=[])
    en.add_argument("--conf-dir", type=Path, default=Path("/etc/edgefleet"),
                    help="where the bundle will live on the device")  # fmt: skip
    en.set_defaults(fn=_enroll)
    rn = dsub.add_parser(
        "renew", help="a new certificate for an enrolled device (the old one is revoked)"
    )
    rn.add_argument("device_id")
    rn.add_argument("--ca", required=True, type=Path, help="the CA directory")
    rn.add_argument("--out", required=True, type=Path, help="writes OUT/DEVICE_ID/device.crt|key")
    rn.set_defaults(fn=_renew)
    from cloud_sync.commands import add_cmd_command

    add_cmd_command(dsub)  # edgefleet device cmd DEVICE ACTION …


def _ca_init(args: argparse.Namespace) -> int:
    ca = FleetCA.init(args.dir, days=args.days)
    print(f"fleet CA created in {args.dir} (ca.crt to share, ca.key to guard: mode 0600)")
    print(f"  crl: {ca.crl_file}")
    return 0


def _ca_server(args: argparse.Namespace) -> int:
    creds = FleetCA(args.dir).issue_server(tuple(args.host))
    print(f"broker certificate for {', '.join(args.host)}: {creds.cert} (key {creds.key})")
    return 0


def _ca_identity(args: argparse.Namespace) -> int:
    ca = FleetCA(args.dir)
    if args.replicas is not None and not 1 <= args.replicas <= 100:
        raise PkiError(f"--replicas must be 1..100, got {args.replicas}")
    names = ([args.name] if args.replicas is None
             else [f"{args.name}-{i}" for i in range(1, args.replicas + 1)])  # fmt: skip
    for name in names:
        cn = identity_name(args.role, name)
        out = args.dir / "identities" / cn.replace(":", "-")
        if args.out is not None:
            out = args.out if args.replicas is None else args.out / cn.replace(":", "-")
        creds = ca.issue(args.role, name, out)
        group = f"; shared-subscription group in {creds.share_group}" if creds.share_group else ""
        print(f"{cn} ({args.role}): {creds.cert} (key {creds.key}){group}")
    print("run `edgefleet ca broker-config` to update the broker's ACL; give each running "
          "service its own identity (the broker keeps one connection per identity)")  # fmt: skip
    return 0


def _ca_revoke(args: argparse.Namespace) -> int:
    ca = FleetCA(args.dir)
    r = ca.revoke(args.name)
    print(f"revoked {r.name} (serial {r.serial:x}); {ca.crl_file} rewritten: "
          "copy it to the broker and restart or reload it")  # fmt: skip
    return 0


def _ca_refresh_crl(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    ca = FleetCA(args.dir)
    within = timedelta(days=args.days * 10) if args.force else None
    rewritten = ca.refresh_crl(days=args.days, within=within)
    installed = False
    if args.install is not None:
        data = ca.crl_file.read_bytes()
        if not args.install.is_file() or args.install.read_bytes() != data:
            atomic_write_bytes(args.install, data)
            installed = True
    if not rewritten and not installed:
        print(f"{ca.crl_file} valid until {ca.crl_next_update():%Y-%m-%d %H:%M}; not due")
        return 0
    print(f"{ca.crl_file} re-signed, valid until {ca.crl_next_update():%Y-%m-%d %H:%M}"
          + (f"; installed as {args.install}" if installed else ""))  # fmt: skip
    if args.reload:
        res = subprocess.run(shlex.split(args.reload), check=False)
        if res.returncode != 0:
            print(f"reload command failed with exit {res.returncode}: {args.reload}")
            return 1
    return 0


def ca_warnings(ca: FleetCA, now: datetime, warn: timedelta) -> list[tuple[str, datetime, str]]:
    """Pure-ish: ``(what, expires, level)`` for everything the CA signed, level ``ok``,
    ``warn`` (within ``warn``) or ``expired``."""
    out = []
    for what, exp in sorted(ca.expiries().items(), key=lambda kv: kv[1]):
        ahead = warn
        if what == "crl":
            # the CRL lives 30 days and the daily timer re-signs it at half; it is worth a
            # warning only once it is past that point by a margin (the timer is not running),
            # else `ca status` would warn about a healthy CRL every day
            last = ca.crl_last_update()
            if last is not None:
                ahead = min(warn, (exp - last) / 3)
        level = "expired" if exp <= now else "warn" if exp - now <= ahead else "ok"
        out.append((what, exp, level))
    return out


def _ca_status(args: argparse.Namespace) -> int:
    """Exit 0 all fine, 1 something expires within --warn-days, 2 something has expired."""
    ca = FleetCA(args.dir)
    now = datetime.now(timezone.utc)
    rows = ca_warnings(ca, now, timedelta(days=args.warn_days))
    for what, exp, level in rows:
        left = exp - now
        print(f"{level.upper():<8} {what:<28} {exp:%Y-%m-%d %H:%M}  ({left.days} d left)")
    if args.textfile is not None:
        from cloud_sync.expiry import write_textfile

        write_textfile(args.textfile, [("ca", what, exp, lv) for what, exp, lv in rows])
    levels = {lv for _, _, lv in rows}
    return 2 if "expired" in levels else 1 if "warn" in levels else 0


def _renew(args: argparse.Namespace) -> int:
    ca = FleetCA(args.ca)
    creds = ca.renew(args.device_id, args.out / args.device_id)
    print(
        f"{args.device_id}: new certificate {creds.cert} (key {creds.key}); the old one is "
        f"revoked ({ca.crl_file} rewritten: reload the broker); install the pair on the "
        "device as its [broker] cert_file/key_file and restart the agent"
    )
    return 0


def _ca_broker_config(args: argparse.Namespace) -> int:
    ca = FleetCA(args.dir)
    services = [(r.name, r.role) for r in ca.issued() if r.role != "device" and not r.revoked_at]
    args.out.mkdir(parents=True, exist_ok=True)
    acl = args.out / "edgefleet.acl"
    atomic_write_bytes(acl, render_acl(args.topic_root, services).encode())
    server = args.dir / "server"
    conf = render_mosquitto_conf(
        port=args.port, host=args.bind, ca=str(ca.ca_file.resolve()),
        cert=str((server / "server.crt").resolve()), key=str((server / "server.key").resolve()),
        crl=str(ca.crl_file.resolve()), acl=str(acl.resolve()),
    )  # fmt: skip
    atomic_write_bytes(args.out / "edgefleet.conf", conf.encode())
    if not (server / "server.crt").is_file():
        print("note: no broker certificate yet; run `edgefleet ca server --host …`",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {acl} ({len(services)} service identities) and {args.out / 'edgefleet.conf'}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    bundle = enroll_device(
        FleetCA(args.ca), args.device_id, args.out, broker_url=args.broker, root_json=args.root,
        tags=parse_pairs(args.tag, "--tag", str), groups=args.group, conf_dir=args.conf_dir,
    )  # fmt: skip
    print(f"enrolled {args.device_id}: copy {bundle}/ to {args.conf_dir}/ on the device, then "
          f"`edgefleet-agent run --config {args.conf_dir}/agent.toml`")  # fmt: skip
    return 0
