# Our target over NVMe/RDMA (rxe): discover, connect, 16 MiB write/read/compare, disconnect.
NQN=nqn.2026-11.io.p2pnvmf:rdma
rdma_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml 4421
step "discover over rdma"
nvme_discover_expect rdma 4420 "$NQN"
step "connect over rdma"
dev=$(nvme_connect_dev rdma 4420 "$NQN")
step "verify 16 MiB on $dev"
verify_rw "$dev" 16
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
