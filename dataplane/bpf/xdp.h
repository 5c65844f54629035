// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
//
// What clustergate's XDP programs need without libbpf's headers: the map
// definition macros, byte order, and the two helpers they call. Included by
// dataplane/bpf/steer.c (the gateway's steering program) and
// bench/bpf/sink.c (the benchmark sinks').

#ifndef CLUSTERGATE_XDP_H
#define CLUSTERGATE_XDP_H

#include <linux/types.h>
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static inline __attribute__((always_inline))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HTONS(x) ((__u16)__builtin_bswap16((__u16)(x)))
#else
#define HTONS(x) ((__u16)(x))
#endif

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;

// Rx queues per interface an XSKMAP indexes.
#define MAX_QUEUES 64

#endif
