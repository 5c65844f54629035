//! `clustergate-bench bounce`: the minimal AF_XDP forwarder, the ceiling the
//! gateway is compared against.
//!
//! Owns: a forwarder that uses the gateway's own I/O path (the XDP steering
//! program filled from the same table, one [`Ports`] per worker with both
//! interfaces on one shared UMEM, the same batch size, ring sizes and poll
//! loop as `dataplane/src/io/worker.rs`) and, per frame, only a fixed
//! rewrite: Ethernet addresses, IPv4 or IPv6 destination, L4 destination
//! port, with incremental checksum updates. Backend `i = source port % N + 1`
//! (its address of the frame's family).
//!
//! Must never: look anything up (no table, no conntrack, no next-hop
//! resolution: that is the difference being measured), allocate in the
//! loop, or run unbounded (`--exit-after-s`).
//!
//! Differences from the gateway besides the lookup: the TTL is left as it is
//! (the gateway decrements it, one more 16-bit checksum update), and frames
//! that cannot be forwarded are released, never handed to the kernel.
//!
//! stdout carries two JSON lines, [`BounceEvent::Ready`] once every socket
//! is registered and [`BounceEvent::Result`] at the end; logs go to stderr.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::Proto;
use clustergate_dataplane::io::nexthop::ifindex_by_name;
use clustergate_dataplane::io::steer::Steering;
use clustergate_dataplane::io::xsk::{FrameToken, Iface, Ports, XskOptions, RX_BATCH};
use clustergate_dataplane::packet::checksum::{update128, update16, update32};
use clustergate_dataplane::table::Table;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::layout::{
    backend_addr, backend_ip, backend_mac, parse_family, vip_ip, Family, BACKEND_PORT, GW_LAN_MAC,
    MAX_BACKENDS, MAX_SERVICES, SERVICE_PORT,
};

/// Most workers (one per queue).
const MAX_QUEUES: u32 = 16;
/// Longest bounded run.
const MAX_EXIT_AFTER_S: u64 = 3600;
/// Longest a drain waits for TX completions (as the gateway's worker).
const DRAIN_LIMIT: Duration = Duration::from_millis(500);
/// How long start-up waits for a worker to open its sockets.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the main thread looks at the stop flag and the deadline.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Flags of `clustergate-bench bounce`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Interface the clients' packets arrive on.
    #[arg(long = "in", value_name = "IF", default_value = "g0")]
    pub input: String,
    /// Interface the rewritten packets leave on (towards the backends).
    #[arg(long = "out", value_name = "IF", default_value = "g1")]
    pub output: String,
    /// Queues, 1..=16: one worker per queue q in 0..N, on (in q, out q).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub queues: u32,
    /// Cores to pin the workers to (comma-separated, one per queue): worker i
    /// on the i-th. Unpinned when absent.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub cores: Vec<usize>,
    /// Backends, 1..=16: a frame from source port p goes to backend p % N + 1.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub backends: u32,
    /// Services (VIPs) the steering program redirects, 1..=65536, each on
    /// port 80 for UDP and TCP.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub services: u32,
    /// Stop after this many seconds, 1..=3600.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub exit_after_s: u64,
    /// The family of the services' VIPs the steering program redirects: 4
    /// or 6 (either family is rewritten).
    #[arg(long, default_value = "4", value_parser = parse_family)]
    pub family: Family,
}

/// One worker's counters, in the result line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerResult {
    /// The queue the worker served on both interfaces.
    pub queue: u32,
    /// Frames taken off its RX rings (both interfaces).
    pub rx: u64,
    /// Frames put on its TX ring.
    pub tx: u64,
    /// Frames released without being sent: not Ethernet/IPv4/UDP-or-TCP, a
    /// fragment, truncated, received on `--out`, or no room on the TX ring.
    pub dropped: u64,
}

/// The result line: `{"event":"result","forwarded":N,"dropped":N,"workers":[…]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BounceResult {
    /// Frames transmitted on `--out`, all workers.
    pub forwarded: u64,
    /// Frames released without being sent, all workers.
    pub dropped: u64,
    /// Per worker, in queue order.
    pub workers: Vec<WorkerResult>,
}

/// A line of `bounce`'s stdout (parse each line with `serde_json::from_str`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum BounceEvent {
    /// `{"event":"ready"}`: the program is attached, the maps are filled and
    /// every socket is registered.
    Ready,
    /// The counters, once stopped.
    Result(BounceResult),
}

