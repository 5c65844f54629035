//! The per-packet pipeline: `process(now, frame) -> Verdict`.
//!
//! Owns: [`Worker`] (one per core: its counters, a handle on the shared
//! [`Conntrack`], and its side of the return paths: its share of the SNAT
//! ports and the gateway's addresses) and the order of operations for a frame:
//! parse → frontend lookup → conntrack (forward) or Maglev pick for a new flow
//! bound with the frontend's return path → NAT rewrite (the destination; the
//! source too under source NAT) or IP-in-IP encapsulation (DSR), or conntrack
//! (reply) → reverse NAT, or ICMP error → follow the quoted flow, translated
//! as the flow is, or pass to the kernel.
//!
//! The table is handed in per call (the I/O layer loads the current snapshot
//! once per batch), so a worker sees one table for a whole batch.
//!
//! Must never: read a clock, allocate, make a syscall, or panic on any frame.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use std::sync::Arc;

use crate::conntrack::{
    Binding, Conntrack, FlowHash, FlowNat, FlowState, FragRefused, FragRewrite, Hold, InsertError,
};
use crate::flow::{Addr16, FlowTuple, Proto};
use crate::packet::checksum;
use crate::packet::encap;
use crate::packet::parse::{parse, tcp_flags, Family, FlowL4, IcmpError, Parsed, L4};
use crate::packet::reject::{self, reject_in_place};
use crate::packet::rewrite::{self, L4Csum, NatSide};
use crate::snat::{PortRange, ReturnConfig, SourceAddrs};
use crate::table::{Front, ReturnPath, Table, FRONTEND_AFFINITY, FRONTEND_NODE_LOCAL};
use crate::time::Now;
pub use crate::verdict::{DropReason, NextHop, Side, Verdict};

/// Index of a verdict kind in [`Counters::packets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum VerdictKind {
    /// [`Verdict::Forward`].
    Forward = 0,
    /// [`Verdict::Reject`].
    Reject = 1,
    /// [`Verdict::Pass`].
    Pass = 2,
    /// [`Verdict::Drop`].
    Drop = 3,
}

impl VerdictKind {
    /// All kinds, in index order.
    pub const ALL: [Self; 4] = [Self::Forward, Self::Reject, Self::Pass, Self::Drop];

    /// Label for metrics.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Reject => "reject",
            Self::Pass => "pass",
            Self::Drop => "drop",
        }
    }

    /// The kind of a verdict.
    #[must_use]
    /// A hand-off is no kind: the owner counts the frame.
    pub const fn of(v: &Verdict) -> Option<Self> {
        match v {
            Verdict::Forward { .. } => Some(Self::Forward),
            Verdict::Reject { .. } => Some(Self::Reject),
            Verdict::Pass => Some(Self::Pass),
            Verdict::Drop(_) => Some(Self::Drop),
            Verdict::Handoff { .. } => None,
        }
    }
}

/// Per-core counters. Plain integers: each worker owns its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Frames per verdict kind ([`VerdictKind`] index).
    pub packets: [u64; 4],
    /// Bytes (frame length as received) per verdict kind.
    pub bytes: [u64; 4],
    /// Drops per [`DropReason`] index.
    pub drops: [u64; DropReason::COUNT],
    /// New flows bound to a backend.
    pub new_flows: u64,
    /// Reply frames reverse-NATed.
    pub replies: u64,
    /// Flows whose backend left the table and that were bound anew.
    pub flows_moved: u64,
    /// New flows sent to their ClientIP-affinity backend.
    pub affinity_hits: u64,
    /// First fragments (balanced like their flow, rewrite remembered).
    pub fragments_first: u64,
    /// Non-first fragments seen (forwarded if their datagram is known).
    pub fragments_nonfirst: u64,
    /// ICMP errors that followed their flow.
    pub icmp_errors: u64,
    /// DSR packets too big for the backend side once encapsulated, answered
    /// with ICMP fragmentation needed / packet too big (a [`Verdict::Reject`]).
    pub encap_too_big: u64,
    /// Frames handed to the worker that owns their flow
    /// ([`Verdict::Handoff`]); that worker counts their verdict.
    pub handoffs: u64,
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for Counters {
    fn default() -> Self {
        Self {
            packets: [0; 4],
            bytes: [0; 4],
            drops: [0; DropReason::COUNT],
            new_flows: 0,
            replies: 0,
            flows_moved: 0,
            affinity_hits: 0,
            fragments_first: 0,
            fragments_nonfirst: 0,
            icmp_errors: 0,
            encap_too_big: 0,
            handoffs: 0,
        }
    }
}

impl Counters {
    /// Drops for one reason.
    #[must_use]
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    /// Frames with one verdict kind.
    #[must_use]
    pub fn count(&self, k: VerdictKind) -> u64 {
        self.packets[k as usize]
    }

    /// Adds another worker's counters (for totals).
    pub fn add(&mut self, o: &Self) {
        for i in 0..4 {
            self.packets[i] += o.packets[i];
            self.bytes[i] += o.bytes[i];
        }
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.new_flows += o.new_flows;
        self.replies += o.replies;
        self.flows_moved += o.flows_moved;
        self.affinity_hits += o.affinity_hits;
        self.fragments_first += o.fragments_first;
        self.fragments_nonfirst += o.fragments_nonfirst;
        self.handoffs += o.handoffs;
        self.icmp_errors += o.icmp_errors;
        self.encap_too_big += o.encap_too_big;
    }
}

/// One backend's counters in one worker: flows bound to it, and the frames
/// (and their bytes, as received) forwarded to it, client to backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCount {
    /// New flows bound to it.
    pub new_flows: u64,
    /// Frames forwarded to it.
    pub packets: u64,
    /// Their bytes, as received.
    pub bytes: u64,
}

impl BackendCount {
    /// Adds another count (totals over workers).
    pub fn add(&mut self, o: &Self) {
        self.new_flows += o.new_flows;
        self.packets += o.packets;
        self.bytes += o.bytes;
    }
}

/// What names a backend of a frontend across table generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The frontend's address.
    pub frontend: Addr16,
    /// Its port.
    pub frontend_port: u16,
    /// Its protocol number.
    pub proto: u8,
    /// Its [`crate::table::FrontendKind`] value.
    pub kind: u8,
    /// The backend's address.
    pub backend: Addr16,
    /// Its port.
    pub backend_port: u16,
}

impl BackendKey {
    /// The key of every backend of `table`, in backend-array order.
    #[must_use]
    pub fn all_of(table: &Table) -> Vec<Self> {
        let mut keys = Vec::with_capacity(table.backends_total());
        for f in table.frontends() {
            keys.extend(f.backends().iter().map(|b| Self {
                frontend: f.addr,
                frontend_port: f.port,
                proto: f.proto,
                kind: f.kind,
                backend: b.addr,
                backend_port: b.port,
            }));
        }
        keys
    }
}

/// A worker's per-backend counters, per frontend of the table of
/// `generation`, in its frontend order. Plain integers: each worker owns
/// its own, and readers sum them by [`BackendKey`] (each entry names its
/// frontend and backends, so a reader's copy may be refreshed in parts:
/// [`BackendCounters::publish_into`]).
#[derive(Clone, Default)]
pub struct BackendCounters {
    /// The table generation the indices refer to.
    pub generation: u64,
    /// Per frontend (index as in the table), its backends' counts.
    pub fronts: Vec<FrontCounts>,
    /// Per frontend, the table block the entry was made for: a block that
    /// a change left alone is the same `Arc` in the next table, so
    /// [`BackendCounters::follow`] finds the changed frontends by pointer.
    /// Holding them keeps a block's address from being reused by another
    /// while it is compared. Never published.
    blocks: Vec<Arc<Front>>,
    /// Bumped whenever the frontends moved (added, removed, reordered): a
    /// reader's copy is then refreshed whole, not in parts.
    layout: u64,
}

