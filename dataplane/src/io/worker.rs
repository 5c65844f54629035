//! One gateway worker: a pinned thread that polls its AF_XDP sockets in
//! batches, runs the pure core over each batch, writes next-hop MACs and puts
//! the frames on the right TX ring.
//!
//! Owns: the poll loop, per-worker I/O counters, and the hand-off of counters
//! to the metrics thread, and its cache of next hops per destination
//! ([`HopCache`]). It reads the clock, the table handle and the
//! next-hop view once per batch, never per packet (the next-hop view is also
//! handed to the core then, as the source of the gateway's own addresses,
//! and so are the node's addresses it carries, for node ports, when they
//! changed), and never allocates in the loop. It does not decide what happens to a
//! packet: that is [`crate::pipeline::Worker`]'s verdict.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::conntrack::Conntrack;
use crate::flow::ip_from16;
use crate::io::nexthop::{HopCache, NextHops, Unresolved};
use crate::io::node_addrs::NodeAddrSet;
use crate::io::xsk::{
    BindMode, FrameToken, Iface, Ports, RingStats, XskError, XskOptions, RX_BATCH,
};
use crate::packet::rewrite::set_macs;
use crate::pipeline::{BackendCounters, Counters, NodeAddrs, Verdict, Worker};
use crate::snapshot::TableHandle;
use crate::snat::{ReturnConfig, SourceAddrs};
use crate::time::Now;
use arc_swap::ArcSwap;

/// Counters of the I/O around the core, per worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Frames taken off RX rings.
    pub rx_packets: u64,
    /// Frames put on TX rings.
    pub tx_packets: u64,
    /// Frames dropped because a TX ring had no room.
    pub tx_ring_full: u64,
    /// Forwarded frames dropped because their next hop could not be resolved,
    /// per [`Unresolved`] index.
    pub unresolved: [u64; Unresolved::ALL.len()],
    /// Frames the steering program sent that the core would hand to the
    /// kernel; an AF_XDP socket cannot give them back, so they are dropped
    /// and counted (the program and the table disagree for a moment during a
    /// table switch).
    pub pass_unavailable: u64,
    /// Resolution requests that did not fit the resolver's queue.
    pub trigger_dropped: u64,
    /// Conntrack entries this worker expired.
    pub expired: u64,
}

/// One socket's ring statistics, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStats {
    /// Interface name.
    pub ifname: String,
    /// Queue.
    pub queue: u32,
    /// How it is bound.
    pub mode: BindMode,
    /// `XDP_STATISTICS`.
    pub rings: RingStats,
}

/// What a worker publishes for the metrics and health endpoints.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// The core counters.
    pub pipeline: Counters,
    /// The core's per-backend counters (indexed by the backend array of the
    /// table of their generation).
    pub backends: BackendCounters,
    /// The I/O counters.
    pub io: IoCounters,
    /// Per-socket ring statistics.
    pub ports: Vec<PortStats>,
    /// When the worker last published (its heartbeat).
    pub beat: Option<Instant>,
    /// Table generation the worker used last.
    pub generation: u64,
    /// Set when the worker left its loop.
    pub stopped: bool,
}

/// What every worker shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The current table.
    pub table: Arc<TableHandle>,
    /// The current next hops.
    pub hops: Arc<ArcSwap<NextHops>>,
    /// The shared connection table.
    pub conntrack: Arc<Conntrack>,
    /// Set to stop (SIGTERM): the worker drains and returns.
    pub stop: Arc<AtomicBool>,
    /// Addresses to resolve (the resolver thread reads them).
    pub resolve: SyncSender<IpAddr>,
    /// The clock origin shared by all workers (conntrack times are relative
    /// to it).
    pub epoch: Instant,
    /// Fault injection for the tests: panic once this many frames were
    /// received (`clustergate run --inject-worker-fault`).
    pub panic_after_rx: Option<u64>,
}

/// One worker's sockets.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Interfaces served (every worker serves all of them).
    pub ifaces: Vec<Iface>,
    /// This worker's queues on every interface.
    pub queues: Vec<u32>,
    /// Ring and UMEM sizes.
    pub xsk: XskOptions,
    /// This worker's return-path settings: its share of the SNAT ports, the
    /// `--snat-address` overrides, the DSR encapsulation MTU.
    pub ret: ReturnConfig,
}

/// A socket opened by a worker, for the steering program's XSKMAP.
#[derive(Debug, Clone, Copy)]
pub struct OpenedSocket {
    /// Interface slot.
    pub slot: u32,
    /// Queue.
    pub queue: u32,
    /// The socket.
    pub fd: std::os::fd::RawFd,
    /// How it was bound.
    pub mode: BindMode,
}

