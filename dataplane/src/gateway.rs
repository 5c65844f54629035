//! `clustergate run`: the AF_XDP gateway.
//!
//! The main thread sets everything up (steering program, sockets through the
//! workers, next hops), drops the capabilities it no longer needs, and then
//! runs the management loop: it follows the snapshots (and keeps the
//! steering maps and the kept-resolved neighbours in step with them),
//! refreshes the next hops, answers resolution requests from the workers,
//! supervises the workers and stops everything on SIGTERM/SIGINT. Workers are
//! pinned threads running [`clustergate_dataplane::io::worker::run`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use clap::Args;
use clustergate_dataplane::conntrack::{self, Conntrack};
use clustergate_dataplane::flow::ip_from16;
use clustergate_dataplane::io::nexthop::{self, NextHops, Resolver};
use clustergate_dataplane::io::steer::{self, Steering};
use clustergate_dataplane::io::worker::{self, OpenedSocket, Shared, WorkerSpec, WorkerStats};
use clustergate_dataplane::io::xsk::{Iface, XskOptions, ZeroCopy};
use clustergate_dataplane::snapshot::{self, PollOutcome, TableHandle, Watcher};
use clustergate_dataplane::table::Table;
use tracing::{error, info, warn};

use crate::gateway_http::{self, Status};

/// Flags of `clustergate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to serve (repeat for the two-armed topology: client side and
    /// backend side). Every worker serves every interface.
    #[arg(long = "interface", required = true, value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Snapshot directory written by `clustergate-control`.
    #[arg(long, default_value = snapshot::DEFAULT_DIR)]
    pub shm_dir: PathBuf,
    /// Cores to pin one worker each on, e.g. `0,1` or `2-5`.
    #[arg(long, default_value = "0", value_parser = parse_cores)]
    pub cores: CoreList,
    /// Queues per interface (0..N); worker `w` polls queues w, w+W, ….
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=steer::MAX_QUEUES as i64))]
    pub queues: u32,
    /// Prometheus metrics, `/healthz` and `/livez` on this address.
    #[arg(long, default_value = "127.0.0.1:10257")]
    pub metrics: SocketAddr,
    /// The proxy name this gateway serves (control's `--proxy-name`); a label
    /// on every metric.
    #[arg(long, default_value = "clustergate")]
    pub proxy_name: String,
    /// Connection-table capacity (flows per IP family).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub flows: u32,
    /// Zero-copy: `auto` tries it and falls back to copy mode; `never`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "never"])]
    pub zero_copy: String,
    /// Entries in each AF_XDP ring (a power of two, 64..=16384).
    #[arg(long, default_value_t = 2048, value_parser = parse_ring)]
    pub ring_size: u32,
    /// Snapshot poll interval in milliseconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub poll_ms: u64,
    /// Exit after this many seconds (0: run until SIGTERM); for tests.
    #[arg(long, default_value_t = 0)]
    pub exit_after_s: u64,
    /// Tests only: the first worker panics after receiving this many frames.
    #[arg(long, hide = true)]
    pub inject_worker_fault: Option<u64>,
}

/// A parsed `--cores`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

fn parse_cores(s: &str) -> Result<CoreList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        let b: usize = b
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        if a > b {
            return Err(format!("range {part:?} runs backwards"));
        }
        for c in a..=b {
            if out.contains(&c) {
                return Err(format!("core {c} is listed twice"));
            }
            out.push(c);
        }
    }
    if out.is_empty() || out.len() > 1024 {
        return Err("give 1 to 1024 cores".into());
    }
    Ok(CoreList(out))
}

fn parse_ring(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(64..=16384).contains(&v) || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two in 64..=16384"));
    }
    Ok(v)
}

/// How often the next hops are re-read from the kernel.
const REFRESH_HOPS: Duration = Duration::from_millis(500);
/// The same address is asked to be resolved at most this often.
const TRIGGER_EVERY: Duration = Duration::from_millis(500);
/// After a new table, the backends' neighbours appear within milliseconds:
/// refresh this often for [`EAGER_FOR`], not every [`REFRESH_HOPS`], so the
/// first packets to new backends are not dropped for half a second. (A
/// resolution request refreshes once at once; it does not extend this, so a
/// neighbour that never resolves cannot keep the dumps running every 20 ms.)
const EAGER_REFRESH: Duration = Duration::from_millis(20);
/// How long eager refreshing lasts.
const EAGER_FOR: Duration = Duration::from_secs(1);

