// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
//
// clustergate's XDP steering program.
//
// Redirects to the gateway's AF_XDP sockets only the frames the gateway owns:
//   - packets to a frontend: (dst addr, dst port, proto) in `frontends`; a
//     node port is there once per node address it is served on (user space
//     expands it; never the unspecified address, and node addresses are not
//     in `vip_addrs`, so non-first fragments to the node reach the kernel);
//   - replies from a backend: (src addr, src port, proto) in `backends`; when
//     the destination address is one of the gateway's own source-NAT
//     addresses (`snat_addrs`), only if the destination port is in the SNAT
//     range (`snat_ports`), so a backend pod's own connection to the node
//     (sshd, a metrics port) from a port that happens to be a backend port
//     reaches the kernel;
//   - ICMP/ICMPv6 errors (unreachable, time exceeded, packet too big, parameter
//     problem) whose quoted packet names a frontend or a backend, as source
//     or destination, in either map;
//   - non-first IP fragments (no ports): dst addr in `vip_addrs` or src addr
//     in `backend_addrs`.
// Everything else (ARP, the node's own traffic, other protocols, malformed or
// truncated frames) goes to the kernel with XDP_PASS: the node stays reachable.
//
// The socket is `xsks[slot * 64 + rx_queue_index]`, `slot` being the
// interface's position in user space's list (`if_slots`, keyed by ifindex).
// Maps and key layout are an ABI with dataplane/src/io/steer.rs.
//
// Only kernel UAPI headers: libbpf's helper headers are not needed.

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/icmpv6.h>
#include <linux/udp.h>
#include <linux/tcp.h>

#include "xdp.h"

// <linux/icmp.h> pulls in libc's <sys/socket.h> (through <linux/if.h>), which
// does not build for the bpf target; the ICMPv4 header is 8 bytes with the
// type first, and these are its error types (RFC 792).
#define ICMP4_DEST_UNREACH 3
#define ICMP4_TIME_EXCEEDED 11
#define ICMP4_PARAMETERPROB 12
#define ICMP4_HDR_LEN 8

#define MAX_EXT_HEADERS 4
#define PROTO_SCTP 132
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

// Counter indexes in `stats` (user space reads the same indexes).
#define STAT_REDIRECTED 0
#define STAT_PASSED 1
#define STAT_MALFORMED 2
#define STAT_NO_SOCKET 3
#define STAT_COUNT 4

struct key {
	__u8 addr[16];
	__u16 port; // network order
	__u8 proto;
	__u8 pad;
};

_Static_assert(sizeof(struct key) == 20, "struct key is 20 bytes");

// Default sizes; user space sets the real ones before loading.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct key);
	__type(value, __u8);
} frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct key);
	__type(value, __u8);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u8[16]);
	__type(value, __u8);
} vip_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u8[16]);
	__type(value, __u8);
} backend_addrs SEC(".maps");

// The gateway's source-NAT addresses (IPv4 as ::ffff:a.b.c.d).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u8[16]);
	__type(value, __u8);
} snat_addrs SEC(".maps");

// The SNAT port range, inclusive, in host byte order; lo == 0: none set.
struct port_range {
	__u16 lo;
	__u16 hi;
};

_Static_assert(sizeof(struct port_range) == 4, "struct port_range is 4 bytes");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_range);
} snat_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);   // ifindex
	__type(value, __u32); // slot
} if_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

// What the parser found in one IP header (outer, or quoted in an ICMP error).
struct tuple {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport; // network order
	__u16 dport; // network order
	__u8 proto;
	__u8 has_ports;    // L4 ports were read
	__u8 nonfirst_frag; // a fragment with offset > 0: no L4 header
};

enum parse {
	P_OK = 0,      // parsed; `*l4` points at the L4 header
	P_MALFORMED,   // truncated or invalid
	P_OTHER,       // valid but nothing to look at (e.g. too many ext headers)
};

INLINE void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &idx);
	if (c)
		*c += 1;
}

INLINE void v4_mapped(__u8 *dst, const __u8 *src)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, src, 4);
}

