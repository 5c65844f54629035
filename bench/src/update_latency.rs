//! `clustergate-bench update-latency`: how long a change to the services
//! takes to reach forwarding, end to end, with many services loaded.
//!
//! The topology, `clustergate-control run` on S services of E endpoints
//! each ([`crate::update_objects`]), and `clustergate run`. Control reads
//! them from one manifest file, a manifest directory, or the Kubernetes API
//! (`--source api`: the control tests' scripted API server, run inside this
//! process on 127.0.0.1, serving list and watch with resourceVersions;
//! control runs in the host namespace with a kubeconfig pointing at it, the
//! gateway and the traffic stay in the topology's namespaces). The pktgen
//! sends to service 0 only, every packet a new flow (so connection tracking
//! cannot hide a change), at a modest fixed rate. Service 0's one ready
//! endpoint is backend 1, and each change to it moves its EndpointSlice's
//! port to a port never used before. The sink in backend 1 reports the first
//! packet of every destination port as it sees it. One change's latency is
//! from the change leaving the bench (the manifest's rename into place, or
//! the write to the API server, which streams the watch event at once;
//! CLOCK_MONOTONIC, read just before) to the first packet at the new port or
//! a later one (the same clock, read by the sink per received batch). The
//! pktgen's period bounds the resolution (200 µs at the default 5000 pps).
//!
//! With `--burst N`, the changes come as one burst of N within one second,
//! evenly paced: the timed ones (to service 0) interleaved every
//! N / `--changes`-th, the others each moving one endpoint of a random other
//! service (a seeded generator, so runs repeat).
//!
//! A burst also measures the gateway's CPU per forwarded packet in two
//! windows of the same run, the pktgen at its steady rate in both: the quiet
//! second right before the burst, and the burst (from its first change to
//! the last timed change seen at the sink, at least as long as the quiet
//! window). CPU is the `clustergate` process's, all its threads (and its
//! `cg-worker-*` threads alone): each thread's run time from
//! `/proc/<pid>/task/<tid>/schedstat` (ns; the same time as `utime + stime`
//! in `/proc/<pid>/stat`, which counts in 10 ms clock ticks), or those ticks
//! where schedstat cannot be read. Packets are the frames the gateway put on
//! its AF_XDP TX rings (`clustergate_xsk_tx_packets_total`, all workers).
//! The ratio burst ÷ quiet is the "CPU per packet during a burst".
//!
//! The return path is control's default, `snat` (`--return-path routed`
//! measures the other path that rewrites the destination port; `dsr` leaves
//! the service port on the wire, so a target port change cannot be seen and
//! is refused): the sink checks every frame for it, SNAT ports included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::compare::{http_get_in, progress, snat_range_from_metrics, tail, Bins, Proc};
use crate::layout::BACKEND_PORT;
use crate::sink::ReturnPath;
use crate::topology::{Shape, Topology};
use crate::update_objects::{kubeconfig, Objects, MAX_ENDPOINTS, MAX_SERVICES};

#[path = "../../control/tests/support/apiserver.rs"]
#[allow(dead_code)] // reason: the bench serves Services and EndpointSlices only
mod apiserver;

/// Where control reads the services from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// One manifest file, polled; each change rewrites (temp file + rename)
    /// the whole file.
    Manifest,
    /// A manifest directory of [`SERVICES_PER_FILE`] services per file,
    /// watched with inotify; each change rewrites (temp file + rename) only
    /// the file holding the changed service.
    ManifestDir,
    /// The Kubernetes API: a scripted API server in the bench, watched by
    /// control through a kubeconfig; each change replaces one EndpointSlice.
    Api,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::ManifestDir => "manifest-dir",
            Self::Api => "api",
        }
    }
}

/// How long the probes run, s: the pktgen's longest run.
const PROBE_S: u32 = 600;

/// The gateway's CPU windows with `--burst`: the quiet one's length (and
/// the burst's least).
const CPU_WINDOW: Duration = Duration::from_secs(1);

/// Time before the quiet window, past the gateway's eager second of hop
/// refreshes after a table (dataplane/src/gateway.rs `EAGER_FOR`).
const SETTLE: Duration = Duration::from_millis(1500);

/// Services per file with `--source manifest-dir`.
pub const SERVICES_PER_FILE: u32 = 100;

/// Flags of `clustergate-bench update-latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Namespace name prefix of the topology (built if missing, removed at the end).
    #[arg(long, default_value = "cgbu", value_parser = crate::topology::parse_prefix)]
    pub prefix: String,
    /// Services, 1..=131072 (beyond 65 536, two share a cluster IP on
    /// ports 80 and 81).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SERVICES)))]
    pub services: u32,
    /// Endpoints per service, 1..=1000 (service 0: backend 1 and E − 1 that
    /// are not ready).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_ENDPOINTS)))]
    pub endpoints: u32,
    /// Changes to time (to service 0), 1..=900.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=900))]
    pub changes: u32,
    /// 0: the timed changes one after another, each once the previous one
    /// forwards. N: one burst of N changes within one second across random
    /// services, the timed ones to service 0 interleaved every
    /// N / --changes-th (--source api or manifest-dir), 0..=100000. A
    /// burst also measures the gateway's CPU per forwarded packet in it
    /// against the quiet second before it (`cpu_ratio` on the last line;
    /// `cpu_ratio=-` without a burst).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub burst: u32,
    /// Packets per second to service 0 (every one a new flow), 100..=100000.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    pub rate: u64,
    /// How often control looks at the manifest, in milliseconds, 1..=1000
    /// (--source manifest).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub poll_ms: u64,
    /// Control's --min-sync-period-ms (the API and a manifest directory):
    /// least time between two table builds; 0: as fast as changes come.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub min_sync_period_ms: u64,
    /// Where control reads the services from: one manifest file, a
    /// directory of 100 services per file where a change rewrites one file,
    /// or a scripted Kubernetes API server.
    #[arg(long, value_enum, default_value = "manifest")]
    pub source: Source,
    /// Return path of the services: snat (control's default) or routed.
    #[arg(long, value_enum, default_value = "snat")]
    pub return_path: ReturnPath,
    /// Directory for results and logs.
    #[arg(long, default_value = "bench-results")]
    pub out: std::path::PathBuf,
    /// Where `clustergate` and `clustergate-control` are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<std::path::PathBuf>,
}

