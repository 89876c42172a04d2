# Where a QD1 command's time goes: fio 4k randread at queue depth 1 against the kernel target
# (brd) and p2pnvmf (RAM namespace) over TCP and RDMA. Our target runs twice: quiet (fio's
# figures) and tracing each command with microsecond timestamps to the guest's tmpfs (the
# split of each command's time into inside the target and outside it; tracing itself slows
# the inside). The kernel target runs twice too: quiet, and with its own tracepoints on
# (nvmet_req_init and nvmet_req_complete: the same split, from the kernel's events). A CPU
# profile (perf, software clock, flat) of the quiet target during the TCP run; a third run
# counts the target's system calls by name (perf on their tracepoints).
# First, wake-cost prices a thread's wake-up on one CPU and across the two.
# A fourth run is our target in poll mode, quiet (its poller pinned to CPU POLL_CPU, default 1);
# POLL=1 runs the first two in poll mode too, and leaves out the profile, the counted run and
# the fourth. TARGET_WORKERS sets the target's tokio worker
# threads (default: one per CPU); PIN_CPU pins fio and our target to that CPU (the kernel
# target's work follows the host's); FIO_CPU pins fio alone, for every target. HOST_POLL=1: the
# host polls (a poll queue, nvme connect -P 1, and fio --hipri), for every target: no target's
# answer then wakes a sleeping fio (on hardware the host is another machine; here its wake-ups
# are the target's IPIs too).
RUNTIME=${BENCH_RUNTIME:-4}
echo "bench-clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
KNQN=nqn.2026-11.io.p2pnvmf:kernel-lat
NQN=nqn.2026-11.io.p2pnvmf:lat
latency_targets "$KNQN" "$NQN"
[[ -n ${POLL:-} ]] && cp /tmp/scn/poll.toml /tmp/scn/target.toml
[[ -n ${TARGET_WORKERS:-} ]] && export TOKIO_WORKER_THREADS=$TARGET_WORKERS
# The log goes to the guest's tmpfs: a line per event over 9p would cost more than the I/O.
TARGET_LOG=/tmp/target.log

