# The target VM of `vm_remote`: the kernel target (brd) and p2pnvmf (RAM namespace; in the
# default mode and in poll mode, its poller on CPU POLL_CPU, default 1) serve in turn, BENCH_RUNS
# rounds (default 3) in rotating order, each until the host VM (remote-host.sh) has run its fio
# jobs against it. Phase N: this VM publishes ready.N ("ROUND NAME RDMA_PORT TCP_PORT NQN", or
# "end"); around each job the host publishes begin.K (the job's result path), this VM samples
# its CPU and answers begun.K, the host publishes end.K after fio, this VM writes RESULT.cpu
# (its CPU ticks in the job: user, nice, system, irq, softirq — no host runs here, so all of it
# is the target's) and answers ended.K; the host publishes done.N after the phase.
# PROFILE=1: a system-wide CPU profile of this VM (perf, cpu-clock at 999 Hz) during each
# run of the kernel target and of ours in the default mode, beside the result (RESULT.perf.txt;
# not in poll mode: perf's start and stop patch kernel text, which races a spinning vCPU).
ROUNDS=${BENCH_RUNS:-3}
KNQN=nqn.2026-11.io.p2pnvmf:kernel-remote
NQN=nqn.2026-11.io.p2pnvmf:remote
latency_targets "$KNQN" "$NQN"
export RUST_LOG=warn

busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
now_ns() { date +%s%N; }
k=1
# serve_jobs N: samples the CPU around each of the host's jobs until it publishes done.N.
serve_jobs() {
    local c0 t0
    while [[ ! -e /tmp/scn/done.$1 ]]; do
        if [[ ! -e /tmp/scn/begin.$k ]]; then
            nap 0.05
            continue
        fi
        result=$(cat "/tmp/scn/begin.$k")
        perf_pid=
        if [[ -n ${PROFILE:-} && $result == */[ko]* ]]; then
            perf record -q -a -e cpu-clock -F 999 -o /tmp/perf.data 2>/dev/null &
            perf_pid=$!
            nap 1
        fi
        read -r c0 t0 < <(echo "$(busy_ticks) $(now_ns)")
        publish "/tmp/scn/begun.$k" ok
        await "/tmp/scn/end.$k"
        echo "busy_ticks $(($(busy_ticks) - c0)) ns $(($(now_ns) - t0)) hz $(getconf CLK_TCK)" >"$result.cpu"
        if [[ -n $perf_pid ]]; then
            kill -INT "$perf_pid"
            wait "$perf_pid" || true
            # Each command's share first (our target's threads beside the kernel's), then symbols.
            { perf report -q -i /tmp/perf.data --no-children --sort comm -g none --stdio 2>/dev/null \
                | grep -v '^$' | sed -n 1,12p
              perf report -q -i /tmp/perf.data --no-children --sort comm,dso,sym -g none --stdio 2>/dev/null \
                | grep -v '^$' | sed -n 1,40p; } >"$result.perf.txt" || true
        fi
        publish "/tmp/scn/ended.$k" ok
        k=$((k + 1))
    done
}

phases=(kernel ours poll)
n=0
for round in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        phase=${phases[$(((i + round - 1) % 3))]}
        n=$((n + 1))
        step "round $round: $phase"
        case $phase in
        kernel) publish "/tmp/scn/ready.$n" "$round $phase 4430 4431 $KNQN" ;;
        ours | poll)
            start_target "/tmp/scn/$([[ $phase == poll ]] && echo poll || echo target).toml" 4421
            publish "/tmp/scn/ready.$n" "$round $phase 4420 4421 $NQN"
            ;;
        esac
        serve_jobs "$n"
        [[ $phase == kernel ]] || stop_target
    done
done
publish "/tmp/scn/ready.$((n + 1))" end
step "done"
