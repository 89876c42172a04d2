# The file backend on block devices, over RDMA and TCP: fio write-then-verify at QD32 (4k and
# 128k) on brd; Write Zeroes and Deallocate read back as zeroes; and a host's queue depth
# reaches the device: on null_blk (completions after 0.5 ms) with one I/O queue at QD32, the
# device has many requests in flight at once (/sys/block/nullb0/inflight), where executing
# one command at a time would show one.
BRD=nqn.2026-11.io.p2pnvmf:file-brd
NULL=nqn.2026-11.io.p2pnvmf:file-null
modprobe brd rd_nr=1 rd_size=131072
modprobe null_blk nr_devices=1 queue_mode=2 irqmode=2 completion_nsec=500000 gb=1 hw_queue_depth=128
[[ -b /dev/ram0 && -b /dev/nullb0 ]] || die "brd or null_blk missing"
rdma_config /tmp/scn/target.toml "$BRD"
sed -i 's|^backend = "ram"$|backend = "file"|; s|^size = "256MiB"$|path = "/dev/ram0"|' /tmp/scn/target.toml
printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = "file"\npath = "/dev/nullb0"\n' \
    "$NULL" >>/tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
grep -q 'file backend open .*path=/dev/ram0 .*engine=IoUring o_direct=true' "$TARGET_LOG" \
    || die "/dev/ram0 is not served through io_uring with O_DIRECT"

# in_flight_max DEVICE SECONDS: the most requests the block device had in flight, sampled.
in_flight_max() {
    local max=0 i r w
    for i in $(seq $(($2 * 20))); do
        read -r r w <"/sys/block/$1/inflight"
        (( r + w > max )) && max=$((r + w))
        sleep 0.05
    done
    echo "$max"
}

for t in rdma tcp; do
    port=$([[ $t == rdma ]] && echo 4420 || echo 4421)
    step "$t: fio verify on brd through the file backend"
    dev=$(nvme_connect_dev "$t" "$port" "$BRD" -i 2)
    fio_verify "$dev" 4k 2
    fio_verify "$dev" 128k 1 32

    step "$t: Write Zeroes and Deallocate read back as zeroes"
    head -c $((1 << 20)) /dev/urandom >/tmp/pattern
    dd if=/tmp/pattern of="$dev" bs=1M count=1 oflag=direct status=none || die "write failed"
    nvme write-zeroes "$dev" -n 1 -s 0 -c 255 >/dev/null || die "nvme write-zeroes failed"   # blocks 0-255
    nvme dsm "$dev" -n 1 -d -s 1024 -b 512 >/dev/null || die "nvme dsm deallocate failed"     # blocks 1024-1535
    dd if="$dev" of=/tmp/readback bs=1M count=1 iflag=direct status=none || die "read failed"
    cmp -n $((256 * 512)) /tmp/readback /dev/zero || die "write zeroes: blocks 0-255 are not zero"
    cmp -n $((768 * 512)) -i $((256 * 512)) /tmp/readback /tmp/pattern || die "blocks 256-1023 changed"
    cmp -n $((512 * 512)) -i $((1024 * 512)):0 /tmp/readback /dev/zero || die "deallocate: blocks 1024-1535 are not zero"
    cmp -n $((512 * 512)) -i $((1536 * 512)) /tmp/readback /tmp/pattern || die "blocks 1536-2047 changed"
    nvme_disconnect_nqn "$BRD" >/dev/null

    step "$t: QD32 on one I/O queue reaches null_blk"
    dev=$(nvme_connect_dev "$t" "$port" "$NULL" -i 1)
    fio --name=qd --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 \
        --size=256M --runtime=4 --time_based --output-format=terse >/dev/null &
    fio_pid=$!
    sleep 1
    max=$(in_flight_max nullb0 2)
    wait "$fio_pid" || die "fio on $dev failed"
    echo "$t: at most $max requests in flight at nullb0 (host QD32 on one queue)"
    (( max >= 4 )) || die "only $max requests in flight at the device: commands of a queue are serialised"
    nvme_disconnect_nqn "$NULL" >/dev/null
done
grep -E "zeroing method not supported here" "$TARGET_LOG" || true
stop_target
step "done"
