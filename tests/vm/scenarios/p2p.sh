# The p2p layer in a real PCIe topology: a switch holding the CMB NVMe and the NIC (rxe0 runs
# on it), a second NVMe on another root port. `p2pnvmf topology` must read the CMB, program
# CMBMSC with its bus address (checked through /dev/mem, independently of our code) and decide
# per client; serving over rxe with buffers = "auto" falls back per controller with the reason
# and keeps the data right; over NVMe/TCP with buffers = "p2p" the data goes through the CMB.

cmb=$(nvme_with_cmb)
plain=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | grep -v "$cmb" | cut -d/ -f6)
[[ -n $cmb && -n $plain ]] || die "expected a CMB NVMe and a plain NVMe, found '$cmb' '$plain'"
step "CMB NVMe $cmb, plain NVMe $plain"
[[ ! -e /sys/bus/pci/devices/$cmb/driver ]] || die "$cmb is bound: the rig loads no nvme PCI driver"

bar0=$(bar_start "$cmb" 0)
# The BAR2 register pair in config space: the bus address, as the device decodes it.
bus=$(bar_bus "$cmb" 2)
step "BAR0 $bar0, CMB BAR2 bus address $(printf '%#x' $bus)"
# NVMe 1.4+: until CMBMSC.CRE is set CMBSZ reads 0 (the controller starts with CMBMSC 0).
[[ $(reg32 "$bar0 + 0x3c") == 0x00000000 ]] || die "CMBSZ readable before CRE: $(reg32 "$bar0 + 0x3c")"
[[ $(reg32 "$bar0 + 0x50") == 0x00000000 ]] || die "CMBMSC already programmed"

step "p2pnvmf topology"
"$P2PNVMF_BIN" topology | tee /tmp/scn/topology.txt
"$P2PNVMF_BIN" topology --json > /tmp/scn/topology.json || die "topology --json failed"
[[ $(reg32 "$bar0 + 0x50") == $(printf '0x%08X' $((bus | 3))) ]] \
    || die "CMBMSC low dword $(reg32 "$bar0 + 0x50"), expected CRE|CMSE|bus $(printf '%#x' $bus)"
[[ $(reg32 "$bar0 + 0x54") == $(printf '0x%08X' $((bus >> 32))) ]] || die "CMBMSC high dword $(reg32 "$bar0 + 0x54")"
[[ $(reg32 "$bar0 + 0x58") == 0x00000000 ]] || die "CMBSTS.CBAI: the controller refused the CBA"
cmbsz=$(reg32 "$bar0 + 0x3c")
[[ $cmbsz != 0x00000000 ]] || die "CMBSZ still 0 after CRE"
step "CMBMSC = $(printf '%#x' $((bus | 3))), CMBSZ = $cmbsz"

python3 -c "
import json, sys
t = json.load(open('/tmp/scn/topology.json'))
cmb, plain, bus = '$cmb', '$plain', $bus
p = [p for p in t['providers'] if p['pci'] == cmb]
assert len(p) == 1, t['providers']
p = p[0]
assert (p['kind'], p['bar'], p['size'], p['rds'], p['wds']) == ('nvme-cmb', 2, 64 << 20, True, True), p
assert p['bus_addr'] == hex(bus) and p['cmbmsc'] == hex(bus | 3) and p['offset'] == '0x0', p
assert p['usable'], p
d = {(x['provider'], x['client']): x for x in t['decisions']}
rxe = d[(cmb, 'rxe0')]
assert rxe['path'] == 'none' and rxe['distance'] is None and 'software RDMA device over eth0' in rxe['reason'], rxe
other = d[(cmb, plain)]
assert other['path'] == 'none' and 'host bridge 8086:29c0' in other['reason'], other
assert d[(cmb, cmb)]['path'] == 'bus-address' and d[(cmb, cmb)]['distance'] == 0
assert not [x for x in t['rdma'] if x['name'] == 'rxe0' and not x['software']], t['rdma']
" || die "topology --json does not describe the VM"

