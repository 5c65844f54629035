//! Maglev ring build time (control-side cost of a backend change).
//!
//! `maglev_build/m65537_n1000` is the budget case: 65537 slots and 1000
//! equal-weight backends must build in at most 5 ms. The `fresh_*` cases are
//! the ring sizes control picks today (`maglev::ring_size_for`): 40, 1 000
//! and 5 000 backends (the last at the cap, 524 309 slots).

use std::hint::black_box;
use std::time::Duration;

use clustergate_builder::maglev::{
    build_ring, ring_size_for, MaglevBackend, DEFAULT_MAX_RING_SIZE,
};
use clustergate_dataplane::flow::v4_to_16;
use criterion::{criterion_group, criterion_main, Criterion};

/// `n` distinct backends: IPv4 from 198.18.0.0/15, with every third one IPv6
/// from 2001:db8::/32, all of weight `weight(i)`.
fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| {
            let addr = if i % 3 == 2 {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                a[12..].copy_from_slice(&i.to_be_bytes());
                a
            } else {
                v4_to_16((0xC612_0000u32 | (i & 0x1_FFFF)).to_be_bytes())
            };
            MaglevBackend {
                addr,
                port: 8080,
                weight: weight(i),
            }
        })
        .collect()
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let cases = [
        ("m65537_n1000", 65_537, backends(1000, |_| 1)),
        ("m65537_n100", 65_537, backends(100, |_| 1)),
        ("m1009_n10", 1009, backends(10, |_| 1)),
        // Katran-style weights 1..=10: the heap-scheduled weighted path.
        (
            "m65537_n1000_weighted",
            65_537,
            backends(1000, |i| i % 10 + 1),
        ),
    ];
    for (name, m, b) in &cases {
        group.bench_function(*name, |bench| {
            bench.iter(|| build_ring(black_box(b), black_box(*m)));
        });
    }
    for n in [40, 1000, 5000] {
        let b = backends(n, |_| 1);
        let m = ring_size_for(n as usize, DEFAULT_MAX_RING_SIZE);
        group.bench_function(format!("fresh_m{m}_n{n}"), |bench| {
            bench.iter(|| build_ring(black_box(&b), black_box(m)));
        });
    }
    group.finish();
}

criterion_group!(benches, maglev_build);
criterion_main!(benches);
