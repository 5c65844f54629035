//! `clustergate-bench update-latency`: how long a change to the manifest takes
//! to reach forwarding, end to end, with many services loaded.
//!
//! The topology, `clustergate-control run` on a manifest of S services, and
//! `clustergate run`. The pktgen sends to service 0 only, every packet a new
//! flow (so connection tracking cannot hide a change), at a modest fixed rate.
//! Service 0 has one endpoint, backend 1, and each change moves its target
//! port to a port never used before. The sink in backend 1 reports the first
//! packet of every destination port as it sees it. One change's latency is
//! from the manifest's rename into place (CLOCK_MONOTONIC, read just before)
//! to that first packet at the new port (the same clock, read by the sink per
//! received batch). The pktgen's period bounds the resolution (200 µs at the
//! default 5000 pps).
//!
//! The return path is control's default, `snat` (`--return-path routed`
//! measures the other path that rewrites the destination port; `dsr` leaves
//! the service port on the wire, so a target port change cannot be seen and
//! is refused): the sink checks every frame for it, SNAT ports included.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::compare::{
    http_get_in, manifest_with, progress, snat_range_from_metrics, tail, Bins, Proc,
};
use crate::layout::BACKEND_PORT;
use crate::sink::ReturnPath;
use crate::topology::{Shape, Topology};

/// Where control reads the services from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// One manifest file, polled; each change rewrites (temp file + rename)
    /// the whole file.
    Manifest,
    /// A manifest directory of [`SERVICES_PER_FILE`] services per file,
    /// watched with inotify; each change rewrites (temp file + rename) only
    /// the file holding service 0.
    ManifestDir,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::ManifestDir => "manifest-dir",
        }
    }
}

/// Services per file with `--source manifest-dir`.
pub const SERVICES_PER_FILE: u32 = 100;

