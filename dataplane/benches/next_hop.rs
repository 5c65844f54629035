//! What a forwarded frame's next hop costs the worker: the view's route scan
//! and neighbour lookup ([`NextHops::resolve`]) against the worker's cache
//! ([`HopCache::resolve`]), as ratios from one run.
//!
//! Run with `cargo bench -p clustergate-dataplane --bench next_hop`.
//!
//! The view: `ROUTES` IPv4 routes (a node's pod and service routes, longest
//! first; the destinations match the last one scanned, the /16 of the pod
//! network) and one reachable neighbour per destination. Each iteration
//! resolves one destination, visited in a pseudo-random order:
//! - `view/<N>` and `cache/<N>`: N backends (forwards), which all fit the
//!   cache;
//! - `cache_thrash/<N>`: N = 50 000 clients (replies), far more than the
//!   cache's slots: nearly every lookup misses, the worst case.
//!
//! Summary lines give ns/lookup and the ratio to the view's.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clustergate_dataplane::flow::{addr16, Addr16};
use clustergate_dataplane::io::nexthop::{
    Gateway, HopCache, NeighbourEntry, NextHops, RouteEntry, RouteTarget,
};
use criterion::Criterion;
use netlink_packet_route::neighbour::NeighbourState;

/// Routes in the view.
const ROUTES: u32 = 32;

fn v4(a: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

/// Destinations in 198.18.0.0/16, spread over it.
fn destinations(n: u32) -> Vec<Addr16> {
    (0..n)
        .map(|i| addr16(v4(0xc612_0000 | ((i.wrapping_mul(40_503)) & 0xffff))))
        .collect()
}

fn view(dsts: &[Addr16]) -> NextHops {
    // /24s elsewhere (scanned first: longer), then the /16 that matches.
    let mut routes: Vec<RouteEntry> = (0..ROUTES - 1)
        .map(|i| RouteEntry {
            dst: v4(0x0a00_0000 | (i << 8)),
            prefix_len: 24,
            metric: 0,
            target: RouteTarget::Via(vec![Gateway {
                ifindex: 2,
                via: None,
            }]),
            prefsrc: None,
        })
        .collect();
    routes.push(RouteEntry {
        dst: v4(0xc612_0000),
        prefix_len: 16,
        metric: 0,
        target: RouteTarget::Via(vec![Gateway {
            ifindex: 3,
            via: None,
        }]),
        prefsrc: None,
    });
    let neighbours: Vec<NeighbourEntry> = dsts
        .iter()
        .enumerate()
        .map(|(i, a)| NeighbourEntry {
            ifindex: 3,
            addr: clustergate_dataplane::flow::ip_from16(*a),
            state: NeighbourState::Reachable,
            mac: Some([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        })
        .collect();
    NextHops::from_parts(
        &[(2, [2, 0, 0, 0, 0, 2]), (3, [2, 0, 0, 0, 0, 3])],
        &routes,
        &neighbours,
        &[],
    )
}

/// A pseudo-random visiting order of `n` items.
fn order(n: usize) -> Vec<usize> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n.max(1) * 8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        })
        .collect()
}

fn median_ns(mut f: impl FnMut(usize)) -> f64 {
    let mut runs = Vec::new();
    for _ in 0..7 {
        let iters = 2_000_000;
        let start = Instant::now();
        for i in 0..iters {
            f(i);
        }
        runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut summary = Vec::new();
    for n in [64u32, 1024, 50_000] {
        let dsts = destinations(n);
        let hops = view(&dsts);
        let ord = order(dsts.len());
        // Every destination resolves, through the /16.
        let mut cache = HopCache::new();
        for d in &dsts {
            let want = hops.resolve(d).expect("resolves");
            assert_eq!(cache.resolve(&hops, d), Ok(want));
            assert_eq!(cache.resolve(&hops, d), Ok(want));
        }
        let name = if n > 1024 { "cache_thrash" } else { "cache" };
        let mut g = c.benchmark_group("next_hop");
        g.bench_function(format!("view/{n}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ord.len();
                black_box(hops.resolve(&dsts[ord[i]]))
            });
        });
        g.bench_function(format!("{name}/{n}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ord.len();
                black_box(cache.resolve(&hops, &dsts[ord[i]]))
            });
        });
        g.finish();
        let view_ns = median_ns(|i| {
            black_box(hops.resolve(&dsts[ord[i % ord.len()]]).ok());
        });
        let cache_ns = median_ns(|i| {
            black_box(cache.resolve(&hops, &dsts[ord[i % ord.len()]]).ok());
        });
        summary.push((n, name, view_ns, cache_ns));
    }
    for (n, name, view_ns, cache_ns) in summary {
        println!(
            "next_hop {n:>6} destinations: view {view_ns:.1} ns, {name} {cache_ns:.1} ns, ratio {:.2}",
            cache_ns / view_ns
        );
    }
}
