# One namespace, several controllers: the Linux host reaches one subsystem through two of our
# listeners (two controllers of one host) and, through a third, as a second host identity —
# over NVMe/TCP and over NVMe/RDMA. With the host's native multipath every controller joins one
# head device (fio verify through it while a path goes away); with nvme_core.multipath=N each
# controller gets its own block device and both see the same bytes. Before the namespace
# reported itself shared (NMIC), the second controller got "duplicate IDs in subsystem" and no
# namespace.
NQN=nqn.2026-12.io.p2pnvmf:shared
HOST2NQN=nqn.2014-08.org.nvmexpress:uuid:7d1e0c3a-2b4f-4e6a-9c8d-1f2e3a4b5c6d
HOST2ID=7d1e0c3a-2b4f-4e6a-9c8d-1f2e3a4b5c6d
UUID=3c2d7a1e-5b4f-4c6e-8a9d-0b1c2d3e4f50

modprobe brd rd_nr=1 rd_size=131072 || die "modprobe brd"
cfg=/tmp/scn/target.toml
: > "$cfg"
# port T I: our listener I (0-2) of transport T.
port() { if [[ $1 == rdma ]]; then echo $((4423 + $2)); else echo $((4420 + $2)); fi; }
for t in tcp rdma; do
    for i in 0 1 2; do
        port=$(port "$t" "$i")
        printf '[[listener]]\nname = "%s%d"\ntransport = "%s"\naddress = "%s"\nport = %d\n\n' "$t" "$i" "$t" "$GUEST_IP" "$port" >> "$cfg"
    done
done
cat >> "$cfg" <<CFG
[[subsystem]]
nqn = "$NQN"
hosts = ["$HOSTNQN", "$HOST2NQN"]

[[subsystem.namespace]]
nsid = 1
backend = "file"
path = "/dev/ram0"
uuid = "$UUID"
CFG
start_target "$cfg"

# connect T I [host2]: connects to listener I of transport T and echoes the new controller.
connect() {
    if [[ ${3:-} == host2 ]]; then
        nvme_connect_ctrl "$1" "$(port "$1" "$2")" "$NQN" --hostnqn="$HOST2NQN" --hostid="$HOST2ID"
    else
        nvme_connect_ctrl "$1" "$(port "$1" "$2")" "$NQN"
    fi
}
# disks: the namespace block devices (nvmeXnY) of $NQN, settled.
disks() {
    local b
    sleep 0.5
    for b in /sys/block/nvme*n*; do
        [[ ${b##*/} =~ ^nvme[0-9]+n[0-9]+$ && $(cat "$b/uuid" 2>/dev/null) == "$UUID" ]] && echo "${b##*/}"
    done
}
# paths: the hidden per-controller disks (nvmeXcYnZ) of $NQN's namespace, under its head.
paths() {
    local b
    for b in /sys/block/nvme*c*n*; do
        [[ -e $b && $(cat "$b/uuid" 2>/dev/null) == "$UUID" ]] && echo "${b##*/}"
    done
    return 0
}
no_duplicate_ids() {
    if dmesg | grep -E "duplicate IDs|IDs don't match|Duplicate unshared"; then die "the host refused a controller's namespace"; fi
}

for t in tcp rdma; do
    step "$t, native multipath: two controllers of one host and one of a second host, one head"
    c1=$(connect "$t" 0); c2=$(connect "$t" 1); c3=$(connect "$t" 2 host2)
    [[ $(cat "/sys/class/nvme/$c1/hostnqn") == "$HOSTNQN" && $(cat "/sys/class/nvme/$c3/hostnqn") == "$HOST2NQN" ]] \
        || die "host identities not as connected"
    mapfile -t heads < <(disks)
    [[ ${#heads[@]} -eq 1 ]] || { ls /sys/block; die "expected one head device for $NQN, found ${#heads[*]}: ${heads[*]}"; }
    head=${heads[0]}
    echo "head /dev/$head with paths: $(paths | tr '\n' ' ')"
    [[ $(paths | wc -l) -eq 3 ]] || die "/dev/$head has paths '$(paths | tr '\n' ' ')', not three"
    nvme list-subsys "/dev/$head" | tee /tmp/subsys.txt
    [[ $(grep -c " $t traddr=" /tmp/subsys.txt) -eq 3 ]] || die "nvme list-subsys does not show three $t paths"
    no_duplicate_ids

    step "$t: fio verify through the head while one path is disconnected"
    (fio_verify "/dev/$head" 16k 2 64 >/tmp/fio.out 2>&1; echo $? >/tmp/fio.rc) &
    fio_pid=$!
    sleep 2
    nvme disconnect -d "/dev/$c1" >/dev/null || die "disconnecting $c1"
    wait "$fio_pid"
    cat /tmp/fio.out
    [[ $(cat /tmp/fio.rc) == 0 ]] || die "fio verify through /dev/$head failed when $c1 went away"
    [[ $(paths | wc -l) -eq 2 ]] || die "the head did not lose exactly one path: $(paths | tr '\n' ' ')"
    nvme_disconnect_all=$(nvme disconnect -n "$NQN") || die "disconnect $NQN"
    echo "$nvme_disconnect_all"
    [[ -z $(disks) ]] || die "block devices of $NQN left after disconnecting"
done

step "without native multipath (nvme_core.multipath=N): a block device per controller, one namespace"
modprobe -r nvme_tcp nvme_rdma nvme_fabrics nvme_core || die "unloading the host's nvme modules"
modprobe nvme_core multipath=N && modprobe nvme_tcp && modprobe nvme_rdma || die "reloading nvme_core multipath=N"
[[ $(cat /sys/module/nvme_core/parameters/multipath) == N ]] || die "multipath still on"
dmesg -C
for t in tcp rdma; do
    c1=$(connect "$t" 0); c2=$(connect "$t" 2 host2)
    mapfile -t devs < <(disks)
    [[ ${#devs[@]} -eq 2 ]] || { ls /sys/block; die "$t: expected a block device per controller, found: ${devs[*]}"; }
    no_duplicate_ids
    [[ $(cat "/sys/block/${devs[0]}/wwid") == "$(cat "/sys/block/${devs[1]}/wwid")" ]] || die "the two devices report other IDs"
    echo "$t: /dev/${devs[0]} and /dev/${devs[1]}, wwid $(cat "/sys/block/${devs[0]}/wwid")"
    head -c $((8 << 20)) /dev/urandom > /tmp/pattern
    dd if=/tmp/pattern of="/dev/${devs[0]}" bs=1M oflag=direct status=none || die "write through /dev/${devs[0]}"
    dd if="/dev/${devs[1]}" of=/tmp/readback bs=1M count=8 iflag=direct status=none || die "read through /dev/${devs[1]}"
    cmp /tmp/pattern /tmp/readback || die "$t: the second host identity reads other bytes than the first wrote"
    echo "$t: 8 MiB written as $HOSTNQN read back as $HOST2NQN"
    nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
done
stop_target
