# Helpers for guest scenarios (bash, in the chroot of the host root). Sourced by scenario.sh.

# The address targets listen on and hosts connect to: eth0's, or with a host VM the target
# VM's address on the link between the two (the rig sets RIG_TARGET_IP).
GUEST_IP=${RIG_TARGET_IP:-10.0.2.15}
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:5c1f0a52-6d5e-4c3b-9d7a-0b0e3f2a9c41
HOSTID=5c1f0a52-6d5e-4c3b-9d7a-0b0e3f2a9c41

# The guest's modules are bound under /tmp/rig (the host has none of its own).
modprobe() { /sbin/modprobe -d /tmp/rig "$@"; }

_t0=$(date +%s.%N)
step() { awk -v t0="$_t0" -v now="$(date +%s.%N)" -v msg="$*" 'BEGIN { printf "step [%6.2fs] %s\n", now - t0, msg }'; }
die() { echo "FAIL: $*" >&2; exit 1; }

# Kernel nvmet through configfs: nvmet_kernel_subsys NQN DEVICE
nvmet_kernel_subsys() {
    local s=/sys/kernel/config/nvmet/subsystems/$1
    mkdir "$s"
    echo 1 > "$s/attr_allow_any_host"
    mkdir "$s/namespaces/1"
    echo -n "$2" > "$s/namespaces/1/device_path"
    echo 1 > "$s/namespaces/1/enable"
}

# nvmet_kernel_port ID TRANSPORT PORT NQN
nvmet_kernel_port() {
    local p=/sys/kernel/config/nvmet/ports/$1
    mkdir "$p"
    echo "$2" > "$p/addr_trtype"
    echo ipv4 > "$p/addr_adrfam"
    echo "$GUEST_IP" > "$p/addr_traddr"
    echo "$3" > "$p/addr_trsvcid"
    ln -s "/sys/kernel/config/nvmet/subsystems/$4" "$p/subsystems/$4"
}

# --- two VMs (Scenario::remote_host): they meet through files in the shared run directory ----
# publish FILE TEXT: FILE appears whole, with TEXT (written aside, then renamed).
publish() { echo "$2" >"$1.tmp" && mv "$1.tmp" "$1"; }
# nap SECONDS: sleeps without a process — bash's read timing out on a FIFO nobody writes. A
# forked sleep is a fork and an exec each time (under TCG not cheap, not measured alone),
# which a loop waiting through a benchmark's run must not add to what it measures.
nap() {
    if [[ -z ${_NAP_FD:-} ]]; then
        mkfifo /tmp/.nap
        exec {_NAP_FD}<>/tmp/.nap
    fi
    read -r -t "$1" -u "$_NAP_FD" || true
}
# await FILE [SECONDS]: waits up to SECONDS (600) for the other VM to publish FILE.
await() {
    local i
    for ((i = 0; i < ${2:-600} * 20; i++)); do
        [[ -e $1 ]] && return 0
        nap 0.05
    done
    die "waited ${2:-600} s for $1"
}

nvme_host_args() { echo "--hostnqn=$HOSTNQN --hostid=$HOSTID"; }

# nvme_discover_expect TRANSPORT PORT NQN: the discovery log must list NQN on TRANSPORT.
nvme_discover_expect() {
    local out
    out=$(nvme discover -t "$1" -a "$GUEST_IP" -s "$2" $(nvme_host_args)) || die "nvme discover -t $1 -s $2 failed"
    echo "$out"
    grep -q "subnqn: *$3" <<<"$out" || die "discovery log over $1 lacks $3"
    grep -q "trtype: *$1" <<<"$out" || die "discovery log lacks trtype $1"
}

