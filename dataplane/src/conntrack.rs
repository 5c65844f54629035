//! Connection tracking, ClientIP affinity and fragment tracking, shared by all workers.
//!
//! Owns: the flow table (forward: client tuple → backend; reverse: backend tuple
//! → frontend, for reverse NAT), per-protocol timeouts and the TCP state that
//! shortens them, eviction under pressure, the affinity table and the fragment
//! table.
//!
//! Layout: one [`Conntrack`] is shared (`Arc`) by every worker, because a reply
//! may arrive on another core than its request. It is split into shards, each a
//! `Mutex` over two `hashbrown` tables. A forward entry lives in the shard of
//! the client's (address, port, protocol); a reverse entry in the shard of the
//! reply's destination (address, port, protocol). For a routed flow that is the
//! client again, so one lock covers both entries and a reply updates the state
//! the request sees. For a source-NATed flow the reply goes to the gateway's
//! SNAT address and port, whose shard is usually another: each direction then
//! takes its own shard's lock, and what must change in the other shard (a
//! removal, a copy of the state) is done after the first lock is released, so
//! that no thread ever holds two shard locks. DSR flows have no reverse entry.
//! IPv4 and IPv6 flows live in separate tables: an IPv4 flow costs 48 + 32
//! bytes of entries (see the size tests). Memory is allocated once, at
//! construction: tables never grow.
//!
//! Source NAT ([`Conntrack::insert_snat`]): a port is unique per (SNAT
//! address, backend address, backend port, protocol), the key of the reply's
//! reverse entry. A new flow probes ports from a point its keyed hash picks
//! and reserves the first whose reverse key is free; the reservation is the
//! reverse entry itself, so a live tuple is never handed out twice, and a port
//! is free again once its flow is gone (closed, reset, timed out, evicted).
//!
//! Expiry is driven by the `now` the caller passes: an expired entry is a miss
//! on lookup, and [`Conntrack::expire`] sweeps a few shards per call.
//!
//! Confirmed flows first: every new flow starts *unconfirmed*, whatever its
//! first packet (a SYN, or a packet of a flow picked up mid-stream, which is
//! still forwarded to its pick). It becomes *confirmed* when its backend has
//! answered ([`FlowState`] docs and `docs/architecture.md` give the rule per
//! protocol and return path). When a shard is full, an insert removes expired
//! entries, then unconfirmed ones; a confirmed flow is never evicted, only
//! expired: a shard full of confirmed flows refuses the new flow instead
//! ([`InsertError::Full`]), counted by the new flow's [`FlowClass`]. Of a
//! flow's two entries the forward one decides: a source-NATed flow is marked
//! confirmed in its reverse entry first, then in its forward entry, so that
//! no eviction ever sees a confirmed flow whose other half looks unconfirmed.
//!
//! A new flow never displaces a live one: a routed flow whose reply tuple is a
//! live flow's (one client port to two Services that share an endpoint) is
//! refused ([`InsertError::Clash`]), as Linux conntrack refuses a clash; source
//! NAT probes another port instead.
//!
//! Must never: read a clock, allocate after construction, or hold two shard
//! locks at once.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use parking_lot::lock_api::{ArcMutexGuard, MappedMutexGuard};
use parking_lot::{Mutex as PlMutex, MutexGuard as PlMutexGuard, RawMutex};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use crate::flow::{v4_to_16, Addr16, FlowTuple, Proto};
use crate::packet::parse::{tcp_flags, Family, Fragment};
use crate::prefetch::prefetch;
use crate::snat::PortRange;
use crate::time::Now;
use crate::verdict::NextHop;

/// Idle timeouts in seconds, per protocol and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP after a SYN, before the backend answered (Linux `nf_conntrack_tcp_timeout_syn_sent` is 120).
    pub tcp_syn: u32,
    /// Established TCP (kube-proxy's `--conntrack-tcp-timeout-established` default: 24 h).
    pub tcp_established: u32,
    /// TCP after a FIN in either direction (Linux FIN_WAIT/TIME_WAIT: 120).
    pub tcp_fin: u32,
    /// TCP after a RST (Linux CLOSE: 10).
    pub tcp_rst: u32,
    /// UDP and SCTP before any reply (Linux `nf_conntrack_udp_timeout`: 30).
    pub datagram: u32,
    /// UDP and SCTP once the backend replied (Linux `udp_timeout_stream`: 120).
    pub datagram_replied: u32,
    /// Non-first fragments follow their first fragment for this long (Linux `ipfrag_time`: 30).
    pub fragment: u32,
    /// TCP past its SYN, or picked up mid-stream, that its backend has not
    /// confirmed (Linux caps such a flow at `nf_conntrack_tcp_timeout_unacknowledged`, 300).
    pub tcp_unconfirmed: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: 60,
            tcp_established: 86_400,
            tcp_fin: 120,
            tcp_rst: 10,
            datagram: 30,
            datagram_replied: 120,
            fragment: 30,
            tcp_unconfirmed: 120,
        }
    }
}

/// Sizing and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Flows per IP family the table holds at least (rounded up to fill the
    /// allocated buckets).
    pub capacity: usize,
    /// Number of shards (rounded up to a power of two, at least
    /// `partitions`).
    pub shards: usize,
    /// Partitions the shards are grouped in, one per worker that owns its
    /// flows ([`Conntrack::owner`]): a worker holds its partition for a
    /// whole batch ([`Conntrack::hold`]), so an established flow's packet
    /// takes no lock. 1 (the default): one worker, or workers taking turns.
    /// `shards` (or more) partitions: every lookup locks its own shard, as
    /// workers sharing flows without owning them need.
    pub partitions: usize,
    /// Affinity entries (client, service port) held at least.
    pub affinity_capacity: usize,
    /// In-flight fragmented datagrams held at least.
    pub fragment_capacity: usize,
    /// Timeouts.
    pub timeouts: Timeouts,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            capacity: 1 << 20,
            shards: 256,
            partitions: 1,
            affinity_capacity: 1 << 16,
            fragment_capacity: 1 << 14,
            timeouts: Timeouts::default(),
        }
    }
}

/// The state of a tracked flow.
///
/// Apart from its state, a flow is *confirmed* or not. Every flow starts
/// unconfirmed; it is confirmed when its backend has answered:
/// - TCP, routed or source-NATed: a reply with ACK and without SYN or RST
///   (the backend accepted the connection: a SYN-ACK alone, or a RST, does
///   not count, since a spoofed SYN or ACK gets those);
/// - TCP, DSR (replies bypass the gateway): the client's ACK completing a
///   handshake whose SYN the gateway saw; a DSR flow picked up mid-stream
///   is never confirmed;
/// - UDP and SCTP, routed or source-NATed: answered, and still active two
///   seconds after it began (Linux's rule for an assured UDP flow); DSR
///   datagram flows are never confirmed.
///
/// Unconfirmed flows are evicted first under pressure and have short
/// timeouts; confirmed ones are never evicted, only expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FlowState {
    /// TCP: the client's SYN went to the backend; no answer yet.
    TcpSynSent = 1,
    /// TCP: the backend answered (or the flow was picked up mid-stream).
    TcpEstablished = 2,
    /// TCP: a FIN was seen.
    TcpClosing = 3,
    /// TCP: a RST was seen.
    TcpReset = 4,
    /// UDP or SCTP: no reply yet.
    Unreplied = 5,
    /// UDP or SCTP: the backend replied.
    Replied = 6,
}

impl FlowState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::TcpSynSent,
            2 => Self::TcpEstablished,
            3 => Self::TcpClosing,
            4 => Self::TcpReset,
            6 => Self::Replied,
            _ => Self::Unreplied,
        }
    }

    /// The state after a client's packet with `flags` in a flow whose replies
    /// bypass the gateway (DSR): as [`FlowState::advance`], and a client's
    /// ACK without SYN establishes a TCP flow (the client has seen the
    /// backend's SYN-ACK).
    #[must_use]
    pub fn advance_one_way(self, flags: u8) -> Self {
        let next = self.advance(false, flags);
        if next == Self::TcpSynSent
            && flags & tcp_flags::ACK != 0
            && flags & (tcp_flags::SYN | tcp_flags::RST | tcp_flags::FIN) == 0
        {
            Self::TcpEstablished
        } else {
            next
        }
    }

    /// A TCP flow that is over: a new SYN on its tuple starts a new flow.
    #[must_use]
    pub fn is_closed(self) -> bool {
        matches!(self, Self::TcpClosing | Self::TcpReset)
    }

    /// State for the first packet of a new flow.
    #[must_use]
    pub fn initial(proto: Proto, flags: u8) -> Self {
        match proto {
            Proto::Tcp if flags & tcp_flags::RST != 0 => Self::TcpReset,
            Proto::Tcp if flags & tcp_flags::FIN != 0 => Self::TcpClosing,
            // A SYN opens a flow; anything else is a flow picked up mid-stream
            // (after a gateway restart or an ECMP change): forwarded as
            // established, but unconfirmed until its backend answers.
            Proto::Tcp if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 => {
                Self::TcpSynSent
            }
            Proto::Tcp => Self::TcpEstablished,
            Proto::Udp | Proto::Sctp => Self::Unreplied,
        }
    }

    /// The state after a packet with `flags` (TCP flags; 0 otherwise) in the
    /// given direction. FIN and RST only ever shorten a flow's life.
    #[must_use]
    pub fn advance(self, reply: bool, flags: u8) -> Self {
        match self {
            Self::TcpReset => Self::TcpReset,
            _ if flags & tcp_flags::RST != 0 && self as u8 <= Self::TcpReset as u8 => {
                Self::TcpReset
            }
            Self::TcpClosing => Self::TcpClosing,
            Self::TcpSynSent | Self::TcpEstablished if flags & tcp_flags::FIN != 0 => {
                Self::TcpClosing
            }
            Self::TcpSynSent if reply => Self::TcpEstablished,
            Self::Unreplied if reply => Self::Replied,
            s => s,
        }
    }

    /// Idle timeout of this state in a confirmed flow.
    #[must_use]
    pub fn timeout(self, t: &Timeouts) -> u32 {
        match self {
            Self::TcpSynSent => t.tcp_syn,
            Self::TcpEstablished => t.tcp_established,
            Self::TcpClosing => t.tcp_fin,
            Self::TcpReset => t.tcp_rst,
            Self::Unreplied => t.datagram,
            Self::Replied => t.datagram_replied,
        }
    }
}

/// Idle timeout of `state` in a flow that is `confirmed` or not: an
/// unconfirmed TCP flow past its SYN takes [`Timeouts::tcp_unconfirmed`],
/// an unconfirmed answered datagram flow the short [`Timeouts::datagram`].
#[inline]
fn timeout_of(state: FlowState, confirmed: bool, t: &Timeouts) -> u32 {
    match state {
        FlowState::TcpEstablished if !confirmed => t.tcp_unconfirmed,
        FlowState::Replied if !confirmed => t.datagram,
        s => s.timeout(t),
    }
}

/// Does a reply with TCP `flags` confirm a TCP flow? A backend sends a
/// segment without SYN and without RST only in a connection it accepted,
/// that is once the client acknowledged its SYN-ACK: a SYN-ACK alone (a
/// spoofed SYN's answer) or a RST (the answer to a spoofed mid-stream
/// packet) confirms nothing.
#[inline]
fn tcp_reply_confirms(flags: u8) -> bool {
    flags & tcp_flags::ACK != 0 && flags & (tcp_flags::SYN | tcp_flags::RST) == 0
}

/// Does a datagram flow (UDP, SCTP) in `state`, bound at second `born`,
/// become confirmed by a packet at `now`? As Linux marks a UDP flow assured:
/// answered, and still active two seconds after it began (a single request
/// and its answer, a DNS lookup, stays unconfirmed: losing it costs nothing).
#[inline]
fn datagram_confirms(state: FlowState, born: u32, now: u32) -> bool {
    state == FlowState::Replied && now.saturating_sub(born) >= 2
}

/// Does a reply (TCP `flags`) that moved flow `e` to `state` at `now`
/// confirm it? See [`tcp_reply_confirms`] and [`datagram_confirms`].
#[inline]
fn reply_confirms<A>(e: &Fwd<A>, state: FlowState, flags: u8, now: u32) -> bool {
    if e.proto == Proto::Tcp.ip_number() {
        tcp_reply_confirms(flags)
    } else {
        datagram_confirms(state, e.born, now)
    }
}

/// What kind of flow an unconfirmed entry (or a refused new flow) is, for
/// the eviction and refusal counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum FlowClass {
    /// TCP after a SYN, not answered.
    TcpSyn = 0,
    /// TCP past its SYN (answered by a SYN-ACK only) or picked up
    /// mid-stream (a first packet without SYN), with no confirming reply.
    TcpMidstream = 1,
    /// TCP after a FIN or a RST.
    TcpClosing = 2,
    /// UDP (a first fragment counts as its protocol).
    Udp = 3,
    /// SCTP.
    Sctp = 4,
}

impl FlowClass {
    /// Every class, in index order.
    pub const ALL: [Self; 5] = [
        Self::TcpSyn,
        Self::TcpMidstream,
        Self::TcpClosing,
        Self::Udp,
        Self::Sctp,
    ];

    /// The class of a flow of `proto` in `state`.
    #[must_use]
    pub fn of(proto: u8, state: FlowState) -> Self {
        match state {
            FlowState::TcpSynSent => Self::TcpSyn,
            FlowState::TcpEstablished => Self::TcpMidstream,
            FlowState::TcpClosing | FlowState::TcpReset => Self::TcpClosing,
            _ if proto == Proto::Sctp.ip_number() => Self::Sctp,
            _ => Self::Udp,
        }
    }

    /// Label for metrics.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::TcpSyn => "tcp_syn",
            Self::TcpMidstream => "tcp_midstream",
            Self::TcpClosing => "tcp_closing",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// Counters per [`FlowClass`].
pub type PerClass = [u64; FlowClass::ALL.len()];

/// Address types the tables are generic over.
trait Ip: Copy + Eq + Hash + Default + std::fmt::Debug {
    fn from16(a: &Addr16) -> Self;
    fn to16(&self) -> Addr16;
    /// The address as two words for [`FlowHasher`].
    fn words(&self) -> (u64, u64);
}

impl Ip for [u8; 4] {
    #[inline]
    fn from16(a: &Addr16) -> Self {
        [a[12], a[13], a[14], a[15]]
    }
    #[inline]
    fn to16(&self) -> Addr16 {
        v4_to_16(*self)
    }
    #[inline]
    fn words(&self) -> (u64, u64) {
        (u64::from(u32::from_ne_bytes(*self)), 0)
    }
}

impl Ip for [u8; 16] {
    #[inline]
    fn from16(a: &Addr16) -> Self {
        *a
    }
    #[inline]
    fn to16(&self) -> Addr16 {
        *self
    }
    #[inline]
    fn words(&self) -> (u64, u64) {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&self[..8]);
        hi.copy_from_slice(&self[8..]);
        (u64::from_ne_bytes(lo), u64::from_ne_bytes(hi))
    }
}

/// The in-process hash of the flow tables (not an ABI: it only has to spread
/// keys). Folded 64×64→128-bit multiplies over the key's words, as foldhash
/// and aHash do, with keys drawn from the OS's randomness once per table, so
/// that nobody outside can aim flows at one bucket.
#[derive(Debug, Clone, Copy)]
struct FlowHasher {
    k: [u64; 4],
}

impl FlowHasher {
    fn new(seed: u64) -> Self {
        // splitmix64: four well-spread keys from one seed; the top bit set so
        // that an IPv4 word (< 2^32) never cancels a key to zero.
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1 << 63
        };
        Self {
            k: [next(), next(), next(), next()],
        }
    }

    fn random() -> Self {
        use std::hash::RandomState;
        Self::new(RandomState::new().hash_one(0x636c_7573_7465_7267u64))
    }

    #[inline(always)]
    fn mix(a: u64, b: u64) -> u64 {
        let x = u128::from(a) * u128::from(b);
        (x as u64) ^ ((x >> 64) as u64)
    }

    /// Hash of one address and a tail word.
    #[inline(always)]
    fn one<A: Ip>(&self, a: &A, tail: u64) -> u64 {
        let (a0, a1) = a.words();
        fmix64(Self::mix(a0 ^ self.k[0], a1 ^ tail ^ self.k[1]))
    }

    /// `h` (a [`FlowHasher::one`]) extended by another address and a tail
    /// word: one multiply more, not a second hash.
    #[inline(always)]
    fn extend<A: Ip>(&self, h: u64, a: &A, tail: u64) -> u64 {
        let (a0, a1) = a.words();
        fmix64(Self::mix(h ^ a0 ^ self.k[2], a1 ^ tail ^ self.k[3]))
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit reaches every output bit.
/// A folded multiply alone is nearly linear in an input that varies in a few
/// bits (a port), which would leave hashbrown's bucket bits (the low ones)
/// with few distinct values.
#[inline(always)]
pub(crate) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// How far a reply may push a flow's expiry before the forward entry must be
/// told: a sixteenth of the state's timeout, at least a second.
#[inline]
fn refresh_step(state: FlowState, to: &Timeouts) -> u32 {
    (state.timeout(to) / 16).max(1)
}

/// Ports and protocol packed into one word.
#[inline(always)]
fn tail(p1: u16, p2: u16, proto: u8) -> u64 {
    u64::from(p1) << 24 | u64::from(p2) << 8 | u64::from(proto)
}

/// How a flow's replies come back, as the connection table keeps it for the
/// flow's whole life: a frontend whose return path changes later does not
/// move the flows already bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowNat {
    /// Destination NAT only: replies come from the backend to the client.
    Routed,
    /// Source NAT: the flow leaves the gateway from `addr:port`, and the
    /// backend's replies come back there.
    Snat {
        /// The gateway's address.
        addr: Addr16,
        /// The port allocated for the flow.
        port: u16,
    },
    /// Encapsulated to the backend with the gateway's `outer_src` as the
    /// outer source; replies go from the backend to the client directly.
    Dsr {
        /// The outer source address.
        outer_src: Addr16,
    },
}

