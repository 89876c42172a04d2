# Rig self-test and reference: the Linux kernel nvmet target in the guest, reached by nvme-cli
# over $TRANSPORT (rdma over rxe0, or tcp): discover, connect, 16 MiB write/read/compare,
# disconnect.
NQN=nqn.2026-11.io.p2pnvmf:kernel-ref
PORT=4420

step "load brd and nvmet-$TRANSPORT"
modprobe brd rd_nr=1 rd_size=262144
modprobe nvmet
modprobe "nvmet-$TRANSPORT"
nvmet_kernel_subsys "$NQN" /dev/ram0
nvmet_kernel_port 1 "$TRANSPORT" "$PORT" "$NQN"

step "discover over $TRANSPORT"
nvme_discover_expect "$TRANSPORT" "$PORT" "$NQN"
step "connect"
dev=$(nvme_connect_dev "$TRANSPORT" "$PORT" "$NQN")
step "connected as $dev; write/read/compare 16 MiB"
verify_rw "$dev" 16
step "disconnect"
nvme_disconnect_nqn "$NQN"
[[ ! -e $dev ]] || die "$dev still present after disconnect"
step "done"