/// How often a worker hands its counters over.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// How often it reads its sockets' ring statistics (a syscall each).
const RING_STATS_EVERY: Duration = Duration::from_secs(1);
/// How often it sweeps conntrack shards for expired entries.
const EXPIRE_EVERY: Duration = Duration::from_millis(10);
/// Shards swept per sweep (of 256 per family).
const EXPIRE_SHARDS: usize = 2;
/// Longest a drain waits for TX completions.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// Opens the worker's sockets (call on the worker's own, pinned thread).
///
/// # Errors
/// The first socket that could not be opened.
pub fn open(spec: &WorkerSpec) -> Result<(Ports, Vec<OpenedSocket>), XskError> {
    let ports = Ports::open(&spec.ifaces, &spec.queues, spec.xsk)?;
    let opened = ports
        .ports()
        .iter()
        .map(|p| OpenedSocket {
            slot: p.slot,
            queue: p.queue,
            fd: p.fd(),
            mode: p.mode,
        })
        .collect();
    Ok((ports, opened))
}

/// Polls until `shared.stop` is set, then drains: stops receiving, sends
/// what is in hand, and waits (bounded) for TX completions. `spec`: the
/// worker's own settings (its sockets are already open in `ports`).
pub fn run(mut ports: Ports, spec: &WorkerSpec, shared: &Shared, stats: &Mutex<WorkerStats>) {
    let mut core = Worker::with_config(Arc::clone(&shared.conntrack), spec.ret.clone());
    let mut sources: Option<Arc<NextHops>> = None;
    let mut node_addrs: Option<Arc<NodeAddrSet>> = None;
    let mut io = IoCounters::default();
    // Next hops per destination, valid while the view they came from is
    // the current one.
    let mut hop_cache = HopCache::new();
    let nports = ports.ports().len();
    // Egress socket per (ingress socket, interface index), worked out once:
    // the same queue when the interface has it, else its first socket.
    let egress_table: Vec<Vec<(u32, usize)>> = ports
        .ports()
        .iter()
        .map(|ingress| {
            let all = ports.ports();
            let mut ifs: Vec<u32> = all.iter().map(|p| p.ifindex).collect();
            ifs.dedup();
            ifs.into_iter()
                .filter_map(|ifindex| {
                    all.iter()
                        .position(|p| p.ifindex == ifindex && p.queue == ingress.queue)
                        .or_else(|| all.iter().position(|p| p.ifindex == ifindex))
                        .map(|e| (ifindex, e))
                })
                .collect()
        })
        .collect();
    let egress_of = |ingress: usize, ifindex: u32| -> Option<usize> {
        egress_table
            .get(ingress)?
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, e)| *e)
    };
    let mut rx: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut verdicts = [Verdict::Pass; RX_BATCH];
    let mut egress = [usize::MAX; RX_BATCH];
    let mut pending: Vec<Vec<FrameToken>> =
        (0..nports).map(|_| Vec::with_capacity(RX_BATCH)).collect();
    let mut dropped: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut port_stats: Vec<PortStats> = ports
        .ports()
        .iter()
        .map(|p| PortStats {
            ifname: p.ifname.clone(),
            queue: p.queue,
            mode: p.mode,
            rings: RingStats::default(),
        })
        .collect();
    let mut last_publish = Instant::now();
    let mut last_rings = last_publish - RING_STATS_EVERY;
    let mut last_expire = last_publish;
    let mut expire_cursor = 0usize;
    let mut spins = 0u32;
    let mut generation = 0u64;

    while !shared.stop.load(Ordering::Relaxed) {
        ports.recycle();
        let wall = Instant::now();
        let now = Now(wall.saturating_duration_since(shared.epoch).as_nanos() as u64);
        let table = shared.table.load();
        generation = table.generation();
        // Per-backend counters follow the table: a generation compare, and
        // a re-index (allocating) only when the table changed.
        core.follow_table(&table);
        let hops = shared.hops.load();
        // The same view gives new flows the gateway's own address, through
        // the core. Handed over when the management loop swapped in a new
        // one (every 500 ms or so), not on every round: a reference count
        // taken per round by every worker would bounce one cache line
        // between the worker cores.
        if !sources.as_ref().is_some_and(|s| Arc::ptr_eq(s, &hops)) {
            let view = Arc::clone(&hops);
            core.set_sources(Some(Arc::clone(&view) as Arc<dyn SourceAddrs>));
            sources = Some(view);
            // The node's addresses (node ports): the resolver keeps the same
            // `Arc` while they do not change, so this hands them over only
            // when they did.
            let node = hops.node_addrs();
            if !node_addrs.as_ref().is_some_and(|n| Arc::ptr_eq(n, node)) {
                core.set_node_addrs(Some(Arc::clone(node) as Arc<dyn NodeAddrs>));
                node_addrs = Some(Arc::clone(node));
            }
        }
        let mut work = 0usize;
        for port in 0..nports {
            let n = ports.receive(port, &mut rx);
            if n == 0 {
                continue;
            }
            work += n;
            io.rx_packets += n as u64;
            if shared
                .panic_after_rx
                .is_some_and(|limit| io.rx_packets >= limit)
            {
                panic!(
                    "injected fault after {} received frames (--inject-worker-fault)",
                    io.rx_packets
                );
            }
            ports.with_frames(&mut rx, |frames, lens| {
                core.process_batch(now, &table, frames, &mut verdicts[..n]);
                for i in 0..n {
                    egress[i] = usize::MAX;
                    match verdicts[i] {
                        Verdict::Forward { len, next_hop } => {
                            match hop_cache.resolve(&hops, &next_hop.addr) {
                                Ok(hop) => match egress_of(port, hop.ifindex) {
                                    Some(e) => {
                                        // The frame is at least an Ethernet header
                                        // long: the core parsed it.
                                        let _ = set_macs(frames[i].buf, hop.src_mac, hop.dst_mac);
                                        lens[i] = len;
                                        egress[i] = e;
                                    }
                                    None => io.unresolved[Unresolved::OtherInterface as usize] += 1,
                                },
                                Err(why) => {
                                    io.unresolved[why as usize] += 1;
                                    if why == Unresolved::NoNeighbour
                                        && shared
                                            .resolve
                                            .try_send(ip_from16(next_hop.addr))
                                            .is_err()
                                    {
                                        io.trigger_dropped += 1;
                                    }
                                }
                            }
                        }
                        Verdict::Reject { len } => {
                            lens[i] = len;
                            egress[i] = port;
                        }
                        Verdict::Pass => io.pass_unavailable += 1,
                        // Single-owner workers (the gateway gives each
                        // worker the whole table for now) never hand off.
                        Verdict::Handoff { .. } => {}
                        Verdict::Drop(_) => {}
                    }
                }
            });
            for (t, &e) in rx.drain(..).zip(&egress[..n]) {
                match pending.get_mut(e) {
                    Some(q) => q.push(t),
                    None => dropped.push(t),
                }
            }
            ports.release(&mut dropped);
            for (e, q) in pending.iter_mut().enumerate() {
                if q.is_empty() {
                    continue;
                }
                // The lengths come from the core's verdicts (a frame it
                // rewrote, at least a header long).
                let queued = q.len();
                let sent = ports.transmit(e, q);
                io.tx_packets += sent as u64;
                io.tx_ring_full += (queued - sent) as u64;
            }
        }
        drop(table);
        drop(hops);

        if wall.saturating_duration_since(last_expire) >= EXPIRE_EVERY {
            io.expired += shared
                .conntrack
                .expire(now, &mut expire_cursor, EXPIRE_SHARDS) as u64;
            last_expire = wall;
        }
        if wall.saturating_duration_since(last_publish) >= PUBLISH_EVERY {
            if wall.saturating_duration_since(last_rings) >= RING_STATS_EVERY {
                for (s, p) in port_stats.iter_mut().zip(ports.ports()) {
                    if let Ok(r) = p.ring_stats() {
                        s.rings = r;
                    }
                }
                last_rings = wall;
            }
            if let Ok(mut s) = stats.try_lock() {
                publish(&mut s, &core, &io, &port_stats, generation, wall);
                last_publish = wall;
            }
        }
        ports.idle(work, &mut spins);
    }

    // Drain: nothing more is received; what was sent gets its completions.
    ports.drain(DRAIN_LIMIT);
    let mut s = stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    publish(&mut s, &core, &io, &port_stats, generation, Instant::now());
    s.stopped = true;
}

fn publish(
    s: &mut WorkerStats,
    core: &Worker,
    io: &IoCounters,
    ports: &[PortStats],
    generation: u64,
    now: Instant,
) {
    s.pipeline.clone_from(&core.counters);
    s.backends.clone_from(&core.backends);
    s.io.clone_from(io);
    if s.ports.len() == ports.len() {
        for (d, p) in s.ports.iter_mut().zip(ports) {
            d.rings = p.rings;
            d.mode = p.mode;
        }
    } else {
        s.ports = ports.to_vec();
    }
    s.generation = generation;
    s.beat = Some(now);
}
