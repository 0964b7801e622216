#!/bin/bash
# Boots and stops the system test's container: a copy-on-write view of the cached trixie root
# (tests/system/build-root.sh) booted with `systemd-nspawn --boot`, so systemd is its PID 1.
# Steps and pitfalls: the project's systemd-nspawn recipe.
#
#   machine.sh start SCRATCH ROOT NAME   boot; prints the host PID of the container's systemd
#   machine.sh stop SCRATCH NAME         power off, stop nspawn by its PID, remove what is left
#
# SCRATCH holds everything a run writes: the overlay's writable layer (the cached root stays
# pristine), dockerd's data (/var/lib/docker), pkgs/ (seen read-only as /mnt/pkgs), the console
# log and the PIDs. The overlay is mounted in a private mount namespace that only nspawn holds,
# so no host mount outlives it. Processes are stopped by their PIDs only.
set -euo pipefail

leader_of() { pgrep -P "$1" -x systemd | head -n 1; }

start() {
    local scratch=$1 root=$2 name=$3
    mkdir -p "$scratch"/{upper,work,merged,docker,pkgs} "$scratch/upper/etc/docker"
    # dockerd's cgroups under a parent of this run's own, apart from other dockerds on the host.
    printf '{"cgroup-parent": "/%s-docker"}\n' "$name" >"$scratch/upper/etc/docker/daemon.json"
    (
        # Without a bus, nspawn puts the container under its caller's cgroup: give it its own.
        for h in systemd unified; do
            mkdir -p "/sys/fs/cgroup/$h/$name"
            echo "$BASHPID" >"/sys/fs/cgroup/$h/$name/cgroup.procs"
        done
        exec setsid unshare -m --propagation private sh -c '
            mount -t overlay overlay -o "lowerdir=$2,upperdir=$1/upper,workdir=$1/work" "$1/merged" &&
            exec systemd-nspawn -q -D "$1/merged" -M "$3" --boot --register=no --keep-unit \
                --private-network --system-call-filter=@keyring --console=pipe \
                --bind="$1/docker:/var/lib/docker" --bind-ro="$1/pkgs:/mnt/pkgs"' \
            sh "$scratch" "$root" "$name" </dev/null >"$scratch/console.log" 2>&1
    ) &
    local pid=$!
    echo "$pid" >"$scratch/nspawn.pid"
    local leader="" i
    for i in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || { echo "machine: nspawn exited:" >&2; cat "$scratch/console.log" >&2; exit 1; }
        leader="$(leader_of "$pid" || true)"
        [[ -n "$leader" ]] && break
        sleep 0.1
    done
    [[ -n "$leader" ]] || { echo "machine: no systemd in the container after 30 s" >&2; exit 1; }
    echo "$leader" >"$scratch/leader.pid"
    # The bus comes up a moment after systemd itself.
    local state=""
    for i in $(seq 1 600); do
        state="$(timeout -s KILL 120 nsenter -t "$leader" -a systemctl is-system-running --wait 2>/dev/null || true)"
        [[ -n "$state" ]] && break
        sleep 0.1
    done
    if [[ "$state" != running ]]; then
        echo "machine: system state '$state'; failed units:" >&2
        timeout -s KILL 20 nsenter -t "$leader" -a systemctl --failed --no-pager >&2 || true
        exit 1
    fi
    echo "$leader"
}

stop() {
    local scratch=$1 name=$2 pid leader
    pid="$(cat "$scratch/nspawn.pid" 2>/dev/null || true)"
    leader="$(cat "$scratch/leader.pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        # systemd-shutdown SIGSTOPs every process in the container, a host nsenter's child
        # included, and would wait for it forever: end ours (children of this run's nsenter
        # processes) first.
        for p in $(pgrep -x nsenter || true); do
            if [[ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" == "$(readlink "/proc/$leader/ns/pid" 2>/dev/null)" ]] ||
               tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-t $leader "; then
                kill -TERM "$p" 2>/dev/null || true; kill -CONT "$p" 2>/dev/null || true
            fi
        done
        [[ -n "$leader" ]] && timeout -s KILL 20 nsenter -t "$leader" -a systemctl poweroff 2>/dev/null || true
        local i
        for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "machine: $name did not power off in 30 s; stopping nspawn ($pid)" >&2
            kill -TERM "$pid" 2>/dev/null || true
            for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    fi
    # The empty cgroup directories nspawn and dockerd left, deepest first.
    for d in /sys/fs/cgroup/*/"$name" /sys/fs/cgroup/*/"$name-docker"; do
        [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    rmdir "/run/systemd/nspawn/propagate/$name" 2>/dev/null || true
    rm -rf --one-file-system "$scratch"
    local left=""
    for d in /sys/fs/cgroup/*/"$name" /sys/fs/cgroup/*/"$name-docker"; do [[ -d "$d" ]] && left+=" $d"; done
    [[ -z "$left" ]] || { echo "machine: cgroups left:$left" >&2; exit 1; }
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    *) echo "usage: machine.sh start SCRATCH ROOT NAME | stop SCRATCH NAME" >&2; exit 2 ;;
esac
