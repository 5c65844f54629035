#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/, cargo-fuzz) for FUZZ_SECONDS each (default 60),
# one after the other, starting from the committed corpora in fuzz/corpus/.
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh pipeline
#
# Installs cargo-fuzz and the nightly toolchain when missing. Fails (non-zero)
# naming the target and the input that crashed it (kept under fuzz/artifacts/)
# on any crash, timeout or out-of-memory. New inputs go to a temporary
# corpus, so the checkout stays clean; FUZZ_KEEP=1 merges them into
# fuzz/corpus/TARGET (only the inputs that add coverage). docs/fuzzing.md
# describes the targets and the recorded runs.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(parse pipeline snapshot manifest)
seconds=${FUZZ_SECONDS:-60}
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi
for t in "${targets[@]}"; do
    if [[ ! " ${all[*]} " =~ \ $t\  ]]; then
        echo "fuzz: unknown target $t (targets: ${all[*]})" >&2
        exit 2
    fi
done

if ! rustup toolchain list | grep '^nightly' >/dev/null; then
    echo "== installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# No sanitizer: the code under fuzzing is safe Rust (the crates deny
# `unsafe_code` outside the AF_XDP rings and the snapshot mapping, which no
# target reaches), so AddressSanitizer would only slow the runs. Debug
# assertions and overflow checks stay on (cargo-fuzz's default).
fuzz=(cargo +nightly fuzz)
opts=(--sanitizer none)
# FUZZ_DEV=1 (what CI uses): an unoptimised build, several times quicker to
# compile from scratch and slower per input: right for a one-minute check,
# not for the long runs of docs/fuzzing.md.
if [ "${FUZZ_DEV:-0}" = 1 ]; then opts+=(--dev); fi

echo "== cargo fuzz build" >&2
"${fuzz[@]}" build "${opts[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    echo "== fuzz $t: ${seconds}s from fuzz/corpus/$t" >&2
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/corpus/$t" ] && seeds=("fuzz/corpus/$t")
    log="$work/$t.log"
    # The first corpus directory receives new inputs: the temporary one.
    if "${fuzz[@]}" run "${opts[@]}" "$t" "$work/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log" |
            sed "s/^/fuzz $t: /" >&2 || true
    else
        tail -n 40 "$log" >&2
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "fuzz: target $t FAILED: ${crash:-no input written (see above)}" >&2
        # The input itself, for logs that outlive the machine.
        grep -m 1 '^Base64: ' "$log" | sed "s/^/fuzz: $t input /" >&2 || true
        [ -n "$crash" ] &&
            echo "fuzz: reproduce with: cargo +nightly fuzz run ${opts[*]} $t $crash" >&2
        failed+=("$t")
        continue
    fi
    if [ "${FUZZ_KEEP:-0}" = 1 ] && [ -d "fuzz/corpus/$t" ]; then
        "${fuzz[@]}" run "${opts[@]}" "$t" "fuzz/corpus/$t" "$work/$t" -- -merge=1 \
            >"$log.merge" 2>&1 || { tail -n 20 "$log.merge" >&2; failed+=("$t (merge)"); }
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${targets[*]}: ${seconds}s each, no crash" >&2
