# Without an IOMMU the nvme-vfio backend refuses to take the SSD, says why, and leaves it as it
# was (the physical-address mode, which needs an explicit opt-in, is not built yet).
ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
[[ -n $ssd ]] || die "no NVMe function"
[[ ! -e /sys/bus/pci/devices/$ssd/iommu_group ]] || die "$ssd has an IOMMU group: this scenario wants none"
modprobe vfio_pci
nvme_vfio_config /tmp/scn/target.toml nqn.2026-11.io.p2pnvmf:no-iommu "$ssd"
if "$P2PNVMF_BIN" serve --config /tmp/scn/target.toml > /tmp/scn/refused.log 2>&1; then
    die "serve took an SSD without an IOMMU"
fi
cat /tmp/scn/refused.log
grep -q "$ssd: no IOMMU group: the IOMMU is off" /tmp/scn/refused.log || die "no reason for the refusal"
[[ ! -e /sys/bus/pci/devices/$ssd/driver ]] || die "$ssd left bound to $(readlink /sys/bus/pci/devices/$ssd/driver)"
[[ $(cat /sys/bus/pci/devices/$ssd/driver_override) == "(null)" ]] || die "driver_override left set"
step "done"
