"""Pure: the broker's access rules for a fleet — Mosquitto ACL and TLS listener config text.

With ``use_identity_as_username`` the certificate CN is the MQTT username. Devices get
``pattern`` rules, so each may publish only its own state, reported state, telemetry, events,
snapshots, chunk requests (to any registry replica: ``fetch/req/+``) and answers to clip
requests (``clips/resp``), and read only its own desired state, chunk answers, commands and
clip requests: no device can write any desired state or read another device's data or clips.
Services get exactly the topics their job needs (``svc:ingest`` reads what devices send;
``svc:registry`` answers chunk requests; operators ``op:NAME`` write desired state, read
device state, ask devices for event clips and command uploads, and send signed commands on
``cmd`` and read their results on ``cmd/result``).

What the ACL cannot do, and how the config covers it (Mosquitto 2.0.x; deploy/mosquitto/README.md):

- Mosquitto 2.0's ``acl_file`` never checks a SUBSCRIBE (``security_default.c`` allows every
  subscription, "FIXME - implement ACL subscription strings"); it checks each message as it is
  delivered. A device that joins a service's shared subscription is dealt its share of every
  device's messages, and the read check then drops them. So shared-subscription groups are
  per-deployment secrets (``FleetCA.share_group``), handed to services with their identity,
  never to devices. The ``$share/+/…`` lines below grant nothing on 2.0 (reads are checked on
  the message's own topic); they document intent for brokers that check subscriptions.
- ``use_username_as_clientid``: the broker replaces every client id with the certificate CN,
  so no device can take a service's client id and log it off. One identity, one connection:
  each ingest worker, registry replica or concurrent operator tool needs its own identity.
- ``max_packet_size`` and ``max_queued_bytes`` bound what one client can make the broker hold.
"""

from __future__ import annotations

from collections.abc import Iterable

DEVICE_WRITES = (
    "state", "reported", "telemetry", "events", "snapshots", "fetch/req", "fetch/req/+",
    "cmd/result", "clips/resp",
)  # fmt: skip
DEVICE_READS = ("desired", "fetch/resp", "cmd", "clips/req")
INGEST_READS = ("state", "reported", "telemetry", "events", "snapshots")
SHARED_KINDS = ("telemetry", "events", "snapshots", "fetch/req")

# The largest honest message is a snapshot: agent.protocol.telemetry.Snapshot.max_bytes is
# 2,800,300 bytes (2 MiB of JPEG in base64 plus its fields); a chunk answer is at most 266,244
# (agent.protocol.fetch: 4 + MAX_HEADER + MAX_CHUNK). 4 MiB holds a snapshot, its topic and the
# MQTT header with room to spare; Mosquitto disconnects a client that sends a bigger packet.
MAX_PACKET_SIZE = 4 << 20
# Per client, QoS 1 messages queued beyond those in flight. 100,000 lets an ingest worker catch
# up after an outage (telemetry is ~1 kB: ~100 MB); 256 MiB holds that and a device's largest
# transfer window (64 x 256 KiB answers) and stops one client from queueing gigabytes.
MAX_QUEUED_MESSAGES = 100_000
MAX_QUEUED_BYTES = 256 << 20


def _shared(root: str, kind: str) -> str:
    return f"$share/+/{root}/devices/+/{kind}"


def _service_rules(root: str, name: str, role: str) -> list[str]:
    dev = f"{root}/devices/+"
    lines = [f"user {name}"]
    if role == "ingest":
        for k in INGEST_READS:
            lines.append(f"topic read {dev}/{k}")
            if k in SHARED_KINDS:
                lines.append(f"topic read {_shared(root, k)}")
    elif role == "registry":
        lines += [f"topic read {dev}/fetch/req", f"topic read {_shared(root, 'fetch/req')}",
                  f"topic read {dev}/fetch/req/+",  # a replica's own topic (sticky transfers)
                  f"topic write {dev}/fetch/resp"]  # fmt: skip
    elif role == "operator":
        lines += [f"topic readwrite {dev}/desired", f"topic read {dev}/state",
                  f"topic read {dev}/reported", f"topic readwrite {root}/operators/#",
                  # event clips and command uploads: ask a device for windows, read its answers
                  f"topic write {dev}/clips/req", f"topic read {dev}/clips/resp",
                  # signed commands (agent.protocol.command) and their results
                  f"topic write {dev}/cmd", f"topic read {dev}/cmd/result"]  # fmt: skip
    else:
        raise ValueError(f"no broker rules for role {role!r}")
    return lines


def render_acl(root: str, services: Iterable[tuple[str, str]]) -> str:
    """The ACL file: device patterns, then one block per ``(name, role)`` service identity."""
    out = [
        "# edgefleet broker ACL (from `edgefleet ca broker-config`; regenerate, do not edit)",
        "# devices: the certificate CN is the device id (use_identity_as_username true)",
        "# Mosquitto 2.0 does not check SUBSCRIBE against this file, $share/ lines included:",
        "# services join shared subscriptions under secret per-deployment group names",
    ]
    out += [f"pattern write {root}/devices/%u/{k}" for k in DEVICE_WRITES]
    out += [f"pattern read {root}/devices/%u/{k}" for k in DEVICE_READS]
    for name, role in sorted(services):
        out += ["", *_service_rules(root, name, role)]
    return "\n".join(out) + "\n"


def render_mosquitto_conf(
    *, port: int, host: str, ca: str, cert: str, key: str, crl: str, acl: str
) -> str:
    """A Mosquitto 2 TLS listener requiring client certificates, with the ACL, CRL and limits."""
    return "\n".join([
        "# edgefleet broker (generated by `edgefleet ca broker-config`)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl}",
        "# the largest honest message is a 2.8 MB snapshot; a bigger packet disconnects its sender",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "# per client: deep enough for an ingest worker catching up, bounded in bytes too",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"listener {port} {host}",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        f"crlfile {crl}",
        "require_certificate true",
        "use_identity_as_username true",
        "# the client id is the certificate CN: nobody can take another identity's id",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        # see cloud_sync/localbroker.py: no delayed ACK behind each burst of chunk answers
        "set_tcp_nodelay true",
    ]) + "\n"  # fmt: skip