struct WorkerHandle {
    core: usize,
    stats: Arc<Mutex<WorkerStats>>,
    join: Option<JoinHandle<()>>,
}

/// Runs the gateway until SIGTERM/SIGINT (or `--exit-after-s`).
pub fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    // Interfaces and cores first: a typo is reported before anything changes.
    let mut ifaces = Vec::new();
    for (slot, name) in args.interfaces.iter().enumerate() {
        if ifaces.iter().any(|i: &Iface| &i.name == name) {
            bail!("--interface {name} is given twice");
        }
        let ifindex =
            nexthop::ifindex_by_name(name).with_context(|| format!("--interface {name}"))?;
        let rxq = rx_queues(name);
        if let Some(n) = rxq {
            if args.queues > n {
                bail!(
                    "--queues {} but interface {name} has {n} receive queue(s)",
                    args.queues
                );
            }
        }
        ifaces.push(Iface {
            name: name.clone(),
            ifindex,
            slot: slot as u32,
        });
    }
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for c in &args.cores.0 {
        if !available.contains(c) {
            bail!("--cores: core {c} is not available to this process (available: {available:?})");
        }
    }
    let workers = args.cores.0.len() as u32;
    if workers > args.queues {
        bail!(
            "--cores lists {workers} cores but --queues is {}: every worker needs a queue",
            args.queues
        );
    }
    let xsk = XskOptions {
        ring_size: args.ring_size,
        zero_copy: if args.zero_copy == "never" {
            ZeroCopy::Never
        } else {
            ZeroCopy::Auto
        },
        ..XskOptions::default()
    };

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }

    // The table: whatever is published now (or an empty one until control
    // publishes).
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(&args.shm_dir, Arc::clone(&handle));
    let first = watcher.poll();
    report_poll(&watcher, first);

    let ct = Arc::new(Conntrack::new(&conntrack::Config {
        capacity: args.flows as usize,
        ..conntrack::Config::default()
    }));

    let named: Vec<(String, u32)> = ifaces.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
    let mut steering = Steering::load(&named).context("loading the XDP steering program")?;
    for (i, m) in ifaces.iter().zip(steering.attach_modes()) {
        info!(interface = %i.name, "XDP steering program attached ({m:?} mode)");
    }
    let served: Vec<u32> = ifaces.iter().map(|i| i.ifindex).collect();
    let mut resolver = Resolver::new(&served).context("opening netlink for next hops")?;
    let hops = Arc::new(ArcSwap::from_pointee(
        resolver
            .refresh()
            .context("reading routes and neighbours")?,
    ));
    let table = handle.load_full();
    let synced = steering
        .sync(&table)
        .context("filling the steering maps from the table")?;
    info!(
        frontends = synced.frontends,
        backends = synced.backends,
        "steering maps filled"
    );
    keep_backends_resolved(&mut resolver, &table);

    let (resolve_tx, resolve_rx) = sync_channel::<IpAddr>(1024);
    let shared = Shared {
        table: Arc::clone(&handle),
        hops: Arc::clone(&hops),
        conntrack: Arc::clone(&ct),
        stop: Arc::clone(&stop),
        resolve: resolve_tx,
        epoch: started,
        panic_after_rx: None,
    };

    // Workers: each pins itself, opens its sockets, reports them, drops
    // every capability, and polls.
    let (opened_tx, opened_rx) = sync_channel::<(usize, Result<Vec<OpenedSocket>, String>)>(64);
    let mut handles = Vec::new();
    for (w, &core) in args.cores.0.iter().enumerate() {
        let queues: Vec<u32> = (0..args.queues)
            .filter(|q| q % workers == w as u32)
            .collect();
        let spec = WorkerSpec {
            ifaces: ifaces.clone(),
            queues,
            xsk,
        };
        let mut shared = shared.clone();
        if w == 0 {
            shared.panic_after_rx = args.inject_worker_fault;
        }
        let stats = Arc::new(Mutex::new(WorkerStats::default()));
        let stats2 = Arc::clone(&stats);
        let opened_tx = opened_tx.clone();
        let join = std::thread::Builder::new()
            .name(format!("cg-worker-{core}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    warn!(core, "could not pin the worker to its core");
                }
                match worker::open(&spec) {
                    Ok((ports, opened)) => {
                        let _ = opened_tx.send((w, Ok(opened)));
                        drop(opened_tx);
                        if let Err(e) = drop_all_caps() {
                            warn!(core, "could not drop the worker's capabilities: {e}");
                        }
                        worker::run(ports, &shared, &stats2);
                    }
                    Err(e) => {
                        let _ = opened_tx.send((w, Err(e.to_string())));
                    }
                }
            })
            .context("spawning a worker thread")?;
        handles.push(WorkerHandle {
            core,
            stats,
            join: Some(join),
        });
    }
    drop(opened_tx);
    let mut setup_error = None;
    for _ in 0..handles.len() {
        match opened_rx.recv_timeout(Duration::from_secs(10)) {
            Ok((_, Ok(sockets))) => {
                for s in sockets {
                    if let Err(e) = steering.register_socket(s.slot, s.queue, s.fd) {
                        setup_error.get_or_insert_with(|| format!("{e}"));
                    }
                }
            }
            Ok((w, Err(e))) => {
                setup_error
                    .get_or_insert_with(|| format!("worker on core {}: {e}", args.cores.0[w]));
            }
            Err(_) => {
                setup_error
                    .get_or_insert_with(|| "a worker did not open its sockets within 10 s".into());
                break;
            }
        }
    }
    if let Some(e) = setup_error {
        stop.store(true, Ordering::Relaxed);
        join_all(&mut handles);
        let _ = steering.detach();
        bail!("setting up the AF_XDP sockets: {e}");
    }
    // Set-up is done: keep only what the management loop needs.
    if let Err(e) = keep_caps(&[caps::Capability::CAP_NET_ADMIN, caps::Capability::CAP_BPF]) {
        warn!("could not drop capabilities: {e}");
    }
    info!(
        interfaces = ?args.interfaces,
        cores = ?args.cores.0,
        queues = args.queues,
        generation = handle.generation(),
        "gateway running"
    );

    let status = Arc::new(Mutex::new(Status::default()));
    let http = gateway_http::Server {
        proxy_name: args.proxy_name.clone(),
        status: Arc::clone(&status),
        workers: handles
            .iter()
            .map(|h| (h.core, Arc::clone(&h.stats)))
            .collect(),
        conntrack: Arc::clone(&ct),
    };
    gateway_http::spawn(args.metrics, http)
        .with_context(|| format!("--metrics {}", args.metrics))?;

    let outcome = manage(
        &args,
        &stop,
        &mut watcher,
        &mut steering,
        &mut resolver,
        &hops,
        &resolve_rx,
        &mut handles,
        &status,
        started,
    );
    stop.store(true, Ordering::Relaxed);
    join_all(&mut handles);
    match steering.detach() {
        Ok(()) => info!("XDP steering program detached"),
        Err(e) => error!("detaching the XDP program: {e}"),
    }
    outcome
}