impl Args {
    /// Flags that do not go together.
    ///
    /// # Errors
    /// dsr, a burst with one file or one service, or fewer burst changes
    /// than timed ones.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.return_path != ReturnPath::Dsr,
            "--return-path dsr: the client's packet reaches the backend unchanged (service port 80), so a change of target port cannot be seen; measure snat or routed"
        );
        if self.burst > 0 {
            ensure!(
                self.source != Source::Manifest,
                "--burst {}: a burst rewrites the file of each changed service; use --source api or manifest-dir",
                self.burst
            );
            ensure!(
                self.services >= 2,
                "--burst {}: the burst's other changes need services other than 0 (--services {})",
                self.burst,
                self.services
            );
            ensure!(
                self.changes <= self.burst,
                "--changes {} is more than the --burst {} they are part of",
                self.changes,
                self.burst
            );
        }
        Ok(())
    }
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateLatency {
    /// Where control read the services from.
    pub source: Source,
    /// Services loaded.
    pub services: u32,
    /// Endpoints per service.
    pub endpoints: u32,
    /// Changes timed.
    pub changes: u32,
    /// Changes in the burst (0: none, one change at a time).
    pub burst: u32,
    /// How long the burst took to send, s (0 without one).
    pub burst_s: f64,
    /// Control's poll interval, ms.
    pub poll_ms: u64,
    /// Control's --min-sync-period-ms.
    pub min_sync_period_ms: u64,
    /// Pktgen rate (pps).
    pub rate: u64,
    /// The services' return path.
    pub return_path: ReturnPath,
    /// Frames the sink received and checked (all passed).
    pub frames_checked: u64,
    /// Each change's latency, ms.
    pub latencies_ms: Vec<f64>,
    /// Median, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// Least, ms.
    pub min_ms: f64,
    /// Most, ms.
    pub max_ms: f64,
    /// The gateway's CPU per packet, quiet vs burst (`--burst` only).
    pub cpu: Option<BurstCpu>,
    /// Where the time goes, from control's and the gateway's logs.
    pub steps: Option<crate::update_steps::Steps>,
}

fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn write_atomically(path: &Path, body: &str) -> Result<u64> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    let t = mono_ns();
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(t)
}

/// Quantile `q` of sorted `v`, nearest rank.
pub(crate) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The gateway's CPU per forwarded packet in the quiet window before the
/// burst and in the burst, and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct BurstCpu {
    /// Where the CPU times come from: `schedstat` (ns per thread) or
    /// `stat` (utime + stime, clock ticks).
    pub clock: &'static str,
    /// The second right before the burst, no change sent.
    pub quiet: CpuWindow,
    /// From the burst's first change until its last timed change was seen
    /// at the sink (at least as long as the quiet window).
    pub burst: CpuWindow,
    /// Burst ÷ quiet, the whole gateway's ns per packet (`None` when the
    /// quiet window forwarded nothing or used no measurable CPU).
    pub cpu_ratio: Option<f64>,
    /// Burst ÷ quiet, the worker threads' ns per packet.
    pub worker_cpu_ratio: Option<f64>,
}

/// One window of [`BurstCpu`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuWindow {
    /// Length, s.
    pub s: f64,
    /// Frames the gateway forwarded (put on its TX rings).
    pub packets: u64,
    /// CPU of the whole gateway process, ms.
    pub cpu_ms: f64,
    /// CPU of its worker threads alone, ms.
    pub worker_cpu_ms: f64,
    /// `cpu_ms` per packet, ns (`None` without packets).
    pub ns_per_packet: Option<f64>,
    /// `worker_cpu_ms` per packet, ns.
    pub worker_ns_per_packet: Option<f64>,
    /// CPU of each of the gateway's threads, by name, ms (where the rest
    /// went: the snapshot follower, the manage loop, the HTTP server).
    pub threads_ms: BTreeMap<String, f64>,
}

/// CPU time so far: clock ticks (utime + stime), and ns from schedstat
/// where every thread's could be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cpu {
    ticks: u64,
    run_ns: Option<u64>,
    /// Which threads `run_ns` sums: their count and the sum of their ids
    /// (a thread that ended takes its ns with it; the ticks keep them).
    threads: (u32, u64),
}

impl Cpu {
    /// ns used between `self` (earlier) and `later`: schedstat's where both
    /// have it over the same threads, else the ticks at `hz` per second.
    fn ns_until(self, later: Self, hz: u64) -> f64 {
        match (self.run_ns, later.run_ns) {
            (Some(a), Some(b)) if self.threads == later.threads => b.saturating_sub(a) as f64,
            _ => later.ticks.saturating_sub(self.ticks) as f64 * 1e9 / hz.max(1) as f64,
        }
    }

    /// Adds thread `tid`'s run time (`None`: unreadable, so no ns sum).
    fn add_thread(&mut self, tid: u32, ns: Option<u64>) {
        self.run_ns = self.run_ns.zip(ns).map(|(a, b)| a + b);
        self.threads = (self.threads.0 + 1, self.threads.1 + u64::from(tid));
    }
}

/// The fields of `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`)
/// that the bench reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcStat {
    /// The command name (field 2, without its parentheses).
    comm: String,
    /// The parent's pid (field 4).
    ppid: u32,
    /// utime + stime (fields 14 and 15), clock ticks.
    ticks: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name is between the
/// first `(` and the last `)`: it may itself hold spaces and parentheses.
fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    // From field 3 (state) on.
    let f: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(ProcStat {
        comm,
        ppid: u32::try_from(num(1)?).ok()?,
        ticks: num(11)?.checked_add(num(12)?)?,
    })
}

/// The run time (ns) in a `/proc/<pid>/task/<tid>/schedstat` line: its
/// first field (then the wait time and the time slices).
fn parse_schedstat(line: &str) -> Option<u64> {
    line.split_whitespace().next()?.parse().ok()
}

/// The worker threads' names: `cg-worker-<core>` (dataplane/src/gateway.rs).
fn is_worker(comm: &str) -> bool {
    comm.starts_with("cg-worker-")
}

