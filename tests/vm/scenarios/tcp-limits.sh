# [limits] against the Linux host over NVMe/TCP: it gets at most io_queues I/O queues whatever
# it asks for, queues of queue_size entries (CAP.MQES), a second controller on the subsystem is
# refused with Controller Busy, and a connection beyond connections_per_listener is closed at
# once; the first host's I/O goes on through all of it.
NQN=nqn.2026-11.io.p2pnvmf:limits
tcp_config /tmp/scn/target.toml "$NQN"
printf '\n[limits]\ncontrollers_per_subsystem = 1\nio_queues = 2\nqueue_size = 64\nconnections_per_listener = 3\n' \
    >> /tmp/scn/target.toml
# A second listener, so nvme-cli does not take the second host for a duplicate of the first.
sed -i '0,/^\[\[subsystem\]\]/s//[[listener]]\nname = "lo"\ntransport = "tcp"\naddress = "127.0.0.1"\nport = 4421\n\n[[subsystem]]/' /tmp/scn/target.toml
start_target /tmp/scn/target.toml
step "a host asking for 8 queues of 128 entries"
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 8 -Q 128)
ctrl=$(ctrl_of_nqn "$NQN")
echo "queue_count $(cat "$ctrl/queue_count") sqsize $(cat "$ctrl/sqsize")"
[[ $(cat "$ctrl/queue_count") == 3 ]] || die "expected the admin queue and 2 I/O queues"
[[ $(cat "$ctrl/sqsize") == 63 ]] || die "expected queues of 64 entries (SQSIZE 63)"
verify_rw "$dev" 8

step "a second controller on the subsystem: Controller Busy"
if nvme connect -t tcp -a 127.0.0.1 -s 4421 -n "$NQN" --hostnqn="$HOSTNQN-2" --hostid=6f1b4c1e-0000-4000-8000-000000000002 2>/tmp/scn/busy.err; then
    die "a second controller was created"
fi
cat /tmp/scn/busy.err
dmesg | grep -q "Connect command failed: controller is busy or not available" \
    || die "the host did not see Controller Busy"
grep -q "the subsystem serves as many controllers as limits.controllers_per_subsystem allows" "$TARGET_LOG" \
    || die "no reason logged for the refused Connect"

step "a fourth connection on the listener: closed at once"
exec 3<>"/dev/tcp/$GUEST_IP/4420"
if read -r -t 5 -u 3 _; then die "the connection beyond the limit was served"; fi
exec 3<&-
grep -q "connection closed: the listener holds limits.connections_per_listener connections" "$TARGET_LOG" \
    || die "no reason logged for the closed connection"
verify_rw "$dev" 8
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