/// Checks every flag (also for `Args` built by another module, not by clap).
fn validate(args: &Args) -> Result<()> {
    ensure!(!args.input.is_empty(), "--in: an interface name is needed");
    ensure!(
        !args.output.is_empty(),
        "--out: an interface name is needed"
    );
    ensure!(
        args.input != args.output,
        "--in and --out are both {:?}: two interfaces are needed",
        args.input
    );
    ensure!(
        (1..=MAX_QUEUES).contains(&args.queues),
        "--queues must be 1..={MAX_QUEUES}, got {}",
        args.queues
    );
    ensure!(
        args.cores.is_empty() || args.cores.len() == args.queues as usize,
        "--cores lists {} cores but --queues is {}: give one core per worker",
        args.cores.len(),
        args.queues
    );
    ensure!(
        (1..=MAX_BACKENDS).contains(&args.backends),
        "--backends must be 1..={MAX_BACKENDS}, got {}",
        args.backends
    );
    ensure!(
        (1..=MAX_SERVICES).contains(&args.services),
        "--services must be 1..={MAX_SERVICES}, got {}",
        args.services
    );
    ensure!(
        (1..=MAX_EXIT_AFTER_S).contains(&args.exit_after_s),
        "--exit-after-s must be 1..={MAX_EXIT_AFTER_S}, got {}",
        args.exit_after_s
    );
    Ok(())
}

/// The services the gateway would have for the same scenario: VIP k port 80,
/// UDP and TCP, each with backends 1..=N on port 8080. Only the steering
/// program sees them.
fn service_specs(services: u32, backends: u32, family: Family) -> Vec<ServiceSpec> {
    let endpoints: Vec<BackendSpec> = (1..=backends)
        .map(|i| BackendSpec::ready(backend_ip(family, i), BACKEND_PORT))
        .collect();
    (0..services)
        .flat_map(|k| {
            [Proto::Udp, Proto::Tcp].map(|proto| {
                ServiceSpec::cluster_ip(vip_ip(family, k), SERVICE_PORT, proto, endpoints.clone())
            })
        })
        .collect()
}

/// Ethernet header length (no VLAN tag: those are dropped).
const ETH_LEN: usize = 14;
/// EtherType of IPv4.
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// EtherType of IPv6.
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
/// The IPv6 header (RFC 8200 §3): payload length, next header, destination.
const IPV6_LEN: usize = 40;
const IPV6_PAYLOAD_LEN: usize = 4;
const IPV6_NEXT: usize = 6;
const IPV6_DST: usize = 24;
/// IP protocol numbers.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offsets inside the IPv4 header (RFC 791 §3.1).
const IPV4_TOTAL_LEN: usize = 2;
const IPV4_FRAG: usize = 6;
const IPV4_PROTO: usize = 9;
const IPV4_CSUM: usize = 10;
const IPV4_DST: usize = 16;
/// Flags and offset: the MF bit and the 13-bit fragment offset.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// Offsets inside the UDP / TCP header.
const L4_SRC_PORT: usize = 0;
const L4_DST_PORT: usize = 2;
const UDP_CSUM: usize = 6;
const TCP_CSUM: usize = 16;
const UDP_LEN: usize = 8;
const TCP_MIN_LEN: usize = 20;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the `len`-byte frame at the start of `frame` towards backend
/// `source port % backends + 1`, and returns that backend; `None` (frame
/// untouched) if it is not Ethernet II + IPv4 (any IHL, not a fragment) or
/// IPv6 (no extension header) + UDP or TCP, is truncated, or `backends` is 0.
///
/// Ethernet: dst = the backend's MAC, src = g1's. IPv4: dst = the backend's
/// address, header checksum updated (RFC 1624 eqn. 3). L4: dst port = 8080,
/// checksum updated for the pseudo-header address and the port; a UDP
/// checksum of 0 (none) stays 0, a computed 0 is sent as 0xffff (RFC 768).
/// The TTL is not touched.
fn rewrite(frame: &mut [u8], len: usize, backends: u32) -> Option<u32> {
    let f = frame.get_mut(..len)?;
    if backends == 0 {
        return None;
    }
    if f.get(12..14)? == ETHERTYPE_IPV6 {
        return rewrite_v6(f, backends);
    }
    if f.get(12..14)? != ETHERTYPE_IPV4 {
        return None;
    }
    let l3 = ETH_LEN;
    let ver_ihl = *f.get(l3)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || f.len() < l3 + ihl {
        return None;
    }
    let total = usize::from(be16(f, l3 + IPV4_TOTAL_LEN));
    if total < ihl || f.len() < l3 + total || be16(f, l3 + IPV4_FRAG) & IPV4_MF_OR_OFFSET != 0 {
        return None;
    }
    let l4 = l3 + ihl;
    let l4_len = total - ihl;
    let (csum_at, udp) = match f[l3 + IPV4_PROTO] {
        IPPROTO_UDP if l4_len >= UDP_LEN => (l4 + UDP_CSUM, true),
        IPPROTO_TCP if l4_len >= TCP_MIN_LEN => (l4 + TCP_CSUM, false),
        _ => return None,
    };
    let backend = u32::from(be16(f, l4 + L4_SRC_PORT)) % backends + 1;
    let new_addr = backend_addr(backend).octets();

    f[..6].copy_from_slice(&backend_mac(backend));
    f[6..12].copy_from_slice(&GW_LAN_MAC);

    let dst_at = l3 + IPV4_DST;
    let old_addr: [u8; 4] = [f[dst_at], f[dst_at + 1], f[dst_at + 2], f[dst_at + 3]];
    f[dst_at..dst_at + 4].copy_from_slice(&new_addr);
    let ip_csum = be16(f, l3 + IPV4_CSUM);
    put16(f, l3 + IPV4_CSUM, update32(ip_csum, old_addr, new_addr));

    let old_port = be16(f, l4 + L4_DST_PORT);
    put16(f, l4 + L4_DST_PORT, BACKEND_PORT);
    let l4_csum = be16(f, csum_at);
    if !(udp && l4_csum == 0) {
        let c = update16(
            update32(l4_csum, old_addr, new_addr),
            old_port,
            BACKEND_PORT,
        );
        put16(f, csum_at, if udp && c == 0 { 0xffff } else { c });
    }
    Some(backend)
}