step "allow_host_bridges turns the other root port into a host-bridge path"
cat > /tmp/scn/allow.toml <<CFG
[[listener]]
transport = "tcp"
address = "$GUEST_IP"
[p2p]
allow_host_bridges = ["8086:29c0"]
[[p2p.provider]]
pci = "$cmb"
kind = "nvme-cmb"
CFG
"$P2PNVMF_BIN" topology --config /tmp/scn/allow.toml --json > /tmp/scn/allow.json
python3 -c "
import json
d = {(x['provider'], x['client']): x for x in json.load(open('/tmp/scn/allow.json'))['decisions']}
x = d[('$cmb', '$plain')]
assert x['path'] == 'host-bridge' and x['distance'] > 0, x
" || die "allow_host_bridges not applied"

NQN=nqn.2026-11.io.p2pnvmf:p2p
step "serve over rxe with buffers = auto: per-controller fallback"
rdma_config /tmp/scn/target.toml "$NQN"
printf '[metrics]\nlisten = "127.0.0.1:9464"\n' >> /tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
grep -q "p2p provider mapped provider=$cmb" "$TARGET_LOG" || die "the CMB was not mapped"
grep -q "p2p buffers available .*provider=$cmb" "$TARGET_LOG" || die "namespace did not take the CMB"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
# An unbound CMB maps through sysfs, and only VFIO exports a BAR as a dma-buf.
grep "controller falls back to host memory" "$TARGET_LOG" | tail -n 1
grep -q "controller falls back to host memory: dma-buf: $cmb is not bound to vfio-pci, and only VFIO exports a BAR as a dma-buf (bind it to vfio-pci); topology: rxe0 is a software RDMA device" "$TARGET_LOG" \
    || die "no per-controller fallback reason in the log"
