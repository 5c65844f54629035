//! `clustergate-control`: the control daemon.
//!
//! This build has `maglev`: it builds a Maglev ring with the same builder the
//! daemon will use and prints its size, balance and build time. Reading
//! manifests, Kubernetes semantics and publishing snapshots come with the next
//! issue.

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::{Parser, Subcommand};
use clustergate_dataplane::flow::addr16;
use clustergate_dataplane::maglev::{
    build_ring, ring_size_for, MaglevBackend, DEFAULT_MAX_RING_SIZE,
};

#[derive(Debug, Parser)]
#[command(
    name = "clustergate-control",
    version,
    about = "clustergate control daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build one Maglev ring for N equal-weight backends and report on it.
    Maglev {
        /// Number of backends, 1..=100000.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        backends: u32,
        /// Cap on the ring size M, at least 2.
        #[arg(long, default_value_t = DEFAULT_MAX_RING_SIZE, value_parser = clap::value_parser!(u32).range(2..))]
        max_ring: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Maglev { backends, max_ring } => maglev(backends, max_ring),
    }
}

fn maglev(n: u32, cap: u32) -> Result<()> {
    ensure!(
        (1..=100_000).contains(&n),
        "--backends must be 1..=100000, got {n}"
    );
    ensure!(cap >= 2, "--max-ring must be at least 2, got {cap}");
    let list: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            addr: addr16(IpAddr::from([198, 18, (i >> 8) as u8, i as u8])),
            port: 8080,
            weight: 1,
        })
        .collect();
    let m = ring_size_for(list.len(), cap);
    let t = Instant::now();
    let ring = build_ring(&list, m)?;
    let took = t.elapsed();
    let mut counts = vec![0u32; list.len()];
    for s in &ring {
        counts[*s as usize] += 1;
    }
    let (lo, hi) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    let mean = f64::from(m) / f64::from(n);
    println!("backends {n}, ring size M = {m} (prime, M > 100·N unless capped at {cap})");
    println!(
        "slots per backend: min {lo}, max {hi}, mean {mean:.1}; imbalance (max−min)/mean = {:.2} %",
        f64::from(hi - lo) / mean * 100.0
    );
    println!("build time: {:.3} ms", took.as_secs_f64() * 1e3);
    Ok(())
}
