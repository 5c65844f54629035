//! `clustergate-bench compare`: the same traffic through several
//! dataplanes, one after another, on one topology, in one invocation.
//!
//! - **clustergate-snat**, **clustergate-routed**, **clustergate-dsr**:
//!   `clustergate-control run --return-path P` on a generated manifest of S
//!   services × all backends, and `clustergate run` in the gateway namespace
//!   (`clustergate` alone is snat, control's default);
//! - **kernel**: nftables DNAT as kube-proxy's nftables mode programs it (a
//!   verdict map on VIP . proto . port, a chain per service choosing an
//!   endpoint with `numgen random`, a chain per endpoint with the `dnat`),
//!   with IP forwarding and conntrack: the baseline of routed and dsr;
//! - **kernel-masq**: the same plus kube-proxy's masquerading (the service
//!   chain jumps to `mark-for-masquerade` for traffic from outside the
//!   cluster, a postrouting chain `masquerade fully-random`s marked
//!   packets): the baseline of snat;
//! - **bounce**: `clustergate-bench bounce`, the same AF_XDP path as the
//!   gateway with no lookup at all: the ceiling of this machine.
//!
//! Each repetition starts a checking sink in every backend, runs the AF_XDP
//! pktgen in the client namespace for a fixed time, waits a grace period for
//! the last frames, and stops the sinks. What it reports per dataplane, as
//! the median over the repetitions with min and max: offered and forwarded
//! pps, loss, one-way latency percentiles (merged over the sinks), CPU time
//! per forwarded packet (all cores, user + system + irq + softirq, from
//! /proc/stat over the run), and the spread over backends; then each
//! dataplane's ratios to its kernel baseline and to bounce. Every sink check
//! for the dataplane's return path (rewritten destination; the flow's
//! source, or the gateway's with a stable SNAT port, or IP-in-IP around the
//! client's packet; checksums) must pass: a failure is printed and makes
//! the command fail, whatever the speed.
//!
//! `--family 6` runs the same over IPv6 (the layout's 2001:2::/48
//! addresses, on the same dual-stack topology): the manifest's services
//! and EndpointSlices are IPv6, the kernel's ruleset is an `ip6` table
//! (DNAT, and kube-proxy's masquerade for `kernel-masq`) with IPv6
//! forwarding, clustergate gets `--snat-address` g1's IPv6 address, bounce
//! steers the IPv6 VIPs, and the pktgen and sinks build and check IPv6
//! frames (84 bytes at the least: the IPv4 minimum and 20 more bytes of
//! header; the default frame size then).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::layout::{
    backend_ip, gw_lan_ip, parse_family, vip_ip, Family, BACKEND_PORT, LAN_MTU, LAN_NET6,
    MAX_FLOWS, MAX_SERVICES, SERVICE_PORT,
};
use crate::sink::ReturnPath;
use crate::topology::{Shape, Topology};

/// A dataplane under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
pub enum Dataplane {
    /// `clustergate run` with `clustergate-control --return-path snat`
    /// (control's default; also named `clustergate`).
    #[value(name = "clustergate-snat", alias = "clustergate")]
    #[serde(rename = "clustergate-snat")]
    ClustergateSnat,
    /// `clustergate run` with `clustergate-control --return-path routed`.
    #[value(name = "clustergate-routed")]
    #[serde(rename = "clustergate-routed")]
    ClustergateRouted,
    /// `clustergate run` with `clustergate-control --return-path dsr`.
    #[value(name = "clustergate-dsr")]
    #[serde(rename = "clustergate-dsr")]
    ClustergateDsr,
    /// nftables DNAT + conntrack + IP forwarding (the routed and dsr baseline).
    #[value(name = "kernel")]
    #[serde(rename = "kernel")]
    Kernel,
    /// The same plus kube-proxy's masquerade (the snat baseline).
    #[value(name = "kernel-masq")]
    #[serde(rename = "kernel-masq")]
    KernelMasq,
    /// `clustergate-bench bounce`: AF_XDP, no lookup.
    #[value(name = "bounce")]
    #[serde(rename = "bounce")]
    Bounce,
}

impl Dataplane {
    /// Its name on the command line and in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ClustergateSnat => "clustergate-snat",
            Self::ClustergateRouted => "clustergate-routed",
            Self::ClustergateDsr => "clustergate-dsr",
            Self::Kernel => "kernel",
            Self::KernelMasq => "kernel-masq",
            Self::Bounce => "bounce",
        }
    }

    /// The return path clustergate is told (`--return-path`), if it is one
    /// of clustergate's.
    #[must_use]
    pub fn clustergate_path(self) -> Option<ReturnPath> {
        match self {
            Self::ClustergateSnat => Some(ReturnPath::Snat),
            Self::ClustergateRouted => Some(ReturnPath::Routed),
            Self::ClustergateDsr => Some(ReturnPath::Dsr),
            _ => None,
        }
    }

    /// What the sinks check.
    #[must_use]
    pub fn sink_path(self) -> ReturnPath {
        match self {
            Self::ClustergateSnat | Self::KernelMasq => ReturnPath::Snat,
            Self::ClustergateDsr => ReturnPath::Dsr,
            Self::ClustergateRouted | Self::Kernel | Self::Bounce => ReturnPath::Routed,
        }
    }

    /// The kernel dataplane a clustergate return path is compared with.
    #[must_use]
    pub fn baseline(self) -> Option<Self> {
        match self {
            Self::ClustergateSnat => Some(Self::KernelMasq),
            Self::ClustergateRouted | Self::ClustergateDsr => Some(Self::Kernel),
            _ => None,
        }
    }

    fn is_kernel(self) -> bool {
        matches!(self, Self::Kernel | Self::KernelMasq)
    }
}

/// The kernel's masquerade ports: `nf_nat` picks a source port for a client
/// port ≥ 1024 in 1024-65535 (no `--to-ports`; `fully-random` as kube-proxy
/// asks).
pub const KERNEL_MASQ_PORTS: (u16, u16) = (1024, 65_535);

/// Most flows a source-NAT dataplane with `ports` ports per (SNAT address,
/// backend) can carry to `backends` backends with room to spare: three
/// quarters of the port space (the spread over backends is not even, and
/// port choice probes a bounded number of ports).
#[must_use]
pub fn snat_capacity(backends: u32, ports: u32) -> u64 {
    u64::from(backends) * u64::from(ports) * 3 / 4
}

/// L4 protocol of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// UDP datagrams.
    Udp,
    /// TCP: a SYN per flow, then ACKs.
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// Flags of `clustergate-bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Namespace name prefix of the topology (built if missing, removed at the end).
    #[arg(long, default_value = "cgb", value_parser = crate::topology::parse_prefix)]
    pub prefix: String,
    /// Backends, 1..=16.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub backends: u32,
    /// Dataplanes to run, in this order: clustergate-snat (alias
    /// clustergate), clustergate-routed, clustergate-dsr, kernel (nftables
    /// DNAT), kernel-masq (DNAT + masquerade), bounce.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "clustergate-snat,kernel-masq,clustergate-routed,kernel,clustergate-dsr,bounce"
    )]
    pub dataplanes: Vec<Dataplane>,
    /// Frame sizes in bytes (64..=1500; IPv6 84..=1500), comma-separated
    /// (default: the family's smallest, 64 or 84).
    #[arg(long, value_delimiter = ',')]
    pub frame_sizes: Vec<u32>,
    /// Flow counts (1..=4000000), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub flows: Vec<u32>,
    /// Service counts (1..=65536), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub services: Vec<u32>,
    /// Worker counts (1..=16; gateway workers, bounce workers and pktgen queues), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub workers: Vec<u32>,
    /// Traffic: UDP, or TCP (a SYN per flow, then ACKs).
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: Proto,
    /// Offered rate in packets per second over all pktgen queues; 0: as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of traffic per repetition, 0.2..=120.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Repetitions per dataplane and scenario, 1..=20 (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub reps: u32,
    /// Directory for results.json, results.md, chart.svg and the processes' logs.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Where `clustergate` and `clustergate-control` are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Correctness only: one short, rate-limited repetition per dataplane
    /// (1 s at 20 000 pps unless --duration-s / --rate say otherwise).
    #[arg(long)]
    pub quick: bool,
    /// Leave the topology up at the end.
    #[arg(long)]
    pub keep_topology: bool,
    /// Rounds instead of runs: each round starts every dataplane in turn
    /// for one repetition (warm-up included), so that a burst of load on a
    /// shared machine falls on every dataplane rather than on one; --reps
    /// rounds.
    #[arg(long)]
    pub interleave: bool,
    /// Address family of the traffic: 4 (198.18.0.0/15) or 6 (2001:2::/48).
    #[arg(long, default_value = "4", value_parser = parse_family)]
    pub family: Family,
}

