# Malformed RDMA connects and a short capsule beside a running kernel host: nvmf-rdma-probe
# checks each reject status (NVMe-oF RDMA binding) and the teardown of the queue that got a
# 32-byte capsule, while fio writes and verifies through the Linux host over rxe.
NQN=nqn.2026-11.io.p2pnvmf:rdma-bad
rdma_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml 4421
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)

step "fio verify in the background, RDMA probe in the foreground"
fio_verify "$dev" 4k 2 >/tmp/fio.out 2>&1 &
fio_pid=$!
"$P2PNVMF_RDMA_PROBE" "$GUEST_IP:4420" || die "nvmf-rdma-probe reported failures"
wait "$fio_pid" || { cat /tmp/fio.out; die "fio beside the RDMA probe failed"; }
cat /tmp/fio.out
grep -q "capsule of 32 bytes (< 64)" "$TARGET_LOG" || die "target did not log the short capsule"
grep -q panicked "$TARGET_LOG" && die "the target panicked"
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
