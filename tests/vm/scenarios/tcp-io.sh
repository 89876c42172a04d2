# Our target over NVMe/TCP against the Linux host: discover, connect with 4 I/O queues,
# nvme list / id-ctrl / id-ns, fio write-then-verify at 4k and 128k (QD32, 64 MiB),
# disconnect and reconnect, and a host outside the allow-list refused.
NQN=nqn.2026-11.io.p2pnvmf:io
tcp_config /tmp/scn/target.toml "$NQN" "hosts = [\"$HOSTNQN\"]"
start_target /tmp/scn/target.toml

step "discover"
nvme_discover_expect tcp 4420 "$NQN"
step "connect -i 4"
dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 4)
ctrl=$(ctrl_of_nqn "$NQN")
# The namespace is shared (NMIC), so $dev is the host's multipath head; the hardware queues
# are its path's, the controller's own disk.
queues=$(ls -d "$ctrl"/nvme*n1/mq/* | wc -l)
want=$(( $(nproc) < 4 ? $(nproc) : 4 ))  # the host uses at most one I/O queue per CPU
echo "$dev on $(basename "$ctrl"): $queues blk-mq hardware queues"
[[ $queues -eq $want ]] || die "expected $want I/O queues, the host has $queues"

step "nvme list / id-ctrl / id-ns"
nvme list | tee /tmp/list
grep -q "$(basename "$dev") .*P2PTEST1 .*p2pnvmf test" /tmp/list || die "nvme list does not show $dev with our serial and model"
idc=$(nvme id-ctrl "$dev")
grep -E "^(sn|mn|fr|cntlid|ver|mdts|subnqn|ioccsz|iorcsz|cntrltype|oncs|sgls|kas) " <<<"$idc"
grep -q "^subnqn *: $NQN" <<<"$idc" || die "id-ctrl subnqn"
grep -q "^cntrltype *: 1" <<<"$idc" || die "id-ctrl cntrltype is not I/O"
grep -q "^ioccsz *: 516" <<<"$idc" || die "id-ctrl ioccsz is not 516 (8 KiB in-capsule data)"
idn=$(nvme id-ns "$dev" -n 1)
grep -E "^(nsze|ncap|nuse|nguid|lbaf  0)" <<<"$idn"
grep -q "^nsze *: 0x80000" <<<"$idn" || die "id-ns nsze is not 256 MiB of 512-byte blocks"
nvme ns-descs "$dev" -n 1 | tee /tmp/descs
grep -q "^uuid" /tmp/descs && grep -q "^nguid" /tmp/descs || die "ns-descs lacks uuid or nguid"
nvme smart-log "$dev" | grep -E "^(data_units_written|host_write_commands)"

step "fio verify 4k"
fio_verify "$dev" 4k
step "fio verify 128k"
fio_verify "$dev" 128k

step "disconnect and reconnect with header and data digests (CRC32C)"
nvme_disconnect_nqn "$NQN"
dev=$(nvme_connect_dev tcp 4420 "$NQN" --hdr-digest --data-digest)
verify_rw "$dev" 8
fio_verify "$dev" 128k
nvme_disconnect_nqn "$NQN"

step "reconnect with SQ flow control disabled: reads complete by C2HData SUCCESS"
dev=$(nvme_connect_dev tcp 4420 "$NQN" --disable-sqflow)
grep -q "qid=1 .*sq_flow_disabled=true" "$TARGET_LOG" || die "the host did not disable SQ flow control"
fio_verify "$dev" 4k
nvme_disconnect_nqn "$NQN"

step "a host outside the allow-list is refused"
dmesg -C
if nvme connect -t tcp -a "$GUEST_IP" -s 4420 -n "$NQN" \
        --hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000bad0 \
        --hostid=00000000-0000-0000-0000-00000000bad0 2>/tmp/refused; then
    die "a host outside the allow-list connected"
fi
cat /tmp/refused
dmesg | grep -i "not allowed" || die "the host did not see Connect Invalid Host (dmesg has no 'not allowed')"
# 16772 = 0x4184: DNR, SCT 1 (command specific), SC 0x84 Connect Invalid Host.
dmesg | grep -q "failed to connect queue: 0 ret=16772" || die "Connect was not refused with status 0x4184"
grep -q "host not in the subsystem's allow-list" "$TARGET_LOG" || die "target did not log the refusal"

stop_target
step "done"
