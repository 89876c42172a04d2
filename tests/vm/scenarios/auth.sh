# DH-HMAC-CHAP: the Linux host authenticates to our target with `nvme connect --dhchap-secret`
# (and the target to it with --dhchap-ctrl-secret) over NVMe/TCP and NVMe/RDMA, on every queue,
# with the NULL DH group and with ffdhe3072;
# a wrong host secret, a wrong controller secret and no secret are refused; the secrets never
# reach the target's log.
NQN=nqn.2026-12.io.p2pnvmf:auth
KEY=$(nvme gen-dhchap-key --hmac=1 --nqn="$HOSTNQN") || die "nvme gen-dhchap-key failed"
CKEY=$(nvme gen-dhchap-key --hmac=2 --key-length=48 --nqn="$NQN")
WRONG=$(nvme gen-dhchap-key --hmac=1 --nqn="$HOSTNQN")
echo "host key ${KEY:0:10}…, controller key ${CKEY:0:10}…"
rdma_config /tmp/scn/target.toml "$NQN"
sed -i "s|^allow_any_host = true$|[[subsystem.host]]\nnqn = \"$HOSTNQN\"\ndhchap_key = \"$KEY\"\ndhchap_ctrl_key = \"$CKEY\"|" \
    /tmp/scn/target.toml
start_target /tmp/scn/target.toml 4421

# authenticated N: the target logged N more successful authentications since the last call.
_seen=0
authenticated() {
    local now
    now=$(grep -c "host authenticated (DH-HMAC-CHAP)" "$TARGET_LOG" || true)
    [[ $((now - _seen)) -eq $1 ]] || { grep "DH-HMAC-CHAP" "$TARGET_LOG" | tail -n 8; die "expected $1 authentications, saw $((now - _seen))"; }
    _seen=$now
}
# refused WHAT ERROR ARGS...: nvme connect over TCP must fail with ERROR (the host's errno text)
# and leave no controller behind.
refused() {
    local what=$1 error=$2 out; shift 2
    step "refused: $what"
    if out=$(nvme connect -t tcp -a "$GUEST_IP" -s 4421 -n "$NQN" $(nvme_host_args) "$@" 2>&1); then
        die "nvme connect with $what succeeded"
    fi
    echo "$out"
    grep -q "$error" <<<"$out" || die "nvme connect with $what did not fail with '$error'"
    sleep 0.5
    for c in /sys/class/nvme/nvme*; do
        [[ -e $c && $(cat "$c/subsysnqn") == "$NQN" ]] && die "a controller of $NQN is left after $what"
    done
    dmesg | grep -E "nvme[0-9]+: qid 0: (authentication|no key)" | tail -n 2
}

step "TCP, host authenticates on the admin queue and 2 I/O queues"
t0=$(date +%s.%N)
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2 --dhchap-secret="$KEY")
echo "connect with the NULL group on 3 queues: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }')"
authenticated 3
[[ $(grep -c 'dhgroup="null"' "$TARGET_LOG") -eq 3 ]] || die "the NULL group was not negotiated"
grep -q "bidirectional=false" "$TARGET_LOG" || die "one-way authentication not logged as such"
dmesg | grep -q "qid 0: authenticated" || die "the host did not log its authentication"
fio_verify "$dev" 4k 2 32
nvme_disconnect_nqn "$NQN"

step "TCP, both ways (--dhchap-ctrl-secret)"
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 2 --dhchap-secret="$KEY" --dhchap-ctrl-secret="$CKEY")
authenticated 3
[[ $(grep -c "bidirectional=true" "$TARGET_LOG") -eq 3 ]] || die "bidirectional authentication not on every queue"
verify_rw "$dev" 16
nvme_disconnect_nqn "$NQN"

step "RDMA, both ways"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 2 --dhchap-secret="$KEY" --dhchap-ctrl-secret="$CKEY")
authenticated 3
fio_verify "$dev" 16k 2 32
nvme_disconnect_nqn "$NQN"

# The host's EKEYREJECTED: it received our AUTH_Failure1 (or, below, refused our response).
refused "a wrong host secret" "Key was rejected by service" --dhchap-secret="$WRONG"
grep -q 'reason="authentication failed (the response does not match the secret)"' "$TARGET_LOG" \
    || die "the target did not log why the wrong secret failed"
refused "a wrong controller secret" "Key was rejected by service" --dhchap-secret="$KEY" --dhchap-ctrl-secret="$(nvme gen-dhchap-key --hmac=2 --key-length=48 --nqn="$NQN")"
grep -q "the host refused the controller.s response" "$TARGET_LOG" || die "the host's Failure2 was not logged"
# ENOKEY: the Connect response asked the host to authenticate (AUTHREQ.ATR) and it has no key.
refused "no secret" "Required key not available"
authenticated 0

step "ffdhe3072 (dhchap_dhgroup, applied by SIGHUP): both ways over TCP and RDMA"
sed -i 's|^dhchap_ctrl_key = .*|&\ndhchap_dhgroup = "ffdhe3072"|' /tmp/scn/target.toml
kill -HUP "$TARGET_PID"
for i in $(seq 50); do grep -q "SIGHUP: .* applied" "$TARGET_LOG" && break; sleep 0.1; done
grep -q "SIGHUP: .* applied" "$TARGET_LOG" || die "the reload was not applied"
t0=$(date +%s.%N)
dev=$(nvme_connect_dev tcp 4421 "$NQN" -i 1 --dhchap-secret="$KEY" --dhchap-ctrl-secret="$CKEY")
echo "connect with ffdhe3072 on 2 queues: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }')"
authenticated 2
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"
dev=$(nvme_connect_dev rdma 4420 "$NQN" -i 1 --dhchap-secret="$KEY" --dhchap-ctrl-secret="$CKEY")
authenticated 2
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"
[[ $(grep -c 'dhgroup="ffdhe3072"' "$TARGET_LOG") -eq 4 ]] || die "ffdhe3072 was not the group of all four queues"

step "secrets stay out of the log"
for s in "$KEY" "$CKEY" "$WRONG"; do
    b64=$(cut -d: -f3 <<<"$s")
    grep -qF "${b64:0:16}" "$TARGET_LOG" && die "a secret appears in the target log"
done
step "the target still serves an authenticated host"
dev=$(nvme_connect_dev tcp 4421 "$NQN" --dhchap-secret="$KEY")
verify_rw "$dev" 4
nvme_disconnect_nqn "$NQN"
stop_target
step "done"