# nvme_connect_dev TRANSPORT PORT NQN [extra args]: connects and prints the new namespace block
# device (nvmeXnY; the hidden multipath paths nvmeXcYnZ have no device node).
nvme_connect_dev() {
    local t=$1 port=$2 nqn=$3; shift 3
    local before after dev i
    before=$(ls /sys/block)
    nvme connect -t "$t" -a "$GUEST_IP" -s "$port" -n "$nqn" $(nvme_host_args) "$@" >&2 \
        || die "nvme connect -t $t -s $port -n $nqn failed"
    for i in $(seq 100); do
        after=$(ls /sys/block)
        dev=$(comm -13 <(echo "$before" | sort) <(echo "$after" | sort) | grep -E '^nvme[0-9]+n[0-9]+$' | head -n1 || true)
        [[ -n $dev && -b /dev/$dev ]] && { echo "/dev/$dev"; return; }
        sleep 0.1
    done
    die "no block device appeared after connecting to $nqn over $t"
}

# nvme_connect_ctrl TRANSPORT PORT NQN [nvme connect args]: connects to $TARGET_ADDR (default
# the guest's address) as this host (unless the args name another with --hostnqn/--hostid) and
# prints the new controller (nvmeX).
nvme_connect_ctrl() {
    local t=$1 port=$2 nqn=$3 before after c; shift 3
    [[ " $* " == *" --hostnqn="* ]] || set -- $(nvme_host_args) "$@"
    before=$(ls /sys/class/nvme)
    nvme connect -t "$t" -a "${TARGET_ADDR:-$GUEST_IP}" -s "$port" -n "$nqn" "$@" >&2 \
        || die "nvme connect -t $t -a ${TARGET_ADDR:-$GUEST_IP} -s $port -n $nqn $* failed"
    after=$(ls /sys/class/nvme)
    c=$(comm -13 <(echo "$before" | sort) <(echo "$after" | sort) | head -n1)
    [[ -n $c ]] || die "no new controller after connecting to $nqn over $t port $port"
    echo "$c"
}

