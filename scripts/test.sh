#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting, lints and
# runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set -o pipefail
cargo test --workspace --locked 2>&1 | tee "$log"

# One closing line with the totals over every test binary (cargo prints one
# "test result" line per binary, the last being the doc tests').
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     /^[a-z_]+: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 } END {
    printf "tests: %d passed, %d failed, %d skipped\n", p, f, i
    if (p == 0) { print "no test ran" > "/dev/stderr"; exit 1 }
}' "$log"
