#!/usr/bin/env bash
# Installs p2pnvmf as a service: the binary in /usr/local/sbin, the systemd unit, an example
# configuration in /etc/p2pnvmf/p2pnvmf.toml (an existing one is kept) and the README.
#   deploy/install.sh                  build (cargo build --release) and install, then
#                                      `systemctl enable --now p2pnvmf` after editing the config
#   DESTDIR=/tmp/root deploy/install.sh   install under another root (packaging, tests)
#   P2PNVMF_BIN=path deploy/install.sh    install that binary instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "deploy/install.sh: $*" >&2; exit 1; }

root=${DESTDIR:-}
bin=${P2PNVMF_BIN:-}
if [[ -z $bin ]]; then
    cargo build --release --locked || die "cargo build --release failed"
    bin=target/release/p2pnvmf
fi
[[ -x $bin ]] || die "no executable at $bin"
[[ -n $root || $(id -u) -eq 0 ]] || die "installing into / needs root (or set DESTDIR)"

install -D -m 0755 "$bin" "$root/usr/local/sbin/p2pnvmf"
install -D -m 0644 deploy/p2pnvmf.service "$root/etc/systemd/system/p2pnvmf.service"
install -D -m 0644 README.md "$root/usr/local/share/doc/p2pnvmf/README.md"
cfg="$root/etc/p2pnvmf/p2pnvmf.toml"
if [[ -e $cfg ]]; then
    echo "kept the existing $cfg"
else
    install -D -m 0640 deploy/examples/appliance.toml "$cfg"
    echo "installed an example configuration: edit $cfg (addresses, NQNs, devices)"
fi
"$root/usr/local/sbin/p2pnvmf" check-config "$cfg" || echo "note: $cfg does not pass check-config yet"
if [[ -z $root ]] && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "then: systemctl enable --now p2pnvmf"
fi
