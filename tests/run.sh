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

# Hostile input: a bounded run of each fuzz target (wire formats, admin commands, config).
echo "== fuzz smoke (fuzz/smoke.sh)"
fuzz/smoke.sh

# The README's first command must resolve to the target binary.
cargo run --locked --quiet -- check-config deploy/default.toml

# The p2pmem scenarios boot a guest kernel with CONFIG_PCI_P2PDMA, built from Debian's source on
# first need (about 20 minutes on 2 cores, then cached): built here so its time shows apart.
echo "== P2PDMA guest kernel (tests/vm/build-p2pdma-kernel.sh)"
tests/vm/build-p2pdma-kernel.sh

# The VM scenarios are the ignored tests; one VM at a time (each uses both cores under TCG).
echo "== VM end-to-end suite"
cargo test --workspace --locked -- --ignored --test-threads=1