// Parses an IPv4 header at `p` (honouring IHL). `inner`: the header quoted in
// an ICMP error (no total-length consistency required, it is truncated).
INLINE enum parse parse_v4(void *p, void *end, struct tuple *t, void **l4)
{
	struct iphdr *ip = p;
	if ((void *)(ip + 1) > end)
		return P_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return P_MALFORMED;
	__u32 hlen = ip->ihl * 4;
	if (p + hlen > end)
		return P_MALFORMED;
	v4_mapped(t->src, (const __u8 *)&ip->saddr);
	v4_mapped(t->dst, (const __u8 *)&ip->daddr);
	t->proto = ip->protocol;
	t->nonfirst_frag = (ip->frag_off & HTONS(0x1fff)) != 0;
	*l4 = p + hlen;
	return P_OK;
}

// Parses an IPv6 header at `p` and walks at most MAX_EXT_HEADERS extension
// headers (hop-by-hop, routing, destination options, fragment).
INLINE enum parse parse_v6(void *p, void *end, struct tuple *t, void **l4)
{
	struct ipv6hdr *ip6 = p;
	if ((void *)(ip6 + 1) > end)
		return P_MALFORMED;
	if (ip6->version != 6)
		return P_MALFORMED;
	__builtin_memcpy(t->src, &ip6->saddr, 16);
	__builtin_memcpy(t->dst, &ip6->daddr, 16);
	t->nonfirst_frag = 0;
	__u8 nh = ip6->nexthdr;
	void *cur = (void *)(ip6 + 1);

#pragma clang loop unroll(full)
	for (int i = 0; i < MAX_EXT_HEADERS; i++) {
		if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS) {
			__u8 *h = cur;
			if ((void *)(h + 2) > end)
				return P_MALFORMED;
			nh = h[0];
			__u32 len = ((__u32)h[1] + 1) * 8;
			if (cur + len > end)
				return P_MALFORMED;
			cur += len;
		} else if (nh == IPPROTO_FRAGMENT) {
			__u8 *h = cur;
			if ((void *)(h + 8) > end)
				return P_MALFORMED;
			nh = h[0];
			__u16 off = *(__u16 *)(h + 2);
			if (off & HTONS(0xfff8))
				t->nonfirst_frag = 1;
			cur += 8;
		} else {
			break;
		}
	}
	if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	    nh == IPPROTO_FRAGMENT)
		return P_OTHER; // more extension headers than we walk
	t->proto = nh;
	*l4 = cur;
	return P_OK;
}

INLINE int is_port_proto(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == PROTO_SCTP;
}

// Reads the ports (the first 4 bytes of TCP, UDP and SCTP). `need`: bytes
// that must be present (the full header for outer packets, 4 for quoted ones).
INLINE int read_ports(void *l4, void *end, struct tuple *t, __u32 need)
{
	if (l4 + need > end)
		return 0;
	if (l4 + 4 > end)
		return 0;
	__u16 *ports = l4;
	t->sport = ports[0];
	t->dport = ports[1];
	t->has_ports = 1;
	return 1;
}

INLINE int in_map(void *map, const __u8 *addr, __u16 port, __u8 proto)
{
	struct key k;
	__builtin_memcpy(k.addr, addr, 16);
	k.port = port;
	k.proto = proto;
	k.pad = 0;
	return bpf_map_lookup_elem(map, &k) != 0;
}

INLINE int addr_in_map(void *map, const __u8 *addr)
{
	__u8 k[16];
	__builtin_memcpy(k, addr, 16);
	return bpf_map_lookup_elem(map, k) != 0;
}

// Is `port` (network order) in the SNAT range?
INLINE int in_snat_ports(__u16 port)
{
	__u32 zero = 0;
	struct port_range *r = bpf_map_lookup_elem(&snat_ports, &zero);
	if (!r || r->lo == 0)
		return 0;
	__u16 p = HTONS(port); // the same swap converts back
	return r->lo <= p && p <= r->hi;
}

// Is this ICMP(v6) type an error that quotes a packet?
INLINE int icmp4_is_error(__u8 type)
{
	return type == ICMP4_DEST_UNREACH || type == ICMP4_TIME_EXCEEDED || type == ICMP4_PARAMETERPROB;
}

