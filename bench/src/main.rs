//! `clustergate-bench`: benchmark harness.
//!
//! Subcommands in this build:
//! - `pipeline`: an in-process measurement of the packet core on established
//!   flows, reported as the median over several runs and as a ratio to a
//!   baseline measured in the same run (parsing the same frames, nothing else);
//! - `publish-latency`: the time from a manifest change to the published
//!   snapshot, through the real `clustergate-control run`.
//!
//! - `topology up|down`: the benchmark network (see [`layout`]);
//! - `pktgen`, `sink`, `bounce`: the AF_XDP traffic generator, the checking
//!   sinks in the backends, and the minimal AF_XDP forwarder (the ceiling);
//! - `compare`: the same traffic through clustergate, the kernel's nftables
//!   DNAT and the bounce forwarder, one after another;
//! - `update-latency`: manifest write → first packet at the new backend.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use clap::{Parser, Subcommand};
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::packet::parse::parse;
use clustergate_dataplane::pipeline::{Frame, Verdict, Worker, BATCH};
use clustergate_dataplane::table::{BackendSpec, ServiceSpec, Table};
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use clustergate_dataplane::time::Now;

#[derive(Debug, Parser)]
#[command(
    name = "clustergate-bench",
    version,
    long_version = clustergate_dataplane::cli::long_version(),
    about = "clustergate benchmark harness"
)]
struct Cli {
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json`.
    #[arg(long, global = true, value_enum, default_value_t = clustergate_dataplane::cli::LogFormat::Text)]
    log_format: clustergate_dataplane::cli::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Packet core on established TCP flows, in process (no network).
    Pipeline {
        /// Established flows in the connection table, 1..=4000000.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
        flows: u32,
        /// Services (each with 10 endpoints) in the table, 1..=65000.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=65_000))]
        services: u32,
        /// Repetitions, 1..=101; the median is reported.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=101))]
        runs: u16,
    },
    /// Manifest change → published snapshot, through `clustergate-control run`.
    PublishLatency {
        /// Services in the manifest (each a ClusterIP with one TCP port).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
        services: u32,
        /// Endpoints per service.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
        endpoints: u32,
        /// Changes to time, 1..=1000; the median is reported.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
        changes: u16,
        /// How often control looks at the manifest, in milliseconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
        poll_ms: u64,
        /// The `clustergate-control` binary (default: next to this one).
        #[arg(long)]
        control: Option<std::path::PathBuf>,
    },
    /// The benchmark network: namespaces, veth, addresses, routes.
    Topology(topology::Args),
    /// AF_XDP traffic generator (run inside the client namespace).
    Pktgen(pktgen::Args),
    /// AF_XDP sink that checks every packet (run inside a backend namespace).
    Sink(sink::Args),
    /// Minimal AF_XDP forwarder, no lookup (run inside the gateway namespace).
    Bounce(bounce::Args),
    /// clustergate, kernel nftables DNAT and bounce, side by side.
    Compare(compare::Args),
    /// Manifest write → first packet at the new backend, with many services loaded.
    UpdateLatency(update_latency::Args),
}

fn main() {
    clustergate_dataplane::cli::exit_on_error(real_main());
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries results (tables, JSON lines).
    clustergate_dataplane::cli::init_logging(cli.log_format, "warn");
    match cli.command {
        Command::Pipeline {
            flows,
            services,
            runs,
        } => pipeline(flows, services, usize::from(runs)),
        Command::PublishLatency {
            services,
            endpoints,
            changes,
            poll_ms,
            control,
        } => publish_latency::run(services, endpoints, changes, poll_ms, control),
        Command::Topology(a) => topology::run(&a),
        Command::Pktgen(a) => pktgen::run(&a),
        Command::Sink(a) => sink::run(&a),
        Command::Bounce(a) => bounce::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::UpdateLatency(a) => update_latency::run(&a),
    }
}

mod bounce;
mod chart;
mod compare;
mod layout;
mod pktgen;
mod publish_latency;
mod sink;
mod topology;
mod update_latency;
mod wire;
mod xdp_sink;

fn vip(i: u32) -> Addr16 {
    addr16(IpAddr::from([198, 19, (i >> 8) as u8, i as u8]))
}

/// Deterministic shuffle (xorshift64*), so every run visits flows in the same
/// cache-hostile order.
fn shuffled(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let j = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pipeline(flows: u32, services: u32, runs: usize) -> Result<()> {
    ensure!(
        (1..=4_000_000).contains(&flows),
        "--flows must be 1..=4000000, got {flows}"
    );
    ensure!(
        (1..=65_000).contains(&services),
        "--services must be 1..=65000, got {services}"
    );
    ensure!(
        (1..=101).contains(&runs),
        "--runs must be 1..=101, got {runs}"
    );
    let specs: Vec<ServiceSpec> = (0..services)
        .map(|s| {
            let backends = (0..10u32)
                .map(|e| {
                    let n = s * 10 + e;
                    // 16 384 addresses in 198.18.0.0/18; the port tells repeats apart.
                    let a = n % 16_384;
                    BackendSpec::ready(
                        IpAddr::from([198, 18, (a >> 8) as u8, a as u8]),
                        8080 + (n / 16_384) as u16,
                    )
                })
                .collect();
            ServiceSpec::cluster_ip(
                clustergate_dataplane::flow::ip_from16(vip(s)),
                80,
                Proto::Tcp,
                backends,
            )
        })
        .collect();
    let table = Table::build(1, 0, &specs)?;
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: flows as usize * 2,
        ..Config::default()
    }));
    let mut worker = Worker::new(ct);
    let now = Now::from_secs(1);

    // One flat array of equal-size frames: flow i is client (198.18.128+x.y, port) → vip(i % services).
    // Clients: 32 768 addresses in 198.18.128.0/17, then the next source port.
    let client = |i: u32| {
        let a = i % 32_768;
        (
            addr16(IpAddr::from([198, 18, 128 + (a >> 8) as u8, a as u8])),
            1024 + (i / 32_768) as u16,
        )
    };
    let mk = |i: u32, f: Tcp| {
        let (c, p) = client(i);
        testkit::client_frame(c, p, vip(i % services), 80, L4Spec::Tcp(f), b"")
    };
    let stride = mk(0, Tcp::ack(1, 1)).len();
    let mut buf = vec![0u8; testkit::BUF_LEN];
    let setup = Instant::now();
    for i in 0..flows {
        let syn = mk(i, Tcp::syn(0));
        buf[..syn.len()].copy_from_slice(&syn);
        if !matches!(
            worker.process(now, &table, &mut buf, syn.len()),
            Verdict::Forward { .. }
        ) {
            bail!("flow {i}: SYN not forwarded");
        }
    }
    // Frames in the order they are sent (a shuffled, cache-hostile order of
    // flows), laid out one after another as a NIC fills its ring: the harness
    // itself adds no cache miss, the connection table does.
    let order = shuffled(flows as usize);
    let mut frames = Vec::with_capacity(stride * flows as usize);
    for &i in &order {
        frames.extend_from_slice(&mk(i, Tcp::ack(1, 1)));
    }
    eprintln!(
        "pipeline: {flows} flows established over {services} services × 10 endpoints in {:.2} s",
        setup.elapsed().as_secs_f64()
    );

    let mut umem = vec![0u8; BATCH * testkit::BUF_LEN];
    let mut verdicts = [Verdict::Pass; BATCH];
    let mut core = Vec::with_capacity(runs);
    let mut batched = Vec::with_capacity(runs);
    let mut base = Vec::with_capacity(runs);
    for _ in 0..runs {
        // Baseline: copy each frame into a buffer and parse it; no lookup.
        let t = Instant::now();
        let mut ok = 0usize;
        for f in frames.chunks_exact(stride) {
            buf[..stride].copy_from_slice(f);
            ok += usize::from(matches!(parse(&buf[..stride]), Ok(Some(_))));
        }
        base.push(t.elapsed().as_nanos() as f64 / f64::from(flows));
        ensure!(ok == flows as usize, "baseline parsed {ok} of {flows}");

        // The pipeline, one frame at a time: the same copy, then parse →
        // lookup → conntrack → NAT.
        let t = Instant::now();
        let mut fwd = 0usize;
        for f in frames.chunks_exact(stride) {
            buf[..stride].copy_from_slice(f);
            fwd += usize::from(matches!(
                worker.process(now, &table, &mut buf, stride),
                Verdict::Forward { .. }
            ));
        }
        core.push(t.elapsed().as_nanos() as f64 / f64::from(flows));
        ensure!(fwd == flows as usize, "pipeline forwarded {fwd} of {flows}");

        // The pipeline in batches of 64 (prefetching conntrack lines first).
        let t = Instant::now();
        let mut fwd = 0usize;
        for chunk in frames.chunks(stride * BATCH) {
            let mut batch: Vec<Frame<'_>> = umem
                .chunks_mut(testkit::BUF_LEN)
                .zip(chunk.chunks_exact(stride))
                .map(|(b, f)| {
                    b[..stride].copy_from_slice(f);
                    Frame {
                        buf: b,
                        len: stride,
                    }
                })
                .collect();
            let n = batch.len();
            worker.process_batch(now, &table, &mut batch, &mut verdicts[..n]);
            fwd += verdicts[..n]
                .iter()
                .filter(|v| matches!(v, Verdict::Forward { .. }))
                .count();
        }
        batched.push(t.elapsed().as_nanos() as f64 / f64::from(flows));
        ensure!(
            fwd == flows as usize,
            "batched pipeline forwarded {fwd} of {flows}"
        );
    }
    let row = |name: &str, v: &mut Vec<f64>, b: f64| {
        let (lo, hi) = (
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        let m = median(v);
        println!(
            "| {name} | {m:.1} | {lo:.1} | {hi:.1} | {:.2} | {:.2} |",
            1e3 / m,
            m / b
        );
    };
    let mb = median(&mut base.clone());
    println!();
    println!("| established TCP, {flows} flows, {services} services | median ns/packet | min | max | Mpps/core | ÷ baseline |");
    println!("|---|---|---|---|---|---|");
    row("baseline: copy + parse only", &mut base, mb);
    row("pipeline, one frame at a time", &mut core, mb);
    row("pipeline, batches of 64 (prefetch)", &mut batched, mb);
    println!("({runs} runs, one thread, frames {stride} bytes, shuffled flow order)");
    Ok(())
}
