//! `clustergate-bench demo`: the pure packet core on a built-in example.
//!
//! Two (or more) worker threads share one connection table: worker `i`
//! opens flows, worker `i + 1` carries the backends' replies, then a table
//! change removes one backend in the middle of the run, and only that
//! backend's flows may move. A SYN to a service without endpoints shows the
//! reject path. The table is built here (`clustergate-builder`), as control
//! builds it; the gateway binary only looks tables up.

use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16, Proto};
use clustergate_dataplane::pipeline::{Counters, DropReason, Verdict, VerdictKind, Worker};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use clustergate_dataplane::time::Now;

/// `clustergate-bench demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Client connections to open (each: SYN, SYN-ACK, data), 1..=1000000.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub flows: u32,
    /// Worker threads, 1..=64; requests and replies go to different workers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
}

/// Runs the demo and prints its outcome.
///
/// # Errors
/// A flow that was not forwarded, moved off a surviving backend, or a drop.
pub fn run(args: &Args) -> Result<()> {
    demo(args.flows, usize::from(args.workers))
}

fn ip(s: &str) -> Result<IpAddr> {
    s.parse().with_context(|| format!("bad address {s}"))
}

const VIP: &str = "198.19.0.10";
const EMPTY_VIP: &str = "198.19.0.12";
const BACKENDS: [&str; 4] = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"];

fn example_table(generation: u64, backends: &[&str]) -> Result<Table> {
    let list = backends
        .iter()
        .map(|b| Ok(BackendSpec::ready(ip(b)?, 8080)))
        .collect::<Result<Vec<_>>>()?;
    let services = [
        ServiceSpec::cluster_ip(ip(VIP)?, 80, Proto::Tcp, list),
        ServiceSpec::cluster_ip(ip(EMPTY_VIP)?, 80, Proto::Tcp, vec![]),
    ];
    Table::build(generation, 0, &services).context("building the example table")
}

/// Client address and port of flow `i`.
fn client(i: u32) -> (Addr16, u16) {
    let host = 2 + (i / 50_000);
    let a = addr16(IpAddr::from([198, 18, 0, (host % 250) as u8]));
    (a, 10_000 + (i % 50_000) as u16)
}

fn demo(flows: u32, workers: usize) -> Result<()> {
    if !(1..=64).contains(&workers) {
        bail!("--workers must be between 1 and 64, got {workers}");
    }
    if flows == 0 || flows > 1_000_000 {
        bail!("--flows must be between 1 and 1000000, got {flows}");
    }
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: (flows as usize * 2).max(1024),
        ..Config::default()
    }));
    let gen1 = Arc::new(example_table(1, &BACKENDS)?);
    // Generation 2 drops the last backend: only its flows may move.
    let gen2 = Arc::new(example_table(2, &BACKENDS[..3])?);
    println!(
        "clustergate demo: {flows} TCP connections to {VIP}:80 over {} backends, {workers} workers",
        BACKENDS.len()
    );
    println!("  phase 1: SYN on worker i, the backend's SYN-ACK on worker i+1 (shared conntrack)");
    println!(
        "  phase 2: table generation 2 removes {}; data on every flow",
        BACKENDS[3]
    );

    let started = Instant::now();
    let t0 = Now::from_secs(1);
    let barrier = Arc::new(Barrier::new(workers));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (ct, gen1, gen2, barrier) = (
            Arc::clone(&ct),
            Arc::clone(&gen1),
            Arc::clone(&gen2),
            Arc::clone(&barrier),
        );
        handles.push(std::thread::spawn(move || {
            run_worker(w, workers, flows, ct, &gen1, &gen2, &barrier, t0)
        }));
    }
    let mut total = Counters::default();
    let mut before = vec![Addr16::default(); flows as usize];
    let mut after = vec![Addr16::default(); flows as usize];
    let mut packets = 0u64;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        total.add(&r.counters);
        packets += r.packets;
        for (i, b, a) in r.bindings {
            before[i as usize] = b;
            after[i as usize] = a;
        }
    }
    let elapsed = started.elapsed();

    // The reject path: one SYN to a service without endpoints.
    let mut w = Worker::new(Arc::clone(&ct));
    let (mut buf, len) = testkit::to_buf(&testkit::client_frame(
        client(0).0,
        9,
        addr16(ip(EMPTY_VIP)?),
        80,
        L4Spec::Tcp(Tcp::syn(1)),
        b"",
    ));
    let reject = w.process(t0, &gen2, &mut buf, len);
    total.add(&w.counters);

    println!();
    println!(
        "{:<16} {:>12} {:>12}",
        "backend", "gen 1 flows", "gen 2 flows"
    );
    for b in BACKENDS {
        let a = addr16(ip(b)?);
        let n1 = before.iter().filter(|x| **x == a).count();
        let n2 = after.iter().filter(|x| **x == a).count();
        println!("{b:<16} {n1:>12} {n2:>12}");
    }
    let removed = addr16(ip(BACKENDS[3])?);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let moved_wrongly = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a && **b != removed)
        .count();
    println!();
    println!(
        "flows moved by the table change: {moved} (all from {}: {})",
        BACKENDS[3],
        moved_wrongly == 0
    );
    println!(
        "SYN to {EMPTY_VIP}:80 (no endpoints): {}",
        describe(&reject)
    );
    println!();
    for k in VerdictKind::ALL {
        println!("{:<8} {:>10} frames", k.label(), total.count(k));
    }
    for r in DropReason::ALL {
        if total.dropped(*r) > 0 {
            println!("  drop {:<22} {:>10}", r.label(), total.dropped(*r));
        }
    }
    println!(
        "conntrack: {} flows; {} frames in {:.1} ms ({:.0} ns per frame per thread, building each frame included;\n  the core alone is measured by clustergate-bench pipeline)",
        ct.len(),
        packets + 1,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_nanos() as f64 / packets.max(1) as f64 * workers as f64,
    );
    if moved_wrongly != 0 || total.count(VerdictKind::Drop) != 0 {
        bail!(
            "demo failed: {moved_wrongly} flows moved off surviving backends, {} drops",
            total.count(VerdictKind::Drop)
        );
    }
    Ok(())
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Forward { next_hop, .. } => format!("forward to {}", ip_from16(next_hop.addr)),
        Verdict::Reject { len } => format!("reject ({len}-byte TCP RST back to the client)"),
        Verdict::Pass => "pass to the kernel".to_owned(),
        Verdict::Handoff { owner } => format!("hand off to worker {owner}"),
        Verdict::Drop(r) => format!("drop ({})", r.label()),
    }
}

