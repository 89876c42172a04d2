# Persistent reservations with the Linux host: blktests nvme/054's nvme-cli sequence against
# p2pnvmf (over NVMe/RDMA) compared with what the kernel target prints (its 054.out); two host
# identities over NVMe/TCP (through two listeners: nvme-cli connects a host once per port), each
# with its own block device (nvme_core multipath=N), where the
# second host's reads and writes are refused exactly where each of the six types says; the
# kernel's PR ioctls (register, reserve, preempt, preempt and abort with the other host's writes
# in flight, clear); the event and log page reaching the preempted host; bad input; and the
# reservation kept through SIGKILL and restart with PTPL (and not without it), a damaged state
# file refused with its path.
NQN=nqn.2026-12.io.p2pnvmf:resv
HOST2NQN=nqn.2014-08.org.nvmexpress:uuid:2f4e6a8c-1b3d-4c5e-9f70-81a2b3c4d5e6
HOST2ID=2f4e6a8c-1b3d-4c5e-9f70-81a2b3c4d5e6
STATE=/tmp/scn/resv

modprobe brd rd_nr=2 rd_size=65536 || die "modprobe brd"
# Namespace 1's writes take 20 ms (dm-delay), so that a Preempt and Abort finds the other host's
# writes in flight at the storage: were it to complete before they end, they would land after
# the preempting host's own writes.
modprobe dm_delay || die "modprobe dm_delay"
DM_DISABLE_UDEV=1 dmsetup create slow --table "0 $(blockdev --getsz /dev/ram0) delay /dev/ram0 0 0 /dev/ram0 0 20" \
    || die "dmsetup create slow"
cfg=/tmp/scn/target.toml
cat >"$cfg" <<CFG
[[listener]]
name = "tcp0"
transport = "tcp"
address = "$GUEST_IP"
port = 4420

[[listener]]
name = "tcp1"
transport = "tcp"
address = "$GUEST_IP"
port = 4422

[[listener]]
name = "rdma0"
transport = "rdma"
address = "$GUEST_IP"
port = 4421

[[subsystem]]
nqn = "$NQN"
hosts = ["$HOSTNQN", "$HOST2NQN"]

[[subsystem.namespace]]
nsid = 1
backend = "file"
path = "/dev/mapper/slow"

[[subsystem.namespace]]
nsid = 2
backend = "file"
path = "/dev/ram1"

[reservations]
state_dir = "$STATE"
CFG
start_target "$cfg"

# A block device per controller: I/O through it is that controller's host's.
modprobe -r nvme_tcp nvme_rdma nvme_fabrics nvme_core || die "unloading the host's nvme modules"
modprobe nvme_core multipath=N && modprobe nvme_tcp && modprobe nvme_rdma || die "reloading nvme_core multipath=N"

# attach T PORT [host2]: connects and echoes the new controller and its namespace 1 and 2 devices.
attach() {
    local c ids=()
    [[ ${3:-} == host2 ]] && ids=(--hostnqn="$HOST2NQN" --hostid="$HOST2ID")
    c=$(nvme_connect_ctrl "$1" "$2" "$NQN" "${ids[@]}" --reconnect-delay=1 --ctrl-loss-tmo=60)
    for _ in $(seq 50); do [[ -n $(ns_dev "$c" 2) ]] && break; sleep 0.1; done
    echo "$c $(ns_dev "$c" 1) $(ns_dev "$c" 2)"
}
# report DEV: nvme resv-report --eds, the lines blktests nvme/054 compares.
report() { nvme resv-report "$1" --eds | grep -v hostid | grep -E "gen|rtype|regctl|regctlext|cntlid|rcsts|rkey"; }