#[allow(clippy::too_many_arguments)] // reason: the management loop's state, kept explicit
fn manage(
    args: &RunArgs,
    stop: &AtomicBool,
    watcher: &mut Watcher,
    steering: &mut Steering,
    resolver: &mut Resolver,
    hops: &ArcSwap<NextHops>,
    resolve_rx: &Receiver<IpAddr>,
    handles: &mut [WorkerHandle],
    status: &Mutex<Status>,
    started: Instant,
) -> Result<()> {
    let mut last_refresh = Instant::now();
    let mut eager_until = Instant::now() + EAGER_FOR;
    let mut triggered: HashMap<IpAddr, Instant> = HashMap::new();
    let mut applied_at = (watcher.handle().generation() > 0).then(std::time::SystemTime::now);
    let poll = Duration::from_millis(args.poll_ms);
    loop {
        if stop.load(Ordering::Relaxed) {
            info!("stop requested: draining the workers");
            return Ok(());
        }
        if args.exit_after_s > 0 && started.elapsed() >= Duration::from_secs(args.exit_after_s) {
            info!("--exit-after-s reached");
            return Ok(());
        }
        // A worker that left its loop while we were not stopping faulted.
        for h in handles.iter_mut() {
            if h.join.as_ref().is_some_and(JoinHandle::is_finished) {
                let why = match h.join.take().map(JoinHandle::join) {
                    Some(Err(p)) => panic_message(&p),
                    _ => "left its loop".to_string(),
                };
                error!(core = h.core, "worker faulted: {why}");
                if let Ok(mut s) = status.lock() {
                    s.fault = Some(format!("worker on core {} faulted: {why}", h.core));
                }
                bail!("worker on core {} faulted: {why}", h.core);
            }
        }

        let outcome = watcher.poll();
        report_poll(watcher, outcome);
        if let PollOutcome::Applied { .. } = outcome {
            let table = watcher.handle().load_full();
            match steering.sync(&table) {
                Ok(s) => info!(
                    generation = table.generation(),
                    frontends = s.frontends,
                    backends = s.backends,
                    added = s.added,
                    removed = s.removed,
                    "steering maps updated"
                ),
                Err(e) => error!("updating the steering maps: {e}"),
            }
            keep_backends_resolved(resolver, &table);
            applied_at = Some(std::time::SystemTime::now());
            eager_until = Instant::now() + EAGER_FOR;
        }

        let now = Instant::now();
        let since = now.duration_since(last_refresh);
        let mut refresh = since >= REFRESH_HOPS || (now < eager_until && since >= EAGER_REFRESH);
        while let Ok(addr) = resolve_rx.try_recv() {
            let due = triggered
                .get(&addr)
                .is_none_or(|t| now.duration_since(*t) >= TRIGGER_EVERY);
            if due {
                triggered.insert(addr, now);
                if let Err(e) = resolver.trigger(addr) {
                    warn!(%addr, "asking the kernel to resolve a neighbour: {e}");
                }
                refresh = true;
            }
        }
        triggered.retain(|_, t| now.duration_since(*t) < TRIGGER_EVERY * 4);
        if refresh {
            match resolver.refresh() {
                Ok(h) => hops.store(Arc::new(h)),
                Err(e) => warn!("reading routes and neighbours: {e}"),
            }
            last_refresh = now;
        }

        if let Ok(mut s) = status.lock() {
            s.beat = Some(now);
            s.generation = watcher.handle().generation();
            s.applied_at = applied_at;
            s.snapshots = watcher.stats.clone();
            if let Ok(st) = steering.stats() {
                s.steer = st;
            }
        }
        std::thread::sleep(poll);
    }
}