fio_verify "$dev" 128k 2
metrics=$(wget -qO- http://127.0.0.1:9464/metrics)
echo "$metrics" | grep p2pnvmf_p2p
echo "$metrics" | grep '^p2pnvmf_p2p_fallbacks_total{' | grep 'level="controller"' | grep 'reason="no_dmabuf"' | grep -q ' 1$' \
    || die "controller fallback not counted once, with reason no_dmabuf"
nvme_disconnect_nqn "$NQN"
stop_target

step "serve over NVMe/TCP with buffers = p2p: data through the CMB"
sed -i 's/^size = "256MiB"$/size = "256MiB"\nbuffers = "p2p"/' /tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
grep -q "p2p buffers: NVMe/TCP" "$TARGET_LOG" || die "the TCP controller did not take p2p buffers"
fio_verify "$dev" 4k 2
# CPU copies into qemu's emulated CMB are slow under TCG: a smaller 128k run.
fio_verify "$dev" 128k 2 8
# 256 KiB transfers exceed a 128 KiB chunk: host memory, counted per request.
fio --name=big --filename="$dev" --ioengine=libaio --direct=1 --rw=write --bs=256k --size=8M >/dev/null \
    || die "256k writes failed"
grep -q "request falls back to host memory: the transfer is larger than a p2p chunk" "$TARGET_LOG" \
    || die "no request-level fallback reason"
metrics=$(wget -qO- http://127.0.0.1:9464/metrics)
echo "$metrics" | grep p2pnvmf_p2p
n=$(echo "$metrics" | grep '^p2pnvmf_p2p_fallbacks_total{' | grep 'level="request"' | grep 'reason="transfer_too_large"' | awk '{ print $NF }')
[[ ${n:-0} -ge 32 ]] || die "expected >= 32 request fallbacks, metrics say '${n:-none}'"
verify_rw "$dev" 16
nvme_disconnect_nqn "$NQN"
stop_target

step "a memory BAR named in the config: ivshmem BAR2 on the same switch as the CMB NVMe"
shm=
for d in /sys/bus/pci/devices/*; do
    [[ $(cat "$d/vendor") == 0x1af4 && $(cat "$d/device") == 0x1110 ]] && shm=${d##*/}
done
[[ -n $shm ]] || die "no ivshmem function"
printf '[[p2p.provider]]\npci = "%s"\nkind = "bar"\nbar = 2\n[[p2p.provider]]\npci = "%s"\nkind = "nvme-cmb"\n' \
    "$shm" "$cmb" >> /tmp/scn/target.toml
"$P2PNVMF_BIN" topology --config /tmp/scn/target.toml --json > /tmp/scn/bar.json || die "topology with a BAR provider"
python3 -c "
import json
t = json.load(open('/tmp/scn/bar.json'))
p = t['providers'][0]
assert (p['pci'], p['kind'], p['bar'], p['size'], p['usable']) == ('$shm', 'bar', 2, 32 << 20, True), p
assert p['bus_addr'] == hex($(bar_bus "$shm" 2)) and p['cpu_addr'] == hex($(bar_start "$shm" 2)), p
d = {(x['provider'], x['client']): x for x in t['decisions']}
x = d[('$shm', '$cmb')]
assert (x['path'], x['distance']) == ('bus-address', 4), x
assert d[('$shm', '$plain')]['path'] == 'none', d[('$shm', '$plain')]
" || die "the BAR provider or its decisions are wrong"
seen=$(wc -l < "$TARGET_LOG")
start_target /tmp/scn/target.toml 4421
tail -n +$((seen + 1)) "$TARGET_LOG" | grep -q "p2p buffers available .*provider=$shm kind=\"bar\"" \
    || die "the namespace did not take the BAR provider"
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
fio_verify "$dev" 128k 2 32
nvme_disconnect_nqn "$NQN"
stop_target

step "buffers = p2p with no usable provider refuses to start"
sed -i 's/^backend = "ram"$/backend = "file"\npath = "\/tmp\/ns.img"/' /tmp/scn/target.toml
if "$P2PNVMF_BIN" serve --config /tmp/scn/target.toml > /tmp/scn/refused.log 2>&1; then
    die "serve started without a usable provider"
fi
cat /tmp/scn/refused.log
grep -q 'namespace 1: buffers = "p2p" but no usable provider: /tmp/ns.img (device 0:[0-9]*): not a block device' \
    /tmp/scn/refused.log || die "no reason for the refusal"

step "a CMB owned by the kernel nvme driver is named unusable"
modprobe -d /tmp/rig nvme || die "modprobe nvme"
for i in $(seq 50); do [[ -e /sys/bus/pci/devices/$cmb/driver ]] && break; sleep 0.1; done
"$P2PNVMF_BIN" topology --config /tmp/scn/allow.toml | tee /tmp/scn/bound.txt
grep -q "unusable: $cmb is bound to the kernel driver nvme" /tmp/scn/bound.txt || die "bound CMB not refused"

step "Debian's kernel: a file namespace on the CMB NVMe's block device falls back, naming the missing p2pmem"
cmbdisk=$(nvme_disk "$cmb")
tcp_config /tmp/scn/nvme.toml "$NQN"
sed -i "s|^backend = \"ram\"$|backend = \"file\"|; s|^size = \"256MiB\"$|path = \"/dev/$cmbdisk\"|" /tmp/scn/nvme.toml
: > "$TARGET_LOG"
start_target /tmp/scn/nvme.toml 4420
grep -q "namespace falls back to host memory: no p2pmem: no PCI function offers /sys/bus/pci/devices/\*/p2pmem" "$TARGET_LOG" \
    || die "no namespace-level fallback naming the missing p2pmem"
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 1)
verify_rw "$dev" 8
nvme_disconnect_nqn "$NQN"
stop_target
sed -i 's|^path = "/dev/'"$cmbdisk"'"$|&\nbuffers = "p2p"|' /tmp/scn/nvme.toml
if "$P2PNVMF_BIN" serve --config /tmp/scn/nvme.toml > /tmp/scn/refused-nvme.log 2>&1; then
    die "serve started with buffers = p2p on a kernel without p2pmem"
fi
cat /tmp/scn/refused-nvme.log
grep -q "namespace 1: buffers = \"p2p\" but no usable provider: no p2pmem" /tmp/scn/refused-nvme.log \
    || die "no reason for the refusal on /dev/$cmbdisk"
step "done"
