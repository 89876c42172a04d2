#!/usr/bin/env bash
# Builds the guest kernel with CONFIG_PCI_P2PDMA for the p2pmem scenarios from Debian's
# linux-source-6.12 (Debian's own images lack P2PDMA): x86_64_defconfig + kvm_guest.config +
# tests/vm/kernel/p2pdma-guest.config. Cached by the hash of the fragment and the source
# package version; the first build took 675 s on 2 cores (make -j3).
# Prints the directory holding vmlinuz and lib/modules/<kver>.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="${P2PNVMF_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/p2pnvmf-vm}"
FRAGMENT="$HERE/kernel/p2pdma-guest.config"
die() { echo "tests/vm/build-p2pdma-kernel.sh: $*" >&2; exit 1; }

ver=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null) \
    || die "linux-source-6.12 is not installed (run tests/vm/deps.sh)"
tarball=$(ls /usr/src/linux-source-6.12.tar.* 2>/dev/null | head -n1)
[[ -n $tarball ]] || die "no /usr/src/linux-source-6.12.tar.* (package linux-source-6.12)"
for tool in make gcc bc bison flex xz; do
    command -v "$tool" >/dev/null || die "missing '$tool' (run tests/vm/deps.sh)"
done

mkdir -p "$CACHE"
exec 8>"$CACHE/.kernel.lock"
flock 8

key=$(cat "$FRAGMENT" <(echo "$ver") | sha256sum | cut -c1-16)
out="$CACHE/kernel-p2pdma-$key"
if [[ ! -f $out/.ok ]]; then
    work="$CACHE/kernel-p2pdma-build"
    rm -rf "$work" "$out"
    mkdir -p "$work"
    echo "building the P2PDMA guest kernel from linux-source-6.12 $ver (about 11 min)" >&2
    start=$SECONDS
    tar -xf "$tarball" -C "$work"
    src=$(ls -d "$work"/linux-source-6.12)
    obj="$work/obj"
    log="$work/build.log"
    {
        make -C "$src" O="$obj" x86_64_defconfig
        make -C "$src" O="$obj" kvm_guest.config
        (cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$FRAGMENT")
        make -C "$src" O="$obj" olddefconfig
    } >"$log" 2>&1 || die "configuring failed; see $log"
    # Every option of the fragment must survive olddefconfig, else the kernel is not the one asked for.
    while IFS= read -r line; do
        [[ $line =~ ^CONFIG_([A-Z0-9_]+)=(.*)$ ]] || continue
        opt=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        if [[ $want == n ]]; then
            grep -qx "CONFIG_$opt=[ym]" "$obj/.config" && die "CONFIG_$opt is still set after olddefconfig"
        else
            grep -qx "CONFIG_$opt=$want" "$obj/.config" || die "CONFIG_$opt=$want did not survive olddefconfig"
        fi
    done < "$FRAGMENT"
    jobs=$(( $(nproc) + 1 ))
    make -C "$src" O="$obj" -j"$jobs" bzImage modules >>"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "kernel build failed; see $log"; }
    mkdir -p "$out.tmp"
    make -C "$src" O="$obj" INSTALL_MOD_PATH="$out.tmp" modules_install >>"$log" 2>&1 \
        || die "modules_install failed; see $log"
    rm -f "$out.tmp"/lib/modules/*/build  # a link into the build tree, deleted below
    cp "$obj/arch/x86/boot/bzImage" "$out.tmp/vmlinuz"
    cp "$obj/.config" "$out.tmp/config"
    touch "$out.tmp/.ok"
    mv "$out.tmp" "$out"
    rm -rf "$work"
    echo "built the P2PDMA guest kernel in $((SECONDS - start)) s" >&2
fi
echo "$out"
