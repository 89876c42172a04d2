# Our target over NVMe/TCP, the shortest useful path: discover, connect, 16 MiB
# write/read/compare, disconnect, clean shutdown.
NQN=nqn.2026-11.io.p2pnvmf:smoke
tcp_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml
step "discover"
nvme_discover_expect tcp 4420 "$NQN"
step "connect"
dev=$(nvme_connect_dev tcp 4420 "$NQN")
step "verify 16 MiB on $dev"
verify_rw "$dev" 16
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