impl Args {
    fn validate(&mut self) -> Result<()> {
        if self.quick {
            self.reps = 1;
            if self.duration_s == 5.0 {
                self.duration_s = 1.0;
            }
            if self.rate == 0 {
                self.rate = 20_000;
            }
        }
        ensure!(
            (0.2..=120.0).contains(&self.duration_s),
            "--duration-s {}: must be 0.2..=120",
            self.duration_s
        );
        ensure!(
            !self.dataplanes.is_empty(),
            "--dataplanes: name at least one"
        );
        // The generator's TCP is one-way (SYN, then ACKs, no SYN-ACK ever):
        // the kernel's conntrack marks those ACKs invalid and does not NAT
        // them, which would measure the traffic, not the dataplane.
        ensure!(
            !(self.proto == Proto::Tcp && self.dataplanes.iter().any(|d| d.is_kernel())),
            "--proto tcp with --dataplanes kernel or kernel-masq: the generator's one-way TCP (no SYN-ACK) is invalid to the kernel's conntrack; compare TCP with --dataplanes clustergate-snat,clustergate-routed,clustergate-dsr,bounce"
        );
        for (i, d) in self.dataplanes.iter().enumerate() {
            ensure!(
                !self.dataplanes[..i].contains(d),
                "--dataplanes: {} is given twice",
                d.name()
            );
        }
        // A SNAT port must stay the flow's for the whole repetition, which
        // holds while every flow is refreshed within the UDP timeout (30 s,
        // the gateway's and the kernel's): at a fixed rate, a round over the
        // flows must be shorter.
        if self.rate > 0
            && self
                .dataplanes
                .iter()
                .any(|d| d.sink_path() == ReturnPath::Snat)
        {
            for &f in &self.flows {
                ensure!(
                    u64::from(f) <= self.rate * 20,
                    "--flows {f} at --rate {}: each flow would be sent less than every 20 s, and a source-NAT flow idle for the 30 s UDP timeout may come back with another port; raise --rate or lower --flows",
                    self.rate
                );
            }
        }
        let min = crate::wire::min_frame(self.family) as u32;
        if self.frame_sizes.is_empty() {
            self.frame_sizes = vec![min];
        }
        for &f in &self.frame_sizes {
            ensure!(
                (min..=1500).contains(&f),
                "--frame-sizes {f}: must be {min}..=1500 (IPv{})",
                self.family.number()
            );
            // DSR's outer IPv6 header is 40 bytes: the backend LAN's MTU
            // holds a client packet of at most LAN_MTU - 40.
            ensure!(
                !(self.family == Family::V6
                    && self.dataplanes.contains(&Dataplane::ClustergateDsr)
                    && f > u32::from(LAN_MTU) - 40 + 14),
                "--frame-sizes {f} with clustergate-dsr over IPv6: at most {} (the backend LAN's MTU {LAN_MTU} less the 40-byte outer header, plus the Ethernet header)",
                u32::from(LAN_MTU) - 40 + 14
            );
        }
        for &f in &self.flows {
            ensure!(
                (1..=MAX_FLOWS).contains(&f),
                "--flows {f}: must be 1..={MAX_FLOWS}"
            );
        }
        for &s in &self.services {
            ensure!(
                (1..=MAX_SERVICES).contains(&s),
                "--services {s}: must be 1..={MAX_SERVICES}"
            );
        }
        for &w in &self.workers {
            ensure!((1..=16).contains(&w), "--workers {w}: must be 1..=16");
        }
        ensure!(
            self.rate <= 100_000_000,
            "--rate {}: at most 100000000",
            self.rate
        );
        Ok(())
    }
}

/// One scenario: a point of the parameter grid.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scenario {
    /// Frame size in bytes.
    pub frame_size: u32,
    /// Distinct flows.
    pub flows: u32,
    /// Services in the table.
    pub services: u32,
    /// Workers (and pktgen queues).
    pub workers: u32,
}

impl Scenario {
    fn label(&self) -> String {
        format!(
            "{} B, {} flows, {} svc, {} worker{}",
            self.frame_size,
            human(self.flows),
            human(self.services),
            self.workers,
            if self.workers == 1 { "" } else { "s" }
        )
    }
}

fn human(n: u32) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// What one repetition measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rep {
    /// Frames the pktgen sent (completed by the kernel).
    pub sent: u64,
    /// Seconds the pktgen ran.
    pub elapsed_s: f64,
    /// sent ÷ elapsed.
    pub offered_pps: f64,
    /// Frames the sinks received (all of them, good or bad).
    pub received: u64,
    /// received ÷ elapsed.
    pub forwarded_pps: f64,
    /// 1 − received ÷ sent.
    pub loss: f64,
    /// One-way latency percentiles over all sinks, in microseconds.
    pub p50_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
    /// CPU seconds, all cores, over the run (user + nice + system + irq + softirq).
    pub cpu_s: f64,
    /// CPU seconds of the pktgen process itself (utime + stime).
    pub pktgen_cpu_s: f64,
    /// (cpu_s − pktgen_cpu_s) ÷ received, in ns: the dataplane, the kernel's
    /// veth and bridge work and the sinks, per packet.
    pub cpu_ns_per_pkt: f64,
    /// cpu_s ÷ received, in ns (the generator included).
    pub host_cpu_ns_per_pkt: f64,
    /// Frames the sinks' AF_XDP rings dropped (ring full or other): loss
    /// at the measuring end, not in the dataplane.
    pub sink_dropped: u64,
    /// Frames received per backend (index 0 is backend 1).
    pub per_backend: Vec<u64>,
    /// max ÷ min of `per_backend` (1.0 is a perfect spread).
    pub spread: f64,
    /// Failed sink checks, by kind, summed over the sinks.
    pub bad: std::collections::BTreeMap<String, u64>,
    /// Frames that arrived before an earlier frame of their flow.
    pub reordered: u64,
    /// Frames that arrived twice.
    pub duplicates: u64,
}

/// Median, min and max of one figure over the repetitions.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Most.
    pub max: f64,
}

impl Stat {
    fn of(v: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = v.collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// One dataplane in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Which.
    pub dataplane: Dataplane,
    /// The repetitions.
    pub reps: Vec<Rep>,
    /// Offered pps.
    pub offered_pps: Stat,
    /// Forwarded pps.
    pub forwarded_pps: Stat,
    /// Loss fraction.
    pub loss: Stat,
    /// p50 µs.
    pub p50_us: Stat,
    /// p99 µs.
    pub p99_us: Stat,
    /// p99.9 µs.
    pub p999_us: Stat,
    /// CPU ns per forwarded packet, the generator's own CPU excluded.
    pub cpu_ns_per_pkt: Stat,
    /// CPU ns per forwarded packet, all of the host's.
    pub host_cpu_ns_per_pkt: Stat,
    /// Frames dropped by the sinks' rings.
    pub sink_dropped: Stat,
    /// Backend spread (max ÷ min).
    pub spread: Stat,
    /// Seconds to set the dataplane up (e.g. nft -f, or control's first publish).
    pub setup_s: f64,
    /// Gateway drop counters after the run (clustergate only; summed over
    /// the rounds with --interleave): name → value.
    pub gateway_drops: std::collections::BTreeMap<String, f64>,
}

impl Run {
    fn new(dataplane: Dataplane, reps: Vec<Rep>, setup_s: f64) -> Self {
        let s = |f: fn(&Rep) -> f64| Stat::of(reps.iter().map(f));
        Self {
            dataplane,
            offered_pps: s(|r| r.offered_pps),
            forwarded_pps: s(|r| r.forwarded_pps),
            loss: s(|r| r.loss),
            p50_us: s(|r| r.p50_us),
            p99_us: s(|r| r.p99_us),
            p999_us: s(|r| r.p999_us),
            cpu_ns_per_pkt: s(|r| r.cpu_ns_per_pkt),
            host_cpu_ns_per_pkt: s(|r| r.host_cpu_ns_per_pkt),
            sink_dropped: s(|r| r.sink_dropped as f64),
            spread: s(|r| r.spread),
            reps,
            setup_s,
            gateway_drops: Default::default(),
        }
    }

    fn failures(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (i, r) in self.reps.iter().enumerate() {
            for (k, n) in &r.bad {
                if *n > 0 {
                    v.push(format!(
                        "{}: rep {}: {n} frames failed the {k} check",
                        self.dataplane.name(),
                        i + 1
                    ));
                }
            }
            if r.received == 0 {
                v.push(format!(
                    "{}: rep {}: no frame reached any backend",
                    self.dataplane.name(),
                    i + 1
                ));
            }
        }
        v
    }
}

/// One clustergate return path against its kernel baseline and bounce,
/// from the medians of the same scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// The clustergate dataplane.
    pub dataplane: Dataplane,
    /// Its kernel baseline (kernel-masq for snat, kernel for routed and dsr).
    pub baseline: Dataplane,
    /// Forwarded pps ÷ the baseline's.
    pub pps_over_baseline: Option<f64>,
    /// CPU ns per packet (generator excluded) ÷ the baseline's.
    pub cpu_over_baseline: Option<f64>,
    /// CPU ns per packet (whole host) ÷ the baseline's.
    pub host_cpu_over_baseline: Option<f64>,
    /// Forwarded pps ÷ bounce's.
    pub pps_over_bounce: Option<f64>,
    /// CPU ns per packet (generator excluded) ÷ bounce's.
    pub cpu_over_bounce: Option<f64>,
}