impl std::fmt::Debug for BackendCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendCounters")
            .field("generation", &self.generation)
            .field("fronts", &self.fronts)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl PartialEq for BackendCounters {
    fn eq(&self, o: &Self) -> bool {
        self.generation == o.generation && self.fronts == o.fronts
    }
}

impl Eq for BackendCounters {}

/// The counts of one frontend's backends, for one version of its block
/// ([`crate::table::Front::version`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrontCounts {
    /// The frontend's address.
    pub frontend: Addr16,
    /// Its port.
    pub frontend_port: u16,
    /// Its protocol number.
    pub proto: u8,
    /// Its kind.
    pub kind: u8,
    /// The block version the indices below refer to.
    pub version: u64,
    /// Per backend (index as in the frontend's backends): address and port.
    pub backends: Vec<(Addr16, u16)>,
    /// Per backend, its counts.
    pub counts: Vec<BackendCount>,
}

impl Clone for FrontCounts {
    fn clone(&self) -> Self {
        Self {
            backends: self.backends.clone(),
            counts: self.counts.clone(),
            ..*self
        }
    }

    /// Field by field, so that a reader's copy keeps its vectors' room: no
    /// allocation when the backends did not grow.
    fn clone_from(&mut self, o: &Self) {
        self.frontend = o.frontend;
        self.frontend_port = o.frontend_port;
        self.proto = o.proto;
        self.kind = o.kind;
        self.version = o.version;
        self.backends.clone_from(&o.backends);
        self.counts.clone_from(&o.counts);
    }
}

impl FrontCounts {
    fn of(f: &crate::table::Front) -> Self {
        Self {
            frontend: f.addr,
            frontend_port: f.port,
            proto: f.proto,
            kind: f.kind,
            version: f.version(),
            backends: f.backends().iter().map(|b| (b.addr, b.port)).collect(),
            counts: vec![BackendCount::default(); f.backends().len()],
        }
    }

    /// The counts for `f`, a new block of this frontend: those of its
    /// backends that are still there (same address and port) are kept.
    fn carried_to(&self, f: &crate::table::Front) -> Self {
        if self.version == f.version() {
            return self.clone();
        }
        let mut n = Self::of(f);
        let was: hashbrown::HashMap<(Addr16, u16), BackendCount> = self
            .backends
            .iter()
            .copied()
            .zip(self.counts.iter().copied())
            .collect();
        for (k, slot) in n.backends.iter().zip(n.counts.iter_mut()) {
            if let Some(v) = was.get(k) {
                *slot = *v;
            }
        }
        n
    }

    fn same_frontend(&self, f: &crate::table::Front) -> bool {
        self.frontend == f.addr
            && self.frontend_port == f.port
            && self.proto == f.proto
            && self.kind == f.kind
    }
}

impl BackendCounters {
    /// Follows `table` when it is another generation: the counts of a
    /// frontend whose block did not change stay as they are (no work);
    /// those of a changed frontend's backends that are still there (same
    /// address and port) are kept; those of removed backends are dropped.
    /// Allocates only for changed frontends: call it between batches (the
    /// I/O layer does, once per batch; it only compares generations unless
    /// the table changed). True when it did.
    ///
    /// When no frontend moved (a delta that changed some in place, the
    /// common case) it compares the blocks' pointers, two arrays read in
    /// order, and reads only the changed blocks: a worker switching tables
    /// at a large table does not stall its next batch.
    pub fn follow(&mut self, table: &Table) -> bool {
        if self.generation == table.generation() {
            return false;
        }
        if self.follow_in_place(table) {
            self.generation = table.generation();
            return true;
        }
        self.layout = self.layout.wrapping_add(1);
        let mut old: Vec<Option<FrontCounts>> = std::mem::take(&mut self.fronts)
            .into_iter()
            .map(Some)
            .collect();
        let mut by_key: Option<hashbrown::HashMap<(Addr16, u16, u8, u8), usize>> = None;
        let mut fronts = Vec::with_capacity(table.frontends().len());
        for (fi, f) in table.frontends().iter().enumerate() {
            // Where it was: most often at the same place.
            let at = match old.get(fi) {
                Some(Some(c)) if c.same_frontend(f) => Some(fi),
                _ => {
                    let map = by_key.get_or_insert_with(|| {
                        old.iter()
                            .enumerate()
                            .filter_map(|(i, c)| {
                                c.as_ref()
                                    .map(|c| ((c.frontend, c.frontend_port, c.proto, c.kind), i))
                            })
                            .collect()
                    });
                    map.get(&(f.addr, f.port, f.proto, f.kind)).copied()
                }
            };
            let prev = at.and_then(|i| old.get_mut(i).and_then(Option::take));
            fronts.push(match prev {
                Some(c) if c.version == f.version() => c,
                Some(c) => c.carried_to(f),
                None => FrontCounts::of(f),
            });
        }
        self.fronts = fronts;
        self.blocks = table.blocks().to_vec();
        self.generation = table.generation();
        true
    }

    /// [`Self::follow`] when every frontend is where it was: only the
    /// entries whose block changed are made again. False (some entries
    /// already followed, each consistent on its own) when a frontend moved.
    fn follow_in_place(&mut self, table: &Table) -> bool {
        let blocks = table.blocks();
        if self.blocks.len() != blocks.len() || self.fronts.len() != blocks.len() {
            return false;
        }
        for ((mine, entry), new) in self.blocks.iter_mut().zip(&mut self.fronts).zip(blocks) {
            if Arc::ptr_eq(mine, new) {
                continue;
            }
            if !entry.same_frontend(new) {
                return false;
            }
            if entry.version != new.version() {
                *entry = entry.carried_to(new);
            }
            *mine = Arc::clone(new);
        }
        true
    }

    /// Copies these counts into `out`, a reader's copy, for at most
    /// `budget` frontends from `*cursor` on (round robin, `*cursor`
    /// advanced), so that a worker with a large table spends a bounded
    /// time per hand-off and allocates nothing once `out` has room. Each
    /// entry names its frontend and backends, so a copy refreshed in parts
    /// still sums right by [`BackendKey`]; after the frontends moved (a
    /// layout change) the whole is copied at once, so that no frontend is
    /// counted at two places.
    pub fn publish_into(&self, out: &mut BackendCounters, cursor: &mut usize, budget: usize) {
        let n = self.fronts.len();
        let whole = n <= budget || out.layout != self.layout || out.fronts.len() != n;
        out.fronts.truncate(n);
        out.fronts.resize_with(n, FrontCounts::default);
        if whole {
            for (d, s) in out.fronts.iter_mut().zip(&self.fronts) {
                d.clone_from(s);
            }
            *cursor = 0;
        } else {
            let mut at = *cursor % n;
            for _ in 0..budget {
                out.fronts[at].clone_from(&self.fronts[at]);
                at = (at + 1) % n;
            }
            *cursor = at;
        }
        out.generation = self.generation;
        out.layout = self.layout;
    }

    /// The counts of frontend `fi`'s backend `local`.
    #[inline]
    pub fn get_mut(&mut self, fi: u32, local: u32) -> Option<&mut BackendCount> {
        self.fronts
            .get_mut(fi as usize)?
            .counts
            .get_mut(local as usize)
    }

