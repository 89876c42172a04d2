#!/usr/bin/env bash
# Installs what the VM suite needs on a Debian 12 host and fetches the guest kernel package
# into a cache directory (never committed). Idempotent: a second run only checks.
set -euo pipefail

CACHE="${P2PNVMF_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/p2pnvmf-vm}"
PKGS=(qemu-system-x86 busybox-static nvme-cli rdma-core ibverbs-providers ibverbs-utils
      libibverbs-dev librdmacm-dev fio pciutils kmod cpio xz-utils iproute2 udev
      # The P2PDMA guest kernel of the p2pmem scenarios (tests/vm/build-p2pdma-kernel.sh).
      linux-source-6.12 make gcc libc6-dev bc bison flex libelf-dev libssl-dev
      # libFuzzer, built by the fuzz targets (fuzz/smoke.sh).
      g++
      # The unit file check (tests/deploy.rs: systemd-analyze verify).
      systemd
      # blktests' nvme group in the guest (tests/vm/scenarios/blktests.sh): gawk, and mkfs.xfs
      # for its xfs tests.
      gawk xfsprogs
      # The media-errors scenario's dm "error" target.
      dmsetup
      # High availability: etcd for the cluster tests (p2pnvmf-cluster's and the VM's), socat
      # as a relay to etcd that the HA scenario stops to cut a head off.
      etcd-server etcd-client socat)

die() { echo "tests/vm/deps.sh: $*" >&2; exit 1; }

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "need root to install: ${missing[*]}"
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed for: ${missing[*]}"
fi

mkdir -p "$CACHE"
# The newest 6.12 unsigned image Debian 12 offers (bookworm-security).
if ! ls "$CACHE"/linux-image-6.12*-unsigned_*.deb >/dev/null 2>&1; then
    name=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.+-]*deb12-amd64-unsigned$' \
        | awk '{print $1}' | sort -V | tail -n1)
    if [[ -z $name ]]; then
        apt-get update -qq || true
        name=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.+-]*deb12-amd64-unsigned$' \
            | awk '{print $1}' | sort -V | tail -n1)
    fi
    [[ -n $name ]] || die "no linux-image-6.12.*+deb12-amd64-unsigned package found in apt (is bookworm-security in sources?)"
    echo "downloading $name"
    (cd "$CACHE" && apt-get download -qq -o APT::Sandbox::User=root "$name") || die "apt-get download $name failed"
fi
echo "deps ok; kernel cache: $CACHE"
