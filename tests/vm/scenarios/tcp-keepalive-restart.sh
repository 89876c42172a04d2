# Keep-alive and persistence over NVMe/TCP: a connection idle past its keep-alive timeout is
# still alive (the host's Keep Alive commands are honoured); a namespace on a block device
# (brd, through io_uring with O_DIRECT) keeps its data across a target restart after a flush.
NQN=nqn.2026-11.io.p2pnvmf:file
modprobe brd rd_nr=1 rd_size=65536
IMG=/dev/ram0
cat >/tmp/scn/target.toml <<CFG
[[listener]]
transport = "tcp"
address = "$GUEST_IP"

[[subsystem]]
nqn = "$NQN"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
backend = "file"
path = "$IMG"
CFG
start_target /tmp/scn/target.toml
grep -q 'file backend open .*engine=IoUring o_direct=true' "$TARGET_LOG" || die "$IMG is not served through io_uring with O_DIRECT"

step "connect with a 2 s keep-alive timeout, then idle 8 s"
dev=$(nvme_connect_dev tcp 4420 "$NQN" --keep-alive-tmo=2)
ctrl=$(ctrl_of_nqn "$NQN")
grep -q "kato_ms=2000" "$TARGET_LOG" || die "target did not record KATO 2000 ms"
sleep 8
state=$(cat "$ctrl/state")
[[ $state == live ]] || die "controller state after idling: $state"
grep -q "keep-alive timeout" "$TARGET_LOG" && die "target timed out a host that sent Keep Alive"

step "write 8 MiB, flush, disconnect, restart the target"
head -c $((8 << 20)) /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of="$dev" bs=1M oflag=direct status=none || die "write failed"
nvme flush "$dev" -n 1 || die "nvme flush failed"
nvme_disconnect_nqn "$NQN"
stop_target
start_target /tmp/scn/target.toml

step "reconnect and read back"
dev=$(nvme_connect_dev tcp 4420 "$NQN")
dd if="$dev" of=/tmp/readback bs=1M count=8 iflag=direct status=none || die "read failed"
cmp /tmp/pattern /tmp/readback || die "data differs after a target restart"
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
