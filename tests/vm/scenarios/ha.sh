# High availability through etcd: heads A and B (two p2pnvmf processes on two addresses) serve
# one subsystem over one shared block device, each ANA group owned by one head under an etcd
# lease (one etcd member in the guest; each head reaches it through its own socat relay, which
# the scenario stops to cut that head off). The Linux host multipaths natively; fio verifies
# through the head device (io_uring, QD32) the whole time.
#   kill:      the owner is SIGKILLed: I/O goes on through the other head, which takes the group
#              over when the lease expires; times from the kill to the first completion on the
#              other path and to the host seeing it optimized, over $HA_RUNS runs; the killed
#              head restarts and rejoins as standby.
#   partition: the owner's link to etcd is cut while the host still reaches it: a watcher reads
#              both heads' ANA logs every 50 ms (ana-watch, through the host's passthrough) and
#              must never see two optimized; the cut head turns inaccessible first (by the
#              watcher and by both heads' logs on the guest's clock); the link comes back: no flap.
#   move:      `p2pnvmf ana move` to the other head and back (failback) while fio verifies.
#   reservations: host 1 through head A holds Write Exclusive; host 2 through head B gets
#              Reservation Conflict on writes; head A dies; host 2 preempts through head B.
NQN=nqn.2026-12.io.p2pnvmf:ha
UUID=6c4f3a21-8d5e-4b9f-a02c-3d4e5f6a7b81
A_IP=$GUEST_IP
B_IP=10.0.2.16
RUNS=${HA_RUNS:?its size comes from the test (Scenario::size)}
export FIO_ENGINE=io_uring

modprobe brd rd_nr=1 rd_size=131072 || die "modprobe brd"
ip addr add "$B_IP/24" dev eth0 || die "second address for head B"
sleep 0.5

step "etcd (one member) and a relay to it per head"
etcd_member
socat TCP-LISTEN:23791,fork,reuseaddr TCP:127.0.0.1:2379 & 
socat TCP-LISTEN:23792,fork,reuseaddr TCP:127.0.0.1:2379 &
# cut NAME on|off: stops (SIGSTOP) or resumes head NAME's relay and its connections.
relay_port() { if [[ $1 == a ]]; then echo 23791; else echo 23792; fi; }
cut() { pkill "-$([[ $2 == on ]] && echo STOP || echo CONT)" -f "TCP-LISTEN:$(relay_port "$1")" || die "relay of $1"; }

# cluster_config NAME ADDR CNTLID_MIN: head NAME's configuration, in the cluster through its relay.
cluster_config() {
    head_config "/tmp/scn/$1.toml" "$2" "$3"
    printf '[cluster]\netcd = ["http://127.0.0.1:%s"]\nname = "%s"\nlease_ttl = "5s"\n' "$(relay_port "$1")" "$1" >> "/tmp/scn/$1.toml"
    printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$(metrics_port "$1")" >> "/tmp/scn/$1.toml"
}
# fences: both heads' fences for a late renewal since they started.
fences() { echo $(( $(metric a 'p2pnvmf_cluster_fences_total{reason="renewal_late"}') + $(metric b 'p2pnvmf_cluster_fences_total{reason="renewal_late"}') )); }
metrics_port() { if [[ $1 == a ]]; then echo 9464; else echo 9465; fi; }
# metric NAME SERIES: the value head NAME's metrics give the series SERIES (name{labels}), or 0.
metric() {
    wget -qO- "http://127.0.0.1:$(metrics_port "$1")/metrics" | awk -v p="$2 " 'index($0, p) == 1 { v = $NF } END { print v + 0 }'
}

# log_state CTRL: group 1's state in the ANA log page the head behind CTRL returns now.
log_state() { nvme ana-log "/dev/$1" 2>/dev/null | awk 'tolower($0) ~ /state/ && match($0, /non-optimized|optimized|inaccessible|persistent-loss|change/) { print substr($0, RSTART, RLENGTH); exit }' || true; }

cluster_config a "$A_IP" 1
cluster_config b "$B_IP" 1001
start_head a /tmp/scn/a.toml "$A_IP" 4420
for i in $(seq 100); do [[ $(owner) == a ]] && break; sleep 0.1; done
[[ $(owner) == a ]] || die "head A did not take group 1"
start_head b /tmp/scn/b.toml "$B_IP" 4420
for i in $(seq 100); do
    status=$(head_ctl b status)
    grep -q "ANA group 1   owner a            here non-optimized" <<<"$status" && break
    sleep 0.1
done
echo "$status" | sed -n '/^cluster/,/^controllers/p'
grep -q "ANA group 1   owner a            here non-optimized" <<<"$status" || die "head B's status does not name A the owner"

