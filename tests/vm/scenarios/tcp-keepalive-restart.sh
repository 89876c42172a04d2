# Keep-alive and persistence over NVMe/TCP: a connection idle past its keep-alive timeout is
# still alive (the host's Keep Alive commands are honoured); a namespace on a block device
# (brd, through io_uring with O_DIRECT) keeps its data across a target restart after a flush,
# and across a SIGKILL with writes in flight (the host reconnects on its own).
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
dev=$(nvme_connect_dev tcp 4420 "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=30)
ctrl=$(ctrl_of_nqn "$NQN")
dd if="$dev" of=/tmp/readback bs=1M count=8 iflag=direct status=none || die "read failed"
cmp /tmp/pattern /tmp/readback || die "data differs after a target restart"

step "SIGKILL while writes are in flight, after a flush: restart, the host reconnects, flushed data is there"
head -c $((8 << 20)) /dev/urandom >/tmp/pattern2
dd if=/tmp/pattern2 of="$dev" bs=1M seek=16 oflag=direct status=none || die "write failed"
nvme flush "$dev" -n 1 || die "nvme flush failed"
dd if=/dev/urandom of="$dev" bs=64k seek=512 count=512 oflag=direct status=none 2>/dev/null &
writer=$!
sleep 0.3
kill -9 "$TARGET_PID"
wait "$TARGET_PID" 2>/dev/null || true
start_target /tmp/scn/target.toml
wait "$writer" || echo "the writes in flight at the kill failed or were retried (dd: $?)"
wait_live "$ctrl" 30
dd if="$dev" of=/tmp/readback bs=1M skip=16 count=8 iflag=direct status=none || die "read after the restart failed"
cmp /tmp/pattern2 /tmp/readback || die "data flushed before the SIGKILL is not there after the restart"
dd if="$dev" of=/tmp/readback bs=1M count=8 iflag=direct status=none || die "read failed"
cmp /tmp/pattern /tmp/readback || die "the first pattern changed"
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
