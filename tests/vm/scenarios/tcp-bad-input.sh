# Malformed and hostile NVMe/TCP input beside a running kernel host: nvmf-tcp-probe sends its
# cases while fio writes and verifies through the Linux host. Every probe case must get the
# spec's answer, fio must finish clean, and the target must shut down cleanly. Then a flood:
# 20 more rounds of the probe beside another verify, after which the target holds no more file
# descriptors than before and its memory has not grown by more than a few MiB.
NQN=nqn.2026-11.io.p2pnvmf:bad
tcp_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 2)

step "fio verify in the background, probe in the foreground"
# fio keeps clear of the first MiB, where the probe writes and compares its own data.
fio_verify "$dev" 4k 1 64 1 >/tmp/fio.out 2>&1 &
fio_pid=$!
"$P2PNVMF_PROBE" "$GUEST_IP:4420" "$NQN" || die "nvmf-tcp-probe reported failures"
wait "$fio_pid" || { cat /tmp/fio.out; die "fio beside the probe failed"; }
cat /tmp/fio.out

step "a flood: 20 probe rounds beside fio verify"
read -r fd0 rss0 < <(target_usage)
fio_verify "$dev" 4k 2 64 1 >/tmp/fio.out 2>&1 &
fio_pid=$!
for i in $(seq 20); do
    "$P2PNVMF_PROBE" "$GUEST_IP:4420" "$NQN" >/tmp/probe.out || { cat /tmp/probe.out; die "probe round $i failed"; }
done
wait "$fio_pid" || { cat /tmp/fio.out; die "fio beside the flood failed"; }
cat /tmp/fio.out
sleep 1
read -r fd1 rss1 < <(target_usage)
echo "after $(( 20 * $(grep -c '^ok ' /tmp/probe.out) )) hostile cases: open fds $fd0 -> $fd1, RSS $rss0 -> $rss1 kB"
(( fd1 <= fd0 )) || die "the target holds $((fd1 - fd0)) more file descriptors"
(( rss1 - rss0 < 16384 )) || die "the target's RSS grew by $((rss1 - rss0)) kB"
grep -q panicked "$TARGET_LOG" && die "the target panicked"

nvme_disconnect_nqn "$NQN"
stop_target
step "done"
