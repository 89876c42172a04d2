# The nvme-vfio backend on Debian's kernel with the guest IOMMU: the target takes an NVMe SSD
# from the kernel (only once the kernel let go of it), identifies it as the kernel did, serves
# its namespace over NVMe/TCP and RDMA with fio verify — in poll mode too, where the SSD's I/O
# queues raise no interrupt (/proc/interrupts) — and gives it back at exit, when the kernel's
# driver reads the bytes written through the target.

NQN=nqn.2026-11.io.p2pnvmf:vfio-ssd
ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
[[ -n $ssd ]] || die "no NVMe function"
modprobe nvme
disk=$(nvme_disk "$ssd")
ctrl=
for c in /sys/class/nvme/nvme*; do [[ $(readlink -f "$c/device") == */$ssd ]] && ctrl=/dev/${c##*/}; done
[[ -c $ctrl ]] || die "no controller device of $ssd"
step "SSD $ssd ($disk on $ctrl) with the kernel's nvme driver"
nvme id-ctrl "$ctrl" -o json > /tmp/scn/id-ctrl.json || die "nvme id-ctrl failed"
nvme id-ns "/dev/$disk" -o json > /tmp/scn/id-ns.json || die "nvme id-ns failed"
nvme smart-log "$ctrl" -o json > /tmp/scn/smart.json || die "nvme smart-log failed"

cfg() {
    nvme_vfio_config /tmp/scn/target.toml "$NQN" "$1" ${2:+"device_nsid = $2"}
}
# refused CONFIG-ARGS... MESSAGE: serve must refuse to start, saying MESSAGE.
refused() {
    local msg=${*: -1}
    cfg "${@:1:$#-1}"
    if "$P2PNVMF_BIN" serve --config /tmp/scn/target.toml > /tmp/scn/refused.log 2>&1; then
        die "serve started: expected '$msg'"
    fi
    grep -F "$msg" /tmp/scn/refused.log || { cat /tmp/scn/refused.log; die "no '$msg' in the refusal"; }
}

step "refused: the kernel's nvme driver holds it, a wrong address"
refused "$ssd" "$ssd is bound to the kernel's nvme driver, which may hold mounted filesystems"
[[ $(basename "$(readlink /sys/bus/pci/devices/$ssd/driver)") == nvme ]] || die "$ssd left the nvme driver"
refused 0000:7f:00.0 "0000:7f:00.0: no such PCI function"

step "the kernel lets go; the target binds it to vfio-pci"
echo "$ssd" > /sys/bus/pci/drivers/nvme/unbind
modprobe vfio_pci
refused "$ssd" 9 "$ssd: namespace 9 is not active"
[[ ! -e /sys/bus/pci/devices/$ssd/driver ]] || die "$ssd still bound after a refused start: $(readlink /sys/bus/pci/devices/$ssd/driver)"
cfg "$ssd"
: > "$TARGET_LOG"
start_target /tmp/scn/target.toml 4421
grep "NVMe controller up through VFIO\|NVMe namespace ready" "$TARGET_LOG"
[[ $(basename "$(readlink /sys/bus/pci/devices/$ssd/driver)") == vfio-pci ]] || die "$ssd not on vfio-pci while served"

step "Identify through our driver equals what the kernel's driver reported"
python3 - "$TARGET_LOG" <<'PY' || die "Identify differs from the kernel's"
import json, re, sys
c = json.load(open('/tmp/scn/id-ctrl.json'))
n = json.load(open('/tmp/scn/id-ns.json'))
log = open(sys.argv[1]).read()
up = re.search(r'NVMe controller up through VFIO .*serial=(\S+) model=(.+?) firmware=(\S+) mdts=(\d+)', log)
ns = re.search(r'NVMe namespace ready .*blocks=(\d+) block_size=(\d+)', log)
assert up and ns, log
ours = (up[1], up[2], up[3], int(up[4]), int(ns[1]), int(ns[2]))
lbaf = n['lbafs'][n['flbas'] & 0xf]
kernel = (c['sn'].strip(), c['mn'].strip(), c['fr'].strip(), c['mdts'], n['nsze'], 1 << lbaf['ds'])
print('ours  ', ours)
print('kernel', kernel)
assert ours == kernel
PY

step "a host sees the SSD's own Identify fields and health through the target"
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 1)
nvme id-ns "$dev" -o json > /tmp/scn/host-id-ns.json || die "nvme id-ns over the fabric failed"
nvme id-ctrl "$dev" -o json > /tmp/scn/host-id-ctrl.json || die "nvme id-ctrl over the fabric failed"
nvme smart-log "$dev" -o json > /tmp/scn/host-smart.json || die "nvme smart-log over the fabric failed"
nvme_disconnect_nqn "$NQN" >/dev/null
python3 - <<'PY' || die "the host sees other Identify fields or health than the SSD's"
import json
load = lambda f: json.load(open('/tmp/scn/' + f))
local_ns, host_ns = load('id-ns.json'), load('host-id-ns.json')
for k in ('nsze', 'nsfeat', 'nows', 'dlfeat'):
    print(k, local_ns[k], host_ns[k])
    assert local_ns[k] == host_ns[k], k
