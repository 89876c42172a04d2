# More target queues than the SSD has queue pairs: qemu's SSD grants two I/O queue pairs
# (max_ioqpairs=2) and four subsystems on it get one I/O queue each. The first queue has a
# pair of its own; the others share the last pair (each with CIDs of its own, completions
# handed to their queue) — fio verifies on all four at once, each in its own quarter of the
# SSD, and no command fails or waits for a pair.

ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
[[ -n $ssd ]] || die "no NVMe function"
modprobe vfio_pci
subsystems="a b c d"
{
    printf '[[listener]]\nname = "tcp0"\ntransport = "tcp"\naddress = "%s"\nport = 4421\n' "$GUEST_IP"
    for s in $subsystems; do
        printf '\n[[subsystem]]\nnqn = "nqn.2026-12.io.p2pnvmf:qp-%s"\nallow_any_host = true\n' "$s"
        printf '[[subsystem.namespace]]\nnsid = 1\nbackend = "nvme-vfio"\npci = "%s"\n' "$ssd"
    done
} > /tmp/scn/qp.toml
start_target /tmp/scn/qp.toml 4421
grep "NVMe controller up" "$TARGET_LOG" | grep -q "io_queues=2" || { grep "NVMe controller up" "$TARGET_LOG"; die "the SSD did not grant 2 I/O queue pairs"; }

step "four queues on two queue pairs: fio verifies on each at once"
declare -A dev
for s in $subsystems; do
    dev[$s]=$(nvme_connect_dev tcp 4421 "nqn.2026-12.io.p2pnvmf:qp-$s" -i 1)
done
i=0
pids=()
for s in $subsystems; do
    fio --name="qp-$s" --filename="${dev[$s]}" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --offset=$((i * 16))M --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output=/tmp/scn/fio-$s.txt &
    pids+=($!)
    i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p" || { cat /tmp/scn/fio-*.txt; die "fio failed on a queue"; }; done
grep -h "write: IOPS" /tmp/scn/fio-*.txt
sharing=$(grep -c "this queue shares the last one" "$TARGET_LOG" || true)
echo "queues that joined the shared pair: $sharing"
(( sharing >= 2 )) || die "expected the queues beyond the first two to share the last pair"
! grep -q "waiting for one to be given back" "$TARGET_LOG" || die "a queue waited for a pair"
! grep -q "I/O failed" "$TARGET_LOG" || { grep "I/O failed" "$TARGET_LOG"; die "a command failed"; }

step "sharers leave and come back; the pair is deleted once its last user is gone"
for s in c d; do nvme_disconnect_nqn "nqn.2026-12.io.p2pnvmf:qp-$s" >/dev/null; done
dev[c]=$(nvme_connect_dev tcp 4421 nqn.2026-12.io.p2pnvmf:qp-c -i 1)
verify_rw "${dev[c]}" 8
for s in a b c; do nvme_disconnect_nqn "nqn.2026-12.io.p2pnvmf:qp-$s" >/dev/null; done
! grep -q "deleting an I/O queue pair" "$TARGET_LOG" || { grep "deleting an I/O queue pair" "$TARGET_LOG"; die "a queue pair was not deleted"; }
stop_target
echo "queue pairs passed"
