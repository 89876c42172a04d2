# High availability with a three-member etcd (all in the guest): heads A and B name all three
# members. While fio verifies through the host's multipath device (io_uring, QD32):
#   one member killed (the one each head was talking to, as it happens: the first) and
#   restarted — nothing changes for the host: both paths keep their ANA states all the time;
#   two members killed (no quorum) — no lease can be renewed: both heads fence themselves
#   within the lease (every path inaccessible, the host queues its I/O), and when quorum
#   returns one head owns the group again and the I/O goes on; fio sees no error.
NQN=nqn.2026-12.io.p2pnvmf:ha
UUID=7d5e4b32-9e6f-4ca0-b13d-4e5f6a7b8c92
A_IP=$GUEST_IP
B_IP=10.0.2.16
export FIO_ENGINE=io_uring

modprobe brd rd_nr=1 rd_size=131072 || die "modprobe brd"
ip addr add "$B_IP/24" dev eth0 || die "second address for head B"
sleep 0.5

# member I (0-2): client port 2379+2I, peer port 2380+2I.
CLUSTER=e0=http://127.0.0.1:2380,e1=http://127.0.0.1:2382,e2=http://127.0.0.1:2384
declare -A ETCD_PID=()
member() {
    local i=$1
    etcd --name "e$i" --data-dir "/tmp/etcd$i" --listen-client-urls "http://127.0.0.1:$((2379 + 2 * i))" \
        --advertise-client-urls "http://127.0.0.1:$((2379 + 2 * i))" --listen-peer-urls "http://127.0.0.1:$((2380 + 2 * i))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((2380 + 2 * i))" --initial-cluster "$CLUSTER" \
        --initial-cluster-state "${2:-new}" >>"/tmp/scn/etcd$i.log" 2>&1 &
    ETCD_PID[$i]=$!
}
kill_member() { kill -KILL "${ETCD_PID[$1]}"; wait "${ETCD_PID[$1]}" 2>/dev/null || true; }
ENDPOINTS=127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383
owner() { etcdctl --endpoints=$ENDPOINTS get --print-value-only /p2pnvmf/ana/1/owner; }

step "etcd: three members"
for i in 0 1 2; do member "$i"; done
for _ in $(seq 300); do etcdctl --endpoints=$ENDPOINTS endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
etcdctl --endpoints=$ENDPOINTS endpoint health || die "etcd did not come up"

for h in a b; do
    addr=$([[ $h == a ]] && echo "$A_IP" || echo "$B_IP")
    head_config "/tmp/scn/$h.toml" "$addr" "$([[ $h == a ]] && echo 1 || echo 1001)"
    # 10 s leases: killing etcd's leader costs a head an election (seen taking 1.5 s here) and a
    # renewal that waits for it (2 s timed out once) before it renews — more than a 5 s lease's
    # 3.75 s fence leaves under TCG.
    printf '[cluster]\netcd = ["http://127.0.0.1:2379", "http://127.0.0.1:2381", "http://127.0.0.1:2383"]\nname = "%s"\nlease_ttl = "10s"\n' "$h" >> "/tmp/scn/$h.toml"
    start_head "$h" "/tmp/scn/$h.toml" "$addr" 4420
    [[ $h == a ]] && for _ in $(seq 100); do [[ $(owner) == a ]] && break; sleep 0.1; done
done
[[ $(owner) == a ]] || die "head A does not own group 1"
ca=$(TARGET_ADDR=$A_IP nvme_connect_ctrl tcp 4420 "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=-1)
cb=$(TARGET_ADDR=$B_IP nvme_connect_ctrl tcp 4420 "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=-1)
sleep 0.5
pa=$(path_of "$ca"); pb=$(path_of "$cb"); head=$(head_dev)
wait_ana "$pa" optimized; wait_ana "$pb" non-optimized

# steady SECONDS: the host's ANA state of both paths must not change for SECONDS (sampled
# about every 100 ms, slower under load).
steady() {
    local end=$(($(date +%s) + $1)) n=0
    while (( $(date +%s) < end )); do
        [[ $(ana_of "$pa") == optimized && $(ana_of "$pb") == non-optimized ]] \
            || die "a path changed state: A $(ana_of "$pa"), B $(ana_of "$pb")"
        n=$((n + 1))
        sleep 0.1
    done
    echo "steady for $1 s: $n samples of both paths, unchanged"
}

verify_loop "/dev/$head" &
fio_pid=$!
sleep 2
step "one member of three killed for 12 s, then restarted: nothing changes for the host"
kill_member 0
steady 12
member 0 existing
steady 8
etcdctl --endpoints=$ENDPOINTS endpoint health

step "two members killed: no quorum; both heads fence within the lease"
t0=$(($(date +%s%N) / 1000000))
kill_member 1; kill_member 2
wait_ana "$pa" inaccessible; wait_ana "$pb" inaccessible
t1=$(($(date +%s%N) / 1000000))
echo "quorum lost: both paths inaccessible at the host after $((t1 - t0)) ms"
grep -h "cluster: fenced" /tmp/scn/a.log /tmp/scn/b.log | tail -n 2
sleep 3
step "quorum back: one owner, I/O goes on"
member 1 existing; member 2 existing
t1=$(($(date +%s%N) / 1000000))
for _ in $(seq 300); do [[ $(ana_of "$pa") == optimized || $(ana_of "$pb") == optimized ]] && break; sleep 0.1; done
t2=$(($(date +%s%N) / 1000000))
[[ $(ana_of "$pa") == optimized || $(ana_of "$pb") == optimized ]] || die "no path optimized 30 s after quorum came back"
echo "quorum back: owner $(owner), optimized at the host $((t2 - t1)) ms after the members restarted"
stop_verify "$fio_pid" "across the loss of quorum"
nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