    /// Every backend's key and counts.
    pub fn iter(&self) -> impl Iterator<Item = (BackendKey, BackendCount)> + '_ {
        self.fronts.iter().flat_map(|f| {
            f.backends
                .iter()
                .zip(&f.counts)
                .map(move |(&(backend, backend_port), c)| {
                    (
                        BackendKey {
                            frontend: f.frontend,
                            frontend_port: f.frontend_port,
                            proto: f.proto,
                            kind: f.kind,
                            backend,
                            backend_port,
                        },
                        *c,
                    )
                })
        })
    }
}

/// A frame in a batch: a buffer (with room for a reject) and its length.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The buffer (an AF_XDP chunk, or a test vector).
    pub buf: &'a mut [u8],
    /// Bytes of frame in `buf`.
    pub len: usize,
}

/// The node's own addresses, as the I/O layer knows them: node ports are
/// served only on these (and only within the table's node-port addresses,
/// `--nodeport-addresses`).
pub trait NodeAddrs: Send + Sync + std::fmt::Debug {
    /// Is `addr` one of this node's addresses?
    fn is_node_addr(&self, addr: &Addr16) -> bool;
}

/// Which flows a worker owns, among `count` workers: a flow belongs to the
/// partition ([`Conntrack::owner`]) of its client's (address, port,
/// protocol), which a request carries as its source and a reply as its
/// destination; a source-NATed flow's owner picks a port whose (SNAT
/// address, port, protocol) falls in its own partition, so the reply names
/// it too. The owner alone touches the flow's connection-table partition;
/// any other worker answers [`Verdict::Handoff`] and leaves the frame
/// unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// This worker's index, `0..count`.
    pub index: u16,
    /// How many workers share the flows.
    pub count: u16,
    /// The whole SNAT port range, which an owner among several probes for
    /// ports of its partition.
    pub snat: PortRange,
}

impl Ownership {
    /// A single worker: owns every flow.
    #[must_use]
    pub fn single(snat: PortRange) -> Self {
        Self {
            index: 0,
            count: 1,
            snat,
        }
    }
}

/// One per core: counters, the shared connection table, and this worker's
/// side of the return paths (its SNAT ports, the gateway's addresses).
#[derive(Debug)]
pub struct Worker {
    ct: Arc<Conntrack>,
    ret: ReturnConfig,
    own: Ownership,
    /// Owns partition `own.index` of `ct` (its partitions are `own.count`):
    /// holds it across each batch instead of locking per packet.
    holds: bool,
    /// The partition held during a batch (empty between batches).
    hold: Hold,
    sources: Option<Arc<dyn SourceAddrs>>,
    node_addrs: Option<Arc<dyn NodeAddrs>>,
    /// This worker's counters.
    pub counters: Counters,
    /// This worker's per-backend counters: kept only once
    /// [`Worker::follow_table`] sized them for the table in use.
    pub backends: BackendCounters,
}

type Step = Result<Verdict, DropReason>;

/// A flow's backend and how its replies come back.
#[derive(Debug, Clone, Copy)]
struct Bound {
    backend: Addr16,
    backend_port: u16,
    /// Its index in the table's backend array.
    backend_index: u32,
    nat: FlowNat,
}

/// The backend index of a TCP flow whose backend left the table: it keeps
/// its backend, and counts in no per-backend counter.
const GONE: u32 = u32::MAX;

/// The drop reason of a refused insert.
fn insert_drop(e: InsertError) -> DropReason {
    match e {
        InsertError::Full => DropReason::ConntrackFull,
        InsertError::PortsExhausted => DropReason::SnatPortsExhausted,
        InsertError::Clash => DropReason::FlowClash,
    }
}

/// Parses `buf[..len]`.
#[inline]
fn parse_frame(buf: &[u8], len: usize) -> Result<Option<Parsed>, DropReason> {
    match buf.get(..len) {
        Some(frame) => parse(frame),
        None => Err(DropReason::BadFrameLength),
    }
}

/// Frames per chunk of [`Worker::process_batch`] (an AF_XDP batch).
pub const BATCH: usize = 64;

/// What the first pass learned about a frame.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    parsed: Result<Option<Parsed>, DropReason>,
    frontend: Option<u32>,
    /// Another worker owns the frame's flow: hand it over.
    handoff: Option<u16>,
    /// Another worker owns the frame's flow, but the frame is a first
    /// fragment: decided here, in the owner's partition (locked for it), so
    /// that the datagram's other fragments, which carry no ports and arrive
    /// here too, find its rewrite.
    foreign: Option<u16>,
    /// The flow's one hash, for the lookup (forward with a frontend, else
    /// reply).
    hash: Option<FlowHash>,
}

impl Prepared {
    const EMPTY: Self = Self {
        parsed: Ok(None),
        frontend: None,
        handoff: None,
        foreign: None,
        hash: None,
    };
}

impl Worker {
    /// A worker sharing `ct` with the others, with the default return-path
    /// settings: the whole default SNAT range, no source address (source NAT
    /// and DSR frontends drop as [`DropReason::SnatNoAddress`] until
    /// [`Worker::set_sources`] or a [`ReturnConfig`] gives one).
    #[must_use]
    pub fn new(ct: Arc<Conntrack>) -> Self {
        Self::with_config(ct, ReturnConfig::default())
    }

    /// A worker sharing `ct`, allocating SNAT ports from `ret.ports` (its
    /// share of the range) and using `ret`'s `--snat-address` overrides.
    #[must_use]
    pub fn with_config(ct: Arc<Conntrack>, ret: ReturnConfig) -> Self {
        let own = Ownership::single(ret.ports);
        Self::with_ownership(ct, ret, own)
    }

    /// Worker `own.index` of `own.count` on `ct` (whose
    /// `Config::partitions` must be `own.count`): it decides only the frames
    /// of the flows it owns and answers [`Verdict::Handoff`] for the others.
    /// With more than one owner, source-NAT ports come from `own.snat`
    /// (`ret.ports` serves a single worker).
    #[must_use]
    pub fn with_ownership(ct: Arc<Conntrack>, ret: ReturnConfig, own: Ownership) -> Self {
        let holds = usize::from(own.count) == ct.partitions() && own.index < own.count;
        Self {
            ct,
            ret,
            own,
            holds,
            hold: Hold::default(),
            sources: None,
            node_addrs: None,
            counters: Counters::default(),
            backends: BackendCounters::default(),
        }
    }

    /// Sizes the per-backend counters for `table` (re-indexing them when its
    /// generation is new). Between batches only: it allocates when the table
    /// changed. Until it is called, no per-backend counts are kept.
    pub fn follow_table(&mut self, table: &Table) {
        self.backends.follow(table);
    }

    /// Counts a frame of `len` bytes forwarded to backend `index` of `table`.
    #[inline]
    fn count_backend(&mut self, table: &Table, fi: u32, local: u32, len: usize, new_flow: bool) {
        if self.backends.generation != table.generation() {
            return;
        }
        if let Some(c) = self.backends.get_mut(fi, local) {
            if new_flow {
                c.new_flows += 1;
            } else {
                c.packets += 1;
                c.bytes += len as u64;
            }
        }
    }

    /// Where source addresses come from when no `--snat-address` of the
    /// family is set: the I/O layer's routes, handed over between batches
    /// whenever they change (never per packet).
    pub fn set_sources(&mut self, sources: Option<Arc<dyn SourceAddrs>>) {
        self.sources = sources;
    }

