#!/bin/sh
# Builds a base image from Debian's packages alone, for a Docker host that reaches a
# Debian mirror but no image registry: a minimal bookworm (Python 3.11, venv, CA
# certificates) bootstrapped with debootstrap and imported as TAG. Run as root; about 3
# minutes. The worker's image takes it as its base:
#   deploy/base-image.sh                     # attnlstm-base:bookworm
#   docker build --build-arg BASE=attnlstm-base:bookworm -f deploy/Dockerfile .
# An image already tagged TAG is kept (REBUILD=1 bootstraps it again).
# DEBIAN_MIRROR picks the mirror (default: the first of this host's apt sources).
set -eu

tag=${1:-attnlstm-base:bookworm}
if [ -z "${REBUILD:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base-image: $tag is there (REBUILD=1 to bootstrap it again)"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "base-image: needs debootstrap (apt-get install debootstrap)" >&2
    exit 1
}
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d)
trap 'rm -rf "$root" "$root.tar"' EXIT
echo "base-image: bootstrapping Debian bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# What an image needs no copy of: downloaded packages, package lists, documentation.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
# Nor of this host's resolver and name, which debootstrap copies in: Docker gives each
# container its own.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
# Through a file, not a pipe: sh has no pipefail, and a tar that failed made an image.
tar -C "$root" -cf "$root.tar" .
docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$root.tar" "$tag" >/dev/null
echo "base-image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