/// A scenario's runs and ratios.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The parameters.
    pub scenario: Scenario,
    /// One per dataplane, in the order run.
    pub runs: Vec<Run>,
    /// Dataplanes not run in this scenario, and why.
    pub skipped: Vec<(Dataplane, String)>,
    /// Per clustergate dataplane run.
    pub ratios: Vec<Ratios>,
}

/// The whole invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// Host facts: kernel, cores.
    pub host: String,
    /// Where each process ran.
    pub placement: String,
    /// Traffic protocol.
    pub proto: Proto,
    /// Address family (4 or 6).
    pub family: Family,
    /// Offered rate (0: as fast as possible).
    pub rate: u64,
    /// Seconds per repetition.
    pub duration_s: f64,
    /// Repetitions.
    pub reps: u32,
    /// Repetitions taken in rounds over the dataplanes (--interleave).
    pub interleave: bool,
    /// Backends.
    pub backends: u32,
    /// Results per scenario.
    pub scenarios: Vec<ScenarioResult>,
}

/// Set by SIGINT/SIGTERM: the run stops between steps and cleans up
/// (children stopped, nftables and sysctls put back, topology removed).
pub(crate) static STOP: std::sync::LazyLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

/// Routes SIGINT and SIGTERM to [`STOP`].
pub(crate) fn catch_signals() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&STOP))
            .context("installing a signal handler")?;
    }
    Ok(())
}

/// Fails once a stop was asked for.
pub(crate) fn check_stop() -> Result<()> {
    ensure!(
        !STOP.load(std::sync::atomic::Ordering::Relaxed),
        "interrupted: stopping and cleaning up"
    );
    Ok(())
}

/// A child process whose stdout carries JSON lines, read by a thread.
pub(crate) struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(Stdio::piped()).stderr(err).stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let out = child.stdout.take().context("child stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines: rx,
        })
    }

    /// The next JSON line whose `event` is `event`, within `timeout`.
    pub(crate) fn event(&mut self, event: &str, timeout: Duration, log: &Path) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            check_stop()?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            if left.is_zero() {
                bail!(
                    "{} gave no {event} within {timeout:?} (log: {})",
                    self.name,
                    log.display()
                );
            }
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["event"] == event {
                            return Ok(v);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().ok();
                    bail!(
                        "{} ended ({}) before its {event} line; its log {}:\n{}",
                        self.name,
                        st.map_or_else(|| "?".into(), |s| s.to_string()),
                        log.display(),
                        tail(log)
                    )
                }
            }
        }
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL.
    pub(crate) fn terminate(&mut self, grace: Duration) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(2));
    }
}

pub(crate) fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// CPU time of all cores from /proc/stat, in clock ticks: (busy, total).
fn cpu_ticks() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = s.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(v.len() >= 8, "unexpected /proc/stat line {line:?}");
    // user nice system idle iowait irq softirq steal; steal is time the
    // hypervisor took, not work done here.
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    Ok((busy, busy + v[3] + v[4]))
}

/// utime + stime of process `pid`, in clock ticks (also readable while it
/// is a zombie, before it is reaped).
fn process_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name can hold spaces; fields after its ')' are fixed.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `GET path` from 127.0.0.1:`port` inside namespace `ns`: (status, body).
pub(crate) fn http_get_in(ns: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let nsfile = format!("/run/netns/{ns}");
    let path = path.to_owned();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(u16, String)> {
            let f = File::open(&nsfile).with_context(|| format!("opening {nsfile}"))?;
            // This thread only: it ends right after.
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("entering {nsfile}"))?;
            let mut st = TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )?;
            st.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                st,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut resp = String::new();
            std::io::Read::read_to_string(&mut st, &mut resp)?;
            let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Ok((status, body.to_owned()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("HTTP thread panicked"))?
    })
}

/// Empties the connection-tracking table of namespace `ns`: ctnetlink's
/// `IPCTNL_MSG_CT_DELETE` with no attribute, what `conntrack -F` sends.
/// Deleting an nftables table leaves its NAT bindings in conntrack, so the
/// next dataplane would forward the same flows with the previous one's NAT
/// (e.g. the kernel's DNAT-only run with kernel-masq's source NAT).
///
/// # Errors
/// The namespace cannot be entered, or the kernel refuses or does not
/// answer within 5 s.
pub(crate) fn flush_conntrack_in(ns: &str) -> Result<()> {
    use rustix::net::{netlink, sockopt, AddressFamily, RecvFlags, SendFlags, SocketType};
    // <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_conntrack.h>.
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    // AF_UNSPEC: both families' entries (the namespace is the bench's).
    const AF_UNSPEC: u8 = 0;
    let nsfile = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            let f = File::open(&nsfile).with_context(|| format!("opening {nsfile}"))?;
            // This thread only: it ends right after.
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("entering {nsfile}"))?;
            let fd = rustix::net::socket(
                AddressFamily::NETLINK,
                SocketType::RAW,
                Some(netlink::NETFILTER),
            )
            .context("opening a netfilter netlink socket")?;
            sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(5)))?;
            // nlmsghdr (len, type, flags, seq, pid), then nfgenmsg (family,
            // version, res_id).
            let mut msg = Vec::with_capacity(20);
            msg.extend_from_slice(&20u32.to_ne_bytes());
            msg.extend_from_slice(
                &((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes(),
            );
            msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
            msg.extend_from_slice(&1u32.to_ne_bytes());
            msg.extend_from_slice(&0u32.to_ne_bytes());
            msg.extend_from_slice(&[AF_UNSPEC, 0, 0, 0]);
            rustix::net::sendto(
                &fd,
                &msg,
                SendFlags::empty(),
                &netlink::SocketAddrNetlink::new(0, 0),
            )
            .context("asking the kernel to flush conntrack")?;
            let mut buf = [0u8; 512];
            let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())
                .context("waiting for the conntrack flush's answer")?;
            ensure!(n >= 20, "short netlink answer ({n} bytes)");
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            ensure!(
                kind == NLMSG_ERROR,
                "netlink answer of type {kind}, not an ack"
            );
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            ensure!(
                err == 0,
                "flushing conntrack: {}",
                std::io::Error::from_raw_os_error(-err)
            );
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("conntrack flush thread panicked"))?
    })
}

/// The manifest: `services` ClusterIP services, each with a UDP and a TCP
/// port 80, every backend an endpoint on 8080.
#[cfg(test)]
#[must_use]
pub fn manifest(services: u32, backends: &[u32], target_port: u16) -> String {
    manifest_with(services, backends, target_port, None)
}

/// [`manifest_with`] of `family` (IPv6: IPv6 cluster IPs and EndpointSlices).
#[must_use]
pub fn manifest_in(family: Family, services: u32, backends: &[u32], target_port: u16) -> String {
    manifest_of(family, services, backends, target_port, None)
}

/// [`manifest`], with service 0's only endpoint `first` (backend, port) when given.
#[cfg(test)]
#[must_use]
pub fn manifest_with(
    services: u32,
    backends: &[u32],
    target_port: u16,
    first: Option<(u32, u16)>,
) -> String {
    manifest_of(Family::V4, services, backends, target_port, first)
}

fn manifest_of(
    family: Family,
    services: u32,
    backends: &[u32],
    target_port: u16,
    first: Option<(u32, u16)>,
) -> String {
    let backend_addr = |i: u32| backend_ip(family, i);
    let vip = |k: u32| vip_ip(family, k);
    let address_type = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let mut y = String::with_capacity(services as usize * (800 + 60 * backends.len()));
    y.push_str("apiVersion: v1\nkind: List\nitems:\n");
    let mut eps = String::new();
    for &i in backends {
        let _ = write!(
            eps,
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
            backend_addr(i)
        );
    }
    for k in 0..services {
        let v = vip(k);
        let (eps, target_port) = match first {
            Some((b, port)) if k == 0 => (
                format!(
                    "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
                    backend_addr(b)
                ),
                port,
            ),
            _ => (eps.clone(), target_port),
        };
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: svc-{k}, namespace: bench}}\n  spec:\n    clusterIP: \"{v}\"\n    clusterIPs: [\"{v}\"]\n    ports:\n    - {{name: u, port: {SERVICE_PORT}, protocol: UDP, targetPort: {target_port}}}\n    - {{name: t, port: {SERVICE_PORT}, protocol: TCP, targetPort: {target_port}}}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: svc-{k}-a\n    namespace: bench\n    labels: {{kubernetes.io/service-name: svc-{k}}}\n  addressType: {address_type}\n  ports:\n  - {{name: u, port: {target_port}, protocol: UDP}}\n  - {{name: t, port: {target_port}, protocol: TCP}}\n  endpoints:\n{eps}"
        );
    }
    y
}

/// kube-proxy's masquerade mark (`--masquerade-bit` 14).
const MASQ_MARK: &str = "0x00004000";
/// The "cluster CIDR" of the masquerade rule: the backends' subnet (the
/// pods), so the client's traffic is from outside the cluster.
const CLUSTER_CIDR: &str = "198.18.2.0/24";

