#!/usr/bin/env bash
# The project's test command: installs what the tests need, checks formatting and lints, runs
# the unit and integration tests, then the VM end-to-end suite. Non-zero on any failure.
#
#   tests/run.sh          CI: every VM scenario but the p2pmem one (its guest kernel takes
#                         17 min to build on a fresh machine), repetitions at their CI sizes
#                         and blktests' CI selection
#   tests/run.sh --full   everything: builds the P2PDMA guest kernel, runs the p2pmem scenario,
#                         blktests' whole group, and the repetitions at their full sizes
set -euo pipefail
cd "$(dirname "$0")/.."

full=false
case "${1:-}" in
    "") ;;
    --full) full=true ;;
    *) echo "usage: tests/run.sh [--full]" >&2; exit 2 ;;
esac

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

# The VM scenarios are the ignored tests; one VM at a time (each uses both cores under TCG).
if $full; then
    # The p2pmem scenario boots a guest kernel with CONFIG_PCI_P2PDMA, built from Debian's source
    # on first need (11 to 17 min on 2 cores, then cached): built here so its time shows apart.
    echo "== P2PDMA guest kernel (tests/vm/build-p2pdma-kernel.sh)"
    tests/vm/build-p2pdma-kernel.sh
    echo "== VM end-to-end suite (full)"
    BT_ALL=1 HA_RUNS=3 RDMA_CYCLES=500 \
        cargo test --workspace --locked -- --ignored --test-threads=1
else
    echo "== VM end-to-end suite (CI; tests/run.sh --full for all of it)"
    cargo test --workspace --locked -- --ignored --test-threads=1 \
        --skip vm_p2pmem_ssds_dma_through_the_cmb_with_the_kernel_driver
fi