step "blktests nvme/054's sequence over NVMe/RDMA, compared with the kernel target's output (054.out)"
mkdir -p /tmp/bt && tar xzf "$BLKTESTS_TAR" -C /tmp/bt blktests/tests/nvme/054.out || die "054.out from $BLKTESTS_TAR"
read -r c dev _ < <(attach rdma 4421)
{
    echo "Running nvme/054"
    echo "Register"; report "$dev"
    resv register "$dev" --nrkey=4 --rrega=0; report "$dev"
    echo "Replace"; resv register "$dev" --crkey=4 --nrkey=5 --rrega=2; report "$dev"
    echo "Unregister"; resv register "$dev" --crkey=5 --rrega=1; report "$dev"
    echo "Acquire"; resv register "$dev" --nrkey=4 --rrega=0; resv acquire "$dev" --crkey=4 --rtype=1 --racqa=0; report "$dev"
    echo "Preempt"; resv acquire "$dev" --crkey=4 --prkey=4 --rtype=2 --racqa=1; report "$dev"
    echo "Release"; resv release "$dev" --crkey=4 --rtype=2 --rrela=0; report "$dev"
    echo "Clear"; resv acquire "$dev" --crkey=4 --rtype=1 --racqa=0; report "$dev"
    resv release "$dev" --crkey=4 --rrela=1
    echo "Test complete"
} > /tmp/scn/054.out
diff -u /tmp/bt/blktests/tests/nvme/054.out /tmp/scn/054.out || die "nvme/054's reports differ from the kernel target's"
echo "nvme/054: $(grep -c . /tmp/scn/054.out) lines as the kernel target prints them"
nvme disconnect -d "/dev/$c" >/dev/null

step "two host identities over NVMe/TCP: host 2 refused exactly where each type says, reads and writes apart"
read -r c1 d1 d1b < <(attach tcp 4420)
read -r c2 d2 d2b < <(attach tcp 4422 host2)
echo "host 1: $c1 ($d1, $d1b); host 2: $c2 ($d2, $d2b)"
[[ $(cat "/sys/class/nvme/$c2/hostnqn") == "$HOST2NQN" ]] || die "host 2's identity not as connected"
nvme id-ns "$d1" | grep -E "^rescap *: 0xff" || die "RESCAP is not every type + PTPL: $(nvme id-ns "$d1" | grep rescap)"
resv register "$d1" --nrkey=0x11 --rrega=0
# type: non-registrant read write, registrant read write (NVMe Base 2.0, Figure 573)
expect=(x "yes no yes no" "no no no no" "yes no yes yes" "no no yes yes" "yes no yes yes" "no no yes yes")
for t in 1 2 3 4 5 6; do
    resv acquire "$d1" --crkey=0x11 --rtype=$t --racqa=0
    got="$(may read "$d2") $(may write "$d2")"
    resv register "$d2" --nrkey=0x22 --rrega=0
    got+=" $(may read "$d2") $(may write "$d2")"
    resv register "$d2" --crkey=0x22 --rrega=1
    [[ "$(may read "$d1") $(may write "$d1")" == "yes yes" ]] || die "type $t: the holder lost access"
    resv release "$d1" --crkey=0x11 --rtype=$t --rrela=0
    echo "type $t: host 2 read/write as non-registrant, as registrant: $got"
    [[ $got == "${expect[$t]}" ]] || die "type $t: host 2 got '$got', the specification says '${expect[$t]}'"
done
dmesg | grep -m1 "reservation conflict error" || die "the host's block layer never saw a reservation conflict"
[[ $(may write "$d2") == yes ]] || die "no reservation left, yet host 2 may not write"
resv register "$d1" --crkey=0x11 --rrega=1

step "bad input gets the specification's status and changes nothing"
resv register "$d1" --nrkey=0x11 --rrega=0
bad() { # bad "(STATUS)" nvme-args...: the command must fail with that status field (DNR 0x4000 + SC).
    local want=$1 out; shift
    out=$(nvme "$@" 2>&1) && die "nvme $* succeeded"
    grep -qF "$want" <<<"$out" || die "nvme $*: expected $want, got: $out"
    echo "nvme $*: ${out##*NVMe status: }"
}
bad "(0x4002)" resv-acquire "$d1" --crkey=0x11 --rtype=7 --racqa=0
bad "(0x4002)" resv-acquire "$d1" --crkey=0x11 --rtype=1 --racqa=3
bad "(0x4002)" resv-register "$d1" --crkey=0x11 --rrega=5
bad "(0x4083)" resv-register "$d1" --nrkey=0x99 --rrega=0
bad "(0x4083)" resv-acquire "$d1" --crkey=0x12 --rtype=1 --racqa=0
bad "(0x4083)" resv-register "$d2" --crkey=0x22 --rrega=1
bad "(0x4018)" resv-report "$d1"
report "$d1" | tr '\n' ' '; echo
[[ $(report "$d1" | grep -c rkey) -eq 1 ]] || die "bad input changed the registrations"

