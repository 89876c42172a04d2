# Benchmark: the same fio jobs against the kernel nvmet target and p2pnvmf, over RDMA (rxe) and
# TCP, on the same kinds of backing:
#   brd   kernel on /dev/ram0 | p2pnvmf file backend on /dev/ram1 (and its RAM namespace)
#   null  kernel on /dev/nullb0 | p2pnvmf file backend on /dev/nullb1 (null_blk, completions
#         after a fixed 0.5 ms: what concurrency inside a queue is worth)
# Every device stays connected; runs are interleaved (kernel, then ours, job by job) and repeated
# BENCH_RUNS times. After each transport's turn of a run, our target restarts in poll mode
# ([performance] poll, its poller pinned to CPU POLL_CPU, default 1) for the same jobs on its
# namespaces ("poll" in the file names), then back in the default mode. The host-polling job
# (fio --hipri) runs in a pass of its own, on connections with a poll queue. Each run leaves fio's JSON in /tmp/scn/results/<transport>.<backing>.<job>.<run>.json
# and the CPU it took beside it (.cpu; the idle baseline per transport and run in <transport>.idle.<run>);
# a last pass counts our target's system calls per I/O (.syscalls);
# the host side (benches/vm_fio.rs) computes medians and ratios. First, our target's RSS idle and
# with 8 controllers x 4 I/O queues connected, per transport.
RUNTIME=${BENCH_RUNTIME:-5}
RUNS=${BENCH_RUNS:-3}
echo "bench-clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
POLL_CPU=${POLL_CPU:-1}
OUT=/tmp/scn/results
mkdir -p "$OUT"
KBRD=nqn.2026-11.io.p2pnvmf:kernel-brd
KNULL=nqn.2026-11.io.p2pnvmf:kernel-null
OBRD=nqn.2026-11.io.p2pnvmf:bench-brd
ORAM=nqn.2026-11.io.p2pnvmf:bench-ram
ONULL=nqn.2026-11.io.p2pnvmf:bench-null

step "backing devices and the kernel target"
modprobe brd rd_nr=2 rd_size=262144
modprobe null_blk nr_devices=2 queue_mode=2 irqmode=2 completion_nsec=500000 gb=1 hw_queue_depth=256 submit_queues=2
[[ -b /dev/ram1 && -b /dev/nullb1 ]] || die "brd or null_blk devices missing"
modprobe nvmet; modprobe nvmet-rdma; modprobe nvmet-tcp
nvmet_kernel_subsys "$KBRD" /dev/ram0
nvmet_kernel_subsys "$KNULL" /dev/nullb0
nvmet_kernel_port 1 rdma 4430 "$KBRD"
nvmet_kernel_port 2 tcp 4431 "$KBRD"
for p in 1 2; do ln -s "/sys/kernel/config/nvmet/subsystems/$KNULL" "/sys/kernel/config/nvmet/ports/$p/subsystems/$KNULL"; done

rdma_config /tmp/scn/target.toml "$ORAM"
for sub in "$OBRD /dev/ram1" "$ONULL /dev/nullb1"; do
    read -r nqn path <<<"$sub"
    printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = "file"\npath = "%s"\n' \
        "$nqn" "$path" >>/tmp/scn/target.toml
done
RUST_LOG=warn start_target /tmp/scn/target.toml 4421

step "RSS of the target idle and with 8 controllers x 4 I/O queues"
read -r _ rss < <(target_usage)
echo "bench-rss idle $rss"
for t in rdma tcp; do
    port=$([[ $t == rdma ]] && echo 4420 || echo 4421)
    for i in $(seq 8); do
        # Eight controllers of one host (nvme-cli 2.3 refuses duplicates even when asked, so
        # straight to the kernel's fabrics device); two default and two write queues: four I/O
        # queues on two CPUs.
        echo "transport=$t,traddr=$GUEST_IP,trsvcid=$port,nqn=$ORAM,hostnqn=$HOSTNQN,hostid=$HOSTID,nr_io_queues=2,nr_write_queues=2,duplicate_connect" \
            >/dev/nvme-fabrics || die "connect $i over $t"
    done
    sleep 1
    read -r _ rss < <(target_usage)
    echo "bench-rss $t-8x4 $rss"
    nvme disconnect -n "$ORAM" >/dev/null
    sleep 1
done