local_c, host_c = load('id-ctrl.json'), load('host-id-ctrl.json')
print('oncs', local_c['oncs'], host_c['oncs'])
assert host_c['oncs'] & 0xc == local_c['oncs'] & 0xc and host_c['vwc'] & 1 == local_c['vwc'] & 1
local_s, host_s = load('smart.json'), load('host-smart.json')
for k in ('critical_warning', 'temperature', 'avail_spare', 'spare_thresh', 'percent_used', 'power_on_hours'):
    print(k, local_s[k], host_s[k])
    assert local_s[k] == host_s[k], k
PY

# Interrupts the SSD raised on its I/O queues' MSI-X vectors (1 and up; 0 is the admin
# queue's), as the kernel counts them for vfio-pci.
ssd_io_irqs() {
    awk -v pci="$ssd" 'index($0, "vfio-msix[") && index($0, pci) && !index($0, "vfio-msix[0]") {
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts
}
# verify_both MiB: fio verify through the target onto the SSD over both transports.
verify_both() {
    local t port dev
    for t in tcp rdma; do
        port=$([[ $t == rdma ]] && echo 4420 || echo 4421)
        step "$t: fio verify through the target onto the SSD"
        dev=$(nvme_connect_dev "$t" "$port" "$NQN" -i 2)
        fio_verify "$dev" 4k 2 "$1"
        fio_verify "$dev" 128k 1 "$1"
        nvme_disconnect_nqn "$NQN" >/dev/null
    done
}
irq0=$(ssd_io_irqs)
verify_both 32
irq1=$(ssd_io_irqs)
echo "the SSD's I/O interrupts during the verify runs: $((irq1 - irq0))"
(( irq1 > irq0 )) || die "no interrupt from the SSD's I/O queues in the default mode"
# The SSD reached every buffer where it was (RDMA's data area, NVMe/TCP's slot buffers).
! grep "bounce buffer" "$TARGET_LOG" || die "data went through bounce buffers"

step "poll mode: the poller looks at the SSD's completion queues itself; the SSD raises no I/O interrupt"
stop_target
cp /tmp/scn/target.toml /tmp/scn/poll.toml
poll_mode /tmp/scn/poll.toml "[1]"
start_target /tmp/scn/poll.toml 4421
irq0=$(ssd_io_irqs)
verify_both 16
irq1=$(ssd_io_irqs)
echo "the SSD's I/O interrupts during the poll-mode verify runs: $((irq1 - irq0))"
(( irq1 == irq0 )) || die "the SSD raised $((irq1 - irq0)) I/O interrupts in poll mode"
stop_target
start_target /tmp/scn/target.toml 4421

step "10 connect/disconnect cycles: the SSD's queues, lists and mappings are given back"
# VmLck counts what VFIO pins for the SSD's DMA: a queue's memory must be unpinned at its close.
vmlck() { awk '/^VmLck/ {print $2}' "/proc/$TARGET_PID/status"; }
lck0=$(vmlck)
for i in $(seq 10); do
    dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
    dd if="$dev" of=/dev/null bs=4k count=16 iflag=direct status=none || die "read in cycle $i failed"
    nvme_disconnect_nqn "$NQN" >/dev/null
done
sleep 1
lck1=$(vmlck)
echo "pinned for DMA: $lck0 kB before, $lck1 kB after 10 cycles"
(( lck1 <= lck0 )) || die "pinned memory grew by $((lck1 - lck0)) kB over 10 cycles"

