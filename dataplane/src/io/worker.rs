//! One gateway worker: a pinned thread that polls its AF_XDP sockets in
//! batches, runs the pure core over each batch, writes next-hop MACs and puts
//! the frames on the right TX ring.
//!
//! Owns: the poll loop, per-worker I/O counters and their hand-off to the
//! metrics thread, its cache of next hops per destination ([`HopCache`]),
//! and its ends of the hand-off rings ([`Mesh`]): it copies a frame whose
//! flow another worker owns into the ring to that worker, and takes the
//! frames handed to it into its own UMEM. It reads the clock, the table
//! handle and the next-hop view once per batch, never per packet (the
//! next-hop view is also handed to the core then, as the source of the
//! gateway's own addresses, and so are the node's addresses it carries, for
//! node ports, when they changed), and never allocates in the loop. It does
//! not decide what happens to a packet: that is
//! [`crate::pipeline::Worker`]'s verdict.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::conntrack::Conntrack;
use crate::flow::ip_from16;
use crate::io::handoff::Mesh;
use crate::io::nexthop::{HopCache, NextHops, Unresolved};
use crate::io::node_addrs::NodeAddrSet;
use crate::io::xsk::{
    BindMode, FrameToken, Iface, Ports, RingStats, XskError, XskOptions, RX_BATCH,
};
use crate::packet::rewrite::set_macs;
use crate::pipeline::{
    BackendCounters, Counters, Frame, NodeAddrs, Ownership, Side, Verdict, Worker,
};
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
    /// Frames whose flow another worker owns, copied into the ring to it.
    pub handoffs_sent: u64,
    /// Frames whose flow another worker owns, dropped because the ring to
    /// it was full.
    pub handoff_full: u64,
    /// Frames other workers handed to this one (their flows are its own).
    pub handoffs_received: u64,
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
    /// The hand-off rings between the workers (`None` or one worker: no
    /// hand-off).
    pub handoff: Option<Arc<Mesh>>,
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
    /// Which flows this worker owns: its index in `--cores`, the number of
    /// workers, and the whole SNAT range (`ret.ports` is its share of it).
    pub own: Ownership,
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

/// Frontends whose backend counters one hand-off copies at most, round
/// robin (all of them at once after the frontends moved): at 20 000
/// frontends the readers' copy is whole again within half a second, and a
/// hand-off costs the worker tens of microseconds instead of copying every
/// frontend's counters every [`PUBLISH_EVERY`].
const BACKENDS_PER_PUBLISH: usize = 2048;
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

/// What deciding a batch's frames needs besides the frames: the next hops,
/// the egress sockets, the hand-off rings, and the counters.
struct Decide<'a> {
    hops: &'a NextHops,
    cache: &'a mut HopCache,
    io: &'a mut IoCounters,
    resolve: &'a SyncSender<IpAddr>,
    /// Egress socket per (ingress socket, interface index).
    egress_table: &'a [Vec<(u32, usize)>],
    /// Interface of each socket.
    port_ifindex: &'a [u32],
    /// The hand-off rings and this worker's index in them.
    handoff: Option<(&'a Mesh, usize)>,
}

impl Decide<'_> {
    fn egress_of(&self, ingress: usize, ifindex: u32) -> Option<usize> {
        self.egress_table
            .get(ingress)?
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, e)| *e)
    }

    /// Acts on the core's verdicts for `frames`: writes the next hop's MACs
    /// and the length to send into each forwarded or rejected frame, and
    /// its socket into `egress` (left `usize::MAX`: the frame is dropped);
    /// copies a frame another worker owns into the ring to that worker.
    /// `ingress[i]`: the socket frame `i` came in on (for a handed frame,
    /// this worker's socket on the interface it came in on). `handed`: the
    /// frames came from another worker's ring, and are never handed on
    /// again (no ping-pong between two workers that disagree).
    fn frames(
        &mut self,
        frames: &mut [Frame<'_>],
        lens: &mut [usize],
        verdicts: &[Verdict],
        ingress: &[usize],
        egress: &mut [usize],
        handed: bool,
    ) {
        for i in 0..verdicts.len() {
            egress[i] = usize::MAX;
            match verdicts[i] {
                Verdict::Forward { len, next_hop } => {
                    // Backends are few and hot: their hops are cached. Clients
                    // may be many thousands; a cache of them would only
                    // thrash and push the backends out.
                    let hop = match next_hop.side {
                        Side::Backend => self.cache.resolve(self.hops, &next_hop.addr),
                        Side::Client => self.hops.resolve(&next_hop.addr),
                    };
                    match hop {
                        Ok(hop) => match self.egress_of(ingress[i], hop.ifindex) {
                            Some(e) => {
                                // The frame is at least an Ethernet header
                                // long: the core parsed it.
                                let _ = set_macs(frames[i].buf, hop.src_mac, hop.dst_mac);
                                lens[i] = len;
                                egress[i] = e;
                            }
                            None => {
                                self.io.unresolved[Unresolved::OtherInterface as usize] += 1;
                            }
                        },
                        Err(why) => {
                            self.io.unresolved[why as usize] += 1;
                            if why == Unresolved::NoNeighbour
                                && self.resolve.try_send(ip_from16(next_hop.addr)).is_err()
                            {
                                self.io.trigger_dropped += 1;
                            }
                        }
                    }
                }
                Verdict::Reject { len } => {
                    lens[i] = len;
                    egress[i] = ingress[i];
                }
                Verdict::Pass => self.io.pass_unavailable += 1,
                Verdict::Handoff { owner } if !handed => {
                    let ifindex = self.port_ifindex.get(ingress[i]).copied().unwrap_or(0);
                    let f = &frames[i];
                    let pushed = self
                        .handoff
                        .and_then(|(mesh, me)| mesh.ring(me, usize::from(owner)))
                        .is_some_and(|r| r.push(&f.buf[..f.len.min(f.buf.len())], ifindex));
                    if pushed {
                        self.io.handoffs_sent += 1;
                    } else {
                        self.io.handoff_full += 1;
                    }
                }
                // A handed frame that the owner would hand on: the two
                // workers disagree on the owner (a bug); dropped, and counted
                // in the core's hand-offs.
                Verdict::Handoff { .. } => {}
                Verdict::Drop(_) => {}
            }
        }
    }
}

