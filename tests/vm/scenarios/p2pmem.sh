# The SSD moves data through the CMB with the kernel's own NVMe driver, on the P2PDMA guest
# kernel: a switch holds the CMB NVMe (its CMB published as p2pmem), the NIC and a peer NVMe.
# File namespaces on both NVMe block devices take p2pmem buffers; over NVMe/TCP the socket data
# lands in the chunk the SSD writes from and the SSD reads into the chunk the socket sends from.
# Witnesses: fio verify, qemu's pci_nvme_map_addr_cmb trace (the CMB NVMe's own transfers
# addressed to its CMB), and our byte counters by memory — which must agree. RDMA over rxe
# falls back per controller. The kernel's nvmet with its p2pmem attribute is the reference.
# Then p2p, host memory and the kernel target side by side on the same device.

CMBP2P=nqn.2026-11.io.p2pnvmf:cmb-p2p
CMBHOST=nqn.2026-11.io.p2pnvmf:cmb-host
PEERP2P=nqn.2026-11.io.p2pnvmf:peer-p2p
BENCH_RUNTIME=${P2PMEM_BENCH_RUNTIME:?its size comes from the test (Scenario::size)}

cmb=$(nvme_with_cmb)
peer=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | grep -v "$cmb" | cut -d/ -f6)
[[ -n $cmb && -n $peer ]] || die "expected a CMB NVMe and a peer NVMe, found '$cmb' '$peer'"
cmbdisk=$(nvme_disk "$cmb")
peerdisk=$(nvme_disk "$peer")
step "CMB NVMe $cmb ($cmbdisk), peer NVMe $peer ($peerdisk), kernel $(uname -r)"
p2pmem=/sys/bus/pci/devices/$cmb/p2pmem
[[ -f $p2pmem/size ]] || die "no p2pmem for $cmb: is this the P2PDMA kernel?"
dmesg | grep -i "cmb\|p2p" || true
step "p2pmem: size $(cat $p2pmem/size), available $(cat $p2pmem/available), published $(cat $p2pmem/published)"

step "p2pnvmf topology: the p2pmem provider with its BAR's addresses, and who reaches it"
"$P2PNVMF_BIN" topology | tee /tmp/scn/topology.txt
"$P2PNVMF_BIN" topology --json > /tmp/scn/topology.json || die "topology --json failed"
python3 -c "
import json
t = json.load(open('/tmp/scn/topology.json'))
cmb, peer = '$cmb', '$peer'
p = [p for p in t['providers'] if p['pci'] == cmb]
assert len(p) == 1 and p[0]['kind'] == 'p2pmem', t['providers']
p = p[0]
assert (p['bar'], p['size'], p['usable']) == (2, $(cat $p2pmem/size), True), p
assert p['cpu_addr'] == hex($(bar_start "$cmb" 2)) and p['bus_addr'] == hex($(bar_bus "$cmb" 2)), p
assert (p['available'], p['published']) == ($(cat $p2pmem/available), True), p
d = {(x['provider'], x['client']): x for x in t['decisions']}
assert (d[(cmb, cmb)]['path'], d[(cmb, cmb)]['distance']) == ('bus-address', 0), d[(cmb, cmb)]
assert (d[(cmb, peer)]['path'], d[(cmb, peer)]['distance']) == ('bus-address', 4), d[(cmb, peer)]
assert d[(cmb, 'rxe0')]['path'] == 'none', d[(cmb, 'rxe0')]
" || die "topology does not describe the p2pmem provider"

# file_subsystem NQN DEVICE BUFFERS: a subsystem with one file namespace on DEVICE.
file_subsystem() {
    printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\n' "$1"
    printf 'backend = "file"\npath = "%s"\nbuffers = "%s"\n' "$2" "$3"
}
rdma_config /tmp/scn/target.toml "$CMBP2P"
sed -i 's|^backend = "ram"$|backend = "file"|; s|^size = "256MiB"$|path = "/dev/'"$cmbdisk"'"\nbuffers = "p2p"|' \
    /tmp/scn/target.toml
{
    printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n'
    file_subsystem "$CMBHOST" "/dev/$cmbdisk" host
    file_subsystem "$PEERP2P" "/dev/$peerdisk" p2p
} >> /tmp/scn/target.toml
cat /tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
grep -E "the SSD reaches p2pmem|p2p provider" "$TARGET_LOG"
grep -q "p2p provider mapped provider=$cmb kind=\"p2pmem\"" "$TARGET_LOG" || die "the p2pmem was not mapped"
reaches() { grep -q "the SSD reaches p2pmem: .*subnqn=\"$1\" nsid=1 device=$2 .*provider=$cmb path=\"bus-address\" distance=$3" "$TARGET_LOG"; }
reaches "$CMBP2P" "$cmbdisk" 0 || die "the CMB NVMe's namespace did not take its own p2pmem"
reaches "$PEERP2P" "$peerdisk" 4 || die "the peer NVMe's namespace did not take the p2pmem across the switch"

snapshot() { echo "$(trace_bytes) $(moved "$cmb") $(moved host)"; }

# run_verify TRANSPORT PORT NQN: fio write+verify at 4k QD32 and 128k; prints the bytes moved:
# "<qemu CMB trace> <through p2pmem> <through host memory>".
run_verify() {
    local t0 p0 h0 t1 p1 h1 dev
    read -r t0 p0 h0 < <(snapshot)
    dev=$(nvme_connect_dev "$1" "$2" "$3" -i 2)
    fio_verify "$dev" 4k 2 16 >&2
    fio_verify "$dev" 128k 1 8 >&2
    nvme_disconnect_nqn "$3" >/dev/null
    read -r t1 p1 h1 < <(snapshot)
    echo "$((t1 - t0)) $((p1 - p0)) $((h1 - h0))"
}

