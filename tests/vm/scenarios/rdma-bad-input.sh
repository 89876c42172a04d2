# Malformed RDMA connects and a short capsule beside a running kernel host: nvmf-rdma-probe
# checks each reject status (NVMe-oF RDMA binding) and the teardown of the queue that got a
# 32-byte capsule, while fio writes and verifies through the Linux host over rxe. It also
# attacks the memory of the kernel host's queues with RDMA READs and WRITEs carrying their
# own keys (taken from the target's debug log, as if guessed): each gets a remote access
# error, and the host's verify passes. Twice: with a protection domain per queue, and with a
# shared receive queue, whose one protection domain per device leaves only the MRs' access
# flags between one host and another's memory.
NQN=nqn.2026-11.io.p2pnvmf:rdma-bad

# round LABEL: serve, connect the kernel host, attack its queues' memory beside fio verify.
round() {
    local dev attack=() addr key
    step "$1: fio verify in the background, RDMA probe in the foreground"
    : > "$TARGET_LOG"
    RUST_LOG=info,p2pnvmf_transport::rdma::qp=debug start_target /tmp/scn/target.toml 4421
    dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
    while read -r addr key; do
        attack+=(--attack "$addr:$key")
    done < <(sed -n 's/.*queue memory registered for local access only .*addr=\(0x[0-9a-f]*\) .*lkey=\(0x[0-9a-f]*\) .*/\1 \2/p' "$TARGET_LOG")
    (( ${#attack[@]} >= 12 )) || die "expected the keys of 3 queues x 2 regions in the log, found ${#attack[@]} arguments"
    fio_verify "$dev" 4k 2 >/tmp/fio.out 2>&1 &
    fio_pid=$!
    "$P2PNVMF_RDMA_PROBE" "$GUEST_IP:4420" "${attack[@]}" || die "nvmf-rdma-probe reported failures"
    wait "$fio_pid" || { cat /tmp/fio.out; die "fio beside the RDMA probe failed"; }
    cat /tmp/fio.out
    grep -q "capsule of 32 bytes (< 64)" "$TARGET_LOG" || die "target did not log the short capsule"
    grep -q panicked "$TARGET_LOG" && die "the target panicked"
    nvme_disconnect_nqn "$NQN"
    stop_target
}

rdma_config /tmp/scn/target.toml "$NQN"
round "a protection domain per queue"
sed -i '/^port = 4420$/a srq_size = 256' /tmp/scn/target.toml
round "one protection domain per device (shared receive queue)"
grep -q "shared receive queue created" "$TARGET_LOG" || die "no shared receive queue"
step "done"
