//! `clustergate-bench`: benchmark harness.
//!
//! Subcommands in this build:
//! - `pipeline`: an in-process measurement of the packet core (established
//!   flows, new flows, replies; one or several worker threads), reported as
//!   medians over several runs and as ratios to a baseline and to a random
//!   memory read measured in the same run (see [`pipeline`]);
//! - `publish-latency`: the time from a manifest change to the published
//!   snapshot, through the real `clustergate-control run`.
//!
//! - `topology up|down`: the benchmark network (see [`layout`]);
//! - `pktgen`, `sink`, `bounce`: the AF_XDP traffic generator, the checking
//!   sinks in the backends, and the minimal AF_XDP forwarder (the ceiling);
//! - `compare`: the same traffic through clustergate, the kernel's nftables
//!   DNAT and the bounce forwarder, one after another;
//! - `update-latency`: a change (manifest file, manifest directory or
//!   Kubernetes API watch) → first packet at the new backend;
//! - `demo`: the packet core on a built-in example (two worker threads
//!   sharing one connection table, a table swap in the middle).

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// The packet core in process (no network): established flows, new
    /// flows and replies on the batch path, against a random read measured
    /// in the same run; with `--threads`, on several worker threads.
    Pipeline(pipeline::Args),
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
    /// A change (manifest, manifest directory or API watch) → first packet
    /// at the new backend, with many services loaded.
    UpdateLatency(update_latency::Args),
    /// Run the packet core on a built-in example and print the outcome.
    Demo(demo::Args),
}

fn main() {
    clustergate_dataplane::cli::exit_on_error(real_main());
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries results (tables, JSON lines).
    clustergate_dataplane::cli::init_logging(cli.log_format, "warn");
    match cli.command {
        Command::Pipeline(a) => pipeline::run(&a),
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
        Command::Demo(a) => demo::run(&a),
    }
}

mod bounce;
mod chart;
mod compare;
mod demo;
mod layout;
mod pipeline;
mod pktgen;
mod publish_latency;
mod sink;
mod topology;
mod update_latency;
mod update_objects;
mod update_steps;
mod wire;
mod xdp_sink;
