# Our target over NVMe/RDMA (rxe): discover, connect, 16 MiB write/read/compare, disconnect.
NQN=nqn.2026-11.io.p2pnvmf:rdma
rdma_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml 4421
step "discover over rdma"
nvme_discover_expect rdma 4420 "$NQN"
step "connect over rdma"
dev=$(nvme_connect_dev rdma 4420 "$NQN")
"$P2PNVMF_BIN" status | grep "cntlid" | tee /dev/stderr | grep -q "from $GUEST_IP:[0-9]* over rdma" \
    || die "p2pnvmf status lacks the RDMA host's address"
step "verify 16 MiB on $dev"
verify_rw "$dev" 16
nvme_disconnect_nqn "$NQN"
stop_target

step "16 KiB in-capsule data, poll mode: completion queues polled by a poller"
cp /tmp/scn/target.toml /tmp/scn/interrupt.toml
sed -i 's/^port = 4420$/port = 4420\ninline_data_size = 16384/' /tmp/scn/target.toml
poll_mode /tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
dev=$(nvme_connect_dev rdma 4420 "$NQN")
grep -q "RDMA queue accepted qid=1 .*polled=true" "$TARGET_LOG" || die "I/O queue not polled"
nvme id-ctrl "$dev" | grep "^ioccsz *: 1028" || die "IOCCSZ is not 1028 (16 KiB in-capsule data)"
verify_rw "$dev" 8
fio_verify "$dev" 4k
check_pollers 3
nvme_disconnect_nqn "$NQN"
stop_target

step "one shared receive queue of 512 capsules for all queues"
sed 's/^port = 4420$/port = 4420\nsrq_size = 512/' /tmp/scn/interrupt.toml >/tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
grep -q "shared receive queue created entries=512" "$TARGET_LOG" || die "no shared receive queue"
[[ $(grep -c "shared receive queue created" "$TARGET_LOG") -eq 1 ]] || die "more than one SRQ for one device"
fio_verify "$dev" 4k 2
nvme_disconnect_nqn "$NQN"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