    /// Which addresses are the node's, for node ports: the I/O layer's, handed
    /// over between batches whenever they change (never per packet). `None`
    /// (the default, as in `replay`): every address within the table's
    /// node-port addresses is taken as the node's.
    pub fn set_node_addrs(&mut self, node_addrs: Option<Arc<dyn NodeAddrs>>) {
        self.node_addrs = node_addrs;
    }

    /// The frontend of a packet to `t`: its (address, port, protocol), else a
    /// node port when the address is the node's.
    #[inline]
    fn frontend_of(&self, table: &Table, t: &FlowTuple) -> Option<u32> {
        if let Some(fi) = table.frontend(&t.dst_addr, t.dst_port, t.proto) {
            return Some(fi);
        }
        let fi = table.node_port(&t.dst_addr, t.dst_port, t.proto)?;
        match &self.node_addrs {
            Some(n) if !n.is_node_addr(&t.dst_addr) => None,
            _ => Some(fi),
        }
    }

    /// Which flows this worker owns.
    #[must_use]
    pub fn ownership(&self) -> Ownership {
        self.own
    }

    /// The shared connection table.
    #[must_use]
    pub fn conntrack(&self) -> &Arc<Conntrack> {
        &self.ct
    }

    /// Decides what to do with `buf[..len]` and rewrites it in place.
    /// `buf` may be longer than the frame: a reject can use the room.
    pub fn process(&mut self, now: Now, table: &Table, buf: &mut [u8], len: usize) -> Verdict {
        let prep = self.prepare(table, buf, len);
        let v = self.finish(now, table, buf, len, &prep);
        self.hold.release();
        v
    }

    /// [`Worker::process`] over a batch; `verdicts[i]` is frame `i`'s.
    ///
    /// Works in chunks of [`BATCH`] frames and two passes: the first parses
    /// every frame, finds its frontend and prefetches the connection-table
    /// lines its lookup will touch; the second decides and rewrites. With
    /// tables larger than the caches, the misses of a whole chunk then overlap
    /// instead of being paid one after another.
    pub fn process_batch(
        &mut self,
        now: Now,
        table: &Table,
        frames: &mut [Frame<'_>],
        verdicts: &mut [Verdict],
    ) {
        let n = frames.len().min(verdicts.len());
        let mut prep = [Prepared::EMPTY; BATCH];
        let mut start = 0;
        while start < n {
            let end = (start + BATCH).min(n);
            // Three passes: parse every frame and prefetch its frontend's
            // index slot; then find the frontends (now in cache), hash
            // each flow once and prefetch its connection-table lines; then
            // decide. Each pass's misses overlap across the chunk.
            for (p, f) in prep.iter_mut().zip(&frames[start..end]) {
                let parsed = parse_frame(f.buf, f.len);
                if let Ok(Some(q)) = &parsed {
                    if let Some(t) = q.tuple() {
                        table.prefetch_frontend(&t.dst_addr, t.dst_port, t.proto);
                    }
                }
                *p = Prepared {
                    parsed,
                    ..Prepared::EMPTY
                };
            }
            for p in prep.iter_mut().take(end - start) {
                *p = self.prepare_parsed(table, p.parsed);
            }
            for ((v, f), p) in verdicts[start..end]
                .iter_mut()
                .zip(&mut frames[start..end])
                .zip(&prep)
            {
                *v = self.finish(now, table, f.buf, f.len, p);
            }
            // Between chunks the partition is free for the expiry sweep and
            // the management thread.
            self.hold.release();
            start = end;
        }
    }

    /// First pass: parse, find the frontend, prefetch the flow's entry.
    #[inline]
    fn prepare(&self, table: &Table, buf: &[u8], len: usize) -> Prepared {
        self.prepare_parsed(table, parse_frame(buf, len))
    }

    /// [`Worker::prepare`] of a frame parsed already.
    #[inline]
    fn prepare_parsed(
        &self,
        table: &Table,
        parsed: Result<Option<Parsed>, DropReason>,
    ) -> Prepared {
        let mut frontend = None;
        let mut hash = None;
        if let Ok(Some(p)) = &parsed {
            if let Some(t) = p.tuple() {
                frontend = self.frontend_of(table, &t);
                // One hash per packet: its owner, its prefetch, its lookup.
                // The client's end: a request's source, a reply's
                // destination (the client, or our source-NAT port).
                let h = match frontend {
                    Some(_) => self.ct.hash_original(p.family, &t),
                    None => self.ct.hash_reply(p.family, &t),
                };
                hash = Some(h);
                if self.own.count > 1 {
                    let owner = self.ct.owner_of(p.family, h) as u16;
                    if owner != self.own.index {
                        let first_fragment = p.is_fragment();
                        return Prepared {
                            parsed,
                            frontend,
                            handoff: (!first_fragment).then_some(owner),
                            foreign: first_fragment.then_some(owner),
                            hash,
                        };
                    }
                }
                if let Some(fi) = frontend {
                    self.ct.prefetch_original_hashed(p.family, h);
                    table.prefetch_frontend_record(fi);
                    // A connection opening will read its Maglev slot too.
                    if let (L4::Flow(f), Some(fe)) = (&p.l4, table.frontend_record(fi)) {
                        if f.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
                            table.prefetch_pick(fe, &t);
                        }
                    }
                } else {
                    self.ct.prefetch_reply_hashed(p.family, h);
                }
            }
        }
        Prepared {
            parsed,
            frontend,
            handoff: None,
            foreign: None,
            hash,
        }
    }