# entries ADDR: the discovery log records head ADDR's discovery controller (TCP 4420) returns.
entries() { nvme discover -t tcp -a "$1" -s 4420 $(nvme_host_args) | grep -c "^=====Discovery Log Entry"; }
step "discovery: each head lists both heads' listeners and refers to the other's discovery service"
nvme discover -t tcp -a "$A_IP" -s 4420 $(nvme_host_args) | tee /tmp/disc.txt | grep -E "^(=====|trtype|subtype|traddr|trsvcid|subnqn)"
# A's two listeners, B's two, a referral to each of B's.
[[ $(entries "$A_IP") == 6 && $(entries "$B_IP") == 6 ]] || die "a head's discovery log does not list both heads (A: $(entries "$A_IP"), B: $(entries "$B_IP") records)"
grep -q "traddr: *$B_IP" /tmp/disc.txt || die "head A's discovery log lacks head B's address"

for t in tcp rdma; do
    port=$([[ $t == rdma ]] && echo 4421 || echo 4420)
    step "$t: a path to each head; the owner optimized, the other non-optimized"
    connect_heads "$t" "$port"
    o=$(owner)
    nvme ana-log "/dev/${C[a]}"
    [[ $(log_state "${C[$o]}") == optimized ]] || die "the owner's ANA log does not say optimized"

    step "$t: $RUNS runs: the owner SIGKILLed under fio verify (io_uring, QD32)"
    verify_loop "/dev/$head" &
    fio_pid=$!
    sleep 2
    firsts=(); takes=()
    for run in $(seq "$RUNS"); do
        kill_owner "$run"
        firsts+=("$first_ms"); takes+=("$taken_ms")
        rejoin "$o"
    done
    stop_verify "$fio_pid" "across the kills"
    sort_ms() { tr ' ' '\n' | sort -n | tr '\n' ' '; }
    echo "$t kill to first completion on the other path (ms, sorted): $(echo "${firsts[*]}" | sort_ms)"
    echo "$t kill to the other head optimized at the host (ms, sorted): $(echo "${takes[*]}" | sort_ms)"

    step "$t: $RUNS runs: the owner cut off from etcd while the host reaches it"
    fences0=$(fences)
    verify_loop "/dev/$head" &
    fio_pid=$!
    for run in $(seq "$RUNS"); do
        o=$(owner); n=$(other "$o")
        # The watcher: both heads' ANA logs, read through the host's admin passthrough every
        # 50 ms (ana-watch prints each change; exits 1 if a sample saw both optimized).
        rm -f /tmp/stop-watch
        "$P2PNVMF_ANA_WATCH" --period-ms 50 --until /tmp/stop-watch "/dev/${C[$o]}" "/dev/${C[$n]}" >/tmp/watch.log &
        watch_pid=$!
        sleep 0.5
        t0=$(now_ms)
        cut "$o" on
        wait_ana "${P[$n]}" optimized
        cut "$o" off
        wait_ana "${P[$o]}" non-optimized
        sleep 5
        touch /tmp/stop-watch
        wait "$watch_pid" || { cat /tmp/watch.log; die "run $run: the watcher saw both heads optimized"; }
        fenced=$(awk -v t0="$t0" '$2 == "inaccessible" { print $1 - t0; exit }' /tmp/watch.log)
        taken=$(awk -v t0="$t0" '$3 == "optimized" { print $1 - t0; exit }' /tmp/watch.log)
        [[ -n $fenced && -n $taken ]] && (( fenced <= taken )) || { cat /tmp/watch.log; die "run $run: $o not inaccessible ($fenced ms) before $n optimized ($taken ms)"; }
        # The heads' own moments, on the guest's one clock.
        at() {  # milliseconds of the day of head $1's last change of group 1 from $2 to $3
            grep "ANA state changed group=1 from=$2 to=$3" "/tmp/scn/$1.log" | tail -n1 \
                | awk '{ split(substr($1, 12, 15), t, ":"); printf "%d\n", ((t[1] * 60 + t[2]) * 60 + t[3]) * 1000 }'
        }
        gap=$(( $(at "$n" non-optimized optimized) - $(at "$o" optimized inaccessible) ))
        (( gap > 0 )) || die "run $run: $n logged optimized $((-gap)) ms before $o logged inaccessible"
        flaps=$(awk '/^samples/ { next } $3 == "optimized" { on = 1; next } on { n++ } END { print n + 0 }' /tmp/watch.log)
        (( flaps == 0 )) || { cat /tmp/watch.log; die "run $run: $n's state changed $flaps times after it took over"; }
        echo "run $run: $o cut off; its log inaccessible after $fenced ms, $n's optimized after $taken ms ($o fenced $gap ms before $n took over, by their logs); $(tail -n1 /tmp/watch.log); link back: $o non-optimized, no flap"
        [[ $(owner) == "$n" ]] || die "etcd names $(owner) the owner"
    done
    stop_verify "$fio_pid" "across the partitions"
    # The heads' metrics say the same: one fence per cut, the owner's group optimized, the
    # other's non-optimized (ANAS values 1 and 2).
    fences=$(( $(fences) - fences0 ))
    o=$(owner)
    echo "metrics: $fences fences (renewal late) in $RUNS cuts; group 1 state $(metric "$o" 'p2pnvmf_ana_state{group="1"}') on $o, $(metric "$(other "$o")" 'p2pnvmf_ana_state{group="1"}') on $(other "$o"); $o may serve $(metric "$o" p2pnvmf_cluster_serving_for_seconds) s more without a renewal"
    (( fences == RUNS )) || die "the heads counted $fences fences for $RUNS cuts"
    [[ $(metric "$o" 'p2pnvmf_ana_state{group="1"}') == 1 && $(metric "$(other "$o")" 'p2pnvmf_ana_state{group="1"}') == 2 ]] \
        || die "p2pnvmf_ana_state does not show the owner optimized and the other non-optimized"

    step "$t: planned move (p2pnvmf ana move) and failback while fio verifies"
    verify_loop "/dev/$head" &
    fio_pid=$!
    sleep 2
    o=$(owner); n=$(other "$o")
    c0=$(ios "${P[$n]}")
    out=$(head_ctl "$o" ana move 1 "$n") || die "ana move 1 $n: $out"
    echo "$out"
    wait_ana "${P[$n]}" optimized; wait_ana "${P[$o]}" non-optimized
    [[ $(owner) == "$n" ]] || die "etcd names $(owner) the owner after the move"
    sleep 2
    (( $(ios "${P[$n]}") > c0 )) || die "no I/O through $n after the move"
    out=$(head_ctl "$n" ana move 1 "$o") || die "ana move 1 $o: $out"
    echo "failback: $out"
    wait_ana "${P[$o]}" optimized; wait_ana "${P[$n]}" non-optimized
    grep -q "from=optimized to=change" "/tmp/scn/$o.log" || die "$o did not report Change while handing the group over"
    stop_verify "$fio_pid" "across the planned moves"
    nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
