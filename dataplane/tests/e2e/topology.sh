#!/usr/bin/env bash
# The end-to-end tests' network: namespaces PREFIX-{cli,gw,lan,b1..b4}, veth,
# a bridge for the backends' LAN, addresses in 198.18.0.0/15 only.
#
#   topology.sh up PREFIX two-armed|one-armed
#   topology.sh down PREFIX
#
# two-armed: cli c0 198.18.1.2 ── g0 198.18.1.1 [gw] g1 198.18.2.1 ── l0 [lan br0] lN ── bN e0 198.18.2.1N
# one-armed: cli c0 198.18.3.2 ── lc [lan br0]; gw g1 198.18.2.1 + 198.18.3.1 on the same LAN
# VIPs (198.18.100.0/24) are routed by the client to the gateway; backends
# route everything else through the gateway, so replies come back through it.
#
# Checksum and segmentation offloads are turned off on every veth: a frame
# that reaches an AF_XDP socket carries the checksum its sender wrote, and
# veth would otherwise hand over partial checksums and 64 KB segments.
set -euo pipefail

cmd=${1:?usage: topology.sh up|down PREFIX [two-armed|one-armed]}
P=${2:?prefix}
mode=${3:-two-armed}
BACKENDS=4
# Queues of the gateway's veth (QUEUES=2 for two workers).
Q=${QUEUES:-1}
qs="numtxqueues $Q numrxqueues $Q"

ns() { ip netns exec "$P-$1" "${@:2}"; }
offload_off() { ns "$1" ethtool -K "$2" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true; }

down() {
    for n in cli gw lan $(seq -f 'b%g' 1 $BACKENDS); do
        ip netns del "$P-$n" 2>/dev/null || true
    done
}

if [ "$cmd" = down ]; then
    down
    exit 0
fi
[ "$cmd" = up ] || { echo "unknown command $cmd" >&2; exit 2; }
down

for n in cli gw lan $(seq -f 'b%g' 1 $BACKENDS); do
    ip netns add "$P-$n"
    ns "$n" ip link set lo up
done
ns lan ip link add br0 type bridge
ns lan ip link set br0 up

# Gateway ↔ LAN.
ip link add g1 netns "$P-gw" $qs type veth peer l0 netns "$P-lan" $qs
ns lan ip link set l0 master br0 up
ns gw ip addr add 198.18.2.1/24 dev g1
ns gw ip link set g1 up
offload_off gw g1
offload_off lan l0

# Backends on the LAN.
for i in $(seq 1 $BACKENDS); do
    ip link add e0 netns "$P-b$i" type veth peer "l$i" netns "$P-lan"
    ns lan ip link set "l$i" master br0 up
    ns "b$i" ip addr add "198.18.2.1$i/24" dev e0
    ns "b$i" ip link set e0 up
    ns "b$i" ip route add default via 198.18.2.1
    offload_off "b$i" e0
    offload_off lan "l$i"
done

if [ "$mode" = two-armed ]; then
    ip link add c0 netns "$P-cli" $qs type veth peer g0 netns "$P-gw" $qs
    ns cli ip addr add 198.18.1.2/24 dev c0
    ns gw ip addr add 198.18.1.1/24 dev g0
    ns cli ip link set c0 up
    ns gw ip link set g0 up
    ns cli ip route add 198.18.100.0/24 via 198.18.1.1
    offload_off cli c0
    offload_off gw g0
else
    ip link add c0 netns "$P-cli" type veth peer lc netns "$P-lan"
    ns lan ip link set lc master br0 up
    ns cli ip addr add 198.18.3.2/24 dev c0
    ns cli ip link set c0 up
    ns gw ip addr add 198.18.3.1/24 dev g1
    ns cli ip route add 198.18.100.0/24 via 198.18.3.1
    offload_off cli c0
    offload_off lan lc
fi
# The gateway does not route in the kernel: only clustergate forwards.
ns gw sysctl -qw net.ipv4.ip_forward=0