    /// Second pass: decide, rewrite, count.
    #[inline]
    fn finish(
        &mut self,
        now: Now,
        table: &Table,
        buf: &mut [u8],
        len: usize,
        prep: &Prepared,
    ) -> Verdict {
        if let Some(owner) = prep.handoff {
            self.counters.handoffs += 1;
            return Verdict::Handoff { owner };
        }
        // A flow's packet goes through the held partition (taken once per
        // chunk). ICMP errors and non-first fragments may look in other
        // partitions, one lock at a time, so ours is let go first; frames
        // that are not ours touch no partition.
        match prep.parsed {
            Ok(Some(Parsed {
                l4: L4::Flow(_), ..
            })) => {
                let part = usize::from(prep.foreign.unwrap_or(self.own.index));
                if self.holds && self.hold.partition() != Some(part) {
                    // Whatever is left of ours first: a lock is never waited
                    // for while one is held.
                    self.hold.release();
                    self.hold = self.ct.hold(part);
                }
            }
            Ok(Some(_)) => self.hold.release(),
            Ok(None) | Err(_) => {}
        }
        let v = match self.decide(now, table, buf, len, prep) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        };
        let Some(k) = VerdictKind::of(&v) else {
            self.counters.handoffs += 1;
            return v;
        };
        let k = k as usize;
        self.counters.packets[k] += 1;
        self.counters.bytes[k] += len as u64;
        if let Verdict::Drop(r) = v {
            self.counters.drops[r.index()] += 1;
        }
        v
    }

    fn decide(
        &mut self,
        now: Now,
        table: &Table,
        buf: &mut [u8],
        len: usize,
        prep: &Prepared,
    ) -> Step {
        let p = match &prep.parsed {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Verdict::Pass),
            Err(r) => return Err(*r),
        };
        match &p.l4 {
            L4::Flow(f) => self.flow(now, table, buf, len, p, f, prep.frontend, prep.hash),
            L4::NonFirstFragment(proto) => self.non_first_fragment(now, buf, len, p, *proto),
            L4::IcmpError(e) => self.icmp_error(now, table, buf, len, p, e),
        }
    }

    #[allow(clippy::too_many_arguments)] // reason: the hot path passes parsed fields, not structs it would have to build
    fn flow(
        &mut self,
        now: Now,
        table: &Table,
        buf: &mut [u8],
        len: usize,
        p: &Parsed,
        f: &FlowL4,
        frontend: Option<u32>,
        hash: Option<FlowHash>,
    ) -> Step {
        let t = FlowTuple {
            src_addr: p.src,
            dst_addr: p.dst,
            src_port: f.src_port,
            dst_port: f.dst_port,
            proto: f.proto,
        };
        if p.is_fragment() {
            self.counters.fragments_first += 1;
        }
        if let Some(fi) = frontend {
            let Some(fe) = table.frontend_record(fi) else {
                return Ok(Verdict::Pass);
            };
            if p.ttl <= 1 {
                return Err(DropReason::TtlExpired);
            }
            // A router does not forward frames sent to a link-layer group
            // address (RFC 1812 §5.3.4, RFC 1122 §3.2.2), nor answer them.
            if buf.first().is_some_and(|b| b & 1 != 0) {
                return Err(DropReason::LinkBroadcast);
            }
            let Some(b) = self.bind(now, table, fi, fe, p.family, &t, f.tcp_flags, hash)? else {
                return reject_in_place(buf, len, p, f).map(|len| Verdict::Reject { len });
            };
            let next_hop = NextHop {
                addr: b.backend,
                side: Side::Backend,
            };
            let to_backend = Some((b.backend, b.backend_port));
            match b.nat {
                FlowNat::Routed => self.nat(now, buf, p, f, None, to_backend, next_hop)?,
                FlowNat::Snat { addr, port } => {
                    self.nat(now, buf, p, f, Some((addr, port)), to_backend, next_hop)?;
                }
                FlowNat::Dsr { outer_src } => {
                    let v = self.encap(now, buf, len, p, Some(f), outer_src, b.backend)?;
                    if matches!(v, Verdict::Forward { .. }) {
                        self.count_backend(table, fi, b.backend_index, len, false);
                    }
                    return Ok(v);
                }
            }
            self.count_backend(table, fi, b.backend_index, len, false);
            return Ok(Verdict::Forward {
                len: ip_len(p, len),
                next_hop,
            });
        }
        // Not to a frontend: a reply from a backend?
        let Some(r) =
            self.ct
                .lookup_reply_in(&mut self.hold, hash, now, p.family, &t, f.tcp_flags, true)
        else {
            return Ok(Verdict::Pass);
        };
        if p.ttl <= 1 {
            return Err(DropReason::TtlExpired);
        }
        let next_hop = NextHop {
            addr: r.client,
            side: Side::Client,
        };
        // A source-NATed reply comes to the gateway's address: the client's
        // is restored too.
        let to_client =
            (r.client != p.dst || r.client_port != f.dst_port).then_some((r.client, r.client_port));
        self.nat(now, buf, p, f, Some((r.vip, r.vport)), to_client, next_hop)?;
        self.counters.replies += 1;
        Ok(Verdict::Forward {
            len: ip_len(p, len),
            next_hop,
        })
    }

    /// The NAT of a flow packet: the source becomes `src` and the destination
    /// `dst` (each when given: a forward packet's destination becomes the
    /// backend, and under source NAT its source the gateway; a reply's source
    /// becomes the frontend, and under source NAT its destination the
    /// client); checksums follow, the TTL drops by one, and a first fragment
    /// leaves its rewrite for the datagram's other fragments.
    #[allow(clippy::too_many_arguments)] // reason: the hot path passes parsed fields, not structs it would have to build
    fn nat(
        &mut self,
        now: Now,
        buf: &mut [u8],
        p: &Parsed,
        f: &FlowL4,
        src: Option<(Addr16, u16)>,
        dst: Option<(Addr16, u16)>,
        next_hop: NextHop,
    ) -> Result<(), DropReason> {
        if let Some((_, port)) = src {
            sctp_fragment_guard(p, f, f.src_port, port)?;
        }
        if let Some((_, port)) = dst {
            sctp_fragment_guard(p, f, f.dst_port, port)?;
        }
        let v4 = |a: &Addr16| [a[12], a[13], a[14], a[15]];
        let fused = match (p.family, f.csum, src, dst) {
            (Family::V4, L4Csum::Tcp | L4Csum::Udp, Some(s), Some(d)) => {
                Some(rewrite::nat_both_ipv4(
                    buf,
                    p.l3(),
                    f.offset(),
                    f.csum,
                    (v4(&s.0), s.1),
                    (v4(&d.0), d.1),
                ))
            }
            (Family::V4, L4Csum::Tcp | L4Csum::Udp, None, Some((a, port))) => Some(
                rewrite::nat_ipv4(buf, p.l3(), f.offset(), f.csum, NatSide::Dst, v4(&a), port),
            ),
            (Family::V4, L4Csum::Tcp | L4Csum::Udp, Some((a, port)), None) => Some(
                rewrite::nat_ipv4(buf, p.l3(), f.offset(), f.csum, NatSide::Src, v4(&a), port),
            ),
            (Family::V6, L4Csum::Tcp | L4Csum::Udp6, Some(s), Some(d)) => Some(
                rewrite::nat_both_ipv6(buf, p.l3(), f.offset(), f.csum, (&s.0, s.1), (&d.0, d.1)),
            ),
            (Family::V6, L4Csum::Tcp | L4Csum::Udp6, None, Some((a, port))) => Some(
                rewrite::nat_ipv6(buf, p.l3(), f.offset(), f.csum, NatSide::Dst, &a, port),
            ),
            (Family::V6, L4Csum::Tcp | L4Csum::Udp6, Some((a, port)), None) => Some(
                rewrite::nat_ipv6(buf, p.l3(), f.offset(), f.csum, NatSide::Src, &a, port),
            ),
            _ => None,
        };
        match fused {
            // TCP and UDP: addresses, ports, TTL and both checksums in one pass.
            Some(r) => {
                r.map_err(|e| match e {
                    rewrite::RewriteError::TtlExpired => DropReason::TtlExpired,
                    _ => DropReason::L4Malformed,
                })?;
            }
            // SCTP (and anything else): the named steps, then the CRC32c,
            // which is checked first: a rewrite must not make a corrupt
            // packet valid (a fragment's CRC covers bytes not here).
            None => {
                if f.proto == Proto::Sctp && !p.is_fragment() {
                    rewrite::sctp_crc_checked(buf, f.offset(), p.ip_end()).map_err(
                        |e| match e {
                            rewrite::RewriteError::BadChecksum => DropReason::SctpBadChecksum,
                            _ => DropReason::L4Malformed,
                        },
                    )?;
                }
                let l4 = Some((f.offset(), f.csum));
                if let Some((a, port)) = src {
                    rewrite_addr(buf, p.family, p.l3(), Dir::Src, l4, &a)?;
                    rewrite::set_src_port(buf, f.offset(), f.csum, port)
                        .map_err(|_| DropReason::L4Malformed)?;
                }
                if let Some((a, port)) = dst {
                    rewrite_addr(buf, p.family, p.l3(), Dir::Dst, l4, &a)?;
                    rewrite::set_dst_port(buf, f.offset(), f.csum, port)
                        .map_err(|_| DropReason::L4Malformed)?;
                }
                finish_l4(buf, p, f)?;
                decrement_ttl(buf, p)?;
            }
        }
        if let Some(frag) = p.fragment() {
            let rw = FragRewrite::Nat {
                src: src.map(|s| s.0),
                dst: dst.map(|d| d.0),
                next_hop,
            };
            self.ct
                .fragment_remember(now, &p.src, &p.dst, &frag, rw)
                .map_err(frag_drop)?;
        }
        Ok(())
    }

    /// Direct server return: the packet goes to `backend` inside an outer
    /// header from `outer_src`, unchanged but for its TTL. One that would
    /// exceed the backend side's MTU once encapsulated is answered with ICMP
    /// fragmentation needed / packet too big when it is a flow packet
    /// (`f`), and dropped otherwise (non-first fragments, ICMP errors).
    #[allow(clippy::too_many_arguments)] // reason: the hot path passes parsed fields, not structs it would have to build
    fn encap(
        &mut self,
        now: Now,
        buf: &mut [u8],
        len: usize,
        p: &Parsed,
        f: Option<&FlowL4>,
        outer_src: Addr16,
        backend: Addr16,
    ) -> Step {
        let outer = encap::outer_len(p.family);
        let mtu = usize::from(self.ret.encap_mtu);
        if p.ip_end() - p.l3() + outer > mtu {
            if f.is_none() {
                return Err(DropReason::EncapTooBig);
            }
            let len = reject::too_big_in_place(buf, len, p, (mtu - outer.min(mtu)) as u16)?;
            self.counters.encap_too_big += 1;
            return Ok(Verdict::Reject { len });
        }
        decrement_ttl(buf, p)?;
        let len = encap::encapsulate(buf, p.family, p.l3(), p.ip_end(), &outer_src, &backend)
            .map_err(|_| DropReason::BufferTooSmall)?;
        if let (Some(frag), Some(_)) = (p.fragment(), f) {
            let rw = FragRewrite::Encap { outer_src, backend };
            self.ct
                .fragment_remember(now, &p.src, &p.dst, &frag, rw)
                .map_err(frag_drop)?;
        }
        Ok(Verdict::Forward {
            len,
            next_hop: NextHop {
                addr: backend,
                side: Side::Backend,
            },
        })
    }

    /// The backend for a packet to frontend `fi`, and how its replies come
    /// back: the tracked binding while its backend is still in the table, else
    /// a new Maglev (or affinity) pick, bound with the frontend's return path.
    /// `None` when the frontend takes no new flows (the caller rejects).
    #[allow(clippy::too_many_arguments)] // reason: the hot path passes parsed fields, not structs it would have to build
    fn bind(
        &mut self,
        now: Now,
        table: &Table,
        fi: u32,
        fe: &Front,
        family: Family,
        t: &FlowTuple,
        flags: u8,
        hash: Option<FlowHash>,
    ) -> Result<Option<Bound>, DropReason> {
        // A flow bound under this version of its frontend is still valid.
        let epoch = fe.version() as u32;
        let opening = flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0;
        if let Some(hit) =
            self.ct
                .lookup_original_in(&mut self.hold, hash, now, family, t, flags, true)
        {
            // A new SYN on a closed tuple is a new connection: pick again.
            if !(opening && hit.state.is_closed()) {
                let bound = Bound {
                    backend: hit.backend,
                    backend_port: hit.backend_port,
                    backend_index: hit.backend_index,
                    nat: hit.nat,
                };
                if hit.epoch == epoch && hit.frontend == fi {
                    return Ok(Some(bound));
                }
                // A new table: the backend is still one of the frontend's
                // (draining or not: a weight-0 backend keeps its flows), or
                // it left the table. A TCP connection keeps a backend that
                // left until it closes or times out, as Linux conntrack keeps
                // kube-proxy's DNAT; its index becomes `GONE` (no
                // per-backend counter). A connection the backend never
                // answered, and UDP and SCTP flows, pick again (kube-proxy
                // flushes UDP entries).
                let keep = t.proto == Proto::Tcp && hit.state != FlowState::TcpSynSent;
                // Only the flows of a frontend that changed are searched.
                let kept = table
                    .backend_index(fe, &hit.backend, hit.backend_port)
                    .or(keep.then_some(GONE));
                if let Some(backend_index) = kept {
                    self.ct
                        .revalidate_in(&mut self.hold, family, t, fi, epoch, backend_index);
                    return Ok(Some(Bound {
                        backend_index,
                        ..bound
                    }));
                }
                self.counters.flows_moved += 1;
            }
        }
        // A source no host can have (RFC 1812 §5.3.7, RFC 4291) never gets
        // a flow, so only new flows are checked; nor is it answered.
        if martian_source(&t.src_addr) {
            return Err(DropReason::MartianSource);
        }
        // Nor one from a cluster IP or load-balancer address: its replies
        // would go to the frontend (Linux: a local source is a martian).
        if table.is_virtual_addr(&t.src_addr) {
            return Err(DropReason::FrontendSource);
        }
        if !table.source_allowed(fe, &t.src_addr) {
            return Err(DropReason::SourceRange);
        }
        let Some((backend_index, backend, backend_port)) = self.pick(now, table, fe, t) else {
            if fe.flags & FRONTEND_NODE_LOCAL != 0 && fe.ring_len > 0 {
                // Endpoints elsewhere, none on the client's node.
                return Err(DropReason::NoLocalEndpoint);
            }
            return Ok(None);
        };
        // NetworkPolicy, before NAT hides the client (once per new flow).
        if !table.policy_allows(
            &t.src_addr,
            fe,
            backend_index,
            &backend,
            t.proto,
            backend_port,
        ) {
            return Err(DropReason::NetworkPolicy);
        }
        let binding = Binding {
            backend,
            backend_port,
            frontend: fi,
            epoch,
            backend_index,
            nat: FlowNat::Routed,
        };
        let state = FlowState::initial(t.proto, flags);
        let overrides = self.ret.overrides(family == Family::V4);
        let nat = match Table::return_path(fe) {
            ReturnPath::Routed => {
                self.ct
                    .insert_in(&mut self.hold, now, family, t, &binding, state)
                    .map_err(insert_drop)?;
                FlowNat::Routed
            }
            ReturnPath::Dsr => {
                let outer_src = match overrides.first() {
                    Some(a) => *a,
                    None => self.source_for(&backend)?,
                };
                let nat = FlowNat::Dsr { outer_src };
                self.ct
                    .insert_in(
                        &mut self.hold,
                        now,
                        family,
                        t,
                        &Binding { nat, ..binding },
                        state,
                    )
                    .map_err(insert_drop)?;
                nat
            }
            ReturnPath::Snat => {
                let routed;
                let addrs = if overrides.is_empty() {
                    routed = [self.source_for(&backend)?];
                    &routed[..]
                } else {
                    overrides
                };
                // An owner among several probes the whole range for ports
                // whose replies come back to it.
                let ports = if self.own.count > 1 {
                    self.own.snat
                } else {
                    self.ret.ports
                };
                self.ct
                    .insert_snat_in(
                        &mut self.hold,
                        now,
                        family,
                        t,
                        &binding,
                        state,
                        addrs,
                        ports,
                    )
                    .map_err(insert_drop)?
            }
        };
        self.counters.new_flows += 1;
        self.count_backend(table, fi, backend_index, 0, true);
        Ok(Some(Bound {
            backend,
            backend_port,
            backend_index,
            nat,
        }))
    }

    /// The gateway's own address towards `dst`, from the I/O layer's routes.
    fn source_for(&self, dst: &Addr16) -> Result<Addr16, DropReason> {
        self.sources
            .as_ref()
            .and_then(|s| s.source_for(dst))
            .ok_or(DropReason::SnatNoAddress)
    }

    fn pick(
        &mut self,
        now: Now,
        table: &Table,
        fe: &Front,
        t: &FlowTuple,
    ) -> Option<(u32, Addr16, u16)> {
        if fe.flags & FRONTEND_AFFINITY == 0 {
            return table.pick_index(fe, t).map(|(i, b)| (i, b.addr, b.port));
        }
        let sticky = self
            .ct
            .affinity_get(now, &t.src_addr, &t.dst_addr, t.dst_port, t.proto)
            .and_then(|(a, p)| {
                table
                    .backends_of(fe)
                    .iter()
                    .position(|b| b.addr == a && b.port == p && b.weight > 0)
                    .map(|i| (i as u32, a, p))
            });
        let chosen = match sticky {
            Some(b) => {
                self.counters.affinity_hits += 1;
                b
            }
            None => table.pick_index(fe, t).map(|(i, b)| (i, b.addr, b.port))?,
        };
        // Refreshed on every new connection, like kube-proxy's `recent` match.
        let _ = self.ct.affinity_set(
            now,
            &t.src_addr,
            &t.dst_addr,
            t.dst_port,
            t.proto,
            (chosen.1, chosen.2),
            fe.affinity_timeout_s,
        );
        Some(chosen)
    }

    fn non_first_fragment(
        &mut self,
        now: Now,
        buf: &mut [u8],
        len: usize,
        p: &Parsed,
        proto: Option<Proto>,
    ) -> Step {
        let Some(frag) = p.fragment() else {
            return Ok(Verdict::Pass);
        };
        // Only a fragment that will leave leaves its range behind.
        let too_big =
            p.ip_end() - p.l3() + encap::outer_len(p.family) > usize::from(self.ret.encap_mtu);
        let forwards =
            |rw: &FragRewrite| p.ttl > 1 && !(too_big && matches!(rw, FragRewrite::Encap { .. }));
        let rw = match self
            .ct
            .fragment_lookup(now, &p.src, &p.dst, &frag, forwards)
        {
            Ok(rw) => rw,
            // An IPv6 fragment of an unknown protocol behind extension
            // headers, whose datagram we never balanced: the kernel's.
            Err(FragRefused::Untracked) if proto.is_none() => return Ok(Verdict::Pass),
            Err(e) => {
                self.counters.fragments_nonfirst += 1;
                return Err(frag_drop(e));
            }
        };
        self.counters.fragments_nonfirst += 1;
        if p.ttl <= 1 {
            return Err(DropReason::TtlExpired);
        }
        match rw {
            FragRewrite::Nat { src, dst, next_hop } => {
                if let Some(a) = src {
                    rewrite_addr(buf, p.family, p.l3(), Dir::Src, None, &a)?;
                }
                if let Some(a) = dst {
                    rewrite_addr(buf, p.family, p.l3(), Dir::Dst, None, &a)?;
                }
                decrement_ttl(buf, p)?;
                Ok(Verdict::Forward {
                    len: ip_len(p, len),
                    next_hop,
                })
            }
            FragRewrite::Encap { outer_src, backend } => {
                self.encap(now, buf, len, p, None, outer_src, backend)
            }
        }
    }

    /// An ICMP error quoting one of our flows follows it, translated as the
    /// flow is: to the backend when it quotes a reply we sent as the
    /// frontend (encapsulated as it is for a DSR flow, whose backend sent
    /// that reply itself), to the client when it quotes a packet we sent to
    /// a backend. Under source NAT both the outer header and the quoted
    /// packet are translated both ways.
    fn icmp_error(
        &mut self,
        now: Now,
        table: &Table,
        buf: &mut [u8],
        len: usize,
        p: &Parsed,
        e: &IcmpError,
    ) -> Step {
        let q = e.quoted;
        // Read before anything in the quote is rewritten.
        let qt = q.tuple(buf);
        // An error from a source no host can have is not believed (RFC 1812
        // §5.3.7), whatever it quotes.
        if martian_source(&p.src) {
            return Err(DropReason::MartianSource);
        }
        // The quoted packet went the other way: its reverse is the flow key.
        let key = qt.reversed();
        if p.ttl <= 1 {
            // Decided before any rewrite: ours and expiring → dropped like any
            // flow packet; not ours → the kernel's.
            let ours = self
                .ct
                .lookup_original(now, p.family, &key, 0, false)
                .is_some()
                || self
                    .ct
                    .lookup_reply(now, p.family, &key, 0, false)
                    .is_some();
            return if ours {
                Err(DropReason::TtlExpired)
            } else {
                Ok(Verdict::Pass)
            };
        }
        let quoted_l4 = |c: Option<L4Csum>| c.map(|c| (q.l4(), c));
        // A quoted SCTP packet's CRC32c covers its ports: when the quote holds
        // all of it, the stored CRC follows the port rewrite (right stays
        // right, wrong stays wrong); a cut quote's cannot be computed and is
        // left as sent, as the peer only checks the verification tag (RFC
        // 9260 Appendix C).
        let sctp_before = (qt.proto == Proto::Sctp && q.whole)
            .then(|| rewrite::sctp_crc_computed(buf, q.l4(), q.end()).ok())
            .flatten();
        let next_hop = if let Some(hit) = self.ct.lookup_original(now, p.family, &key, 0, false) {
            // Quoted: vip → client (a reply). Send it to the backend as if it
            // had come from the client: outer dst and quoted src become the
            // backend; under source NAT, outer src and quoted dst the gateway.
            self.verify_icmp(buf, p, e)?;
            if let FlowNat::Dsr { outer_src } = hit.nat {
                let v = self.encap(now, buf, len, p, None, outer_src, hit.backend)?;
                self.counters.icmp_errors += 1;
                return Ok(v);
            }
            let csum = quoted_csum(p.family, &qt, q.l4(), q.end());
            rewrite_addr(buf, p.family, p.l3(), Dir::Dst, None, &hit.backend)?;
            rewrite_addr(
                buf,
                p.family,
                q.l3(),
                Dir::Src,
                quoted_l4(csum),
                &hit.backend,
            )?;
            rewrite::set_src_port(buf, q.l4(), csum.unwrap_or(L4Csum::None), hit.backend_port)
                .map_err(|_| DropReason::IcmpMalformed)?;
            if let FlowNat::Snat { addr, port } = hit.nat {
                rewrite_addr(buf, p.family, p.l3(), Dir::Src, None, &addr)?;
                rewrite_addr(buf, p.family, q.l3(), Dir::Dst, quoted_l4(csum), &addr)?;
                rewrite::set_dst_port(buf, q.l4(), csum.unwrap_or(L4Csum::None), port)
                    .map_err(|_| DropReason::IcmpMalformed)?;
            }
            NextHop {
                addr: hit.backend,
                side: Side::Backend,
            }
        } else if let Some(r) = self.ct.lookup_reply(now, p.family, &key, 0, false) {
            // Quoted: client (or the gateway, under source NAT) → backend, a
            // packet we sent. Send it to the client as if the frontend had
            // sent it: quoted dst becomes the frontend, and so does the outer
            // source when the backend itself complained; under source NAT,
            // outer dst and quoted src become the client.
            self.verify_icmp(buf, p, e)?;
            let csum = quoted_csum(p.family, &qt, q.l4(), q.end());
            if p.src == qt.dst_addr {
                rewrite_addr(buf, p.family, p.l3(), Dir::Src, None, &r.vip)?;
            }
            let snat = r.client != qt.src_addr || r.client_port != qt.src_port;
            if snat {
                rewrite_addr(buf, p.family, p.l3(), Dir::Dst, None, &r.client)?;
                rewrite_addr(buf, p.family, q.l3(), Dir::Src, quoted_l4(csum), &r.client)?;
                rewrite::set_src_port(buf, q.l4(), csum.unwrap_or(L4Csum::None), r.client_port)
                    .map_err(|_| DropReason::IcmpMalformed)?;
            }
            rewrite_addr(buf, p.family, q.l3(), Dir::Dst, quoted_l4(csum), &r.vip)?;
            rewrite::set_dst_port(buf, q.l4(), csum.unwrap_or(L4Csum::None), r.vport)
                .map_err(|_| DropReason::IcmpMalformed)?;
            let addr = if snat { r.client } else { p.dst };
            // Never towards a frontend: a forged error, or one about a flow
            // from a spoofed frontend source (one hashed lookup).
            if table.is_virtual_addr(&addr) {
                return Err(DropReason::ErrorToFrontend);
            }
            // An error goes back to the quoted packet's source (RFC 792,
            // RFC 4443 §2.4); one addressed elsewhere is forged.
            if !snat && p.dst != qt.src_addr {
                return Err(DropReason::IcmpMalformed);
            }
            NextHop {
                addr,
                side: Side::Client,
            }
        } else {
            return Ok(Verdict::Pass);
        };
        if let Some(before) = sctp_before {
            rewrite::sctp_crc_follow(buf, q.l4(), q.end(), before)
                .map_err(|_| DropReason::IcmpMalformed)?;
        }
        write_icmp_checksum(buf, p, e);
        decrement_ttl(buf, p)?;
        self.counters.icmp_errors += 1;
        Ok(Verdict::Forward {
            len: ip_len(p, len),
            next_hop,
        })
    }

    /// Refuses an ICMP error whose checksum is wrong: the pipeline recomputes
    /// it after the rewrite and must not launder a corrupt message.
    fn verify_icmp(&self, buf: &[u8], p: &Parsed, e: &IcmpError) -> Result<(), DropReason> {
        let msg = buf
            .get(e.offset()..p.ip_end())
            .ok_or(DropReason::IcmpMalformed)?;
        let sum = match p.family {
            Family::V4 => checksum::sum_bytes(0, msg),
            Family::V6 => checksum::sum_bytes(
                checksum::pseudo_header_v6(&p.src, &p.dst, 58, msg.len() as u32),
                msg,
            ),
        };
        if checksum::fold(sum) == 0xffff {
            Ok(())
        } else {
            Err(DropReason::IcmpMalformed)
        }
    }
}