step "NVMe/TCP, buffers = p2p, the CMB NVMe's own namespace: its DMA is addressed to its CMB"
read -r tr p2p host < <(run_verify tcp 4421 "$CMBP2P")
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $p2p through p2pmem of $cmb, $host through host memory"
grep -q "p2p buffers: NVMe/TCP" "$TARGET_LOG" || die "the TCP controller did not take p2p buffers"
(( tr > 0 )) || die "qemu saw no CMB-addressed transfer"
(( p2p == tr && host == 0 )) || die "counters disagree with qemu: trace $tr, p2pmem $p2p, host $host"

step "NVMe/TCP, buffers = host, the same device: no CMB-addressed transfer"
read -r tr p2p host < <(run_verify tcp 4421 "$CMBHOST")
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $p2p through p2pmem, $host through host memory"
(( tr == 0 && p2p == 0 && host > 0 )) || die "host buffers touched the CMB: trace $tr, p2pmem $p2p, host $host"

step "NVMe/TCP, buffers = p2p, the peer NVMe: its DMA crosses the switch into the CMB"
read -r tr p2p host < <(run_verify tcp 4421 "$PEERP2P")
echo "qemu traced $tr bytes on the CMB NVMe; p2pnvmf counted $p2p through p2pmem of $cmb, $host through host memory"
# The peer's DMA is not the CMB NVMe's own transfer, so qemu's CMB trace stays quiet; the
# verify proves the bytes went through the CMB (the socket's data is only ever in the chunk).
(( tr == 0 && p2p > 0 && host == 0 )) || die "peer run: trace $tr, p2pmem $p2p, host $host"

step "NVMe/RDMA over rxe, buffers = p2p: per-controller fallback to host memory"
read -r tr p2p host < <(run_verify rdma 4420 "$CMBP2P")
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $p2p through p2pmem, $host through host memory"
# The NIC would need a dma-buf of the memory, which p2pmem cannot give; the topology beside it.
grep "controller falls back to host memory" "$TARGET_LOG" | tail -n 1
grep -q "controller falls back to host memory: dma-buf: [0-9a-f:.]* is p2pmem, which the kernel's driver allocates and no interface exports as a dma-buf; topology: rxe0 is a software RDMA device" "$TARGET_LOG" \
    || die "no per-controller fallback reason for rxe0"
(( tr == 0 && p2p == 0 && host > 0 )) || die "rxe run: trace $tr, p2pmem $p2p, host $host"
wget -qO- http://127.0.0.1:9464/metrics | grep -E "p2pnvmf_backend_bytes_total|p2pnvmf_p2p_fallbacks_total"
ours=$(grep -E "the SSD reaches p2pmem|controller falls back|p2p buffers:" "$TARGET_LOG" | sort -u)
stop_target
[[ $(cat $p2pmem/available) -gt 0 ]] || die "the target's p2pmem was not given back at exit"

step "reference: the kernel's nvmet, p2pmem = 1 on the CMB NVMe's namespace, an RDMA port over rxe"
modprobe nvmet
modprobe nvmet-rdma
modprobe nvmet-tcp
dmesg -C
s=/sys/kernel/config/nvmet/subsystems/kref
mkdir "$s" && echo 1 > "$s/attr_allow_any_host" && mkdir "$s/namespaces/1"
echo -n "/dev/$cmbdisk" > "$s/namespaces/1/device_path"
echo 1 > "$s/namespaces/1/p2pmem" || die "the kernel refused the p2pmem attribute"
echo 1 > "$s/namespaces/1/enable" || { dmesg; die "the kernel refused to enable a p2pmem namespace on /dev/$cmbdisk"; }
nvmet_kernel_port 1 rdma 4422 kref
nvmet_kernel_port 2 tcp 4423 kref
t0=$(trace_bytes)
dev=$(nvme_connect_dev rdma 4422 kref -i 2)
fio_verify "$dev" 4k 2 16
nvme_disconnect_nqn kref >/dev/null
t1=$(trace_bytes)
kernel=$(dmesg | grep -iE "p2p|nvmet" || true)
echo "--- the kernel nvmet decided (dmesg) ---"
echo "$kernel"
echo "kernel: namespace enabled with p2pmem (pci_p2pmem_find found memory /dev/$cmbdisk reaches);" \
     "$( grep -q "using p2pmem" <<<"$kernel" && echo "the rxe controller uses it" \
         || echo "no 'using p2pmem' at connect: rxe0 uses virtual DMA (ib_dma_pci_p2p_dma_supported is false), host memory")"
echo "qemu traced $((t1 - t0)) bytes CMB-addressed during the kernel target's run"
echo "--- p2pnvmf decided (log) ---"
echo "$ours"
(( t1 == t0 )) || grep -q "using p2pmem" <<<"$kernel" || die "CMB transfers without the kernel choosing p2pmem"

step "side by side on /dev/$cmbdisk over NVMe/TCP: p2pnvmf (p2p, host) and the kernel's nvmet (${BENCH_RUNTIME}s each)"
bench_tcp kernel-nvmet kref 4423 | tee /tmp/scn/bench.txt
echo 0 > "$s/namespaces/1/enable"
rm "/sys/kernel/config/nvmet/ports/1/subsystems/kref" "/sys/kernel/config/nvmet/ports/2/subsystems/kref"
start_target /tmp/scn/target.toml 4421
bench_tcp p2pnvmf-p2p "$CMBP2P" 4421 | tee -a /tmp/scn/bench.txt
bench_tcp p2pnvmf-host "$CMBHOST" 4421 | tee -a /tmp/scn/bench.txt
stop_target
step "done"
