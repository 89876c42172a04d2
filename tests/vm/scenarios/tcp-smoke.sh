# Our target over NVMe/TCP, the shortest useful path: discover, connect, 16 MiB
# write/read/compare, disconnect, clean shutdown; then the same in poll mode, with fio's verify
# (the poller pinned to CPU 1 and the kernel's unbound work queues kept off it while it runs).
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

step "poll mode: the queues on a poller pinned to CPU 1, the kernel's unbound work kept off it"
wq=/sys/devices/virtual/workqueue/cpumask
[[ $(cat $wq) == 3 ]] || die "unbound work queues' CPU mask $(cat $wq) before the target, not 3"
poll_mode /tmp/scn/target.toml "[1]"
start_target /tmp/scn/target.toml
grep -q "poller started poller=0 cpu=Some(1)" "$TARGET_LOG" || die "no poller on CPU 1"
[[ $(cat $wq) == 1 ]] || die "unbound work queues' CPU mask $(cat $wq) while the poller runs on CPU 1, not 1"
dev=$(nvme_connect_dev tcp 4420 "$NQN")
verify_rw "$dev" 8
fio_verify "$dev" 4k 2
check_pollers 3
nvme_disconnect_nqn "$NQN"
stop_target
[[ $(cat $wq) == 3 ]] || die "unbound work queues' CPU mask $(cat $wq) after the target stopped, not 3 again"
step "done"
