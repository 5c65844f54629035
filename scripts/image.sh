#!/usr/bin/env bash
# Builds the release binaries and the image (Containerfile), then runs
# `clustergate --version` in it and checks that it names this commit.
#
#   scripts/image.sh [TAG]          (default clustergate:VERSION, as
#                                    deploy/daemonset.yaml names it)
#
# Needs podman (Debian's `podman`) and the base image (pulled from
# docker.io, or BASE=... naming a local one). Where podman cannot build or
# run containers it says why and exits 0 with SKIP, unless REQUIRE_IMAGE=1:
# CI machines without podman are not failed by it.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
tag=${1:-clustergate:$version}
base=${BASE:-docker.io/library/debian:bookworm-slim}

skip() {
    echo "image: SKIP: $*" >&2
    if [ "${REQUIRE_IMAGE:-0}" = 1 ]; then exit 1; fi
    exit 0
}

command -v podman >/dev/null || skip "podman is not installed (apt-get install podman)"
podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -1)"
if ! podman image exists "$base"; then
    podman pull "$base" >/dev/null 2>&1 || skip "cannot pull $base (no registry access?); give BASE=a local Debian image"
fi

cargo build --release --bin clustergate --bin clustergate-control
# chroot isolation: RUN steps need no OCI runtime (or cgroups) that way.
podman build --isolation chroot --build-arg "BASE=$base" -f Containerfile -t "$tag" .

# In the image: with podman run where the OCI runtime works; else (some VMs
# and sandboxes refuse crun its cgroups or rlimits) the image's own root
# file system, mounted, under chroot: the same binary and libraries.
in_image() {
    if podman run --rm "$tag" "$@" 2>/tmp/image-run.err; then
        return 0
    fi
    echo "image: podman run failed ($(tail -1 /tmp/image-run.err)); running in the mounted image under chroot" >&2
    [ "$(id -u)" -eq 0 ] || skip "podman run fails here and chroot needs root"
    local mnt
    mnt=$(podman image mount "$tag")
    local rc=0
    chroot --userspec=65532:65532 "$mnt" "$@" || rc=$?
    podman image unmount "$tag" >/dev/null
    return $rc
}

shown=$(in_image clustergate --version)
echo "$shown"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
grep -q "^commit: $commit" <<<"$shown" || { echo "image: --version does not name commit $commit" >&2; exit 1; }
grep -q "^snapshot ABI: " <<<"$shown"
in_image clustergate-control --version
echo "image: $tag built; clustergate --version runs in it"
