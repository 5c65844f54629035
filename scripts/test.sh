#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting, lints and
# runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# CI builds once from a clean clone: incremental caches would only fill its disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

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

# Fuzzing (docs/fuzzing.md): in CI (CI=true) every target for FUZZ_SECONDS
# (at least 60) from the committed corpora; elsewhere only when FUZZ_SECONDS
# is set.
if [ "${CI:-}" = true ] || [ -n "${FUZZ_SECONDS:-}" ]; then
    fuzz_seconds=${FUZZ_SECONDS:-60}
    if [ "${CI:-}" = true ] && [ "$fuzz_seconds" -lt 60 ]; then fuzz_seconds=60; fi
    # CI builds the targets unoptimised (FUZZ_DEV=1): a clean build of every
    # dependency with coverage instrumentation takes minutes, not half an hour.
    fuzz_dev=${FUZZ_DEV:-$([ "${CI:-}" = true ] && echo 1 || echo 0)}
    # CI's disk holds one build at a time: the tests' build is done with.
    if [ "${CI:-}" = true ]; then
        echo "== disk before the fuzz build: $(df -h --output=avail . | tail -1) free; removing the tests' build" >&2
        cargo clean
    fi
    echo "== fuzz: scripts/fuzz.sh, ${fuzz_seconds}s per target (FUZZ_DEV=$fuzz_dev)" >&2
    FUZZ_SECONDS=$fuzz_seconds FUZZ_DEV=$fuzz_dev ./scripts/fuzz.sh
else
    echo "fuzzing not run (CI is not true, FUZZ_SECONDS unset): run scripts/fuzz.sh, or FUZZ_SECONDS=60 scripts/test.sh" >&2
fi