step "the kernel's PR ioctls: register, reserve, preempt, clear; the event and log page reach the preempted host"
PR=$P2PNVMF_PR_IOCTL
"$PR" "$d1" register 0x11 0x101 >/dev/null || die "IOC_PR_REGISTER replace"
"$PR" "$d2" register 0 0x202 || die "IOC_PR_REGISTER"
"$PR" "$d1" reserve 0x101 1 || die "IOC_PR_RESERVE"
out=$("$PR" "$d2" reserve 0x202 1 2>&1) && die "host 2 reserved what host 1 holds"
grep -q "reservation conflict" <<<"$out" || die "IOC_PR_RESERVE by host 2: $out"
[[ $(may write "$d2") == no && $(may read "$d2") == yes ]] || die "write exclusive through the ioctl does not fence host 2's writes"
# The host kernel's uevents (udevadm refuses to run in the guest's chroot): one block per event.
busybox uevent sh -c 'env; echo' > /tmp/scn/uevents 2>&1 &
monitor=$!
sleep 0.5
"$PR" "$d2" preempt 0x202 0x101 2 || die "IOC_PR_PREEMPT"
for _ in $(seq 50); do grep -q "NVME_AEN=0x800006" /tmp/scn/uevents && break; sleep 0.1; done
kill "$monitor"
event=$(awk -v RS= '/NVME_AEN=0x800006/' /tmp/scn/uevents)
grep -E "DEVNAME|NVME_AEN" <<<"$event" || die "host 1 got no Reservation Log Page Available event: $(cat /tmp/scn/uevents)"
grep -qx "DEVNAME=$c1" <<<"$event" || die "the event reached another controller than host 1's ($c1)"
log=$(nvme get-log "/dev/$c1" --log-id=0x80 --log-len=64 --raw-binary | od -An -tx1 -v | tr -d '\n')
echo "host 1's reservation notification log: $log"
read -r -a b <<<"$log"
[[ ${b[8]} == 01 && ${b[12]} == 01 && ${b[0]} != 00 ]] || die "log page 80h is not 'registration preempted' of namespace 1"
[[ $(may read "$d1") == no ]] || die "exclusive access by host 2, yet host 1 reads"
report "$d2" | tr '\n' ' '; echo
"$PR" "$d2" clear 0x202 || die "IOC_PR_CLEAR"
[[ $(report "$d1" | grep -c rkey) -eq 0 && $(may write "$d1") == yes ]] || die "clear left registrations or a reservation"
# Every type through IOC_PR_RESERVE and IOC_PR_RELEASE: host 2 (not registered) may never write,
# and may read under the Write Exclusive types (1, 3, 5) only.
"$PR" "$d1" register 0 0x101 >/dev/null || die "IOC_PR_REGISTER"
"$PR" "$d1" register 0x999 0x111 --ignore-key >/dev/null || die "IOC_PR_REGISTER with PR_FL_IGNORE_KEY"
for t in 1 2 3 4 5 6; do
    "$PR" "$d1" reserve 0x111 "$t" >/dev/null || die "IOC_PR_RESERVE type $t"
    got="$(may read "$d2") $(may write "$d2")"
    if ((t % 2)); then want="yes no"; else want="no no"; fi
    [[ $got == "$want" ]] || die "PR type $t: host 2 got '$got', not '$want'"
    "$PR" "$d1" release 0x111 "$t" >/dev/null || die "IOC_PR_RELEASE type $t"
done
echo "IOC_PR_RESERVE/RELEASE of types 1-6: host 2 refused as each type says"
# (Linux turns a registration to key 0 into a Replace, so it ends with a Clear.)
"$PR" "$d1" clear 0x111 >/dev/null || die "IOC_PR_CLEAR"

step "preempt and abort with host 2's writes in flight: they end, and none lands after the preempt"
"$PR" "$d1" register 0 0x101 >/dev/null && "$PR" "$d2" register 0 0x202 >/dev/null || die "registrations"
"$PR" "$d2" reserve 0x202 3 >/dev/null || die "host 2 reserve"
fio --name=host2 --filename="$d2" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
    --size=8M --time_based --runtime=60 --output=/tmp/scn/fio-host2.out >/dev/null 2>&1 &
