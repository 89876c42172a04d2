# More target queues than the SSD has queue pairs: qemu's SSD grants two I/O queue pairs
# (max_ioqpairs=2), three subsystems on it get one I/O queue each. The third queue's first
# command waits for a pair instead of failing, and goes through once another queue closes —
# here because a reload takes qp-a away (the host cannot disconnect meanwhile: deleting a
# controller waits for the new disk's partition read, the very command that waits).

ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
[[ -n $ssd ]] || die "no NVMe function"
modprobe vfio_pci
# config SUBSYSTEM...: qp-<s> for each, one namespace on the SSD.
config() {
    printf '[[listener]]\nname = "tcp0"\ntransport = "tcp"\naddress = "%s"\nport = 4421\n' "$GUEST_IP"
    for s in "$@"; do
        printf '\n[[subsystem]]\nnqn = "nqn.2026-12.io.p2pnvmf:qp-%s"\nallow_any_host = true\n' "$s"
        printf '[[subsystem.namespace]]\nnsid = 1\nbackend = "nvme-vfio"\npci = "%s"\n' "$ssd"
    done
}
config a b c > /tmp/scn/qp.toml
start_target /tmp/scn/qp.toml 4421
grep "NVMe controller up" "$TARGET_LOG" | grep -q "io_queues=2" || { grep "NVMe controller up" "$TARGET_LOG"; die "the SSD did not grant 2 I/O queue pairs"; }

step "two queues take the SSD's two queue pairs"
head -c $((1 << 20)) /dev/urandom > /tmp/pattern
declare -A dev
for s in a b; do
    dev[$s]=$(nvme_connect_dev tcp 4421 "nqn.2026-12.io.p2pnvmf:qp-$s" -i 1)
    dd if=/tmp/pattern of="${dev[$s]}" bs=1M count=1 oflag=direct status=none || die "write through qp-$s failed"
done

step "a third queue's first command waits for a pair"
dev[c]=$(nvme_connect_dev tcp 4421 nqn.2026-12.io.p2pnvmf:qp-c -i 1)
t0=$(date +%s.%N)
dd if="${dev[c]}" of=/tmp/readback bs=1M count=1 iflag=direct status=none &
reader=$!
sleep 3
kill -0 "$reader" 2>/dev/null || { wait "$reader"; die "the third queue's read ended ($?) while both pairs were in use"; }
grep -q "every I/O queue pair is in use: waiting for one to be given back" "$TARGET_LOG" || die "the wait was not logged"

step "a reload takes qp-a away: its queue closes, its pair is given back, the waiting read goes through"
config b c > /tmp/scn/qp.toml
kill -HUP "$TARGET_PID"
wait "$reader" || die "the waiting read failed"
awk -v t0="$t0" -v now="$(date +%s.%N)" 'BEGIN { printf "the read waited %.1f s in all\n", now - t0 }'
cmp /tmp/pattern /tmp/readback || die "the third queue reads other bytes than were written"
! grep -q "I/O failed" "$TARGET_LOG" || { grep "I/O failed" "$TARGET_LOG"; die "a command failed"; }
for s in a b c; do nvme_disconnect_nqn "nqn.2026-12.io.p2pnvmf:qp-$s" >/dev/null; done
stop_target
echo "queue pairs passed"
