# The host VM of `vm_remote` (one vCPU): for each phase the target VM (remote-target.sh)
# publishes, over TCP and RDMA: connect across the link, fill 64 MiB, then fio (io_uring, 4k,
# BENCH_RUNTIME seconds each, default 5) at QD1 random reads and QD32 random reads and writes,
# each result in /tmp/scn/NAME.TRANSPORT.JOB.ROUND.json, the target VM's CPU during it beside it.
RUNTIME=${BENCH_RUNTIME:-5}
declare -A JOB=(
    [qd1-randread]="--rw=randread --iodepth=1"
    [qd32-randread]="--rw=randread --iodepth=32"
    [qd32-randwrite]="--rw=randwrite --iodepth=32"
)
# The link's own round trip, for what the figures below carry besides the targets.
# (busybox's ping, -A: the next as soon as the reply is in; busybox-static is the rig's own;
# 20 first, to warm up.)
busybox ping -A -c 20 -q "$GUEST_IP" >/dev/null
busybox ping -A -c 200 -q "$GUEST_IP" | sed -n '$p' | tee /tmp/scn/link-rtt.txt
k=1
n=1
while :; do
    await "/tmp/scn/ready.$n"
    read -r round phase rport tport nqn <"/tmp/scn/ready.$n"
    [[ $round == end ]] && break
    for t in tcp rdma; do
        step "round $round: $phase over $t"
        dev=$(nvme_connect_dev "$t" "$([[ $t == rdma ]] && echo "$rport" || echo "$tport")" "$nqn")
        dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none || die "fill $dev"
        step "filled"
        for job in qd1-randread qd32-randread qd32-randwrite; do
            result=/tmp/scn/$phase.$t.$job.$round.json
            publish "/tmp/scn/begin.$k" "$result"
            await "/tmp/scn/begun.$k"
            # shellcheck disable=SC2086
            fio --name="$job" --filename="$dev" --ioengine=io_uring --direct=1 --bs=4k --size=64M \
                --runtime="$RUNTIME" --time_based --lat_percentiles=1 --output-format=json ${JOB[$job]} \
                >"$result.tmp" || die "fio $job on $dev ($phase over $t)"
            publish "/tmp/scn/end.$k" ok
            await "/tmp/scn/ended.$k"
            mv "$result.tmp" "$result"
            k=$((k + 1))
        done
        step "jobs run"
        nvme_disconnect_nqn "$nqn" >/dev/null
    done
    publish "/tmp/scn/done.$n" ok
    n=$((n + 1))
done
step "done"