/// Flags of `clustergate-bench update-latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Namespace name prefix of the topology (built if missing, removed at the end).
    #[arg(long, default_value = "cgbu", value_parser = crate::topology::parse_prefix)]
    pub prefix: String,
    /// Services in the manifest, 1..=65536.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub services: u32,
    /// Changes to time, 1..=900.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=900))]
    pub changes: u32,
    /// Packets per second to service 0 (every one a new flow), 100..=100000.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    pub rate: u64,
    /// How often control looks at the manifest, in milliseconds, 1..=1000.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub poll_ms: u64,
    /// Where control reads the services from: one manifest file, or a
    /// directory of 100 services per file where a change rewrites one file.
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

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateLatency {
    /// Where control read the services from.
    pub source: Source,
    /// Services loaded.
    pub services: u32,
    /// Changes timed.
    pub changes: u32,
    /// Control's poll interval, ms.
    pub poll_ms: u64,
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
/// Not root, a process that does not start, or a change that never reaches
/// the backend within 60 s.
pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.return_path != ReturnPath::Dsr,
        "--return-path dsr: the client's packet reaches the backend unchanged (service port 80), so a change of target port cannot be seen; measure snat or routed"
    );
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
    println!(
        "\nupdate latency (manifest write → first packet at the new backend port), {} services, return path {}, {} changes, control --poll-ms {}, probes at {} pps:\n\n| p50 ms | p99 ms | min ms | max ms |\n|---|---|---|---|\n| {:.1} | {:.1} | {:.1} | {:.1} |",
        res.services, res.return_path.name(), res.changes, res.poll_ms, res.rate, res.p50_ms, res.p99_ms, res.min_ms, res.max_ms
    );
    println!(
        "update-latency: source={} services={} changes={} p50_ms={:.1} p99_ms={:.1}",
        res.source.name(),
        res.services,
        res.changes,
        res.p50_ms,
        res.p99_ms
    );
    std::fs::write(
        args.out.join("update-latency.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    Ok(())
}

fn measure(args: &Args, bins: &Bins, topo: &Topology) -> Result<UpdateLatency> {
    let dir = args.out.join("update-latency");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = |n: &str| args.out.join("logs").join(format!("update-{n}.log"));
    let in_ns = |role: &str, prog: &Path| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &topo.ns(role)]).arg(prog);
        c
    };
    let port = |i: u32| BACKEND_PORT + 1 + i as u16;
    let full = manifest_with(args.services, &[1, 2], BACKEND_PORT, Some((1, port(0))));
    // The file a change rewrites, its text for change `i`, and what control reads.
    let (path, text_of, manifest): (_, Box<dyn Fn(u32) -> String>, _) = match args.source {
        Source::Manifest => {
            let path = dir.join("manifest.yaml");
            write_atomically(&path, &full)?;
            let n = args.services;
            let text_of =
                Box::new(move |i: u32| manifest_with(n, &[1, 2], BACKEND_PORT, Some((1, port(i)))));
            (path.clone(), text_of, path)
        }
        Source::ManifestDir => {
            let mdir = dir.join("manifests");
            std::fs::create_dir_all(&mdir)?;
            let files = split_list(&full, SERVICES_PER_FILE as usize);
            for (f, text) in files.iter().enumerate() {
                write_atomically(&mdir.join(format!("svc-{f:05}.yaml")), text)?;
            }
            // Service 0 is in the first file, which holds the first
            // SERVICES_PER_FILE services of the full manifest.
            let n = args.services.min(SERVICES_PER_FILE);
            let text_of =
                Box::new(move |i: u32| manifest_with(n, &[1, 2], BACKEND_PORT, Some((1, port(i)))));
            debug_assert_eq!(text_of(0), files[0]);
            (mdir.join("svc-00000.yaml"), text_of, mdir)
        }
    };
    let shm = dir.join("shm");
    let mut c = Command::new(&bins.control);
    c.arg("run")
        .arg("--manifest")
        .arg(&manifest)
        .arg("--shm-dir")
        .arg(&shm)
        .args(["--poll-ms", &args.poll_ms.to_string()])
        .args(["--return-path", args.return_path.name()])
        .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"]);
    let _control = Proc::spawn("clustergate-control", c, &log("control"))?;
    let mut g = in_ns("gw", &bins.gateway);
    g.args(["run", "--interface", "g0", "--interface", "g1", "--shm-dir"])
        .arg(&shm)
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
    let t = std::time::Instant::now();
    while !matches!(http_get_in(&topo.ns("gw"), 10257, "/healthz"), Ok((200, _))) {
        if let Ok(Some(st)) = gateway.child_status() {
            bail!("clustergate exited ({st}):\n{}", tail(&log("gateway")));
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "gateway not healthy after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let bound = (args.changes as f64 * 5.0 + 60.0).min(600.0);
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
    .args(["--duration-s", &bound.to_string()]);
    let _pktgen = Proc::spawn("pktgen", p, &log("pktgen"))?;
    // The first port proves the path before anything is timed.
    wait_port(&mut sink, port(0), &log("sink"))?;
    let mut lat = Vec::with_capacity(args.changes as usize);
    for i in 1..=args.changes {
        crate::compare::check_stop()?;
        let written = write_atomically(&path, &text_of(i))?;
        let seen = wait_port(&mut sink, port(i), &log("sink"))?;
        let ms = seen.saturating_sub(written) as f64 / 1e6;
        lat.push(ms);
        if i % 10 == 0 || i == args.changes {
            progress(&format!("    change {i}/{}: {ms:.1} ms", args.changes));
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
        changes: args.changes,
        poll_ms: args.poll_ms,
        rate: args.rate,
        return_path: args.return_path,
        p50_ms: quantile(&sorted, 0.5),
        p99_ms: quantile(&sorted, 0.99),
        min_ms: sorted.first().copied().unwrap_or(0.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        latencies_ms: lat,
    })
}

/// Splits the `kind: List` manifest `list` (of `manifest_with`: a Service
/// and its EndpointSlice per service) into Lists of `per_file` services each.
fn split_list(list: &str, per_file: usize) -> Vec<String> {
    const HEADER: &str = "apiVersion: v1\nkind: List\nitems:\n";
    const SERVICE: &str = "- apiVersion: v1\n  kind: Service\n";
    let body = list.strip_prefix(HEADER).unwrap_or(list);
    let starts: Vec<usize> = body.match_indices(SERVICE).map(|(i, _)| i).collect();
    starts
        .chunks(per_file)
        .enumerate()
        .map(|(c, chunk)| {
            let from = chunk[0];
            let to = starts
                .get((c + 1) * per_file)
                .copied()
                .unwrap_or(body.len());
            format!("{HEADER}{}", &body[from..to])
        })
        .collect()
}

/// The sink's first packet at `port`: its CLOCK_MONOTONIC time.
fn wait_port(sink: &mut Proc, port: u16, log: &Path) -> Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ensure!(!left.is_zero(), "no packet reached port {port} within 60 s");
        let v = sink.event("first-port", left, log)?;
        if v["port"].as_u64() == Some(u64::from(port)) {
            return v["mono_ns"].as_u64().context("first-port without mono_ns");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_splits_into_files_of_whole_services() {
        let full = manifest_with(250, &[1, 2], BACKEND_PORT, Some((1, 7000)));
        let files = split_list(&full, 100);
        assert_eq!(files.len(), 3);
        assert_eq!(
            files[0],
            manifest_with(100, &[1, 2], BACKEND_PORT, Some((1, 7000)))
        );
        assert_eq!(files[2].matches("kind: Service\n").count(), 50);
        assert_eq!(files[2].matches("kind: EndpointSlice\n").count(), 50);
        assert!(files[2].contains("name: svc-249,"));
        let joined: String = files
            .iter()
            .map(|f| {
                f.strip_prefix("apiVersion: v1\nkind: List\nitems:\n")
                    .expect("every file is a List")
            })
            .collect();
        assert_eq!(
            format!("apiVersion: v1\nkind: List\nitems:\n{joined}"),
            full
        );
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
