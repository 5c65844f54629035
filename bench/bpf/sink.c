// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
//
// clustergate-bench's sink program: the XDP program on a backend's e0 that
// hands the checking sink every frame it must judge, whatever the dataplane
// under test did to it.
//
// Redirects to the AF_XDP socket of the frame's rx queue (`xsks[rx_queue]`)
// every unicast IPv4 frame, whatever its protocol (UDP, TCP, IP-in-IP from a
// DSR gateway, anything), and every unicast IPv6 frame except ICMPv6. Passes
// to the kernel, so that the backend stays a working host:
//   - frames to a broadcast or multicast MAC (ARP requests, IPv6 neighbour
//     and router solicitations, MLD, IGMP);
//   - anything that is neither IPv4 nor IPv6 (ARP replies);
//   - ICMPv6 straight after the IPv6 header (neighbour discovery);
//   - frames on a queue with no socket (counted as such).
// It looks at nothing else: what a frame carries is the sink's to check, so
// a dataplane that sends the backend a wrong address, port or protocol is
// caught there rather than silently handed to the kernel.
//
// Only kernel UAPI headers (as dataplane/bpf/steer.c).

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ipv6.h>
#include <linux/in.h>

#include "../../dataplane/bpf/xdp.h"


// Counter indexes in `stats` (bench/src/xdp_sink.rs reads the same ones).
#define STAT_REDIRECTED 0
#define STAT_PASSED 1
#define STAT_NO_SOCKET 2
#define STAT_COUNT 3

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

INLINE void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &idx);
	if (c)
		*c += 1;
}

INLINE int pass(void)
{
	count(STAT_PASSED);
	return XDP_PASS;
}

SEC("xdp")
int sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return pass();
	// The I/G bit: broadcast and multicast.
	if (eth->h_dest[0] & 1)
		return pass();
	if (eth->h_proto == HTONS(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->nexthdr == IPPROTO_ICMPV6)
			return pass();
	} else if (eth->h_proto != HTONS(ETH_P_IP)) {
		return pass();
	}
	if (ctx->rx_queue_index >= MAX_QUEUES) {
		count(STAT_NO_SOCKET);
		return XDP_PASS;
	}
	long act = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	if (act == XDP_REDIRECT) {
		count(STAT_REDIRECTED);
		return XDP_REDIRECT;
	}
	count(STAT_NO_SOCKET);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
