#!/bin/sh
# Makes the cluster on first start (user EDGEFLEET_DB_USER with the password in
# /run/secrets/edgefleet/pg-password, database EDGEFLEET_DB_NAME, password logins only over
# TCP), then runs PostgreSQL in the foreground on EDGEFLEET_DB_ADDR:PGPORT.
#   edgefleet-postgres          run
#   edgefleet-postgres health   exit 0 when the server accepts connections
set -eu
if [ "${1:-run}" = health ]; then
  exec pg_isready -q -h "$EDGEFLEET_DB_ADDR" -p "$PGPORT" -d "$EDGEFLEET_DB_NAME"
fi
PW=/run/secrets/edgefleet/pg-password
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -r "$PW" ] || { echo "edgefleet-postgres: $PW missing or unreadable by uid $(id -u)" >&2; exit 66; }
  initdb -D "$PGDATA" -U "$EDGEFLEET_DB_USER" --pwfile="$PW" --auth-host=scram-sha-256 \
    --auth-local=peer -E UTF8 --locale=C.UTF-8 >/dev/null
  echo "CREATE DATABASE \"$EDGEFLEET_DB_NAME\" OWNER \"$EDGEFLEET_DB_USER\";" |
    postgres --single -D "$PGDATA" postgres >/dev/null
  echo "edgefleet-postgres: cluster made in $PGDATA, database $EDGEFLEET_DB_NAME" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses="$EDGEFLEET_DB_ADDR" -c port="$PGPORT" \
  -c unix_socket_directories=/tmp
