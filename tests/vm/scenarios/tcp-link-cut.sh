# The host's link cut for 5 s while fio verify runs over NVMe/TCP. The target runs in a network
# namespace behind a veth pair, so taking the host's end down is a cable pull: packets are lost
# silently, nobody sees a reset. The host must notice (its controller leaves `live`), reconnect
# within ctrl-loss-tmo once the link is back, and the verify must pass: nothing written is lost.
NQN=nqn.2026-11.io.p2pnvmf:cut
modprobe veth
ip netns add tgt
ip link add vh type veth peer name vt
ip link set vt netns tgt
ip addr add 10.9.0.1/24 dev vh
ip link set vh up
ip netns exec tgt sh -c 'ip addr add 10.9.0.2/24 dev vt && ip link set vt up && ip link set lo up'
# From here on the target's address is the namespace's (start_target waits on it, the host
# connects to it).
GUEST_IP=10.9.0.2
tcp_config /tmp/scn/target.toml "$NQN"
cat >/tmp/scn/in-tgt <<SH
#!/bin/sh
exec ip netns exec tgt "$P2PNVMF_BIN" "\$@"
SH
chmod +x /tmp/scn/in-tgt
P2PNVMF_BIN=/tmp/scn/in-tgt start_target /tmp/scn/target.toml

step "connect (keep-alive 5 s, reconnect every 1 s, give up after 60 s)"
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 2 --keep-alive-tmo=5 --reconnect-delay=1 --ctrl-loss-tmo=60)
ctrl=$(ctrl_of_nqn "$NQN")
verify_rw "$dev" 4

step "fio verify (16k, 2 jobs, 192 MiB); the link goes down for 5 s in the middle"
fio_verify "$dev" 16k 2 192 >/tmp/scn/fio.out 2>&1 &
fio=$!
sleep 3
kill -0 "$fio" 2>/dev/null || { cat /tmp/scn/fio.out; die "fio ended before the cut: nothing was cut under it"; }
ip link set vh down
felt=
for i in $(seq 50); do
    state=$(cat "$ctrl/state")
    [[ $state != live ]] && felt=$state
    sleep 0.1
done
ip link set vh up
echo "host controller during the cut: ${felt:-live throughout}"
wait_live "$ctrl" 60
step "link back, controller live again"
[[ -n $felt ]] || die "the host never noticed the 5 s cut (controller stayed live)"
wait "$fio" || { cat /tmp/scn/fio.out; die "fio verify failed across the link cut"; }
cat /tmp/scn/fio.out
kill -0 "$TARGET_PID" || die "the target died during the cut"

step "after the cut: fresh I/O and the old association gone"
verify_rw "$dev" 4
grep -E "keep-alive timeout: tearing the controller down cntlid=1 |controller removed cntlid=1 " "$TARGET_LOG" \
    || die "the target kept the cut-off controller"
n=$(grep -c "controller created" "$TARGET_LOG" || true)
echo "controllers the target created: $n"
(( n >= 2 )) || die "the host did not reconnect (only $n controller created)"
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