/// [`rewrite`] of an IPv6 frame: the same, with the 16-byte destination
/// (no header checksum; the L4 checksum updated for it, RFC 1624 eqn. 3
/// word by word).
fn rewrite_v6(f: &mut [u8], backends: u32) -> Option<u32> {
    let l3 = ETH_LEN;
    if f.len() < l3 + IPV6_LEN || f[l3] >> 4 != 6 {
        return None;
    }
    let l4_len = usize::from(be16(f, l3 + IPV6_PAYLOAD_LEN));
    let l4 = l3 + IPV6_LEN;
    if f.len() < l4 + l4_len {
        return None;
    }
    let (csum_at, udp) = match f[l3 + IPV6_NEXT] {
        IPPROTO_UDP if l4_len >= UDP_LEN => (l4 + UDP_CSUM, true),
        IPPROTO_TCP if l4_len >= TCP_MIN_LEN => (l4 + TCP_CSUM, false),
        _ => return None,
    };
    let backend = u32::from(be16(f, l4 + L4_SRC_PORT)) % backends + 1;
    let IpAddr::V6(new) = backend_ip(Family::V6, backend) else {
        return None;
    };
    let new_addr = new.octets();

    f[..6].copy_from_slice(&backend_mac(backend));
    f[6..12].copy_from_slice(&GW_LAN_MAC);

    let dst_at = l3 + IPV6_DST;
    let mut old_addr = [0u8; 16];
    old_addr.copy_from_slice(&f[dst_at..dst_at + 16]);
    f[dst_at..dst_at + 16].copy_from_slice(&new_addr);

    let old_port = be16(f, l4 + L4_DST_PORT);
    put16(f, l4 + L4_DST_PORT, BACKEND_PORT);
    let l4_csum = be16(f, csum_at);
    // UDP over IPv6 must carry a checksum (RFC 8200 §8.1); a 0 is left as it is.
    if !(udp && l4_csum == 0) {
        let c = update16(
            update128(l4_csum, &old_addr, &new_addr),
            old_port,
            BACKEND_PORT,
        );
        put16(f, csum_at, if udp && c == 0 { 0xffff } else { c });
    }
    Some(backend)
}

/// One worker's counters, with the reasons behind `dropped` (for the log).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    rx: u64,
    tx: u64,
    /// Not a frame bounce can rewrite.
    unforwardable: u64,
    /// No room on the TX ring.
    tx_ring_full: u64,
    /// Received on `--out`.
    on_out: u64,
}

impl Counters {
    fn result(&self, queue: u32) -> WorkerResult {
        WorkerResult {
            queue,
            rx: self.rx,
            tx: self.tx,
            dropped: self.unforwardable + self.tx_ring_full + self.on_out,
        }
    }
}

