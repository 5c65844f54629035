//! `clustergate`: the gateway node.
//!
//! Subcommands in this build (the packet core on a built-in example is
//! `clustergate-bench demo`: building tables is control's side):
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
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use clustergate_dataplane::cli::LogFormat;
use clustergate_dataplane::snapshot;
use clustergate_dataplane::snat::{default_range, PortRange, ReturnConfig, LINUX_LOCAL_PORTS};
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
