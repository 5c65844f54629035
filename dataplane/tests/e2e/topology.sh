#!/usr/bin/env bash
# The end-to-end tests' network: namespaces PREFIX-{cli,gw,lan,b1..b4} (and
# PREFIX-rt for a pod network, PREFIX-mr and PREFIX-b5 for mtu-router), veth,
# a bridge for the backends' LAN, addresses in 198.18.0.0/15 and, on every
# link beside them, 2001:2::/48 (RFC 5180) only.
#
#   topology.sh up PREFIX two-armed|one-armed [pod-network] [dsr] [mtu-router] [two-clients]
#   topology.sh down PREFIX
#
# two-armed: cli c0 198.18.1.2 ── g0 198.18.1.1 [gw] g1 198.18.2.1 ── l0 [lan br0] lN ── bN e0 198.18.2.1N
#            (IPv6: cli 2001:2:1::2, g0 2001:2:1::1, g1 2001:2:2::1, bN 2001:2:2::1N)
# one-armed: cli c0 198.18.3.2 ── lc [lan br0]; gw g1 198.18.2.1 + 198.18.3.1 on the same LAN
#            (IPv6: cli 2001:2:3::2, g1 also 2001:2:3::1)
# VIPs (198.18.100.0/24, 2001:2:100::/64) are routed by the client to the
# gateway. Without pod-network, backends route everything else through the
# gateway, so replies come back through it (the `routed` return path).
# IPv6 addresses are added `nodad` (usable at once, never tentative); the
# bridge does no multicast snooping, so neighbour discovery is flooded.
#
# pod-network: a router PREFIX-rt (r0 198.18.2.254 on the LAN, forwarding on)
# is the backends' default route, and it has no route to the clients' network:
# a reply a backend sends to a client's address dies there, as in a pod
# network that routes pod to pod only. Replies reach the client only when
# they go to the gateway's own address (source NAT) or straight to the
# client (DSR).
#
# mtu-router: a fifth backend b5 (e0 198.18.5.15, 2001:2:5::15) behind a
# router PREFIX-mr (m0 198.18.2.253 / 2001:2:2::253 on the LAN, m1
# 198.18.5.1 / 2001:2:5::1 towards b5), whose link to b5 has MTU $MR_MTU
# (default 1400): a full-sized packet the gateway sends to b5 is answered by
# the router with ICMP fragmentation needed / ICMPv6 packet too big. The
# gateway routes 198.18.5.0/24 and 2001:2:5::/64 via the router; the
# router's default route is the gateway (so in `routed` its errors about a
# client's packet go back through the gateway), b5's is the router.
#
# two-clients (one-armed only): a second client namespace PREFIX-cli2 on the
# LAN, c0 198.18.3.3 / 2001:2:3::3, routing the VIPs to the gateway like cli
# (NetworkPolicy: one client allowed, the other denied).
#
# dsr (one-armed only): what a backend needs for direct server return. The
# gateway sends it the client's packet inside IPv4-in-IPv4 (protocol 4);
# the backend decapsulates it, holds the VIPs ($DSR_VIPS, default
# 198.18.100.1) on lo and answers the client straight from the VIP, through
# an on-link route to the clients' subnet 198.18.3.0/24 (not through the
# gateway). IPv6 the same way: IPv6-in-IPv6 (next header 41), the VIPs
# $DSR_VIPS6 (default 2001:2:100::1) on lo, an on-link route to
# 2001:2:3::/64. Decapsulation: by default a tun device tun0 that `peer.py
# decap` feeds from a raw protocol-4 socket and a raw IPv6 socket for next
# header 41 (the test starts it when tun0 exists), the same on every machine
# (the kernels these tests run on here have neither CONFIG_NET_IPIP nor
# CONFIG_IPV6_TUNNEL); DECAP=kernel uses an `ipip external` device ipip0 and
# an `ip6tnl external` device ip6tnl6 instead, and DECAP=auto the kernel's
# where it has them (each family on its own: the test decapsulates in
# userspace only the families without a kernel device).
# rp_filter is off (the inner source arrives on the tunnel device, its route
# is e0), arp_ignore=1 / arp_announce=2 keep the backends from answering
# ARP for the VIP.
#
# Checksum and segmentation offloads are turned off on every veth: a frame
# that reaches an AF_XDP socket carries the checksum its sender wrote, and
# veth would otherwise hand over partial checksums and 64 KB segments.
set -euo pipefail