/// The gateway worker's poll loop, with [`rewrite`] in place of the core:
/// recycle, receive a batch per socket, rewrite, transmit on `out`, kick;
/// `poll(2)` after [`clustergate_dataplane::io::xsk::SPINS_BEFORE_WAIT`] empty rounds. Then drains.
fn poll_loop(mut ports: Ports, backends: u32, stop: &AtomicBool) -> Counters {
    let mut c = Counters::default();
    // `Ports` lists sockets interface by interface: slot 0 is `--in`, slot 1 `--out`.
    let port_of = |slot: u32| ports.ports().iter().position(|p| p.slot == slot);
    let (Some(port_in), Some(port_out)) = (port_of(0), port_of(1)) else {
        warn!("a worker has no socket on one of its interfaces");
        return c;
    };
    let nports = ports.ports().len();
    let mut rx: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut forward = [false; RX_BATCH];
    let mut tx: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut dropped: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut spins = 0u32;

    while !stop.load(Ordering::Relaxed) {
        ports.recycle();
        let mut work = 0usize;
        for port in 0..nports {
            let n = ports.receive(port, &mut rx);
            if n == 0 {
                continue;
            }
            work += n;
            c.rx += n as u64;
            if port != port_in {
                ports.release(&mut rx);
                c.on_out += n as u64;
                continue;
            }
            ports.with_frames(&mut rx, |frames, lens| {
                for ((frame, l), fwd) in frames.iter_mut().zip(lens.iter_mut()).zip(&mut forward) {
                    *fwd = rewrite(frame.buf, frame.len, backends).is_some();
                    *l = frame.len;
                }
            });
            for (t, &fwd) in rx.drain(..).zip(&forward[..n]) {
                if fwd {
                    tx.push(t);
                } else {
                    dropped.push(t);
                }
            }
            c.unforwardable += dropped.len() as u64;
            ports.release(&mut dropped);
            if !tx.is_empty() {
                // Every length is the received one, at least an Ethernet +
                // IPv4 + UDP header (`rewrite`).
                let queued = tx.len();
                let sent = ports.transmit(port_out, &mut tx);
                c.tx += sent as u64;
                c.tx_ring_full += (queued - sent) as u64;
            }
        }
        ports.idle(work, &mut spins);
    }

    // Drain: nothing more is received; what was sent gets its completions.
    ports.drain(DRAIN_LIMIT);
    if ports.in_flight() > 0 {
        warn!(
            in_flight = ports.in_flight(),
            "TX completions still outstanding after the drain"
        );
    }
    c
}

/// A socket a worker opened: (slot, queue, fd) for the XSKMAP.
type Opened = Vec<(u32, u32, RawFd)>;

struct WorkerThread {
    queue: u32,
    join: JoinHandle<Counters>,
}

fn spawn_worker(
    queue: u32,
    core: Option<usize>,
    ifaces: Vec<Iface>,
    backends: u32,
    stop: Arc<AtomicBool>,
    opened: std::sync::mpsc::SyncSender<(u32, Result<Opened, String>)>,
) -> Result<WorkerThread> {
    let join = std::thread::Builder::new()
        .name(format!("bounce-q{queue}"))
        .spawn(move || {
            if let Some(id) = core {
                if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                    warn!(queue, core = id, "could not pin the worker to its core");
                }
            }
            // Opened on the pinned thread, so the UMEM is first touched there.
            match Ports::open(&ifaces, &[queue], XskOptions::default()) {
                Ok(ports) => {
                    let fds = ports
                        .ports()
                        .iter()
                        .map(|p| {
                            info!(
                                interface = %p.ifname,
                                queue = p.queue,
                                mode = p.mode.label(),
                                "socket open"
                            );
                            (p.slot, p.queue, p.fd())
                        })
                        .collect();
                    let _ = opened.send((queue, Ok(fds)));
                    drop(opened);
                    poll_loop(ports, backends, &stop)
                }
                Err(e) => {
                    let _ = opened.send((queue, Err(e.to_string())));
                    Counters::default()
                }
            }
        })
        .with_context(|| format!("spawning the worker of queue {queue}"))?;
    Ok(WorkerThread { queue, join })
}

/// Stops and joins every worker; a worker that panicked is reported.
fn join_all(stop: &AtomicBool, workers: Vec<WorkerThread>) -> Result<Vec<(u32, Counters)>> {
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::with_capacity(workers.len());
    let mut panicked = Vec::new();
    for w in workers {
        match w.join.join() {
            Ok(c) => out.push((w.queue, c)),
            Err(_) => panicked.push(w.queue),
        }
    }
    ensure!(
        panicked.is_empty(),
        "the workers of queues {panicked:?} panicked"
    );
    Ok(out)
}

fn print_line(event: &BounceEvent) -> Result<()> {
    let line = serde_json::to_string(event).context("serializing a result line")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing to stdout")?;
    out.flush().context("flushing stdout")
}