/// The whole process's CPU (its own stat counts threads that ended; the ns
/// sum its live threads'), its worker threads', and each thread name's ns
/// (schedstat's, or its ticks at `hz` per second).
fn process_cpu(pid: u32, hz: u64) -> Result<(Cpu, Cpu, BTreeMap<String, u64>)> {
    let dir = format!("/proc/{pid}");
    let whole = std::fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_stat)
        .with_context(|| format!("reading {dir}/stat"))?;
    let (mut all, mut workers) = (
        Cpu {
            ticks: whole.ticks,
            run_ns: Some(0),
            threads: (0, 0),
        },
        Cpu {
            ticks: 0,
            run_ns: Some(0),
            threads: (0, 0),
        },
    );
    let mut by_name = BTreeMap::new();
    let tasks =
        std::fs::read_dir(format!("{dir}/task")).with_context(|| format!("listing {dir}/task"))?;
    for t in tasks.flatten() {
        let path = t.path();
        // A thread that ended since the listing: nothing more to count.
        let (Some(tid), Some(st)) = (
            t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()),
            std::fs::read_to_string(path.join("stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat),
        ) else {
            continue;
        };
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .as_deref()
            .and_then(parse_schedstat);
        all.add_thread(tid, ns);
        if is_worker(&st.comm) {
            workers.ticks += st.ticks;
            workers.add_thread(tid, ns);
        }
        *by_name.entry(st.comm).or_default() +=
            ns.unwrap_or(st.ticks.saturating_mul(1_000_000_000) / hz.max(1));
    }
    Ok((all, workers, by_name))
}

/// The pid of this process's child (or grandchild: `ip netns exec` may
/// fork) whose command name is `comm`.
fn child_named(comm: &str) -> Result<u32> {
    let me = std::process::id();
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(st) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            procs.push((pid, st));
        }
    }
    let parent_of = |pid: u32| procs.iter().find(|(p, _)| *p == pid).map(|(_, s)| s.ppid);
    procs
        .iter()
        .find(|(_, st)| st.comm == comm && (st.ppid == me || parent_of(st.ppid) == Some(me)))
        .map(|(pid, _)| *pid)
        .with_context(|| format!("no child process named {comm:?} of pid {me} in /proc"))
}

