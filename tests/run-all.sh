#!/bin/bash
# Installs what the tests need on a fresh Debian machine (as root), then runs every test:
# unit tests, etcd integration tests, plugin tests, packaging checks and the Docker end-to-end
# tests. Any missing prerequisite fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(etcd-server etcd-client docker.io busybox-static iproute2 util-linux rpm rpmlint
          mandoc musl-tools systemd)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in etcd etcdctl dockerd docker busybox ip nsenter unshare rpmbuild rpmlint mandoc \
            systemd-analyze systemd-socket-activate musl-gcc; do
    command -v "$tool" >/dev/null || { echo "FATAL: $tool is missing after install" >&2; exit 1; }
done
rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl

cargo test --locked -- --test-threads=4