PIN=()
[[ -n ${PIN_CPU:-} ]] && PIN=(taskset -c "$PIN_CPU")
[[ -n ${FIO_CPU:-} ]] && PIN=(taskset -c "$FIO_CPU")
# Inter-processor interrupts so far (rescheduling, function calls, TLB shootdowns; all CPUs):
# each is a wake-up of another vCPU, which under TCG costs far more than on hardware.
ipis() { awk '$1 ~ /^(RES|CAL|TLB):$/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts; }
# The price of a wake-up, to weigh the IPIs counted per I/O: a thread waking another on the
# same CPU (a context switch) and on the other CPU (an IPI to an idle vCPU), with the IPIs seen.
WAKE_LOOPS=20000
for cpus in "0 0" "0 1"; do
    i0=$(ipis)
    # shellcheck disable=SC2086
    line=$("$P2PNVMF_WAKE_COST" $cpus --loops "$WAKE_LOOPS") || die "wake-cost $cpus"
    # Its round trips: the timed ones and the 1000 it runs first, untimed.
    echo "$line, IPIs per round trip $(awk -v n=$(($(ipis) - i0)) -v r=$((WAKE_LOOPS + 1000)) 'BEGIN { printf "%.2f", n / r }')" \
        | tee -a /tmp/scn/wake-cost.txt
done
# nvmet_trace on | FILE: the kernel target's own tracepoints around each command — nvmet_req_init
# (the command parsed) and nvmet_req_complete (done, before its transport sends the answer) —
# on, or off and saved to FILE. Only while no poller spins: enabling patches kernel text.
nvmet_trace() {
    local t=/sys/kernel/tracing e
    mountpoint -q "$t" || mount -t tracefs nodev "$t"
    for e in nvmet_req_init nvmet_req_complete; do
        echo "$([[ $1 == on ]] && echo 1 || echo 0)" >"$t/events/nvmet/$e/enable"
    done
    if [[ $1 == on ]]; then
        echo 8192 >"$t/buffer_size_kb"
        echo >"$t/trace"
    else
        cp "$t/trace" "$1"
    fi
}
# poller_busy: seconds poller 0 has spent in turns that did work (status; published once a
# second), or nothing when the target runs no poller.
poller_busy() { poller0 | cut -s -d' ' -f2; }
# poller_preempted: how often poller 0's thread lost its CPU to another (its involuntary
# context switches), or nothing when the target runs no poller.
poller_preempted() {
    local comm
    [[ -n $TARGET_PID ]] || return 0
    for comm in /proc/"$TARGET_PID"/task/*/comm; do
        [[ $(cat "$comm" 2>/dev/null) == p2pnvmf-poll0 ]] || continue
        awk '/^nonvoluntary_ctxt_switches/ { print $2 }' "${comm%comm}status"
    done
}
qd1() {  # DEVICE RESULT: fio's JSON, the IPIs during it beside it (RESULT.ipis) and, in poll
    # mode, poller 0's busy seconds during it (RESULT.busy: its turns that did work, no tracing)
    # and the times it was preempted (RESULT.preempted)
    local i0 b0 p0
    i0=$(ipis)
    b0=$(poller_busy)
    p0=$(poller_preempted)
    "${PIN[@]}" fio --name=qd1 --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=1 \
        --size=64M --runtime="$RUNTIME" --time_based --lat_percentiles=1 ${HOST_POLL:+--hipri} --output-format=json >"$2" \
        || die "fio on $1"
    echo $(($(ipis) - i0)) >"$2.ipis"
    if [[ -n $b0 ]]; then
        echo $(($(poller_preempted) - p0)) >"$2.preempted"
        sleep 1.2  # the window that holds fio's end is published
        awk -v a="$b0" -v b="$(poller_busy)" 'BEGIN { print b - a }' >"$2.busy"
    fi
}
for t in tcp rdma; do
    kport=$([[ $t == rdma ]] && echo 4430 || echo 4431)
    oport=$([[ $t == rdma ]] && echo 4420 || echo 4421)
    step "kernel over $t"
    dev=$(nvme_connect_dev "$t" "$kport" "$KNQN" -i 1 ${HOST_POLL:+-P 1})
    dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
    qd1 "$dev" "/tmp/scn/$t.kernel.json"
    step "kernel over $t, traced"
    nvmet_trace on
    qd1 "$dev" "/tmp/scn/$t.kernel-traced.json"
    nvmet_trace "/tmp/scn/$t.kernel-trace.txt"
    nvme_disconnect_nqn "$KNQN" >/dev/null
    # perf's start and stop patch kernel text (static keys), which under TCG races with a vCPU
    # spinning in a poller (seen: an int3 oops in __schedule): no counted run and no profile in
    # poll mode.
    for mode in quiet traced ${POLL:+skip} syscalls poll; do
        [[ $mode == skip ]] && break
        step "p2pnvmf over $t, $mode"
        if [[ $mode == traced ]]; then
            RUST_LOG=warn,p2pnvmf_transport=trace start_target /tmp/scn/target.toml 4421
        elif [[ $mode == poll ]]; then
            RUST_LOG=warn start_target /tmp/scn/poll.toml 4421
        else
            RUST_LOG=warn start_target /tmp/scn/target.toml 4421
        fi
        [[ -n ${PIN_CPU:-} ]] && taskset -a -p -c "$PIN_CPU" "$TARGET_PID" >/dev/null
        dev=$(nvme_connect_dev "$t" "$oport" "$NQN" -i 1 ${HOST_POLL:+-P 1})
        dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
        echo "mark $t start" >>"$TARGET_LOG"
        profile=$([[ $t == tcp && $mode == quiet && -z ${POLL:-} ]] && echo 1 || true)
        if [[ -n $profile ]]; then
            perf record -q -e cpu-clock -F 2000 -o /tmp/perf.data -p "$TARGET_PID" -- sleep "$RUNTIME" 2>/dev/null &
            perf_pid=$!
        fi
        if [[ $mode == syscalls ]]; then
            # Each system call of the target's threads by name, counted on its tracepoint.
            mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
            perf stat -e 'syscalls:sys_enter_*' -x, -o "/tmp/scn/$t.syscalls.txt" -p "$TARGET_PID" &
            perf_pid=$!
            sleep 2
        fi
        qd1 "$dev" "/tmp/scn/$t.ours-$mode.json"
        [[ $mode == syscalls ]] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
        echo "mark $t end" >>"$TARGET_LOG"
        if [[ -n $profile ]]; then
            wait "$perf_pid" || true
            perf report -q -i /tmp/perf.data --no-children --sort dso,sym -g none --stdio 2>/dev/null \
                | grep -v '^$' | head -n 30 >/tmp/scn/perf.txt || true
        fi
        nvme_disconnect_nqn "$NQN" >/dev/null
        stop_target
    done
done
echo "bench-clocksource at the end $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
cp "$TARGET_LOG" /tmp/scn/target.log
step "done"
