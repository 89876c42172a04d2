# Our target over NVMe/RDMA (rxe) against the Linux host: connect with 2 I/O queues, fio
# write-then-verify at 4k and 128k (QD32, 2 jobs, 64 MiB), disconnect and reconnect,
# RDMA_CYCLES connect/disconnect cycles (100 in CI, 500 in the full run) without growth in
# open fds, RSS or RDMA objects (PDs, CQs, QPs, MRs, CM ids the target holds), and the target
# killed under a connected host and restarted: the host reconnects and I/O resumes.
NQN=nqn.2026-11.io.p2pnvmf:rdma
rdma_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml 4421

step "discover and connect -i 2"
nvme_discover_expect rdma 4420 "$NQN"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
grep -c "RDMA queue accepted qid=[12]" "$TARGET_LOG" | grep -qx 2 || die "expected 2 RDMA I/O queues"
step "fio verify 4k, 2 jobs"
fio_verify "$dev" 4k 2
step "fio verify 128k, 2 jobs"
fio_verify "$dev" 128k 2
step "disconnect and reconnect"
nvme_disconnect_nqn "$NQN"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"

CYCLES=${RDMA_CYCLES:?its size comes from the test (Scenario::size)}
step "$CYCLES connect/disconnect cycles"
# Two warm-up cycles first: allocator and provider caches settle.
for i in 1 2; do nvme_connect_dev rdma 4420 "$NQN" -i 2 >/dev/null; nvme_disconnect_nqn "$NQN" >/dev/null; done
read -r fd0 rss0 < <(target_usage)
rdma0=$(target_rdma_objects)
for i in $(seq "$CYCLES"); do
    nvme_connect_dev rdma 4420 "$NQN" -i 2 >/dev/null
    nvme_disconnect_nqn "$NQN" >/dev/null
    (( i % 100 )) || echo "cycle $i: RDMA objects $(target_rdma_objects), fds and RSS $(target_usage)"
done
sleep 1
read -r fd1 rss1 < <(target_usage)
rdma1=$(target_rdma_objects)
echo "after $CYCLES cycles: open fds $fd0 -> $fd1, RSS $rss0 kB -> $rss1 kB, RDMA objects [$rdma0] -> [$rdma1]"
[[ $fd1 -le $fd0 ]] || die "open fds grew from $fd0 to $fd1 over $CYCLES cycles"
(( rss1 - rss0 < 16384 )) || die "RSS grew by $((rss1 - rss0)) kB over $CYCLES cycles"
[[ $rdma1 == "$rdma0" ]] || die "the target's RDMA objects went from [$rdma0] to [$rdma1] over $CYCLES cycles"

step "kill the target under a connected host, restart it"
dev=$(nvme_connect_dev rdma 4420 "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=60)
ctrl=$(ctrl_of_nqn "$NQN")
verify_rw "$dev" 2
kill -KILL "$TARGET_PID"; wait "$TARGET_PID" 2>/dev/null || true; TARGET_PID=
sleep 2
state=$(cat "$ctrl/state")
echo "host controller state with the target gone: $state"
start_target /tmp/scn/target.toml 4421
wait_live "$ctrl" 30
step "reconnected: I/O resumes"
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"

step "the RDMA device disappears under a connected host"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2)
# Removal completes only once every user of the device is gone: run it in the background.
rdma link delete rxe0 &
del=$!
for i in $(seq 200); do grep -q "RDMA device removed under the listener" "$TARGET_LOG" && break; sleep 0.1; done
grep -q "RDMA device removed under the listener" "$TARGET_LOG" || die "the listener did not see DEVICE_REMOVAL"
for i in $(seq 100); do [[ -e $dev ]] || break; sleep 0.1; done
[[ ! -e $dev ]] || die "the host kept $dev after the device went away"
stop_target
for i in $(seq 100); do kill -0 "$del" 2>/dev/null || break; sleep 0.1; done
kill -0 "$del" 2>/dev/null && die "rxe0 removal still blocked after the target exited"
wait "$del" || die "rdma link delete rxe0 failed"
step "done"