cmd=${1:?usage: topology.sh up|down PREFIX [two-armed|one-armed] [pod-network] [dsr]}
P=${2:?prefix}
mode=${3:-two-armed}
pod=0
dsr=0
mr=0
two=0
for opt in "${@:4}"; do
    case "$opt" in
    pod-network) pod=1 ;;
    dsr) dsr=1 ;;
    mtu-router) mr=1 ;;
    two-clients) two=1 ;;
    *) echo "unknown option $opt" >&2; exit 2 ;;
    esac
done
BACKENDS=4
# Queues of the gateway's veth (QUEUES=2 for two workers).
Q=${QUEUES:-1}
qs="numtxqueues $Q numrxqueues $Q"
DSR_VIPS=${DSR_VIPS:-198.18.100.1}
DSR_VIPS6=${DSR_VIPS6:-2001:2:100::1}
MR_MTU=${MR_MTU:-1400}
# DSR decapsulation: auto (the kernel's ipip if it has one, else userspace),
# kernel or user.
DECAP=${DECAP:-user}

ns() { ip netns exec "$P-$1" "${@:2}"; }
offload_off() { ns "$1" ethtool -K "$2" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true; }
addr6() { ns "$1" ip -6 addr add "$2" dev "$3" nodad; }
# A client namespace $1 on the LAN bridge (its port there: $2), c0
# 198.18.3.$3 / 2001:2:3::$3, routing the VIPs to the gateway's 198.18.3.1.
lan_client() {
    ip link add c0 netns "$P-$1" type veth peer "$2" netns "$P-lan"
    ns lan ip link set "$2" master br0 up
    ns "$1" ip addr add "198.18.3.$3/24" dev c0
    addr6 "$1" "2001:2:3::$3/64" c0
    ns "$1" ip link set c0 up
    ns "$1" ip route add 198.18.100.0/24 via 198.18.3.1
    ns "$1" ip -6 route add 2001:2:100::/64 via 2001:2:3::1
    offload_off "$1" c0
    offload_off lan "$2"
}

down() {
    for n in cli cli2 gw lan rt mr $(seq -f 'b%g' 1 $((BACKENDS + 1))); do
        ip netns del "$P-$n" 2>/dev/null || true
    done
}

if [ "$cmd" = down ]; then
    down
    exit 0
fi
[ "$cmd" = up ] || { echo "unknown command $cmd" >&2; exit 2; }
case "$mode" in two-armed | one-armed) ;; *) echo "unknown mode $mode" >&2; exit 2 ;; esac
if [ $two = 1 ] && [ "$mode" != one-armed ]; then
    echo "two-clients needs one-armed: the second client joins the LAN" >&2
    exit 2
fi
if [ $dsr = 1 ] && [ "$mode" != one-armed ]; then
    echo "dsr needs one-armed: the backends answer the client on their LAN" >&2
    exit 2
fi
down

names="cli gw lan $(seq -f 'b%g' 1 $BACKENDS)"
if [ $pod = 1 ]; then names="$names rt"; fi
if [ $mr = 1 ]; then names="$names mr b5"; fi
if [ $two = 1 ]; then names="$names cli2"; fi
for n in $names; do
    ip netns add "$P-$n"
    ns "$n" ip link set lo up
    # No duplicate address detection: addresses (link-local ones too) are
    # usable at once, and neighbour discovery never waits on a tentative one.
    ns "$n" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ns lan ip link add br0 type bridge mcast_snooping 0
ns lan ip link set br0 up

# Gateway ↔ LAN.
ip link add g1 netns "$P-gw" $qs type veth peer l0 netns "$P-lan" $qs
ns lan ip link set l0 master br0 up
ns gw ip addr add 198.18.2.1/24 dev g1
addr6 gw 2001:2:2::1/64 g1
ns gw ip link set g1 up
offload_off gw g1
offload_off lan l0

# The pod network's router: forwards, but knows no clients.
if [ $pod = 1 ]; then
    ip link add r0 netns "$P-rt" type veth peer lr netns "$P-lan"
    ns lan ip link set lr master br0 up
    ns rt ip addr add 198.18.2.254/24 dev r0
    addr6 rt 2001:2:2::254/64 r0
    ns rt ip link set r0 up
    ns rt sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    offload_off rt r0
    offload_off lan lr
    gw_of_backends=198.18.2.254
    gw6_of_backends=2001:2:2::254
else
    gw_of_backends=198.18.2.1
    gw6_of_backends=2001:2:2::1
fi