/// The nftables table family and name prefix of `family`: `ip` or `ip6`.
fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// kube-proxy nftables mode's shape for the same services: a verdict map
/// on (VIP, proto, port) jumping to a chain per service port, which picks an
/// endpoint chain with `numgen random`, which DNATs.
///
/// With `masquerade`, also what kube-proxy programs to source-NAT traffic
/// from outside the cluster (pkg/proxy/nftables/proxier.go): the service
/// chain first jumps to `mark-for-masquerade` (`meta mark` |= 0x4000) when
/// `ip saddr != <cluster CIDR>`, and the `masquerading` chain, jumped to
/// from a `nat-postrouting` base chain (priority srcnat), clears the mark and
/// `masquerade fully-random`s marked packets.
#[cfg(test)]
#[must_use]
pub fn nft_ruleset(services: u32, backends: &[u32], proto: Proto, masquerade: bool) -> String {
    nft_ruleset_in(Family::V4, services, backends, proto, masquerade)
}

/// [`nft_ruleset`] of `family`: for IPv6 an `ip6` table, `ipv6_addr` keys,
/// `ip6 daddr`/`ip6 saddr` matches, the backends' IPv6 subnet as the
/// cluster CIDR, and `dnat to [addr]:port`.
#[must_use]
pub fn nft_ruleset_in(
    family: Family,
    services: u32,
    backends: &[u32],
    proto: Proto,
    masquerade: bool,
) -> String {
    let (table, addr_type, ip, cluster_cidr) = match family {
        Family::V4 => ("ip", "ipv4_addr", "ip", CLUSTER_CIDR),
        Family::V6 => ("ip6", "ipv6_addr", "ip6", LAN_NET6),
    };
    let vip = |k: u32| vip_ip(family, k);
    let endpoint = |i: u32| match backend_ip(family, i) {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    };
    let p = proto.name();
    let n = backends.len();
    let mut r = String::with_capacity(services as usize * (300 + 120 * n));
    let _ = writeln!(r, "table {table} clustergate-bench {{");
    let _ = writeln!(
        r,
        "  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict"
    );
    if services > 0 {
        r.push_str("    elements = {\n");
        for k in 0..services {
            let _ = writeln!(
                r,
                "      {} . {p} . {SERVICE_PORT} : goto service-{k},",
                vip(k)
            );
        }
        r.push_str("    }\n");
    }
    r.push_str("  }\n");
    r.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    if masquerade {
        r.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n");
        let _ = writeln!(
            r,
            "  chain mark-for-masquerade {{\n    meta mark set meta mark | {MASQ_MARK}\n  }}"
        );
        let _ = writeln!(
            r,
            "  chain masquerading {{\n    meta mark & {MASQ_MARK} == 0 return\n    meta mark set meta mark ^ {MASQ_MARK}\n    masquerade fully-random\n  }}"
        );
    }
    let _ = writeln!(
        r,
        "  chain services {{\n    {ip} daddr . meta l4proto . th dport vmap @service-ips\n  }}"
    );
    for k in 0..services {
        let _ = writeln!(r, "  chain service-{k} {{");
        if masquerade {
            let _ = writeln!(
                r,
                "    {ip} daddr {} {p} dport {SERVICE_PORT} {ip} saddr != {cluster_cidr} jump mark-for-masquerade",
                vip(k)
            );
        }
        let _ = write!(r, "    numgen random mod {n} vmap {{ ");
        for (j, _) in backends.iter().enumerate() {
            let _ = write!(
                r,
                "{j} : goto endpoint-{k}-{j}{}",
                if j + 1 < n { ", " } else { "" }
            );
        }
        r.push_str(" }\n  }\n");
        for (j, &i) in backends.iter().enumerate() {
            let _ = writeln!(
                r,
                "  chain endpoint-{k}-{j} {{\n    meta l4proto {p} dnat to {}:{BACKEND_PORT}\n  }}",
                endpoint(i)
            );
        }
    }
    r.push_str("}\n");
    r
}

pub(crate) struct Bins {
    pub(crate) gateway: PathBuf,
    pub(crate) control: PathBuf,
    pub(crate) bench: PathBuf,
}

impl Bins {
    pub(crate) fn find(dir: Option<&Path>) -> Result<Self> {
        let bench = std::env::current_exe().context("locating clustergate-bench")?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => bench.parent().context("binary directory")?.to_path_buf(),
        };
        let gateway = dir.join("clustergate");
        let control = dir.join("clustergate-control");
        for b in [&gateway, &control] {
            ensure!(
                b.exists(),
                "{} not found: build it (`cargo build --release --bins`) or pass --bin-dir",
                b.display()
            );
        }
        Ok(Self {
            gateway,
            control,
            bench,
        })
    }
}

/// What is running for one dataplane.
struct Running {
    procs: Vec<Proc>,
    /// For the kernel: the nft table to delete at the end.
    nft: bool,
    metrics_port: Option<u16>,
    /// nf_conntrack_max to put back at the end.
    restore_ct_max: Option<u64>,
    /// What the sinks are told to check (`--return-path` and its details).
    sink_args: Vec<String>,
}

impl Running {
    fn new(dp: Dataplane, services: u32) -> Self {
        let path = dp.sink_path();
        let mut sink_args = vec!["--return-path".to_owned(), path.name().to_owned()];
        match path {
            ReturnPath::Snat => {
                let (lo, hi) = KERNEL_MASQ_PORTS;
                sink_args.extend(["--snat-ports".to_owned(), format!("{lo}-{hi}")]);
            }
            ReturnPath::Dsr => {
                sink_args.extend(["--services".to_owned(), services.to_string()]);
            }
            ReturnPath::Routed => {}
        }
        Self {
            procs: Vec::new(),
            nft: false,
            metrics_port: None,
            restore_ct_max: None,
            sink_args,
        }
    }

    /// The sinks check source ports against `lo..=hi`.
    fn set_snat_ports(&mut self, lo: u16, hi: u16) {
        if let Some(i) = self.sink_args.iter().position(|a| a == "--snat-ports") {
            self.sink_args[i + 1] = format!("{lo}-{hi}");
        }
    }
}

/// The gateway's SNAT range as its `/metrics` says (the union of the
/// workers' shares): `clustergate_snat_ports{…,lo="A",hi="B"}` lines.
pub(crate) fn snat_range_from_metrics(text: &str) -> Option<(u16, u16)> {
    let label = |l: &str, k: &str| -> Option<u16> {
        let at = l.find(&format!("{k}=\""))? + k.len() + 2;
        l[at..].split('"').next()?.parse().ok()
    };
    text.lines()
        .filter(|l| l.starts_with("clustergate_snat_ports{"))
        .filter_map(|l| Some((label(l, "lo")?, label(l, "hi")?)))
        .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
}

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The sysctl that turns the kernel's forwarding of `family` on.
fn forwarding_sysctl(family: Family) -> &'static str {
    match family {
        Family::V4 => "net.ipv4.ip_forward",
        Family::V6 => "net.ipv6.conf.all.forwarding",
    }
}

struct Ctx<'a> {
    args: &'a Args,
    topo: Topology,
    bins: Bins,
    out: PathBuf,
    backends: Vec<u32>,
}