# One transport at a time: the same subsystem over RDMA and TCP would be two paths of one
# multipath device.
declare -A DEV
# Connections have two I/O queues (one per CPU); those of the host-polling pass also a poll
# queue (QUEUES="-i 2 -P 1"), which the other jobs' connections go without: an idle poll queue
# is not free (over RDMA it cost our target's QD32 writes about a tenth in an A/B).
QUEUES="-i 2"
connect_ours() {  # TRANSPORT OPORT [ours|poll]: our devices in the default mode or poll mode
    local who=${3:-ours}
    DEV[brd.$who]=$(nvme_connect_dev "$1" "$2" "$OBRD" $QUEUES)
    DEV[ram.$who]=$(nvme_connect_dev "$1" "$2" "$ORAM" $QUEUES)
    DEV[null.$who]=$(nvme_connect_dev "$1" "$2" "$ONULL" $QUEUES)
    # The RAM namespace starts empty with each target (zeroes cost less): fill what is read.
    dd if=/dev/urandom of="${DEV[ram.$who]}" bs=1M count=64 oflag=direct status=none || die "prefill ${DEV[ram.$who]}"
}
connect_all() {  # TRANSPORT KPORT OPORT
    DEV[brd.kernel]=$(nvme_connect_dev "$1" "$2" "$KBRD" $QUEUES)
    DEV[null.kernel]=$(nvme_connect_dev "$1" "$2" "$KNULL" $QUEUES)
    connect_ours "$1" "$3"
}
disconnect_ours() {
    for n in "$OBRD" "$ORAM" "$ONULL"; do nvme disconnect -n "$n" >/dev/null; done
}
disconnect_all() {
    for n in "$KBRD" "$KNULL"; do nvme disconnect -n "$n" >/dev/null; done
    disconnect_ours
}
cp /tmp/scn/target.toml /tmp/scn/poll.toml
poll_mode /tmp/scn/poll.toml "[$POLL_CPU]"
# in_poll_mode: our target restarted in poll mode (or back: in_poll_mode off).
in_poll_mode() {
    stop_target
    if [[ ${1:-on} == on ]]; then
        RUST_LOG=warn start_target /tmp/scn/poll.toml 4421
    else
        RUST_LOG=warn start_target /tmp/scn/target.toml 4421
    fi
}

# The QD1 jobs run on the CPU that is not the poller's, for every target: a spinning poller and
# fio on one vCPU would take turns by time slices (on hardware the host is another machine).
QD1_CPU=$((POLL_CPU == 0 ? 1 : 0))
# name: fio options (4k unless said; QD32 x2 jobs run on both CPUs, so on both I/O queues)
declare -A JOB=(
    [qd1-randread]="--rw=randread --bs=4k --iodepth=1 --numjobs=1 --cpus_allowed=$QD1_CPU"
    # The host polls its poll queue (nvme connect -P 1; a pass of its own) instead of sleeping
    # until the answer: no target's answer wakes a halted vCPU for it (on hardware the host is
    # another machine).
    [qd1-randread-hostpoll]="--rw=randread --bs=4k --iodepth=1 --numjobs=1 --hipri --cpus_allowed=$QD1_CPU"
    [qd32x2-randread]="--rw=randread --bs=4k --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split"
    [qd32x2-randwrite]="--rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split"
    [qd32x1-randread]="--rw=randread --bs=4k --iodepth=32 --numjobs=1 --cpus_allowed=0"
    [seq128k-read]="--rw=read --bs=128k --iodepth=16 --numjobs=1"
    [seq128k-write]="--rw=write --bs=128k --iodepth=16 --numjobs=1"
)
BRD_JOBS="qd1-randread qd32x2-randread qd32x2-randwrite qd32x1-randread seq128k-read seq128k-write"
NULL_JOBS="qd1-randread qd32x1-randread"
HOSTPOLL_JOBS="qd1-randread-hostpoll"

# CPU accounting (ticks of /proc/stat): the guest's kernel time — system, irq, softirq: the
# kernel target, the host's initiator and fio's system calls alike — and our target's user
# time; its idle share is measured per transport and run with every device connected.
kernel_ticks() { awk '/^cpu / { print $4 + $7 + $8 }' /proc/stat; }
target_user_ticks() { awk '{ print $14 }' "/proc/$TARGET_PID/stat"; }
now_ns() { date +%s%N; }

run_fio() {  # DEVICE JOB RESULT: fio's JSON in RESULT, the CPU it took beside it (RESULT.cpu)
    local k0 u0 t0
    read -r k0 u0 t0 < <(echo "$(kernel_ticks) $(target_user_ticks) $(now_ns)")
    fio --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --size=64M --runtime="$RUNTIME" \
        --time_based --group_reporting --lat_percentiles=1 --output-format=json ${JOB[$2]} >"$3.tmp" 2>/dev/null \
        || die "fio $2 on $1 failed"
    echo "kernel_ticks $(($(kernel_ticks) - k0)) target_user_ticks $(($(target_user_ticks) - u0)) ns $(($(now_ns) - t0)) hz $(getconf CLK_TCK)" >"$3.cpu"
    mv "$3.tmp" "$3"
}
# idle_baseline FILE: the kernel ticks of 5 s with nothing running, every device connected.
idle_baseline() {
    local k0 t0
    read -r k0 t0 < <(echo "$(kernel_ticks) $(now_ns)")
    sleep 5
    echo "kernel_ticks $(($(kernel_ticks) - k0)) ns $(($(now_ns) - t0)) hz $(getconf CLK_TCK)" >"$1"
}

