#!/bin/bash
# Runs the plugin for real on this machine: builds it, and if no etcd answers at
# $CLUSTER_STORE (default http://127.0.0.1:2379) starts a throwaway one on 127.0.0.1:2379
# (installing Debian's etcd-server if needed), stopped again with the plugin.
# Extra arguments go to `server` (e.g. --socket /tmp/talkingdata.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
store="${CLUSTER_STORE:-http://127.0.0.1:2379}"
cargo build --release --locked
bin="$PWD/target/release/oam-docker-ipam"

etcd_pid=""
data=""
cleanup() {
    if [[ -n "$etcd_pid" ]]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
    if [[ -n "$data" ]]; then rm -rf "$data"; fi
}
trap cleanup EXIT

first="${store%%,*}"
if ! curl -fsS --max-time 2 "$first/health" >/dev/null 2>&1; then
    if ! command -v etcd >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    fi
    data="$(mktemp -d /tmp/oam-etcd.XXXXXX)"
    store="http://127.0.0.1:2379"
    echo "no etcd answers at $first: starting a throwaway one at $store (data in $data)"
    etcd --data-dir "$data" --listen-client-urls "$store" --advertise-client-urls "$store" \
         --listen-peer-urls http://127.0.0.1:2380 >"$data/etcd.log" 2>&1 &
    etcd_pid=$!
    for _ in $(seq 50); do curl -fsS --max-time 1 "$store/health" >/dev/null 2>&1 && break; sleep 0.2; done
fi
echo "plugin: $bin --cluster-store $store server $*  (Ctrl-C stops it)"
"$bin" --cluster-store "$store" --debug server "$@" &
plugin=$!
trap 'kill $plugin 2>/dev/null; wait $plugin; cleanup' EXIT INT TERM
wait "$plugin"
