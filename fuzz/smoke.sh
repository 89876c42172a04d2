#!/usr/bin/env bash
# A bounded run of every fuzz target (FUZZ_SECONDS each, default 20) from its committed
# corpus, on a copy (new inputs stay out of the tree). cargo-fuzz (installed from crates.io)
# builds with libFuzzer's instrumentation and AddressSanitizer, whose -Z flags the project's
# stable toolchain accepts with RUSTC_BOOTSTRAP=1 (its rust-std ships the sanitizer runtime):
# no nightly toolchain is needed. Prints executions per target; non-zero when a target
# crashes, leaks or hangs.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "fuzz/smoke.sh: $*" >&2; exit 1; }

command -v g++ >/dev/null || die "g++ is needed to build libFuzzer (apt-get install g++)"
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2 \
    || die "cargo install cargo-fuzz failed"
export RUSTC_BOOTSTRAP=1

seconds=${FUZZ_SECONDS:-20}
cargo fuzz build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo fuzz list); do
    cp -r "corpus/$target" "$work/$target"
    log="$work/$target.log"
    if ! cargo fuzz run "$target" "$work/$target" -- -max_total_time="$seconds" -timeout=5 >"$log" 2>&1; then
        tail -n 40 "$log"
        die "$target failed (reproducer above; the crash input is under fuzz/artifacts/$target)"
    fi
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log")
    echo "fuzz $target: $runs executions in ${seconds}s, no crash ($(ls "$work/$target" | wc -l) inputs in the corpus)"
done
