# Moving from the kernel target: a subsystem set up in nvmet's configfs (a name without the
# "nqn." prefix, serial, a host with a DH-HMAC-CHAP secret, a namespace on /dev/ram0 with its
# own UUID and NGUID, a TCP and an RDMA port) is saved as nvmetcli saves it, turned into TOML by
# `p2pnvmf import-nvmetcli`, served by p2pnvmf — and the Linux host sees the same identities
# (subsystem NQN, serial, model, namespace UUID/NGUID/wwid, size) and the same bytes.
SUB=legacy-volume-1
UUID=5f0c6d9e-2a3b-4c4d-8e5f-6a7b8c9d0e1f
NGUID=0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9
CFS=/sys/kernel/config/nvmet
KEY=$(nvme gen-dhchap-key --hmac=1 --nqn="$HOSTNQN") || die "nvme gen-dhchap-key failed"

modprobe brd rd_nr=1 rd_size=65536 || die "modprobe brd"
modprobe nvmet_tcp && modprobe nvmet_rdma || die "modprobe nvmet"

step "the kernel target: $SUB through configfs"
mkdir "$CFS/hosts/$HOSTNQN"
echo "$KEY" > "$CFS/hosts/$HOSTNQN/dhchap_key"
mkdir "$CFS/subsystems/$SUB"
echo LEGACY0001 > "$CFS/subsystems/$SUB/attr_serial"
ln -s "$CFS/hosts/$HOSTNQN" "$CFS/subsystems/$SUB/allowed_hosts/$HOSTNQN"
ns=$CFS/subsystems/$SUB/namespaces/1
mkdir "$ns"
echo -n /dev/ram0 > "$ns/device_path"
echo "$UUID" > "$ns/device_uuid"
echo "$NGUID" > "$ns/device_nguid"
echo 1 > "$ns/enable"
for p in "1 tcp 4420" "2 rdma 4421"; do
    read -r id t port <<<"$p"
    mkdir "$CFS/ports/$id"
    echo "$t" > "$CFS/ports/$id/addr_trtype"
    echo ipv4 > "$CFS/ports/$id/addr_adrfam"
    echo "$GUEST_IP" > "$CFS/ports/$id/addr_traddr"
    echo "$port" > "$CFS/ports/$id/addr_trsvcid"
    ln -s "$CFS/subsystems/$SUB" "$CFS/ports/$id/subsystems/$SUB"
done

