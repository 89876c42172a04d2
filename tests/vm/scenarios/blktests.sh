# blktests' nvme group (the Linux NVMe maintainers' own suite) against p2pnvmf: blktests drives
# the target through tests/blktests/nvme-target-control (NVME_TARGET_CONTROL), once per
# transport in $BT_TRTYPES, with $BT_BACKEND behind each subsystem's namespace. Every test's
# outcome goes to /tmp/scn/blktests-summary.tsv (trtype, test, status, detail); the Rust side
# compares it with the outcomes it expects. The scenario fails only when blktests could not run.

BT=/tmp/blktests
step "unpack blktests ($(basename "$BLKTESTS_TAR")) and give it what it needs"
mkdir -p /tmp/bt-src && tar xzf "$BLKTESTS_TAR" -C /tmp/bt-src && mv /tmp/bt-src/blktests "$BT"
# The guest's modules live under /tmp/rig; udevd does not run in the guest (devtmpfs makes the
# nodes), and the chroot's udevadm would print "Running in chroot, ignoring request." into
# test output.
# blktests' _have_kver cannot read Debian's release "6.12.118+deb12-amd64" (common/rc: "value
# too great for base") and then drops the test (047, 046) without a word: it is shown the
# release without "+deb12".
mkdir -p /tmp/bt-bin
printf '#!/bin/sh\nexec /sbin/modprobe -d /tmp/rig "$@"\n' > /tmp/bt-bin/modprobe
printf '#!/bin/sh\nexit 0\n' > /tmp/bt-bin/udevadm
printf '#!/bin/sh\n/bin/uname "$@" | sed "s/+deb[0-9]*//"\n' > /tmp/bt-bin/uname
chmod +x /tmp/bt-bin/*
export PATH=/tmp/bt-bin:$PATH
# The kernel's configuration where blktests looks for it; a writable /mnt for the xfs tests.
mount -t tmpfs tmpfs /boot && cp "/tmp/rig/lib/modules/$(/bin/uname -r)/config" "/boot/config-$(uname -r)"
mount -t tmpfs tmpfs /mnt
# Loaded before blktests so its per-test unloading leaves them (and the host's state) alone.
for m in loop nvmet nvmet_tcp nvmet_rdma nvme_fabrics; do modprobe "$m" || die "modprobe $m"; done
[[ -e /dev/loop-control ]] || die "no loop devices"

nvme_pci=
if [[ $BT_BACKEND == nvme-vfio ]]; then
    nvme_pci=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
    [[ -n $nvme_pci ]] || die "no NVMe function for the nvme-vfio backend"
    modprobe vfio_iommu_type1 && modprobe vfio_pci || die "vfio modules"
fi

# summarize TRTYPE RUN: one summary line per test of blktests-RUN.log — the status line, then
# its indented detail lines (skip reasons, the diff of a failed test's output) folded into one
# field — and the failed tests' full output kept in the run directory.
summarize() {
    awk -v tr="$1" '
        function flush() { if (name != "") printf "%s\t%s\t%s\t%s\n", tr, name, status, detail; name = "" }
        /^nvme\/[0-9]+ / && /\[(passed|failed|not run)\] *$/ {
            flush(); name = $1; status = $0; sub(/.*\[/, "", status); sub(/\].*/, "", status); detail = ""; next
        }
        /^    / && name != "" { line = $0; sub(/^ +/, "", line); if (line !~ /^runtime/) detail = detail (detail == "" ? "" : " | ") line; next }
        END { flush() }' "/tmp/scn/blktests-$2.log" >> /tmp/scn/blktests-summary.tsv
    find "/tmp/bt-results-$2" -name '*.out.bad' -o -name '*.full' -o -name '*.dmesg' | while read -r f; do
        mkdir -p "/tmp/scn/bt-results-$2/$(dirname "${f#/tmp/bt-results-$2/}")"
        cp "$f" "/tmp/scn/bt-results-$2/${f#/tmp/bt-results-$2/}"
    done
}

: > /tmp/scn/blktests-summary.tsv
for trtype in $BT_TRTYPES; do
    run=$trtype-$BT_BACKEND
    dir=/tmp/tc-$run
    export P2PNVMF_TC_DIR=$dir P2PNVMF_TC_SOCKET=$dir/admin.sock P2PNVMF_TC_TRTYPE=$trtype \
        P2PNVMF_TC_TRADDR=$GUEST_IP P2PNVMF_TC_TRSVCID=4420 P2PNVMF_TC_BACKEND=$BT_BACKEND \
        P2PNVMF_TC_NVME_PCI=$nvme_pci NVME_TARGET_CONTROL=$BT_CONTROL
    "$BT_CONTROL" init
    TARGET_LOG=/tmp/scn/target-$run.log
    : > "$TARGET_LOG"
    RUST_LOG=${RUST_LOG:-info} "$P2PNVMF_BIN" serve --config "$dir/config.toml" --admin-socket "$dir/admin.sock" \
        >>"$TARGET_LOG" 2>&1 &
    TARGET_PID=$!
    for i in $(seq 200); do
        [[ -S $dir/admin.sock ]] && break
        kill -0 "$TARGET_PID" 2>/dev/null || { tail -n 20 "$TARGET_LOG" >&2; die "p2pnvmf exited at start-up"; }
        sleep 0.05
    done
    [[ -S $dir/admin.sock ]] || die "p2pnvmf's admin socket did not appear"

    step "blktests ./check nvme over $trtype, namespaces on $BT_BACKEND"
    # USE_RXE: blktests' rdma tests take soft-RoCE (rxe0 is up) instead of siw.
    (cd "$BT" && USE_RXE=1 NVME_IMG_SIZE=$BT_IMG_SIZE ./check -o "/tmp/bt-results-$run" ${BT_TESTS:-nvme}) \
        > "/tmp/scn/blktests-$run.log" 2>&1 || true
    cat "/tmp/scn/blktests-$run.log"
    summarize "$trtype" "$run"
    stop_target
done

# Tests expected to fail on the host's side, run against the kernel's own nvmet in the same
# guest (blktests' default set-up, no NVME_TARGET_CONTROL): they must fail there too.
if [[ -n ${BT_REFERENCE:-} ]]; then
    step "the same host against the kernel's nvmet: $BT_REFERENCE"
    (cd "$BT" && unset NVME_TARGET_CONTROL && NVMET_TRTYPES=tcp NVMET_BLKDEV_TYPES=device NVME_IMG_SIZE=$BT_IMG_SIZE \
        ./check -o /tmp/bt-results-kernel $BT_REFERENCE) > /tmp/scn/blktests-kernel.log 2>&1 || true
    cat /tmp/scn/blktests-kernel.log
    summarize kernel-tcp kernel
fi
step "blktests done: $(cut -f3 /tmp/scn/blktests-summary.tsv | sort | uniq -c | tr '\n' ' ')"
[[ -s /tmp/scn/blktests-summary.tsv ]] || die "blktests reported no test"