# ns_dev CTRL NSID: the host's block device of namespace NSID on controller CTRL (nvmeX), if it
# has one: the head (nvmeXnY, whose Y need not be NSID), not its hidden paths (nvmeXcYnZ).
ns_dev() {
    local b
    for b in /sys/block/nvme*n*; do
        [[ ${b##*/} =~ ^nvme[0-9]+n[0-9]+$ && -e $b/nsid && $(cat "$b/nsid") == "$2" ]] || continue
        readlink -f "$b/device" "$b/device"/nvme* 2>/dev/null | grep -q "/$1\$" && { echo "/dev/${b##*/}"; return; }
    done
}

# verify_rw DEVICE MIB: writes MIB of random data with O_DIRECT, reads it back, compares.
verify_rw() {
    local dev=$1 mib=$2
    [[ -b $dev ]] || die "$dev is not a block device"
    head -c "$((mib << 20))" /dev/urandom > /tmp/pattern
    dd if=/tmp/pattern of="$dev" bs=1M count="$mib" oflag=direct status=none || die "write to $dev failed"
    dd if="$dev" of=/tmp/readback bs=1M count="$mib" iflag=direct status=none || die "read from $dev failed"
    cmp /tmp/pattern /tmp/readback || die "data read back from $dev differs from what was written"
    rm -f /tmp/pattern /tmp/readback
}

nvme_disconnect_nqn() {
    local out
    out=$(nvme disconnect -n "$1") || die "nvme disconnect -n $1 failed"
    echo "$out"
    grep -q "disconnected 1 controller" <<<"$out" || die "disconnect of $1: $out"
}

# --- our target -------------------------------------------------------------------------
TARGET_LOG=/tmp/scn/target.log
TARGET_PID=

# start_target CONFIG [PORT]: runs $P2PNVMF_BIN serve in the background, waits for the port.
start_target() {
    local cfg=$1 port=${2:-4420} i
    RUST_LOG=${RUST_LOG:-info} "$P2PNVMF_BIN" serve --config "$cfg" >>"$TARGET_LOG" 2>&1 &
    TARGET_PID=$!
    for i in $(seq 200); do
        (exec 3<>"/dev/tcp/$GUEST_IP/$port") 2>/dev/null && return 0
        kill -0 "$TARGET_PID" 2>/dev/null || { tail -n 20 "$TARGET_LOG" >&2; die "p2pnvmf exited at start-up"; }
        sleep 0.05
    done
    die "p2pnvmf did not listen on $GUEST_IP:$port"
}

# stop_target: SIGTERM, and the target must exit 0 within 10 s.
stop_target() {
    local rc=0 i
    kill -TERM "$TARGET_PID"
    for i in $(seq 100); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$TARGET_PID" 2>/dev/null && die "p2pnvmf still running 10 s after SIGTERM"
    wait "$TARGET_PID" || rc=$?
    TARGET_PID=
    [[ $rc -eq 0 ]] || die "p2pnvmf exited with $rc after SIGTERM"
}

# --- several heads (high availability): each its own process, admin socket and log ----------
declare -A HEAD_PID=()

# start_head NAME CONFIG ADDR PORT: serves CONFIG as head NAME (admin socket /tmp/NAME.sock — the
# 9p run directory takes no sockets —, log /tmp/scn/NAME.log), waits until it listens on ADDR:PORT.
start_head() {
    local name=$1 cfg=$2 addr=$3 port=$4 i
    rm -f "/tmp/$name.sock"
    RUST_LOG=${RUST_LOG:-info} "$P2PNVMF_BIN" serve --config "$cfg" --admin-socket "/tmp/$name.sock" \
        >>"/tmp/scn/$name.log" 2>&1 &
    HEAD_PID[$name]=$!
    for i in $(seq 200); do
        (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null && [[ -S /tmp/$name.sock ]] && return 0
        kill -0 "${HEAD_PID[$name]}" 2>/dev/null || { tail -n 20 "/tmp/scn/$name.log" >&2; die "head $name exited at start-up"; }
        sleep 0.05
    done
    die "head $name did not listen on $addr:$port"
}

# head_ctl NAME status|reload [args]: p2pnvmf's own command against head NAME.
head_ctl() { local name=$1; shift; "$P2PNVMF_BIN" "$@" --socket "/tmp/$name.sock"; }

# kill_head NAME: SIGKILL, as a crash.
kill_head() {
    kill -KILL "${HEAD_PID[$1]}"
    wait "${HEAD_PID[$1]}" 2>/dev/null || true
    unset "HEAD_PID[$1]"
}

# On failure, show what the target (and each head) logged.
_on_exit() {
    local rc=$? h
    if [[ $rc -ne 0 && -s $TARGET_LOG ]]; then
        echo "--- last lines of the target log ---"
        tail -n 40 "$TARGET_LOG"
    fi
    for h in "${!HEAD_PID[@]}"; do
        [[ $rc -ne 0 ]] && { echo "--- last lines of head $h's log ---"; tail -n 30 "/tmp/scn/$h.log"; }
        kill -KILL "${HEAD_PID[$h]}" 2>/dev/null
    done
    [[ -n $TARGET_PID ]] && kill -KILL "$TARGET_PID" 2>/dev/null
    return $rc
}
trap _on_exit EXIT

# tcp_config FILE NQN [extra subsystem lines]: a config with one TCP listener on the guest IP
# and one 256 MiB RAM namespace.
tcp_config() {
    cat >"$1" <<CFG
[[listener]]
name = "tcp0"
transport = "tcp"
address = "$GUEST_IP"
port = 4420

[[subsystem]]
nqn = "$2"
serial = "P2PTEST1"
model = "p2pnvmf test"
${3:-allow_any_host = true}

[[subsystem.namespace]]
nsid = 1
backend = "ram"
size = "256MiB"
CFG
}

# fio_verify DEV BS [JOBS] [MIB] [OFFSET_MIB]: MIB (64) MiB of random writes from OFFSET_MIB (0; split over JOBS disjoint regions) then
# crc32c verify, at queue depth 32 per job (ioengine $FIO_ENGINE, default libaio); fails on any
# verify error. With FIO_VERIFY_ONLY=1, only the verify of what the same call wrote last.
# poll_mode CONFIG [CORES]: the target serves its connections from polling threads
# ([performance] poll; CORES like "[1]" pins them and keeps the kernel's unbound work off them).
poll_mode() {
    printf '\n[performance]\npoll = true\n%s\n' "${2:+cores = $2
isolate_cores = true}" >>"$1"
}

# poller0 [STATUS]: poller 0's queues and busy seconds from `status` (or from STATUS, its
# line), as "QUEUES BUSY"; nothing when the target runs no poller.
poller0() {
    local line=${1:-}
    [[ -n $line ]] || line=$("$P2PNVMF_BIN" status 2>/dev/null | grep "^  poller 0 ") || return 0
    awk '{ for (i = 3; i <= NF; i++) { if ($i == "connection(s)") c = $(i - 1); if ($i == "s," && $(i - 2) == "busy") b = $(i - 1) } }
        END { print c, b }' <<<"$line"
}

# check_pollers MIN: the target's status shows poller 0 serving at least MIN queues and busy
# for part of what it has run.
check_pollers() {
    local line c b
    line=$("$P2PNVMF_BIN" status | grep "^  poller 0 ") || die "p2pnvmf status shows no poller"
    echo "$line" >&2
    read -r c b < <(poller0 "$line")
    awk -v c="$c" -v b="$b" -v min="$1" 'BEGIN { exit !(c >= min && b > 0) }' \
        || die "poller 0: fewer than $1 queues, or never busy"
}

fio_verify() {
    local dev=$1 bs=$2 jobs=${3:-1} mib=${4:-64} off=${5:-0} out
    out=$(fio --name="verify-$bs" --filename="$dev" --ioengine="${FIO_ENGINE:-libaio}" --direct=1 --rw=randwrite \
        --bs="$bs" --offset="${off}M" --size=$((mib / jobs))M --offset_increment=$((mib / jobs))M --numjobs="$jobs" \
        --group_reporting --iodepth=32 --verify=crc32c --do_verify=1 --verify_fatal=1 ${FIO_VERIFY_ONLY:+--verify_only} \
        --verify_dump=0 --output-format=terse --terse-version=3 2>&1) || { echo "$out"; die "fio verify at $bs on $dev failed"; }
    # terse v3: field 5 is the error, 6 and 8 read KiB and IOPS, 47 and 49 write KiB and IOPS.
    # (fio counts the writes it skips with --verify_only as done.)
    awk -F';' -v bs="$bs" -v jobs="$jobs" -v kib=$((mib << 10)) '$5 != 0 || $47 != kib || $6 != kib { exit 1 }
        { printf "fio %s x%d jobs: wrote %s KiB (%s IOPS), verified %s KiB (%s IOPS)\n", bs, jobs, $47, $49, $6, $8 }' < <(grep '^3;' <<<"$out") \
        || { echo "$out"; die "fio reported an error at $bs"; }
}

# ctrl_of_nqn NQN: the /sys/class/nvme/nvmeX directory of the controller connected to NQN.
ctrl_of_nqn() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [[ $(cat "$c/subsysnqn" 2>/dev/null) == "$1" ]] && { echo "$c"; return; }
    done
    die "no controller connected to $1"
}

# rdma_config FILE NQN: one RDMA listener on rxe0's address (port 4420), one TCP listener
# (port 4421), and one 256 MiB RAM namespace any host may use.
rdma_config() {
    cat >"$1" <<CFG
[[listener]]
name = "rdma0"
transport = "rdma"
address = "$GUEST_IP"
port = 4420

[[listener]]
name = "tcp0"
transport = "tcp"
address = "$GUEST_IP"
port = 4421

[[subsystem]]
nqn = "$2"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
backend = "ram"
size = "256MiB"
CFG
}

# latency_targets KERNEL_NQN NQN: the two targets the latency benches set side by side — the
# kernel's on brd (/dev/ram0; RDMA port 4430, TCP 4431) and ours (rdma_config: a RAM
# namespace, RDMA 4420, TCP 4421) as /tmp/scn/target.toml and, in poll mode (the poller on
# CPU POLL_CPU, default 1), /tmp/scn/poll.toml.
latency_targets() {
    modprobe brd rd_nr=1 rd_size=131072
    modprobe nvmet; modprobe nvmet-rdma; modprobe nvmet-tcp
    nvmet_kernel_subsys "$1" /dev/ram0
    nvmet_kernel_port 1 rdma 4430 "$1"
    nvmet_kernel_port 2 tcp 4431 "$1"
    rdma_config /tmp/scn/target.toml "$2"
    cp /tmp/scn/target.toml /tmp/scn/poll.toml
    poll_mode /tmp/scn/poll.toml "[${POLL_CPU:-1}]"
}

# nvme_vfio_config FILE NQN PCI [LINE...]: rdma_config's listeners, and NQN's one namespace on the
# SSD at PCI through the nvme-vfio backend, with each LINE (`key = value`) added to it.
nvme_vfio_config() {
    local file=$1 nqn=$2 pci=$3 extra= line
    shift 3
    for line in "$@"; do extra+="\n$line"; done
    rdma_config "$file" "$nqn"
    sed -i "s|^backend = \"ram\"$|backend = \"nvme-vfio\"\npci = \"$pci\"$extra|; /^size = /d" "$file"
}

# given_back_holds_pattern NQN SSD: writes 8 MiB of random bytes through the running target
# (NVMe/TCP port 4421), stops it, checks that the SSD was shut down and given back (unbound,
# driver_override cleared), binds the kernel's nvme driver and reads the same bytes back from
# its block device, whose name is left in `disk`.
given_back_holds_pattern() {
    local nqn=$1 ssd=$2 dev
    dev=$(nvme_connect_dev tcp 4421 "$nqn" -i 1)
    head -c $((8 << 20)) /dev/urandom > /tmp/pattern
    dd if=/tmp/pattern of="$dev" bs=1M seek=16 oflag=direct status=none || die "write through the target failed"
    nvme_disconnect_nqn "$nqn" >/dev/null
    stop_target
    grep "NVMe controller shut down" "$TARGET_LOG" || die "the controller was not shut down at exit"
    [[ ! -e /sys/bus/pci/devices/$ssd/driver ]] || die "$ssd still bound at exit: $(readlink /sys/bus/pci/devices/$ssd/driver)"
    [[ $(cat /sys/bus/pci/devices/$ssd/driver_override) == "(null)" ]] || die "driver_override left set"
    modprobe nvme
    echo "$ssd" > /sys/bus/pci/drivers_probe
    disk=$(nvme_disk "$ssd")
    dd if="/dev/$disk" of=/tmp/readback bs=1M skip=16 count=8 iflag=direct status=none || die "reading /dev/$disk failed"
    cmp /tmp/pattern /tmp/readback || die "the kernel reads other bytes than were written through the target"
}

# target_usage: "<open fds> <VmRSS kB>" of the running target.
target_usage() {
    echo "$(ls /proc/"$TARGET_PID"/fd | wc -l) $(awk '/^VmRSS/ {print $2}' /proc/"$TARGET_PID"/status)"
}

# target_rdma_objects: "pd=N cq=N qp=N mr=N cm_id=N", the RDMA objects the running target holds
# (rdma-core's `rdma resource show`, by process id).
target_rdma_objects() {
    local t out=
    for t in pd cq qp mr cm_id; do
        out+="$t=$(rdma resource show "$t" | grep -c "pid $TARGET_PID " || true) "
    done
    echo "${out% }"
}

# wait_live CTRLDIR SECONDS: waits until the host controller is live again.
wait_live() {
    local i
    for i in $(seq $(($2 * 10))); do
        [[ $(cat "$1/state" 2>/dev/null) == live ]] && return 0
        sleep 0.1
    done
    die "$(basename "$1") not live after $2 s (state $(cat "$1/state" 2>/dev/null))"
}

# reg32 ADDR-EXPRESSION: a 32-bit register through /dev/mem (independent of our code).
reg32() { busybox devmem "$(printf '0x%x' $(($1)))" 32; }
# bar_start BDF N: CPU address of BAR N from sysfs `resource`.
bar_start() { sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource" | cut -d' ' -f1; }
# bar_bus BDF N: bus address of 64-bit BAR N from the BAR registers in config space.
bar_bus() {
    local lo hi
    read -r lo hi < <(od -An -tx4 -j $((0x10 + 4 * $2)) -N 8 "/sys/bus/pci/devices/$1/config")
    echo $(( (0x$hi << 32) | (0x$lo & ~0xf) ))
}
# nvme_with_cmb: the PCI address of the NVMe function whose BAR2 (the CMB) is populated.
nvme_with_cmb() {
    local d
    for d in /sys/bus/pci/devices/*; do
        [[ $(cat "$d/class") == 0x010802 && $(bar_start "${d##*/}" 2) != 0x0000000000000000 ]] && echo "${d##*/}"
    done
    return 0
}
# nvme_disk BDF: the namespace block device (nvmeXnY, a multipath head or not) of the NVMe
# function BDF bound to the kernel's nvme driver.
nvme_disk() {
    local b i
    for i in $(seq 50); do
        for b in /sys/block/nvme*; do
            [[ ${b##*/} =~ ^nvme[0-9]+n[0-9]+$ ]] || continue
            readlink -f "$b/device" "$b/device"/nvme* 2>/dev/null | grep -q "/$1/" && { echo "${b##*/}"; return; }
        done
        sleep 0.1
    done
    die "no block device of $1"
}

# bench_tcp LABEL NQN PORT: fio IOPS over NVMe/TCP for $BENCH_RUNTIME seconds each: 4k randwrite and
# randread at QD32 (2 jobs), 128k write at QD8, 128k read at QD8.
bench_tcp() {
    local label=$1 nqn=$2 port=$3 dev out rw bs qd jobs
    dev=$(nvme_connect_dev tcp "$port" "$nqn" -i 2)
    while read -r rw bs qd jobs; do
        out=$(fio --name=b --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
            --numjobs="$jobs" --group_reporting --size=64M --runtime="${BENCH_RUNTIME:-3}" --time_based \
            --output-format=terse --terse-version=3) || die "fio $rw $bs on $dev failed"
        grep '^3;' <<<"$out" | awk -F';' -v l="$label" -v w="$rw $bs QD$qd x$jobs" \
            '{ printf "bench %-14s %-22s %8d IOPS\n", l, w, ($8 > $49 ? $8 : $49) }'
    done <<<"randwrite 4k 32 2
randread 4k 32 2
write 128k 8 1
read 128k 8 1"
    nvme_disconnect_nqn "$nqn" >/dev/null
}

# trace_bytes [BUS SIZE [FROM]]: bytes of NVMe DMA qemu traced as addressed to a device's own CMB
# (pci_nvme_map_addr_cmb, with Scenario::qemu_trace); with BUS and SIZE, only those into the CMB
# at that bus address; with FROM (a trace_size), only those traced since.
trace_bytes() {
    sleep 0.5  # qemu's log is written from its I/O thread
    [[ -f /tmp/scn/qemu-trace.log ]] || { echo 0; return; }
    tail -c +$((${3:-0} + 1)) /tmp/scn/qemu-trace.log | awk -v lo="${1:-0}" -v n="${2:-0}" '/pci_nvme_map_addr_cmb/ {
        for (i = 1; i < NF; i++) { if ($i == "addr") a = strtonum($(i + 1)); if ($i == "len") l = $(i + 1) }
        if (n == 0 || (a >= lo && a < lo + n)) s += l } END { printf "%d\n", s }'
}
# trace_size: how far qemu's trace log reaches now (a mark for trace_bytes).
trace_size() { sleep 0.5; stat -c %s /tmp/scn/qemu-trace.log 2>/dev/null || echo 0; }
# moved MEMORY: bytes the target's backends moved through MEMORY (a provider's PCI address, or
# host), from its metrics on 127.0.0.1:9464.
moved() {
    wget -qO- http://127.0.0.1:9464/metrics | awk -v m="memory=\"$1\"" \
        'index($0, "p2pnvmf_backend_bytes_total{") == 1 && index($0, m) { s += $NF } END { printf "%d\n", s }'
}

# --- heads of one subsystem over /dev/ram0, and the host's paths to them (ana.sh, ha.sh) ----
# head_config FILE ADDR CNTLID_MIN [BACKEND]: listeners tcp 4420 and rdma 4421 on ADDR, subsystem
# $NQN (controller IDs from CNTLID_MIN) with one namespace of UUID $UUID on BACKEND (its lines,
# `\n`-separated; /dev/ram0 by default); the caller appends [ana] or [cluster].
head_config() {
    cat >"$1" <<CFG
[[listener]]
name = "tcp"
transport = "tcp"
address = "$2"
port = 4420

[[listener]]
name = "rdma"
transport = "rdma"
address = "$2"
port = 4421

[[subsystem]]
nqn = "$NQN"
serial = "HA0001"
allow_any_host = true
cntlid_min = $3
cntlid_max = $(($3 + 999))

[[subsystem.namespace]]
nsid = 1
$(printf "${4:-backend = \"file\"\\npath = \"/dev/ram0\"}")
uuid = "$UUID"

CFG
}
# path_of CTRL: the host's hidden disk of namespace $UUID on controller CTRL (nvmeXcYnZ).
path_of() {
    local b
    for b in /sys/block/nvme*c*n*; do
        [[ -e $b && $(cat "$b/uuid" 2>/dev/null) == "$UUID" && $(readlink -f "$b/device") == */$1 ]] && { echo "${b##*/}"; return; }
    done
    die "no path of $UUID on $1"
}
# head_dev: the multipath head device (nvmeXnY) of namespace $UUID.
head_dev() {
    local b
    for b in /sys/block/nvme*n*; do
        [[ ${b##*/} =~ ^nvme[0-9]+n[0-9]+$ && $(cat "$b/uuid") == "$UUID" ]] && echo "${b##*/}"
    done
    return 0
}
# ana_of PATH: the ANA state the host holds for a path; wait_ana PATH STATE: until it is STATE.
ana_of() { cat "/sys/block/$1/ana_state"; }
wait_ana() {
    local i
    for i in $(seq 300); do [[ $(ana_of "$1") == "$2" ]] && return 0; sleep 0.05; done
    die "path $1 is '$(ana_of "$1")', not '$2', 15 s on"
}
# ios PATH: reads + writes completed on a path, as the host's block layer counts them.
ios() { awk '{ print $1 + $5 }' "/sys/block/$1/stat"; }

# --- heads a and b ($A_IP, $B_IP) in a cluster through etcd (ha.sh, ha-dual-port.sh) --------
# etcd_member: one etcd member on 127.0.0.1:2379, up.
etcd_member() {
    etcd --name e0 --data-dir /tmp/etcd0 --listen-client-urls http://127.0.0.1:2379 \
        --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
        --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e0=http://127.0.0.1:2380 \
        >/tmp/scn/etcd.log 2>&1 &
    for _ in $(seq 200); do etcdctl --endpoints=127.0.0.1:2379 endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
    etcdctl --endpoints=127.0.0.1:2379 endpoint health || die "etcd did not come up"
}
# owner: the head etcd names as group 1's owner.
owner() { etcdctl --endpoints=127.0.0.1:2379 get --print-value-only /p2pnvmf/ana/1/owner; }
other() { if [[ $1 == a ]]; then echo b; else echo a; fi; }
addr_of() { if [[ $1 == a ]]; then echo "$A_IP"; else echo "$B_IP"; fi; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# connect_heads TRANSPORT PORT: a path to each head (controllers C[a], C[b], the host's paths
# P[a], P[b], the multipath device $head); the owner's path optimized, the other's not.
declare -A C P
connect_heads() {
    local h
    for h in a b; do
        C[$h]=$(TARGET_ADDR=$(addr_of $h) nvme_connect_ctrl "$1" "$2" "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=-1)
    done
    sleep 0.5
    for h in a b; do P[$h]=$(path_of "${C[$h]}"); done
    head=$(head_dev)
    wait_ana "${P[$(owner)]}" optimized; wait_ana "${P[$(other "$(owner)")]}" non-optimized
    nvme list-subsys "/dev/$head"
}
# kill_owner RUN: SIGKILLs group 1's owner $o under I/O; the other head $n takes over. Sets
# first_ms (to the first completion on $n's path) and taken_ms (to $n optimized at the host).
kill_owner() {
    local c0 t0 t1
    o=$(owner); n=$(other "$o")
    c0=$(ios "${P[$n]}")
    t0=$(now_ms)
    kill_head "$o"
    while (( $(ios "${P[$n]}") <= c0 )); do sleep 0.01; done
    t1=$(now_ms)
    wait_ana "${P[$n]}" optimized
    first_ms=$((t1 - t0)); taken_ms=$(($(now_ms) - t0))
    [[ $(owner) == "$n" ]] || die "etcd names $(owner), not $n, as the owner after $o died"
    echo "run $1: $o killed; first completion through $n after $first_ms ms; $n optimized at the host after $taken_ms ms"
}
# rejoin NAME: head NAME started again; it stands by (non-optimized).
rejoin() {
    start_head "$1" "/tmp/scn/$1.toml" "$(addr_of "$1")" 4420
    wait_ana "${P[$1]}" non-optimized
}

# --- reservations through nvme-cli (reservations.sh, ha.sh) --------------------------------
# resv CMD ARGS: nvme resv-CMD, which must succeed.
resv() { local cmd=$1; shift; nvme "resv-$cmd" "$@" >/dev/null || die "nvme resv-$cmd $* failed"; }
# may OP DEV: whether this host's 4 KiB direct read/write at block 64 of DEV succeeds; a refusal
# must be the block layer's reservation conflict (EBADE).
may() {
    local out rc=0
    if [[ $1 == read ]]; then
        out=$(dd if="$2" of=/dev/null bs=4k skip=64 count=1 iflag=direct 2>&1) || rc=$?
    else
        out=$(dd if=/dev/zero of="$2" bs=4k seek=64 count=1 oflag=direct conv=notrunc 2>&1) || rc=$?
    fi
    if [[ $rc -eq 0 ]]; then echo yes; return; fi
    grep -q "Invalid exchange" <<<"$out" || die "$1 on $2 failed otherwise than with a reservation conflict: $out"
    echo no
}

# verify_loop DEV: fio verify rounds until /tmp/stop-fio exists; a failed round leaves
# /tmp/fio.fail.
verify_loop() {
    rm -f /tmp/stop-fio /tmp/fio.fail
    while [[ ! -e /tmp/stop-fio ]]; do
        fio_verify "$1" 16k 2 64 >>/tmp/scn/fio.log 2>&1 || { touch /tmp/fio.fail; return; }
    done
}
stop_verify() {
    touch /tmp/stop-fio
    wait "$1"
    [[ ! -e /tmp/fio.fail ]] || { tail -n 30 /tmp/scn/fio.log; die "fio verify failed: $2"; }
    echo "fio: $(grep -c '^fio ' /tmp/scn/fio.log) verify rounds passed so far"
}
