# Live reconfiguration reaching a connected host (NVMe/TCP): while fio verify runs on
# namespace 1, a SIGHUP reload adds namespace 2 — the host sees it appear (Namespace Attribute
# Changed event, Changed Namespace List, rescan) without reconnecting and it serves data;
# `p2pnvmf status` shows the controller; `p2pnvmf reload` removes namespace 2 again; fio
# finishes without an error. Last, a reload that drops the host from the allow-list
# disconnects it.
NQN=nqn.2026-12.io.p2pnvmf:live
CFG=/tmp/scn/target.toml
tcp_config "$CFG" "$NQN" "hosts = [\"$HOSTNQN\"]"
NS2=$'\n[[subsystem.namespace]]\nnsid = 2\nbackend = "ram"\nsize = "64MiB"'
start_target "$CFG"

step "connect; fio verify on namespace 1 in the background"
dev1=$(nvme_connect_dev tcp 4420 "$NQN")
ctrl=$(ctrl_of_nqn "$NQN")
cname=$(basename "$ctrl")
(fio_verify "$dev1" 16k 2 128 >/tmp/fio.out 2>&1; echo $? >/tmp/fio.rc) &
fio_pid=$!
sleep 1

# reload: SIGHUP and wait for the target to apply the file.
reloads=0
reload() {
    reloads=$((reloads + 1))
    kill -HUP "$TARGET_PID"
    for i in $(seq 50); do [[ $(grep -c "SIGHUP: .* applied" "$TARGET_LOG") -ge $reloads ]] && return; sleep 0.1; done
    grep "SIGHUP" "$TARGET_LOG" | tail -n 3
    die "reload $reloads was not applied"
}

step "add namespace 2 by SIGHUP: it appears on the connected host"
echo "$NS2" >>"$CFG"
reload
for i in $(seq 100); do [[ -n $(ns_dev "$cname" 2) ]] && break; sleep 0.1; done
dev2=$(ns_dev "$cname" 2)
[[ -n $dev2 ]] || { nvme list; die "namespace 2 did not appear on $cname"; }
echo "namespace 2 appeared as $dev2 within $((i / 10)).$((i % 10)) s; $cname is $(cat "$ctrl/state")"
nvme list | grep -q "$(basename "$dev2")" || die "nvme list does not show $dev2"
grep -q "namespaces changed; Namespace Attribute Changed sent.*changed=\[2\]" "$TARGET_LOG" || die "no Namespace Attribute Changed for 2"
verify_rw "$dev2" 8

step "p2pnvmf status shows the connected controller and both namespaces"
"$P2PNVMF_BIN" status
st=$("$P2PNVMF_BIN" status --json)
grep -q "\"hostnqn\": \"$HOSTNQN\"" <<<"$st" || die "status lacks the connected host"
grep -q "\"host_address\": \"$GUEST_IP:[0-9]*\"" <<<"$st" || die "status lacks the host's address"
grep -q '"nsid": 2' <<<"$st" || die "status lacks namespace 2"
grep -q '"entries": 128' <<<"$st" || die "status lacks the I/O queues' depth"

step "remove namespace 2 with p2pnvmf reload: it disappears"
tcp_config "$CFG" "$NQN" "hosts = [\"$HOSTNQN\"]"
out=$("$P2PNVMF_BIN" reload) || die "p2pnvmf reload failed: $out"
echo "$out"
grep -q "applied: .*changed \[\"$NQN\"\]" <<<"$out" || die "p2pnvmf reload did not say what changed"
for i in $(seq 100); do [[ -z $(ns_dev "$cname" 2) ]] && break; sleep 0.1; done
[[ -z $(ns_dev "$cname" 2) ]] || { nvme list; die "namespace 2 is still on $cname"; }
[[ $(cat "$ctrl/state") == live ]] || die "$cname is $(cat "$ctrl/state"), not live"

step "fio on namespace 1 finished without an error"
wait "$fio_pid"
cat /tmp/fio.out
[[ $(cat /tmp/fio.rc) == 0 ]] || die "fio verify on namespace 1 failed across the reloads"

step "a reload that drops the host from the allow-list disconnects it"
sed -i "s|^hosts = .*|hosts = [\"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000\"]|" "$CFG"
reload
grep -q "host may no longer use this subsystem; tearing the controller down" "$TARGET_LOG" || die "the controller was not torn down"
for i in $(seq 50); do [[ $(cat "$ctrl/state" 2>/dev/null) != live ]] && break; sleep 0.1; done
[[ $(cat "$ctrl/state" 2>/dev/null) != live ]] || die "$cname is still live"
echo "$cname: $(cat "$ctrl/state" 2>/dev/null || echo gone)"
nvme disconnect -n "$NQN" >/dev/null 2>&1 || true
stop_target
step "done"
