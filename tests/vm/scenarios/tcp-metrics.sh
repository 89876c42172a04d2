# Metrics against fio (NVMe/TCP): scraped from [metrics] listen before and after a fio write
# and read of known size, the per-namespace commands, bytes and latency counts move by exactly
# what fio did; an out-of-range read is counted by its status; controllers and queues by
# transport follow the connection.
NQN=nqn.2026-12.io.p2pnvmf:metrics
CFG=/tmp/scn/target.toml
tcp_config "$CFG" "$NQN"
printf '\n[metrics]\nlisten = "127.0.0.1:9464"\n' >>"$CFG"
start_target "$CFG"
# metric NAME LABELS...: the sum of NAME's samples whose labels include every LABEL (k="v").
metric() {
    local name=$1; shift
    wget -qO- http://127.0.0.1:9464/metrics | awk -v n="$name" -v want="$*" '
        index($0, n "{") == 1 || $1 == n {
            ok = 1; k = split(want, w, " ")
            for (i = 1; i <= k; i++) if (!index($0, w[i])) ok = 0
            if (ok) s += $NF
        } END { printf "%d\n", s }'
}
L="subnqn=\"$NQN\" nsid=\"1\""

dev=$(nvme_connect_dev tcp 4420 "$NQN" -i 2)
sleep 2  # udev's probe reads of the new disk are done
step "controllers and queues by transport"
[[ $(metric p2pnvmf_controllers 'transport="tcp"') -eq 1 ]] || die "p2pnvmf_controllers{tcp} is not 1"
[[ $(metric p2pnvmf_queues 'transport="tcp"') -eq 3 ]] || die "p2pnvmf_queues{tcp} is not 3 (admin + 2 I/O)"

step "fio: 16 MiB of 4 KiB writes, then of reads"
w0=$(metric p2pnvmf_io_commands_total $L 'op="write"'); wb0=$(metric p2pnvmf_io_bytes_total $L 'op="write"')
wl0=$(metric p2pnvmf_io_latency_seconds_count $L 'op="write"')
r0=$(metric p2pnvmf_io_commands_total $L 'op="read"'); rb0=$(metric p2pnvmf_io_bytes_total $L 'op="read"')
rl0=$(metric p2pnvmf_io_latency_seconds_count $L 'op="read"')
for rw in randwrite randread; do
    fio --name=m --filename="$dev" --ioengine=libaio --direct=1 --rw=$rw --bs=4k --size=16M --iodepth=16 \
        --output-format=terse --terse-version=3 >/tmp/fio-$rw.out || die "fio $rw failed"
done
# terse v3: field 6 is the KiB read, 47 the KiB written; 4 KiB per command.
fio_w=$(awk -F';' '/^3;/ { print $47 }' /tmp/fio-randwrite.out); fio_r=$(awk -F';' '/^3;/ { print $6 }' /tmp/fio-randread.out)
echo "fio wrote $fio_w KiB and read $fio_r KiB"
w=$(( $(metric p2pnvmf_io_commands_total $L 'op="write"') - w0 )); wb=$(( $(metric p2pnvmf_io_bytes_total $L 'op="write"') - wb0 ))
wl=$(( $(metric p2pnvmf_io_latency_seconds_count $L 'op="write"') - wl0 ))
r=$(( $(metric p2pnvmf_io_commands_total $L 'op="read"') - r0 )); rb=$(( $(metric p2pnvmf_io_bytes_total $L 'op="read"') - rb0 ))
rl=$(( $(metric p2pnvmf_io_latency_seconds_count $L 'op="read"') - rl0 ))
echo "metrics moved by: writes $w ($wb bytes, $wl latencies), reads $r ($rb bytes, $rl latencies)"
[[ $w -eq $((fio_w / 4)) && $wb -eq $((fio_w * 1024)) && $wl -eq $w ]] || die "write metrics differ from fio's"
[[ $r -eq $((fio_r / 4)) && $rb -eq $((fio_r * 1024)) && $rl -eq $r ]] || die "read metrics differ from fio's"
wget -qO- http://127.0.0.1:9464/metrics | grep "p2pnvmf_io_latency_seconds_bucket.*op=\"read\"" | head -n 16

step "a read past the end is counted by its status (LBA Out of Range, 0x0080)"
bs=$(blockdev --getss "$dev")
blocks=$(($(blockdev --getsize64 "$dev") / bs))
nvme read "$dev" --start-block="$blocks" --block-count=0 --data-size="$bs" --data=/dev/null 2>&1 && die "a read past the end succeeded"
[[ $(metric p2pnvmf_io_errors_total $L 'status="0x0080"') -eq 1 ]] || die "the LBA Out of Range error was not counted"

nvme_disconnect_nqn "$NQN"
sleep 0.5
[[ $(metric p2pnvmf_queues 'transport="tcp"') -eq 0 ]] || die "queues still counted after the disconnect"
[[ $(metric p2pnvmf_controllers 'transport="tcp"') -eq 0 ]] || die "the controller is still counted after the disconnect"
stop_target
step "done"
