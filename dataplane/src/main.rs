//! `clustergate`: the gateway node.
//!
//! Subcommands in this build:
//! - `demo`: the pure packet core on a built-in example (two worker threads
//!   sharing one connection table, a table swap in the middle);
//! - `replay`: every packet of a pcap through the real pipeline, with a
//!   snapshot written by `clustergate-control`;
//! - `watch`: follow the published snapshots in a directory, as the gateway's
//!   workers will, and report each generation applied or refused;
//! - `run`: the AF_XDP gateway (see [`gateway`]);
//! - `inspect`: a running gateway's services, flows and summary, from its
//!   `/api/v1/*` (see [`inspect`]).

mod gateway;
mod gateway_http;
mod inspect;
mod link_watch;
mod replay;

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use clustergate_dataplane::cli::LogFormat;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16, Proto};
use clustergate_dataplane::pipeline::{Counters, DropReason, Verdict, VerdictKind, Worker};
use clustergate_dataplane::snapshot;
use clustergate_dataplane::snat::{default_range, PortRange, ReturnConfig, LINUX_LOCAL_PORTS};
use clustergate_dataplane::table::{BackendSpec, ServiceSpec, Table};
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use clustergate_dataplane::time::Now;
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(
    name = "clustergate",
    version,
    long_version = clustergate_dataplane::cli::long_version(),
    about = "Kubernetes Service gateway (AF_XDP dataplane)"
)]
struct Cli {
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json`
    /// (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the AF_XDP gateway on one or two interfaces.
    Run(gateway::RunArgs),
    /// Show a running gateway's services, flows or summary (from its
    /// `--metrics` address, `/api/v1/*`).
    Inspect(inspect::InspectArgs),
    /// Run every packet of a pcap through the pipeline with a snapshot's table.
    Replay {
        /// Snapshot file (from `clustergate-control build`, or a `gen-*.snap`).
        #[arg(long)]
        snapshot: PathBuf,
        /// Input pcap of Ethernet frames; its timestamps are the clock.
        #[arg(long)]
        pcap: PathBuf,
        /// Output pcap: the forwarded and rejected frames, as rewritten.
        #[arg(long)]
        out: PathBuf,
        /// One line per packet: its number and verdict.
        #[arg(long)]
        verdicts: Option<PathBuf>,
        /// Connection-table capacity (flows per IP family).
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
        flows: u32,
        /// The gateway's own address for source NAT and DSR (repeat: per
        /// family, up to 16 each). Replay has no routes: the first of each
        /// family also stands in for the route's source.
        #[arg(long = "snat-address", value_name = "ADDR", value_parser = gateway::parse_snat_address)]
        snat_addresses: Vec<IpAddr>,
        /// Source NAT ports, `LO-HI` (the one replay worker has them all).
        /// Default: the gateway's default with Linux's ip_local_port_range,
        /// 1024-29999 (the node is not read).
        #[arg(long, value_name = "LO-HI", value_parser = gateway::parse_port_range)]
        snat_ports: Option<PortRange>,
        /// Largest IP packet towards the backends once encapsulated for DSR.
        #[arg(long, value_name = "BYTES", default_value_t = 1500, value_parser = clap::value_parser!(u16).range(576..=9216))]
        encap_mtu: u16,
        /// The node's addresses for node ports, as kube-proxy's flag:
        /// `CIDR[,CIDR...]`; every address within them is taken as the
        /// node's. Default: every address within the snapshot's node-port
        /// addresses.
        #[arg(long, value_name = "CIDR[,CIDR...]", value_delimiter = ',', value_parser = parse_cidr)]
        nodeport_addresses: Option<Vec<IpNet>>,
    },
    /// Follow the snapshots published in a directory and report each change.
    Watch {
        /// Snapshot directory.
        #[arg(long, default_value = clustergate_dataplane::snapshot::DEFAULT_DIR)]
        shm_dir: PathBuf,
        /// Poll interval in milliseconds.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        interval_ms: u64,
        /// Stop after this many generations were applied (0: never).
        #[arg(long, default_value_t = 0)]
        generations: u64,
        /// Stop after this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        timeout_s: u64,
    },
    /// Run the packet core on a built-in example and print the outcome.
    Demo {
        /// Client connections to open (each: SYN, SYN-ACK, data), 1..=1000000.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        flows: u32,
        /// Worker threads, 1..=64; requests and replies go to different workers.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: u16,
    },
}

fn main() {
    let result = real_main();
    if let Err(e) = &result {
        if let Some(r) = e.downcast_ref::<gateway::InterfaceReturned>() {
            tracing::warn!("{r}");
            std::process::exit(link_watch::EXIT_INTERFACE_RETURNED);
        }
    }
    clustergate_dataplane::cli::exit_on_error(result);
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    clustergate_dataplane::cli::init_logging(cli.log_format, "info");
    match cli.command {
        Command::Run(args) => gateway::run(args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Demo { flows, workers } => demo(flows, usize::from(workers)),
        Command::Replay {
            snapshot,
            pcap,
            out,
            verdicts,
            flows,
            snat_addresses,
            snat_ports,
            encap_mtu,
            nodeport_addresses,
        } => {
            let (snat_v4, snat_v6) =
                gateway::snat_overrides(&snat_addresses).map_err(anyhow::Error::msg)?;
            let ret = ReturnConfig {
                snat_v4,
                snat_v6,
                ports: snat_ports.unwrap_or_else(|| default_range(LINUX_LOCAL_PORTS)),
                encap_mtu,
            };
            run_replay(
                &snapshot,
                &pcap,
                &out,
                verdicts.as_deref(),
                flows as usize,
                ret,
                nodeport_addresses.map(replay::PrefixNodeAddrs),
            )
        }
        Command::Watch {
            shm_dir,
            interval_ms,
            generations,
            timeout_s,
        } => watch(&shm_dir, interval_ms, generations, timeout_s),
    }
}

/// One CIDR of `--nodeport-addresses`.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a CIDR (ADDRESS/LENGTH, like 198.18.0.0/24): {e}"))
}

fn run_replay(
    snapshot: &Path,
    pcap: &Path,
    out: &Path,
    verdicts: Option<&Path>,
    flows: usize,
    ret: ReturnConfig,
    node_addrs: Option<replay::PrefixNodeAddrs>,
) -> Result<()> {
    let table = snapshot::load_file(snapshot)
        .with_context(|| format!("loading snapshot {}", snapshot.display()))?;
    let input =
        BufReader::new(File::open(pcap).with_context(|| format!("opening {}", pcap.display()))?);
    let output =
        BufWriter::new(File::create(out).with_context(|| format!("creating {}", out.display()))?);
    let mut vfile = match verdicts {
        Some(p) => Some(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let summary = replay::replay(
        &table,
        flows,
        ret,
        node_addrs,
        input,
        output,
        vfile.as_mut().map(|f| f as &mut dyn std::io::Write),
    )
    .with_context(|| format!("replaying {}", pcap.display()))?;
    eprintln!(
        "{} (snapshot generation {})",
        replay::summary_line(&summary),
        table.generation()
    );
    Ok(())
}

/// Follows a snapshot directory like the gateway will: every poll may apply a
/// newer generation; a refused one is reported and the last good stays.
/// Each applied table is checked whole: every frontend's ring names its own
/// backends (the decode already guarantees it; this is the reader's view).
fn watch(dir: &Path, interval_ms: u64, generations: u64, timeout_s: u64) -> Result<()> {
    let handle = Arc::new(snapshot::TableHandle::default());
    let mut watcher = snapshot::Watcher::new(dir, Arc::clone(&handle));
    let started = Instant::now();
    let mut applied = 0u64;
    loop {
        match watcher.poll() {
            snapshot::PollOutcome::Applied { generation } => {
                applied += 1;
                let t = handle.load_full();
                let mut ports: Vec<u16> = t.backend_records().iter().map(|b| b.port).collect();
                ports.sort_unstable();
                ports.dedup();
                println!(
                    "applied generation {generation}: {} frontends, {} backends, backend ports {ports:?}",
                    t.frontends().len(),
                    t.backend_records().len(),
                );
            }
            snapshot::PollOutcome::Refused {
                fault,
                repeated: false,
            } => {
                println!(
                    "refused ({fault}): {}; still forwarding generation {}",
                    watcher.stats.last_refusal.as_deref().unwrap_or("?"),
                    handle.generation()
                );
            }
            _ => {}
        }
        if generations > 0 && applied >= generations {
            return Ok(());
        }
        if timeout_s > 0 && started.elapsed().as_secs() >= timeout_s {
            bail!("watch: {applied} of {generations} generations applied within {timeout_s} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(interval_ms));
    }
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
