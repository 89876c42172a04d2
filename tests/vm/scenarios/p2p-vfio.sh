# A CMB NVMe bound to vfio-pci (guest intel-iommu): sysfs resourceN cannot be mapped for a
# claimed device, so the registers and the CMB are reached through VFIO regions. CMBMSC is
# programmed through that mapping, and NVMe/TCP with buffers = "p2p" moves data through it.

cmb=$(nvme_with_cmb)
[[ -n $cmb ]] || die "no CMB NVMe"
bus=$(bar_bus "$cmb" 2)
bar0=$(bar_start "$cmb" 0)
[[ $(reg32 "$bar0 + 0x50") == 0x00000000 ]] || die "CMBMSC already programmed"
group=$(basename "$(readlink "/sys/bus/pci/devices/$cmb/iommu_group")")
step "CMB NVMe $cmb in IOMMU group $group: $(ls "/sys/kernel/iommu_groups/$group/devices" | tr '\n' ' ')"
modprobe vfio_pci || die "loading vfio-pci"
echo vfio-pci > "/sys/bus/pci/devices/$cmb/driver_override"
echo "$cmb" > /sys/bus/pci/drivers_probe
[[ $(readlink "/sys/bus/pci/devices/$cmb/driver") == */vfio-pci ]] || die "$cmb not bound to vfio-pci"
[[ -c /dev/vfio/$group ]] || die "no /dev/vfio/$group"

step "topology through VFIO"
"$P2PNVMF_BIN" topology | tee /tmp/scn/topology.txt
"$P2PNVMF_BIN" topology --json > /tmp/scn/vfio.json || die "topology with a vfio-pci CMB failed"
python3 -c "
import json
p = [p for p in json.load(open('/tmp/scn/vfio.json'))['providers'] if p['pci'] == '$cmb'][0]
assert p['usable'] and p['cmbmsc'] == hex($bus | 3) and p['bus_addr'] == hex($bus), p
" || die "the vfio-pci CMB is not usable or CMBMSC was not programmed through VFIO"

step "NVMe/TCP with buffers = p2p through the VFIO-mapped CMB"
NQN=nqn.2026-11.io.p2pnvmf:vfio
tcp_config /tmp/scn/target.toml "$NQN"
sed -i 's/^backend = "ram"$/backend = "ram"\nbuffers = "p2p"/' /tmp/scn/target.toml
grep -q '^buffers = "p2p"$' /tmp/scn/target.toml || die "config edit failed"
start_target /tmp/scn/target.toml
grep -q "p2p provider mapped provider=$cmb" "$TARGET_LOG" || die "the CMB was not mapped through VFIO"
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 2)
grep -q "p2p buffers: NVMe/TCP" "$TARGET_LOG" || die "the controller did not take p2p buffers"
fio_verify "$dev" 4k 2 16
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
