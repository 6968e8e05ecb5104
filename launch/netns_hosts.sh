#!/usr/bin/env bash
# Several "hosts" on one Linux machine, for trying the multi-host launchers (mpirun, torchrun, Ray) without
# a second machine. Needs root (CAP_SYS_ADMIN) and iproute2, unshare and nsenter (util-linux).
#
#   launch/netns_hosts.sh up N      start hosts tphost0 .. tphost{N-1}
#   launch/netns_hosts.sh down      stop every process in them and remove them (also after a failed `up`)
#   launch/netns_hosts.sh list      the hosts that are up, with their addresses
#   launch/netns-rsh HOST CMD...    run CMD in HOST (a stand-in for ssh; see that script)
#
# Each host is a network namespace with its own loopback and one interface, eth0 = 10.231.0.(K+1)/24, on a
# bridge that lives in a namespace of its own (tphosts), so the machine's own network is never touched. Every
# process of a host shares one UTS namespace (hostname tphostK) and one mount namespace, held open by a
# sleeping keeper process, in which:
#   /etc/hosts     names every host of the rig (bind-mounted: the machine's /etc/hosts is not edited)
#   /etc/hostname  tphostK
#   /etc/resolv.conf  no name server: the hosts file is the only source of names
#   /dev/shm       a private tmpfs (shared-memory transports cannot reach another host)
#   /tmp/ray       a private tmpfs (Ray's session directory: sockets, logs, the object store's spill files)
# Everything else of the file system (the repository, the Python environment, $HOME, /tmp) is shared, as a
# network file system would be. `down` kills the hosts' processes, and the namespaces, interfaces and mounts
# go with them; nothing is left but the state folder's removal.
#
# Settings (environment): TP_HOSTS_PREFIX (tphost), TP_HOSTS_NET (10.231.0, a /24), TP_HOSTS_STATE
# (/run/tp_netns_hosts: keeper pids and hosts file).
set -euo pipefail

PREFIX=${TP_HOSTS_PREFIX:-tphost}
NET=${TP_HOSTS_NET:-10.231.0}
STATE=${TP_HOSTS_STATE:-/run/tp_netns_hosts}
HUB=${PREFIX}s

die() { echo "netns_hosts: $*" >&2; exit 1; }

hosts_up() {  # the rig's host namespaces that exist now
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+\$" || true
}

# The keeper: runs inside the host's network namespace (ip netns exec) after unshare has given it its own UTS
# and mount namespaces; it sets them up, writes its pid and sleeps. Its namespaces are the host's.
keeper_init='
set -e
name=$1 state=$2
hostname "$name"
mount --bind "$state/hosts" /etc/hosts
mount --bind "$state/resolv.conf" /etc/resolv.conf
if [ -f /etc/hostname ]; then mount --bind "$state/$name.hostname" /etc/hostname; fi
mount -t tmpfs -o mode=1777,size=50% tmpfs /dev/shm
mkdir -p /tmp/ray
mount -t tmpfs -o mode=1777 tmpfs /tmp/ray
echo $$ > "$state/$name.pid"
exec sleep infinity
'

up() {
    local n=$1 k name
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "up wants a host count from 1 to 200, got '$n'"
    [[ $(id -u) == 0 ]] || die "needs root (CAP_SYS_ADMIN) to create namespaces"
    for tool in ip unshare nsenter; do command -v $tool >/dev/null || die "$tool is not installed"; done
    [[ -z $(hosts_up) ]] || die "hosts are already up ($(hosts_up | tr '\n' ' ')); run '$0 down' first"
    mkdir -p "$STATE"
    [[ -d /tmp/ray ]] || touch "$STATE/created_tmp_ray"
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        for ((k = 0; k < n; k++)); do echo "$NET.$((k + 1)) $PREFIX$k"; done
    } > "$STATE/hosts"
    # no name server: a name that is not in the hosts file fails at once (a server the hosts cannot reach
    # would make every reverse lookup, which gloo and c10d do for each connection, wait seconds)
    echo "options attempts:1 timeout:1" > "$STATE/resolv.conf"
    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    ip -n "$HUB" link add br0 type bridge
    ip -n "$HUB" link set br0 up
    for ((k = 0; k < n; k++)); do
        name=$PREFIX$k
        ip netns add "$name"
        ip link add "port$k" netns "$HUB" type veth peer name eth0 netns "$name"
        ip -n "$HUB" link set "port$k" master br0 up
        ip -n "$name" link set lo up
        ip -n "$name" addr add "$NET.$((k + 1))/24" dev eth0
        ip -n "$name" link set eth0 up
        # a default route, so that "which of my addresses reaches the outside" (Ray's node address) has an answer
        ip -n "$name" route add default dev eth0
        echo "$name" > "$STATE/$name.hostname"
        setsid ip netns exec "$name" unshare --uts --mount --propagation private \
            sh -c "$keeper_init" keeper "$name" "$STATE" </dev/null >/dev/null 2>&1 &
    done
    for ((k = 0; k < n; k++)); do
        name=$PREFIX$k
        for _ in $(seq 100); do [[ -s $STATE/$name.pid ]] && break; sleep 0.05; done
        [[ -s $STATE/$name.pid ]] || { down; die "the keeper of $name did not start"; }
    done
    list
}

down() {
    local name pids pid
    for name in $(hosts_up); do
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        [[ -n $pids ]] && kill -TERM $pids 2>/dev/null || true
    done
    for _ in $(seq 50); do  # up to 5 s for a clean exit, then SIGKILL
        pids=$(for name in $(hosts_up); do ip netns pids "$name" 2>/dev/null; done)
        [[ -z $pids ]] && break
        sleep 0.1
    done
    [[ -n ${pids:-} ]] && kill -KILL $pids 2>/dev/null || true
    for name in $(hosts_up); do
        for _ in $(seq 50); do [[ -z $(ip netns pids "$name" 2>/dev/null) ]] && break; sleep 0.1; done
        ip netns del "$name" || echo "netns_hosts: could not remove $name" >&2
    done
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$HUB"; then ip netns del "$HUB"; fi
    if [[ -e $STATE/created_tmp_ray ]]; then rmdir /tmp/ray 2>/dev/null || true; fi
    rm -rf "$STATE"
}

list() {
    local name
    for name in $(hosts_up); do
        printf '%s %s keeper=%s\n' "$name" \
            "$(ip -n "$name" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')" \
            "$(cat "$STATE/$name.pid" 2>/dev/null || echo none)"
    done
}

case ${1:-} in
    up) [[ $# == 2 ]] || die "usage: $0 up N"; trap 'down' ERR; up "$2" ;;
    down) down ;;
    list) list ;;
    *) die "usage: $0 up N | down | list" ;;
esac