done

step "reservations across heads (nvme_core multipath=N: a block device per controller)"
HOST2NQN=nqn.2014-08.org.nvmexpress:uuid:3a5c7e91-2b4d-4f60-8a1c-9e0d2f3b4c5d
HOST2ID=3a5c7e91-2b4d-4f60-8a1c-9e0d2f3b4c5d
modprobe -r nvme_tcp nvme_rdma nvme_fabrics nvme_core || die "unloading the host's nvme modules"
modprobe nvme_core multipath=N && modprobe nvme_tcp && modprobe nvme_rdma || die "reloading nvme_core multipath=N"
c1=$(TARGET_ADDR=$A_IP nvme_connect_ctrl tcp 4420 "$NQN")
c2=$(TARGET_ADDR=$B_IP nvme_connect_ctrl tcp 4420 "$NQN" --hostnqn="$HOST2NQN" --hostid="$HOST2ID")
for _ in $(seq 50); do [[ -n $(ns_dev "$c1" 1) && -n $(ns_dev "$c2" 1) ]] && break; sleep 0.1; done
d1=$(ns_dev "$c1" 1); d2=$(ns_dev "$c2" 1)
echo "host 1: $c1 ($d1) to head A; host 2: $c2 ($d2) to head B"
resv register "$d1" --nrkey=0xa1 --rrega=0
resv acquire "$d1" --crkey=0xa1 --rtype=1 --racqa=0
resv register "$d2" --nrkey=0xb2 --rrega=0
nvme resv-report "$d2" --eds | tee /tmp/report.txt
grep -q "rtype *: 1" /tmp/report.txt || die "head B does not report host 1's Write Exclusive"
[[ $(may read "$d2") == yes ]] || die "host 2 may not read through head B"
[[ $(may write "$d2") == no ]] || die "host 2 wrote through head B despite host 1's Write Exclusive (taken through A)"
[[ $(may write "$d1") == yes ]] || die "host 1 may not write through head A"
grep -q "reservation changed by another head" /tmp/scn/b.log || die "head B did not take the change from etcd"
step "head A dies; host 2 preempts host 1 through head B"
kill_head a
resv acquire "$d2" --crkey=0xb2 --prkey=0xa1 --rtype=1 --racqa=1
nvme resv-report "$d2" --eds | tee /tmp/report.txt
[[ $(grep -c "rkey" /tmp/report.txt) -eq 1 ]] || die "host 1's registration survived the preempt"
[[ $(may write "$d2") == yes ]] || die "host 2 may not write after its preempt"
echo "host 2 holds the reservation through head B after head A died"
for _ in $(seq 100); do [[ $(entries "$B_IP") == 2 ]] && break; sleep 0.1; done
[[ $(entries "$B_IP") == 2 ]] || die "head B's discovery log still lists head A $(entries "$B_IP") records"
echo "head B's discovery log: its own 2 listeners once head A's lease ended"
etcdctl --endpoints=127.0.0.1:2379 get --prefix /p2pnvmf/resv/ --print-value-only | head -n 20
nvme disconnect -n "$NQN" >/dev/null || die "disconnect $NQN"