INLINE int icmp6_is_error(__u8 type)
{
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

// The verdict on an ICMP error whose quoted IP header starts at `p`:
// 1 (ours), 0 (not ours), -1 (malformed).
INLINE int quoted_is_ours(void *p, void *end, int v6)
{
	struct tuple in = {};
	void *l4 = 0;
	enum parse r = v6 ? parse_v6(p, end, &in, &l4) : parse_v4(p, end, &in, &l4);
	if (r == P_MALFORMED)
		return -1;
	if (r != P_OK || in.nonfirst_frag || !is_port_proto(in.proto))
		return 0;
	if (!read_ports(l4, end, &in, 4))
		return -1;
	// Generous: the quoted source or destination in either map.
	if (in_map(&backends, in.dst, in.dport, in.proto) ||
	    in_map(&frontends, in.src, in.sport, in.proto) ||
	    in_map(&frontends, in.dst, in.dport, in.proto) ||
	    in_map(&backends, in.src, in.sport, in.proto))
		return 1;
	return 0;
}

// 1 (ours), 0 (pass), -1 (malformed).
INLINE int classify(void *data, void *end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	__u16 proto = eth->h_proto;
	void *p = (void *)(eth + 1);
	if (proto == HTONS(ETH_P_8021Q_) || proto == HTONS(ETH_P_8021AD_)) {
		// One tag: TCI (2 bytes), then the encapsulated EtherType.
		if (p + 4 > end)
			return -1;
		proto = *(__u16 *)(p + 2);
		p += 4;
	}

	int v6;
	if (proto == HTONS(ETH_P_IP))
		v6 = 0;
	else if (proto == HTONS(ETH_P_IPV6))
		v6 = 1;
	else
		return 0; // ARP, LLDP, a second VLAN tag, ...

	struct tuple t = {};
	void *l4 = 0;
	enum parse r = v6 ? parse_v6(p, end, &t, &l4) : parse_v4(p, end, &t, &l4);
	if (r == P_MALFORMED)
		return -1;
	if (r != P_OK)
		return 0;

	if (t.nonfirst_frag)
		return addr_in_map(&vip_addrs, t.dst) || addr_in_map(&backend_addrs, t.src);

	switch (t.proto) {
	case IPPROTO_TCP:
		if (!read_ports(l4, end, &t, sizeof(struct tcphdr)))
			return -1;
		break;
	case IPPROTO_UDP:
		if (!read_ports(l4, end, &t, sizeof(struct udphdr)))
			return -1;
		break;
	case PROTO_SCTP:
		if (!read_ports(l4, end, &t, 12)) // SCTP common header
			return -1;
		break;
	case IPPROTO_ICMP: {
		if (v6)
			return 0;
		__u8 *ic = l4;
		if ((void *)(ic + ICMP4_HDR_LEN) > end)
			return -1;
		if (!icmp4_is_error(ic[0])) // also covers packet too big (3/4)
			return 0;
		return quoted_is_ours((void *)(ic + ICMP4_HDR_LEN), end, 0);
	}
	case IPPROTO_ICMPV6: {
		if (!v6)
			return 0;
		struct icmp6hdr *ic = l4;
		if ((void *)(ic + 1) > end)
			return -1;
		if (!icmp6_is_error(ic->icmp6_type))
			return 0;
		return quoted_is_ours((void *)(ic + 1), end, 1);
	}
	default:
		return 0;
	}

	if (in_map(&frontends, t.dst, t.dport, t.proto))
		return 1;
	if (!in_map(&backends, t.src, t.sport, t.proto))
		return 0;
	// From a backend. To one of the gateway's SNAT addresses it is a reply
	// only on a SNAT port; to anything else (a client), a reply as before.
	if (addr_in_map(&snat_addrs, t.dst))
		return in_snat_ports(t.dport);
	return 1;
}

SEC("xdp")
int steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	int r = classify(data, end);
	if (r < 0) {
		count(STAT_MALFORMED);
		return XDP_PASS;
	}
	if (r == 0) {
		count(STAT_PASSED);
		return XDP_PASS;
	}

	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *slot = bpf_map_lookup_elem(&if_slots, &ifindex);
	if (!slot || ctx->rx_queue_index >= MAX_QUEUES) {
		count(STAT_NO_SOCKET);
		return XDP_PASS;
	}
	long act = bpf_redirect_map(&xsks, (__u64)(*slot) * MAX_QUEUES + ctx->rx_queue_index,
				    XDP_PASS);
	if (act == XDP_REDIRECT) {
		count(STAT_REDIRECTED);
		return XDP_REDIRECT;
	}
	count(STAT_NO_SOCKET);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
