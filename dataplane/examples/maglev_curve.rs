//! Prints Maglev's disruption curve: moved/ideal when one of N backends is
//! removed, for textbook Maglev (M = the smallest prime ≥ 100·N) and for
//! clustergate's ring sizes (the smallest M the hysteresis keeps for N, and
//! the fresh M), with the balance, the memory per ring and the build time.
//!
//! `cargo run --release -p clustergate-dataplane --example maglev_curve`
//! (`docs/benchmarks.md`, "Maglev: ring size and disruption").

use std::time::Instant;

use clustergate_builder::maglev::{
    build_ring, is_prime, min_ring_size, ring_size_for, MaglevBackend, DEFAULT_MAX_RING_SIZE,
};
use clustergate_dataplane::flow::v4_to_16;

/// `n` distinct backends from 198.18.0.0/15; `seed` picks another set.
fn backends(n: usize, seed: u32) -> Vec<MaglevBackend> {
    (0..n as u32)
        .map(|i| {
            let host =
                (i.wrapping_add(seed.wrapping_mul(7919))).wrapping_mul(0x9E37_79B1) & 0x1_FFFF;
            MaglevBackend {
                addr: v4_to_16((0xC612_0000u32 | host).to_be_bytes()),
                port: 8080,
                weight: 1,
            }
        })
        .collect()
}

fn prime_at_least(x: u64) -> u32 {
    let start = u32::try_from(x).unwrap_or(u32::MAX);
    (start..).find(|&p| is_prime(p)).unwrap_or(u32::MAX)
}

/// Mean moved/ideal over `seeds` sets and up to `removals` removed backends.
fn moved_over_ideal(n: usize, m: u32, seeds: u32, removals: usize) -> Result<f64, String> {
    let (mut sum, mut count) = (0.0, 0u32);
    for seed in 0..seeds {
        let b = backends(n, seed);
        let before = build_ring(&b, m).map_err(|e| e.to_string())?;
        let k = removals.min(n);
        for j in 0..k {
            let gone = j * n / k;
            let mut rest = b.clone();
            rest.remove(gone);
            let after = build_ring(&rest, m).map_err(|e| e.to_string())?;
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(&x, &y)| x != if y as usize >= gone { y + 1 } else { y })
                .count();
            sum += moved as f64 / f64::from(m) * n as f64;
            count += 1;
        }
    }
    Ok(sum / f64::from(count))
}

/// (max − min) / mean slot count, in %, and the median build time in ms.
fn balance_and_time(n: usize, m: u32) -> Result<(f64, f64), String> {
    let b = backends(n, 0);
    let mut times = Vec::new();
    let mut ring = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        ring = build_ring(&b, m).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let mut counts = vec![0u32; n];
    for &s in &ring {
        counts[s as usize] += 1;
    }
    let (lo, hi) = (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    );
    let mean = f64::from(m) / n as f64;
    Ok((f64::from(hi - lo) / mean * 100.0, times[2]))
}

fn main() -> Result<(), String> {
    let cap = DEFAULT_MAX_RING_SIZE;
    println!(
        "| N | textbook M | moved/ideal | least kept M | moved/ideal | fresh M | moved/ideal | imbalance at fresh M | ring memory (fresh) | build (fresh) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in [2usize, 3, 5, 10, 20, 40, 100, 200, 500, 1000, 5000] {
        let (seeds, removals) = if n <= 40 { (8, n.min(10)) } else { (3, 6) };
        let textbook = prime_at_least(100 * n as u64);
        let least = prime_at_least(min_ring_size(n)).min(cap);
        let fresh = ring_size_for(n, cap);
        let tb = moved_over_ideal(n, textbook, seeds, removals)?;
        let at_least = if least == textbook {
            tb
        } else {
            moved_over_ideal(n, least, seeds, removals)?
        };
        let at_fresh = if fresh == least {
            at_least
        } else {
            moved_over_ideal(n, fresh, seeds, removals)?
        };
        let (imbalance, ms) = balance_and_time(n, fresh)?;
        println!(
            "| {n} | {textbook} | {tb:.2} | {least} | {at_least:.2} | {fresh} | {at_fresh:.2} | {imbalance:.2} % | {} KiB | {ms:.2} ms |",
            // Two bytes per slot in the table and the snapshot.
            (u64::from(fresh) * 2).div_ceil(1024)
        );
    }
    Ok(())
}
