#!/usr/bin/env bash
# The main job. Until the benchmark harness lands it runs the pure packet core
# on a built-in example: two worker threads, a table swap, a reject.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

echo "== building (release)" >&2
cargo build --release --locked --bin clustergate --bin clustergate-bench
echo "== clustergate demo" >&2
./target/release/clustergate demo --flows 100000 --workers 2
echo "== clustergate-bench pipeline (in-process, no network)" >&2
./target/release/clustergate-bench pipeline --flows 100000 --runs 5
