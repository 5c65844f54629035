#!/usr/bin/env bash
# Installs the Debian packages clustergate builds and runs with. Idempotent:
# nothing is fetched when everything is already there.
set -euo pipefail

# libpcap-dev: libxdp-sys (under xsk-rs) builds xdp-tools, whose configure requires it.
# prometheus: its promtool checks control's and the gateway's /metrics in tests.
packages=(clang llvm libelf-dev zlib1g-dev m4 pkg-config iproute2 nftables ethtool libpcap-dev prometheus)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "install-deps: cargo is not on PATH; install Rust first" >&2; exit 1; }
# The gateway's end-to-end tests drive real clients and servers written in Python.
command -v python3 >/dev/null || { echo "install-deps: python3 is not on PATH (the end-to-end tests need it)" >&2; exit 1; }
