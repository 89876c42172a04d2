# Without an IOMMU the nvme-vfio backend refuses the SSD unless dma = "physical" asks for the
# physical-address mode: then it binds uio_pci_generic, takes its DMA memory from locked huge
# pages at their physical addresses, and takes completions from the one INTx interrupt. Device
# memory goes into PRPs at its bus address: the SSD's own CMB (qemu's CMB trace equals our
# counter), an ivshmem BAR and a second NVMe's CMB on the same switch; host memory of the
# transports goes through the driver's bounce buffers. At exit the SSD is given back and the
# kernel's driver reads what was written through the target.

NQN=nqn.2026-11.io.p2pnvmf:no-iommu
# bar_mib BDF N: size of BAR N in MiB.
bar_mib() { read -r s e _ < <(sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource"); echo $(((e - s + 1) >> 20)); }
ssd= cmb= shm=
for d in $(nvme_with_cmb); do
    case $(bar_mib "$d" 2) in 64) ssd=$d ;; 32) cmb=$d ;; esac
done
for d in /sys/bus/pci/devices/*; do
    [[ $(cat "$d/vendor") == 0x1af4 && $(cat "$d/device") == 0x1110 ]] && shm=${d##*/}
done
[[ -n $ssd && -n $shm && -n $cmb ]] || die "expected the SSD, an ivshmem and a peer CMB NVMe, found '$ssd' '$shm' '$cmb'"
[[ ! -e /sys/bus/pci/devices/$ssd/iommu_group ]] || die "$ssd has an IOMMU group: this scenario wants none"
modprobe vfio_pci
modprobe uio_pci_generic

# given_back: the SSD is unbound and its driver_override cleared.
given_back() {
    [[ ! -e /sys/bus/pci/devices/$ssd/driver ]] || die "$ssd left bound to $(readlink /sys/bus/pci/devices/$ssd/driver)"
    [[ $(cat /sys/bus/pci/devices/$ssd/driver_override) == "(null)" ]] || die "driver_override left set"
}

# refused WHY [LINE...]: serve refuses the namespace (configured with LINEs), saying WHY.
refused() {
    local why=$1
    shift
    nvme_vfio_config /tmp/scn/target.toml "$NQN" "$ssd" "$@"
    if "$P2PNVMF_BIN" serve --config /tmp/scn/target.toml > /tmp/scn/refused.log 2>&1; then
        die "serve took the SSD ($*)"
    fi
    grep "$ssd" /tmp/scn/refused.log | tail -n 1
    grep -q "$why" /tmp/scn/refused.log || die "no reason for the refusal: $why"
    given_back
}

step "no IOMMU and no opt-in: refused, the way out named"
refused "$ssd: no IOMMU group: the IOMMU is off.*dma = \"physical\""
step "dma = physical without huge pages reserved: refused, given back"
echo 0 > /proc/sys/vm/nr_hugepages
refused "$ssd: [0-9]* bytes of locked 2 MiB huge pages for DMA (.*nr_hugepages): Cannot allocate memory (os error 12)" 'dma = "physical"'
echo 128 > /proc/sys/vm/nr_hugepages
(( $(cat /proc/sys/vm/nr_hugepages) == 128 )) || die "could not reserve 128 huge pages"

# serve_with LINE...: the target on the SSD's namespace 1 in physical-address mode.
serve_with() {
    nvme_vfio_config /tmp/scn/target.toml "$NQN" "$ssd" 'dma = "physical"' "$@"
    printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n' >> /tmp/scn/target.toml
    printf '[[p2p.provider]]\npci = "%s"\nkind = "nvme-cmb"\n' "$ssd" >> /tmp/scn/target.toml
    printf '[[p2p.provider]]\npci = "%s"\nkind = "nvme-cmb"\n' "$cmb" >> /tmp/scn/target.toml
    printf '[[p2p.provider]]\npci = "%s"\nkind = "bar"\nbar = 2\n' "$shm" >> /tmp/scn/target.toml
    : > "$TARGET_LOG"
    start_target /tmp/scn/target.toml 4421
    grep -q "NVMe controller up through uio_pci_generic at physical addresses pci=$ssd" "$TARGET_LOG" \
        || die "the SSD was not brought up in physical-address mode"
}

# run_verify TRANSPORT PORT MEMORY: fio write+verify (4k QD32 × 2, 128k QD32); prints
# "<qemu CMB trace bytes> <bytes through MEMORY> <bytes through host memory>".
run_verify() {
    local t0 p0 h0 dev
    read -r t0 p0 h0 < <(echo "$(trace_bytes) $(moved "$3") $(moved host)")
    dev=$(nvme_connect_dev "$1" "$2" "$NQN" -i 2)
    fio_verify "$dev" 4k 2 16 >&2
    fio_verify "$dev" 128k 1 16 >&2
    nvme_disconnect_nqn "$NQN" >/dev/null
    echo "$(($(trace_bytes) - t0)) $(($(moved "$3") - p0)) $(($(moved host) - h0))"
}

step "buffers = p2p over NVMe/TCP: PRPs carry the SSD's CMB bus address"
serve_with 'buffers = "p2p"' "provider = \"$ssd\""
grep -q "CMB enabled for data: PRPs carry its bus address pci=$ssd bus=$(printf '%#x' "$(bar_bus "$ssd" 2)")" "$TARGET_LOG" \
    || die "the driver did not enable the CMB at its bus address"
read -r tr own host < <(run_verify tcp 4421 "$ssd")
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $own through the CMB, $host through host memory"
(( tr > 0 && own == tr && host == 0 )) || die "CMB run: trace $tr, CMB $own, host $host"
# Completions came by INTx through /dev/uioN (not the once-a-second health poll).
irqs=$(awk '/uio_pci_generic/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }' /proc/interrupts)
echo "$irqs INTx interrupts taken by uio_pci_generic"
(( irqs > 100 )) || die "only $irqs INTx interrupts: completions were not signalled"
! grep "bounce buffer" "$TARGET_LOG" || die "CMB data went through bounce buffers"

step "over rxe the controller falls back to host memory: bounce buffers in the huge pages"
read -r tr own host < <(run_verify rdma 4420 "$ssd")
echo "qemu traced $tr bytes CMB-addressed; p2pnvmf counted $own through the CMB, $host through host memory"
(( tr == 0 && own == 0 && host > 0 )) || die "rxe run: trace $tr, CMB $own, host $host"
grep -q "the SSD cannot reach this queue's buffers (host memory outside the driver's huge pages, in physical-address mode)" \
    "$TARGET_LOG" || die "no bounce reason logged"
stop_target
given_back

for peer in "$shm" "$cmb"; do
    step "buffers = p2p pinned to the peer $peer: PRPs carry its bus address, no IOMMU to map"
    serve_with 'buffers = "p2p"' "provider = \"$peer\""
    read -r tr through host < <(run_verify tcp 4421 "$peer")
    echo "p2pnvmf counted $through bytes through $peer, $host through host memory; the SSD's own CMB trace $tr"
    grep -q "peer memory reached by the SSD at its bus address (no IOMMU) pci=$ssd" "$TARGET_LOG" || die "no peer address"
    (( through > 0 && host == 0 && tr == 0 )) || die "$peer run: through $through, host $host, trace $tr"
    stop_target
done

step "buffers = host over NVMe/TCP; a pattern read back by the kernel's driver after exit"
serve_with 'buffers = "host"'
read -r tr own host < <(run_verify tcp 4421 "$ssd")
(( tr == 0 && own == 0 && host > 0 )) || die "host run: trace $tr, CMB $own, host $host"
given_back_holds_pattern "$NQN" "$ssd"
step "done"