/// [`Fwd::mode`] values.
const MODE_ROUTED: u8 = 0;
const MODE_SNAT: u8 = 1;
const MODE_DSR: u8 = 2;

/// SNAT ports probed for one new flow, per SNAT address, before it is given
/// up as [`InsertError::PortsExhausted`] (Linux's NAT tries at most 128 too).
pub const SNAT_PROBES: u32 = 128;

/// What identifies a forward entry: the flow as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FwdKey<A> {
    client: A,
    vip: A,
    cport: u16,
    vport: u16,
    proto: u8,
}

impl<A: Ip> FwdKey<A> {
    fn of(t: &FlowTuple) -> Self {
        Self {
            client: A::from16(&t.src_addr),
            vip: A::from16(&t.dst_addr),
            cport: t.src_port,
            vport: t.dst_port,
            proto: t.proto.ip_number(),
        }
    }
}

/// What identifies a reverse entry: a reply as the backend sends it, from
/// (backend, bport) to (peer, pport): the client for a routed flow, the
/// gateway's SNAT address and port for a source-NATed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RevKey<A> {
    backend: A,
    peer: A,
    bport: u16,
    pport: u16,
    proto: u8,
}

impl<A: Ip> RevKey<A> {
    /// The key a reply `t` (backend → peer) looks up.
    fn of_reply(t: &FlowTuple) -> Self {
        Self {
            backend: A::from16(&t.src_addr),
            peer: A::from16(&t.dst_addr),
            bport: t.src_port,
            pport: t.dst_port,
            proto: t.proto.ip_number(),
        }
    }
}

/// Forward entry: (client, vip, ports, proto) → backend, the flow's NAT and
/// its state. It lives in the shard of (client, cport, proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Fwd<A> {
    client: A,
    vip: A,
    backend: A,
    /// The gateway's own address: the SNAT source, or DSR's outer source.
    gw: A,
    expires: u32,
    frontend: u32,
    epoch: u32,
    /// The second the flow was bound: its age for `inspect flows`, and
    /// whether it is younger than two seconds ([`Fwd::timeout`]).
    born: u32,
    /// The backend's index in the backend array of the table of `epoch`
    /// (the workers' per-backend counters).
    backend_index: u32,
    cport: u16,
    vport: u16,
    bport: u16,
    /// The SNAT port (0 unless source-NATed).
    gport: u16,
    proto: u8,
    state: u8,
    /// `MODE_*`.
    mode: u8,
    /// Its backend answered (see [`FlowState`]): never evicted, only expired.
    confirmed: bool,
}

impl<A: Ip> Fwd<A> {
    fn key(&self) -> FwdKey<A> {
        FwdKey {
            client: self.client,
            vip: self.vip,
            cport: self.cport,
            vport: self.vport,
            proto: self.proto,
        }
    }

    /// The key of the flow's reverse entry; DSR flows have none.
    fn rev_key(&self) -> Option<RevKey<A>> {
        let (peer, pport) = match self.mode {
            MODE_ROUTED => (self.client, self.cport),
            MODE_SNAT => (self.gw, self.gport),
            _ => return None,
        };
        Some(RevKey {
            backend: self.backend,
            peer,
            bport: self.bport,
            pport,
            proto: self.proto,
        })
    }

    /// The idle timeout of this flow in `state`. As in Linux's conntrack, a
    /// datagram flow takes the long "stream" timeout only once it is
    /// confirmed (answered *and* two seconds old): a single request and
    /// reply (DNS) keeps the short one, and frees its SNAT port as soon.
    fn timeout(&self, state: FlowState, to: &Timeouts) -> u32 {
        timeout_of(state, self.confirmed, to)
    }

    fn class(&self) -> FlowClass {
        FlowClass::of(self.proto, FlowState::from_u8(self.state))
    }

    /// The flow as `inspect flows` shows it at `now`.
    fn info(&self, now: u32, to: &Timeouts) -> FlowInfo {
        let state = FlowState::from_u8(self.state);
        // The last packet restarted the idle timer: `expires` is then plus
        // the timeout of the state it left (the short one for a flow not
        // yet confirmed).
        let last = self
            .expires
            .saturating_sub(timeout_of(state, self.confirmed, to))
            .max(self.born);
        FlowInfo {
            client: self.client.to16(),
            client_port: self.cport,
            frontend: self.vip.to16(),
            frontend_port: self.vport,
            backend: self.backend.to16(),
            backend_port: self.bport,
            proto: Proto::from_ip_number(self.proto).unwrap_or(Proto::Tcp),
            nat: self.nat(),
            state,
            confirmed: self.confirmed,
            age_s: now.saturating_sub(self.born),
            idle_s: now.saturating_sub(last),
        }
    }

    fn nat(&self) -> FlowNat {
        match self.mode {
            MODE_SNAT => FlowNat::Snat {
                addr: self.gw.to16(),
                port: self.gport,
            },
            MODE_DSR => FlowNat::Dsr {
                outer_src: self.gw.to16(),
            },
            _ => FlowNat::Routed,
        }
    }

    fn rev(&self, key: &RevKey<A>) -> Rev<A> {
        Rev {
            backend: key.backend,
            peer: key.peer,
            client: self.client,
            vip: self.vip,
            expires: self.expires,
            bport: key.bport,
            pport: key.pport,
            cport: self.cport,
            vport: self.vport,
            proto: self.proto,
            state: self.state,
            confirmed: self.confirmed,
        }
    }
}

/// Reverse entry: a reply's (backend, peer, ports, proto) → the frontend to
/// restore as its source and the client to restore as its destination, with
/// a copy of the flow's state and expiry. It lives in the shard of (peer,
/// pport, proto): for a routed flow that is its forward entry's shard, for a
/// source-NATed one usually another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Rev<A> {
    backend: A,
    peer: A,
    client: A,
    vip: A,
    /// Copy of the forward entry's expiry as last synchronised: replies that
    /// change nothing read only this entry (see `lookup_reply`).
    expires: u32,
    bport: u16,
    pport: u16,
    cport: u16,
    vport: u16,
    proto: u8,
    /// Copy of the forward entry's state, kept equal on every transition.
    state: u8,
    /// Set before the forward entry's (source NAT: in this shard first).
    confirmed: bool,
}

impl<A: Ip> Rev<A> {
    fn key(&self) -> RevKey<A> {
        RevKey {
            backend: self.backend,
            peer: self.peer,
            bport: self.bport,
            pport: self.pport,
            proto: self.proto,
        }
    }

    fn fwd_key(&self) -> FwdKey<A> {
        FwdKey {
            client: self.client,
            vip: self.vip,
            cport: self.cport,
            vport: self.vport,
            proto: self.proto,
        }
    }

    fn hit(&self, state: FlowState) -> ReplyHit {
        ReplyHit {
            vip: self.vip.to16(),
            vport: self.vport,
            client: self.client.to16(),
            client_port: self.cport,
            state,
        }
    }
}

fn is_fwd<A: Ip>(k: &FwdKey<A>) -> impl Fn(&Fwd<A>) -> bool + '_ {
    move |x| {
        x.client == k.client
            && x.vip == k.vip
            && x.cport == k.cport
            && x.vport == k.vport
            && x.proto == k.proto
    }
}

fn is_rev<A: Ip>(k: &RevKey<A>) -> impl Fn(&Rev<A>) -> bool + '_ {
    move |r| {
        r.backend == k.backend
            && r.peer == k.peer
            && r.bport == k.bport
            && r.pport == k.pport
            && r.proto == k.proto
    }
}

/// Work on another shard that an operation holding one shard's lock leaves
/// for after it released it, so that no thread ever holds two shard locks.
#[derive(Debug, Clone, Copy)]
enum Later<A> {
    /// Remove the reverse entry `.0` if it still belongs to the flow `.1`.
    RemoveRev(RevKey<A>, FwdKey<A>),
    /// Remove the forward entry `.0` if its reverse entry is still `.1`
    /// (that reverse entry was evicted).
    RemoveFwd(FwdKey<A>, RevKey<A>),
    /// Copy a forward entry's state, expiry and confirmation into its
    /// reverse entry `.0`.
    SyncRev(RevKey<A>, u8, u32, bool),
    /// Mark the forward entry `.0` confirmed if its reverse entry is `.1`
    /// and the [`Later::SyncRev`] just before found that reverse entry
    /// (and marked it first).
    ConfirmFwd(FwdKey<A>, RevKey<A>),
}

/// Room for [`Later`] work: bulk removals (sweeps, eviction) stop taking
/// flows whose other entry is in another shard once it is full, and carry on
/// after it is done.
const LATER_CAP: usize = 32;

/// Up to `N` [`Later`] operations, on the stack. A single lookup leaves at
/// most one (so its buffer costs nothing to set up); sweeps and eviction
/// take [`LATER_CAP`].
#[derive(Debug)]
struct LaterBuf<A, const N: usize> {
    ops: [Option<Later<A>>; N],
    n: usize,
}

impl<A: Ip, const N: usize> LaterBuf<A, N> {
    fn new() -> Self {
        Self {
            ops: [None; N],
            n: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.n == N
    }

    /// Callers check [`LaterBuf::is_full`] first where they may meet more
    /// than [`LATER_CAP`] entries; a single operation never does.
    fn push(&mut self, op: Later<A>) {
        if let Some(slot) = self.ops.get_mut(self.n) {
            *slot = Some(op);
            self.n += 1;
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct ShardStats {
    inserts: u64,
    expired: u64,
    evicted: PerClass,
    refused: PerClass,
    clashes: u64,
}

#[derive(Debug)]
struct Shard<A> {
    fwd: HashTable<Fwd<A>>,
    rev: HashTable<Rev<A>>,
    cap: usize,
    stats: ShardStats,
    /// `now + 1` of the last [`Tracker::make_room`] of the forward (`[0]`)
    /// or reverse (`[1]`) table that found nothing to remove (0: none).
    /// Within that second, while no unconfirmed entry was placed since, a
    /// full table refuses at once instead of walking its entries again: a
    /// flood against a shard full of confirmed flows costs no more per
    /// packet than a lookup.
    barren: [u32; 2],
}

/// Where a shard's tables lie in memory, for prefetching without the lock:
/// hashbrown keeps the control bytes at `ctrl` and bucket `i` just below it,
/// at `ctrl - (i + 1) * size_of::<T>()`. Only a hint: a stale value costs a
/// wasted prefetch, never a wrong lookup (see `prefetch_layout_matches_hashbrown`).
#[derive(Debug, Default)]
struct Geometry {
    fwd_ctrl: AtomicUsize,
    fwd_mask: AtomicUsize,
    rev_ctrl: AtomicUsize,
    rev_mask: AtomicUsize,
}

/// Control-bytes address of a table, from one of its entries.
pub(crate) fn ctrl_of<T>(entry: &T, index: usize) -> usize {
    entry as *const T as usize + (index + 1) * std::mem::size_of::<T>()
}

#[inline]
pub(crate) fn prefetch_slot<T>(ctrl: usize, mask: usize, hash: u64) {
    if ctrl == 0 {
        return;
    }
    let i = hash as usize & mask;
    prefetch(ctrl + i);
    // The entry's first and last bytes: an entry that straddles two cache
    // lines (a 48-byte one does every other slot) is loaded whole.
    let size = std::mem::size_of::<T>();
    let start = ctrl.wrapping_sub((i + 1) * size);
    prefetch(start);
    let last = start.wrapping_add(size - 1);
    if (start ^ last) >> 6 != 0 {
        prefetch(last);
    }
}

/// One cache line per shard lock, so that two cores never share one.
#[derive(Debug)]
#[repr(align(64))]
struct Padded<T>(T);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked while holding a shard left its entries
    // consistent (no operation panics between two table writes), so the data is
    // usable: keep forwarding rather than poisoning every other worker.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shards one owner holds: global shard `i` is sub-shard `i / parts`
/// of partition `i % parts`.
#[derive(Debug)]
struct Part<A> {
    index: usize,
    shards: Box<[Shard<A>]>,
}

/// A partition's lock, on its own cache lines.
type PartLock<A> = Arc<PlMutex<Padded<Part<A>>>>;

/// A partition held by its owner across calls (a whole batch).
type PartGuard<A> = ArcMutexGuard<RawMutex, Padded<Part<A>>>;

/// What [`Tracker`]'s operations may find already locked: the caller's
/// own partition ([`Hold`]), or nothing.
type Held<A> = Option<PartGuard<A>>;

/// A shard, from the held partition or locked for the moment.
enum ShardRef<'a, A> {
    Held(&'a mut Shard<A>),
    Locked(MappedMutexGuard<'a, RawMutex, Shard<A>>),
}

impl<A> std::ops::Deref for ShardRef<'_, A> {
    type Target = Shard<A>;
    fn deref(&self) -> &Shard<A> {
        match self {
            Self::Held(s) => s,
            Self::Locked(g) => g,
        }
    }
}

impl<A> std::ops::DerefMut for ShardRef<'_, A> {
    fn deref_mut(&mut self) -> &mut Shard<A> {
        match self {
            Self::Held(s) => s,
            Self::Locked(g) => g,
        }
    }
}

#[derive(Debug)]
struct Tracker<A> {
    parts: Box<[PartLock<A>]>,
    /// Global shards.
    nshards: usize,
    geometry: Box<[Geometry]>,
    mask: usize,
    hasher: FlowHasher,
}

/// A packet's one hash for the connection table
/// ([`Conntrack::hash_original`], [`Conntrack::hash_reply`]): its shard (and
/// so its owner, [`Conntrack::owner_of`]) and its bucket, computed once and
/// reused for the prefetch and the lookup. Valid for the table and family
/// it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowHash {
    shard: u32,
    bucket: u64,
}

/// A hit in the forward direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowHit {
    /// The backend the flow is bound to.
    pub backend: Addr16,
    /// Its port.
    pub backend_port: u16,
    /// Frontend index in the table of `epoch`.
    pub frontend: u32,
    /// The table epoch (low 32 bits of its generation) the binding was checked in.
    pub epoch: u32,
    /// The backend's index in the backend array of the table of `epoch`.
    pub backend_index: u32,
    /// State after this packet.
    pub state: FlowState,
    /// How the flow's replies come back.
    pub nat: FlowNat,
}

/// A hit in the reply direction: the frontend to restore as the source, and
/// the client to restore as the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHit {
    /// The frontend (virtual) address.
    pub vip: Addr16,
    /// The frontend port.
    pub vport: u16,
    /// The client (the reply's destination already, unless source-NATed).
    pub client: Addr16,
    /// The client's port.
    pub client_port: u16,
    /// State after this packet.
    pub state: FlowState,
}

/// One tracked flow, as [`Conntrack::snapshot_flows`] copies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    /// The client's address.
    pub client: Addr16,
    /// The client's port.
    pub client_port: u16,
    /// The frontend (virtual) address the client sent to.
    pub frontend: Addr16,
    /// The frontend port.
    pub frontend_port: u16,
    /// The backend the flow is bound to.
    pub backend: Addr16,
    /// Its port.
    pub backend_port: u16,
    /// The protocol.
    pub proto: Proto,
    /// How the flow's replies come back (the SNAT address and port, if any).
    pub nat: FlowNat,
    /// Its state.
    pub state: FlowState,
    /// Its backend answered: it is never evicted, only expired.
    pub confirmed: bool,
    /// Seconds since it was bound.
    pub age_s: u32,
    /// Seconds since its last packet that restarted the idle timer.
    pub idle_s: u32,
}

/// Why a flow could not be inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The flow's shard is full of confirmed flows (nothing could be evicted).
    #[error("connection table full")]
    Full,
    /// Every SNAT port probed is in use towards this backend.
    #[error("no free source-NAT port towards this backend")]
    PortsExhausted,
    /// The flow's reply tuple is a live flow's (a routed flow from the same
    /// client port to another frontend with the same backend): the new
    /// flow is refused, the live one keeps its replies.
    #[error("the flow's reply tuple belongs to a live flow")]
    Clash,
}

/// What a new binding says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Backend address.
    pub backend: Addr16,
    /// Backend port.
    pub backend_port: u16,
    /// Frontend index in the current table.
    pub frontend: u32,
    /// Current table epoch.
    pub epoch: u32,
    /// The backend's index in the current table's backend array.
    pub backend_index: u32,
    /// How replies come back. For [`FlowNat::Snat`] the address and port
    /// are taken as they are ([`Conntrack::insert_snat`] allocates them).
    pub nat: FlowNat,
}

/// The outcome of one SNAT port probe.
enum Reserve {
    Done,
    Taken,
    Full,
}

