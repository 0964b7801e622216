#!/bin/bash
# Builds (once) the Debian trixie root that tests/system.rs boots with systemd-nspawn, and prints
# its path. The root is cached under $CACHE, keyed by a hash of this script, so a warm run only
# checks that it exists; a change here builds a new one (older ones are removed). Steps and
# pitfalls: the project's systemd-nspawn recipe. Trixie is pinned: systemd >= 258 refuses this
# kind of host's hybrid cgroup v1/v2 layout. Needs root, debootstrap and systemd-nspawn.
set -euo pipefail
CACHE="${OAM_SYSTEM_TEST_CACHE:-/var/cache/oam-docker-ipam-test}"
key="$(sha256sum "$0" | cut -c1-12)"
root="$CACHE/root-$key"
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9
if [[ -f "$root/.complete" ]]; then echo "$root"; exit 0; fi

# The host's Debian mirror (deb822 sources first, then the one-line format).
mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | grep -v security | head -n 1 || true)"
[[ -n "$mirror" ]] || mirror="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[[ -n "$mirror" ]] || { echo "build-root: no Debian mirror in the host's apt sources" >&2; exit 1; }

for old in "$CACHE"/root-* "$CACHE"/building-*; do
    [[ -e "$old" && "$old" != "$root" ]] && rm -rf --one-file-system "$old"
done
work="$CACHE/building-$key"
rm -rf --one-file-system "$work"
echo "build-root: debootstrap trixie from $mirror into $work (a few minutes, once)" >&2
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,python3 \
    trixie "$work" "$mirror" >&2

# Nothing may start while packages install (no bus, and docker would touch the network).
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 0755 "$work/usr/sbin/policy-rc.d"
packages="rpm docker.io docker-cli busybox-static etcd-server etcd-client man-db"
nspawn=(systemd-nspawn -q -D "$work" --register=no --keep-unit --pipe)
"${nspawn[@]}" env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get update -q && apt-get install -y -q --download-only --no-install-recommends $packages" >&2
"${nspawn[@]}" --private-network env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get install -y -q --no-install-recommends $packages && apt-get clean" >&2
rm -f "$work/usr/sbin/policy-rc.d" "$work/var/lib/apt/lists/"*_Packages 2>/dev/null || true

# nspawn mounts the cgroup v1 controllers read-only; dockerd needs to write them.
cat >"$work/etc/systemd/system/cgroup-rw.service" <<'UNIT'
[Unit]
Description=Remount the cgroup v1 controllers writable for dockerd
DefaultDependencies=no
Before=sysinit.target docker.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'for c in /sys/fs/cgroup/*; do case "$c" in */systemd|*/unified) continue;; esac; mountpoint -q "$c" && mount -o remount,rw,bind "$c"; done; true'

[Install]
WantedBy=sysinit.target
UNIT
mkdir -p "$work/etc/systemd/system/sysinit.target.wants"
ln -sf ../cgroup-rw.service "$work/etc/systemd/system/sysinit.target.wants/cgroup-rw.service"

# etcd on loopback only, on a port no tool defaults to (so a test can tell which endpoints a
# service was given), with the v2 API the original 1.0.0 plugin speaks.
cat >"$work/etc/default/etcd" <<'CONF'
ETCD_NAME=system-test
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:22379
ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:22379
ETCD_LISTEN_PEER_URLS=http://127.0.0.1:22380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:22380
ETCD_INITIAL_CLUSTER=system-test=http://127.0.0.1:22380
ETCD_ENABLE_V2=true
CONF
rm -rf "$work/var/lib/etcd/default"
systemctl --root="$work" enable etcd.service docker.service >&2
# No terminal to log in on; a quiet, quick boot.
systemctl --root="$work" mask console-getty.service getty@.service systemd-networkd-wait-online.service >&2 || true

touch "$work/.complete"
mv "$work" "$root"
echo "$root"