prefilled=
for run in $(seq "$RUNS"); do
    for t in rdma tcp; do
        kport=$([[ $t == rdma ]] && echo 4430 || echo 4431)
        oport=$([[ $t == rdma ]] && echo 4420 || echo 4421)
        step "run $run over $t"
        QUEUES="-i 2"
        connect_all "$t" "$kport" "$oport"
        if [[ -z $prefilled ]]; then
            # brd returns zeroes for blocks never written: fill the region read.
            for k in brd.kernel brd.ours; do
                dd if=/dev/urandom of="${DEV[$k]}" bs=1M count=64 oflag=direct status=none || die "prefill ${DEV[$k]}"
            done
            prefilled=1
        fi
        idle_baseline "$OUT/$t.idle.$run"
        for job in $BRD_JOBS; do
            for who in kernel ours; do run_fio "${DEV[brd.$who]}" "$job" "$OUT/$t.brd.$job.$who.$run.json"; done
            run_fio "${DEV[ram.ours]}" "$job" "$OUT/$t.ram.$job.ours.$run.json"
        done
        for job in $NULL_JOBS; do
            for who in kernel ours; do run_fio "${DEV[null.$who]}" "$job" "$OUT/$t.null.$job.$who.$run.json"; done
        done
        disconnect_all
        step "run $run over $t, the host polling"
        QUEUES="-i 2 -P 1"
        connect_all "$t" "$kport" "$oport"
        for job in $HOSTPOLL_JOBS; do
            for who in kernel ours; do run_fio "${DEV[brd.$who]}" "$job" "$OUT/$t.brd.$job.$who.$run.json"; done
            run_fio "${DEV[ram.ours]}" "$job" "$OUT/$t.ram.$job.ours.$run.json"
        done
        disconnect_all
        step "run $run over $t, our target in poll mode"
        in_poll_mode on
        for pass in default hostpoll; do
            if [[ $pass == default ]]; then QUEUES="-i 2" jobs=$BRD_JOBS; else QUEUES="-i 2 -P 1" jobs=$HOSTPOLL_JOBS; fi
            connect_ours "$t" "$oport" poll
            for job in $jobs; do
                for b in brd ram; do run_fio "${DEV[$b.poll]}" "$job" "$OUT/$t.$b.$job.poll.$run.json"; done
            done
            [[ $pass == default ]] && for job in $NULL_JOBS; do run_fio "${DEV[null.poll]}" "$job" "$OUT/$t.null.$job.poll.$run.json"; done
            disconnect_ours
        done
        QUEUES="-i 2"
        in_poll_mode off
    done
done

# System calls per I/O of our target (the kernel target makes none: it runs in the kernel),
# counted by perf on the tracepoint in a pass of their own, so that the timed runs above do not
# carry perf's cost.
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
for t in rdma tcp; do
    step "system calls per I/O over $t"
    connect_ours "$t" "$([[ $t == rdma ]] && echo 4420 || echo 4421)"
    for job in qd1-randread qd32x2-randread; do
        perf stat -e raw_syscalls:sys_enter -x, -o "$OUT/$t.brd.$job.ours.syscalls" -p "$TARGET_PID" &
        perf_pid=$!
        sleep 1  # perf attaches to every thread first
        run_fio "${DEV[brd.ours]}" "$job" "$OUT/$t.brd.$job.ours.syscalls.json"
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
    done
    disconnect_ours
done

# In poll mode, perf's start and stop (which patch kernel text: static keys, some deferred by a
# second) must not meet a vCPU spinning in the poller: under TCG that raced into an int3 oops in
# __schedule. So the poll-mode target runs inside a system-wide recording of the tracepoint,
# started before it and stopped after it, and only the records between two marker processes
# around fio count.
cp /bin/true /tmp/bench-mark-a
cp /bin/true /tmp/bench-mark-b
stop_target
for t in rdma tcp; do
    for job in qd1-randread qd32x2-randread; do
        step "system calls per I/O over $t, poll mode, $job"
        perf record -q -a -e raw_syscalls:sys_enter -o /tmp/syscalls.data 2>/dev/null &
        perf_pid=$!
        sleep 2
        RUST_LOG=warn start_target /tmp/scn/poll.toml 4421
        connect_ours "$t" "$([[ $t == rdma ]] && echo 4420 || echo 4421)" poll
        /tmp/bench-mark-a
        run_fio "${DEV[brd.poll]}" "$job" "$OUT/$t.brd.$job.poll.syscalls.json"
        /tmp/bench-mark-b
        disconnect_ours
        pid=$TARGET_PID
        stop_target
        sleep 2
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        perf script -i /tmp/syscalls.data -F comm,pid 2>/dev/null | awk -v pid="$pid" '
            $1 == "bench-mark-a" { on = 1 } $1 == "bench-mark-b" { on = 0 }
            on && $2 == pid { n++ } END { printf "%d,,raw_syscalls:sys_enter\n", n }' >"$OUT/$t.brd.$job.poll.syscalls"
    done
done
echo "bench-clocksource at the end $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
step "done"
