#!/usr/bin/env bash
# Make a Debian Python base image without Docker Hub: debootstrap a minimal
# Debian from an apt mirror, add this host's extra CA certificates, and
# `docker import` it. docker/Dockerfile and docker/Dockerfile.cuda build on it:
#
#   scripts/make_base_image.sh                      # -> local/debian-python:bookworm
#   make docker BASE=local/debian-python:bookworm
#
# Used by the container tests (tests/docker_fixtures.py) and by air-gapped
# users whose only reachable archive is a Debian mirror. Needs root,
# debootstrap and a running dockerd. An existing image of that tag is kept
# (a cache: the tests call this on every run); --force rebuilds it.
#
# Why each piece:
# - python3, python3-venv, python-is-python3: what python:3.11-slim-bookworm
#   offers the Dockerfiles (`python -m venv`, `python` on PATH); bookworm's
#   python3 is 3.11 too.
# - ca-certificates plus every *.crt in /usr/local/share/ca-certificates: a
#   host behind a TLS-inspecting proxy or an internal package index trusts
#   those; the build's `pip install` must too. /etc/pip.conf points pip at the
#   system bundle (pip otherwise uses its own certifi copy).
# - The apt sources of the image are this host's mirror, so `apt-get install`
#   in a Dockerfile reaches what the host reaches.
#
# Environment: BASE_SUITE (bookworm), BASE_MIRROR (the host's first Debian
# mirror, else http://deb.debian.org/debian), DOCKER (docker).
set -euo pipefail

usage() { echo "usage: $0 [--force] [TAG]   (default TAG local/debian-python:\${BASE_SUITE:-bookworm})" >&2; exit 2; }
force=0
tag=""
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [ -z "$tag" ] || usage; tag="$arg" ;;
  esac
done
suite="${BASE_SUITE:-bookworm}"
tag="${tag:-local/debian-python:$suite}"
docker="${DOCKER:-docker}"

if [ "$force" = 0 ] && "$docker" image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists (--force rebuilds it)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "$0: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "$0: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

host_mirror() {
  # deb822 (URIs:) or one-line (deb URL suite ...) sources; the first Debian archive that is not security
  grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
    | grep -v security | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
    | awk '{print $1}' | grep -m1 -E '^https?://' || true
}
mirror="${BASE_MIRROR:-$(host_mirror)}"
mirror="${mirror:-http://deb.debian.org/debian}"

root="$(mktemp -d /tmp/debian-python-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
start=$SECONDS
echo "debootstrap $suite from $mirror ..."
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
EOF
# the host's extra CAs (those update-ca-certificates adds), then pip on the system bundle
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" update-ca-certificates >/dev/null 2>&1
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
# images stay small and apt in a Dockerfile starts from `apt-get update`, as on Docker Hub's images
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
mkdir -p "$root/var/lib/apt/lists/partial"

tar --numeric-owner -C "$root" -c . | "$docker" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $suite from $mirror (scripts/make_base_image.sh)" \
  - "$tag" >/dev/null
echo "base image $tag made in $((SECONDS - start)) s ($("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MiB", $1/1048576}'))"