fn report_poll(w: &Watcher, outcome: PollOutcome) {
    match outcome {
        PollOutcome::Applied { generation } => info!(generation, "snapshot applied"),
        PollOutcome::Refused {
            fault,
            repeated: false,
        } => warn!(
            "snapshot refused ({fault}): {}; still forwarding generation {}",
            w.stats.last_refusal.as_deref().unwrap_or("?"),
            w.handle().generation()
        ),
        _ => {}
    }
}

fn keep_backends_resolved(resolver: &mut Resolver, table: &Table) {
    let mut addrs: Vec<IpAddr> = table
        .backend_records()
        .iter()
        .map(|b| ip_from16(b.addr))
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    if let Err(e) = resolver.keep_resolved(&addrs) {
        warn!("keeping backend neighbours resolved: {e}");
    }
}

fn join_all(handles: &mut [WorkerHandle]) {
    for h in handles.iter_mut() {
        if let Some(j) = h.join.take() {
            if let Err(p) = j.join() {
                error!(core = h.core, "worker faulted: {}", panic_message(&p));
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_string()
    }
}

/// Receive queues of an interface, from sysfs (None when unreadable).
fn rx_queues(name: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{name}/queues")).ok()?;
    let n = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    (n > 0).then_some(n as u32)
}

/// Drops every capability of the calling thread (workers need none to poll
/// their rings).
fn drop_all_caps() -> Result<(), caps::errors::CapsError> {
    caps::clear(None, caps::CapSet::Effective)?;
    caps::clear(None, caps::CapSet::Permitted)?;
    caps::clear(None, caps::CapSet::Inheritable)
}

/// Keeps only `keep` in the calling thread's effective and permitted sets
/// (threads spawned afterwards inherit them).
fn keep_caps(keep: &[caps::Capability]) -> Result<(), caps::errors::CapsError> {
    let have = caps::read(None, caps::CapSet::Permitted)?;
    let set: caps::CapsHashSet = keep.iter().copied().filter(|c| have.contains(c)).collect();
    caps::set(None, caps::CapSet::Effective, &set)?;
    caps::set(None, caps::CapSet::Permitted, &set)?;
    caps::clear(None, caps::CapSet::Inheritable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("0").map(|c| c.0), Ok(vec![0]));
        assert_eq!(parse_cores("0,2-4").map(|c| c.0), Ok(vec![0, 2, 3, 4]));
        assert!(parse_cores("1,1").expect_err("duplicate").contains("twice"));
        assert!(parse_cores("3-1")
            .expect_err("backwards")
            .contains("backwards"));
        assert!(parse_cores("x")
            .expect_err("not a number")
            .contains("not a core"));
        assert!(parse_cores("").is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring("2048"), Ok(2048));
        assert!(parse_ring("1000").is_err());
        assert!(parse_ring("32").is_err());
    }
}
