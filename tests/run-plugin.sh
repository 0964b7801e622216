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
plugin=""
data=""
# Runs on every exit, Ctrl-C included; nothing in it may stop it early under set -e.
cleanup() {
    set +e
    if [[ -n "$plugin" ]]; then kill "$plugin" 2>/dev/null; wait "$plugin" 2>/dev/null; fi
    if [[ -n "$etcd_pid" ]]; then kill "$etcd_pid" 2>/dev/null; wait "$etcd_pid" 2>/dev/null; fi
    if [[ -n "$data" ]]; then rm -rf "$data"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# curl asks etcd whether it answers: without it every etcd would look absent.
missing=()
command -v curl >/dev/null || missing+=(curl)
first="${store%%,*}"
if ! curl -fsS --max-time 2 "$first/health" >/dev/null 2>&1; then
    command -v etcd >/dev/null || missing+=(etcd-server)
fi
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! curl -fsS --max-time 2 "$first/health" >/dev/null 2>&1; then
    data="$(mktemp -d /tmp/oam-etcd.XXXXXX)"
    store="http://127.0.0.1:2379"
    echo "no etcd answers at $first: starting a throwaway one at $store (data in $data)"
    etcd --data-dir "$data" --listen-client-urls "$store" --advertise-client-urls "$store" \
         --listen-peer-urls http://127.0.0.1:2380 >"$data/etcd.log" 2>&1 &
    etcd_pid=$!
    for _ in $(seq 50); do curl -fsS --max-time 1 "$store/health" >/dev/null 2>&1 && break; sleep 0.2; done
    if ! curl -fsS --max-time 1 "$store/health" >/dev/null 2>&1; then
        echo "FATAL: the throwaway etcd did not answer at $store within 10 s; its log:" >&2
        tail -n 20 "$data/etcd.log" >&2
        exit 1
    fi
fi
echo "plugin: $bin --cluster-store $store server $*  (Ctrl-C stops it)"
"$bin" --cluster-store "$store" --debug server "$@" &
plugin=$!
cat <<EOF
Next, in another shell: define the pools, then a Docker network that uses the plugin:
  $bin --cluster-store $store host-range --ip-start 192.0.2.54/24 --ip-end 192.0.2.58/24 --gateway 192.0.2.1
  $bin --cluster-store $store ip-range --ip-start 192.0.2.100/24 --ip-end 192.0.2.200/24
  docker network create --ipam-driver talkingdata --subnet 192.0.2.0/24 --gateway 192.0.2.60 mynet
  docker run --rm --network mynet IMAGE ip addr
The gateway above is any address outside both ranges, for a try; on a real host,
'oam-docker-ipam create-network' (README) takes this host's address from the host range,
makes it the gateway of mynet and writes the br0 bridge config.
EOF
wait "$plugin"
