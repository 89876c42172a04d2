# The nvme-vfio backend puts peer memory in its PRPs: an SSD without a CMB, an ivshmem memory BAR
# and a second NVMe's CMB below one switch, the guest IOMMU on. With buffers = "p2p" the
# namespace takes chunks of the peer memory, the driver maps the window for the SSD at IOVA = its
# bus address, and every PRP carries bus address + offset: fio verify passes over NVMe/TCP with
# every byte the SSD moved counted through the peer memory and none through host memory.

NQN=nqn.2026-11.io.p2pnvmf:vfio-peer
cmb=$(nvme_with_cmb)
ssd=$(grep -lx 0x010802 /sys/bus/pci/devices/*/class | grep -v "$cmb" | head -n1 | cut -d/ -f6)
shm=
for d in /sys/bus/pci/devices/*; do
    [[ $(cat "$d/vendor") == 0x1af4 && $(cat "$d/device") == 0x1110 ]] && shm=${d##*/}
done
[[ -n $ssd && -n $shm && -n $cmb ]] || die "expected an NVMe, an ivshmem and a CMB NVMe, found '$ssd' '$shm' '$cmb'"
modprobe vfio_pci

# peer_run PROVIDER KIND BUS: serve with the provider configured, fio verify over TCP, and check
# where the bytes went.
peer_run() {
    local provider=$1 kind=$2 bus=$3 through host
    step "NVMe/TCP, buffers = p2p, $kind $provider at bus address $(printf '%#x' "$bus")"
    nvme_vfio_config /tmp/scn/target.toml "$NQN" "$ssd" 'buffers = "p2p"' "provider = \"$provider\""
    # Both peers are providers; the namespace's `provider` key pins one.
    printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n[[p2p.provider]]\npci = "%s"\nkind = "bar"\nbar = 2\n' "$shm" >> /tmp/scn/target.toml
    printf '[[p2p.provider]]\npci = "%s"\nkind = "nvme-cmb"\n' "$cmb" >> /tmp/scn/target.toml
    : > "$TARGET_LOG"
    start_target /tmp/scn/target.toml 4421
    grep -q "p2p buffers available .*provider=$provider kind=\"$kind\"" "$TARGET_LOG" || die "the namespace did not take $provider"
    dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2)
    fio_verify "$dev" 4k 2 16
    fio_verify "$dev" 128k 1 16
    nvme_disconnect_nqn "$NQN" >/dev/null
    grep -q "peer memory mapped for the SSD at IOVA = its bus address pci=$ssd bus=$(printf '%#x' "$bus")" "$TARGET_LOG" \
        || { grep "peer memory" "$TARGET_LOG"; die "$provider was not mapped for the SSD at its bus address"; }
    ! grep "bounce buffer" "$TARGET_LOG" || die "data went through bounce buffers"
    through=$(moved "$provider")
    host=$(moved host)
    echo "p2pnvmf counted $through bytes through $provider, $host through host memory"
    (( through >= 2 * (32 << 20) && host == 0 )) || die "$provider $through, host $host"
    stop_target
}
peer_run "$shm" bar "$(bar_bus "$shm" 2)"
peer_run "$cmb" nvme-cmb "$(bar_bus "$cmb" 2)"
step "done"
