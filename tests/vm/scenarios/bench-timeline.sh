# Each QD1 read's way from the host to the target and back, timed by the guest kernel's own
# trace for the kernel target (brd) and ours in poll mode (RAM namespace, the poller on CPU
# POLL_CPU, default 1), over TCP and RDMA, in ROUNDS interleaved rounds (default 3) of fio 4k
# random reads at queue depth 1 pinned to CPU FIO_CPU (default 0). The same events for both
# targets (tests/vm/src/ftrace.rs reads them): the host's nvme_setup_cmd and nvme_complete_rq,
# the kernel target's nvmet_req_init and nvmet_req_complete, our target's recvfrom, writev and
# write (filtered to its threads), the host's NVMe/TCP receive work queued, IPIs sent, fio's
# sleeps. Tracing costs every side some time per event, so fio's figures here are traced ones.
# Enabling and disabling events patches kernel text, which under TCG races another vCPU (an
# int3 oops in __schedule, seen with perf and with events switched around each run of ours):
# the events are switched on once, before any run, and only the recording is switched
# (tracing_on) around each fio run. HOST_POLL=1: the host polls (a poll queue, fio --hipri).
RUNTIME=${BENCH_RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
KNQN=nqn.2026-11.io.p2pnvmf:kernel-lat
NQN=nqn.2026-11.io.p2pnvmf:lat
latency_targets "$KNQN" "$NQN"
T=/sys/kernel/tracing
mountpoint -q "$T" || mount -t tracefs nodev "$T"
echo mono >"$T/trace_clock"
echo 16384 >"$T/buffer_size_kb"
EVENTS=(nvme/nvme_setup_cmd nvme/nvme_complete_rq nvmet/nvmet_req_init nvmet/nvmet_req_complete
    syscalls/sys_exit_recvfrom syscalls/sys_enter_writev syscalls/sys_enter_write
    ipi/ipi_send_cpu ipi/ipi_send_cpumask sched/sched_switch workqueue/workqueue_queue_work)
for e in "${EVENTS[@]}"; do
    [[ -d $T/events/$e ]] || die "the guest kernel has no trace event $e"
done
for e in sys_exit_recvfrom sys_enter_writev sys_enter_write; do
    echo 'comm ~ "p2pnvmf*"' >"$T/events/syscalls/$e/filter"
done
echo 'prev_comm == "fio"' >"$T/events/sched/sched_switch/filter"
echo 'workqueue == "nvme_tcp_wq"' >"$T/events/workqueue/workqueue_queue_work/filter"
echo 0 >"$T/tracing_on"
for e in "${EVENTS[@]}"; do echo 1 >"$T/events/$e/enable"; done
qd1() {  # DEVICE RESULT
    echo >"$T/trace"
    echo 1 >"$T/tracing_on"
    echo START >"$T/trace_marker"
    taskset -c "${FIO_CPU:-0}" fio --name=qd1 --filename="$1" --ioengine=io_uring --direct=1 --rw=randread \
        --bs=4k --iodepth=1 --size=64M --runtime="$RUNTIME" --time_based --lat_percentiles=1 \
        ${HOST_POLL:+--hipri} --output-format=json >"$2.json" || die "fio on $1"
    echo END >"$T/trace_marker"
    echo 0 >"$T/tracing_on"
}
for r in $(seq "$ROUNDS"); do
    for t in tcp rdma; do
        kport=$([[ $t == rdma ]] && echo 4430 || echo 4431)
        oport=$([[ $t == rdma ]] && echo 4420 || echo 4421)
        for m in kernel poll; do
            step "round $r: $m over $t"
            result=/tmp/scn/$t.$m.$r
            if [[ $m == kernel ]]; then
                dev=$(nvme_connect_dev "$t" "$kport" "$KNQN" -i 1 ${HOST_POLL:+-P 1})
                dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
                qd1 "$dev" "$result"
                nvme_disconnect_nqn "$KNQN" >/dev/null
            else
                RUST_LOG=warn start_target /tmp/scn/poll.toml 4421
                dev=$(nvme_connect_dev "$t" "$oport" "$NQN" -i 1 ${HOST_POLL:+-P 1})
                dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
                qd1 "$dev" "$result"
                nvme_disconnect_nqn "$NQN" >/dev/null
                stop_target
            fi
            # What fio's run left in the buffer (a lost event would skew a command's marks).
            lost=$(awk '/^overrun:/ { n += $2 } END { print n + 0 }' "$T"/per_cpu/cpu*/stats)
            [[ $lost == 0 ]] || die "the trace buffer overran ($lost events lost): raise buffer_size_kb"
            sed -n '/tracing_mark_write: START/,/tracing_mark_write: END/p' "$T/trace" >"$result.trace"
        done
    done
done
step done
