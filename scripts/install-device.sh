#!/usr/bin/env bash
# Install (or remove) the edgefleet agent on a Debian/Ubuntu or JetPack device. Idempotent.
#
#   sudo scripts/install-device.sh                    # install from this checkout, enable the unit
#   sudo scripts/install-device.sh --bundle DIR       # also copy an enrollment bundle to /etc/edgefleet
#   sudo scripts/install-device.sh --uninstall        # remove venv and unit; keep config and data
#   sudo scripts/install-device.sh --uninstall --purge   # ... and config, data and the user
#   scripts/install-device.sh --root /tmp/r --no-user --no-systemctl   # into a staging root
#
# On a Jetson (/etc/nv_tegra_release) the venv sees the system's site-packages, so JetPack's
# TensorRT, pycuda and GStreamer-enabled OpenCV are used; the PyPI OpenCV wheel that pip pulls
# in as a dependency is removed again so it cannot shadow the system one.
set -euo pipefail

ROOT=/
SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUNDLE=""
UNINSTALL=0
PURGE=0
MAKE_USER=1
SYSTEMCTL=1
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="$2"; shift 2 ;;
    --source) SRC="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --no-user) MAKE_USER=0; shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install-device: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT="${ROOT%/}"
OPT="$ROOT/opt/edgefleet"
ETC="$ROOT/etc/edgefleet"
DATA="$ROOT/var/lib/edgefleet"
UNIT="$ROOT/etc/systemd/system/edgefleet-agent.service"
say() { echo "==> $*"; }
# systemctl only on the live system, and only where systemd runs
live_systemd() { [ "$SYSTEMCTL" -eq 1 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" -eq 1 ]; then
  if live_systemd; then
    systemctl disable --now edgefleet-agent.service 2>/dev/null || true
  fi
  rm -f "$UNIT"
  rm -rf "$OPT"
  if live_systemd; then systemctl daemon-reload; fi
  if [ "$PURGE" -eq 1 ]; then
    rm -rf "$ETC" "$DATA"
    if [ "$MAKE_USER" -eq 1 ] && id edgefleet >/dev/null 2>&1; then userdel edgefleet; fi
    say "removed edgefleet, its config, data and user"
  else
    say "removed the agent; config in $ETC/ and data in $DATA/ kept (--purge removes them)"
  fi
  exit 0
fi

JETSON=0
[ -f "$ROOT/etc/nv_tegra_release" ] || [ -f /etc/nv_tegra_release ] && JETSON=1

if [ "$MAKE_USER" -eq 1 ] && ! id edgefleet >/dev/null 2>&1; then
  say "creating the system user edgefleet (groups video, render)"
  groups=()
  for g in video render; do getent group "$g" >/dev/null && groups+=("$g"); done
  useradd --system --no-create-home --home-dir /var/lib/edgefleet --shell /usr/sbin/nologin \
    ${groups:+--groups "$(IFS=,; echo "${groups[*]}")"} edgefleet
fi

mkdir -p "$OPT" "$ETC" "$DATA" "$(dirname "$UNIT")"
chmod 0750 "$DATA"
if [ "$MAKE_USER" -eq 1 ]; then chown edgefleet:edgefleet "$DATA"; fi

if [ ! -x "$OPT/venv/bin/python" ]; then
  if [ "$JETSON" -eq 1 ]; then
    say "Jetson: venv with the system's site-packages (JetPack TensorRT, pycuda, OpenCV)"
    "$PYTHON" -m venv --system-site-packages "$OPT/venv"
  else
    say "creating $OPT/venv"
    "$PYTHON" -m venv "$OPT/venv"
  fi
fi
say "installing edgefleet from $SRC"
"$OPT/venv/bin/python" -m pip install -q --upgrade pip
"$OPT/venv/bin/python" -m pip install -q --upgrade "$SRC"
if [ "$JETSON" -eq 1 ]; then
  # pip pulled the PyPI OpenCV (no GStreamer, no CSI cameras) in as a dependency: drop it so
  # JetPack's python3-opencv is the one imported
  "$OPT/venv/bin/python" -m pip uninstall -q -y opencv-python-headless opencv-python 2>/dev/null || true
fi

if [ -n "$BUNDLE" ]; then
  say "copying the enrollment bundle $BUNDLE to $ETC"
  for f in "$BUNDLE"/*; do
    # a private key is created 0640, never world-readable, not even until a later chmod
    case "$f" in *.key) mode=0640 ;; *) mode=0644 ;; esac
    install -m "$mode" "$f" "$ETC/$(basename "$f")"
  done
fi
if [ ! -f "$ETC/agent.toml" ]; then
  say "writing a config skeleton $ETC/agent.toml (edit it: device_id, pipelines, broker)"
  cat > "$ETC/agent.toml" <<EOF
# edgefleet-agent configuration; every key: $SRC/docs/agent.example.toml
device_id = "$(hostname -s 2>/dev/null || echo device-01)"
data_dir = "/var/lib/edgefleet"
profile = "auto"

[[pipelines]]
name = "front"
source = 0                          # /dev/video0; or an rtsp:// URL
model = "demo"                      # a registry model name (delivered) or a local .onnx path
EOF
else
  say "keeping the existing $ETC/agent.toml"
fi
if [ "$MAKE_USER" -eq 1 ]; then
  chgrp -R edgefleet "$ETC"
  chmod 0750 "$ETC"
fi

install -m 0644 "$SRC/systemd/edgefleet-agent.service" "$UNIT"
if live_systemd; then
  systemctl daemon-reload
  systemctl enable edgefleet-agent.service
  say "enabled edgefleet-agent.service: edit $ETC/agent.toml, then systemctl start edgefleet-agent"
else
  say "installed into ${ROOT:-/} (systemctl not run)"
fi
"$OPT/venv/bin/edgefleet-agent" --version >/dev/null
say "done: $("$OPT/venv/bin/edgefleet-agent" --version)"
