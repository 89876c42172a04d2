# The nvme-vfio backend puts the SSD's own CMB in its PRPs: with buffers = "p2p" over NVMe/TCP the
# socket's data lands in CMB chunks and the SSD's DMA is addressed to its CMB (the bus address
# programmed into CMBMSC), which qemu's pci_nvme_map_addr_cmb trace shows byte for byte beside our
# counters; with buffers = "host" no transfer touches the CMB; over rxe the controller falls back.
# The SSD is formatted with 4096-byte blocks, which the target's namespace takes.

NQN=nqn.2026-11.io.p2pnvmf:vfio-cmb
ssd=$(nvme_with_cmb)
[[ -n $ssd ]] || die "no CMB NVMe"
modprobe vfio_pci
echo vfio-pci > "/sys/bus/pci/devices/$ssd/driver_override"
echo "$ssd" > /sys/bus/pci/drivers_probe
[[ $(basename "$(readlink /sys/bus/pci/devices/$ssd/driver)") == vfio-pci ]] || die "$ssd not bound to vfio-pci"
bus=$(bar_bus "$ssd" 2)
step "SSD $ssd on vfio-pci, CMB (BAR2) at bus address $(printf '%#x' "$bus")"
# What an RDMA controller would try: the CMB is VFIO's to export, which this kernel cannot.
"$P2PNVMF_BIN" topology | sed -n '/^dma-buf registration/,$p'
"$P2PNVMF_BIN" topology | grep -q "rxe0 x $ssd: not tried: this kernel cannot export a BAR as a dma-buf (needs Linux 6.19 .*): VFIO_DEVICE_FEATURE_DMA_BUF on $ssd: Inappropriate ioctl for device" \
    || die "topology does not say why no dma-buf would be registered"

# serve_with BUFFERS: the target on the SSD's namespace 1 with that buffer choice.
serve_with() {
    nvme_vfio_config /tmp/scn/target.toml "$NQN" "$ssd" "buffers = \"$1\""
    printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n' >> /tmp/scn/target.toml
    : > "$TARGET_LOG"
    start_target /tmp/scn/target.toml 4421
}

# run_verify TRANSPORT PORT: fio write+verify (4k QD32 × 2, 128k); prints
# "<qemu CMB trace bytes> <bytes through the CMB> <bytes through host memory>".
run_verify() {
    local t0 p0 h0 dev
    read -r t0 p0 h0 < <(echo "$(trace_bytes) $(moved "$ssd") $(moved host)")
    dev=$(nvme_connect_dev "$1" "$2" "$NQN" -i 2)
    fio_verify "$dev" 4k 2 16 >&2
    fio_verify "$dev" 128k 1 8 >&2
    nvme_disconnect_nqn "$NQN" >/dev/null
    echo "$(($(trace_bytes) - t0)) $(($(moved "$ssd") - p0)) $(($(moved host) - h0))"
}

step "buffers = p2p over NVMe/TCP: PRPs carry the CMB's bus address"
serve_with p2p
grep -E "CMB enabled for data|p2p buffers available|NVMe controller up" "$TARGET_LOG"
grep -q "CMB enabled for data: PRPs carry its bus address pci=$ssd bus=$(printf '%#x' "$bus")" "$TARGET_LOG" \
    || die "the driver did not enable the CMB at its bus address"
grep -q "p2p buffers available .*provider=$ssd kind=\"nvme-cmb\"" "$TARGET_LOG" || die "the namespace did not take the CMB"
grep -q "NVMe namespace ready .*block_size=4096" "$TARGET_LOG" || die "the SSD's 4096-byte format was not taken"
read -r tr cmb host < <(run_verify tcp 4421)
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $cmb through the CMB, $host through host memory"
(( tr > 0 && cmb == tr && host == 0 )) || die "p2p run: trace $tr, CMB $cmb, host $host"

step "buffers = p2p over rxe: the controller falls back, nothing touches the CMB"
read -r tr cmb host < <(run_verify rdma 4420)
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $cmb through the CMB, $host through host memory"
# The CMB is mapped through VFIO, whose dma-buf export Debian's 6.12 lacks: that comes first.
grep "controller falls back to host memory" "$TARGET_LOG" | tail -n 1
grep -q "controller falls back to host memory: dma-buf: this kernel cannot export a BAR as a dma-buf (needs Linux 6.19 .*): VFIO_DEVICE_FEATURE_DMA_BUF on $ssd: Inappropriate ioctl for device (os error 25); topology: rxe0 is a software RDMA device" "$TARGET_LOG" \
    || die "no fallback reason"
(( tr == 0 && cmb == 0 && host > 0 )) || die "rxe run: trace $tr, CMB $cmb, host $host"
stop_target

step "buffers = host over NVMe/TCP: nothing touches the CMB"
serve_with host
read -r tr cmb host < <(run_verify tcp 4421)
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $cmb through the CMB, $host through host memory"
(( tr == 0 && cmb == 0 && host > 0 )) || die "host run: trace $tr, CMB $cmb, host $host"
stop_target
step "done"
