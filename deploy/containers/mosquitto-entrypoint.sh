#!/bin/bash
# Runs the broker config `edgefleet ca broker-config` generated, unchanged but for where its
# files are: each cafile/certfile/keyfile/crlfile/acl_file is looked up by its name in
# /etc/mosquitto/edgefleet (the mounted folder), so the generated file works as it is.
#   edgefleet-mosquitto          run Mosquitto in the foreground
#   edgefleet-mosquitto health   exit 0 when the TLS listener accepts connections
set -euo pipefail
DIR=/etc/mosquitto/edgefleet
CONF=/tmp/mosquitto.conf
if [ "${1:-run}" = health ]; then
  port=$(awk '$1 == "listener" { print $2; exit }' "$CONF")
  exec 3<>"/dev/tcp/127.0.0.1/$port"  # fails (set -e: exit 1) while nothing listens there
  exit 0
fi
for f in edgefleet.conf edgefleet.acl ca.crt crl.pem server.crt server.key; do
  [ -r "$DIR/$f" ] || { echo "edgefleet-mosquitto: $DIR/$f missing or unreadable by uid $(id -u)" >&2; exit 66; }
done
{
  echo "persistence true"
  echo "persistence_location /var/lib/mosquitto/"
  echo "log_dest stderr"
  echo "log_type error"
  echo "log_type warning"
  echo "log_type notice"
  awk -v dir="$DIR" '
    $1 ~ /^(acl_file|cafile|certfile|keyfile|crlfile)$/ { n = split($2, p, "/"); $2 = dir "/" p[n] }
    { print }' "$DIR/edgefleet.conf"
} > "$CONF"
exec mosquitto -c "$CONF"
