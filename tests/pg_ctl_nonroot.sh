#!/bin/sh
# pg_ctl for the PostgreSQL that tests/store_fixtures.py starts with pytest-postgresql.
# PostgreSQL refuses to run as root, and CI containers run the tests as root: as root,
# this runs the real pg_ctl as the `postgres` system user (the Debian `postgresql`
# package creates it; the fixture hands it the data directory). As anyone else it is
# plain pg_ctl. SAP_PG_CTL names the real one; default: the newest
# /usr/lib/postgresql/*/bin/pg_ctl.
set -eu
real="${SAP_PG_CTL:-$(ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1)}"
[ -n "$real" ] || { echo "pg_ctl not found: apt-get install postgresql, or set SAP_PG_CTL" >&2; exit 127; }
[ "$(id -u)" -eq 0 ] || exec "$real" "$@"
cd /
exec runuser -u postgres -- "$real" "$@"