/// Frames the gateway put on its TX rings: the sum over workers of
/// `clustergate_xsk_tx_packets_total` in its metrics text.
fn tx_packets(metrics: &str) -> Option<u64> {
    let mut found = false;
    let sum = metrics
        .lines()
        .filter(|l| l.starts_with("clustergate_xsk_tx_packets_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .inspect(|_| found = true)
        .sum::<f64>();
    found.then_some(sum as u64)
}

/// The gateway at one instant.
#[derive(Debug, Clone)]
struct CpuSample {
    at: Instant,
    all: Cpu,
    workers: Cpu,
    /// ns by thread name.
    threads: BTreeMap<String, u64>,
    tx_packets: u64,
}

/// Reads the gateway's CPU (`pid`, clock ticks at `hz` per second) and
/// its forwarded frames (its metrics on `port` in namespace `ns`).
fn sample(pid: u32, hz: u64, ns: &str, port: u16) -> Result<CpuSample> {
    let (status, text) = http_get_in(ns, port, "/metrics").context("the gateway's /metrics")?;
    ensure!(status == 200, "the gateway's /metrics answered {status}");
    let tx_packets = tx_packets(&text)
        .context("the gateway's /metrics has no clustergate_xsk_tx_packets_total")?;
    let (all, workers, threads) = process_cpu(pid, hz)?;
    Ok(CpuSample {
        at: Instant::now(),
        all,
        workers,
        threads,
        tx_packets,
    })
}

/// ns per packet; `None` without packets.
fn ns_per_packet(ns: f64, packets: u64) -> Option<f64> {
    (packets > 0).then(|| ns / packets as f64)
}

/// `burst ÷ quiet`; `None` unless both are finite and quiet is positive.
fn ratio(burst: Option<f64>, quiet: Option<f64>) -> Option<f64> {
    let (b, q) = (burst?, quiet?);
    (q > 0.0 && b.is_finite() && q.is_finite()).then(|| b / q)
}

/// The window from `a` to `b` (later), CPU ticks at `hz` per second.
fn window(a: &CpuSample, b: &CpuSample, hz: u64) -> CpuWindow {
    let packets = b.tx_packets.saturating_sub(a.tx_packets);
    let all = a.all.ns_until(b.all, hz);
    let workers = a.workers.ns_until(b.workers, hz);
    CpuWindow {
        s: b.at.saturating_duration_since(a.at).as_secs_f64(),
        packets,
        cpu_ms: all / 1e6,
        worker_cpu_ms: workers / 1e6,
        ns_per_packet: ns_per_packet(all, packets),
        worker_ns_per_packet: ns_per_packet(workers, packets),
        threads_ms: b
            .threads
            .iter()
            .map(|(name, &ns)| {
                let before = a.threads.get(name).copied().unwrap_or(0);
                (name.clone(), ns.saturating_sub(before) as f64 / 1e6)
            })
            .collect(),
    }
}

/// The quiet window (`q0` → `q1`) against the burst's (`q1` → `b1`).
fn burst_cpu(q0: &CpuSample, q1: &CpuSample, b1: &CpuSample, hz: u64) -> BurstCpu {
    let (quiet, burst) = (window(q0, q1, hz), window(q1, b1, hz));
    let schedstat = [q0, q1, b1]
        .iter()
        .all(|s| s.all.run_ns.is_some() && s.workers.run_ns.is_some());
    BurstCpu {
        clock: if schedstat { "schedstat" } else { "stat" },
        cpu_ratio: ratio(burst.ns_per_packet, quiet.ns_per_packet),
        worker_cpu_ratio: ratio(burst.worker_ns_per_packet, quiet.worker_ns_per_packet),
        quiet,
        burst,
    }
}

/// Runs `clustergate-bench update-latency`.
///
/// # Errors
/// Flags that do not go together, not root, a process that does not start,
/// or a change that never reaches the backend (within 60 s + 2 s per 1000
/// services).
pub fn run(args: &Args) -> Result<()> {
    args.validate()?;
    ensure!(
        rustix::process::geteuid().is_root(),
        "clustergate-bench update-latency needs root (namespaces, XDP, AF_XDP)"
    );
    let bins = Bins::find(args.bin_dir.as_deref())?;
    crate::compare::catch_signals()?;
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let topo = Topology::new(
        Shape {
            prefix: args.prefix.clone(),
            backends: 2,
            workers: 1,
        },
        false,
    );
    progress(&format!("topology {} up", args.prefix));
    topo.up()?;
    let r = measure(args, &bins, &topo);
    progress("topology down");
    let _ = topo.down();
    let res = r?;
    let burst = if res.burst > 0 {
        format!(
            ", in a burst of {} changes sent in {:.2} s",
            res.burst, res.burst_s
        )
    } else {
        String::new()
    };
    println!(
        "\nupdate latency ({} change → first packet at the new backend port), {} services × {} endpoints, return path {}, {} changes{burst}, probes at {} pps:\n\n| p50 ms | p99 ms | min ms | max ms |\n|---|---|---|---|\n| {:.1} | {:.1} | {:.1} | {:.1} |",
        res.source.name(), res.services, res.endpoints, res.return_path.name(), res.changes, res.rate, res.p50_ms, res.p99_ms, res.min_ms, res.max_ms
    );
    if let Some(st) = &res.steps {
        println!("\n{}", crate::update_steps::table(st));
    }
    if let Some(c) = &res.cpu {
        println!("\n{}", cpu_table(c));
    }
    println!("{}", last_line(&res));
    std::fs::write(
        args.out.join("update-latency.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    Ok(())
}

/// `update-latency: source=… services=… endpoints=… changes=… burst=…
/// p50_ms=… p99_ms=… cpu_ratio=…`; `cpu_ratio=-` without a burst (or
/// without a quiet window to divide by).
fn last_line(res: &UpdateLatency) -> String {
    let ratio = res
        .cpu
        .as_ref()
        .and_then(|c| c.cpu_ratio)
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
    format!(
        "update-latency: source={} services={} endpoints={} changes={} burst={} p50_ms={:.1} p99_ms={:.1} cpu_ratio={ratio}",
        res.source.name(),
        res.services,
        res.endpoints,
        res.changes,
        res.burst,
        res.p50_ms,
        res.p99_ms
    )
}

/// `name ms, …` of a window's threads, the busiest first.
fn by_thread(w: &CpuWindow) -> String {
    let mut v: Vec<(&String, &f64)> = w.threads_ms.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(n, ms)| format!("{n} {ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ns per packet for the table: `-` without packets.
fn ns_text(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ns"))
}

/// The human table of [`BurstCpu`].
fn cpu_table(c: &BurstCpu) -> String {
    let row = |name: &str, w: &CpuWindow| {
        format!(
            "| {name} | {:.2} | {} | {:.1} | {} | {:.1} | {} |",
            w.s,
            w.packets,
            w.cpu_ms,
            ns_text(w.ns_per_packet),
            w.worker_cpu_ms,
            ns_text(w.worker_ns_per_packet)
        )
    };
    let r = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    format!(
        "gateway CPU per forwarded packet ({} clock), the quiet window before the burst and the burst (until its last timed change forwarded):\n\n| window | s | packets | CPU ms | CPU per packet | workers' CPU ms | workers' per packet |\n|---|---|---|---|---|---|---|\n{}\n{}\n| burst ÷ quiet | | | | {} | | {} |",
        c.clock,
        row("quiet", &c.quiet),
        row("burst", &c.burst),
        r(c.cpu_ratio),
        r(c.worker_cpu_ratio)
    )
}

/// Where a change goes: the manifest file, the file of the changed service
/// in the manifest directory, or the API server.
#[derive(Debug)]
enum Feed {
    File(PathBuf),
    Dir(PathBuf),
    Api {
        // Before the runtime, so that it is dropped first.
        server: apiserver::ApiServer,
        _rt: tokio::runtime::Runtime,
    },
}

impl Feed {
    /// Loads `objs`; returns what `clustergate-control run` is given to read them.
    fn load(source: Source, objs: &Objects, dir: &Path) -> Result<(Self, Vec<std::ffi::OsString>)> {
        let n = objs.services();
        Ok(match source {
            Source::Manifest => {
                let path = dir.join("manifest.yaml");
                write_atomically(&path, &objs.yaml(0..n))?;
                let arg = vec!["--manifest".into(), path.clone().into()];
                (Self::File(path), arg)
            }
            Source::ManifestDir => {
                let mdir = dir.join("manifests");
                std::fs::create_dir_all(&mdir)?;
                for f in 0..n.div_ceil(SERVICES_PER_FILE) {
                    write_atomically(&file_of(&mdir, f), &objs.yaml(file_range(f, n)))?;
                }
                let arg = vec!["--manifest".into(), mdir.clone().into()];
                (Self::Dir(mdir), arg)
            }
            Source::Api => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("apiserver")
                    .enable_all()
                    .build()
                    .context("starting the API server's runtime")?;
                let server = rt.block_on(apiserver::ApiServer::start());
                for k in 0..n {
                    server.apply(objs.service_json(k));
                    server.apply(objs.slice_json(k));
                }
                // Control lists after this: the loading needs no history.
                server.compact();
                let path = dir.join("kubeconfig");
                std::fs::write(&path, kubeconfig(&server.url()))
                    .with_context(|| format!("writing {}", path.display()))?;
                let arg = vec!["--kubeconfig".into(), path.into()];
                (Self::Api { server, _rt: rt }, arg)
            }
        })
    }

    /// Sends service `k` as `objs` has it now; returns when (CLOCK_MONOTONIC,
    /// read just before the rename or the write to the API server).
    fn send(&self, objs: &Objects, k: u32) -> Result<u64> {
        let n = objs.services();
        match self {
            Self::File(path) => write_atomically(path, &objs.yaml(0..n)),
            Self::Dir(mdir) => {
                let f = k / SERVICES_PER_FILE;
                write_atomically(&file_of(mdir, f), &objs.yaml(file_range(f, n)))
            }
            Self::Api { server, .. } => {
                let slice = objs.slice_json(k);
                let t = mono_ns();
                server.apply(slice);
                Ok(t)
            }
        }
    }
}

/// File `f` of a manifest directory.
fn file_of(mdir: &Path, f: u32) -> PathBuf {
    mdir.join(format!("svc-{f:05}.yaml"))
}

/// The services of file `f` of `n`.
fn file_range(f: u32, n: u32) -> std::ops::Range<u32> {
    f * SERVICES_PER_FILE..((f + 1) * SERVICES_PER_FILE).min(n)
}

/// The positions in a burst of `burst` changes of the `changes` timed ones:
/// evenly spread, each in the middle of its share.
fn timed_positions(burst: u32, changes: u32) -> Vec<u32> {
    (1..=u64::from(changes))
        .map(|i| ((2 * i - 1) * u64::from(burst) / (2 * u64::from(changes))) as u32)
        .collect()
}

/// Each timed change's latency, ns: from its send time to the first packet
/// at its port or a later one (a later change may land before any packet
/// saw this one: then both forward from that packet). `None` for a change
/// whose port, nor any later, was seen.
fn latencies_ns(sent: &[u64], first_seen: &[Option<u64>]) -> Vec<Option<u64>> {
    let mut earliest: Option<u64> = None;
    let mut out: Vec<Option<u64>> = sent
        .iter()
        .zip(first_seen)
        .rev()
        .map(|(&t, &seen)| {
            earliest = match (earliest, seen) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            earliest.map(|e| e.saturating_sub(t))
        })
        .collect();
    out.reverse();
    out
}

fn measure(args: &Args, bins: &Bins, topo: &Topology) -> Result<UpdateLatency> {
    let dir = args.out.join("update-latency");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Where production publishes: tmpfs (a snapshot is fsynced before it is
    // renamed into place; on a disk that alone takes milliseconds).
    let shm = if Path::new("/dev/shm").is_dir() {
        PathBuf::from(format!("/dev/shm/clustergate-bench-{}", args.prefix))
    } else {
        dir.join("shm")
    };
    let _ = std::fs::remove_dir_all(&shm);
    let r = measure_in(args, bins, topo, &dir, &shm);
    let _ = std::fs::remove_dir_all(&shm);
    r
}

fn measure_in(
    args: &Args,
    bins: &Bins,
    topo: &Topology,
    dir: &Path,
    shm: &Path,
) -> Result<UpdateLatency> {
    let log = |n: &str| args.out.join("logs").join(format!("update-{n}.log"));
    let in_ns = |role: &str, prog: &Path| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &topo.ns(role)]).arg(prog);
        c
    };
    let port = |i: u32| BACKEND_PORT + 1 + i as u16;
    // Control's and the gateway's log timestamps onto this clock.
    let offset = crate::update_steps::realtime_offset_ns();
    let mut objs = Objects::new(args.services, args.endpoints, port(0));
    progress(&format!(
        "loading {} services × {} endpoints ({})",
        args.services,
        args.endpoints,
        args.source.name()
    ));
    // Dropped after control (locals drop in reverse order): the API server
    // outlives its client.
    let (feed, source_args) = Feed::load(args.source, &objs, dir)?;
    let mut c = Command::new(&bins.control);
    c.arg("run")
        .args(&source_args)
        .arg("--shm-dir")
        .arg(shm)
        .args(["--return-path", args.return_path.name()])
        .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"]);
    match args.source {
        Source::Manifest => c.args(["--poll-ms", &args.poll_ms.to_string()]),
        Source::ManifestDir | Source::Api => {
            c.args(["--min-sync-period-ms", &args.min_sync_period_ms.to_string()])
        }
    };
    let _control = Proc::spawn("clustergate-control", c, &log("control"))?;
    let mut g = in_ns("gw", &bins.gateway);
    g.args(["run", "--interface", "g0", "--interface", "g1", "--shm-dir"])
        .arg(shm)
        .args([
            "--cores",
            "1",
            "--metrics",
            "127.0.0.1:10257",
            "--zero-copy",
            "never",
        ])
        .args(["--exit-after-s", "3600"]);
    let mut gateway = Proc::spawn("clustergate", g, &log("gateway"))?;
    progress(&format!(
        "waiting for the gateway to apply {} services",
        args.services
    ));
    let t = Instant::now();
    while !matches!(http_get_in(&topo.ns("gw"), 10257, "/healthz"), Ok((200, _))) {
        crate::compare::check_stop()?;
        if let Ok(Some(st)) = gateway.child_status() {
            bail!("clustergate exited ({st}):\n{}", tail(&log("gateway")));
        }
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "gateway not healthy after 300 s (control's log: {})",
            log("control").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    progress(&format!(
        "gateway healthy after {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut s = in_ns("b1", &bins.bench);
    s.args([
        "sink",
        "--iface",
        "e0",
        "--backend",
        "1",
        "--report-first-port",
    ])
    .args(["--return-path", args.return_path.name()]);
    if args.return_path == ReturnPath::Snat {
        // The range the gateway chose, as it exports it.
        let (lo, hi) = http_get_in(&topo.ns("gw"), 10257, "/metrics")
            .ok()
            .and_then(|(_, text)| snat_range_from_metrics(&text))
            .context("the gateway's /metrics has no clustergate_snat_ports")?;
        s.args(["--snat-ports", &format!("{lo}-{hi}")]);
    }
    s.args([
        "--ports",
        &format!("{}-{}", BACKEND_PORT, port(args.changes)),
    ])
    .args(["--flows", "4000000", "--duration-s", "3600"]);
    let mut sink = Proc::spawn("sink", s, &log("sink"))?;
    sink.event("ready", Duration::from_secs(30), &log("sink"))?;
    // The probes run for the pktgen's longest run, and are stopped when
    // this returns (at 5000 pps, 3 M of the 4 M flows: none repeats).
    let mut p = in_ns("cli", &bins.bench);
    p.args([
        "pktgen",
        "--iface",
        "c0",
        "--cores",
        "0",
        "--only-service",
        "0",
    ])
    .args(["--flows", "4000000", "--rate", &args.rate.to_string()])
    .args(["--duration-s", &PROBE_S.to_string()]);
    let mut pktgen = Proc::spawn("pktgen", p, &log("pktgen"))?;
    // A change rebuilds everything today: about 0.3 s per 1000 services on
    // a quiet machine; much more room than that.
    let mut ports = FirstPorts {
        seen: BTreeMap::new(),
        timeout: Duration::from_secs(60 + u64::from(args.services) / 500),
    };
    // The first port proves the path before anything is timed.
    ports.wait(&mut sink, &mut pktgen, port(0), &log("sink"))?;
    let mut lat = Vec::with_capacity(args.changes as usize);
    // Each timed change's send and first packet, CLOCK_MONOTONIC ns.
    let mut times: Vec<(u64, u64)> = Vec::with_capacity(args.changes as usize);
    let mut burst_s = 0.0;
    let mut cpu = None;
    if args.burst == 0 {
        for i in 1..=args.changes {
            crate::compare::check_stop()?;
            objs.move_probe(port(i));
            let sent = feed.send(&objs, 0)?;
            let seen = ports.wait(&mut sink, &mut pktgen, port(i), &log("sink"))?;
            let ms = seen.saturating_sub(sent) as f64 / 1e6;
            lat.push(ms);
            times.push((sent, seen));
            if i % 10 == 0 || i == args.changes {
                progress(&format!("    change {i}/{}: {ms:.1} ms", args.changes));
            }
        }
    } else {
        let gw = child_named("clustergate")?;
        let hz = rustix::param::clock_ticks_per_second();
        // Past the gateway's eager refreshes after its last table.
        std::thread::sleep(SETTLE);
        let q0 = sample(gw, hz, &topo.ns("gw"), 10257)?;
        std::thread::sleep(CPU_WINDOW);
        let q1 = sample(gw, hz, &topo.ns("gw"), 10257)?;
        let timed = timed_positions(args.burst, args.changes);
        let mut rng = fastrand::Rng::with_seed(0x5eed_0013);
        let mut sent = Vec::with_capacity(timed.len());
        progress(&format!(
            "a burst of {} changes in 1 s, {} of them timed",
            args.burst, args.changes
        ));
        let start = Instant::now();
        for j in 0..args.burst {
            let due =
                start + Duration::from_nanos(u64::from(j) * 1_000_000_000 / u64::from(args.burst));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if timed.get(sent.len()) == Some(&j) {
                objs.move_probe(port(sent.len() as u32 + 1));
                sent.push(feed.send(&objs, 0)?);
            } else {
                let k = rng.u32(1..args.services);
                objs.move_endpoint(k);
                feed.send(&objs, k)?;
            }
        }
        burst_s = start.elapsed().as_secs_f64();
        progress(&format!("    burst sent in {burst_s:.2} s"));
        // The last timed port is seen last; every earlier one by then.
        ports.wait(&mut sink, &mut pktgen, port(args.changes), &log("sink"))?;
        // The burst's window is at least as long as the quiet one.
        let quiet = q1.at.saturating_duration_since(q0.at);
        if let Some(rest) = (q1.at + quiet).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
        let b1 = sample(gw, hz, &topo.ns("gw"), 10257)?;
        let c = burst_cpu(&q0, &q1, &b1, hz);
        progress(&format!(
            "    gateway CPU per packet: {} quiet, {} in the burst",
            ns_text(c.quiet.ns_per_packet),
            ns_text(c.burst.ns_per_packet)
        ));
        for (name, w) in [("quiet", &c.quiet), ("burst", &c.burst)] {
            progress(&format!(
                "    {name} window, CPU ms by thread: {}",
                by_thread(w)
            ));
        }
        cpu = Some(c);
        let first: Vec<Option<u64>> = (1..=args.changes)
            .map(|i| ports.seen.get(&port(i)).copied())
            .collect();
        let skipped = first.iter().filter(|s| s.is_none()).count();
        if skipped > 0 {
            progress(&format!(
                "    {skipped} timed changes were overtaken by the next before any packet saw them"
            ));
        }
        for (i, ns) in latencies_ns(&sent, &first).into_iter().enumerate() {
            let ns = ns.with_context(|| format!("change {} never reached the backend", i + 1))?;
            lat.push(ns as f64 / 1e6);
            times.push((sent[i], sent[i] + ns));
        }
    }
    // Every frame the sink saw must have passed its checks (a frame that
    // failed is never a first packet, so it would only show as a timeout).
    sink.terminate_soft();
    let v = sink.event("result", Duration::from_secs(10), &log("sink"))?;
    let received = v["received"].as_u64().unwrap_or(0);
    let bad: u64 = v["bad"]
        .as_object()
        .map(|m| m.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    ensure!(
        bad == 0,
        "{bad} of {received} frames failed the sink's {} checks: {}",
        args.return_path.name(),
        v["bad"]
    );
    let (sent, seen): (Vec<u64>, Vec<u64>) = times.into_iter().unzip();
    let transit = crate::update_steps::transit_ms(&v["latency_ns"]);
    let steps = match crate::update_steps::from_logs(
        &log("control"),
        &log("gateway"),
        offset,
        &sent,
        &seen,
    ) {
        Ok(mut st) => {
            st.transit = transit;
            Some(st)
        }
        Err(e) => {
            progress(&format!("    no split of the time: {e:#}"));
            None
        }
    };
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(UpdateLatency {
        source: args.source,
        frames_checked: received,
        services: args.services,
        endpoints: args.endpoints,
        changes: args.changes,
        burst: args.burst,
        burst_s,
        poll_ms: args.poll_ms,
        min_sync_period_ms: args.min_sync_period_ms,
        rate: args.rate,
        return_path: args.return_path,
        p50_ms: quantile(&sorted, 0.5),
        p99_ms: quantile(&sorted, 0.99),
        min_ms: sorted.first().copied().unwrap_or(0.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        latencies_ms: lat,
        cpu,
        steps,
    })
}

/// The sink's first packet at each port so far: CLOCK_MONOTONIC times.
#[derive(Debug)]
struct FirstPorts {
    seen: BTreeMap<u16, u64>,
    /// How long one port may take.
    timeout: Duration,
}

impl FirstPorts {
    /// The first packet at `port`, reading the sink's reports (and keeping
    /// those of other ports) until it comes, for up to `self.timeout`.
    fn wait(&mut self, sink: &mut Proc, pktgen: &mut Proc, port: u16, log: &Path) -> Result<u64> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(&t) = self.seen.get(&port) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "no packet reached port {port} within {:?}",
                self.timeout
            );
            crate::compare::check_stop()?;
            if let Ok(Some(st)) = pktgen.child_status() {
                bail!("the probes ended ({st}) before port {port} was seen: the changes took longer than the pktgen's {PROBE_S} s; time fewer --changes");
            }
            // In steps, to notice the pktgen's end; a sink that ended is
            // an error at once.
            let step = left.min(Duration::from_secs(1));
            let v = match sink.event("first-port", step, log) {
                Ok(v) => v,
                Err(_) if step < left && matches!(sink.child_status(), Ok(None)) => continue,
                Err(e) => return Err(e),
            };
            let p = v["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .context("first-port without port")?;
            let t = v["mono_ns"]
                .as_u64()
                .context("first-port without mono_ns")?;
            self.seen.entry(p).or_insert(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn timed_changes_are_spread_over_the_burst() {
        assert_eq!(timed_positions(1000, 20)[..3], [25, 75, 125]);
        assert_eq!(timed_positions(1000, 20)[19], 975);
        assert_eq!(timed_positions(5, 5), [0, 1, 2, 3, 4]);
        for (burst, changes) in [(1000, 100), (1000, 900), (7, 3), (100_000, 900)] {
            let t = timed_positions(burst, changes);
            assert_eq!(t.len(), changes as usize);
            assert!(t.windows(2).all(|w| w[0] < w[1]), "{burst}/{changes}");
            assert!(*t.last().unwrap_or(&u32::MAX) < burst);
        }
    }

    #[test]
    fn an_overtaken_change_counts_until_a_later_one_forwards() {
        // Change 2's port was never seen: change 3's first packet is when
        // the state with change 2 forwarded too.
        let sent = [100, 200, 300, 400];
        let seen = [Some(150), None, Some(350), Some(460)];
        assert_eq!(
            latencies_ns(&sent, &seen),
            [Some(50), Some(150), Some(50), Some(60)]
        );
        // Seen out of order (a later port first): each takes the earliest
        // at its port or after.
        assert_eq!(
            latencies_ns(&[10, 20], &[Some(40), Some(30)]),
            [Some(20), Some(10)]
        );
        assert_eq!(latencies_ns(&[10, 20], &[Some(15), None]), [Some(5), None]);
    }

    #[test]
    fn manifest_dir_files_hold_whole_hundreds() {
        assert_eq!(file_range(0, 10_000), 0..100);
        assert_eq!(file_range(99, 10_000), 9_900..10_000);
        assert_eq!(file_range(2, 250), 200..250);
        assert_eq!(
            file_of(Path::new("/m"), 7),
            PathBuf::from("/m/svc-00007.yaml")
        );
    }

    fn args(extra: &[&str]) -> Result<Args> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let argv = std::iter::once("update-latency").chain(extra.iter().copied());
        let cli = <Cli as clap::Parser>::try_parse_from(argv)?;
        cli.a.validate()?;
        Ok(cli.a)
    }

    #[test]
    fn flags_that_do_not_go_together_are_refused() {
        let a = args(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.endpoints, a.burst, a.source), (10, 0, Source::Manifest));
        let a = args(&["--source", "api", "--burst", "1000", "--changes", "20"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.burst, a.source), (1000, Source::Api));
        args(&["--services", "131072", "--endpoints", "1000"]).unwrap_or_else(|e| panic!("{e}"));
        let err = |f: &[&str]| args(f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--burst", "100"]).contains("use --source api or manifest-dir"));
        assert!(
            err(&["--source", "api", "--burst", "10", "--changes", "20"])
                .contains("more than the --burst")
        );
        assert!(
            err(&["--source", "api", "--burst", "10", "--services", "1"])
                .contains("services other than 0")
        );
        assert!(err(&["--return-path", "dsr"]).contains("cannot be seen"));
        assert!(!err(&["--services", "131073"]).is_empty());
        assert!(!err(&["--endpoints", "0"]).is_empty());
    }

    #[test]
    fn the_last_line_ends_with_p50_and_p99() {
        let res = UpdateLatency {
            source: Source::Api,
            services: 10_000,
            endpoints: 10,
            changes: 20,
            burst: 1000,
            burst_s: 1.0,
            poll_ms: 10,
            min_sync_period_ms: 0,
            rate: 5000,
            return_path: ReturnPath::Snat,
            frames_checked: 1,
            latencies_ms: vec![],
            p50_ms: 1.24,
            p99_ms: 7.0,
            min_ms: 0.0,
            max_ms: 0.0,
            cpu: None,
            steps: None,
        };
        assert_eq!(
            last_line(&res),
            "update-latency: source=api services=10000 endpoints=10 changes=20 burst=1000 p50_ms=1.2 p99_ms=7.0 cpu_ratio=-"
        );
        let t = Instant::now();
        let at = |ms: u64, ns: u64, packets: u64| CpuSample {
            at: t + Duration::from_millis(ms),
            all: Cpu {
                ticks: 0,
                run_ns: Some(ns),
                threads: (3, 30),
            },
            workers: Cpu {
                ticks: 0,
                run_ns: Some(ns / 2),
                threads: (3, 30),
            },
            threads: BTreeMap::new(),
            tx_packets: packets,
        };
        let c = burst_cpu(
            &at(0, 0, 0),
            &at(1000, 50_000_000, 5000),
            &at(2200, 116_000_000, 11_000),
            100,
        );
        let res = UpdateLatency {
            cpu: Some(c.clone()),
            steps: None,
            ..res
        };
        assert_eq!(
            last_line(&res),
            "update-latency: source=api services=10000 endpoints=10 changes=20 burst=1000 p50_ms=1.2 p99_ms=7.0 cpu_ratio=1.100"
        );
        let table = cpu_table(&c);
        assert!(
            table.contains("| quiet | 1.00 | 5000 | 50.0 | 10000 ns | 25.0 | 5000 ns |"),
            "{table}"
        );
        assert!(
            table.contains("| burst | 1.20 | 6000 | 66.0 | 11000 ns | 33.0 | 5500 ns |"),
            "{table}"
        );
        assert!(
            table.contains("| burst ÷ quiet | | | | 1.100 | | 1.100 |"),
            "{table}"
        );
        let json = serde_json::to_value(&res).unwrap_or_default();
        assert_eq!(
            json["cpu"]["cpu_ratio"].as_f64(),
            Some(c.cpu_ratio.unwrap_or(0.0))
        );
        assert_eq!(json["cpu"]["quiet"]["packets"], 5000);
        assert_eq!(json["cpu"]["clock"], "schedstat");
    }

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // A real line (cat reading itself), then thread names that hold
        // ") " and "(": the fields count from the last ')'.
        let cat = "15358 (cat) R 15352 15352 13267 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 1 0 4925808 3133440 390 18446744073709551615 93940359544832 0 0 0";
        assert_eq!(
            parse_stat(cat),
            Some(ProcStat {
                comm: "cat".into(),
                ppid: 15352,
                ticks: 10
            })
        );
        let odd = "42 (cg (x) 1) S 7 42 42 0 -1 4194624 10 0 0 0 1234 56 0 0 20 0 9 0 100 0 0";
        assert_eq!(
            parse_stat(odd),
            Some(ProcStat {
                comm: "cg (x) 1".into(),
                ppid: 7,
                ticks: 1290
            })
        );
        let spaced = "43 (a) b) c 2 ) S 1 43 43 0 -1 0 0 0 0 0 5 6 0 0";
        assert_eq!(
            parse_stat(spaced).map(|s| (s.comm, s.ticks)),
            Some(("a) b) c 2 ".into(), 11))
        );
        // Cut short, or not numbers where utime and stime are: refused.
        assert_eq!(
            parse_stat("42 (cg) S 7 42 42 0 -1 4194624 10 0 0 0 1234"),
            None
        );
        assert_eq!(
            parse_stat("42 (cg) S 7 42 42 0 -1 4194624 10 0 0 0 x 56"),
            None
        );
        assert_eq!(parse_stat("42 cg S 7"), None);
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_schedstat("123456789 80537 12\n"), Some(123_456_789));
        assert_eq!(parse_schedstat(""), None);
        assert!(is_worker("cg-worker-0") && is_worker("cg-worker-15"));
        assert!(!is_worker("clustergate") && !is_worker("snapshots") && !is_worker("cg-http"));
    }

    #[test]
    fn cpu_per_packet_counts_ticks_or_ns_and_divides_by_the_quiet_window() {
        // Clock ticks at 100 Hz: 3 ticks are 30 ms.
        let ticks = |t: u64| Cpu {
            ticks: t,
            run_ns: None,
            threads: (3, 30),
        };
        assert_eq!(ticks(7).ns_until(ticks(10), 100), 30_000_000.0);
        assert_eq!(ticks(7).ns_until(ticks(10), 250), 12_000_000.0);
        // schedstat's ns where both samples have them; the ticks where
        // either lacks them.
        let both = |t: u64, ns: u64| Cpu {
            ticks: t,
            run_ns: Some(ns),
            threads: (3, 30),
        };
        assert_eq!(both(7, 1_000).ns_until(both(10, 4_500), 100), 3_500.0);
        assert_eq!(both(7, 1_000).ns_until(ticks(10), 100), 30_000_000.0);
        // A thread ended (or started) between them: its ns are not in both
        // sums, the ticks count the whole process.
        let other = Cpu {
            threads: (2, 20),
            ..both(10, 4_500)
        };
        assert_eq!(both(7, 1_000).ns_until(other, 100), 30_000_000.0);
        let mut c = Cpu {
            ticks: 0,
            run_ns: Some(0),
            threads: (0, 0),
        };
        c.add_thread(10, Some(5));
        c.add_thread(11, Some(6));
        assert_eq!((c.run_ns, c.threads), (Some(11), (2, 21)));
        c.add_thread(12, None);
        assert_eq!((c.run_ns, c.threads), (None, (3, 33)));
        // 30 ms over 6000 packets: 5 µs each.
        assert_eq!(ns_per_packet(30_000_000.0, 6000), Some(5000.0));
        assert_eq!(ns_per_packet(30_000_000.0, 0), None);
        assert_eq!(ratio(Some(5500.0), Some(5000.0)), Some(1.1));
        assert_eq!(ratio(Some(5500.0), Some(0.0)), None);
        assert_eq!(ratio(Some(5500.0), None), None);
        assert_eq!(ratio(None, Some(5000.0)), None);
        assert_eq!(ratio(Some(f64::INFINITY), Some(5000.0)), None);

        // Ticks only (no schedstat): quiet 10 ticks over 5000 packets,
        // burst 24 over 8000.
        let t = Instant::now();
        let at = |ms: u64, ticks: u64, workers: u64, packets: u64| CpuSample {
            at: t + Duration::from_millis(ms),
            all: Cpu {
                ticks,
                run_ns: None,
                threads: (3, 30),
            },
            workers: Cpu {
                ticks: workers,
                run_ns: None,
                threads: (3, 30),
            },
            threads: BTreeMap::from([("cg-worker-0".to_owned(), workers * 10_000_000)]),
            tx_packets: packets,
        };
        let c = burst_cpu(
            &at(0, 100, 40, 1_000),
            &at(1000, 110, 45, 6_000),
            &at(2600, 134, 61, 14_000),
            100,
        );
        assert_eq!(c.clock, "stat");
        assert_eq!(
            c.quiet,
            CpuWindow {
                s: 1.0,
                packets: 5000,
                cpu_ms: 100.0,
                worker_cpu_ms: 50.0,
                ns_per_packet: Some(20_000.0),
                worker_ns_per_packet: Some(10_000.0),
                threads_ms: BTreeMap::from([("cg-worker-0".to_owned(), 50.0)]),
            }
        );
        assert_eq!(c.burst.packets, 8000);
        assert_eq!(c.burst.ns_per_packet, Some(30_000.0));
        assert_eq!(c.burst.worker_ns_per_packet, Some(20_000.0));
        assert_eq!(c.cpu_ratio, Some(1.5));
        assert_eq!(c.worker_cpu_ratio, Some(2.0));
        // A quiet window that forwarded nothing has no ratio.
        let c = burst_cpu(
            &at(0, 100, 40, 1_000),
            &at(1000, 110, 45, 1_000),
            &at(2000, 120, 50, 9_000),
            100,
        );
        assert_eq!((c.quiet.ns_per_packet, c.cpu_ratio), (None, None));
    }

    #[test]
    fn forwarded_packets_are_summed_over_the_workers_tx_counters() {
        let text =
            "# HELP clustergate_xsk_tx_packets Frames put on the AF_XDP TX rings, per worker\n\
                    # TYPE clustergate_xsk_tx_packets counter\n\
                    clustergate_xsk_tx_packets_total{proxy_name=\"cg\",worker=\"0\"} 1200\n\
                    clustergate_xsk_rx_packets_total{proxy_name=\"cg\",worker=\"0\"} 99999\n\
                    clustergate_xsk_tx_packets_total{proxy_name=\"cg\",worker=\"1\"} 34\n";
        assert_eq!(tx_packets(text), Some(1234));
        assert_eq!(
            tx_packets("clustergate_xsk_rx_packets_total{worker=\"0\"} 5\n"),
            None
        );
    }
}