/// Runs `clustergate-bench bounce`.
pub fn run(args: &Args) -> Result<()> {
    validate(args)?;
    if !args.cores.is_empty() {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        if let Some(c) = args.cores.iter().find(|c| !available.contains(c)) {
            bail!("--cores: core {c} is not available to this process (available: {available:?})");
        }
    }
    let in_index = ifindex_by_name(&args.input).with_context(|| format!("--in {}", args.input))?;
    let out_index =
        ifindex_by_name(&args.output).with_context(|| format!("--out {}", args.output))?;
    let ifaces = vec![
        Iface {
            name: args.input.clone(),
            ifindex: in_index,
            slot: 0,
        },
        Iface {
            name: args.output.clone(),
            ifindex: out_index,
            slot: 1,
        },
    ];
    let table = Table::build(
        1,
        0,
        &service_specs(args.services, args.backends, args.family),
    )
    .with_context(|| {
        format!(
            "building the table of --services {} × --backends {}",
            args.services, args.backends
        )
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }

    let named: Vec<(String, u32)> = ifaces.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
    let mut steering = Steering::load(&named).with_context(|| {
        format!(
            "loading the XDP steering program on --in {} and --out {}",
            args.input, args.output
        )
    })?;
    for (i, m) in ifaces.iter().zip(steering.attach_modes()) {
        info!(interface = %i.name, "XDP steering program attached ({m:?} mode)");
    }
    let synced = steering
        .sync(&table)
        .context("filling the steering maps from the table")?;
    info!(
        frontends = synced.frontends,
        backends = synced.backends,
        "steering maps filled"
    );
    drop(table);

    let deadline = Instant::now() + Duration::from_secs(args.exit_after_s);
    let (opened_tx, opened_rx) = sync_channel(MAX_QUEUES as usize);
    let mut workers = Vec::with_capacity(args.queues as usize);
    let mut setup_error: Option<String> = None;
    for q in 0..args.queues {
        match spawn_worker(
            q,
            args.cores.get(q as usize).copied(),
            ifaces.clone(),
            args.backends,
            Arc::clone(&stop),
            opened_tx.clone(),
        ) {
            Ok(w) => workers.push(w),
            Err(e) => {
                setup_error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    drop(opened_tx);
    for _ in 0..workers.len() {
        if setup_error.is_some() {
            break;
        }
        match opened_rx.recv_timeout(OPEN_TIMEOUT) {
            Ok((_, Ok(sockets))) => {
                for (slot, queue, fd) in sockets {
                    if let Err(e) = steering.register_socket(slot, queue, fd) {
                        setup_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            Ok((q, Err(e))) => {
                setup_error.get_or_insert_with(|| format!("worker of queue {q}: {e}"));
            }
            Err(_) => {
                setup_error.get_or_insert_with(|| {
                    format!(
                        "a worker did not open its sockets within {} s",
                        OPEN_TIMEOUT.as_secs()
                    )
                });
            }
        }
    }
    if let Some(e) = setup_error {
        let joined = join_all(&stop, workers);
        let _ = steering.detach();
        joined?;
        bail!("setting up the AF_XDP sockets: {e}");
    }
    info!(
        input = %args.input,
        output = %args.output,
        queues = args.queues,
        cores = ?args.cores,
        backends = args.backends,
        services = args.services,
        "bounce running"
    );
    print_line(&BounceEvent::Ready)?;

    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if workers.iter().any(|w| w.join.is_finished()) {
            warn!("a worker stopped early");
            break;
        }
        std::thread::sleep(STOP_POLL);
    }
    if stop.load(Ordering::Relaxed) {
        info!("signal received: stopping");
    } else {
        info!("--exit-after-s {} reached: stopping", args.exit_after_s);
    }
    let joined = join_all(&stop, workers);
    if let Err(e) = steering.detach() {
        warn!("detaching the XDP steering program: {e}");
    }
    let counters = joined?;

    let mut result = BounceResult::default();
    for (queue, c) in &counters {
        info!(
            queue,
            rx = c.rx,
            tx = c.tx,
            unforwardable = c.unforwardable,
            tx_ring_full = c.tx_ring_full,
            on_out = c.on_out,
            "worker counters"
        );
        let w = c.result(*queue);
        result.forwarded += w.tx;
        result.dropped += w.dropped;
        result.workers.push(w);
    }
    print_line(&BounceEvent::Result(result))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;
    use std::net::Ipv4Addr;

    use clap::Parser;
    use clustergate_dataplane::packet::checksum::{ipv4_header_checksum, l4_checksum_v4};
    use etherparse::{
        IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket,
        TransportSlice,
    };

    const CLIENT: [u8; 4] = [198, 18, 1, 2];
    const VIP: [u8; 4] = [198, 19, 0, 0];
    const SRC_MAC: [u8; 6] = [0x02, 0xcb, 0x01, 0, 0, 2];
    const DST_MAC: [u8; 6] = [0x02, 0xcb, 0x01, 0, 0, 1];

    #[derive(Clone, Copy, Debug)]
    enum L4 {
        Udp,
        Tcp,
    }

    fn expected(sport: u16, backends: u32) -> u32 {
        u32::from(sport) % backends + 1
    }

    /// A frame of exactly `total` bytes (Ethernet header included).
    fn frame(l4: L4, sport: u16, total: usize, options: &[u8]) -> Vec<u8> {
        let hdr = 14 + 20 + options.len() + if matches!(l4, L4::Udp) { 8 } else { 20 };
        let payload: Vec<u8> = (0..total - hdr).map(|i| (i * 7 + 3) as u8).collect();
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, CLIENT, VIP).unwrap();
        ip.options = options.try_into().unwrap();
        let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()));
        let mut out = Vec::with_capacity(total);
        match l4 {
            L4::Udp => b.udp(sport, 80).write(&mut out, &payload).unwrap(),
            L4::Tcp => b
                .tcp(sport, 80, 12345, 64240)
                .ack(777)
                .write(&mut out, &payload)
                .unwrap(),
        }
        assert_eq!(out.len(), total);
        out
    }

    /// Parses a rewritten frame and checks addresses, ports and checksums.
    fn check(out: &[u8], l4: L4, backend: u32) {
        let p = SlicedPacket::from_ethernet(out).unwrap();
        let eth = etherparse::Ethernet2Header::from_slice(out).unwrap().0;
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        let h = ip.header();
        let ihl = h.slice().len();
        assert_eq!(eth.destination, backend_mac(backend));
        assert_eq!(eth.source, GW_LAN_MAC);
        assert_eq!(h.destination_addr(), backend_addr(backend));
        assert_eq!(h.source_addr(), Ipv4Addr::from(CLIENT));
        assert_eq!(h.ttl(), 64, "TTL untouched");
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        assert_eq!(h.header_checksum(), ipv4_header_checksum(h.slice()));
        let total = usize::from(h.total_len());
        let l4_bytes = &out[14 + ihl..14 + total];
        let dst = backend_addr(backend).octets();
        match (l4, &p.transport) {
            (L4::Udp, Some(TransportSlice::Udp(u))) => {
                assert_eq!(u.destination_port(), BACKEND_PORT);
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&h.to_header(), u.payload());
                assert_eq!(u.checksum(), want.unwrap());
                let mut zeroed = l4_bytes.to_vec();
                zeroed[6..8].fill(0);
                let c = l4_checksum_v4(CLIENT, dst, 17, &zeroed);
                assert_eq!(u.checksum(), if c == 0 { 0xffff } else { c });
            }
            (L4::Tcp, Some(TransportSlice::Tcp(t))) => {
                assert_eq!(t.destination_port(), BACKEND_PORT);
                let want = t
                    .to_header()
                    .calc_checksum_ipv4(&h.to_header(), t.payload());
                assert_eq!(t.checksum(), want.unwrap());
                let mut zeroed = l4_bytes.to_vec();
                zeroed[16..18].fill(0);
                assert_eq!(t.checksum(), l4_checksum_v4(CLIENT, dst, 6, &zeroed));
            }
            (l4, t) => panic!("{l4:?}: transport {t:?}"),
        }
    }

    #[test]
    fn bounce_rewrites_udp_and_tcp() {
        for l4 in [L4::Udp, L4::Tcp] {
            for total in [64, 1500] {
                for (sport, backends) in [(1024u16, 4u32), (1027, 4), (5000, 1), (65535, 16)] {
                    let mut buf = frame(l4, sport, total, &[]);
                    let len = buf.len();
                    buf.resize(2048, 0xee); // a UMEM frame, longer than the packet
                    let got = rewrite(&mut buf, len, backends);
                    let want = expected(sport, backends);
                    assert_eq!(got, Some(want), "{l4:?} {total} {sport}");
                    check(&buf[..len], l4, want);
                    assert!(buf[len..].iter().all(|&b| b == 0xee), "wrote past len");
                }
            }
        }
    }

    #[test]
    fn bounce_respects_ihl_and_padding() {
        // IPv4 options (IHL 7), and Ethernet padding after a short packet.
        let (backend_a, backend_b) = (expected(2001, 4), expected(2002, 3));
        assert_eq!((backend_a, backend_b), (2, 2));
        for l4 in [L4::Udp, L4::Tcp] {
            let mut buf = frame(l4, 2001, 100, &[1, 1, 1, 1, 1, 1, 1, 0]);
            let len = buf.len();
            assert_eq!(rewrite(&mut buf, len, 4), Some(backend_a));
            check(&buf, l4, backend_a);

            let mut buf = frame(l4, 2002, if matches!(l4, L4::Udp) { 43 } else { 55 }, &[]);
            let ip_len = buf.len();
            buf.resize(60, 0);
            assert_eq!(rewrite(&mut buf, 60, 3), Some(backend_b));
            check(&buf, l4, backend_b);
            assert!(buf[ip_len..].iter().all(|&b| b == 0), "padding untouched");
        }
    }

    #[test]
    fn bounce_udp_checksum_zero_stays_zero() {
        let mut buf = frame(L4::Udp, 1234, 64, &[]);
        buf[14 + 20 + 6..14 + 20 + 8].fill(0);
        let len = buf.len();
        assert_eq!(rewrite(&mut buf, len, 2), Some(1));
        assert_eq!(&buf[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
        assert_eq!(&buf[14 + 20 + 2..14 + 20 + 4], &BACKEND_PORT.to_be_bytes());
    }

    #[test]
    fn bounce_udp_computed_zero_is_sent_as_ffff() {
        // Pick payload bytes so that the rewritten checksum comes out as 0:
        // rewrite once, read the checksum c, and add c to a payload word
        // of the original (lowering the complement of the sum by c).
        let base = frame(L4::Udp, 1234, 64, &[]);
        let mut probe = base.clone();
        rewrite(&mut probe, 64, 1).unwrap();
        let c = u16::from_be_bytes([probe[40], probe[41]]);
        let mut buf = base.clone();
        // Payload starts at 42: add c to the word at 42 (one's complement),
        // and redo the UDP checksum of the original from scratch.
        let w = u16::from_be_bytes([buf[42], buf[43]]);
        let (s, carry) = w.overflowing_add(c);
        buf[42..44].copy_from_slice(&(s + u16::from(carry)).to_be_bytes());
        buf[40..42].fill(0);
        let orig = l4_checksum_v4(CLIENT, VIP, 17, &buf[34..]);
        buf[40..42].copy_from_slice(&(if orig == 0 { 0xffff } else { orig }).to_be_bytes());
        assert_eq!(rewrite(&mut buf, 64, 1), Some(1));
        assert_eq!(
            &buf[40..42],
            &[0xff, 0xff],
            "a computed 0 goes out as 0xffff"
        );
        check(&buf, L4::Udp, 1);
    }

    #[test]
    fn bounce_refuses_what_it_cannot_forward() {
        let arp = {
            let mut f = vec![0xffu8; 6];
            f.extend_from_slice(&SRC_MAC);
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0u8; 28]);
            f
        };
        let udp = frame(L4::Udp, 1024, 64, &[]);
        let tcp = frame(L4::Tcp, 1024, 64, &[]);
        let mut cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("ARP", arp.clone(), arp.len()),
            ("UDP cut in its header", udp.clone(), 14 + 20 + 7),
            ("TCP cut in its header", tcp.clone(), 14 + 20 + 19),
            ("IPv4 cut in its header", udp.clone(), 14 + 19),
            ("Ethernet only", udp.clone(), 14),
            ("empty", udp.clone(), 0),
            ("len beyond the buffer", udp.clone(), 65),
        ];
        let mut frag = udp.clone();
        frag[14 + 6] = 0x20; // MF
        cases.push(("first fragment", frag, 64));
        let mut frag = udp.clone();
        frag[14 + 7] = 0x01; // offset 8
        cases.push(("later fragment", frag, 64));
        let mut icmp = udp.clone();
        icmp[14 + 9] = 1;
        cases.push(("ICMP", icmp, 64));
        let mut v6 = udp.clone();
        v6[14] = 0x65;
        cases.push(("IP version 6 in an IPv4 EtherType", v6, 64));
        let mut ihl = udp.clone();
        ihl[14] = 0x44;
        cases.push(("IHL below 5", ihl, 64));
        let mut long = udp.clone();
        long[16..18].copy_from_slice(&100u16.to_be_bytes());
        cases.push(("total length beyond the frame", long, 64));
        let mut vlan = udp.clone();
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        cases.push(("VLAN tag", vlan, 64));
        for (what, mut buf, len) in cases {
            let before = buf.clone();
            assert_eq!(rewrite(&mut buf, len, 4), None, "{what}");
            assert_eq!(buf, before, "{what}: untouched");
        }
        let mut buf = udp.clone();
        assert_eq!(rewrite(&mut buf, 64, 0), None, "no backends");
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn bounce_flags() {
        let a = Cli::try_parse_from(["bounce"]).unwrap().args;
        assert_eq!((a.input.as_str(), a.output.as_str()), ("g0", "g1"));
        assert_eq!(
            (a.queues, a.backends, a.services, a.exit_after_s),
            (1, 4, 1, 600)
        );
        assert!(a.cores.is_empty());
        validate(&a).unwrap();
        let a = Cli::try_parse_from(["b", "--queues", "2", "--cores", "2,3", "--in", "x"])
            .unwrap()
            .args;
        assert_eq!(a.cores, [2, 3]);
        validate(&a).unwrap();
        for bad in [
            &["b", "--queues", "0"][..],
            &["b", "--queues", "17"],
            &["b", "--backends", "17"],
            &["b", "--services", "65537"],
            &["b", "--exit-after-s", "3601"],
            &["b", "--exit-after-s", "0"],
            &["b", "--cores", "a"],
        ] {
            let e = Cli::try_parse_from(bad).unwrap_err().to_string();
            assert!(e.contains(bad[1]), "{bad:?}: {e}");
        }
        let ok = Cli::try_parse_from(["b"]).unwrap().args;
        for (flag, a) in [
            (
                "--cores",
                Args {
                    cores: vec![1],
                    queues: 2,
                    ..ok.clone()
                },
            ),
            (
                "--in and --out",
                Args {
                    output: "g0".into(),
                    ..ok.clone()
                },
            ),
            (
                "--queues",
                Args {
                    queues: 0,
                    ..ok.clone()
                },
            ),
            (
                "--backends",
                Args {
                    backends: 17,
                    ..ok.clone()
                },
            ),
            (
                "--services",
                Args {
                    services: 0,
                    ..ok.clone()
                },
            ),
            (
                "--exit-after-s",
                Args {
                    exit_after_s: 4000,
                    ..ok.clone()
                },
            ),
        ] {
            let e = validate(&a).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }

    #[test]
    fn bounce_json_lines() {
        assert_eq!(
            serde_json::to_string(&BounceEvent::Ready).unwrap(),
            r#"{"event":"ready"}"#
        );
        let r = BounceEvent::Result(BounceResult {
            forwarded: 10,
            dropped: 2,
            workers: vec![WorkerResult {
                queue: 0,
                rx: 12,
                tx: 10,
                dropped: 2,
            }],
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"event":"result","forwarded":10,"dropped":2,"workers":[{"queue":0,"rx":12,"tx":10,"dropped":2}]}"#
        );
        assert_eq!(serde_json::from_str::<BounceEvent>(&s).unwrap(), r);
    }

    #[test]
    fn bounce_table_matches_the_scenario() {
        let specs = service_specs(3, 2, Family::V4);
        assert_eq!(specs.len(), 6);
        Table::build(1, 0, &specs).unwrap();
        let specs = service_specs(3, 2, Family::V6);
        assert_eq!(specs.len(), 6);
        Table::build(1, 0, &specs).unwrap();
    }

    #[test]
    fn bounce_rewrites_ipv6_as_the_sink_checks_it() {
        use crate::wire::{self, Expect, Fields, L4Proto, PathExpect, Template};
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            for len in [84, 1500] {
                let t = Template::new_in(Family::V6, proto, len, [2, 0, 0, 0, 0, 2], GW_LAN_MAC)
                    .unwrap();
                let flow = 7;
                let f = Fields {
                    src: crate::layout::flow_source_ip(Family::V6, flow),
                    dst: (vip_ip(Family::V6, 0), SERVICE_PORT),
                    flow,
                    seq: 1,
                    ts: 1,
                    syn: true,
                };
                let mut buf = vec![0xeeu8; 2048];
                assert_eq!(t.write(&mut buf, &f), len);
                let backend = rewrite(&mut buf, len, 4).unwrap();
                assert_eq!(backend, expected(f.src.1, 4));
                assert!(buf[len..].iter().all(|&b| b == 0xee), "wrote past len");
                let e = Expect {
                    mac: backend_mac(backend),
                    addr: backend_ip(Family::V6, backend),
                    first_port: BACKEND_PORT,
                    last_port: BACKEND_PORT,
                    flows: 100,
                    path: PathExpect::Routed,
                };
                let p = wire::check(&buf[..len], &e).unwrap();
                assert_eq!(
                    (p.flow, p.dst_port),
                    (flow, BACKEND_PORT),
                    "{proto:?} {len}"
                );
                // An extension header (hop-by-hop, 0) is not rewritten.
                let mut other = buf.clone();
                other[14 + 6] = 0;
                assert_eq!(rewrite(&mut other, len, 4), None);
            }
        }
    }
}
