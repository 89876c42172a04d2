# Malformed and hostile NVMe/TCP input beside a running kernel host: nvmf-tcp-probe sends its
# cases while fio writes and verifies through the Linux host. Every probe case must get the
# spec's answer, fio must finish clean, and the target must shut down cleanly.
NQN=nqn.2026-11.io.p2pnvmf:bad
tcp_config /tmp/scn/target.toml "$NQN"
start_target /tmp/scn/target.toml
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 2)

step "fio verify in the background, probe in the foreground"
fio_verify "$dev" 4k >/tmp/fio.out 2>&1 &
fio_pid=$!
"$P2PNVMF_PROBE" "$GUEST_IP:4420" "$NQN" || die "nvmf-tcp-probe reported failures"
wait "$fio_pid" || { cat /tmp/fio.out; die "fio beside the probe failed"; }
cat /tmp/fio.out
grep -q panicked "$TARGET_LOG" && die "the target panicked"

nvme_disconnect_nqn "$NQN"
stop_target
step "done"