/// The quoted packet's transport checksum, when the quote holds it.
fn quoted_csum(family: Family, t: &FlowTuple, l4: usize, end: usize) -> Option<L4Csum> {
    let (kind, at) = match (t.proto, family) {
        (Proto::Tcp, _) => (L4Csum::Tcp, 16),
        (Proto::Udp, Family::V4) => (L4Csum::Udp, 6),
        (Proto::Udp, Family::V6) => (L4Csum::Udp6, 6),
        (Proto::Sctp, _) => return None,
    };
    (l4 + at + 2 <= end).then_some(kind)
}

fn write_icmp_checksum(buf: &mut [u8], p: &Parsed, e: &IcmpError) {
    if buf.len() < p.ip_end() || e.offset() + 4 > p.ip_end() {
        return;
    }
    buf[e.offset() + 2] = 0;
    buf[e.offset() + 3] = 0;
    let c = match p.family {
        Family::V4 => checksum::finish(checksum::sum_bytes(0, &buf[e.offset()..p.ip_end()])),
        Family::V6 => {
            // The pseudo-header holds the outer addresses as rewritten.
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&buf[p.l3() + 8..p.l3() + 24]);
            d.copy_from_slice(&buf[p.l3() + 24..p.l3() + 40]);
            checksum::l4_checksum_v6(&s, &d, 58, &buf[e.offset()..p.ip_end()])
        }
    };
    buf[e.offset() + 2..e.offset() + 4].copy_from_slice(&c.to_be_bytes());
}

