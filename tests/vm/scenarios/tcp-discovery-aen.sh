# Persistent discovery over NVMe/TCP: the host keeps a discovery controller; a SIGHUP reload
# that adds a subsystem raises a Discovery Log Page Change event (uevent NVME_AEN=0x70f002) and
# moves the generation counter; an unchanged subsystem keeps serving its data across the
# reload; an invalid file is refused with its line and changes nothing.
A=nqn.2026-11.io.p2pnvmf:a
B=nqn.2026-11.io.p2pnvmf:b
CFG=/tmp/scn/target.toml
subsys() {
    printf '\n[[subsystem]]\nnqn = "%s"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = "ram"\nsize = "64MiB"\n' "$1"
}
{ printf '[[listener]]\ntransport = "tcp"\naddress = "%s"\n' "$GUEST_IP"; subsys "$A"; } >"$CFG"
start_target "$CFG"

step "persistent discovery controller, and a host on $A with data written"
SYSTEMD_IGNORE_CHROOT=1 udevadm monitor --kernel --property --subsystem-match=nvme >/tmp/uevents 2>&1 &
mon=$!
nvme discover -t tcp -a "$GUEST_IP" -s 4420 --persistent $(nvme_host_args) | grep -q "subnqn: *$A" \
    || die "persistent discovery does not list $A"
dctrl=$(ctrl_of_nqn nqn.2014-08.org.nvmexpress.discovery)
echo "persistent discovery controller: $dctrl"
devA=$(nvme_connect_dev tcp 4420 "$A")
head -c $((4 << 20)) /dev/urandom >/tmp/patternA
dd if=/tmp/patternA of="$devA" bs=1M oflag=direct status=none

step "add $B with SIGHUP"
subsys "$B" >>"$CFG"
kill -HUP "$TARGET_PID"
for i in $(seq 100); do grep -q "NVME_AEN=0x70f002" /tmp/uevents && break; sleep 0.1; done
grep -q "NVME_AEN=0x70f002" /tmp/uevents || { cat /tmp/uevents; die "no Discovery Log Page Change event reached the host"; }
kill "$mon"
out=$(nvme discover -t tcp -a "$GUEST_IP" -s 4420 $(nvme_host_args))
grep -q "Generation counter 2" <<<"$out" || { echo "$out"; die "generation counter did not move to 2"; }
grep -q "subnqn: *$B" <<<"$out" || die "discovery log lacks $B after the reload"

step "$A kept its data; $B serves"
dd if="$devA" of=/tmp/readA bs=1M count=4 iflag=direct status=none
cmp /tmp/patternA /tmp/readA || die "$A lost its data across the reload"
devB=$(nvme_connect_dev tcp 4420 "$B")
verify_rw "$devB" 4

step "an invalid file is refused and changes nothing"
echo 'bogus = 1' >>"$CFG"
kill -HUP "$TARGET_PID"
for i in $(seq 50); do grep -q "reload refused" "$TARGET_LOG" && break; sleep 0.1; done
grep "reload refused" "$TARGET_LOG" | grep -q "target.toml:[0-9]*:[0-9]*: unknown field .bogus." || die "refusal does not name the file, line and key"
verify_rw "$devB" 2

nvme_disconnect_nqn "$A"
nvme_disconnect_nqn "$B"
nvme disconnect -n nqn.2014-08.org.nvmexpress.discovery
stop_target
step "done"