/// Polls until `shared.stop` is set, then drains: stops receiving, sends
/// what is in hand, and waits (bounded) for TX completions. `spec`: the
/// worker's own settings (its sockets are already open in `ports`).
///
/// Every round: receives and decides each socket's batch, then takes the
/// frames other workers handed over (at most a batch from each ring, into
/// frames of its own pool; those that find no free frame wait in the ring),
/// decides and sends them the same way.
pub fn run(mut ports: Ports, spec: &WorkerSpec, shared: &Shared, stats: &Mutex<WorkerStats>) {
    let mut core =
        Worker::with_ownership(Arc::clone(&shared.conntrack), spec.ret.clone(), spec.own);
    let me = usize::from(spec.own.index);
    let mesh = shared.handoff.as_deref().filter(|m| m.workers() > 1);
    let mut sources: Option<Arc<NextHops>> = None;
    let mut node_addrs: Option<Arc<NodeAddrSet>> = None;
    let mut io = IoCounters::default();
    // Next hops per destination, valid while the view they came from is
    // the current one.
    let mut hop_cache = HopCache::new();
    let nports = ports.ports().len();
    let port_ifindex: Vec<u32> = ports.ports().iter().map(|p| p.ifindex).collect();
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
    let mut rx: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    let mut verdicts = [Verdict::Pass; RX_BATCH];
    let mut ingress = [usize::MAX; RX_BATCH];
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
    // Where the next hand-off of backend counters goes on (round robin).
    let mut backends_cursor = 0usize;

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
        let mut decide = Decide {
            hops: &hops,
            cache: &mut hop_cache,
            io: &mut io,
            resolve: &shared.resolve,
            egress_table: &egress_table,
            port_ifindex: &port_ifindex,
            handoff: mesh.map(|m| (m, me)),
        };
        let mut work = 0usize;
        for port in 0..nports {
            let n = ports.receive(port, &mut rx);
            if n == 0 {
                continue;
            }
            work += n;
            decide.io.rx_packets += n as u64;
            if shared
                .panic_after_rx
                .is_some_and(|limit| decide.io.rx_packets >= limit)
            {
                panic!(
                    "injected fault after {} received frames (--inject-worker-fault)",
                    decide.io.rx_packets
                );
            }
            ingress[..n].fill(port);
            ports.with_frames(&mut rx, |frames, lens| {
                core.process_batch(now, &table, frames, &mut verdicts[..n]);
                decide.frames(
                    frames,
                    lens,
                    &verdicts[..n],
                    &ingress[..n],
                    &mut egress[..n],
                    false,
                );
            });
            send(
                &mut ports,
                &mut rx,
                &egress[..n],
                &mut pending,
                &mut dropped,
                decide.io,
            );
        }
        // Frames the other workers handed over.
        for from in 0..mesh.map_or(0, Mesh::workers) {
            let Some(ring) = mesh.and_then(|m| m.ring(from, me)) else {
                continue;
            };
            let waiting = ring.len().min(RX_BATCH);
            if waiting == 0 {
                continue;
            }
            let k = ports.alloc(&mut rx, waiting);
            let got = ports.with_frames(&mut rx, |frames, lens| {
                let mut got = 0;
                while got < k {
                    let f = &mut frames[got];
                    let Some(at) = ring.pop_with(|bytes, ifindex| {
                        // A slot is no larger than a frame of this UMEM:
                        // every worker's frames have the same size.
                        let n = bytes.len().min(f.buf.len());
                        f.buf[..n].copy_from_slice(&bytes[..n]);
                        f.len = n;
                        port_ifindex.iter().position(|&i| i == ifindex)
                    }) else {
                        break;
                    };
                    ingress[got] = at.unwrap_or(usize::MAX);
                    lens[got] = f.len;
                    got += 1;
                }
                for l in &mut lens[got..] {
                    *l = 0;
                }
                core.process_batch(now, &table, &mut frames[..got], &mut verdicts[..got]);
                egress[got..k].fill(usize::MAX);
                decide.frames(
                    &mut frames[..got],
                    &mut lens[..got],
                    &verdicts[..got],
                    &ingress[..got],
                    &mut egress[..got],
                    true,
                );
                got
            });
            work += got;
            decide.io.handoffs_received += got as u64;
            send(
                &mut ports,
                &mut rx,
                &egress[..k],
                &mut pending,
                &mut dropped,
                decide.io,
            );
        }
        drop(table);
        drop(hops);

        if wall.saturating_duration_since(last_expire) >= EXPIRE_EVERY {
            // An owner sweeps its own partition; workers sharing the
            // table shard by shard sweep it all, in turns.
            let ct = &shared.conntrack;
            io.expired += if ct.partitions() == usize::from(spec.own.count) {
                ct.expire_partition(now, me, &mut expire_cursor, EXPIRE_SHARDS)
            } else {
                ct.expire(now, &mut expire_cursor, EXPIRE_SHARDS)
            } as u64;
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
                publish(
                    &mut s,
                    &core,
                    &io,
                    &port_stats,
                    generation,
                    wall,
                    Some(&mut backends_cursor),
                );
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
    // The last copy is whole.
    publish(
        &mut s,
        &core,
        &io,
        &port_stats,
        generation,
        Instant::now(),
        None,
    );
    s.stopped = true;
}

/// Puts each frame of `batch` (emptying it) on the TX ring of its socket in
/// `egress`, or back in the pool (`usize::MAX`), and counts.
fn send(
    ports: &mut Ports,
    batch: &mut Vec<FrameToken>,
    egress: &[usize],
    pending: &mut [Vec<FrameToken>],
    dropped: &mut Vec<FrameToken>,
    io: &mut IoCounters,
) {
    for (t, &e) in batch.drain(..).zip(egress) {
        match pending.get_mut(e) {
            Some(q) => q.push(t),
            None => dropped.push(t),
        }
    }
    // Frames beyond `egress` (none: it is as long as the batch) are dropped.
    ports.release(batch);
    ports.release(dropped);
    for (e, q) in pending.iter_mut().enumerate() {
        if q.is_empty() {
            continue;
        }
        // The lengths come from the core's verdicts (a frame it rewrote, at
        // least a header long).
        let queued = q.len();
        let sent = ports.transmit(e, q);
        io.tx_packets += sent as u64;
        io.tx_ring_full += (queued - sent) as u64;
    }
}

fn publish(
    s: &mut WorkerStats,
    core: &Worker,
    io: &IoCounters,
    ports: &[PortStats],
    generation: u64,
    now: Instant,
    backends_cursor: Option<&mut usize>,
) {
    s.pipeline.clone_from(&core.counters);
    // Within a budget, round robin; `None`: all of them.
    match backends_cursor {
        Some(c) => core
            .backends
            .publish_into(&mut s.backends, c, BACKENDS_PER_PUBLISH),
        None => core
            .backends
            .publish_into(&mut s.backends, &mut 0, usize::MAX),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::addr16;
    use crate::io::nexthop::{Gateway, NeighbourEntry, RouteEntry, RouteTarget};
    use crate::verdict::{NextHop, Side};
    use netlink_packet_route::neighbour::NeighbourState;

    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    /// Frames, hand-offs and counters of one decided batch on worker 0 of
    /// two, with sockets on interfaces 2 (socket 0) and 3 (socket 1).
    #[test]
    fn decide_forwards_rejects_and_hands_off_with_the_bytes_intact() {
        let backend = "198.18.2.11".parse().expect("address");
        let hops = NextHops::from_parts(
            &[(2, GW_MAC), (3, GW_MAC)],
            &[RouteEntry {
                dst: "198.18.2.0".parse().expect("address"),
                prefix_len: 24,
                metric: 0,
                target: RouteTarget::Via(vec![Gateway {
                    ifindex: 3,
                    via: None,
                }]),
                prefsrc: None,
            }],
            &[NeighbourEntry {
                ifindex: 3,
                addr: backend,
                state: NeighbourState::Reachable,
                mac: Some(BACKEND_MAC),
            }],
            &[],
        );
        let mesh = Mesh::new(2, 4, 128);
        let (resolve, _asked) = std::sync::mpsc::sync_channel(4);
        let mut cache = HopCache::new();
        let mut io = IoCounters::default();
        let egress_table = vec![vec![(2, 0), (3, 1)], vec![(2, 0), (3, 1)]];
        let port_ifindex = [2, 3];
        let mut decide = Decide {
            hops: &hops,
            cache: &mut cache,
            io: &mut io,
            resolve: &resolve,
            egress_table: &egress_table,
            port_ifindex: &port_ifindex,
            handoff: Some((&mesh, 0)),
        };
        let original: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60 + usize::from(i)]).collect();
        let mut bufs: Vec<Vec<u8>> = original
            .iter()
            .map(|f| {
                let mut b = f.clone();
                b.resize(128, 0);
                b
            })
            .collect();
        let mut frames: Vec<Frame<'_>> = bufs
            .iter_mut()
            .zip(&original)
            .map(|(b, o)| Frame {
                buf: b,
                len: o.len(),
            })
            .collect();
        let mut lens: Vec<usize> = original.iter().map(Vec::len).collect();
        let verdicts = [
            Verdict::Forward {
                len: 70,
                next_hop: NextHop {
                    addr: addr16(backend),
                    side: Side::Backend,
                },
            },
            Verdict::Handoff { owner: 1 },
            Verdict::Reject { len: 54 },
            Verdict::Handoff { owner: 1 },
            Verdict::Drop(crate::verdict::DropReason::ALL[0]),
        ];
        let ingress = [0; 5];
        let mut egress = [0; 5];
        decide.frames(
            &mut frames,
            &mut lens,
            &verdicts,
            &ingress,
            &mut egress,
            false,
        );

        // Forward: out of the backend's interface, with its MACs.
        assert_eq!(egress, [1, usize::MAX, 0, usize::MAX, usize::MAX]);
        assert_eq!(&frames[0].buf[..6], &BACKEND_MAC);
        assert_eq!(&frames[0].buf[6..12], &GW_MAC);
        assert_eq!((lens[0], lens[2]), (70, 54));
        // Hand-offs: the untouched frames, in order, with the interface they
        // came in on, in the ring to worker 1 and nowhere else.
        let ring = mesh.ring(0, 1).expect("ring 0→1");
        assert_eq!(
            ring.pop_with(|b, i| (b.to_vec(), i)),
            Some((original[1].clone(), 2))
        );
        assert_eq!(
            ring.pop_with(|b, i| (b.to_vec(), i)),
            Some((original[3].clone(), 2))
        );
        assert!(ring.is_empty());
        assert!(mesh.ring(1, 0).expect("ring 1→0").is_empty());
        assert_eq!((io.handoffs_sent, io.handoff_full), (2, 0));
    }

    #[test]
    fn decide_counts_a_full_ring_and_never_hands_a_handed_frame_on() {
        let hops = NextHops::empty();
        let mesh = Mesh::new(2, 1, 128);
        let (resolve, _asked) = std::sync::mpsc::sync_channel(4);
        let mut cache = HopCache::new();
        let mut io = IoCounters::default();
        let egress_table = vec![vec![(2, 0)]];
        let mut decide = Decide {
            hops: &hops,
            cache: &mut cache,
            io: &mut io,
            resolve: &resolve,
            egress_table: &egress_table,
            port_ifindex: &[2],
            handoff: Some((&mesh, 1)),
        };
        let mut bufs = [[7u8; 64], [8u8; 64], [9u8; 64]];
        let mut frames: Vec<Frame<'_>> =
            bufs.iter_mut().map(|b| Frame { buf: b, len: 64 }).collect();
        let mut lens = [64; 3];
        let verdicts = [Verdict::Handoff { owner: 0 }; 3];
        let mut egress = [0; 3];
        // One slot: the first frame goes, the second finds the ring full.
        decide.frames(
            &mut frames[..2],
            &mut lens[..2],
            &verdicts[..2],
            &[0; 2],
            &mut egress[..2],
            false,
        );
        // A frame that came from the other worker is not handed back.
        decide.frames(
            &mut frames[2..],
            &mut lens[2..],
            &verdicts[2..],
            &[0],
            &mut egress[2..],
            true,
        );
        assert_eq!(egress, [usize::MAX; 3], "no hand-off is transmitted");
        assert_eq!((io.handoffs_sent, io.handoff_full), (1, 1));
        let ring = mesh.ring(1, 0).expect("ring 1→0");
        assert_eq!(ring.pop_with(|b, _| b.to_vec()), Some(vec![7; 64]));
        assert!(ring.is_empty());
    }
}