#[derive(Clone, Copy)]
enum Dir {
    Src,
    Dst,
}

fn rewrite_addr(
    buf: &mut [u8],
    family: Family,
    l3: usize,
    dir: Dir,
    l4: Option<(usize, L4Csum)>,
    new: &Addr16,
) -> Result<(), DropReason> {
    let r = match (family, dir) {
        (Family::V4, Dir::Src) => {
            rewrite::set_ipv4_src(buf, l3, l4, [new[12], new[13], new[14], new[15]])
        }
        (Family::V4, Dir::Dst) => {
            rewrite::set_ipv4_dst(buf, l3, l4, [new[12], new[13], new[14], new[15]])
        }
        (Family::V6, Dir::Src) => rewrite::set_ipv6_src(buf, l3, l4, *new),
        (Family::V6, Dir::Dst) => rewrite::set_ipv6_dst(buf, l3, l4, *new),
    };
    r.map_err(|_| DropReason::IpTruncated)
}

/// A fragment of an SCTP packet cannot have its port changed: the CRC32c that
/// covers the port spans the whole reassembled packet.
fn sctp_fragment_guard(
    p: &Parsed,
    f: &FlowL4,
    old_port: u16,
    new_port: u16,
) -> Result<(), DropReason> {
    if f.proto == Proto::Sctp && p.is_fragment() && old_port != new_port {
        return Err(DropReason::SctpFragmentPortRewrite);
    }
    Ok(())
}

