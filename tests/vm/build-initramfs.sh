#!/usr/bin/env bash
# Builds the VM rig's guest kernel + initramfs: from the cached Debian kernel package, or with
# `p2pdma` from the P2PDMA kernel tests/vm/build-p2pdma-kernel.sh builds (on first need).
# Prints two lines: the vmlinuz path and the initramfs path. Cached by the inputs' hash;
# concurrent callers serialise on a lock.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="${P2PNVMF_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/p2pnvmf-vm}"
die() { echo "tests/vm/build-initramfs.sh: $*" >&2; exit 1; }

# Modules the scenarios load; their dependencies come from modules.dep.
MODULES=(virtio_net 9pnet_virtio 9p configfs rdma_rxe crc32_generic crc32c_generic ib_uverbs
         rdma_ucm nvme nvme_rdma nvme_tcp nvmet nvmet_rdma nvmet_tcp brd null_blk vfio_pci
         vfio_iommu_type1 uio_pci_generic)

for tool in dpkg depmod modprobe xz cpio; do
    command -v "$tool" >/dev/null || die "missing '$tool' (run tests/vm/deps.sh)"
done
[[ -x /bin/busybox ]] || die "missing /bin/busybox (package busybox-static; run tests/vm/deps.sh)"
FLAVOUR=${1:-debian}
mkdir -p "$CACHE"
case $FLAVOUR in
debian)
    # The link-cut scenario's veth pair, and what blktests' nvme group asks for (loop devices,
    # xfs, scsi_debug), the media-errors scenario's device mapper and the reservations
    # scenario's slow writes (dm-delay); the P2PDMA kernel's minimal config has none of them.
    MODULES+=(veth loop xfs scsi_debug dm_mod dm_delay)
    deb=$(ls "$CACHE"/linux-image-6.12*-unsigned_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $deb ]] || die "no linux-image-6.12 unsigned package in $CACHE (run tests/vm/deps.sh)"
    kkey=$(cat "$deb.sha256" 2>/dev/null || { sha256sum "$deb" | cut -c1-64 | tee "$deb.sha256"; })
    kx="$CACHE/kernel-$(basename "$deb" .deb)"
    ;;
p2pdma)
    kx=$("$HERE/build-p2pdma-kernel.sh") || die "building the P2PDMA guest kernel failed"
    kkey=$(basename "$kx")
    ;;
*) die "unknown kernel '$FLAVOUR' (debian or p2pdma)" ;;
esac

exec 9>"$CACHE/.build.lock"
flock 9

key=$(printf '%s %s %s' "$kkey" "$(sha256sum "$HERE/guest/init" "$0" | cut -c1-64)" "${MODULES[*]}" \
      | sha256sum | cut -c1-16)
out="$CACHE/build-$key"
if [[ ! -f $out/initramfs.cpio ]]; then
    if [[ $FLAVOUR == debian && ! -f $kx/.ok ]]; then
        rm -rf "$kx"
        dpkg -x "$deb" "$kx"
        depmod -b "$kx" "$(ls "$kx/lib/modules")"
        touch "$kx/.ok"
    fi
    kver=$(ls "$kx/lib/modules")
    rm -rf "$out.tmp" && mkdir -p "$out.tmp/root"
    root="$out.tmp/root"
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,host,run,tmp,etc} "$root/lib/modules/$kver"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
    done
    # The P2PDMA kernel has most of these built in (modprobe then reports "builtin").
    for m in "${MODULES[@]}"; do
        modprobe -d "$kx" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
    done | sort -u | while read -r ko; do
        rel=${ko#"$kx/lib/modules/$kver/"}
        mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
        case $ko in
        *.xz) xz -dc "$ko" > "$root/lib/modules/$kver/${rel%.xz}" ;;
        *) cp "$ko" "$root/lib/modules/$kver/$rel" ;;
        esac
    done
    cp "$kx/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/" 2>/dev/null || true
    # The kernel's configuration beside its modules, for tools that read /boot/config-$(uname -r)
    # (blktests): the guest sees it as /tmp/rig/lib/modules/$KVER/config.
    [[ ! -f $kx/boot/config-$kver ]] || cp "$kx/boot/config-$kver" "$root/lib/modules/$kver/config"
    depmod -b "$root" "$kver"
    install -m 0755 "$HERE/guest/init" "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet) > "$out.tmp/initramfs.cpio"
    if [[ $FLAVOUR == debian ]]; then cp "$kx/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"; else cp "$kx/vmlinuz" "$out.tmp/vmlinuz"; fi
    rm -rf "$root" "$out"
    mv "$out.tmp" "$out"
fi
echo "$out/vmlinuz"
echo "$out/initramfs.cpio"