# Backends on the LAN.
for i in $(seq 1 $BACKENDS); do
    ip link add e0 netns "$P-b$i" type veth peer "l$i" netns "$P-lan"
    ns lan ip link set "l$i" master br0 up
    ns "b$i" ip addr add "198.18.2.1$i/24" dev e0
    addr6 "b$i" "2001:2:2::1$i/64" e0
    ns "b$i" ip link set e0 up
    ns "b$i" ip route add default via $gw_of_backends
    ns "b$i" ip -6 route add default via $gw6_of_backends
    offload_off "b$i" e0
    offload_off lan "l$i"
done

if [ "$mode" = two-armed ]; then
    ip link add c0 netns "$P-cli" $qs type veth peer g0 netns "$P-gw" $qs
    ns cli ip addr add 198.18.1.2/24 dev c0
    ns gw ip addr add 198.18.1.1/24 dev g0
    addr6 cli 2001:2:1::2/64 c0
    addr6 gw 2001:2:1::1/64 g0
    ns cli ip link set c0 up
    ns gw ip link set g0 up
    ns cli ip route add 198.18.100.0/24 via 198.18.1.1
    ns cli ip -6 route add 2001:2:100::/64 via 2001:2:1::1
    offload_off cli c0
    offload_off gw g0
else
    lan_client cli lc 2
    ns gw ip addr add 198.18.3.1/24 dev g1
    addr6 gw 2001:2:3::1/64 g1
    # A second client, 198.18.3.3, on the same LAN.
    if [ $two = 1 ]; then lan_client cli2 lc2 3; fi
fi

# The router with a small-MTU link to backend b5.
if [ $mr = 1 ]; then
    ip link add m0 netns "$P-mr" type veth peer lm netns "$P-lan"
    ns lan ip link set lm master br0 up
    ns mr ip addr add 198.18.2.253/24 dev m0
    addr6 mr 2001:2:2::253/64 m0
    ns mr ip link set m0 up
    ip link add m1 netns "$P-mr" type veth peer e0 netns "$P-b5"
    ns mr ip link set m1 mtu "$MR_MTU"
    ns b5 ip link set e0 mtu "$MR_MTU"
    ns mr ip addr add 198.18.5.1/24 dev m1
    addr6 mr 2001:2:5::1/64 m1
    ns mr ip link set m1 up
    ns b5 ip addr add 198.18.5.15/24 dev e0
    addr6 b5 2001:2:5::15/64 e0
    ns b5 ip link set e0 up
    ns b5 ip route add default via 198.18.5.1
    ns b5 ip -6 route add default via 2001:2:5::1
    ns mr ip route add default via 198.18.2.1
    ns mr ip -6 route add default via 2001:2:2::1
    ns mr sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    ns gw ip route add 198.18.5.0/24 via 198.18.2.253
    ns gw ip -6 route add 2001:2:5::/64 via 2001:2:2::253
    for d in "mr m0" "mr m1" "b5 e0" "lan lm"; do
        # shellcheck disable=SC2086
        offload_off $d
    done
fi

# Direct server return on the backends.
if [ $dsr = 1 ]; then
    for i in $(seq 1 $BACKENDS); do
        b="b$i"
        user=0
        if [ "$DECAP" != user ] && ns $b ip link add name ipip0 type ipip external 2>/dev/null; then
            ns $b ip link set ipip0 up
        elif [ "$DECAP" = kernel ]; then
            echo "DECAP=kernel: cannot create an ipip device (no CONFIG_NET_IPIP?)" >&2
            exit 1
        else
            user=1
        fi
        if [ "$DECAP" != user ] && ns $b ip -6 link add name ip6tnl6 type ip6tnl mode ip6ip6 external 2>/dev/null; then
            ns $b ip link set ip6tnl6 up
        elif [ "$DECAP" = kernel ]; then
            echo "DECAP=kernel: cannot create an ip6tnl device (no CONFIG_IPV6_TUNNEL?)" >&2
            exit 1
        else
            user=1
        fi
        if [ $user = 1 ]; then
            ns $b ip tuntap add dev tun0 mode tun
            ns $b ip link set tun0 up
        fi
        for v in $DSR_VIPS; do
            ns $b ip addr add "$v/32" dev lo
        done
        for v in $DSR_VIPS6; do
            ns $b ip -6 addr add "$v/128" dev lo nodad
        done
        ns $b ip route add 198.18.3.0/24 dev e0
        ns $b ip -6 route add 2001:2:3::/64 dev e0
        for c in all default e0 $(ns $b ls /sys/class/net | grep -E '^(tun0|ipip0)$' || true); do
            ns $b sysctl -qw "net.ipv4.conf.$c.rp_filter=0"
        done
        ns $b sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    done
fi
# The gateway does not route in the kernel: only clustergate forwards.
ns gw sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
