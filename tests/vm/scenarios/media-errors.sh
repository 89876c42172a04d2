# Errors keep their meaning on the way to the host. The SSD's medium fails reads of sector
# BAD_READ and writes of sector BAD_WRITE (qemu's blkdebug, Topology::failing_sectors): the
# kernel's own nvme driver shows what the SSD answers — the witness. Then the host reads and
# writes those sectors through p2pnvmf and must see the same: from a file namespace on the
# SSD's block device (the block layer's ENODATA), from one on a dm "error" target (EIO), and
# from the nvme-vfio backend driving the SSD itself (the SSD's own status, passed on). Last, a
# Dataset Management of 256 ranges on a busy nvme-vfio queue succeeds.

NQN=nqn.2026-12.io.p2pnvmf:media-errors
BAD_READ=2048
BAD_WRITE=4096
ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
[[ -n $ssd ]] || die "no NVMe function"
modprobe nvme
disk=$(nvme_disk "$ssd")
head -c 4096 /dev/urandom > /tmp/block

# failed_status CMD...: CMD must fail; prints nvme-cli's "NVMe status: ..." line.
failed_status() {
    local out
    out=$("$@" 2>&1) && die "$* succeeded on a failing sector: $out"
    grep -o 'NVMe status: .*' <<<"$out" | head -n1 | grep . || die "$*: no NVMe status in: $out"
}
# read_at DEV SECTOR / write_at DEV SECTOR: nvme-cli's 4 KiB read or write of 512-byte blocks.
read_at() { nvme read "$1" --start-block="$2" --block-count=7 --data-size=4096 --data=/tmp/out; }
write_at() { nvme write "$1" --start-block="$2" --block-count=7 --data-size=4096 --data=/tmp/block; }
# host_message DEV: what the kernel logs for a block read of BAD_READ on DEV, which must fail:
# the status part of its I/O error line ("<status> (sct 0x2 / sc 0x81)"), checked beside its
# "critical medium error". Under native multipath the path's disk (nvmeXcYnZ) is named.
host_message() {
    local name=${1#/dev/} disk line
    disk="${name%n*}(c[0-9]+)?n${name##*n}"
    dmesg -C
    dd if="$1" of=/dev/null bs=4096 skip=$((BAD_READ / 8)) count=1 iflag=direct status=none 2>/dev/null \
        && die "a block read of sector $BAD_READ on $1 succeeded"
    dmesg | grep -Eq "critical medium error, dev $disk, sector $BAD_READ " \
        || { dmesg | tail -n 20 >&2; die "no 'critical medium error' for $name sector $BAD_READ"; }
    line=$(dmesg | grep -Eo "$disk: [^@]*@ LBA $BAD_READ, 8 blocks, .*" | head -n1)
    [[ -n $line ]] || { dmesg | tail -n 20 >&2; die "no I/O error line for $name"; }
    echo "${line#*blocks, }"
}
# sound DEV: a read and a write of good sectors still work.
sound() {
    write_at "$1" 0 >/dev/null || die "a write of a good sector of $1 failed"
    read_at "$1" 0 >/dev/null || die "a read of a good sector of $1 failed"
    cmp -n 4096 /tmp/block /tmp/out || die "a good sector of $1 reads back other bytes"
}

step "witness: the kernel's own driver on the SSD ($disk)"
want_read=$(failed_status read_at "/dev/$disk" "$BAD_READ")
want_write=$(failed_status write_at "/dev/$disk" "$BAD_WRITE")
want_message=$(host_message "/dev/$disk")
echo "read: $want_read"; echo "write: $want_write"; echo "kernel: $want_message"
grep -q "Unrecovered Read Error" <<<"$want_read" || die "the SSD's read error is not Unrecovered Read Error"
grep -q "Write Fault" <<<"$want_write" || die "the SSD's write error is not Write Fault"

step "file namespaces: the SSD's block device (ENODATA) and a dm error target (EIO)"
modprobe brd rd_nr=1 rd_size=65536
modprobe dm_mod
dm_table="0 $BAD_READ linear /dev/ram0 0
$BAD_READ 8 error
$((BAD_READ + 8)) $((131072 - BAD_READ - 8)) linear /dev/ram0 $((BAD_READ + 8))"
DM_DISABLE_UDEV=1 dmsetup create media-bad <<<"$dm_table" || die "dmsetup create failed"
dm=$(readlink -f /dev/mapper/media-bad)
[[ -b $dm ]] || die "no block device for the dm target"
# tcp_config's listener and subsystem; its namespace on the SSD's block device, a second on dm.
tcp_config /tmp/scn/file.toml "$NQN"
sed -i "s|^backend = \"ram\"$|backend = \"file\"\npath = \"/dev/$disk\"|; /^size = /d; /^serial = \|^model = /d" /tmp/scn/file.toml
printf '\n[[subsystem.namespace]]\nnsid = 2\nbackend = "file"\npath = "%s"\n' "$dm" >> /tmp/scn/file.toml
start_target /tmp/scn/file.toml 4420
dev=$(nvme_connect_dev tcp 4420 "$NQN")
ctrl=$(basename "$(ctrl_of_nqn "$NQN")")
for i in $(seq 50); do [[ -n $(ns_dev "$ctrl" 2) ]] && break; sleep 0.1; done
ns1=$(ns_dev "$ctrl" 1) ns2=$(ns_dev "$ctrl" 2)
[[ -b $ns1 && -b $ns2 ]] || { nvme list; die "namespaces 1 and 2 of $ctrl not both there ($dev)"; }
got=$(failed_status read_at "$ns1" "$BAD_READ"); echo "nsid 1 read: $got"
grep -q "Unrecovered Read Error" <<<"$got" || die "nsid 1: a medium error read reached the host as: $got"
got=$(failed_status write_at "$ns1" "$BAD_WRITE"); echo "nsid 1 write: $got"
grep -q "Write Fault" <<<"$got" || die "nsid 1: a medium error write reached the host as: $got"
got=$(failed_status read_at "$ns2" "$BAD_READ"); echo "nsid 2 read: $got"
grep -q "Unrecovered Read Error" <<<"$got" || die "nsid 2: an EIO read reached the host as: $got"
got=$(failed_status write_at "$ns2" "$BAD_READ"); echo "nsid 2 write: $got"
grep -q "Write Fault" <<<"$got" || die "nsid 2: an EIO write reached the host as: $got"
got=$(host_message "$ns2"); echo "host kernel: $got"
grep -q "(sct 0x2 / sc 0x81)" <<<"$got" || die "the host's kernel logged: $got"
sound "$ns1"
sound "$ns2"
grep "I/O failed" "$TARGET_LOG" | head -n 4
grep -q "I/O failed.*status=Unrecovered Read Error (sct 0x2 / sc 0x81)" "$TARGET_LOG" \
    || die "the target did not log the failure with its status"
nvme_disconnect_nqn "$NQN" >/dev/null
stop_target
dmsetup remove media-bad || die "dmsetup remove failed"

step "nvme-vfio: the SSD's own status reaches the host over TCP and RDMA"
echo "$ssd" > /sys/bus/pci/drivers/nvme/unbind
modprobe vfio_pci
nvme_vfio_config /tmp/scn/vfio.toml "$NQN" "$ssd"
: > "$TARGET_LOG"
start_target /tmp/scn/vfio.toml 4421
for t in tcp rdma; do
    port=4421; [[ $t == rdma ]] && port=4420
    dev=$(nvme_connect_dev "$t" "$port" "$NQN" -i 2)
    got=$(failed_status read_at "$dev" "$BAD_READ"); echo "$t read: $got"
    [[ $got == "$want_read" ]] || die "$t: the host sees '$got' where the SSD said '$want_read'"
    got=$(failed_status write_at "$dev" "$BAD_WRITE"); echo "$t write: $got"
    [[ $got == "$want_write" ]] || die "$t: the host sees '$got' where the SSD said '$want_write'"
    got=$(host_message "$dev"); echo "$t host kernel: $got"
    [[ $got == "$want_message" ]] || die "$t: the host's kernel logged '$got' where the SSD's driver logged '$want_message'"
    sound "$dev"
    [[ $t == tcp ]] && nvme_disconnect_nqn "$NQN" >/dev/null
done

step "Dataset Management of 256 ranges on a busy nvme-vfio queue"
# fio keeps both of the host's queues busy (verify, away from the ranges) while DSM runs.
fio_verify "$dev" 4k 2 32 32 > /tmp/scn/dsm-fio.log 2>&1 &
fio_pid=$!
slbs=$(seq -s, 0 16 $((255 * 16))); blocks=$(printf '8%.0s,' $(seq 256)); blocks=${blocks%,}
sleep 1
for i in 1 2 3 4 5 6; do
    for cpu in 0 1; do
        taskset -c "$cpu" nvme dsm "$dev" --ad --slbs="$slbs" --blocks="$blocks" >/tmp/scn/dsm.log 2>&1 \
            || { cat /tmp/scn/dsm.log; die "DSM of 256 ranges failed (round $i, cpu $cpu)"; }
    done
done
echo "12 DSMs of 256 ranges succeeded"
wait "$fio_pid" || { cat /tmp/scn/dsm-fio.log; die "fio verify beside the DSMs failed"; }
cat /tmp/scn/dsm-fio.log
nvme_disconnect_nqn "$NQN" >/dev/null
stop_target
echo "media errors passed"