impl<A: Ip> Tracker<A> {
    fn new(capacity: usize, shards: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let n = shards.max(parts).max(1).next_power_of_two();
        let per = capacity.div_ceil(n).max(8);
        let shard = || {
            let fwd = HashTable::with_capacity(per);
            let rev = HashTable::with_capacity(per);
            let cap = fwd.capacity().min(rev.capacity());
            Shard {
                fwd,
                rev,
                cap,
                stats: ShardStats::default(),
                barren: [0; 2],
            }
        };
        let parts: Box<[PartLock<A>]> = (0..parts)
            .map(|index| {
                // Global shards index, index + parts, index + 2·parts, …
                let count = (n - index).div_ceil(parts);
                Arc::new(PlMutex::new(Padded(Part {
                    index,
                    shards: (0..count).map(|_| shard()).collect(),
                })))
            })
            .collect();
        Self {
            parts,
            nshards: n,
            geometry: (0..n).map(|_| Geometry::default()).collect(),
            mask: n - 1,
            hasher: FlowHasher::random(),
        }
    }

    /// The partition of global shard `i`.
    #[inline]
    fn part_of(&self, i: usize) -> usize {
        i % self.parts.len()
    }

    /// Global shard `i`: from the held partition when it is there, else
    /// locked for as long as the returned reference lives. A worker that
    /// owns its flows only ever asks for its own partition's shards (every
    /// entry of a flow lies in the partition of its client, or of its
    /// source-NAT port, which the owner picks in its partition). Should it
    /// ask for another's (a flow bound through the unheld API with a port
    /// of its own choosing), it lets its own partition go first: nobody
    /// waits for a lock while holding one, so no two workers deadlock.
    #[inline]
    fn lock<'a>(&'a self, held: &'a mut Held<A>, i: usize) -> ShardRef<'a, A> {
        let (p, sub) = (self.part_of(i), i / self.parts.len());
        if held.as_ref().is_some_and(|g| g.0.index != p) {
            *held = None;
        }
        match held {
            Some(g) => ShardRef::Held(&mut g.0.shards[sub]),
            None => ShardRef::Locked(PlMutexGuard::map(self.parts[p].lock(), |g| {
                &mut g.0.shards[sub]
            })),
        }
    }

    /// Locks partition `p` for as long as the guard is kept.
    fn hold(&self, p: usize) -> PartGuard<A> {
        self.parts[p % self.parts.len()].lock_arc()
    }

    #[inline]
    fn shard_index(&self, addr: &A, port: u16, proto: u8) -> usize {
        let h = self.hasher.one(addr, tail(port, 0, proto));
        // Bits away from hashbrown's (low bits pick buckets, top 7 tag them).
        (h >> 32) as usize & self.mask
    }

    /// The shard of a forward entry: its client's (address, port, protocol).
    #[inline]
    fn fwd_shard(&self, k: &FwdKey<A>) -> usize {
        self.shard_index(&k.client, k.cport, k.proto)
    }

    /// The shard of a reverse entry: its reply's destination (address, port,
    /// protocol), which for a routed flow is the client's.
    #[inline]
    fn rev_shard(&self, k: &RevKey<A>) -> usize {
        self.shard_index(&k.peer, k.pport, k.proto)
    }

    /// The one hash of a key whose shard is that of `end` (the client's
    /// end of the flow): the shard from its first stage, the bucket from
    /// the same chain extended by the `other` end.
    #[inline]
    fn key_hash(&self, end: &A, end_port: u16, proto: u8, other: &A, other_port: u16) -> FlowHash {
        let h = self.hasher.one(end, tail(end_port, 0, proto));
        FlowHash {
            // Bits away from hashbrown's (low bits pick buckets, top 7 tag them).
            shard: ((h >> 32) as usize & self.mask) as u32,
            bucket: self.hasher.extend(h, other, u64::from(other_port)),
        }
    }

    #[inline]
    fn fwd_key_hash(&self, k: &FwdKey<A>) -> FlowHash {
        self.key_hash(&k.client, k.cport, k.proto, &k.vip, k.vport)
    }

    #[inline]
    fn rev_key_hash(&self, k: &RevKey<A>) -> FlowHash {
        self.key_hash(&k.peer, k.pport, k.proto, &k.backend, k.bport)
    }

    #[inline]
    fn fwd_hash(&self, k: &FwdKey<A>) -> u64 {
        self.fwd_key_hash(k).bucket
    }

    #[inline]
    fn rev_hash(&self, k: &RevKey<A>) -> u64 {
        self.rev_key_hash(k).bucket
    }

    /// Starts loading the lines a forward lookup with hash `h` will touch.
    #[inline]
    fn prefetch_original(&self, h: FlowHash) {
        let g = &self.geometry[h.shard as usize];
        prefetch_slot::<Fwd<A>>(
            g.fwd_ctrl.load(Ordering::Relaxed),
            g.fwd_mask.load(Ordering::Relaxed),
            h.bucket,
        );
    }

    /// Starts loading the lines a reply lookup with hash `h` will touch.
    #[inline]
    fn prefetch_reply(&self, h: FlowHash) {
        let g = &self.geometry[h.shard as usize];
        prefetch_slot::<Rev<A>>(
            g.rev_ctrl.load(Ordering::Relaxed),
            g.rev_mask.load(Ordering::Relaxed),
            h.bucket,
        );
    }

    /// Brings a table back to its planned size when deleted-slot markers have
    /// used up its room: hashbrown would otherwise grow it (allocate, double).
    /// Rare: only after many removals in a nearly full shard.
    fn compact<T, H: Fn(&T) -> u64>(table: &mut HashTable<T>, cap: usize, hash: H) {
        if table.len() < table.capacity() || table.len() >= cap {
            return;
        }
        let mut fresh = HashTable::with_capacity(cap);
        for e in table.drain() {
            let h = hash(&e);
            fresh.insert_unique(h, e, &hash);
        }
        *table = fresh;
    }

    /// Inserts a forward entry into shard `i`'s table (room was made) and
    /// keeps the prefetch geometry current.
    fn place_fwd(&self, i: usize, fwd: &mut HashTable<Fwd<A>>, cap: usize, e: Fwd<A>) {
        let hasher = |x: &Fwd<A>| self.fwd_hash(&x.key());
        Self::compact(fwd, cap, hasher);
        let placed = fwd.insert_unique(self.fwd_hash(&e.key()), e, hasher);
        let ctrl = ctrl_of(placed.get(), placed.bucket_index());
        let geo = &self.geometry[i];
        if geo.fwd_ctrl.load(Ordering::Relaxed) != ctrl {
            geo.fwd_mask.store(fwd.num_buckets() - 1, Ordering::Relaxed);
            geo.fwd_ctrl.store(ctrl, Ordering::Relaxed);
        }
    }

    /// Inserts a reverse entry into shard `i`'s table (room was made).
    fn place_rev(&self, i: usize, rev: &mut HashTable<Rev<A>>, cap: usize, r: Rev<A>) {
        let hasher = |x: &Rev<A>| self.rev_hash(&x.key());
        Self::compact(rev, cap, hasher);
        let placed = rev.insert_unique(self.rev_hash(&r.key()), r, hasher);
        let ctrl = ctrl_of(placed.get(), placed.bucket_index());
        let geo = &self.geometry[i];
        if geo.rev_ctrl.load(Ordering::Relaxed) != ctrl {
            geo.rev_mask.store(rev.num_buckets() - 1, Ordering::Relaxed);
            geo.rev_ctrl.store(ctrl, Ordering::Relaxed);
        }
    }

    /// Is `e`'s reverse entry in another shard than `i`?
    fn rev_elsewhere(&self, i: usize, e: &Fwd<A>) -> bool {
        e.rev_key().is_some_and(|k| self.rev_shard(&k) != i)
    }

    /// Removes a removed forward entry's reverse entry: at once when it is in
    /// this shard (`i`, whose reverse table is `rev`), else later.
    fn unlink_rev<const N: usize>(
        &self,
        i: usize,
        rev: &mut HashTable<Rev<A>>,
        e: &Fwd<A>,
        later: &mut LaterBuf<A, N>,
    ) {
        let Some(k) = e.rev_key() else { return };
        if self.rev_shard(&k) == i {
            let of = e.key();
            if let Ok(r) = rev.find_entry(self.rev_hash(&k), |r| is_rev(&k)(r) && r.fwd_key() == of)
            {
                r.remove();
            }
        } else {
            later.push(Later::RemoveRev(k, e.key()));
        }
    }

    /// Copies a forward entry's state, expiry and confirmation into its
    /// reverse entry: at once when it is in this shard, else later (and a
    /// forward entry that is to become confirmed is marked only after its
    /// reverse entry was: `confirm`).
    fn sync_rev<const N: usize>(
        &self,
        i: usize,
        rev: &mut HashTable<Rev<A>>,
        e: &Fwd<A>,
        confirm: bool,
        later: &mut LaterBuf<A, N>,
    ) {
        let Some(k) = e.rev_key() else { return };
        if self.rev_shard(&k) == i {
            if let Some(r) = rev.find_mut(self.rev_hash(&k), is_rev(&k)) {
                r.state = e.state;
                r.expires = e.expires;
                r.confirmed |= e.confirmed || confirm;
            }
        } else {
            later.push(Later::SyncRev(
                k,
                e.state,
                e.expires,
                e.confirmed || confirm,
            ));
            if confirm && !e.confirmed {
                later.push(Later::ConfirmFwd(e.key(), k));
            }
        }
    }