/// The drop reason of a refused fragment.
fn frag_drop(e: FragRefused) -> DropReason {
    match e {
        FragRefused::Untracked => DropReason::FragmentUntracked,
        FragRefused::Overlap => DropReason::FragmentOverlap,
    }
}

/// SCTP's CRC32c covers the ports: recompute it after a port rewrite.
fn finish_l4(buf: &mut [u8], p: &Parsed, f: &FlowL4) -> Result<(), DropReason> {
    if f.proto == Proto::Sctp && !p.is_fragment() {
        rewrite::sctp_update_crc(buf, f.offset(), p.ip_end())
            .map_err(|_| DropReason::L4Malformed)?;
    }
    Ok(())
}

/// A source address no host can have: IPv4 "this network" (0/8), loopback,
/// multicast or limited broadcast; IPv6 unspecified, loopback or multicast.
#[inline]
fn martian_source(a: &Addr16) -> bool {
    match crate::flow::ip_from16(*a) {
        std::net::IpAddr::V4(v) => {
            v.octets()[0] == 0 || v.is_loopback() || v.is_multicast() || v.is_broadcast()
        }
        std::net::IpAddr::V6(v) => v.is_unspecified() || v.is_loopback() || v.is_multicast(),
    }
}

/// The length of a forwarded frame: up to the end of its IP packet. Bytes
/// after it (Ethernet padding, or trailing junk) are trimmed, as the kernel
/// trims an skb to the IP length before forwarding.
#[inline]
fn ip_len(p: &Parsed, len: usize) -> usize {
    p.ip_end().min(len)
}

fn decrement_ttl(buf: &mut [u8], p: &Parsed) -> Result<(), DropReason> {
    let r = match p.family {
        Family::V4 => rewrite::decrement_ttl_ipv4(buf, p.l3()),
        Family::V6 => rewrite::decrement_hop_limit_ipv6(buf, p.l3()),
    };
    r.map(|_| ()).map_err(|_| DropReason::TtlExpired)
}
