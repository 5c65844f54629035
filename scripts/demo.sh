#!/usr/bin/env bash
# The main job: on a bare Debian 12 machine (as root), install what is
# missing, build in release mode, and run a short side-by-side comparison:
# clustergate (control daemon + AF_XDP gateway on a generated manifest) with
# each return path, snat (the default), routed and dsr, against the kernel's
# nftables DNAT with kube-proxy's masquerade (the snat baseline) and without
# (the routed and dsr baseline), and the AF_XDP bounce ceiling, on a network
# of namespaces it builds and removes itself. Every frame is checked at the
# backends for its return path. About two minutes of traffic (six
# dataplanes × 3 × 5 s); prints the table with each return path's ratios to
# its kernel baseline and to bounce, and writes bench-results/ (results.md,
# results.json, chart.svg, logs/).
#
# Flags after the script name go to `clustergate-bench compare`, e.g.
#   ./scripts/demo.sh --services 1000 --dataplanes clustergate-snat,kernel-masq
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

echo "== [3/3] clustergate snat / routed / dsr vs kernel nftables (DNAT + masquerade, DNAT) vs AF_XDP bounce (about two minutes)" >&2
exec ./target/release/clustergate-bench compare \
    --services 100 --flows 1000 --backends 4 \
    --reps 3 --duration-s 5 --out bench-results "$@"
