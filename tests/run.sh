#!/usr/bin/env bash
# The project's test command: installs what the tests need, checks formatting and lints, runs
# the unit and integration tests, then the VM end-to-end suite. Non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== dependencies (tests/vm/deps.sh)"
tests/vm/deps.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test --workspace"
cargo test --workspace --locked

# The README's first command must resolve to the target binary.
cargo run --locked --quiet -- check-config deploy/default.toml

# The VM scenarios are the ignored tests; one VM at a time (each uses both cores under TCG).
echo "== VM end-to-end suite"
cargo test --workspace --locked -- --ignored --test-threads=1