impl Ctx<'_> {
    fn in_ns(&self, role: &str, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.topo.ns(role)]).arg(prog);
        c
    }

    fn log(&self, name: &str) -> PathBuf {
        self.out.join("logs").join(format!("{name}.log"))
    }

    /// Cores for `w` workers on this machine and the pktgen's (one per queue).
    fn placement(&self, w: u32) -> (String, String) {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as u32;
        // Workers on the last cores, pktgen queues on the first ones: with two
        // cores and one worker, pktgen on cpu0 and the worker on cpu1.
        let workers: Vec<String> = (0..w)
            .map(|i| ((cores - 1 + cores - (i % cores)) % cores).to_string())
            .collect();
        let gen: Vec<String> = (0..w).map(|i| (i % cores).to_string()).collect();
        (workers.join(","), gen.join(","))
    }

    /// Starts `dp`, warms it up, measures repetitions `first..first + n`,
    /// stops it: (repetitions, seconds to start, gateway drop counters).
    fn session(
        &self,
        dp: Dataplane,
        sc: &Scenario,
        tag: &str,
        first: u32,
        n: u32,
    ) -> Result<(Vec<Rep>, f64, std::collections::BTreeMap<String, f64>)> {
        let args = self.args;
        let t = Instant::now();
        let running = self.start(dp, sc, tag)?;
        let setup_s = t.elapsed().as_secs_f64();
        let measured = (|| -> Result<Vec<Rep>> {
            // Warm-up: neighbours resolved, caches and conntrack warm.
            self.rep(sc, &running, &format!("{tag}-warmup"), 0.3, 10_000)?;
            let mut reps = Vec::new();
            for r in first..first + n {
                check_stop()?;
                let rep = self.rep(
                    sc,
                    &running,
                    &format!("{tag}-r{r}"),
                    args.duration_s,
                    args.rate,
                )?;
                progress(&format!(
                    "    rep {}: offered {:.0} pps, forwarded {:.0} pps, loss {:.2} %, p99 {:.0} µs, {:.0} CPU ns/pkt",
                    r + 1,
                    rep.offered_pps,
                    rep.forwarded_pps,
                    rep.loss * 100.0,
                    rep.p99_us,
                    rep.cpu_ns_per_pkt
                ));
                reps.push(rep);
            }
            Ok(reps)
        })();
        let drops = running
            .metrics_port
            .map(|p| self.gateway_drops(p))
            .unwrap_or_default();
        self.stop(running);
        Ok((measured?, setup_s, drops))
    }

    /// Waits (at most 10 s) until the gateway namespace has a link-layer
    /// address for every backend on g1.
    fn wait_neighbours(&self) -> Result<()> {
        let gw = self.topo.ns("gw");
        let t = Instant::now();
        loop {
            check_stop()?;
            let fam = match self.args.family {
                Family::V4 => "-4",
                Family::V6 => "-6",
            };
            let out = Command::new("ip")
                .args(["-n", &gw, fam, "neigh", "show", "dev", "g1"])
                .output()
                .context("listing the gateway's neighbours")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let missing: Vec<String> = self
                .backends
                .iter()
                .map(|&i| backend_ip(self.args.family, i).to_string())
                .filter(|a| {
                    !text.lines().any(|l| {
                        l.split_whitespace().next() == Some(a.as_str()) && l.contains(" lladdr ")
                    })
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "the gateway namespace has no neighbour entry for {} after 10 s:\n{text}",
                missing.join(", ")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Why `dp` cannot run scenario `sc`, if it cannot: a source-NAT
    /// dataplane has one address, so a port space per backend.
    fn cannot_carry(&self, dp: Dataplane, sc: &Scenario) -> Result<Option<String>> {
        let ports = match dp {
            Dataplane::KernelMasq => u32::from(KERNEL_MASQ_PORTS.1 - KERNEL_MASQ_PORTS.0) + 1,
            Dataplane::ClustergateSnat => {
                let local = self.gw_local_ports()?;
                clustergate_dataplane::snat::default_range(local).len()
            }
            _ => return Ok(None),
        };
        let cap = snat_capacity(self.args.backends, ports);
        Ok((u64::from(sc.flows) > cap).then(|| {
            format!(
                "{} flows do not fit one SNAT address's ports ({} backends × {ports} ports, of which three quarters: {cap} flows)",
                sc.flows, self.args.backends
            )
        }))
    }

    /// The gateway namespace's `ip_local_port_range`, from which
    /// `clustergate run` chooses its default SNAT range.
    fn gw_local_ports(&self) -> Result<clustergate_dataplane::snat::PortRange> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.topo.ns("gw"), "cat"])
            .arg("/proc/sys/net/ipv4/ip_local_port_range")
            .output()
            .context("reading the gateway namespace's ip_local_port_range")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        match (it.next(), it.next()) {
            (Some(Ok(lo)), Some(Ok(hi))) => clustergate_dataplane::snat::PortRange::new(lo, hi)
                .with_context(|| format!("ip_local_port_range {lo} {hi}")),
            _ => bail!("ip_local_port_range: unexpected {text:?}"),
        }
    }

    fn start(&self, dp: Dataplane, sc: &Scenario, tag: &str) -> Result<Running> {
        let (worker_cores, _) = self.placement(sc.workers);
        let mut run = Running::new(dp, sc.services);
        match dp {
            Dataplane::ClustergateSnat
            | Dataplane::ClustergateRouted
            | Dataplane::ClustergateDsr => {
                let path = dp.clustergate_path().unwrap_or(ReturnPath::Snat);
                let dir = self.out.join(format!("run-{tag}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                let m = dir.join("manifest.yaml");
                std::fs::write(
                    &m,
                    manifest_in(self.args.family, sc.services, &self.backends, BACKEND_PORT),
                )?;
                let shm = dir.join("shm");
                let mut c = Command::new(&self.bins.control);
                c.arg("run")
                    .arg("--manifest")
                    .arg(&m)
                    .arg("--shm-dir")
                    .arg(&shm)
                    .args(["--return-path", path.name()])
                    .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"]);
                let control = Proc::spawn(
                    "clustergate-control",
                    c,
                    &self.log(&format!("control-{tag}")),
                )?;
                let port = 10257;
                let mut g = self.in_ns("gw", &self.bins.gateway);
                g.args(["run", "--interface", "g0", "--interface", "g1", "--shm-dir"])
                    .arg(&shm)
                    .args([
                        "--cores",
                        &worker_cores,
                        "--queues",
                        &sc.workers.to_string(),
                    ])
                    .args(["--metrics", &format!("127.0.0.1:{port}")])
                    .args(["--flows", &(sc.flows.max(65_536) * 2).to_string()])
                    .args(["--zero-copy", "never", "--exit-after-s", "3600"]);
                if self.args.family == Family::V6 {
                    // The gateway's own IPv6 address on the backend side:
                    // the SNAT source and DSR's outer source.
                    g.args(["--snat-address", &gw_lan_ip(Family::V6).to_string()]);
                }
                if path == ReturnPath::Dsr {
                    // The backend LAN has room for the outer header (the
                    // default would be the smaller client side's MTU).
                    g.args(["--encap-mtu", &LAN_MTU.to_string()]);
                }
                let gateway = Proc::spawn("clustergate", g, &self.log(&format!("gateway-{tag}")))?;
                run.procs = vec![control, gateway];
                run.metrics_port = Some(port);
                let r = &mut run;
                let t = Instant::now();
                loop {
                    check_stop()?;
                    if let Ok((200, _)) = http_get_in(&self.topo.ns("gw"), port, "/healthz") {
                        break;
                    }
                    if let Ok(Some(st)) = r.procs[1].child.try_wait() {
                        bail!(
                            "clustergate exited ({st}):\n{}",
                            tail(&self.log(&format!("gateway-{tag}")))
                        );
                    }
                    ensure!(
                        t.elapsed() < Duration::from_secs(60),
                        "clustergate not healthy after 60 s; log {}",
                        self.log(&format!("gateway-{tag}")).display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                if path == ReturnPath::Snat {
                    // The range the gateway chose (its default, from the
                    // namespace's ip_local_port_range), as it exports it.
                    let (status, text) = http_get_in(&self.topo.ns("gw"), port, "/metrics")?;
                    let (lo, hi) = snat_range_from_metrics(&text)
                        .filter(|_| status == 200)
                        .context("the gateway's /metrics has no clustergate_snat_ports")?;
                    r.set_snat_ports(lo, hi);
                }
                // The gateway asks the kernel to resolve its backends when a
                // table arrives; that took up to about 1 s here (an ARP
                // retransmit), longer than the warm-up, and the first
                // repetition then lost frames as next_hop_no_neighbour.
                self.wait_neighbours()?;
                Ok(run)
            }
            Dataplane::Kernel | Dataplane::KernelMasq => {
                let path = self.out.join(format!("nft-{tag}.nft"));
                std::fs::write(
                    &path,
                    nft_ruleset_in(
                        self.args.family,
                        sc.services,
                        &self.backends,
                        self.args.proto,
                        dp == Dataplane::KernelMasq,
                    ),
                )?;
                let gw = self.topo.ns("gw");
                let _ = self.topo.run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &gw,
                        "nft",
                        "delete",
                        "table",
                        nft_family(self.args.family),
                        "clustergate-bench",
                    ],
                );
                // No NAT binding of an earlier run may apply to this one's flows.
                flush_conntrack_in(&gw)?;
                let p = path.to_string_lossy().into_owned();
                self.topo
                    .run("ip", &["netns", "exec", &gw, "nft", "-f", &p])
                    .context(
                        "loading the nftables ruleset (scripts/install-deps.sh installs nftables)",
                    )?;
                self.topo
                    .sysctl(&gw, forwarding_sysctl(self.args.family), "1")?;
                // Room for every flow in conntrack (kube-proxy sizes it per core;
                // here the kernel gets at least twice the flows, like the gateway).
                let mut restore_ct_max = None;
                if let Some(cur) = std::fs::read_to_string(CT_MAX)
                    .ok()
                    .and_then(|c| c.trim().parse::<u64>().ok())
                {
                    let want = u64::from(sc.flows) * 2;
                    if cur < want {
                        std::fs::write(CT_MAX, want.to_string())
                            .with_context(|| format!("raising {CT_MAX} to {want}"))?;
                        restore_ct_max = Some(cur);
                    }
                }
                // veth receive runs on the core that transmitted (the
                // generator's); RPS moves the kernel's DNAT and forwarding to
                // the worker cores, as the AF_XDP dataplanes get theirs.
                for (q, core) in worker_cores.split(',').enumerate() {
                    let mask = 1u64 << core.parse::<u32>().unwrap_or(0).min(63);
                    self.set_rps(q, &format!("{mask:x}"))?;
                }
                run.nft = true;
                run.restore_ct_max = restore_ct_max;
                Ok(run)
            }
            Dataplane::Bounce => {
                let mut b = self.in_ns("gw", &self.bins.bench);
                b.args(["bounce", "--in", "g0", "--out", "g1"])
                    .args([
                        "--queues",
                        &sc.workers.to_string(),
                        "--cores",
                        &worker_cores,
                    ])
                    .args(["--backends", &self.backends.len().to_string()])
                    .args([
                        "--services",
                        &sc.services.to_string(),
                        "--exit-after-s",
                        "3600",
                    ])
                    .args(["--family", &self.args.family.number().to_string()]);
                let log = self.log(&format!("bounce-{tag}"));
                let mut p = Proc::spawn("bounce", b, &log)?;
                p.event("ready", Duration::from_secs(60), &log)?;
                run.procs = vec![p];
                Ok(run)
            }
        }
    }

    /// Writes `mask` (hex) to g0's rx queue `q` rps_cpus.
    fn set_rps(&self, q: usize, mask: &str) -> Result<()> {
        let gw = self.topo.ns("gw");
        let script = format!("echo {mask} > /sys/class/net/g0/queues/rx-{q}/rps_cpus");
        self.topo
            .run("ip", &["netns", "exec", &gw, "sh", "-c", &script])
            .context("setting RPS for the kernel dataplane")
    }

    fn stop(&self, mut r: Running) {
        // Gateway before control (reverse order of start).
        while let Some(mut p) = r.procs.pop() {
            p.terminate(Duration::from_secs(5));
        }
        let gw = self.topo.ns("gw");
        if r.nft {
            for q in 0..self.topo.shape.workers as usize {
                let _ = self.set_rps(q, "0");
            }
            let _ = self.topo.run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &gw,
                    "nft",
                    "delete",
                    "table",
                    nft_family(self.args.family),
                    "clustergate-bench",
                ],
            );
            // Its NAT bindings would outlive the table.
            if let Err(e) = flush_conntrack_in(&gw) {
                eprintln!("warning: {e:#}");
            }
        }
        let _ = self
            .topo
            .sysctl(&gw, forwarding_sysctl(self.args.family), "0");
        if let Some(v) = r.restore_ct_max {
            let _ = std::fs::write(CT_MAX, v.to_string());
        }
    }

    /// One repetition: sinks up, pktgen for the duration, sinks down.
    fn rep(
        &self,
        sc: &Scenario,
        running: &Running,
        tag: &str,
        duration_s: f64,
        rate: u64,
    ) -> Result<Rep> {
        let mut sinks = Vec::new();
        for &i in &self.backends {
            let mut c = self.in_ns(&format!("b{i}"), &self.bins.bench);
            c.args(["sink", "--iface", "e0", "--backend", &i.to_string()])
                .args(&running.sink_args)
                .args(["--gateway-addr", &gw_lan_ip(self.args.family).to_string()])
                .args(["--family", &self.args.family.number().to_string()])
                .args([
                    "--ports",
                    &BACKEND_PORT.to_string(),
                    "--flows",
                    &sc.flows.to_string(),
                ])
                .args(["--duration-s", &format!("{}", (duration_s + 60.0).ceil())]);
            let log = self.log(&format!("sink-b{i}-{tag}"));
            sinks.push((Proc::spawn(&format!("sink b{i}"), c, &log)?, log));
        }
        for (p, log) in &mut sinks {
            p.event("ready", Duration::from_secs(30), log)?;
        }
        let (_, gen_cores) = self.placement(sc.workers);
        let queues: Vec<String> = (0..sc.workers).map(|q| q.to_string()).collect();
        let mut g = self.in_ns("cli", &self.bins.bench);
        g.args([
            "pktgen",
            "--iface",
            "c0",
            "--queues",
            &queues.join(","),
            "--cores",
            &gen_cores,
        ])
        .args([
            "--services",
            &sc.services.to_string(),
            "--flows",
            &sc.flows.to_string(),
        ])
        .args([
            "--proto",
            self.args.proto.name(),
            "--frame-size",
            &sc.frame_size.to_string(),
            "--family",
            &self.args.family.number().to_string(),
        ])
        .args([
            "--rate",
            &rate.to_string(),
            "--duration-s",
            &duration_s.to_string(),
        ]);
        let glog = self.log(&format!("pktgen-{tag}"));
        let cpu0 = cpu_ticks()?;
        let mut gen = Proc::spawn("pktgen", g, &glog)?;
        let result = gen.event("result", Duration::from_secs_f64(duration_s + 30.0), &glog)?;
        // Frames still in the gateway's rings arrive within this.
        std::thread::sleep(Duration::from_millis(300));
        let cpu1 = cpu_ticks()?;
        // It has exited (or is about to) but is not reaped yet: its times stay.
        let gen_ticks = process_ticks(gen.child.id()).unwrap_or(0);
        let mut rep = Rep {
            sent: result["sent"].as_u64().unwrap_or(0),
            elapsed_s: result["elapsed_s"].as_f64().unwrap_or(0.0),
            ..Rep::default()
        };
        let mut hist: Histogram<u64> = Histogram::new(3).context("histogram")?;
        for (p, log) in &mut sinks {
            p.terminate_soft();
            let v = p.event("result", Duration::from_secs(10), log)?;
            let n = v["received"].as_u64().unwrap_or(0);
            rep.received += n;
            rep.per_backend.push(n);
            rep.reordered += v["reordered"].as_u64().unwrap_or(0);
            rep.duplicates += v["duplicates"].as_u64().unwrap_or(0);
            rep.sink_dropped += v["rings"]["rx_dropped"].as_u64().unwrap_or(0)
                + v["rings"]["rx_ring_full"].as_u64().unwrap_or(0);
            if let Some(bad) = v["bad"].as_object() {
                for (k, n) in bad {
                    *rep.bad.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
            if let Some(b) = v["latency_ns"].as_array() {
                for pair in b {
                    if let (Some(val), Some(cnt)) = (pair[0].as_u64(), pair[1].as_u64()) {
                        let _ = hist.record_n(val.max(1), cnt);
                    }
                }
            }
        }
        let secs = rep.elapsed_s.max(1e-9);
        rep.offered_pps = rep.sent as f64 / secs;
        rep.forwarded_pps = rep.received as f64 / secs;
        rep.loss = if rep.sent > 0 {
            1.0 - rep.received.min(rep.sent) as f64 / rep.sent as f64
        } else {
            0.0
        };
        if !hist.is_empty() {
            rep.p50_us = hist.value_at_quantile(0.5) as f64 / 1e3;
            rep.p99_us = hist.value_at_quantile(0.99) as f64 / 1e3;
            rep.p999_us = hist.value_at_quantile(0.999) as f64 / 1e3;
        }
        let tick = rustix::param::clock_ticks_per_second() as f64;
        rep.cpu_s = cpu1.0.saturating_sub(cpu0.0) as f64 / tick;
        rep.pktgen_cpu_s = gen_ticks as f64 / tick;
        if rep.received > 0 {
            rep.cpu_ns_per_pkt =
                (rep.cpu_s - rep.pktgen_cpu_s).max(0.0) * 1e9 / rep.received as f64;
            rep.host_cpu_ns_per_pkt = rep.cpu_s * 1e9 / rep.received as f64;
        }
        let (lo, hi) = (
            rep.per_backend.iter().copied().min().unwrap_or(0),
            rep.per_backend.iter().copied().max().unwrap_or(0),
        );
        rep.spread = if lo > 0 {
            hi as f64 / lo as f64
        } else {
            f64::INFINITY
        };
        Ok(rep)
    }

    fn gateway_drops(&self, port: u16) -> std::collections::BTreeMap<String, f64> {
        let mut m = std::collections::BTreeMap::new();
        if let Ok((200, text)) = http_get_in(&self.topo.ns("gw"), port, "/metrics") {
            for l in text.lines().filter(|l| !l.starts_with('#')) {
                let Some((name, value)) = l.rsplit_once(' ') else {
                    continue;
                };
                let base = name.split('{').next().unwrap_or(name);
                if base.contains("drop")
                    || base.contains("unresolved")
                    || base.contains("tx_ring_full")
                {
                    if let Ok(v) = value.parse::<f64>() {
                        if v > 0.0 {
                            *m.entry(name.to_owned()).or_default() += v;
                        }
                    }
                }
            }
        }
        m
    }
}

impl Proc {
    /// The exit status, if it has exited.
    pub(crate) fn child_status(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGTERM without waiting: the process prints its result and exits.
    pub(crate) fn terminate_soft(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// Runs `clustergate-bench compare`.
///
/// # Errors
/// Bad flags, not root, a dataplane that does not start, or a failed sink
/// check (after the report is printed).
pub fn run(args: &Args) -> Result<()> {
    let mut args = args.clone();
    args.validate()?;
    ensure!(
        rustix::process::geteuid().is_root(),
        "clustergate-bench compare needs root (namespaces, XDP, AF_XDP)"
    );
    let bins = Bins::find(args.bin_dir.as_deref())?;
    catch_signals()?;
    std::fs::create_dir_all(args.out.join("logs"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let max_workers = args.workers.iter().copied().max().unwrap_or(1);
    let topo = Topology::new(
        Shape {
            prefix: args.prefix.clone(),
            backends: args.backends,
            workers: max_workers,
        },
        false,
    );
    progress(&format!(
        "topology {} up ({} backends, {} queues)",
        args.prefix, args.backends, max_workers
    ));
    topo.up()?;
    let ctx = Ctx {
        args: &args,
        topo,
        bins,
        out: args.out.clone(),
        backends: (1..=args.backends).collect(),
    };
    let result = measure(&ctx);
    if !args.keep_topology {
        progress("topology down");
        let _ = ctx.topo.down();
    }
    let report = result?;
    let md = markdown(&report);
    print!("{md}");
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    if let Err(e) = crate::chart::svg(&report, &args.out.join("chart.svg")) {
        eprintln!("warning: no chart: {e:#}");
    }
    progress(&format!("results in {}", args.out.display()));
    let failures: Vec<String> = report
        .scenarios
        .iter()
        .flat_map(|s| s.runs.iter().flat_map(Run::failures))
        .collect();
    if !failures.is_empty() {
        bail!("correctness checks failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

pub(crate) fn progress(msg: &str) {
    eprintln!("== {msg}");
}

fn measure(ctx: &Ctx<'_>) -> Result<Report> {
    let args = ctx.args;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut scenarios = Vec::new();
    for &frame_size in &args.frame_sizes {
        for &flows in &args.flows {
            for &services in &args.services {
                for &workers in &args.workers {
                    scenarios.push(Scenario {
                        frame_size,
                        flows,
                        services,
                        workers,
                    });
                }
            }
        }
    }
    let mut results = Vec::new();
    for (si, sc) in scenarios.iter().enumerate() {
        let mut skipped = Vec::new();
        let mut order = Vec::new();
        for &dp in &args.dataplanes {
            if let Some(why) = ctx.cannot_carry(dp, sc)? {
                progress(&format!(
                    "[{}/{}] {}: {} — skipped: {why}",
                    si + 1,
                    scenarios.len(),
                    sc.label(),
                    dp.name()
                ));
                skipped.push((dp, why));
            } else {
                order.push(dp);
            }
        }
        // Without --interleave, each dataplane runs all its repetitions in
        // one go; with it, each round runs every dataplane for one.
        let (rounds, per_round) = if args.interleave {
            (args.reps, 1)
        } else {
            (1, args.reps)
        };
        let mut runs: Vec<Run> = Vec::new();
        for round in 0..rounds {
            for &dp in &order {
                let tag = if args.interleave {
                    format!("s{si}-{}-round{round}", dp.name())
                } else {
                    format!("s{si}-{}", dp.name())
                };
                progress(&format!(
                    "[{}/{}] {}: {} — starting{}",
                    si + 1,
                    scenarios.len(),
                    sc.label(),
                    dp.name(),
                    if args.interleave {
                        format!(" (round {}/{rounds})", round + 1)
                    } else {
                        String::new()
                    }
                ));
                let first = round * per_round;
                let (reps, setup_s, drops) = ctx.session(dp, sc, &tag, first, per_round)?;
                match runs.iter_mut().find(|r| r.dataplane == dp) {
                    Some(run) => {
                        let mut all = std::mem::take(&mut run.reps);
                        all.extend(reps);
                        let (setup, mut sum) =
                            (run.setup_s, std::mem::take(&mut run.gateway_drops));
                        for (k, v) in drops {
                            *sum.entry(k).or_default() += v;
                        }
                        *run = Run::new(dp, all, setup);
                        run.gateway_drops = sum;
                    }
                    None => {
                        let mut run = Run::new(dp, reps, setup_s);
                        run.gateway_drops = drops;
                        runs.push(run);
                    }
                }
            }
        }
        let ratios = ratios_of(&runs);
        results.push(ScenarioResult {
            scenario: *sc,
            runs,
            skipped,
            ratios,
        });
    }
    let (w1, g1) = ctx.placement(1);
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host: format!("Linux {}, {cores} cores", kernel.trim()),
        placement: format!(
            "1 worker: gateway/bounce worker on cpu{w1}, pktgen on cpu{g1}; sinks and softirq unpinned; with W workers, worker i and pktgen queue i on distinct cores where possible"
        ),
        proto: args.proto,
        family: args.family,
        rate: args.rate,
        duration_s: args.duration_s,
        reps: args.reps,
        interleave: args.interleave,
        backends: args.backends,
        scenarios: results,
    })
}

/// Each clustergate run's ratios to its kernel baseline and to bounce (the
/// medians of the same scenario; `None` where the other was not run).
fn ratios_of(runs: &[Run]) -> Vec<Ratios> {
    let med = |d: Dataplane, f: fn(&Run) -> f64| runs.iter().find(|r| r.dataplane == d).map(f);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let fwd = |r: &Run| r.forwarded_pps.median;
    let cpu = |r: &Run| r.cpu_ns_per_pkt.median;
    let host_cpu = |r: &Run| r.host_cpu_ns_per_pkt.median;
    runs.iter()
        .filter_map(|r| Some((r.dataplane, r.dataplane.baseline()?)))
        .map(|(d, b)| Ratios {
            dataplane: d,
            baseline: b,
            pps_over_baseline: ratio(med(d, fwd), med(b, fwd)),
            cpu_over_baseline: ratio(med(d, cpu), med(b, cpu)),
            host_cpu_over_baseline: ratio(med(d, host_cpu), med(b, host_cpu)),
            pps_over_bounce: ratio(med(d, fwd), med(Dataplane::Bounce, fwd)),
            cpu_over_bounce: ratio(med(d, cpu), med(Dataplane::Bounce, cpu)),
        })
        .collect()
}

fn fmt_stat(s: &Stat, scale: f64, prec: usize) -> String {
    format!(
        "{:.prec$} ({:.prec$}–{:.prec$})",
        s.median * scale,
        s.min * scale,
        s.max * scale
    )
}

/// The report as Markdown tables.
#[must_use]
pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "\n### clustergate-bench compare\n");
    let _ =
        writeln!(
        m,
        "{}; IPv{} {} traffic, {} backends, {} s × {} repetitions{}, offered rate {}. Median (min–max).\n",
        r.host,
        r.family.number(),
        r.proto.name().to_uppercase(),
        r.backends,
        r.duration_s,
        r.reps,
        if r.interleave { " (in rounds over the dataplanes)" } else { "" },
        if r.rate == 0 { "as fast as possible".to_owned() } else { format!("{} pps", r.rate) }
    );
    for s in &r.scenarios {
        let _ = writeln!(m, "#### {}\n", s.scenario.label());
        let _ = writeln!(m, "| dataplane | offered kpps | forwarded kpps | loss % | sink drops | p50 µs | p99 µs | p99.9 µs | CPU ns/pkt (w/o pktgen) | host CPU ns/pkt | backend spread | failed checks |");
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for run in &s.runs {
            let bad: u64 = run.reps.iter().flat_map(|r| r.bad.values()).sum();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {} |",
                run.dataplane.name(),
                fmt_stat(&run.offered_pps, 1e-3, 0),
                fmt_stat(&run.forwarded_pps, 1e-3, 0),
                fmt_stat(&run.loss, 100.0, 2),
                run.sink_dropped.median,
                fmt_stat(&run.p50_us, 1.0, 0),
                fmt_stat(&run.p99_us, 1.0, 0),
                fmt_stat(&run.p999_us, 1.0, 0),
                fmt_stat(&run.cpu_ns_per_pkt, 1.0, 0),
                fmt_stat(&run.host_cpu_ns_per_pkt, 1.0, 0),
                run.spread.median,
                bad
            );
        }
        for (d, why) in &s.skipped {
            let _ = writeln!(m, "\n{} not run: {why}", d.name());
        }
        if !s.ratios.is_empty() {
            let x = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(m, "\n| ratios (medians) | baseline | pps ÷ baseline | CPU/pkt ÷ baseline (w/o pktgen / host) | pps ÷ bounce | CPU/pkt ÷ bounce (w/o pktgen) |");
            let _ = writeln!(m, "|---|---|---|---|---|---|");
            for r in &s.ratios {
                let _ = writeln!(
                    m,
                    "| {} | {} | **{}** | **{}** / {} | {} | {} |",
                    r.dataplane.name(),
                    r.baseline.name(),
                    x(r.pps_over_baseline),
                    x(r.cpu_over_baseline),
                    x(r.host_cpu_over_baseline),
                    x(r.pps_over_bounce),
                    x(r.cpu_over_bounce),
                );
            }
        }
        let _ = writeln!(m);
        for run in &s.runs {
            if !run.gateway_drops.is_empty() {
                let d: Vec<String> = run
                    .gateway_drops
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                let _ = writeln!(
                    m,
                    "{} gateway drop counters: {}\n",
                    run.dataplane.name(),
                    d.join(", ")
                );
            }
        }
    }
    let _ = writeln!(m, "Placement: {}.", r.placement);
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    #[test]
    fn nft_ruleset_has_kube_proxy_shape() {
        let r = nft_ruleset(2, &[1, 2, 3], Proto::Udp, false);
        assert!(r.contains("198.19.0.1 . udp . 80 : goto service-1,"), "{r}");
        assert!(r.contains("numgen random mod 3 vmap { 0 : goto endpoint-1-0, 1 : goto endpoint-1-1, 2 : goto endpoint-1-2 }"), "{r}");
        assert!(
            r.contains("meta l4proto udp dnat to 198.18.2.13:8080"),
            "{r}"
        );
        assert!(
            r.contains("type nat hook prerouting priority dstnat"),
            "{r}"
        );
    }

    #[test]
    fn masquerade_is_what_kube_proxy_programs() {
        let r = nft_ruleset(2, &[1, 2], Proto::Udp, true);
        for want in [
            "type nat hook postrouting priority srcnat",
            "jump masquerading",
            "meta mark set meta mark | 0x00004000",
            "meta mark & 0x00004000 == 0 return",
            "meta mark set meta mark ^ 0x00004000",
            "masquerade fully-random",
            "ip daddr 198.19.0.1 udp dport 80 ip saddr != 198.18.2.0/24 jump mark-for-masquerade",
        ] {
            assert!(r.contains(want), "{want:?} missing:\n{r}");
        }
        // The mark comes before the endpoint pick, as in kube-proxy.
        let svc = &r[r.find("chain service-1 {").unwrap()..];
        assert!(svc.find("mark-for-masquerade").unwrap() < svc.find("numgen").unwrap());
        let plain = nft_ruleset(2, &[1, 2], Proto::Udp, false);
        assert!(!plain.contains("masquerade") && !plain.contains("postrouting"));
    }

    #[test]
    fn every_clustergate_path_has_its_baseline() {
        use Dataplane as D;
        assert_eq!(D::ClustergateSnat.baseline(), Some(D::KernelMasq));
        assert_eq!(D::ClustergateRouted.baseline(), Some(D::Kernel));
        assert_eq!(D::ClustergateDsr.baseline(), Some(D::Kernel));
        assert_eq!(D::Bounce.baseline(), None);
        assert_eq!(D::KernelMasq.sink_path(), ReturnPath::Snat);
        assert_eq!(D::ClustergateDsr.sink_path(), ReturnPath::Dsr);
        assert_eq!(D::Bounce.sink_path(), ReturnPath::Routed);
        let run = |d: D, pps: f64, cpu: f64| {
            let mut r = Run::new(d, Vec::new(), 0.0);
            r.forwarded_pps.median = pps;
            r.cpu_ns_per_pkt.median = cpu;
            r.host_cpu_ns_per_pkt.median = cpu;
            r
        };
        let runs = [
            run(D::ClustergateSnat, 200.0, 300.0),
            run(D::KernelMasq, 100.0, 600.0),
            run(D::ClustergateDsr, 300.0, 100.0),
            run(D::Bounce, 400.0, 50.0),
        ];
        let r = ratios_of(&runs);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dataplane, D::ClustergateSnat);
        assert_eq!(r[0].pps_over_baseline, Some(2.0));
        assert_eq!(r[0].cpu_over_baseline, Some(0.5));
        assert_eq!(r[0].pps_over_bounce, Some(0.5));
        assert_eq!(r[0].cpu_over_bounce, Some(6.0));
        assert_eq!((r[1].baseline, r[1].pps_over_baseline), (D::Kernel, None));
        assert_eq!(r[1].pps_over_bounce, Some(0.75));
    }

    #[test]
    fn snat_range_is_read_from_the_gateways_metrics() {
        let text = "# TYPE clustergate_snat_ports gauge\n\
            clustergate_snat_ports{proxy_name=\"cg\",worker=\"1\",lo=\"15512\",hi=\"29999\"} 14488\n\
            clustergate_snat_ports{proxy_name=\"cg\",worker=\"0\",lo=\"1024\",hi=\"15511\"} 14488\n\
            clustergate_snat_ports_other 3\n";
        assert_eq!(snat_range_from_metrics(text), Some((1024, 29_999)));
        assert_eq!(snat_range_from_metrics("x 1\n"), None);
        assert_eq!(snat_capacity(4, 28_976), 86_928);
    }

    #[test]
    fn manifest_is_what_control_reads() {
        let m = manifest(2, &[1, 2], 8080);
        assert_eq!(m.matches("kind: Service\n").count(), 2);
        assert!(m.contains("clusterIP: \"198.19.0.1\"\n"));
        assert!(m.contains("- addresses: [\"198.18.2.12\"]"));
        assert!(m.contains("addressType: IPv4\n"));
        let m = manifest_in(Family::V6, 2, &[1, 2], 8080);
        assert!(m.contains("clusterIP: \"2001:2:0:100::2\"\n"), "{m}");
        assert!(m.contains("- addresses: [\"2001:2:0:2::c\"]"), "{m}");
        assert!(m.contains("addressType: IPv6\n"));
        assert!(!m.contains("198."));
    }

    #[test]
    fn ipv6_ruleset_is_an_ip6_table() {
        let r = nft_ruleset_in(Family::V6, 2, &[1, 2], Proto::Udp, true);
        assert!(r.starts_with("table ip6 clustergate-bench {\n"), "{r}");
        assert!(r.contains("type ipv6_addr . inet_proto . inet_service : verdict"));
        assert!(
            r.contains("2001:2:0:100::1 . udp . 80 : goto service-0,"),
            "{r}"
        );
        assert!(r.contains("ip6 daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(r.contains("ip6 saddr != 2001:2:0:2::/64 jump mark-for-masquerade"));
        assert!(r.contains("dnat to [2001:2:0:2::b]:8080"), "{r}");
        assert!(r.contains("masquerade fully-random"));
        assert!(!r.contains("198.") && !r.contains(" ip "), "{r}");
        assert_eq!(
            nft_ruleset_in(Family::V4, 2, &[1, 2], Proto::Udp, true),
            nft_ruleset(2, &[1, 2], Proto::Udp, true)
        );
    }

    #[test]
    fn dataplane_names_parse_with_the_old_aliases() {
        use clap::ValueEnum as _;
        for d in [
            Dataplane::ClustergateSnat,
            Dataplane::ClustergateRouted,
            Dataplane::ClustergateDsr,
            Dataplane::Kernel,
            Dataplane::KernelMasq,
            Dataplane::Bounce,
        ] {
            assert_eq!(Dataplane::from_str(d.name(), false), Ok(d));
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::Value::from(d.name())
            );
        }
        assert_eq!(
            Dataplane::from_str("clustergate", false),
            Ok(Dataplane::ClustergateSnat)
        );
    }

    #[test]
    fn stats_are_median_min_max() {
        let s = Stat::of([3.0, 1.0, 2.0].into_iter());
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    }

    #[test]
    fn bad_flags_are_named() {
        let mut a = Args {
            prefix: "cgb".into(),
            backends: 4,
            dataplanes: vec![Dataplane::Kernel],
            frame_sizes: vec![40],
            flows: vec![1000],
            services: vec![1],
            workers: vec![1],
            proto: Proto::Udp,
            rate: 0,
            duration_s: 5.0,
            reps: 3,
            out: "x".into(),
            bin_dir: None,
            quick: false,
            keep_topology: false,
            interleave: false,
            family: Family::V4,
        };
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--frame-sizes 40"));
        a.frame_sizes = vec![64];
        a.flows = vec![0];
        assert!(a.validate().unwrap_err().to_string().contains("--flows 0"));
        a.flows = vec![1000];
        a.duration_s = 0.0;
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--duration-s"));
        a.duration_s = 5.0;
        a.proto = Proto::Tcp;
        let e = a.validate().unwrap_err().to_string();
        assert!(e.contains("--proto tcp with --dataplanes kernel"), "{e}");
        a.dataplanes = vec![Dataplane::KernelMasq];
        let e = a.validate().unwrap_err().to_string();
        assert!(e.contains("--proto tcp with --dataplanes kernel"), "{e}");
        a.dataplanes = vec![Dataplane::ClustergateSnat, Dataplane::Bounce];
        a.validate().unwrap();
        a.dataplanes = vec![Dataplane::Bounce, Dataplane::Bounce];
        assert!(a.validate().unwrap_err().to_string().contains("twice"));
        a.dataplanes = vec![Dataplane::ClustergateSnat];
        a.rate = 1000;
        a.flows = vec![100_000];
        let e = a.validate().unwrap_err().to_string();
        assert!(e.contains("--flows 100000 at --rate 1000"), "{e}");
        a.dataplanes = vec![Dataplane::ClustergateRouted];
        a.validate().unwrap();

        // IPv6: 84-byte frames at the least, the default when none is given;
        // DSR's 40-byte outer header must fit the LAN's MTU.
        a.family = Family::V6;
        a.frame_sizes = vec![];
        a.validate().unwrap();
        assert_eq!(a.frame_sizes, [84]);
        a.frame_sizes = vec![64];
        let e = a.validate().unwrap_err().to_string();
        assert!(
            e.contains("--frame-sizes 64: must be 84..=1500 (IPv6)"),
            "{e}"
        );
        a.frame_sizes = vec![1500];
        a.validate().unwrap();
        a.dataplanes = vec![Dataplane::ClustergateDsr];
        let e = a.validate().unwrap_err().to_string();
        assert!(e.contains("clustergate-dsr over IPv6: at most 1494"), "{e}");
        a.frame_sizes = vec![1494];
        a.validate().unwrap();
        a.family = Family::V4;
        a.frame_sizes = vec![];
        a.validate().unwrap();
        assert_eq!(a.frame_sizes, [64]);
    }
}
