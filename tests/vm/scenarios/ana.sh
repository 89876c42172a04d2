# Two heads, one shared block device, Asymmetric Namespace Access with the Linux host's native
# multipath, over NVMe/TCP and NVMe/RDMA: heads A and B (two p2pnvmf processes on two addresses)
# serve one subsystem with one identity; A reports the group optimized, B non-optimized. The
# host joins both controllers under one head device and shows their ANA states; while fio
# verifies through the head, a reload makes A inaccessible and B optimized (an ANA Change notice:
# the host reads the log and moves its I/O — the per-path block statistics of the host's kernel
# say which path carried it), then back; finally A is SIGKILLed and fio goes on through B.
NQN=nqn.2026-12.io.p2pnvmf:ha
UUID=5b3e2f10-7c4d-4a8e-9f1b-2c3d4e5f6a70
A_IP=$GUEST_IP
B_IP=10.0.2.16

modprobe brd rd_nr=1 rd_size=131072 || die "modprobe brd"
ip addr add "$B_IP/24" dev eth0 || die "second address for head B"
# rxe follows eth0's addresses (a GID for B's): give it a moment before B's RDMA listener binds.
sleep 0.5

# ana_config NAME ADDR CNTLID_MIN STATE: head NAME's configuration, group 1 in STATE.
ana_config() {
    head_config "/tmp/scn/$1.toml" "$2" "$3"
    printf '[ana]\ngroups = { 1 = "%s" }\n' "$4" >> "/tmp/scn/$1.toml"
}
port_of() { if [[ $1 == rdma ]]; then echo 4421; else echo 4420; fi; }

ana_config a "$A_IP" 1 optimized
ana_config b "$B_IP" 1001 non-optimized
start_head a /tmp/scn/a.toml "$A_IP" 4420
start_head b /tmp/scn/b.toml "$B_IP" 4420

for t in tcp rdma; do
    step "$t: one head device, a path to each head, their ANA states"
    port=$(port_of "$t")
    ca=$(TARGET_ADDR=$A_IP nvme_connect_ctrl "$t" "$port" "$NQN" --reconnect-delay=1)
    cb=$(TARGET_ADDR=$B_IP nvme_connect_ctrl "$t" "$port" "$NQN" --reconnect-delay=1)
    sleep 0.5
    pa=$(path_of "$ca"); pb=$(path_of "$cb")
    heads=$(head_dev)
    [[ $(wc -w <<<"$heads") -eq 1 ]] || die "expected one head device for $NQN, found: $heads"
    head=$heads
    echo "head /dev/$head: path $pa via $ca (head A, cntlid $(cat /sys/class/nvme/$ca/cntlid)), $pb via $cb (head B, cntlid $(cat /sys/class/nvme/$cb/cntlid))"
    (( $(cat "/sys/class/nvme/$ca/cntlid") < 1000 && $(cat "/sys/class/nvme/$cb/cntlid") > 1000 )) || die "controller IDs not from each head's range"
    [[ $(ana_of "$pa") == optimized && $(ana_of "$pb") == non-optimized ]] \
        || die "ANA states: A '$(ana_of "$pa")', B '$(ana_of "$pb")'"
    [[ $(cat "/sys/block/$pa/ana_grpid") == 1 ]] || die "ANA group of the path: $(cat "/sys/block/$pa/ana_grpid")"
    nvme list-subsys "/dev/$head" | tee /tmp/subsys.txt
    grep -q "traddr=$A_IP.* live optimized" /tmp/subsys.txt && grep -q "traddr=$B_IP.* live non-optimized" /tmp/subsys.txt \
        || die "nvme list-subsys does not show A optimized and B non-optimized"
    status=$(head_ctl a status)
    grep -q "ANA group 1 optimized" <<<"$status" || { echo "$status"; die "head A's status does not show group 1 optimized"; }

    step "$t: fio verify through the head; A goes inaccessible and B optimized by reload, then back"
    (fio_verify "/dev/$head" 16k 2 96 >/tmp/fio.out 2>&1; echo $? >/tmp/fio.rc) &
    fio_pid=$!
    sleep 2
    (( $(ios "$pa") > 0 )) || die "no I/O on the optimized path A"
    sed -i 's/1 = "optimized"/1 = "inaccessible"/' /tmp/scn/a.toml
    sed -i 's/1 = "non-optimized"/1 = "optimized"/' /tmp/scn/b.toml
    out=$(head_ctl a reload) || die "head A's reload: $out"
    echo "$out"
    grep -q "ANA groups changed \[1\]" <<<"$out" || die "head A's reload did not change group 1"
    head_ctl b reload >/dev/null || die "head B's reload"
    wait_ana "$pa" inaccessible; wait_ana "$pb" optimized
    a0=$(ios "$pa"); b0=$(ios "$pb"); sleep 2
    a1=$(ios "$pa"); b1=$(ios "$pb")
    echo "2 s after the change: path A $((a1 - a0)) I/Os, path B $((b1 - b0))"
    (( a1 == a0 && b1 > b0 )) || die "I/O did not move to B (A +$((a1 - a0)), B +$((b1 - b0)))"
    grep -q "ANA state changed group=1 from=optimized to=inaccessible controllers=1" /tmp/scn/a.log \
        || die "head A did not log the change to its controller"
    sed -i 's/1 = "inaccessible"/1 = "optimized"/' /tmp/scn/a.toml
    sed -i 's/1 = "optimized"/1 = "non-optimized"/' /tmp/scn/b.toml
    head_ctl a reload >/dev/null && head_ctl b reload >/dev/null || die "reload back"
    wait_ana "$pa" optimized; wait_ana "$pb" non-optimized
    wait "$fio_pid"
    cat /tmp/fio.out
    [[ $(cat /tmp/fio.rc) == 0 ]] || die "fio verify through /dev/$head failed across ANA changes"
    nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
done

step "tcp: head A killed while fio runs: I/O goes on through B"
ca=$(TARGET_ADDR=$A_IP nvme_connect_ctrl tcp 4420 "$NQN" --reconnect-delay=1)
cb=$(TARGET_ADDR=$B_IP nvme_connect_ctrl tcp 4420 "$NQN" --reconnect-delay=1)
sleep 0.5
pa=$(path_of "$ca"); pb=$(path_of "$cb")
head=$(head_dev)
(fio_verify "/dev/$head" 16k 2 96 >/tmp/fio.out 2>&1; echo $? >/tmp/fio.rc) &
fio_pid=$!
sleep 2
b0=$(ios "$pb")
kill_head a
wait "$fio_pid"
cat /tmp/fio.out
[[ $(cat /tmp/fio.rc) == 0 ]] || die "fio verify failed when head A died"
echo "path B carried $(( $(ios "$pb") - b0 )) I/Os after head A died"
(( $(ios "$pb") > b0 )) || die "no I/O went through B after A died"

step "head A restarted: the host reconnects and A is optimized again"
start_head a /tmp/scn/a.toml "$A_IP" 4420
for i in $(seq 100); do [[ $(cat "/sys/class/nvme/$ca/state") == live ]] && break; sleep 0.1; done
[[ $(cat "/sys/class/nvme/$ca/state") == live ]] || die "controller $ca to head A is $(cat "/sys/class/nvme/$ca/state")"
wait_ana "$pa" optimized
verify_rw "/dev/$head" 8
nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
