# The appliance form of high availability: a dual-ported SSD (qemu's nvme-subsys: two
# controllers, one shared namespace), head A driving controller 0 and head B controller 1 through
# the nvme-vfio backend, each with its own controller's CMB as p2p buffers, the owner of ANA
# group 1 chosen through etcd (one member in the guest). The Linux host multipaths natively and
# fio verifies through the head device (io_uring, QD32) the whole time, over NVMe/TCP then
# NVMe/RDMA: the owner is SIGKILLed, I/O goes on through the other head's controller; the killed
# head restarts (taking its controller as the kill left it) and rejoins; a planned move fails
# back. Witnesses outside our counters: qemu's trace of the DMA each controller addressed to its
# own CMB (which CMB carried the data, before and after the kill), the host's per-path block
# statistics, and at the end the kernel's own nvme driver on the SSD, which must read what was
# written through the heads.
NQN=nqn.2026-12.io.p2pnvmf:ha
UUID=8e6f5c43-af70-4db1-c24e-5f6a7b8c9da3
A_IP=$GUEST_IP
B_IP=10.0.2.16
RUNS=${DUAL_RUNS:?its size comes from the test (Scenario::size)}
export FIO_ENGINE=io_uring

ip addr add "$B_IP/24" dev eth0 || die "second address for head B"

step "the dual-ported SSD through the kernel's nvme driver: one subsystem, two controllers, one shared namespace"
mapfile -t ctl < <(nvme_with_cmb)
(( ${#ctl[@]} == 2 )) || die "expected two NVMe controllers with a CMB, found: ${ctl[*]}"
modprobe nvme
disk=$(nvme_disk "${ctl[0]}")
nvme list-subsys "/dev/$disk" | tee /tmp/subsys.txt
(( $(grep -c "pcie ${ctl[0]}\|pcie ${ctl[1]}" /tmp/subsys.txt) == 2 )) || die "the kernel does not see both controllers in one subsystem"
nmic=$(nvme id-ns "/dev/$disk" -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["nmic"])')
(( nmic & 1 )) || die "namespace 1 is not shared (NMIC $nmic)"
# A pattern written by the kernel before the heads exist; read back through them and at the end.
head -c $((16 << 20)) /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of="/dev/$disk" bs=1M seek=192 oflag=direct status=none || die "writing the pattern through the kernel"
for c in "${ctl[@]}"; do echo "$c" > /sys/bus/pci/drivers/nvme/unbind; done
modprobe vfio_pci
declare -A CTL=([a]=${ctl[0]} [b]=${ctl[1]}) CMB_BUS CMB_SIZE
for h in a b; do
    CMB_BUS[$h]=$(bar_bus "${CTL[$h]}" 2)
    CMB_SIZE[$h]=$(( $(sed -n 3p "/sys/bus/pci/devices/${CTL[$h]}/resource" | awk '{ print strtonum($2) - strtonum($1) + 1 }') ))
    echo "head $h: controller ${CTL[$h]}, CMB at bus address $(printf '%#x' "${CMB_BUS[$h]}") ($((CMB_SIZE[$h] >> 20)) MiB)"
done
# cmb_bytes NAME FROM: bytes of DMA qemu traced into head NAME's controller's CMB since FROM.
cmb_bytes() { trace_bytes "${CMB_BUS[$1]}" "${CMB_SIZE[$1]}" "$2"; }

step "etcd; heads A and B, each on its own controller with its CMB as buffers"
etcd_member
# carried_by NAME: 3 s of fio while head NAME serves; qemu's trace must show DMA into NAME's CMB
# alone over NVMe/TCP (its buffers there), into no CMB over rxe (host memory: rxe cannot reach it).
carried_by() {
    local mark a b
    mark=$(trace_size)
    sleep 3
    a=$(cmb_bytes a "$mark"); b=$(cmb_bytes b "$mark")
    echo "$t, $1 serving: in 3 s qemu traced $a bytes of DMA into A's CMB, $b into B's"
    case $t:$1 in
        tcp:a) (( a > 0 && b == 0 )) ;;
        tcp:b) (( b > 0 && a == 0 )) ;;
        *) (( a == 0 && b == 0 )) ;;
    esac || die "the DMA went elsewhere than $t through head $1's controller should take it"
}
for h in a b; do
    head_config "/tmp/scn/$h.toml" "$(addr_of $h)" "$([[ $h == a ]] && echo 1 || echo 1001)" \
        "backend = \"nvme-vfio\"\npci = \"${CTL[$h]}\"\nbuffers = \"p2p\""
    printf '[cluster]\netcd = ["http://127.0.0.1:2379"]\nname = "%s"\nlease_ttl = "5s"\n' "$h" >> "/tmp/scn/$h.toml"
    # Two heads on one machine (two on two machines need no such line): each names its own CMB,
    # so neither maps the other's, which the other's VFIO holds.
    printf '\n[[p2p.provider]]\npci = "%s"\nkind = "nvme-cmb"\n' "${CTL[$h]}" >> "/tmp/scn/$h.toml"