# identity DEV: what the host sees of the subsystem and namespace behind block device DEV.
identity() {
    local ctrl b=/sys/block/${1#/dev/}
    ctrl=$(ls -d "$b"/device/nvme* 2>/dev/null | head -n1); ctrl=${ctrl:-$b/device}
    echo "subsysnqn=$(cat "$ctrl/subsysnqn") serial=$(cat "$ctrl/serial") model=$(cat "$ctrl/model")"
    echo "uuid=$(cat "$b/uuid") nguid=$(cat "$b/nguid") wwid=$(cat "$b/wwid") size=$(cat "$b/size")"
}
head -c $((4 << 20)) /dev/urandom > /tmp/pattern
dev=$(nvme_connect_dev tcp 4420 "$SUB" --dhchap-secret="$KEY")
identity "$dev" | tee /tmp/kernel-identity
dd if=/tmp/pattern of="$dev" bs=1M oflag=direct status=none || die "write through the kernel target"
nvme_disconnect_nqn "$SUB" >/dev/null

step "nvmetcli save: configfs as JSON (nvmetcli's layout: each node's attribute groups)"
python3 - "$CFS" > /tmp/scn/nvmet.json <<'PY' || die "dumping configfs"
import glob, json, os, stat, sys
root = sys.argv[1]
def groups(path, names):
    d = {}
    for g in names:
        d[g] = {}
        for f in sorted(glob.glob(f"{path}/{g}_*")):
            if os.path.isfile(f) and os.stat(f).st_mode & stat.S_IWUSR:
                try:
                    d[g][os.path.basename(f).split("_", 1)[1]] = open(f).read().strip()
                except OSError:
                    pass
    if os.path.isfile(f"{path}/enable"):
        d["enable"] = int(open(f"{path}/enable").read())
    return d
ls = lambda p: sorted(os.listdir(p)) if os.path.isdir(p) else []
out = {"hosts": [], "ports": [], "subsystems": []}
for h in ls(f"{root}/hosts"):
    # nvmetcli 0.7 saves a host's NQN only; its generic dump of the dhchap_* attributes, as here,
    # is what import-nvmetcli reads when a file has them.
    out["hosts"].append({"nqn": h, **groups(f"{root}/hosts/{h}", ["dhchap"])})
for s in ls(f"{root}/subsystems"):
    p = f"{root}/subsystems/{s}"
    nss = []
    for n in ls(f"{p}/namespaces"):
        d = groups(f"{p}/namespaces/{n}", ["device", "ana", "resv"])
        d.update(nsid=int(n), ana_grpid=int(open(f"{p}/namespaces/{n}/ana_grpid").read()))
        nss.append(d)
    out["subsystems"].append({"nqn": s, "allowed_hosts": ls(f"{p}/allowed_hosts"), "namespaces": nss, **groups(p, ["attr"])})
for i in ls(f"{root}/ports"):
    p = f"{root}/ports/{i}"
    anas = [{"grpid": int(g), **groups(f"{p}/ana_groups/{g}", ["ana"])} for g in ls(f"{p}/ana_groups")]
    out["ports"].append({"portid": int(i), "subsystems": ls(f"{p}/subsystems"), "ana_groups": anas,
                         "referrals": [], **groups(p, ["addr", "param"])})
print(json.dumps(out, sort_keys=True, indent=2))
PY
grep -q '"device_path"\|"path": "/dev/ram0"' /tmp/scn/nvmet.json || { cat /tmp/scn/nvmet.json; die "no namespace path in the dump"; }

step "the kernel target stops serving it"
for id in 1 2; do rm "$CFS/ports/$id/subsystems/$SUB"; rmdir "$CFS/ports/$id"; done
echo 0 > "$ns/enable"; rmdir "$ns"
rm "$CFS/subsystems/$SUB/allowed_hosts/$HOSTNQN"; rmdir "$CFS/subsystems/$SUB" "$CFS/hosts/$HOSTNQN"

step "p2pnvmf import-nvmetcli"
"$P2PNVMF_BIN" import-nvmetcli /tmp/scn/nvmet.json > /tmp/scn/imported.toml 2> /tmp/scn/import-notes.txt \
    || { cat /tmp/scn/import-notes.txt; die "import-nvmetcli failed"; }
cat /tmp/scn/imported.toml /tmp/scn/import-notes.txt
grep -q "^dhchap_key = \"$KEY\"" /tmp/scn/imported.toml || die "the host's secret was not carried over"
grep -q "not carried over: subsystem $SUB: attr.firmware" /tmp/scn/import-notes.txt || die "no line for the firmware revision"
"$P2PNVMF_BIN" check-config /tmp/scn/imported.toml
start_target /tmp/scn/imported.toml 4420

for t in "tcp 4420" "rdma 4421"; do
    read -r tr port <<<"$t"
    step "served by p2pnvmf over $tr: the host sees the same identities and bytes"
    dev=$(nvme_connect_dev "$tr" "$port" "$SUB" --dhchap-secret="$KEY")
    identity "$dev" > /tmp/our-identity
    cat /tmp/our-identity
    # The firmware revision is ours (a line of the import says so); everything here is the same.
    diff /tmp/kernel-identity /tmp/our-identity || die "the host sees other identities over $tr"
    dd if="$dev" of=/tmp/readback bs=1M count=4 iflag=direct status=none || die "read over $tr"
    cmp /tmp/pattern /tmp/readback || die "other bytes than the kernel target wrote"
    nvme_disconnect_nqn "$SUB" >/dev/null
done
grep -q "'$SUB' is not in the NQN form" "$TARGET_LOG" || die "no warning for the name"
stop_target
