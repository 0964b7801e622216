#!/bin/bash
# Installs what the tests need on a fresh Debian machine (as root), then runs every test:
# unit tests, etcd integration tests, plugin tests, packaging checks, the Docker end-to-end
# tests and the system test (the RPM under a real systemd in a booted trixie container, whose
# root it builds once under /var/cache/oam-docker-ipam-test). Any missing prerequisite fails
# the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(etcd-server etcd-client docker.io busybox-static iproute2 util-linux rpm rpmlint
          mandoc musl-tools systemd debootstrap systemd-container procps cpio curl openssl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# --no-install-recommends matters for systemd-container: the recommended libnss-mymachines
# edits /etc/nsswitch.conf.
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in etcd etcdctl dockerd docker busybox ip nsenter unshare rpmbuild rpmlint mandoc \
            systemd-analyze systemd-socket-activate musl-gcc debootstrap systemd-nspawn pgrep \
            flock timeout cpio rpm2cpio curl; do
    command -v "$tool" >/dev/null || { echo "FATAL: $tool is missing after install" >&2; exit 1; }
done
# The RPM's binary is static (musl). Rust comes from rustup here (Debian's rustc has no musl
# target): without rustup, say so rather than fail obscurely later.
command -v rustup >/dev/null || {
    echo "FATAL: rustup is missing: install Rust with rustup (https://rustup.rs), then rerun" >&2
    exit 1
}
rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl

cargo test --locked -- --test-threads=4 --skip under_systemd_
# The system test's two tests run here, one container at a time, printing what they measured
# (systemd version, docker runs across restarts and the upgrade, failures).
cargo test --locked --test system -- --test-threads=1 --nocapture