done
start_head a /tmp/scn/a.toml "$A_IP" 4420
for _ in $(seq 100); do [[ $(owner) == a ]] && break; sleep 0.1; done
[[ $(owner) == a ]] || die "head A did not take group 1"
start_head b /tmp/scn/b.toml "$B_IP" 4420
for h in a b; do
    grep -q "CMB enabled for data: PRPs carry its bus address pci=${CTL[$h]} bus=$(printf '%#x' "${CMB_BUS[$h]}")" "/tmp/scn/$h.log" \
        || die "head $h's driver did not enable ${CTL[$h]}'s CMB at its bus address"
    grep -q "p2p buffers available .*provider=${CTL[$h]} kind=\"nvme-cmb\"" "/tmp/scn/$h.log" || die "head $h's namespace did not take its controller's CMB"
    ! grep "p2p provider unusable" "/tmp/scn/$h.log" || die "head $h tried a CMB it does not own"
done

for t in tcp rdma; do
    port=$([[ $t == rdma ]] && echo 4421 || echo 4420)
    step "$t: a path to each head; the owner optimized, the other non-optimized"
    connect_heads "$t" "$port"
    dd if="/dev/$head" of=/tmp/readback bs=1M skip=192 count=16 iflag=direct status=none || die "reading the pattern through the heads"
    cmp /tmp/pattern /tmp/readback || die "$t: the heads read other bytes than the kernel wrote to the SSD"

    step "$t: $RUNS runs: the owner SIGKILLed under fio verify; I/O goes on through the other head's controller"
    verify_loop "/dev/$head" &
    fio_pid=$!
    carried_by "$(owner)"
    for run in $(seq "$RUNS"); do
        kill_owner "$run"
        carried_by "$n"
        rejoin "$o"
        echo "run $run: $o restarted on ${CTL[$o]} as the kill left it, non-optimized"
    done

    step "$t: failback by planned move while fio verifies"
    o=$(owner); n=$(other "$o")
    c0=$(ios "${P[$n]}")
    out=$(head_ctl "$o" ana move 1 "$n") || die "ana move 1 $n: $out"
    echo "$out"
    wait_ana "${P[$n]}" optimized; wait_ana "${P[$o]}" non-optimized
    carried_by "$n"
    (( $(ios "${P[$n]}") > c0 )) || die "no I/O through $n after the move"
    stop_verify "$fio_pid" "$t: across the kills and the move"
    if [[ $t == rdma ]]; then
        grep -q "controller falls back to host memory: .*rxe0 is a software RDMA device" "/tmp/scn/$n.log" \
            || die "head $n did not say why its RDMA controllers use host memory"
    fi
    nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
done

step "the heads stop; the kernel's nvme driver reads what was written through them"
for h in a b; do
    kill -TERM "${HEAD_PID[$h]}"
    wait "${HEAD_PID[$h]}" || die "head $h exited with $? after SIGTERM"
    unset "HEAD_PID[$h]"
    # A head gives back at exit what it bound itself; the restarted head found its controller on
    # vfio-pci (bound by the head before it) and leaves it there.
    if [[ -e /sys/bus/pci/devices/${CTL[$h]}/driver ]]; then
        echo "${CTL[$h]}" > /sys/bus/pci/drivers/vfio-pci/unbind
        echo > "/sys/bus/pci/devices/${CTL[$h]}/driver_override"
    fi
done
# Through each controller alone (the other unbound), then fio's last round verified again (same
# job, same seed) from the SSD itself.
for i in 0 1; do
    echo "${ctl[$i]}" > /sys/bus/pci/drivers_probe
    disk=$(nvme_disk "${ctl[$i]}")
    dd if="/dev/$disk" of=/tmp/readback bs=1M skip=192 count=16 iflag=direct status=none || die "reading /dev/$disk"
    cmp /tmp/pattern /tmp/readback || die "the kernel reads another pattern through ${ctl[$i]}"
    FIO_VERIFY_ONLY=1 fio_verify "/dev/$disk" 16k 2 64
    echo "${ctl[$i]}" > /sys/bus/pci/drivers/nvme/unbind
done
echo "the kernel reads through each controller the pattern it wrote, and fio's last round verifies"