    /// Does the work left for after a lock, one shard lock at a time.
    fn run_later<const N: usize>(&self, held: &mut Held<A>, later: &LaterBuf<A, N>) {
        // Did the last SyncRev find its reverse entry?
        let mut synced = false;
        for op in later.ops.iter().take(later.n).flatten() {
            match *op {
                Later::RemoveRev(k, of) => {
                    let mut s = self.lock(held, self.rev_shard(&k));
                    if let Ok(r) = s
                        .rev
                        .find_entry(self.rev_hash(&k), |r| is_rev(&k)(r) && r.fwd_key() == of)
                    {
                        r.remove();
                    }
                }
                Later::RemoveFwd(k, rk) => {
                    let mut s = self.lock(held, self.fwd_shard(&k));
                    if let Ok(e) = s.fwd.find_entry(self.fwd_hash(&k), |e| {
                        is_fwd(&k)(e) && e.rev_key() == Some(rk)
                    }) {
                        e.remove();
                    }
                }
                Later::SyncRev(k, state, expires, confirmed) => {
                    let mut s = self.lock(held, self.rev_shard(&k));
                    synced = false;
                    if let Some(r) = s.rev.find_mut(self.rev_hash(&k), is_rev(&k)) {
                        // Copies may arrive out of order from two workers:
                        // a state never goes back (TCP's states and the
                        // datagram ones each only move up), nor does a
                        // confirmation.
                        r.state = r.state.max(state);
                        r.expires = expires;
                        r.confirmed |= confirmed;
                        synced = true;
                    }
                }
                Later::ConfirmFwd(k, rk) => {
                    if !synced {
                        continue;
                    }
                    let mut s = self.lock(held, self.fwd_shard(&k));
                    if let Some(e) = s.fwd.find_mut(self.fwd_hash(&k), |e| {
                        is_fwd(&k)(e) && e.rev_key() == Some(rk)
                    }) {
                        e.confirmed = true;
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // reason: the hot path passes what it has, not structs it would have to build
    fn lookup_original(
        &self,
        held: &mut Held<A>,
        kh: Option<FlowHash>,
        now: u32,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
        to: &Timeouts,
    ) -> Option<FlowHit> {
        let k = FwdKey::of(t);
        let kh = kh.unwrap_or_else(|| self.fwd_key_hash(&k));
        let i = kh.shard as usize;
        let mut later = LaterBuf::<A, 2>::new();
        let hit = {
            let mut s = self.lock(held, i);
            let Shard {
                fwd, rev, stats, ..
            } = &mut *s;
            let Ok(mut entry) = fwd.find_entry(kh.bucket, is_fwd(&k)) else {
                return None;
            };
            let e = entry.get_mut();
            if e.expires <= now {
                let (old, _) = entry.remove();
                self.unlink_rev(i, rev, &old, &mut later);
                stats.expired += 1;
                None
            } else {
                let mut state = FlowState::from_u8(e.state);
                if touch {
                    let before = state;
                    let dsr = e.mode == MODE_DSR;
                    state = if dsr {
                        state.advance_one_way(flags)
                    } else {
                        state.advance(false, flags)
                    };
                    e.state = state as u8;
                    // Confirmed by the client's side: a DSR flow whose
                    // handshake the gateway saw (its SYN, now the client's
                    // ACK of the backend's SYN-ACK), or an answered datagram
                    // flow still active two seconds in. A confirmed flow's
                    // packet tests one flag here, nothing more.
                    let confirm = !e.confirmed
                        && if dsr {
                            before == FlowState::TcpSynSent && state == FlowState::TcpEstablished
                        } else {
                            datagram_confirms(state, e.born, now)
                        };
                    if confirm && !self.rev_elsewhere(i, e) {
                        e.confirmed = true;
                    }
                    e.expires = now.saturating_add(timeout_of(state, e.confirmed || confirm, to));
                    if state != before || confirm {
                        // Transitions are rare (SYN answered, FIN, RST,
                        // confirmation): keep the reverse entry's copy
                        // equal, so replies see it.
                        let f = *e;
                        self.sync_rev(i, rev, &f, confirm, &mut later);
                    }
                }
                Some(FlowHit {
                    backend: e.backend.to16(),
                    backend_port: e.bport,
                    frontend: e.frontend,
                    epoch: e.epoch,
                    backend_index: e.backend_index,
                    state,
                    nat: e.nat(),
                })
            }
        };
        self.run_later(held, &later);
        hit
    }

    #[allow(clippy::too_many_arguments)] // reason: the hot path passes what it has, not structs it would have to build
    fn lookup_reply(
        &self,
        held: &mut Held<A>,
        kh: Option<FlowHash>,
        now: u32,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
        to: &Timeouts,
    ) -> Option<ReplyHit> {
        // t: backend → peer.
        let rk = RevKey::of_reply(t);
        let kh = kh.unwrap_or_else(|| self.rev_key_hash(&rk));
        let j = kh.shard as usize;
        let copy = {
            let mut s = self.lock(held, j);
            let Shard {
                fwd, rev, stats, ..
            } = &mut *s;
            let Ok(mut rentry) = rev.find_entry(kh.bucket, is_rev(&rk)) else {
                return None;
            };
            let r = rentry.get_mut();
            let cur = FlowState::from_u8(r.state);
            let next = if touch { cur.advance(true, flags) } else { cur };
            // Fast path: nothing changes state and the forward entry's expiry
            // is recent enough; the reply reads this entry only. While replies
            // flow, the forward expiry is pushed at least every `refresh_step`,
            // so a reply-only flow never expires early.
            let wanted = now.saturating_add(next.timeout(to));
            if r.expires > now
                && next == cur
                && r.confirmed
                && (!touch || wanted.saturating_sub(r.expires) < refresh_step(next, to))
            {
                return Some(r.hit(cur));
            }
            // Slow path: the forward entry decides (it may have been refreshed
            // by requests, or expired), and takes this reply's transition;
            // so does every reply of a flow not yet confirmed, which this
            // reply may confirm.
            let fk = r.fwd_key();
            if self.fwd_shard(&fk) != j {
                *r
            } else {
                let Ok(mut entry) = fwd.find_entry(self.fwd_hash(&fk), |e| {
                    is_fwd(&fk)(e) && e.rev_key() == Some(rk)
                }) else {
                    // Orphan reverse entry (cannot happen: both are removed together).
                    rentry.remove();
                    return None;
                };
                let e = entry.get_mut();
                if e.expires <= now {
                    entry.remove();
                    rentry.remove();
                    stats.expired += 1;
                    return None;
                }
                let mut state = FlowState::from_u8(e.state);
                if touch {
                    state = state.advance(true, flags);
                    e.state = state as u8;
                    if !e.confirmed && reply_confirms(e, state, flags, now) {
                        e.confirmed = true;
                    }
                    e.expires = now.saturating_add(e.timeout(state, to));
                }
                r.state = e.state;
                r.expires = e.expires;
                r.confirmed = e.confirmed;
                return Some(r.hit(state));
            }
        };
        // The forward entry is in another shard (source NAT): decide there,
        // then bring the copy up to date, one lock at a time.
        let fk = copy.fwd_key();
        let decided = {
            let mut s = self.lock(held, self.fwd_shard(&fk));
            let Shard { fwd, stats, .. } = &mut *s;
            match fwd.find_entry(self.fwd_hash(&fk), |e| {
                is_fwd(&fk)(e) && e.rev_key() == Some(rk)
            }) {
                Err(_) => None,
                Ok(entry) if entry.get().expires <= now => {
                    entry.remove();
                    stats.expired += 1;
                    None
                }
                Ok(mut entry) => {
                    let e = entry.get_mut();
                    let mut state = FlowState::from_u8(e.state);
                    let mut confirm = false;
                    if touch {
                        state = state.advance(true, flags);
                        e.state = state as u8;
                        // Marked here only once the reverse entry is
                        // (`Later::ConfirmFwd`).
                        confirm = !e.confirmed && reply_confirms(e, state, flags, now);
                        e.expires =
                            now.saturating_add(timeout_of(state, e.confirmed || confirm, to));
                    }
                    Some((state, e.expires, e.confirmed, confirm))
                }
            }
        };
        let mut later = LaterBuf::<A, 2>::new();
        let hit = match decided {
            None => {
                later.push(Later::RemoveRev(rk, fk));
                None
            }
            Some((state, expires, confirmed, confirm)) => {
                later.push(Later::SyncRev(
                    rk,
                    state as u8,
                    expires,
                    confirmed || confirm,
                ));
                if confirm {
                    later.push(Later::ConfirmFwd(fk, rk));
                }
                Some(copy.hit(state))
            }
        };
        self.run_later(held, &later);
        hit
    }

    /// Binds `t` (client → vip) to a backend, replacing any previous binding.
    /// A routed flow's reverse entry is written here too; a source-NATed
    /// one's must have been reserved ([`Tracker::reserve`]).
    fn insert(
        &self,
        held: &mut Held<A>,
        now: u32,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
        to: &Timeouts,
    ) -> Result<(), InsertError> {
        let (mode, gw, gport) = match b.nat {
            FlowNat::Routed => (MODE_ROUTED, A::default(), 0),
            FlowNat::Snat { addr, port } => (MODE_SNAT, A::from16(&addr), port),
            FlowNat::Dsr { outer_src } => (MODE_DSR, A::from16(&outer_src), 0),
        };
        let k = FwdKey::<A>::of(t);
        let e = Fwd {
            client: k.client,
            vip: k.vip,
            backend: A::from16(&b.backend),
            gw,
            expires: now.saturating_add(timeout_of(state, false, to)),
            frontend: b.frontend,
            epoch: b.epoch,
            born: now,
            backend_index: b.backend_index,
            cport: k.cport,
            vport: k.vport,
            bport: b.backend_port,
            gport,
            proto: k.proto,
            state: state as u8,
            mode,
            confirmed: false,
        };
        let i = self.fwd_shard(&k);
        // The reverse entry written with the forward one (same shard).
        let local_rev = e
            .rev_key()
            .filter(|rk| self.rev_shard(rk) == i && mode == MODE_ROUTED);
        let mut later = LaterBuf::<A, 2>::new();
        // Room for eviction's work, set up only when a shard is full.
        let mut bulk = None;
        let result = 'locked: {
            let mut s = self.lock(held, i);
            let sh = &mut *s;
            if let Some(rk) = local_rev {
                // The reply tuple is another flow's: refused while that flow
                // lives (its replies must keep their frontend), taken over
                // (with what is left of that flow) once it is dead.
                if let Some(r) = sh.rev.find(self.rev_hash(&rk), is_rev(&rk)) {
                    let fk = r.fwd_key();
                    if fk != k {
                        let (rs, rexp) = (r.state, r.expires);
                        let live = |st: u8, exp: u32| {
                            exp > now && FlowState::from_u8(st) != FlowState::TcpReset
                        };
                        if self.fwd_shard(&fk) != i {
                            if live(rs, rexp) {
                                sh.stats.clashes += 1;
                                break 'locked Err(InsertError::Clash);
                            }
                            later.push(Later::RemoveFwd(fk, rk));
                        } else if let Ok(other) = sh.fwd.find_entry(self.fwd_hash(&fk), |e| {
                            is_fwd(&fk)(e) && e.rev_key() == Some(rk)
                        }) {
                            if live(other.get().state, other.get().expires) {
                                sh.stats.clashes += 1;
                                break 'locked Err(InsertError::Clash);
                            }
                            other.remove();
                        }
                    }
                }
            }
            if let Ok(old) = sh.fwd.find_entry(self.fwd_hash(&k), is_fwd(&k)) {
                let (old, _) = old.remove();
                // The same reverse key is the new flow's: rewritten below, or
                // (source NAT) already reserved.
                if old.rev_key() != e.rev_key() {
                    self.unlink_rev(i, &mut sh.rev, &old, &mut later);
                }
            }
            let full = |sh: &Shard<A>| {
                sh.fwd.len() >= sh.cap || (local_rev.is_some() && sh.rev.len() >= sh.cap)
            };
            if full(sh) {
                self.make_room(i, sh, now, false, bulk.insert(LaterBuf::new()));
            }
            if full(sh) {
                sh.stats.refused[FlowClass::of(k.proto, state) as usize] += 1;
                Err(InsertError::Full)
            } else {
                if let Some(rk) = local_rev {
                    // What is left of a dead flow's reverse entry for the
                    // same reply tuple (checked above) would shadow this one:
                    // drop it first.
                    if let Ok(stale) = sh.rev.find_entry(self.rev_hash(&rk), is_rev(&rk)) {
                        stale.remove();
                    }
                    self.place_rev(i, &mut sh.rev, sh.cap, e.rev(&rk));
                }
                self.place_fwd(i, &mut sh.fwd, sh.cap, e);
                sh.stats.inserts += 1;
                Ok(())
            }
        };
        self.run_later(held, &later);
        if let Some(b) = &bulk {
            self.run_later(held, b);
        }
        result
    }

    /// Reserves reverse key `rk` for the flow `t` will be: `Taken` when a
    /// live flow already uses it (a live tuple is never reused), `Full` when
    /// its shard has no room even after eviction.
    fn reserve(
        &self,
        held: &mut Held<A>,
        now: u32,
        rk: &RevKey<A>,
        t: &FlowTuple,
        state: FlowState,
        to: &Timeouts,
    ) -> Reserve {
        let j = self.rev_shard(rk);
        let k = FwdKey::<A>::of(t);
        let mut bulk = None;
        let r = {
            let mut s = self.lock(held, j);
            let sh = &mut *s;
            if sh.rev.find(self.rev_hash(rk), is_rev(rk)).is_some() {
                Reserve::Taken
            } else {
                if sh.rev.len() >= sh.cap {
                    self.make_room(j, sh, now, true, bulk.insert(LaterBuf::new()));
                }
                if sh.rev.len() >= sh.cap {
                    Reserve::Full
                } else {
                    let r = Rev {
                        backend: rk.backend,
                        peer: rk.peer,
                        client: k.client,
                        vip: k.vip,
                        expires: now.saturating_add(timeout_of(state, false, to)),
                        bport: rk.bport,
                        pport: rk.pport,
                        cport: k.cport,
                        vport: k.vport,
                        proto: rk.proto,
                        state: state as u8,
                        confirmed: false,
                    };
                    self.place_rev(j, &mut sh.rev, sh.cap, r);
                    Reserve::Done
                }
            }
        };
        if let Some(b) = &bulk {
            self.run_later(held, b);
        }
        r
    }

    /// Source NAT: finds a port for `t`'s binding to `b`'s backend on one of
    /// `addrs` within `ports`, reserves it and inserts the flow. Ports are
    /// probed from a point that the flow's keyed hash picks (nobody outside
    /// can predict it), at most [`SNAT_PROBES`] per address.
    #[allow(clippy::too_many_arguments)] // reason: the binding and the SNAT space, kept explicit
    fn insert_snat(
        &self,
        held: &mut Held<A>,
        now: u32,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
        addrs: &[Addr16],
        ports: PortRange,
        to: &Timeouts,
    ) -> Result<FlowNat, InsertError> {
        let k = FwdKey::<A>::of(t);
        let h = self.fwd_hash(&k);
        // An owner (holding its partition) takes only ports whose replies
        // fall in its partition: 1 in `parts` of them, so it looks at that
        // many more to probe as many.
        let own = held.as_ref().map(|g| g.0.index);
        let parts = if own.is_some() {
            self.parts.len() as u32
        } else {
            1
        };
        let probes = ports.len().min(SNAT_PROBES);
        let looks = ports.len().min(SNAT_PROBES.saturating_mul(parts));
        let first = (h >> 32) as u32 % ports.len();
        let mut full = false;
        for a in 0..addrs.len() {
            let addr = addrs[(h as usize).wrapping_add(a) % addrs.len()];
            let mut probed = 0;
            for n in 0..looks {
                if probed == probes {
                    break;
                }
                let port = ports.nth(first.wrapping_add(n));
                let rk = RevKey {
                    backend: A::from16(&b.backend),
                    peer: A::from16(&addr),
                    bport: b.backend_port,
                    pport: port,
                    proto: k.proto,
                };
                if own.is_some_and(|p| self.part_of(self.rev_shard(&rk)) != p) {
                    continue;
                }
                probed += 1;
                match self.reserve(held, now, &rk, t, state, to) {
                    Reserve::Taken => {}
                    Reserve::Full => full = true,
                    Reserve::Done => {
                        let nat = FlowNat::Snat { addr, port };
                        let bound = Binding { nat, ..*b };
                        return match self.insert(held, now, t, &bound, state, to) {
                            Ok(()) => Ok(nat),
                            Err(e) => {
                                let mut later = LaterBuf::<A, 1>::new();
                                later.push(Later::RemoveRev(rk, k));
                                self.run_later(held, &later);
                                Err(e)
                            }
                        };
                    }
                }
            }
        }
        if full {
            // Every shard probed was full of confirmed flows: counted once,
            // in the flow's own shard.
            let mut s = self.lock(held, self.fwd_shard(&k));
            s.stats.refused[FlowClass::of(k.proto, state) as usize] += 1;
            return Err(InsertError::Full);
        }
        Err(InsertError::PortsExhausted)
    }

    /// Frees room in shard `i`'s forward table (or, with `for_rev`, its
    /// reverse table) if anything can go: expired flows first, then
    /// unconfirmed ones; never a confirmed one. A flow whose other entry is
    /// in another shard is taken only while `later` has room to remember that
    /// entry. A walk that frees less than it aims at, though it saw every
    /// entry it could take, marks the table barren for the rest of the
    /// second ([`Shard::barren`]).
    fn make_room(
        &self,
        i: usize,
        sh: &mut Shard<A>,
        now: u32,
        for_rev: bool,
        later: &mut LaterBuf<A, LATER_CAP>,
    ) {
        let which = usize::from(for_rev);
        let mark = now.saturating_add(1);
        if sh.barren[which] == mark {
            return;
        }
        let target = (sh.cap / 32).max(1);
        let mut freed = 0usize;
        // Something evictable was left because `later` was full: the table
        // is not barren, the next insert may free more.
        let mut cut = false;
        for pass in 0..2 {
            if freed >= target {
                break;
            }
            let go = |confirmed: bool, expires: u32| match pass {
                0 => expires <= now,
                _ => !confirmed,
            };
            let Shard {
                fwd, rev, stats, ..
            } = &mut *sh;
            fwd.retain(|e| {
                if (freed >= target && pass > 0) || !go(e.confirmed, e.expires) {
                    return true;
                }
                let remote = self.rev_elsewhere(i, e);
                // For room in the reverse table only flows whose reverse
                // entry is here help.
                if for_rev && (remote || e.rev_key().is_none()) {
                    return true;
                }
                if remote && later.is_full() {
                    cut = true;
                    return true;
                }
                freed += 1;
                self.unlink_rev(i, rev, e, later);
                match pass {
                    0 => stats.expired += 1,
                    _ => stats.evicted[e.class() as usize] += 1,
                }
                false
            });
            if !for_rev {
                continue;
            }
            // Reverse entries of flows whose forward entry is elsewhere
            // (source NAT): evicted here, their forward entry later. A
            // confirmed flow's reverse entry is marked before its forward
            // entry, so it is never taken for an unconfirmed one's.
            rev.retain(|r| {
                if (freed >= target && pass > 0) || !go(r.confirmed, r.expires) {
                    return true;
                }
                let fk = r.fwd_key();
                if self.fwd_shard(&fk) == i {
                    return true;
                }
                if later.is_full() {
                    cut = true;
                    return true;
                }
                later.push(Later::RemoveFwd(fk, r.key()));
                freed += 1;
                match pass {
                    0 => stats.expired += 1,
                    _ => {
                        let class = FlowClass::of(r.proto, FlowState::from_u8(r.state));
                        stats.evicted[class as usize] += 1;
                    }
                }
                false
            });
        }
        if freed < target && !cut {
            sh.barren[which] = mark;
        }
    }

    /// Updates the cached frontend index and epoch of a still-valid binding.
    fn revalidate(
        &self,
        held: &mut Held<A>,
        t: &FlowTuple,
        frontend: u32,
        epoch: u32,
        backend_index: u32,
    ) {
        let k = FwdKey::of(t);
        let mut s = self.lock(held, self.fwd_shard(&k));
        if let Some(e) = s.fwd.find_mut(self.fwd_hash(&k), is_fwd(&k)) {
            e.frontend = frontend;
            e.epoch = epoch;
            e.backend_index = backend_index;
        }
    }

    fn expire_shard(&self, held: &mut Held<A>, i: usize, now: u32) -> usize {
        if i >= self.nshards {
            return 0;
        }
        let mut removed = 0;
        loop {
            let mut later = LaterBuf::<A, LATER_CAP>::new();
            let mut more = false;
            {
                let mut s = self.lock(held, i);
                let Shard {
                    fwd, rev, stats, ..
                } = &mut *s;
                let before = fwd.len();
                fwd.retain(|e| {
                    if e.expires > now {
                        return true;
                    }
                    if self.rev_elsewhere(i, e) && later.is_full() {
                        more = true;
                        return true;
                    }
                    self.unlink_rev(i, rev, e, &mut later);
                    false
                });
                let n = before - fwd.len();
                stats.expired += n as u64;
                removed += n;
            }
            self.run_later(held, &later);
            if !more {
                return removed;
            }
        }
    }

    /// Each partition in turn, locked while `f` reads its shards.
    fn each_shard(&self, mut f: impl FnMut(&Shard<A>)) {
        for p in self.parts.iter() {
            let g = p.lock();
            g.0.shards.iter().for_each(&mut f);
        }
    }

    fn len(&self) -> usize {
        let mut n = 0;
        self.each_shard(|s| n += s.fwd.len());
        n
    }

    /// [`Conntrack::snapshot_flows`] for one family.
    fn snapshot(
        &self,
        now: u32,
        to: &Timeouts,
        limit: usize,
        keep: &dyn Fn(&FlowInfo) -> bool,
        out: &mut Vec<FlowInfo>,
    ) {
        // One partition locked at a time, each only to copy its matches.
        for p in self.parts.iter() {
            if out.len() >= limit {
                return;
            }
            let g = p.lock();
            for e in g.0.shards.iter().flat_map(|s| s.fwd.iter()) {
                if e.expires <= now {
                    continue;
                }
                let info = e.info(now, to);
                if keep(&info) {
                    out.push(info);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
    }

    fn capacity(&self) -> usize {
        let mut n = 0;
        self.each_shard(|s| n += s.cap);
        n
    }

    fn stats(&self, into: &mut ConntrackStats) {
        self.each_shard(|s| {
            into.entries += s.fwd.len() as u64;
            into.inserts += s.stats.inserts;
            into.expired += s.stats.expired;
            for (a, b) in into.evicted.iter_mut().zip(s.stats.evicted) {
                *a += b;
            }
            for (a, b) in into.refused.iter_mut().zip(s.stats.refused) {
                *a += b;
            }
            into.clashes += s.stats.clashes;
        });
    }
}

/// Counters summed over all shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Flows in the table now (both families).
    pub entries: u64,
    /// Flows inserted.
    pub inserts: u64,
    /// Entries removed because their timeout passed.
    pub expired: u64,
    /// Unconfirmed flows evicted under pressure, per [`FlowClass`] index.
    /// (A confirmed flow is never evicted.)
    pub evicted: PerClass,
    /// New flows refused because their shard was full of confirmed flows,
    /// per [`FlowClass`] index of the new flow.
    pub refused: PerClass,
    /// New routed flows refused because their reply tuple was a live
    /// flow's (one client port to two frontends sharing a backend).
    pub clashes: u64,
}

impl ConntrackStats {
    /// Unconfirmed flows evicted, all classes.
    #[must_use]
    pub fn evicted_total(&self) -> u64 {
        self.evicted.iter().sum()
    }

    /// New flows refused for want of room, all classes.
    #[must_use]
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }
}

/// One shard of an [`Expiring`] map: (key, value, expiry second).
type ExpiringShard<K, V> = Padded<Mutex<HashTable<(K, V, u32)>>>;

/// A small expiring map (affinity, fragments): sharded, bounded, allocated once.
/// Its keys come from packets (client addresses, fragment ids), so it hashes
/// with a key drawn from the OS's randomness once per map, like the flow
/// tables: nobody outside can aim keys at one shard or bucket.
#[derive(Debug)]
struct Expiring<K, V> {
    shards: Box<[ExpiringShard<K, V>]>,
    mask: usize,
    hasher: RandomState,
}

impl<K: Hash + Eq + Copy, V: Copy> Expiring<K, V> {
    fn new(capacity: usize, shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        let per = capacity.div_ceil(n).max(8);
        Self {
            shards: (0..n)
                .map(|_| Padded(Mutex::new(HashTable::with_capacity(per))))
                .collect(),
            mask: n - 1,
            hasher: RandomState::default(),
        }
    }

    fn get(&self, now: u32, k: &K) -> Option<V> {
        let h = self.hasher.hash_one(k);
        let mut s = lock(&self.shards[(h >> 32) as usize & self.mask].0);
        let e = s.find_entry(h, |(x, _, _)| x == k).ok()?;
        if e.get().2 <= now {
            e.remove();
            return None;
        }
        Some(e.get().1)
    }

    /// Sets `k → v` until `now + ttl`; returns false when the shard is full of
    /// live entries.
    fn set(&self, now: u32, k: K, v: V, ttl: u32) -> bool {
        let h = self.hasher.hash_one(k);
        let mut s = lock(&self.shards[(h >> 32) as usize & self.mask].0);
        let expires = now.saturating_add(ttl);
        if let Some(e) = s.find_mut(h, |(x, _, _)| *x == k) {
            *e = (k, v, expires);
            return true;
        }
        if s.len() >= s.capacity() {
            s.retain(|(_, _, exp)| *exp > now);
            if s.len() >= s.capacity() {
                return false;
            }
        }
        let hasher = &self.hasher;
        s.insert_unique(h, (k, v, expires), |(x, _, _)| hasher.hash_one(x));
        true
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|m| lock(&m.0).len()).sum()
    }

    /// Runs `f` on `k`'s live value (`None` when absent or expired) under
    /// the shard's lock, so a check and its update are one step. When the key
    /// was absent and `f` returns a value, it is set until `now + ttl` (if the
    /// shard has room).
    fn upsert<R>(
        &self,
        now: u32,
        k: K,
        ttl: u32,
        f: impl FnOnce(Option<&mut V>) -> (R, Option<V>),
    ) -> R {
        let h = self.hasher.hash_one(k);
        let mut s = lock(&self.shards[(h >> 32) as usize & self.mask].0);
        match s.find_entry(h, |(x, _, _)| *x == k) {
            Ok(mut e) if e.get().2 > now => return f(Some(&mut e.get_mut().1)).0,
            Ok(e) => {
                e.remove();
            }
            Err(_) => {}
        }
        let (r, v) = f(None);
        if let Some(v) = v {
            if s.len() >= s.capacity() {
                s.retain(|(_, _, exp)| *exp > now);
            }
            if s.len() < s.capacity() {
                let hasher = &self.hasher;
                let expires = now.saturating_add(ttl);
                s.insert_unique(h, (k, v, expires), |(x, _, _)| hasher.hash_one(x));
            }
        }
        r
    }
}

/// What a first fragment's rewrite does to the other fragments of its
/// datagram (they carry no ports, so only addresses change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragRewrite {
    /// Rewrite the source and the destination (each when given) and send to
    /// `next_hop`.
    Nat {
        /// The new source address (the frontend for a reply, the SNAT
        /// address for a source-NATed request).
        src: Option<Addr16>,
        /// The new destination address (the backend for a request, the
        /// client for a source-NATed reply).
        dst: Option<Addr16>,
        /// Where the fragment goes.
        next_hop: NextHop,
    },
    /// Encapsulate from `outer_src` to `backend` (DSR).
    Encap {
        /// The outer source.
        outer_src: Addr16,
        /// The backend, the outer destination.
        backend: Addr16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    src: Addr16,
    dst: Addr16,
    id: u32,
    /// [`Fragment::next`]: the IPv4 protocol or the IPv6 Fragment header's
    /// Next Header.
    proto: u8,
}

impl FragKey {
    fn of(src: &Addr16, dst: &Addr16, f: &Fragment) -> Self {
        Self {
            src: *src,
            dst: *dst,
            id: f.id,
            proto: f.next,
        }
    }
}

/// Disjoint byte ranges a datagram's fragments may arrive in (adjacent
/// ones merge, so in-order fragments use one).
const FRAG_RANGES: usize = 8;

/// A datagram in flight: the first fragment's rewrite and the byte ranges of
/// the fragments forwarded, so that none overlaps another (RFC 5722, RFC
/// 1858 §3). Fixed size: nothing is allocated per fragment.
#[derive(Debug, Clone, Copy)]
struct FragState {
    rw: FragRewrite,
    /// `[start, end)` of the data forwarded, sorted, disjoint, not adjacent.
    ranges: [(u32, u32); FRAG_RANGES],
    used: u8,
    /// Where the datagram ends, once its last fragment was forwarded.
    end: Option<u32>,
    /// An overlap was seen: the rest of the datagram is dropped, as Linux
    /// discards the whole queue.
    poisoned: bool,
}

/// Why a fragment is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragRefused {
    /// A non-first fragment whose first fragment was not seen (or whose
    /// datagram came in more than 8 disjoint pieces at once).
    Untracked,
    /// It overlaps or repeats a fragment already forwarded, reaches past the
    /// end the last fragment set, or its datagram already had an overlap.
    Overlap,
}

impl FragState {
    fn new(rw: FragRewrite) -> Self {
        Self {
            rw,
            ranges: [(0, 0); FRAG_RANGES],
            used: 0,
            end: None,
            poisoned: false,
        }
    }

    /// Records `f`'s range, or says why it must be dropped (and poisons the
    /// datagram on an overlap).
    fn add(&mut self, f: &Fragment) -> Result<(), FragRefused> {
        if self.poisoned {
            return Err(FragRefused::Overlap);
        }
        let (start, stop) = (f.offset, f.offset + f.len);
        let used = usize::from(self.used);
        let ranges = &self.ranges[..used];
        let max_seen = ranges.last().map_or(0, |r| r.1);
        let bad_end = match self.end {
            Some(end) => stop > end || (!f.more && stop != end),
            None => !f.more && max_seen > stop,
        };
        if bad_end || ranges.iter().any(|&(a, b)| start < b && a < stop) {
            self.poisoned = true;
            return Err(FragRefused::Overlap);
        }
        // Insert, merging with the neighbours it touches.
        let at = ranges.partition_point(|r| r.1 <= start);
        let joins_prev = at > 0 && self.ranges[at - 1].1 == start;
        let joins_next = at < used && self.ranges[at].0 == stop;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[at - 1].1 = self.ranges[at].1;
                self.ranges.copy_within(at + 1..used, at);
                self.used -= 1;
            }
            (true, false) => self.ranges[at - 1].1 = stop,
            (false, true) => self.ranges[at].0 = start,
            (false, false) => {
                if used == FRAG_RANGES {
                    return Err(FragRefused::Untracked);
                }
                self.ranges.copy_within(at..used, at + 1);
                self.ranges[at] = (start, stop);
                self.used += 1;
            }
        }
        if !f.more {
            self.end = Some(stop);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AffinityKey {
    client: Addr16,
    vip: Addr16,
    vport: u16,
    proto: u8,
}

/// The shared connection, affinity and fragment tables.
#[derive(Debug)]
pub struct Conntrack {
    v4: Tracker<[u8; 4]>,
    v6: Tracker<[u8; 16]>,
    affinity: Expiring<AffinityKey, (Addr16, u16)>,
    fragments: Expiring<FragKey, FragState>,
    timeouts: Timeouts,
}

/// A worker's own partition of both families' tables, held across calls
/// (a batch): lookups and inserts through it take no lock
/// ([`Conntrack::hold`]). Empty ([`Hold::default`]): every call locks
/// what it touches.
#[derive(Default)]
pub struct Hold {
    v4: Held<[u8; 4]>,
    v6: Held<[u8; 16]>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("partition", &self.partition())
            .finish()
    }
}

impl Hold {
    /// The partition held (of both families), if any.
    #[must_use]
    pub fn partition(&self) -> Option<usize> {
        let (v4, v6) = (self.v4.as_ref()?, self.v6.as_ref()?);
        (v4.0.index == v6.0.index).then_some(v4.0.index)
    }

    /// Lets the partition go (others may lock it again).
    pub fn release(&mut self) {
        self.v4 = None;
        self.v6 = None;
    }
}

impl Conntrack {
    /// Allocates every table up front.
    #[must_use]
    pub fn new(cfg: &Config) -> Self {
        Self {
            v4: Tracker::new(cfg.capacity, cfg.shards, cfg.partitions),
            v6: Tracker::new(cfg.capacity, cfg.shards, cfg.partitions),
            affinity: Expiring::new(cfg.affinity_capacity, cfg.shards.min(64)),
            fragments: Expiring::new(cfg.fragment_capacity, cfg.shards.min(64)),
            timeouts: cfg.timeouts,
        }
    }

    /// The timeouts in force.
    #[must_use]
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Partitions ([`Config::partitions`]).
    #[must_use]
    pub fn partitions(&self) -> usize {
        self.v4.parts.len()
    }

    /// The partition that owns the flows of endpoint `addr:port` over
    /// `proto`: a forward packet's source (the client), a reply's
    /// destination (the client, or the gateway's source-NAT address and
    /// port). Both directions of a flow give the same partition.
    #[inline]
    #[must_use]
    pub fn owner(&self, family: Family, addr: &Addr16, port: u16, proto: Proto) -> usize {
        let proto = proto.ip_number();
        match family {
            Family::V4 => {
                let a = <[u8; 4]>::from16(addr);
                self.v4.part_of(self.v4.shard_index(&a, port, proto))
            }
            Family::V6 => self.v6.part_of(self.v6.shard_index(addr, port, proto)),
        }
    }

    /// Locks partition `p` of both families until the [`Hold`] is released
    /// or dropped. A worker holds only its own partition, for one batch at a
    /// time, and never waits on another lock while holding it.
    #[must_use]
    pub fn hold(&self, p: usize) -> Hold {
        Hold {
            v4: Some(self.v4.hold(p)),
            v6: Some(self.v6.hold(p)),
        }
    }

    /// Forward lookup of `t` (client → vip). With `touch`, the packet's TCP
    /// `flags` advance the state and the idle timer restarts.
    #[inline]
    #[must_use]
    pub fn lookup_original(
        &self,
        now: Now,
        family: Family,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
    ) -> Option<FlowHit> {
        self.lookup_original_in(&mut Hold::default(), None, now, family, t, flags, touch)
    }

    /// [`Conntrack::lookup_original`] through a held partition, with the
    /// packet's hash when it was computed already
    /// ([`Conntrack::hash_original`]).
    #[inline]
    #[must_use]
    #[allow(clippy::too_many_arguments)] // reason: the hot path passes what it has, not structs it would have to build
    pub fn lookup_original_in(
        &self,
        h: &mut Hold,
        kh: Option<FlowHash>,
        now: Now,
        family: Family,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
    ) -> Option<FlowHit> {
        let n = now.secs32();
        match family {
            Family::V4 => {
                self.v4
                    .lookup_original(&mut h.v4, kh, n, t, flags, touch, &self.timeouts)
            }
            Family::V6 => {
                self.v6
                    .lookup_original(&mut h.v6, kh, n, t, flags, touch, &self.timeouts)
            }
        }
    }

    /// Reply lookup of `t` (backend → client): the frontend to restore.
    #[inline]
    #[must_use]
    pub fn lookup_reply(
        &self,
        now: Now,
        family: Family,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
    ) -> Option<ReplyHit> {
        self.lookup_reply_in(&mut Hold::default(), None, now, family, t, flags, touch)
    }

    /// [`Conntrack::lookup_reply`] through a held partition, with the
    /// packet's hash when it was computed already ([`Conntrack::hash_reply`]).
    #[inline]
    #[must_use]
    #[allow(clippy::too_many_arguments)] // reason: the hot path passes what it has, not structs it would have to build
    pub fn lookup_reply_in(
        &self,
        h: &mut Hold,
        kh: Option<FlowHash>,
        now: Now,
        family: Family,
        t: &FlowTuple,
        flags: u8,
        touch: bool,
    ) -> Option<ReplyHit> {
        let n = now.secs32();
        match family {
            Family::V4 => self
                .v4
                .lookup_reply(&mut h.v4, kh, n, t, flags, touch, &self.timeouts),
            Family::V6 => self
                .v6
                .lookup_reply(&mut h.v6, kh, n, t, flags, touch, &self.timeouts),
        }
    }

    /// The hash a forward lookup of `t` (client → vip) uses: computed once
    /// per packet, for its owner, its prefetch and its lookup.
    #[inline]
    #[must_use]
    pub fn hash_original(&self, family: Family, t: &FlowTuple) -> FlowHash {
        match family {
            Family::V4 => self.v4.fwd_key_hash(&FwdKey::of(t)),
            Family::V6 => self.v6.fwd_key_hash(&FwdKey::of(t)),
        }
    }

    /// The hash a reply lookup of `t` (backend → peer) uses.
    #[inline]
    #[must_use]
    pub fn hash_reply(&self, family: Family, t: &FlowTuple) -> FlowHash {
        match family {
            Family::V4 => self.v4.rev_key_hash(&RevKey::of_reply(t)),
            Family::V6 => self.v6.rev_key_hash(&RevKey::of_reply(t)),
        }
    }

    /// The partition that owns the flow of a packet with hash `h` (of
    /// `family`): the same as [`Conntrack::owner`] of its client's end.
    #[inline]
    #[must_use]
    pub fn owner_of(&self, family: Family, h: FlowHash) -> usize {
        match family {
            Family::V4 => self.v4.part_of(h.shard as usize),
            Family::V6 => self.v6.part_of(h.shard as usize),
        }
    }

    /// Starts loading what [`Conntrack::lookup_original`] of `t` will touch
    /// (batch lookups: prefetch a whole batch, then look each one up).
    #[inline]
    pub fn prefetch_original(&self, family: Family, t: &FlowTuple) {
        self.prefetch_original_hashed(family, self.hash_original(family, t));
    }

    /// [`Conntrack::prefetch_original`] with the packet's hash.
    #[inline]
    pub fn prefetch_original_hashed(&self, family: Family, h: FlowHash) {
        match family {
            Family::V4 => self.v4.prefetch_original(h),
            Family::V6 => self.v6.prefetch_original(h),
        }
    }

    /// Starts loading what [`Conntrack::lookup_reply`] of `t` will touch.
    #[inline]
    pub fn prefetch_reply(&self, family: Family, t: &FlowTuple) {
        self.prefetch_reply_hashed(family, self.hash_reply(family, t));
    }

    /// [`Conntrack::prefetch_reply`] with the packet's hash.
    #[inline]
    pub fn prefetch_reply_hashed(&self, family: Family, h: FlowHash) {
        match family {
            Family::V4 => self.v4.prefetch_reply(h),
            Family::V6 => self.v6.prefetch_reply(h),
        }
    }

    /// Binds flow `t` (client → vip) to a backend in `state`, routed or
    /// DSR as `b.nat` says. (Source-NATed flows go through
    /// [`Conntrack::insert_snat`], which allocates their port.)
    ///
    /// # Errors
    /// [`InsertError::Full`] when the shard is full and nothing could be
    /// evicted; for a [`FlowNat::Snat`] binding, [`InsertError::PortsExhausted`]
    /// when its address and port are in use towards that backend.
    pub fn insert(
        &self,
        now: Now,
        family: Family,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
    ) -> Result<(), InsertError> {
        self.insert_in(&mut Hold::default(), now, family, t, b, state)
    }

    /// [`Conntrack::insert`] through a held partition.
    ///
    /// # Errors
    /// As [`Conntrack::insert`].
    pub fn insert_in(
        &self,
        h: &mut Hold,
        now: Now,
        family: Family,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
    ) -> Result<(), InsertError> {
        if let FlowNat::Snat { addr, port } = b.nat {
            let ports = PortRange::new(port, port).ok_or(InsertError::PortsExhausted)?;
            return self
                .insert_snat_in(h, now, family, t, b, state, &[addr], ports)
                .map(|_| ());
        }
        let n = now.secs32();
        match family {
            Family::V4 => self.v4.insert(&mut h.v4, n, t, b, state, &self.timeouts),
            Family::V6 => self.v6.insert(&mut h.v6, n, t, b, state, &self.timeouts),
        }
    }

    /// Binds flow `t` to `b`'s backend with source NAT: allocates a port in
    /// `ports` on one of `addrs` that no live flow uses towards the same
    /// (backend address, backend port, protocol), and returns the
    /// [`FlowNat::Snat`] chosen. `b.nat` is ignored.
    ///
    /// # Errors
    /// [`InsertError::PortsExhausted`] when every port probed is in use,
    /// [`InsertError::Full`] when the table has no room.
    #[allow(clippy::too_many_arguments)] // reason: the binding and the SNAT space, kept explicit
    pub fn insert_snat(
        &self,
        now: Now,
        family: Family,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
        addrs: &[Addr16],
        ports: PortRange,
    ) -> Result<FlowNat, InsertError> {
        self.insert_snat_in(&mut Hold::default(), now, family, t, b, state, addrs, ports)
    }

    /// [`Conntrack::insert_snat`] through a held partition: only ports whose
    /// replies the holder owns are taken.
    ///
    /// # Errors
    /// As [`Conntrack::insert_snat`].
    #[allow(clippy::too_many_arguments)] // reason: the binding and the SNAT space, kept explicit
    pub fn insert_snat_in(
        &self,
        h: &mut Hold,
        now: Now,
        family: Family,
        t: &FlowTuple,
        b: &Binding,
        state: FlowState,
        addrs: &[Addr16],
        ports: PortRange,
    ) -> Result<FlowNat, InsertError> {
        if addrs.is_empty() {
            return Err(InsertError::PortsExhausted);
        }
        let n = now.secs32();
        match family {
            Family::V4 => {
                self.v4
                    .insert_snat(&mut h.v4, n, t, b, state, addrs, ports, &self.timeouts)
            }
            Family::V6 => {
                self.v6
                    .insert_snat(&mut h.v6, n, t, b, state, addrs, ports, &self.timeouts)
            }
        }
    }

    /// Records that flow `t`'s backend is still valid in table `epoch`,
    /// as frontend `frontend`'s backend `backend_index` (both indices in that
    /// table; `u32::MAX` for a TCP connection that keeps a backend which left
    /// the table, as Linux conntrack keeps kube-proxy's DNAT). The binding
    /// itself (backend, NAT, reverse entry) is never changed.
    pub fn revalidate(
        &self,
        family: Family,
        t: &FlowTuple,
        frontend: u32,
        epoch: u32,
        backend_index: u32,
    ) {
        self.revalidate_in(
            &mut Hold::default(),
            family,
            t,
            frontend,
            epoch,
            backend_index,
        );
    }

    /// [`Conntrack::revalidate`] through a held partition.
    pub fn revalidate_in(
        &self,
        h: &mut Hold,
        family: Family,
        t: &FlowTuple,
        frontend: u32,
        epoch: u32,
        backend_index: u32,
    ) {
        match family {
            Family::V4 => self
                .v4
                .revalidate(&mut h.v4, t, frontend, epoch, backend_index),
            Family::V6 => self
                .v6
                .revalidate(&mut h.v6, t, frontend, epoch, backend_index),
        }
    }

    /// Copies the live flows that `keep` accepts into `out`, until it holds
    /// `limit` (IPv4 first, then IPv6). For `inspect flows`: one partition
    /// lock at a time, each held only to copy that partition's matches (at
    /// most what `limit` leaves room for), never the whole table's. `out` is
    /// reserved up front, so nothing is allocated under a lock. Not on the
    /// packet path: it walks whole partitions.
    pub fn snapshot_flows(
        &self,
        now: Now,
        limit: usize,
        keep: &dyn Fn(&FlowInfo) -> bool,
        out: &mut Vec<FlowInfo>,
    ) {
        out.reserve(limit.saturating_sub(out.len()));
        let n = now.secs32();
        self.v4.snapshot(n, &self.timeouts, limit, keep, out);
        self.v6.snapshot(n, &self.timeouts, limit, keep, out);
    }

    /// Sweeps `shards` shards (of each family) for expired entries, continuing
    /// where the previous call stopped (`cursor`). Returns entries removed.
    pub fn expire(&self, now: Now, cursor: &mut usize, shards: usize) -> usize {
        let n = now.secs32();
        let total = self.v4.nshards;
        let mut removed = 0;
        let (mut h4, mut h6) = (None, None);
        for _ in 0..shards.min(total) {
            let i = *cursor % total;
            removed += self.v4.expire_shard(&mut h4, i, n) + self.v6.expire_shard(&mut h6, i, n);
            *cursor = (i + 1) % total;
        }
        removed
    }

    /// [`Conntrack::expire`] over the shards of partition `p` only: what its
    /// owner sweeps between batches (`cursor` counts that partition's shards).
    pub fn expire_partition(&self, now: Now, p: usize, cursor: &mut usize, shards: usize) -> usize {
        let n = now.secs32();
        let parts = self.partitions();
        let p = p % parts;
        let own = (self.v4.nshards - p).div_ceil(parts);
        let mut removed = 0;
        let (mut h4, mut h6) = (None, None);
        for _ in 0..shards.min(own) {
            let sub = *cursor % own;
            let i = p + sub * parts;
            removed += self.v4.expire_shard(&mut h4, i, n) + self.v6.expire_shard(&mut h6, i, n);
            *cursor = (sub + 1) % own;
        }
        removed
    }

    /// Flows tracked now (both families).
    #[must_use]
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when no flow is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows each family can hold.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.v4.capacity()
    }

    /// Counters summed over all shards.
    #[must_use]
    pub fn stats(&self) -> ConntrackStats {
        let mut s = ConntrackStats::default();
        self.v4.stats(&mut s);
        self.v6.stats(&mut s);
        s
    }

    /// The backend a client is stuck to for a service port, if not expired.
    #[must_use]
    pub fn affinity_get(
        &self,
        now: Now,
        client: &Addr16,
        vip: &Addr16,
        vport: u16,
        proto: Proto,
    ) -> Option<(Addr16, u16)> {
        let k = AffinityKey {
            client: *client,
            vip: *vip,
            vport,
            proto: proto.ip_number(),
        };
        self.affinity.get(now.secs32(), &k)
    }

    /// Sticks a client to a backend for `timeout_s` from `now` (kube-proxy
    /// refreshes the timer on each new connection; so does the pipeline).
    /// Returns false when the affinity table is full of live entries.
    #[allow(clippy::too_many_arguments)] // reason: a flat key, kept explicit for the hot path
    pub fn affinity_set(
        &self,
        now: Now,
        client: &Addr16,
        vip: &Addr16,
        vport: u16,
        proto: Proto,
        backend: (Addr16, u16),
        timeout_s: u32,
    ) -> bool {
        let k = AffinityKey {
            client: *client,
            vip: *vip,
            vport,
            proto: proto.ip_number(),
        };
        self.affinity.set(now.secs32(), k, backend, timeout_s)
    }

    /// Affinity entries held now.
    #[must_use]
    pub fn affinity_len(&self) -> usize {
        self.affinity.len()
    }

    /// Remembers the rewrite of a first fragment for the datagram's other
    /// fragments, with its byte range.
    ///
    /// # Errors
    /// [`FragRefused::Overlap`] when the datagram already had a first
    /// fragment (a repeat, or an overlap: the datagram is poisoned).
    pub fn fragment_remember(
        &self,
        now: Now,
        src: &Addr16,
        dst: &Addr16,
        frag: &Fragment,
        rw: FragRewrite,
    ) -> Result<(), FragRefused> {
        let k = FragKey::of(src, dst, frag);
        self.fragments
            .upsert(now.secs32(), k, self.timeouts.fragment, |e| match e {
                Some(st) => (st.add(frag), None),
                None => {
                    let mut st = FragState::new(rw);
                    let r = st.add(frag);
                    (r, r.is_ok().then_some(st))
                }
            })
    }

    /// The rewrite remembered for a non-first fragment's datagram; its range
    /// is recorded when `forwards` says the fragment will be forwarded with
    /// that rewrite (one dropped later, for its TTL or its size, leaves no
    /// range behind).
    ///
    /// # Errors
    /// [`FragRefused::Untracked`] when the first fragment was not seen;
    /// [`FragRefused::Overlap`] when it overlaps or repeats a fragment
    /// already forwarded, or reaches past the datagram's end.
    pub fn fragment_lookup(
        &self,
        now: Now,
        src: &Addr16,
        dst: &Addr16,
        frag: &Fragment,
        forwards: impl FnOnce(&FragRewrite) -> bool,
    ) -> Result<FragRewrite, FragRefused> {
        let k = FragKey::of(src, dst, frag);
        self.fragments
            .upsert(now.secs32(), k, self.timeouts.fragment, |e| match e {
                Some(st) if !forwards(&st.rw) => (Ok(st.rw), None),
                Some(st) => (st.add(frag).map(|()| st.rw), None),
                None => (Err(FragRefused::Untracked), None),
            })
    }

    /// Datagrams whose fragments are tracked now.
    #[must_use]
    pub fn fragments_len(&self) -> usize {
        self.fragments.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;

    /// The affinity and fragment maps' keys come from packets: each map has
    /// its own random hash key, so two maps (two gateways, two restarts)
    /// never place the same keys alike, and no fixed seed can be aimed at.
    #[test]
    fn expiring_maps_hash_with_random_keys() {
        let a: Expiring<u64, u8> = Expiring::new(64, 4);
        let b: Expiring<u64, u8> = Expiring::new(64, 4);
        let differ = (0..8u64).any(|k| a.hasher.hash_one(k) != b.hasher.hash_one(k));
        assert!(differ, "two maps hash every key alike: a fixed seed");
    }
    use crate::flow::v4_to_16;
    use std::sync::Arc;

    /// A datagram's fragment ranges: adjacent ones merge, so in-order
    /// fragments never run out of room; 8 disjoint pieces at once is the
    /// limit; a fragment that will not be forwarded leaves no range; an
    /// overlap refuses the datagram's later fragments too.
    #[test]
    fn fragment_ranges_merge_and_refuse_overlaps() {
        let ct = small(16);
        let now = Now(1_000_000_000_000);
        let (s, d) = (v4_to_16([198, 18, 0, 1]), v4_to_16([198, 19, 0, 10]));
        let frag = |offset: u32, len: u32, more: bool| Fragment {
            id: 7,
            first: offset == 0,
            offset,
            len,
            more,
            next: 17,
        };
        let rw = FragRewrite::Encap {
            outer_src: s,
            backend: d,
        };
        let look = |f: Fragment| ct.fragment_lookup(now, &s, &d, &f, |_| true);
        ct.fragment_remember(now, &s, &d, &frag(0, 16, true), rw)
            .unwrap();
        assert_eq!(
            ct.fragment_remember(now, &s, &d, &frag(0, 16, true), rw),
            Err(FragRefused::Overlap),
            "a second first fragment"
        );
        let ct = small(16);
        let look2 = |f: Fragment, fwd: bool| ct.fragment_lookup(now, &s, &d, &f, |_| fwd);
        ct.fragment_remember(now, &s, &d, &frag(0, 16, true), rw)
            .unwrap();
        for i in 1..8 {
            assert_eq!(look2(frag(i * 32, 16, true), true), Ok(rw), "piece {i}");
        }
        assert_eq!(
            look2(frag(256, 16, true), true),
            Err(FragRefused::Untracked)
        );
        // Filling a gap merges three ranges into one: room again.
        assert_eq!(look2(frag(16, 16, true), true), Ok(rw));
        assert_eq!(look2(frag(256, 16, true), true), Ok(rw));
        // Not forwarded: no range left behind.
        assert_eq!(look2(frag(48, 16, true), false), Ok(rw));
        assert_eq!(look2(frag(48, 16, true), true), Ok(rw));
        // An overlap, then the datagram is refused.
        assert_eq!(look2(frag(40, 16, true), true), Err(FragRefused::Overlap));
        assert_eq!(look2(frag(400, 8, false), true), Err(FragRefused::Overlap));
        assert_eq!(
            look(frag(16, 8, true)),
            Err(FragRefused::Overlap),
            "the repeated first fragment poisoned its datagram"
        );
    }

    fn small(capacity: usize) -> Conntrack {
        Conntrack::new(&Config {
            capacity,
            shards: 1,
            partitions: 1,
            affinity_capacity: 64,
            fragment_capacity: 64,
            timeouts: Timeouts::default(),
        })
    }

    fn t(cport: u16) -> FlowTuple {
        FlowTuple {
            src_addr: v4_to_16([198, 18, 0, 1]),
            dst_addr: v4_to_16([198, 19, 0, 10]),
            src_port: cport,
            dst_port: 80,
            proto: Proto::Tcp,
        }
    }

    fn bind(port: u16) -> Binding {
        Binding {
            backend: v4_to_16([198, 18, 1, 1]),
            backend_port: port,
            frontend: 0,
            epoch: 1,
            backend_index: 0,
            nat: FlowNat::Routed,
        }
    }

    fn reply_of(cport: u16, bport: u16) -> FlowTuple {
        FlowTuple {
            src_addr: v4_to_16([198, 18, 1, 1]),
            dst_addr: v4_to_16([198, 18, 0, 1]),
            src_port: bport,
            dst_port: cport,
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn entry_sizes_meet_the_memory_target() {
        // 80 bytes of entries per IPv4 flow (both directions), whatever its
        // return path (a DSR flow has no reverse entry).
        assert_eq!(std::mem::size_of::<Fwd<[u8; 4]>>(), 48);
        assert_eq!(std::mem::size_of::<Rev<[u8; 4]>>(), 32);
        assert_eq!(std::mem::size_of::<Fwd<[u8; 16]>>(), 96);
        assert_eq!(std::mem::size_of::<Rev<[u8; 16]>>(), 80);
    }

    #[test]
    fn tcp_lifecycle_shortens_timeouts() {
        let ct = small(64);
        let to = *ct.timeouts();
        let now = Now::from_secs(100);
        ct.insert(
            now,
            Family::V4,
            &t(1000),
            &bind(8080),
            FlowState::TcpSynSent,
        )
        .unwrap();
        // SYN unanswered: gone after tcp_syn.
        assert!(ct
            .lookup_original(
                now.plus_secs(u64::from(to.tcp_syn) - 1),
                Family::V4,
                &t(1000),
                0,
                false
            )
            .is_some());
        assert!(ct
            .lookup_original(
                now.plus_secs(u64::from(to.tcp_syn)),
                Family::V4,
                &t(1000),
                0,
                false
            )
            .is_none());

        ct.insert(
            now,
            Family::V4,
            &t(1001),
            &bind(8080),
            FlowState::TcpSynSent,
        )
        .unwrap();
        let r = ct
            .lookup_reply(
                now,
                Family::V4,
                &reply_of(1001, 8080),
                tcp_flags::SYN | tcp_flags::ACK,
                true,
            )
            .unwrap();
        assert_eq!(r.state, FlowState::TcpEstablished);
        assert_eq!(r.vip, v4_to_16([198, 19, 0, 10]));
        assert_eq!(r.vport, 80);
        // The backend's first ACK (the client's request answered) confirms
        // it: established and confirmed lives a day.
        confirm(&ct, now, 1001, 8080);
        let later = now.plus_secs(3600);
        let h = ct
            .lookup_original(later, Family::V4, &t(1001), tcp_flags::ACK, true)
            .unwrap();
        assert_eq!(h.state, FlowState::TcpEstablished);
        // FIN shortens to tcp_fin.
        let h = ct
            .lookup_original(
                later,
                Family::V4,
                &t(1001),
                tcp_flags::FIN | tcp_flags::ACK,
                true,
            )
            .unwrap();
        assert_eq!(h.state, FlowState::TcpClosing);
        let h = ct
            .lookup_reply(
                later,
                Family::V4,
                &reply_of(1001, 8080),
                tcp_flags::ACK,
                true,
            )
            .unwrap();
        assert_eq!(
            h.state,
            FlowState::TcpClosing,
            "an ACK does not reopen a closing flow"
        );
        assert!(ct
            .lookup_original(
                later.plus_secs(u64::from(to.tcp_fin)),
                Family::V4,
                &t(1001),
                0,
                false
            )
            .is_none());
        assert!(ct
            .lookup_reply(
                later.plus_secs(u64::from(to.tcp_fin)),
                Family::V4,
                &reply_of(1001, 8080),
                0,
                false
            )
            .is_none());
    }

    /// Replies that change nothing read only the reverse entry; the forward
    /// entry's expiry is still pushed often enough that a flow carrying only
    /// replies lives as long as they come, and ends one timeout after.
    #[test]
    fn reply_only_flow_lives_while_replies_flow() {
        let ct = small(64);
        let to = *ct.timeouts();
        let mut u = t(5353);
        u.proto = Proto::Udp;
        let mut back = reply_of(5353, 53);
        back.proto = Proto::Udp;
        let start = Now::from_secs(0);
        ct.insert(
            start,
            Family::V4,
            &u,
            &bind(53),
            FlowState::initial(Proto::Udp, 0),
        )
        .unwrap();
        // Ten minutes of replies every 5 s, the client silent.
        let mut now = start;
        for _ in 0..120 {
            now = now.plus_secs(5);
            let hit = ct.lookup_reply(now, Family::V4, &back, 0, true);
            assert_eq!(hit.map(|h| h.state), Some(FlowState::Replied), "at {now:?}");
        }
        assert!(ct.lookup_original(now, Family::V4, &u, 0, false).is_some());
        // Replies stop: gone once the replied timeout has passed.
        let later = now.plus_secs(u64::from(to.datagram_replied));
        assert!(ct
            .lookup_original(later, Family::V4, &u, 0, false)
            .is_none());
    }

    #[test]
    fn rst_shortens_to_rst_timeout() {
        let ct = small(64);
        let now = Now::from_secs(10);
        ct.insert(
            now,
            Family::V4,
            &t(1),
            &bind(8080),
            FlowState::TcpEstablished,
        )
        .unwrap();
        let h = ct
            .lookup_reply(now, Family::V4, &reply_of(1, 8080), tcp_flags::RST, true)
            .unwrap();
        assert_eq!(h.state, FlowState::TcpReset);
        assert!(ct
            .lookup_original(now.plus_secs(9), Family::V4, &t(1), 0, false)
            .is_some());
        assert!(ct
            .lookup_original(now.plus_secs(10), Family::V4, &t(1), 0, false)
            .is_none());
    }

    #[test]
    fn udp_reply_extends_life() {
        let ct = small(64);
        let to = *ct.timeouts();
        let udp = |cport| FlowTuple {
            proto: Proto::Udp,
            ..t(cport)
        };
        let back = |cport| FlowTuple {
            proto: Proto::Udp,
            ..reply_of(cport, 53)
        };
        let start = Now::from_secs(0);
        for cport in [5353, 5354] {
            ct.insert(
                start,
                Family::V4,
                &udp(cport),
                &bind(53),
                FlowState::initial(Proto::Udp, 0),
            )
            .unwrap();
        }
        // 5353: one request, one reply at once (DNS): still the short
        // timeout, as in Linux, so its port is free again as soon.
        let h = ct.lookup_reply(start, Family::V4, &back(5353), 0, true);
        assert_eq!(h.unwrap().state, FlowState::Replied);
        let alive = |cport, at: u32| {
            ct.lookup_original(
                start.plus_secs(u64::from(at)),
                Family::V4,
                &udp(cport),
                0,
                false,
            )
            .is_some()
        };
        assert!(alive(5353, to.datagram - 1));
        // 5354: answered, and still talking two seconds in: a stream.
        let later = start.plus_secs(2);
        assert!(ct
            .lookup_reply(later, Family::V4, &back(5354), 0, true)
            .is_some());
        assert!(alive(5354, 2 + to.datagram_replied - 1));
        assert!(!alive(5354, 2 + to.datagram_replied));
        assert!(!alive(5353, to.datagram));
    }

    /// The backend's ACK to flow `cport`: confirms it.
    fn confirm(ct: &Conntrack, now: Now, cport: u16, bport: u16) {
        let h = ct.lookup_reply(
            now,
            Family::V4,
            &reply_of(cport, bport),
            tcp_flags::ACK,
            true,
        );
        assert!(h.is_some(), "flow {cport} has no reverse entry");
    }

    fn confirmed(ct: &Conntrack, now: Now) -> Vec<FlowInfo> {
        let mut out = Vec::new();
        ct.snapshot_flows(now, 1 << 14, &|f| f.confirmed, &mut out);
        out
    }

    #[test]
    fn eviction_takes_unconfirmed_flows_first() {
        let ct = small(8);
        let cap = ct.capacity();
        let now = Now::from_secs(1);
        // Even ports: answered by their backend (confirmed); odd: SYN only,
        // or picked up mid-stream (a first packet without SYN).
        for i in 0..cap as u16 {
            let st = if i % 4 == 1 {
                FlowState::TcpSynSent
            } else {
                FlowState::initial(Proto::Tcp, tcp_flags::ACK)
            };
            ct.insert(now, Family::V4, &t(i), &bind(8080), st).unwrap();
            if i % 2 == 0 {
                confirm(&ct, now, i, 8080);
            }
        }
        assert_eq!(ct.len(), cap);
        assert_eq!(confirmed(&ct, now).len(), cap.div_ceil(2));
        // Far more new flows than the table holds: each takes an unconfirmed
        // one's place, never a confirmed one's.
        for i in 0..(10 * cap) as u16 {
            let st = if i % 2 == 0 {
                FlowState::TcpSynSent
            } else {
                FlowState::initial(Proto::Tcp, tcp_flags::ACK)
            };
            ct.insert(now, Family::V4, &t(30_000 + i), &bind(8080), st)
                .unwrap();
            assert!(ct.len() <= cap);
        }
        let s = ct.stats();
        assert_eq!(s.refused_total(), 0, "{s:?}");
        assert!(s.evicted[FlowClass::TcpSyn as usize] >= 1, "{s:?}");
        assert!(s.evicted[FlowClass::TcpMidstream as usize] >= 1, "{s:?}");
        assert_eq!(s.evicted_total(), (10 * cap) as u64, "{s:?}");
        for i in (0..cap as u16).step_by(2) {
            assert!(
                ct.lookup_original(now, Family::V4, &t(i), 0, false)
                    .is_some(),
                "confirmed flow {i} lost"
            );
            let r = ct.lookup_reply(now, Family::V4, &reply_of(i, 8080), 0, false);
            assert_eq!(
                r.map(|r| r.client_port),
                Some(i),
                "confirmed flow {i}'s replies"
            );
        }
        // Reverse entries went with their forward entries.
        let (fwd, rev) = entries(&ct);
        assert_eq!(fwd, rev);
    }

    #[test]
    fn a_shard_full_of_confirmed_flows_refuses_new_ones() {
        let ct = small(8);
        let cap = ct.capacity();
        let now = Now::from_secs(1);
        for i in 0..cap as u16 {
            ct.insert(now, Family::V4, &t(i), &bind(8080), FlowState::TcpSynSent)
                .unwrap();
            confirm(&ct, now, i, 8080);
        }
        let mut udp = t(60001);
        udp.proto = Proto::Udp;
        let new = [
            (t(60000), FlowState::TcpSynSent, FlowClass::TcpSyn),
            (t(60002), FlowState::TcpEstablished, FlowClass::TcpMidstream),
            (udp, FlowState::Unreplied, FlowClass::Udp),
        ];
        for (tuple, st, class) in new {
            for n in 1..=3 {
                assert_eq!(
                    ct.insert(now, Family::V4, &tuple, &bind(8080), st),
                    Err(InsertError::Full)
                );
                assert_eq!(ct.stats().refused[class as usize], n, "{class:?}");
            }
            assert!(ct
                .lookup_original(now, Family::V4, &tuple, 0, false)
                .is_none());
        }
        let s = ct.stats();
        assert_eq!(s.evicted_total(), 0, "{s:?}");
        assert_eq!(confirmed(&ct, now).len(), cap);
        // Room comes back as confirmed flows end: a RST'ed one expires.
        ct.lookup_reply(now, Family::V4, &reply_of(0, 8080), tcp_flags::RST, true)
            .unwrap();
        let later = now.plus_secs(u64::from(ct.timeouts().tcp_rst));
        ct.insert(
            later,
            Family::V4,
            &t(60000),
            &bind(8080),
            FlowState::TcpSynSent,
        )
        .unwrap();
        assert_eq!(ct.stats().expired, 1);
    }

    /// What confirms a flow, and what does not: a SYN-ACK or a RST from the
    /// backend (a spoofed SYN's or ACK's answer) leaves it unconfirmed,
    /// with its short timeout.
    #[test]
    fn only_an_accepted_connection_confirms_a_tcp_flow() {
        let ct = small(64);
        let to = *ct.timeouts();
        let now = Now::from_secs(10);
        let is_confirmed =
            |cport: u16, at: Now| confirmed(&ct, at).iter().any(|f| f.client_port == cport);
        let alive = |cport: u16, secs: u32| {
            ct.lookup_original(
                now.plus_secs(u64::from(secs)),
                Family::V4,
                &t(cport),
                0,
                false,
            )
            .is_some()
        };
        // 1: SYN, then the backend's SYN-ACK: answered, but not confirmed.
        ct.insert(now, Family::V4, &t(1), &bind(8080), FlowState::TcpSynSent)
            .unwrap();
        let synack = tcp_flags::SYN | tcp_flags::ACK;
        let h = ct.lookup_reply(now, Family::V4, &reply_of(1, 8080), synack, true);
        assert_eq!(h.unwrap().state, FlowState::TcpEstablished);
        assert!(!is_confirmed(1, now));
        assert!(alive(1, to.tcp_unconfirmed - 1));
        assert!(!alive(1, to.tcp_unconfirmed));
        // 2: picked up mid-stream; the backend answers with a RST.
        let mid = FlowState::initial(Proto::Tcp, tcp_flags::ACK);
        ct.insert(now, Family::V4, &t(2), &bind(8080), mid).unwrap();
        ct.lookup_reply(now, Family::V4, &reply_of(2, 8080), tcp_flags::RST, true)
            .unwrap();
        assert!(!is_confirmed(2, now));
        // 3: picked up mid-stream; the backend's ACK confirms it, and it
        // takes the established timeout.
        ct.insert(now, Family::V4, &t(3), &bind(8080), mid).unwrap();
        assert!(alive(3, to.tcp_unconfirmed - 1));
        confirm(&ct, now, 3, 8080);
        assert!(is_confirmed(3, now));
        assert!(alive(3, to.tcp_established - 1));
        assert!(!alive(3, to.tcp_established));
    }

    #[test]
    fn a_dsr_flow_is_confirmed_by_the_handshake_the_gateway_saw() {
        let ct = small(64);
        let now = Now::from_secs(10);
        let b = Binding {
            nat: FlowNat::Dsr {
                outer_src: v4_to_16([198, 18, 9, 9]),
            },
            ..bind(80)
        };
        let is_confirmed = |cport: u16| confirmed(&ct, now).iter().any(|f| f.client_port == cport);
        // SYN, then the client's ACK of the SYN-ACK the gateway never sees.
        ct.insert(now, Family::V4, &t(1), &b, FlowState::TcpSynSent)
            .unwrap();
        assert!(!is_confirmed(1));
        ct.lookup_original(now, Family::V4, &t(1), tcp_flags::ACK, true)
            .unwrap();
        assert!(is_confirmed(1));
        // Picked up mid-stream: its ACKs never confirm it.
        let mid = FlowState::initial(Proto::Tcp, tcp_flags::ACK);
        ct.insert(now, Family::V4, &t(2), &b, mid).unwrap();
        ct.lookup_original(now, Family::V4, &t(2), tcp_flags::ACK, true)
            .unwrap();
        assert!(!is_confirmed(2));
    }

    #[test]
    fn a_datagram_flow_is_confirmed_when_answered_and_still_active_two_seconds_in() {
        let ct = small(64);
        let start = Now::from_secs(100);
        let udp = |cport| FlowTuple {
            proto: Proto::Udp,
            ..t(cport)
        };
        let back = |cport| FlowTuple {
            proto: Proto::Udp,
            ..reply_of(cport, 53)
        };
        let is_confirmed =
            |cport: u16| confirmed(&ct, start).iter().any(|f| f.client_port == cport);
        for cport in [1, 2, 3] {
            ct.insert(
                start,
                Family::V4,
                &udp(cport),
                &bind(53),
                FlowState::Unreplied,
            )
            .unwrap();
        }
        // 1: one request, one answer (a DNS lookup).
        ct.lookup_reply(start, Family::V4, &back(1), 0, true)
            .unwrap();
        assert!(!is_confirmed(1));
        // 2: answered at once, and the client talks again 2 s in.
        ct.lookup_reply(start, Family::V4, &back(2), 0, true)
            .unwrap();
        ct.lookup_original(start.plus_secs(2), Family::V4, &udp(2), 0, true)
            .unwrap();
        assert!(is_confirmed(2));
        // 3: never answered, however long the client talks.
        ct.lookup_original(start.plus_secs(5), Family::V4, &udp(3), 0, true)
            .unwrap();
        assert!(!is_confirmed(3));
    }

    /// Two Services share an endpoint and one client port opens a flow to
    /// each: the second flow's reply tuple is the first's. It is refused
    /// while the first lives, and takes the tuple over once it is dead.
    #[test]
    fn a_routed_flow_never_takes_over_a_live_flows_reply_tuple() {
        let ct = small(64);
        let now = Now::from_secs(10);
        let first = t(4000);
        let second = FlowTuple {
            dst_addr: v4_to_16([198, 19, 0, 11]),
            ..first
        };
        ct.insert(now, Family::V4, &first, &bind(8080), FlowState::TcpSynSent)
            .unwrap();
        assert_eq!(
            ct.insert(now, Family::V4, &second, &bind(8080), FlowState::TcpSynSent),
            Err(InsertError::Clash)
        );
        assert_eq!(ct.stats().clashes, 1);
        let r = ct.lookup_reply(now, Family::V4, &reply_of(4000, 8080), 0, false);
        assert_eq!(
            r.unwrap().vip,
            first.dst_addr,
            "the first flow keeps its replies"
        );
        assert!(ct
            .lookup_original(now, Family::V4, &second, 0, false)
            .is_none());
        // The first flow is reset: its tuple is free for the second.
        ct.lookup_original(now, Family::V4, &first, tcp_flags::RST, true)
            .unwrap();
        ct.insert(now, Family::V4, &second, &bind(8080), FlowState::TcpSynSent)
            .unwrap();
        let r = ct.lookup_reply(now, Family::V4, &reply_of(4000, 8080), 0, false);
        assert_eq!(r.unwrap().vip, second.dst_addr);
        assert!(ct
            .lookup_original(now, Family::V4, &first, 0, false)
            .is_none());
        assert_eq!(entries(&ct), (1, 1));
    }

    #[test]
    fn expired_entries_are_evicted_first_and_swept() {
        let ct = small(8);
        let cap = ct.capacity();
        for i in 0..cap as u16 {
            ct.insert(
                Now::from_secs(1),
                Family::V4,
                &t(i),
                &bind(8080),
                FlowState::TcpSynSent,
            )
            .unwrap();
        }
        let mut cursor = 0;
        assert_eq!(ct.expire(Now::from_secs(1000), &mut cursor, 1), cap);
        assert!(ct.is_empty());
        assert_eq!(ct.stats().expired, cap as u64);
    }

    #[test]
    fn rebinding_replaces_both_directions() {
        let ct = small(64);
        let now = Now::from_secs(1);
        ct.insert(
            now,
            Family::V4,
            &t(7),
            &bind(8080),
            FlowState::TcpEstablished,
        )
        .unwrap();
        ct.insert(
            now,
            Family::V4,
            &t(7),
            &bind(9090),
            FlowState::TcpEstablished,
        )
        .unwrap();
        assert_eq!(ct.len(), 1);
        assert!(ct
            .lookup_reply(now, Family::V4, &reply_of(7, 8080), 0, false)
            .is_none());
        assert!(ct
            .lookup_reply(now, Family::V4, &reply_of(7, 9090), 0, false)
            .is_some());
    }

    #[test]
    fn ipv6_flows_are_tracked_apart() {
        let ct = small(64);
        let mut t6 = t(1);
        t6.src_addr = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        t6.dst_addr = "2001:db8::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let b = Binding {
            backend: "2001:db8:1::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            backend_port: 8080,
            frontend: 0,
            epoch: 1,
            backend_index: 0,
            nat: FlowNat::Routed,
        };
        ct.insert(
            Now::from_secs(1),
            Family::V6,
            &t6,
            &b,
            FlowState::TcpSynSent,
        )
        .unwrap();
        assert!(ct
            .lookup_original(Now::from_secs(1), Family::V4, &t6, 0, false)
            .is_none());
        let hit = ct
            .lookup_original(Now::from_secs(1), Family::V6, &t6, 0, false)
            .unwrap();
        assert_eq!(hit.backend, b.backend);
    }

    #[test]
    fn affinity_expires() {
        let ct = small(64);
        let c = v4_to_16([198, 18, 0, 1]);
        let v = v4_to_16([198, 19, 0, 10]);
        assert!(ct.affinity_set(
            Now::from_secs(0),
            &c,
            &v,
            80,
            Proto::Tcp,
            (v4_to_16([198, 18, 1, 1]), 8080),
            10
        ));
        assert!(ct
            .affinity_get(Now::from_secs(9), &c, &v, 80, Proto::Tcp)
            .is_some());
        assert!(ct
            .affinity_get(Now::from_secs(9), &c, &v, 81, Proto::Tcp)
            .is_none());
        assert!(ct
            .affinity_get(Now::from_secs(10), &c, &v, 80, Proto::Tcp)
            .is_none());
    }

    /// The prefetch hint derives bucket addresses from hashbrown's layout
    /// (control bytes at `ctrl`, bucket `i` at `ctrl - (i + 1) * size`). If a
    /// hashbrown upgrade changes that layout, this fails rather than the
    /// prefetches silently turning useless.
    #[test]
    fn prefetch_layout_matches_hashbrown() {
        let ct = small(4096);
        let now = Now::from_secs(1);
        for i in 0..2000u16 {
            ct.insert(
                now,
                Family::V4,
                &t(i),
                &bind(8080),
                FlowState::TcpEstablished,
            )
            .unwrap();
        }
        let tr = &ct.v4;
        let g = &tr.geometry[0];
        let (ctrl, mask) = (
            g.fwd_ctrl.load(Ordering::Relaxed),
            g.fwd_mask.load(Ordering::Relaxed),
        );
        let part = tr.parts[0].lock();
        let shard = &part.0.shards[0];
        assert_eq!(mask, shard.fwd.num_buckets() - 1);
        let size = std::mem::size_of::<Fwd<[u8; 4]>>();
        let mut at_home = 0;
        for e in shard.fwd.iter() {
            let h = tr.fwd_hash(&e.key());
            let idx = shard.fwd.find_bucket_index(h, is_fwd(&e.key())).unwrap();
            assert_eq!(
                ctrl_of(e, idx),
                ctrl,
                "every entry sits where the layout says"
            );
            if idx == (h as usize & mask) {
                at_home += 1;
            }
            let _ = size;
        }
        // Most entries are found in the first slot probed, which is what the
        // hint loads.
        assert!(
            at_home * 10 >= shard.fwd.len() * 7,
            "{at_home} of {} at their home slot",
            shard.fwd.len()
        );
    }

    /// Removals leave deleted-slot markers; when they use up a full shard's
    /// room, hashbrown would grow (allocate, double) the table on the next
    /// insert. The shard rebuilds itself at the planned size instead.
    #[test]
    fn churn_never_grows_a_shard() {
        let ct = small(512);
        let cap = ct.capacity();
        let buckets = |ct: &Conntrack| {
            let p = ct.v4.parts[0].lock();
            let s = &p.0.shards[0];
            (s.fwd.num_buckets(), s.rev.num_buckets())
        };
        let start = buckets(&ct);
        let mut now = Now::from_secs(1);
        let mut port = 0u16;
        for round in 0..40u64 {
            // Fill to the brim with short-lived flows, then let half expire.
            while ct.len() < cap {
                let st = if port.is_multiple_of(3) {
                    FlowState::TcpClosing
                } else {
                    FlowState::TcpReset
                };
                ct.insert(now, Family::V4, &t(port), &bind(8080), st)
                    .unwrap();
                port = port.wrapping_add(1);
            }
            now = now.plus_secs(11);
            let mut cursor = 0;
            ct.expire(now, &mut cursor, 1);
            assert_eq!(buckets(&ct), start, "round {round}: a shard grew");
        }
        assert!(ct.stats().inserts > 10 * cap as u64);
    }

    /// (forward entries, reverse entries) of the IPv4 tables.
    fn entries(ct: &Conntrack) -> (usize, usize) {
        let (mut f, mut r) = (0, 0);
        ct.v4.each_shard(|s| {
            f += s.fwd.len();
            r += s.rev.len();
        });
        (f, r)
    }

    fn client(i: u32) -> FlowTuple {
        FlowTuple {
            src_addr: v4_to_16([198, 18, 100 + (i >> 16) as u8, (i >> 8) as u8]),
            dst_addr: v4_to_16([198, 19, 0, 10]),
            src_port: 1000 + (i & 0xff) as u16,
            dst_port: 80,
            proto: Proto::Tcp,
        }
    }

    fn snat_reply(nat: FlowNat, bport: u16) -> FlowTuple {
        let FlowNat::Snat { addr, port } = nat else {
            panic!("not source-NATed: {nat:?}")
        };
        FlowTuple {
            src_addr: v4_to_16([198, 18, 1, 1]),
            dst_addr: addr,
            src_port: bport,
            dst_port: port,
            proto: Proto::Tcp,
        }
    }

    /// A flood of ten times the table's capacity, of every class, against
    /// routed and source-NATed flows that their backends confirmed (so the
    /// flood meets them in forward and in reverse shards): every confirmed
    /// flow keeps both its entries, and the table never holds more than its
    /// capacity.
    #[test]
    fn a_flood_of_ten_times_the_capacity_loses_no_confirmed_flow() {
        let ct = Conntrack::new(&Config {
            capacity: 1024,
            shards: 16,
            partitions: 1,
            affinity_capacity: 8,
            fragment_capacity: 8,
            timeouts: Timeouts::default(),
        });
        let cap = ct.capacity();
        let gw = [v4_to_16([198, 18, 2, 1])];
        let ports = PortRange::new(1024, 65_535).unwrap();
        let now = Now::from_secs(5);
        let mut kept = Vec::new();
        for i in 0..600u32 {
            let t = client(i);
            let nat = if i % 2 == 0 {
                ct.insert(now, Family::V4, &t, &bind(8080), FlowState::TcpSynSent)
                    .unwrap();
                FlowNat::Routed
            } else {
                ct.insert_snat(
                    now,
                    Family::V4,
                    &t,
                    &bind(8080),
                    FlowState::TcpSynSent,
                    &gw,
                    ports,
                )
                .unwrap()
            };
            let back = match nat {
                FlowNat::Snat { .. } => snat_reply(nat, 8080),
                _ => FlowTuple {
                    src_addr: v4_to_16([198, 18, 1, 1]),
                    dst_addr: t.src_addr,
                    src_port: 8080,
                    dst_port: t.src_port,
                    proto: Proto::Tcp,
                },
            };
            ct.lookup_reply(now, Family::V4, &back, tcp_flags::ACK, true)
                .unwrap();
            kept.push((t, nat, back));
        }
        assert_eq!(confirmed(&ct, now).len(), kept.len());
        let mut refused = 0u64;
        for n in 0..(10 * cap) as u32 {
            let mut t = client(100_000 + n);
            t.src_addr[13] = 200 + (n % 4) as u8;
            let (flags, proto) = match n % 4 {
                0 => (tcp_flags::SYN, Proto::Tcp),
                1 => (tcp_flags::ACK, Proto::Tcp),
                2 => (0, Proto::Udp),
                _ => (0, Proto::Sctp),
            };
            t.proto = proto;
            let st = FlowState::initial(proto, flags);
            let r = if n % 3 == 0 {
                ct.insert(now, Family::V4, &t, &bind(8080), st)
            } else {
                ct.insert_snat(now, Family::V4, &t, &bind(8080), st, &gw, ports)
                    .map(|_| ())
            };
            match r {
                Ok(()) => {}
                Err(InsertError::Full) => refused += 1,
                Err(e) => panic!("flood flow {n}: {e}"),
            }
            assert!(ct.len() <= cap, "after flood flow {n}");
        }
        for (t, nat, back) in &kept {
            let f = ct.lookup_original(now, Family::V4, t, 0, false);
            assert_eq!(f.map(|f| f.nat), Some(*nat), "{t:?} lost its forward entry");
            let r = ct.lookup_reply(now, Family::V4, back, 0, false).unwrap();
            assert_eq!(
                (r.client, r.client_port, r.vip),
                (t.src_addr, t.src_port, t.dst_addr)
            );
        }
        let s = ct.stats();
        assert_eq!(s.refused_total(), refused, "{s:?}");
        for c in [
            FlowClass::TcpSyn,
            FlowClass::TcpMidstream,
            FlowClass::Udp,
            FlowClass::Sctp,
        ] {
            assert!(s.evicted[c as usize] > 0, "{c:?} never evicted: {s:?}");
        }
        let (f, r) = entries(&ct);
        assert!(f <= cap && r <= cap, "{f} forward, {r} reverse entries");
    }

    /// Big shards free more per walk than the work one walk may leave for
    /// other shards ([`LATER_CAP`]): a walk cut short by that is not taken
    /// for a barren shard, so new source-NATed flows keep replacing
    /// unconfirmed ones within the same second, none refused.
    #[test]
    fn a_walk_cut_short_is_not_a_barren_shard() {
        let ct = Conntrack::new(&Config {
            capacity: 8192,
            shards: 2,
            partitions: 1,
            affinity_capacity: 8,
            fragment_capacity: 8,
            timeouts: Timeouts::default(),
        });
        let cap = ct.capacity();
        assert!(
            cap / 2 / 32 > LATER_CAP,
            "shards of {cap} too small for this test"
        );
        let gw = [v4_to_16([198, 18, 2, 1])];
        let ports = PortRange::new(1024, 65_535).unwrap();
        let now = Now::from_secs(5);
        for i in 0..(3 * cap) as u32 {
            let r = ct.insert_snat(
                now,
                Family::V4,
                &client(i),
                &bind(8080),
                FlowState::TcpSynSent,
                &gw,
                ports,
            );
            assert!(r.is_ok(), "flow {i}: {r:?}, {:?}", ct.stats());
        }
        let s = ct.stats();
        assert_eq!(s.refused_total(), 0, "{s:?}");
        assert!(s.evicted_total() >= (2 * cap) as u64, "{s:?}");
    }

    /// Under eviction pressure from source-NATed flows alone (whose reverse
    /// entries mostly live in other shards than their forward ones), every
    /// flow keeps exactly one reverse entry, and every reverse entry belongs
    /// to a live flow: a reply either finds its own client or nothing.
    #[test]
    fn snat_reverse_entries_go_with_their_flows_under_pressure() {
        let ct = Conntrack::new(&Config {
            capacity: 256,
            shards: 8,
            partitions: 1,
            affinity_capacity: 8,
            fragment_capacity: 8,
            timeouts: Timeouts::default(),
        });
        let gw = [v4_to_16([198, 18, 2, 1])];
        let ports = PortRange::new(1024, 65_535).unwrap();
        let now = Now::from_secs(5);
        let mut bound = Vec::new();
        for i in 0..3000u32 {
            let st = if i % 3 == 0 {
                FlowState::TcpEstablished
            } else {
                FlowState::TcpSynSent
            };
            let nat = ct
                .insert_snat(now, Family::V4, &client(i), &bind(8080), st, &gw, ports)
                .unwrap();
            bound.push((i, nat));
            let (f, r) = entries(&ct);
            assert_eq!(f, r, "after flow {i}: {f} forward, {r} reverse entries");
        }
        let s = ct.stats();
        assert!(s.evicted_total() > 0, "{s:?}");
        let (mut found, mut gone) = (0, 0);
        for (i, nat) in bound {
            let fwd = ct.lookup_original(now, Family::V4, &client(i), 0, false);
            let hit = ct.lookup_reply(now, Family::V4, &snat_reply(nat, 8080), 0, false);
            if fwd.is_some_and(|f| f.nat == nat) {
                // Live: its reply reaches it.
                found += 1;
                let h = hit.expect("a live flow's reply is found");
                assert_eq!(
                    (h.client, h.client_port),
                    (client(i).src_addr, client(i).src_port)
                );
            } else {
                // Gone: its port may serve a newer flow, never this one.
                gone += 1;
                assert!(hit.is_none_or(
                    |h| h.client_port != client(i).src_port || h.client != client(i).src_addr
                ));
            }
        }
        assert!(found > 100 && gone > 1000, "{found} found, {gone} gone");
    }

    /// Two threads open, answer, close and sweep source-NATed and routed
    /// flows in the same shards at once: nothing deadlocks (no thread ever
    /// holds two shard locks), and once they stop, forward and reverse
    /// entries are in step.
    #[test]
    fn concurrent_churn_keeps_both_directions_in_step() {
        let ct = Arc::new(Conntrack::new(&Config {
            capacity: 512,
            shards: 4,
            partitions: 1,
            affinity_capacity: 8,
            fragment_capacity: 8,
            timeouts: Timeouts {
                tcp_rst: 1,
                tcp_syn: 3,
                ..Timeouts::default()
            },
        }));
        let threads: Vec<_> = (0..2u32)
            .map(|w| {
                let ct = Arc::clone(&ct);
                std::thread::spawn(move || {
                    let gw = [v4_to_16([198, 18, 2, 1])];
                    let ports =
                        PortRange::new(20_000 + w as u16 * 100, 20_099 + w as u16 * 100).unwrap();
                    let mut cursor = 0;
                    for n in 0..20_000u32 {
                        let now = Now::from_secs(u64::from(n / 2000));
                        let i = (n * 7919 + w) % 1500;
                        let t = client(i);
                        match n % 5 {
                            0 | 1 => {
                                let _ = if i % 2 == 0 {
                                    ct.insert_snat(
                                        now,
                                        Family::V4,
                                        &t,
                                        &bind(8080),
                                        FlowState::TcpSynSent,
                                        &gw,
                                        ports,
                                    )
                                    .map(|_| ())
                                } else {
                                    ct.insert(
                                        now,
                                        Family::V4,
                                        &t,
                                        &bind(8080),
                                        FlowState::TcpSynSent,
                                    )
                                };
                            }
                            2 => {
                                if let Some(h) = ct.lookup_original(now, Family::V4, &t, 0, false) {
                                    let back = match h.nat {
                                        FlowNat::Snat { .. } => snat_reply(h.nat, 8080),
                                        _ => reply_of(t.src_port, 8080),
                                    };
                                    let mut back = back;
                                    if !matches!(h.nat, FlowNat::Snat { .. }) {
                                        back.dst_addr = t.src_addr;
                                    }
                                    let _ = ct.lookup_reply(
                                        now,
                                        Family::V4,
                                        &back,
                                        tcp_flags::SYN | tcp_flags::ACK,
                                        true,
                                    );
                                }
                            }
                            3 => {
                                let _ =
                                    ct.lookup_original(now, Family::V4, &t, tcp_flags::RST, true);
                            }
                            _ => {
                                ct.expire(now, &mut cursor, 1);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (f, r) = entries(&ct);
        assert_eq!(f, r, "{f} forward, {r} reverse entries");
        let mut cursor = 0;
        ct.expire(Now::from_secs(1_000_000), &mut cursor, 4);
        assert_eq!(entries(&ct), (0, 0), "everything expires, both ways");
    }

    /// DSR flows keep no reverse entry, and their TCP state comes from the
    /// client's flags alone.
    #[test]
    fn dsr_flows_are_one_way() {
        let ct = small(64);
        let now = Now::from_secs(1);
        let b = Binding {
            nat: FlowNat::Dsr {
                outer_src: v4_to_16([198, 18, 2, 1]),
            },
            ..bind(8080)
        };
        ct.insert(now, Family::V4, &t(9), &b, FlowState::TcpSynSent)
            .unwrap();
        assert_eq!(entries(&ct), (1, 0));
        let h = ct
            .lookup_original(now, Family::V4, &t(9), tcp_flags::ACK, true)
            .unwrap();
        assert_eq!(h.state, FlowState::TcpEstablished);
        assert_eq!(h.nat, b.nat);
        let h = ct
            .lookup_original(
                now,
                Family::V4,
                &t(9),
                tcp_flags::FIN | tcp_flags::ACK,
                true,
            )
            .unwrap();
        assert_eq!(h.state, FlowState::TcpClosing);
        assert!(ct
            .lookup_reply(now, Family::V4, &reply_of(9, 8080), 0, false)
            .is_none());
    }

    #[test]
    fn state_machine_table() {
        use tcp_flags::*;
        let cases = [
            (
                FlowState::TcpSynSent,
                true,
                SYN | ACK,
                FlowState::TcpEstablished,
            ),
            (FlowState::TcpSynSent, false, SYN, FlowState::TcpSynSent),
            (
                FlowState::TcpEstablished,
                false,
                FIN | ACK,
                FlowState::TcpClosing,
            ),
            (FlowState::TcpEstablished, true, RST, FlowState::TcpReset),
            (FlowState::TcpClosing, true, RST, FlowState::TcpReset),
            (FlowState::TcpReset, false, ACK, FlowState::TcpReset),
            (FlowState::TcpClosing, false, ACK, FlowState::TcpClosing),
            (FlowState::Unreplied, true, 0, FlowState::Replied),
            (FlowState::Unreplied, false, 0, FlowState::Unreplied),
        ];
        for (from, reply, flags, to) in cases {
            assert_eq!(
                from.advance(reply, flags),
                to,
                "{from:?} reply={reply} flags={flags:#x}"
            );
        }
        assert_eq!(FlowState::initial(Proto::Tcp, SYN), FlowState::TcpSynSent);
        assert_eq!(
            FlowState::initial(Proto::Tcp, ACK),
            FlowState::TcpEstablished
        );
        assert_eq!(FlowState::initial(Proto::Udp, 0), FlowState::Unreplied);
    }

    #[test]
    fn a_flow_snapshot_is_bounded_filtered_and_shard_by_shard() {
        let ct = Conntrack::new(&Config {
            capacity: 4096,
            shards: 16,
            partitions: 1,
            affinity_capacity: 64,
            fragment_capacity: 64,
            timeouts: Timeouts::default(),
        });
        let t0 = Now::from_secs(100);
        for i in 0..200u16 {
            let b = Binding {
                backend_port: if i % 2 == 0 { 8080 } else { 9090 },
                backend_index: u32::from(i % 2),
                ..bind(8080)
            };
            ct.insert(t0, Family::V4, &t(1000 + i), &b, FlowState::TcpSynSent)
                .unwrap();
        }
        // One source-NATed IPv6 flow.
        let v6 = FlowTuple {
            src_addr: "2001:2::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            dst_addr: "2001:2::10".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            src_port: 5555,
            dst_port: 80,
            proto: Proto::Udp,
        };
        let gw = "2001:2::99".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let nat = ct
            .insert_snat(
                t0,
                Family::V6,
                &v6,
                &bind(53),
                FlowState::Unreplied,
                &[gw],
                PortRange::new(2000, 2100).unwrap(),
            )
            .unwrap();
        // Ten seconds on, the first flow sees a packet.
        let t1 = Now::from_secs(110);
        ct.lookup_original(t1, Family::V4, &t(1000), tcp_flags::ACK, true)
            .unwrap();
        let t2 = Now::from_secs(115);

        let mut all = Vec::new();
        ct.snapshot_flows(t2, 10_000, &|_| true, &mut all);
        assert_eq!(all.len(), 201);
        let first = all.iter().find(|f| f.client_port == 1000).unwrap();
        assert_eq!((first.age_s, first.idle_s), (15, 5));
        assert_eq!(first.frontend, v4_to_16([198, 19, 0, 10]));
        assert_eq!(first.frontend_port, 80);
        assert_eq!(first.backend, v4_to_16([198, 18, 1, 1]));
        assert_eq!(first.nat, FlowNat::Routed);
        let other = all.iter().find(|f| f.client_port == 1001).unwrap();
        assert_eq!((other.age_s, other.idle_s), (15, 15));
        assert_eq!(other.state, FlowState::TcpSynSent);
        let last = all.last().unwrap();
        assert_eq!(
            (last.proto, last.nat, last.state),
            (Proto::Udp, nat, FlowState::Unreplied)
        );
        assert_eq!(last.client, v6.src_addr);

        // A limit stops the walk; a filter keeps only what it accepts.
        let mut some = Vec::new();
        ct.snapshot_flows(t2, 7, &|_| true, &mut some);
        assert_eq!(some.len(), 7);
        let mut nines = Vec::new();
        ct.snapshot_flows(t2, 1000, &|f| f.backend_port == 9090, &mut nines);
        assert_eq!(nines.len(), 100);
        assert!(nines.iter().all(|f| f.client_port % 2 == 1));

        // Expired flows are not shown (SYN sent: 60 s).
        let mut later = Vec::new();
        ct.snapshot_flows(Now::from_secs(165), 1000, &|_| true, &mut later);
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].client_port, 1000, "the flow touched at 110 s");
    }

    #[test]
    fn a_flow_snapshot_never_stops_the_workers() {
        // A worker keeps inserting and looking up while snapshots run: each
        // snapshot holds one shard at a time, so the worker never waits for a
        // whole walk, and it finishes its work while snapshots go on.
        let ct = std::sync::Arc::new(Conntrack::new(&Config {
            capacity: 1 << 14,
            shards: 64,
            partitions: 1,
            affinity_capacity: 64,
            fragment_capacity: 64,
            timeouts: Timeouts::default(),
        }));
        let now = Now::from_secs(1);
        for i in 0..8000u16 {
            ct.insert(
                now,
                Family::V4,
                &t(i),
                &bind(8080),
                FlowState::TcpEstablished,
            )
            .unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let walker = {
            let (ct, stop) = (std::sync::Arc::clone(&ct), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut walks = 0u32;
                let mut out = Vec::with_capacity(10_000);
                while !stop.load(Ordering::Relaxed) {
                    out.clear();
                    ct.snapshot_flows(now, 10_000, &|_| true, &mut out);
                    walks += 1;
                }
                walks
            })
        };
        let mut hits = 0u32;
        for round in 0..20u16 {
            for i in 0..8000u16 {
                if ct
                    .lookup_original(now, Family::V4, &t(i), tcp_flags::ACK, round % 2 == 0)
                    .is_some()
                {
                    hits += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let walks = walker.join().unwrap();
        assert_eq!(hits, 20 * 8000);
        assert!(walks > 0);
    }
}
