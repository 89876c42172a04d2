# The nvme-vfio backend puts peer memory in its PRPs: an SSD without a CMB and an ivshmem memory
# BAR (a peer device's memory) below one switch, the guest IOMMU on. With buffers = "p2p" the
# namespace takes chunks of the BAR, the driver maps the BAR window for the SSD at IOVA = its bus
# address, and every PRP carries bus address + offset: fio verify passes over NVMe/TCP with every
# byte the SSD moved counted through the BAR and none through host memory.

NQN=nqn.2026-11.io.p2pnvmf:vfio-peer
ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | head -n1 | cut -d/ -f6)
shm=
for d in /sys/bus/pci/devices/*; do
    [[ $(cat "$d/vendor") == 0x1af4 && $(cat "$d/device") == 0x1110 ]] && shm=${d##*/}
done
[[ -n $ssd && -n $shm ]] || die "expected an NVMe and an ivshmem function, found '$ssd' '$shm'"
bus=$(bar_bus "$shm" 2)
step "SSD $ssd, peer memory: ivshmem $shm BAR2 at bus address $(printf '%#x' "$bus")"

rdma_config /tmp/scn/target.toml "$NQN"
sed -i "s|^backend = \"ram\"$|backend = \"nvme-vfio\"\npci = \"$ssd\"\nbuffers = \"p2p\"|; /^size = /d" /tmp/scn/target.toml
printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n[[p2p.provider]]\npci = "%s"\nkind = "bar"\nbar = 2\n' "$shm" \
    >> /tmp/scn/target.toml
modprobe vfio_pci
start_target /tmp/scn/target.toml 4421
grep -q "p2p buffers available .*provider=$shm kind=\"bar\"" "$TARGET_LOG" || die "the namespace did not take the BAR"

step "NVMe/TCP, buffers = p2p: the SSD's DMA goes to the BAR at its bus address"
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
fio_verify "$dev" 4k 2 16
fio_verify "$dev" 128k 1 16
nvme_disconnect_nqn "$NQN" >/dev/null
grep "peer memory mapped for the SSD" "$TARGET_LOG" || die "the BAR was not mapped for the SSD"
grep -q "peer memory mapped for the SSD at IOVA = its bus address pci=$ssd bus=$(printf '%#x' "$bus")" "$TARGET_LOG" \
    || die "the BAR was mapped elsewhere than at its bus address"
! grep "bounce buffer" "$TARGET_LOG" || die "data went through bounce buffers"
through=$(moved "$shm")
host=$(moved host)
echo "p2pnvmf counted $through bytes through the BAR of $shm, $host through host memory"
(( through >= 2 * (32 << 20) && host == 0 )) || die "BAR $through, host $host"
stop_target
step "done"