step "a second subsystem on the same SSD: one controller, shared; the first serves on when it goes"
SHARED=nqn.2026-12.io.p2pnvmf:same-ssd
cp /tmp/scn/target.toml /tmp/scn/target.one.toml
printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = "nvme-vfio"\npci = "%s"\n' \
    "$SHARED" "$ssd" >> /tmp/scn/target.toml
"$P2PNVMF_BIN" reload || die "reload adding $SHARED"
grep -q "NVMe controller driven already: shared" "$TARGET_LOG" || die "the SSD was not shared"
one=$(nvme_connect_dev tcp 4421 "$NQN" -i 1)
two=$(nvme_connect_dev tcp 4421 "$SHARED" -i 1)
head -c $((4 << 20)) /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of="$one" bs=1M seek=8 oflag=direct status=none || die "write through $NQN"
dd if="$two" of=/tmp/readback bs=1M skip=8 count=4 iflag=direct status=none || die "read through $SHARED"
cmp /tmp/pattern /tmp/readback || die "$SHARED reads other bytes than $NQN wrote"
nvme_disconnect_nqn "$SHARED" >/dev/null
cp /tmp/scn/target.one.toml /tmp/scn/target.toml
shutdowns=$(grep -c "NVMe controller shut down" "$TARGET_LOG" || true)
"$P2PNVMF_BIN" reload || die "reload removing $SHARED"
verify_rw "$one" 8
[[ $(grep -c "NVMe controller shut down" "$TARGET_LOG" || true) == "$shutdowns" ]] || die "removing $SHARED shut the SSD down"
nvme_disconnect_nqn "$NQN" >/dev/null

step "a pattern written through the target, read back by the kernel's driver after exit"
given_back_holds_pattern "$NQN" "$ssd"

BENCH_RUNTIME=${NVME_VFIO_BENCH_RUNTIME:-3}
step "side by side over NVMe/TCP on the same SSD: the kernel's nvmet on its nvme driver, p2pnvmf on VFIO (${BENCH_RUNTIME}s each)"
modprobe nvmet
modprobe nvmet-tcp
nvmet_kernel_subsys kref "/dev/$disk"
nvmet_kernel_port 1 tcp 4423 kref
bench_tcp kernel-nvmet kref 4423 | tee /tmp/scn/bench.txt
echo 0 > /sys/kernel/config/nvmet/subsystems/kref/namespaces/1/enable
rm /sys/kernel/config/nvmet/ports/1/subsystems/kref
echo "$ssd" > /sys/bus/pci/drivers/nvme/unbind
start_target /tmp/scn/target.toml 4421
bench_tcp p2pnvmf-vfio "$NQN" 4421 | tee -a /tmp/scn/bench.txt
stop_target

step "the SSD reset under load: its commands fail with a reason, the target serves on"
RAMNQN=nqn.2026-11.io.p2pnvmf:beside
printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = "ram"\nsize = "64MiB"\n' \
    "$RAMNQN" >> /tmp/scn/target.toml
: > "$TARGET_LOG"
start_target /tmp/scn/target.toml 4421
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 \
    --size=64M --runtime=60 --time_based --output-format=terse > /tmp/scn/load.txt 2>&1 &
fio_pid=$!
sleep 2
t0=$SECONDS
echo 1 > "/sys/bus/pci/devices/$ssd/reset"
wait "$fio_pid" && die "fio kept running on a reset SSD"
echo "fio ended with errors $((SECONDS - t0)) s after the reset"
(( SECONDS - t0 < 25 )) || die "host commands waited $((SECONDS - t0)) s for an answer"
grep "NVMe controller given up" "$TARGET_LOG" || die "no reason logged for the failed SSD"
# The host's own view of the status: a passthrough read (not retried by the host) of the
# given-up SSD's namespace gets Namespace Not Ready, retryable (00/82h, no DNR).
out=$(nvme read "$dev" -s 0 -c 0 -z "$(blockdev --getss "$dev")" -d /dev/null 2>&1) && die "a read of the given-up SSD succeeded"
echo "nvme read after the reset: ${out##*NVMe status: }"
grep -qF "(0x82)" <<<"$out" || die "the host did not read Namespace Not Ready (00/82h) back: $out"
nvme_disconnect_nqn "$NQN" >/dev/null
other=$(nvme_connect_dev tcp 4421 "$RAMNQN" -i 1)
verify_rw "$other" 8
nvme_disconnect_nqn "$RAMNQN" >/dev/null
stop_target
step "done"
