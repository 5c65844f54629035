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
    /// N / --changes-th (--source api or manifest-dir), 0..=100000.
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
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
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
    println!("{}", last_line(&res));
    std::fs::write(
        args.out.join("update-latency.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    Ok(())
}

/// `update-latency: source=… services=… endpoints=… changes=… burst=… p50_ms=… p99_ms=…`.
fn last_line(res: &UpdateLatency) -> String {
    format!(
        "update-latency: source={} services={} endpoints={} changes={} burst={} p50_ms={:.1} p99_ms={:.1}",
        res.source.name(),
        res.services,
        res.endpoints,
        res.changes,
        res.burst,
        res.p50_ms,
        res.p99_ms
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
    let mut burst_s = 0.0;
    if args.burst == 0 {
        for i in 1..=args.changes {
            crate::compare::check_stop()?;
            objs.move_probe(port(i));
            let sent = feed.send(&objs, 0)?;
            let seen = ports.wait(&mut sink, &mut pktgen, port(i), &log("sink"))?;
            let ms = seen.saturating_sub(sent) as f64 / 1e6;
            lat.push(ms);
            if i % 10 == 0 || i == args.changes {
                progress(&format!("    change {i}/{}: {ms:.1} ms", args.changes));
            }
        }
    } else {
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
        };
        assert_eq!(
            last_line(&res),
            "update-latency: source=api services=10000 endpoints=10 changes=20 burst=1000 p50_ms=1.2 p99_ms=7.0"
        );
    }
}
