#!/usr/bin/env bash
# The main job: on a bare Debian 12 machine (as root), install what is
# missing, build in release mode, and run a short side-by-side comparison:
# clustergate (control daemon + AF_XDP gateway on a generated manifest)
# against the kernel's nftables DNAT and the AF_XDP bounce ceiling, on a
# network of namespaces it builds and removes itself. About a minute of
# traffic; prints the table and writes bench-results/ (results.md,
# results.json, chart.svg, logs/).
#
# Flags after the script name go to `clustergate-bench compare`, e.g.
#   ./scripts/demo.sh --services 1000 --flows 1000000
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh needs root (network namespaces, XDP, AF_XDP); run it with sudo" >&2
    exit 1
fi

echo "== [1/3] installing missing Debian packages" >&2
./scripts/install-deps.sh

echo "== [2/3] building (release)" >&2
cargo build --release --locked --bins

echo "== [3/3] clustergate vs kernel nftables DNAT vs AF_XDP bounce (about a minute)" >&2
exec ./target/release/clustergate-bench compare \
    --services 100 --flows 1000 --backends 4 \
    --reps 3 --duration-s 5 --out bench-results "$@"