fio_pid=$!
# Host 2's block layer has writes in flight (its inflight counters) before host 1 preempts.
for _ in $(seq 200); do read -r _ w < "/sys/block/${d2#/dev/}/inflight"; ((w >= 8)) && break; sleep 0.1; done
echo "host 2's writes in flight at its block layer: $w"
((w >= 8)) || die "host 2's fio has no writes in flight after 20 s"
"$PR" "$d1" preempt 0x101 0x202 1 --abort || die "IOC_PR_PREEMPT_ABORT"
head -c $((8 << 20)) /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of="$d1" bs=1M oflag=direct status=none || die "host 1's write after the preempt"
wait "$fio_pid" && die "host 2's fio went on writing after it was preempted"
grep -E "err=|Invalid exchange" /tmp/scn/fio-host2.out | head -3
grep -q "Invalid exchange\|err=52" /tmp/scn/fio-host2.out || die "host 2's writes did not end with a reservation conflict"
sleep 1
dd if="$d1" of=/tmp/readback bs=1M count=8 iflag=direct status=none || die "read back"
cmp /tmp/pattern /tmp/readback || die "a write of the preempted host landed after the preempt and abort"
grep -o "preempt and abort: .*" "$TARGET_LOG" | tail -n2
grep "reservation changed.*aborted=1" "$TARGET_LOG" >/dev/null || die "the target did not abort host 2's commands"
grep "preempt and abort: waiting" "$TARGET_LOG" | tail -n1 | grep -q "in_flight=[1-9]" \
    || die "host 2 had no write in flight at the storage when it was preempted: nothing was waited for"
"$PR" "$d1" clear 0x101 >/dev/null || die "clear"

step "PTPL: namespace 1 (the kernel's PR register sets it) keeps its reservation through SIGKILL and restart; namespace 2 does not"
"$PR" "$d1" register 0 0x101 >/dev/null && "$PR" "$d1" reserve 0x101 1 >/dev/null || die "host 1 reserve"
"$PR" "$d2" register 0 0x202 >/dev/null || die "host 2 register"
resv register "$d1b" --nrkey=0x33 --rrega=0
resv acquire "$d1b" --crkey=0x33 --rtype=2 --racqa=0
nvme get-feature "$d1" -f 0x83 -n 1 | grep -q "Current value:0x0*1$" || die "PTPL of namespace 1 is not on: $(nvme get-feature "$d1" -f 0x83 -n 1)"
before=$(report "$d1")
ls -l "$STATE"
kill -9 "$TARGET_PID"; wait "$TARGET_PID" 2>/dev/null || true
start_target "$cfg"
wait_live "/sys/class/nvme/$c1" 30; wait_live "/sys/class/nvme/$c2" 30
grep "reservation kept through the restart" "$TARGET_LOG" || die "the target did not load the kept state"
[[ $(report "$d1") == "$before" ]] || die "namespace 1's reservation changed across the restart: $(report "$d1")"
st=$("$P2PNVMF_BIN" status) || die "p2pnvmf status"
grep "reservation:" <<<"$st"
grep -q "reservation: type 1 held by $HOSTID, 2 registrant(s), generation [0-9]*, PTPL on" <<<"$st" \
    || die "p2pnvmf status does not show host 1 holding namespace 1 with PTPL"
[[ $(may write "$d2") == no && $(may write "$d1") == yes ]] || die "the kept reservation does not fence host 2"
[[ $(report "$d1b" | grep -E "^regctl" | tr -d ' ') == "regctl:0" ]] || die "namespace 2 kept registrations without PTPL"
[[ $(may read "$d2b") == yes ]] || die "namespace 2 still reserved without PTPL"

step "a damaged state file is refused with its path and reason"
stop_target
f=$(ls "$STATE"/*.ns1.resv)
cp "$f" /tmp/scn/kept.resv
sed -i 's/^generation .*/generation 99/' "$f"
RUST_LOG=info "$P2PNVMF_BIN" serve --config "$cfg" >/tmp/scn/damaged.log 2>&1 && die "the target started on a damaged state file"
cat /tmp/scn/damaged.log | tail -n 3
grep -q "$f: line .*CRC-32" /tmp/scn/damaged.log || die "the refusal does not name the file and the reason"
cp /tmp/scn/kept.resv "$f"
start_target "$cfg"
wait_live "/sys/class/nvme/$c1" 30
[[ $(report "$d1") == "$before" ]] || die "the restored file does not give the reservation back"
"$PR" "$d1" clear 0x101 >/dev/null || die "clear"
grep -q "^registrant" "$f" && { cat "$f"; die "registrations left in the state file after clear"; }
nvme disconnect -n "$NQN" >/dev/null
stop_target
DM_DISABLE_UDEV=1 dmsetup remove slow || die "dmsetup remove slow"