struct WorkerReport {
    counters: Counters,
    packets: u64,
    bindings: Vec<(u32, Addr16, Addr16)>,
}

/// Worker `w` opens flows `i ≡ w (mod n)`, then (after a barrier) carries the
/// backends' SYN-ACKs for worker `w + 1`'s flows, so that the requests and the
/// replies of a flow cross threads through the shared conntrack.
#[allow(clippy::too_many_arguments)] // reason: a demo thread's whole context
fn run_worker(
    w: usize,
    n: usize,
    flows: u32,
    ct: Arc<Conntrack>,
    gen1: &Table,
    gen2: &Table,
    barrier: &Barrier,
    now: Now,
) -> Result<WorkerReport> {
    let mut worker = Worker::new(ct);
    let vip = addr16(ip(VIP)?);
    let mut buf = vec![0u8; testkit::BUF_LEN];
    let mut packets = 0u64;
    let mut bindings = Vec::new();
    let mut send = |worker: &mut Worker, table: &Table, frame: &[u8]| -> Verdict {
        buf[..frame.len()].copy_from_slice(frame);
        packets += 1;
        worker.process(now, table, &mut buf, frame.len())
    };
    let share = |k: usize| (0..flows).filter(move |i| *i as usize % n == k);
    for i in share(w) {
        let (c, port) = client(i);
        let syn = testkit::client_frame(c, port, vip, 80, L4Spec::Tcp(Tcp::syn(1)), b"");
        let Verdict::Forward { next_hop, .. } = send(&mut worker, gen1, &syn) else {
            bail!("flow {i}: SYN not forwarded");
        };
        bindings.push((i, next_hop.addr, Addr16::default()));
    }
    barrier.wait();
    let frontend = gen1
        .frontend(&vip, 80, Proto::Tcp)
        .and_then(|f| gen1.frontend_record(f))
        .context("the example table lost its frontend")?;
    for i in share((w + 1) % n) {
        let (c, port) = client(i);
        let tuple = clustergate_dataplane::flow::FlowTuple {
            src_addr: c,
            dst_addr: vip,
            src_port: port,
            dst_port: 80,
            proto: Proto::Tcp,
        };
        let backend = gen1.pick(frontend, &tuple).context("no backend")?;
        let synack = Tcp {
            syn: true,
            ack: Some(2),
            seq: 7,
            ..Tcp::default()
        };
        let reply = testkit::client_frame(
            backend.addr,
            backend.port,
            c,
            port,
            L4Spec::Tcp(synack),
            b"",
        );
        if !matches!(send(&mut worker, gen1, &reply), Verdict::Forward { .. }) {
            bail!("flow {i}: SYN-ACK not reverse-NATed");
        }
    }
    barrier.wait();
    for (k, i) in share(w).enumerate() {
        let (c, port) = client(i);
        let data = testkit::client_frame(
            c,
            port,
            vip,
            80,
            L4Spec::Tcp(Tcp::ack(2, 8)),
            b"GET / HTTP/1.1\r\n\r\n",
        );
        let Verdict::Forward { next_hop, .. } = send(&mut worker, gen2, &data) else {
            bail!("flow {i}: data not forwarded after the table change");
        };
        bindings[k].2 = next_hop.addr;
    }
    Ok(WorkerReport {
        counters: worker.counters,
        packets,
        bindings,
    })
}
