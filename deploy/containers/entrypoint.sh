#!/bin/sh
# edgefleet container entry point: one service per image, configured by environment and
# mounted files (TLS identity in /etc/edgefleet/tls, database URL as the credential
# /run/secrets/edgefleet/db-url; see deploy/containers/compose.yaml and docs/containers.md).
#   edgefleet-entrypoint ingest|registry|controller|agent   run the service in the foreground
#   edgefleet-entrypoint health ingest|registry|controller|agent   the image's health check
#   edgefleet-entrypoint edgefleet ARGS… / edgefleet-agent ARGS…    any command of the project
set -eu
need() { eval "v=\${$1:-}"; [ -n "$v" ] || { echo "edgefleet container: set $1 ($2)" >&2; exit 64; }; }

case "${1:-help}" in
  ingest)
    need EDGEFLEET_BROKER "mqtts://host:port of the broker"
    shift
    exec edgefleet ingest --broker "$EDGEFLEET_BROKER" \
      --metrics-port "$EDGEFLEET_METRICS_PORT" --metrics-addr 127.0.0.1 \
      --http "$EDGEFLEET_HTTP_PORT" --http-addr "$EDGEFLEET_HTTP_ADDR" \
      --keep "$EDGEFLEET_KEEP" ${EDGEFLEET_WORKER:+--worker "$EDGEFLEET_WORKER"} "$@" ;;
  registry)
    need EDGEFLEET_BROKER "mqtts://host:port of the broker"
    shift
    exec edgefleet registry serve --repo "$EDGEFLEET_REPO" --keys-dir "$EDGEFLEET_KEYS_DIR" \
      --broker "$EDGEFLEET_BROKER" --replica "$EDGEFLEET_REPLICA" "$@" ;;
  controller)
    need EDGEFLEET_BROKER "mqtts://host:port of the broker"
    shift
    exec edgefleet rollout controller --repo "$EDGEFLEET_REPO" --broker "$EDGEFLEET_BROKER" \
      --every "$EDGEFLEET_EVERY" "$@" ;;
  agent)
    shift
    [ -r "$EDGEFLEET_AGENT_CONFIG" ] || { echo "edgefleet container: $EDGEFLEET_AGENT_CONFIG" \
      "missing or unreadable by uid $(id -u): mount the device's bundle at /etc/edgefleet" >&2; exit 66; }
    if [ -n "${EDGEFLEET_DATA_DIR:-}" ] && [ ! -w "$EDGEFLEET_DATA_DIR" ]; then
      echo "edgefleet container: $EDGEFLEET_DATA_DIR is not writable by uid $(id -u): mount a" \
        "volume there (a new named volume takes the image's owner; chown a bind mount)" >&2
      exit 73
    fi
    exec edgefleet-agent run --config "$EDGEFLEET_AGENT_CONFIG" "$@" ;;
  health)
    case "${2:-}" in
      # the metrics endpoint answers once the worker runs; edgefleet_ingest_store_up says the
      # database is reachable
      ingest) exec python3 -c "
import os, sys, urllib.request
url = 'http://127.0.0.1:%s/metrics' % os.environ['EDGEFLEET_METRICS_PORT']
body = urllib.request.urlopen(url, timeout=4).read().decode()
up = [l for l in body.splitlines() if l.startswith('edgefleet_ingest_store_up')]
sys.exit(0 if up and up[0].split()[-1] in ('1', '1.0') else 1)" ;;
      # exit 2 when a role has expired: the keeper in serve is not re-signing
      registry) rc=0
                edgefleet registry status --repo "$EDGEFLEET_REPO" \
                  --keys-dir "$EDGEFLEET_KEYS_DIR" >/dev/null || rc=$?
                [ "$rc" -lt 2 ] || exit 1; exit 0 ;;
      controller) exec edgefleet rollout status --json >/dev/null ;;
      # status.json is rewritten every 2 s while the supervisor runs: a stale one is a hang
      agent) edgefleet-agent status --json --config "$EDGEFLEET_AGENT_CONFIG" | python3 -c "
import json, sys, time
try:
    age = time.time() - json.load(sys.stdin)['time']
except (ValueError, KeyError, TypeError):
    sys.exit(1)
sys.exit(0 if age < float(sys.argv[1]) else 1)" "${EDGEFLEET_HEALTH_MAX_AGE_S:-30}" ;;
      *) echo "health: ingest|registry|controller|agent" >&2; exit 64 ;;
    esac ;;
  edgefleet|edgefleet-agent|sh|python3) exec "$@" ;;
  help|*) sed -n '2,9p' "$0" >&2; exit 64 ;;
esac
