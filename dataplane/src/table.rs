//! The service table: frontends, backends and Maglev rings, immutable once built.
//!
//! Owns: [`Table`] and its flat records ([`FrontendRecord`], [`BackendRecord`],
//! ring slots as `u16`, a backend index within the frontend; [`PrefixRecord`]s
//! for source ranges, node prefixes and node-port addresses; [`LocalRecord`]s,
//! the per-node rings of `internalTrafficPolicy: Local` frontends). The
//! records are `#[repr(C)]` plain integers, so the shared-memory snapshot can
//! hold exactly these arrays; [`Table::assemble`] validates every length,
//! index and prefix before a table is used, whoever built it.
//! [`Table::build`] and [`Table::build_full`] make a table from a plain Rust
//! description ([`ServiceSpec`], [`TableSpec`]), computing the Maglev rings
//! (tests, benches, and control); [`Table::build_keeping`] keeps the ring
//! sizes of the table it replaces ([`RingSizes`]), as control does.
//!
//! Must never: change after construction, or panic on lookup. The lookup side
//! ([`Table::frontend`], [`Table::node_port`], [`Table::source_allowed`],
//! [`Table::client_node`], [`Table::pick`]) does not allocate.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use std::net::IpAddr;

use std::sync::Arc;

use hashbrown::{HashMap, HashTable};
use ipnet::IpNet;
use thiserror::Error;

use crate::flow::{addr16, client_hash, flow_hash, ip_from16, Addr16, FlowTuple, Proto};
use crate::maglev::{build_ring, ring_size_after, MaglevBackend, DEFAULT_MAX_RING_SIZE};
use crate::policy::{PolicyParts, PolicyTable};

/// Backends one frontend can have: ring slots are two-byte indices.
pub const MAX_BACKENDS_PER_FRONTEND: usize = 1 << 16;
/// The longest frontend name ([`ServiceSpec::name`]) a table holds, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// Frontend flag: ClientIP session affinity is on.
pub const FRONTEND_AFFINITY: u32 = 1;
/// Frontend flag: `internalTrafficPolicy: Local`. New flows go only to the
/// backends on the client's own node (the frontend's [`LocalRecord`]s); a
/// client whose node has none is dropped.
pub const FRONTEND_NODE_LOCAL: u32 = 2;
/// Frontend flag: `loadBalancerSourceRanges` apply. New flows are accepted
/// only from the frontend's source ranges (none of its family: from nowhere).
pub const FRONTEND_SOURCE_RANGES: u32 = 4;
/// Every frontend flag a reader knows.
pub const FRONTEND_FLAGS: u32 = FRONTEND_AFFINITY | FRONTEND_NODE_LOCAL | FRONTEND_SOURCE_RANGES;

/// Service kinds a frontend can come from (Kubernetes' exposure types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrontendKind {
    /// The Service's cluster IP.
    ClusterIp = 0,
    /// A node port.
    NodePort = 1,
    /// One of `spec.externalIPs`.
    ExternalIp = 2,
    /// A LoadBalancer ingress IP.
    LoadBalancer = 3,
}

/// How the replies of a frontend's flows come back (docs/operations.md,
/// "Return paths").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ReturnPath {
    /// Source NAT: the gateway rewrites the client's address and port to its
    /// own address and a port it allocates; replies come back to it.
    Snat = 0,
    /// Direct server return: the packet is encapsulated (IPIP or IPv6-in-IPv6)
    /// to the backend, which answers the client itself from the VIP.
    Dsr = 1,
    /// Destination NAT only: the backends route their replies through the
    /// gateway.
    Routed = 2,
}

impl ReturnPath {
    /// Every return path, in value order.
    pub const ALL: [Self; 3] = [Self::Snat, Self::Dsr, Self::Routed];

    /// The value of a `u8` in a [`FrontendRecord`], if it names one.
    #[must_use]
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Snat),
            1 => Some(Self::Dsr),
            2 => Some(Self::Routed),
            _ => None,
        }
    }

    /// The name used by the annotation, the flags and `show`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Dsr => "dsr",
            Self::Routed => "routed",
        }
    }
}

impl std::str::FromStr for ReturnPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snat" => Ok(Self::Snat),
            "dsr" => Ok(Self::Dsr),
            "routed" => Ok(Self::Routed),
            _ => Err(format!("{s:?} is not snat, dsr or routed")),
        }
    }
}

impl std::fmt::Display for ReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frontend: (address, port, protocol) and where its backends and ring lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct FrontendRecord {
    /// Virtual address, canonical 16-byte form.
    pub addr: Addr16,
    /// Virtual port.
    pub port: u16,
    /// IP protocol number (6, 17, 132).
    pub proto: u8,
    /// A [`FrontendKind`] value.
    pub kind: u8,
    /// `FRONTEND_*` flags.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (0 when affinity is off).
    pub affinity_timeout_s: u32,
    /// First backend of this frontend in the backend array.
    pub backends_start: u32,
    /// Number of backends (0: no endpoints, traffic is rejected).
    pub backends_len: u32,
    /// First slot of this frontend's Maglev ring in the ring array.
    pub ring_start: u32,
    /// Ring size M (0 when no backend takes new flows).
    pub ring_len: u32,
    /// A [`ReturnPath`] value.
    pub return_path: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// First of its source ranges in the source-range array
    /// ([`FRONTEND_SOURCE_RANGES`]).
    pub ranges_start: u32,
    /// Number of source ranges (0 without [`FRONTEND_SOURCE_RANGES`]).
    pub ranges_len: u32,
    /// First of its per-node rings in the local array ([`FRONTEND_NODE_LOCAL`]).
    pub locals_start: u32,
    /// Number of per-node rings (0 without [`FRONTEND_NODE_LOCAL`]).
    pub locals_len: u32,
}

/// An address prefix (CIDR): a source range, a node-port address range, or a
/// node's pod CIDR or address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PrefixRecord {
    /// The network address, canonical 16-byte form, host bits zero.
    pub addr: Addr16,
    /// Prefix length within its family (0..=32 for IPv4, 0..=128 for IPv6).
    pub len: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// The node it belongs to (node prefixes); zero elsewhere.
    pub node: u32,
}

impl PrefixRecord {
    /// The record of a prefix (host bits cleared), with `node`.
    #[must_use]
    pub fn new(net: IpNet, node: u32) -> Self {
        Self {
            addr: addr16(net.trunc().addr()),
            len: net.prefix_len(),
            reserved: [0; 3],
            node,
        }
    }

    /// The prefix as an [`IpNet`].
    #[must_use]
    pub fn net(&self) -> IpNet {
        IpNet::new_assert(ip_from16(self.addr), self.len.min(max_len(&self.addr)))
    }

    /// The prefix length counted over the 16-byte canonical form.
    #[inline]
    fn canonical_len(&self) -> u8 {
        if is_v4_mapped(&self.addr) {
            self.len.saturating_add(96)
        } else {
            self.len
        }
    }

    /// Does the canonical address `a` lie in this prefix (same family only)?
    #[inline]
    #[must_use]
    pub fn contains(&self, a: &Addr16) -> bool {
        is_v4_mapped(&self.addr) == is_v4_mapped(a) && masked(a, self.canonical_len()) == self.addr
    }
}

/// One node's share of an `internalTrafficPolicy: Local` frontend: a Maglev
/// ring over the frontend's backends on that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct LocalRecord {
    /// The node (as in the node prefixes).
    pub node: u32,
    /// First slot of this node's ring in the ring array. Its slots name
    /// backends local to the frontend, as the frontend's own ring does.
    pub ring_start: u32,
    /// Ring size (0: the node's backends take no new flows).
    pub ring_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Is `a` an IPv4 address in canonical form (`::ffff:a.b.c.d`)?
#[inline]
pub(crate) fn is_v4_mapped(a: &Addr16) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// The longest prefix of the family of `a`.
fn max_len(a: &Addr16) -> u8 {
    if is_v4_mapped(a) {
        32
    } else {
        128
    }
}

/// `a` with every bit after the first `bits` cleared.
#[inline]
pub(crate) fn masked(a: &Addr16, bits: u8) -> Addr16 {
    let bits = u32::from(bits.min(128));
    let v = u128::from_be_bytes(*a);
    let m = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    (v & m).to_be_bytes()
}

/// Backend state as the control plane saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BackendState {
    /// Ready: takes new flows.
    Ready = 0,
    /// Serving and terminating: used only when no endpoint is ready.
    Terminating = 1,
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BackendRecord {
    /// Endpoint address, canonical 16-byte form.
    pub addr: Addr16,
    /// Endpoint port (the resolved target port).
    pub port: u16,
    /// A [`BackendState`] value.
    pub state: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// Maglev weight; 0 = draining (keeps its flows, takes no new ones).
    pub weight: u32,
}

const _: () = {
    assert!(std::mem::size_of::<FrontendRecord>() == 64);
    assert!(std::mem::size_of::<BackendRecord>() == 24);
    assert!(std::mem::size_of::<PrefixRecord>() == 24);
    assert!(std::mem::size_of::<LocalRecord>() == 16);
};

/// A backend in a [`ServiceSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Endpoint address.
    pub addr: IpAddr,
    /// Endpoint port.
    pub port: u16,
    /// Maglev weight (0 = drain).
    pub weight: u32,
    /// Ready or terminating.
    pub state: BackendState,
    /// The node it runs on (a node of [`TableSpec::nodes`]), when known: only
    /// for `internalTrafficPolicy: Local` frontends.
    pub node: Option<u32>,
}

impl BackendSpec {
    /// A ready backend of weight 1, on no known node.
    #[must_use]
    pub fn ready(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            weight: 1,
            state: BackendState::Ready,
            node: None,
        }
    }

    /// The same backend on `node`.
    #[must_use]
    pub fn on_node(mut self, node: u32) -> Self {
        self.node = Some(node);
        self
    }
}

/// A frontend with its backends, as a plain Rust description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Virtual address.
    pub addr: IpAddr,
    /// Virtual port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Exposure kind.
    pub kind: FrontendKind,
    /// ClientIP affinity timeout, if affinity is on.
    pub affinity_timeout_s: Option<u32>,
    /// How replies come back.
    pub return_path: ReturnPath,
    /// Backends (empty: no endpoints).
    pub backends: Vec<BackendSpec>,
    /// `loadBalancerSourceRanges` of the frontend's family: `None` lets every
    /// source in; `Some` only sources in these (an empty list: none).
    pub source_ranges: Option<Vec<IpNet>>,
    /// `internalTrafficPolicy: Local`: a new flow goes only to a backend on
    /// the client's node ([`BackendSpec::node`], [`TableSpec::nodes`]).
    pub node_local: bool,
    /// What the frontend is for, for people: control writes
    /// `"namespace/name"` or `"namespace/name:port-name"` (the Service and
    /// its port's name). At most [`MAX_NAME_LEN`] bytes; `None` or `""`:
    /// unknown. Never used on the packet path ([`Table::frontend_name`]).
    pub name: Option<String>,
}

impl ServiceSpec {
    /// A ClusterIP frontend without affinity whose backends route their
    /// replies through the gateway ([`ReturnPath::Routed`]). Control's default
    /// return path is [`ReturnPath::Snat`]; it always says which it wants.
    #[must_use]
    pub fn cluster_ip(addr: IpAddr, port: u16, proto: Proto, backends: Vec<BackendSpec>) -> Self {
        Self {
            addr,
            port,
            proto,
            kind: FrontendKind::ClusterIp,
            affinity_timeout_s: None,
            return_path: ReturnPath::Routed,
            backends,
            source_ranges: None,
            node_local: false,
            name: None,
        }
    }

    /// The same frontend as another kind, on `addr` (the unspecified address
    /// of the family for [`FrontendKind::NodePort`]).
    #[must_use]
    pub fn with_kind(mut self, kind: FrontendKind, addr: IpAddr) -> Self {
        self.kind = kind;
        self.addr = addr;
        self
    }

    /// The same frontend with another return path.
    #[must_use]
    pub fn with_return_path(mut self, return_path: ReturnPath) -> Self {
        self.return_path = return_path;
        self
    }

    /// The same frontend with a name ([`ServiceSpec::name`]).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// Everything a table is built from: the frontends, and what the cluster's
/// nodes look like to the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSpec {
    /// The frontends.
    pub services: Vec<ServiceSpec>,
    /// Each node's pod CIDRs and addresses (as host prefixes), with its
    /// number: how `internalTrafficPolicy: Local` finds a client's node.
    pub nodes: Vec<(IpNet, u32)>,
    /// `--nodeport-addresses`: node-port frontends are served on the node's
    /// addresses within these (`0.0.0.0/0` and `::/0`: on every one).
    pub node_port_addresses: Vec<IpNet>,
    /// NetworkPolicy, compiled by control (empty: no policy, all allowed).
    pub policy: PolicyParts,
}

/// Which ring of a table: a frontend's own (`node: None`) or one of its
/// per-node rings. Frontends are unique by `(addr, port, proto)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingKey {
    /// The frontend's address, canonical form.
    pub addr: Addr16,
    /// The frontend's port.
    pub port: u16,
    /// The frontend's IP protocol number.
    pub proto: u8,
    /// The node of a per-node ring.
    pub node: Option<u32>,
}

/// The Maglev ring sizes of a table, by ring ([`Table::ring_sizes`]): what
/// [`Table::build_keeping`] keeps for the next table of the same frontends,
/// so that a backend added or removed does not change a ring's size (which
/// would remap nearly all its flows; `maglev::ring_size_after`). Rings of
/// size 0 (no backend taking new flows) are not listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingSizes(std::collections::BTreeMap<RingKey, u32>);

impl RingSizes {
    /// The size of `key`'s ring, if it had one.
    #[must_use]
    pub fn get(&self, key: &RingKey) -> Option<u32> {
        self.0.get(key).copied()
    }

    /// Records the size of `key`'s ring (0 removes it).
    pub fn insert(&mut self, key: RingKey, size: u32) {
        if size == 0 {
            self.0.remove(&key);
        } else {
            self.0.insert(key, size);
        }
    }

    /// How many rings are listed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No ring listed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a table could not be built or accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TableError {
    /// Two frontends with the same (address, port, protocol).
    #[error("frontend {addr}:{port}/{proto} appears twice")]
    DuplicateFrontend {
        /// Address.
        addr: IpAddr,
        /// Port.
        port: u16,
        /// Protocol name.
        proto: &'static str,
    },
    /// A backend of another IP family than its frontend.
    #[error("frontend {frontend}: backend {backend} is of another IP family")]
    FamilyMismatch {
        /// Frontend address.
        frontend: IpAddr,
        /// Backend address.
        backend: IpAddr,
    },
    /// A record holds a value out of range.
    #[error("frontend #{index}: {what}")]
    BadFrontend {
        /// Index in the frontend array.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A prefix record holds a value out of range, or a node prefix repeats.
    #[error("{section} #{index}: {what}")]
    BadPrefix {
        /// `"source range"`, `"node prefix"` or `"node-port address"`.
        section: &'static str,
        /// Index in its array.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A per-node ring record holds a value out of range.
    #[error("per-node ring #{index}: {what}")]
    BadLocal {
        /// Index in the per-node ring array.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A frontend's name is out of bounds, too long or not UTF-8.
    #[error("frontend #{index} name: {what}")]
    BadName {
        /// Index in the frontend array.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// The name offsets do not fit the frontends or the names.
    #[error("name offsets: {what}")]
    NameOffsets {
        /// What is wrong.
        what: String,
    },
    /// The compiled NetworkPolicy is refused.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The Maglev builder refused the backends.
    #[error("frontend {frontend}: {source}")]
    Maglev {
        /// Frontend address and port.
        frontend: String,
        /// The builder's error.
        source: crate::maglev::MaglevError,
    },
}

/// One frontend's part of a table: its record and the arrays only it uses,
/// in one immutable block. Tables share the blocks of frontends that did not
/// change ([`Table::apply_delta`], [`Table::adopt_unchanged`]), so a change
/// to one Service copies only its block, and the flows of the others keep
/// their binding without a look ([`Front::version`]).
///
/// In the block the record's starts are relative: its backends, source
/// ranges and per-node rings start at 0, its own ring at slot 0 of
/// `ring`, and its per-node rings' `ring_start` count within `ring` too.
/// It dereferences to its [`FrontendRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Front {
    record: FrontendRecord,
    ring: Box<[u16]>,
    backends: Box<[BackendRecord]>,
    ranges: Box<[PrefixRecord]>,
    locals: Box<[LocalRecord]>,
    name: Box<str>,
    /// Per backend, its policy backend record (`u32::MAX`: none); empty
    /// without policy. Not part of any ABI: computed by the table.
    policy_of: Box<[u32]>,
    version: u64,
}

impl std::ops::Deref for Front {
    type Target = FrontendRecord;
    fn deref(&self) -> &FrontendRecord {
        &self.record
    }
}

impl Front {
    /// The record (relative starts).
    #[must_use]
    pub fn record(&self) -> &FrontendRecord {
        &self.record
    }

    /// Its backends.
    #[must_use]
    pub fn backends(&self) -> &[BackendRecord] {
        &self.backends
    }

    /// Its ring slots: its own ring first, then its per-node rings.
    #[must_use]
    pub fn ring(&self) -> &[u16] {
        &self.ring
    }

    /// Its source ranges.
    #[must_use]
    pub fn ranges(&self) -> &[PrefixRecord] {
        &self.ranges
    }

    /// Its per-node rings.
    #[must_use]
    pub fn locals(&self) -> &[LocalRecord] {
        &self.locals
    }

    /// Its name (`""`: unknown).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The generation this block was made in. A flow bound under the same
    /// version (and frontend index) is still valid; another version means
    /// the frontend changed, and its flows are checked again.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The (address, port, protocol) that names it.
    #[must_use]
    pub fn key(&self) -> FrontKey {
        FrontKey {
            addr: self.record.addr,
            port: self.record.port,
            proto: self.record.proto,
        }
    }

    /// Same content (record, arrays, name) as `other`, whatever the version.
    fn same_as(&self, other: &Front) -> bool {
        self.record == other.record
            && self.ring == other.ring
            && self.backends == other.backends
            && self.ranges == other.ranges
            && self.locals == other.locals
            && self.name == other.name
    }
}

/// What names a frontend: (address, port, protocol). Frontends are unique
/// by it in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontKey {
    /// Address, canonical form.
    pub addr: Addr16,
    /// Port.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
}

/// The frontends of a table, in order ([`Table::frontends`]).
#[derive(Debug, Clone, Copy)]
pub struct Frontends<'a>(&'a [Arc<Front>]);

impl<'a> Frontends<'a> {
    /// How many.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frontend at `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<&'a Front> {
        self.0.get(i).map(|f| &**f)
    }

    /// In order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a Front> + 'a {
        self.0.iter().map(|f| &**f)
    }
}

impl PartialEq for Frontends<'_> {
    /// Same frontends in the same order, with the same content.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a.same_as(b))
    }
}

impl std::ops::Index<usize> for Frontends<'_> {
    type Output = Front;
    fn index(&self, i: usize) -> &Front {
        &self.0[i]
    }
}

impl<'a> IntoIterator for Frontends<'a> {
    type Item = &'a Front;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Arc<Front>>, fn(&Arc<Front>) -> &Front>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|f| &**f)
    }
}

/// The frontend index of a table: (address, port, protocol) → frontend
/// index, plus one address-only entry per virtual address. Shared by the
/// tables of a delta that moved no frontend.
#[derive(Debug)]
struct Index {
    table: HashTable<IndexSlot>,
    seed: u64,
    /// Where `table` lies (its control bytes; 0: empty) and its bucket
    /// mask, for [`Table::prefetch_frontend`].
    ctrl: usize,
    mask: usize,
}

/// An immutable service table. A clone shares its frontends' blocks, its
/// index and its policy.
#[derive(Debug, Clone)]
pub struct Table {
    generation: u64,
    hash_seed: u64,
    fronts: Vec<Arc<Front>>,
    node_prefixes: Vec<PrefixRecord>,
    node_port_prefixes: Vec<PrefixRecord>,
    index: Arc<Index>,
    /// Some frontend is a node port.
    has_node_ports: bool,
    /// Node prefixes by (IPv4, canonical length, network): the longest match
    /// is the client's node.
    nodes: HashMap<(bool, u8, Addr16), u32>,
    /// The canonical lengths in `nodes`, longest first.
    node_lens: Vec<(bool, u8)>,
    /// NetworkPolicy (empty: none).
    policy: Arc<PolicyTable>,
    /// Per frontend, the index of its first backend among all the table's
    /// backends in order ([`Table::backend_records`]), and after the last
    /// one their number.
    backend_bases: Box<[u32]>,
}

/// A change to a table: the frontends to remove, and those to add or
/// replace (a table of them alone; its node prefixes, node-port addresses
/// and policy are not used). What a delta snapshot carries.
#[derive(Debug)]
pub struct Delta {
    /// The generation it makes.
    pub generation: u64,
    /// The generation it applies to.
    pub base: u64,
    /// Frontends removed.
    pub removed: Vec<FrontKey>,
    /// Frontends added or replaced, whole.
    pub changed: Table,
}

/// The arrays of a [`Table`], as a snapshot carries them; see
/// [`Table::assemble`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableParts {
    /// Frontend records.
    pub frontends: Vec<FrontendRecord>,
    /// Backend records.
    pub backends: Vec<BackendRecord>,
    /// Ring slots (the frontends' rings, then the per-node rings).
    pub ring: Vec<u16>,
    /// Source ranges ([`FRONTEND_SOURCE_RANGES`]).
    pub source_ranges: Vec<PrefixRecord>,
    /// Per-node rings ([`FRONTEND_NODE_LOCAL`]).
    pub locals: Vec<LocalRecord>,
    /// Node prefixes, each naming its node.
    pub node_prefixes: Vec<PrefixRecord>,
    /// Node-port address ranges.
    pub node_port_prefixes: Vec<PrefixRecord>,
    /// Frontend `i`'s name is `names[name_offsets[i]..name_offsets[i + 1]]`
    /// (empty: unknown): one more offset than frontends, or none at all when
    /// no frontend has a name.
    pub name_offsets: Vec<u32>,
    /// The names, UTF-8, back to back.
    pub names: Vec<u8>,
    /// NetworkPolicy, compiled (empty: none).
    pub policy: PolicyParts,
}

/// A frontend index entry: the key inline, so a lookup reads one bucket.
#[derive(Debug, Clone, Copy)]
struct IndexSlot {
    addr: Addr16,
    port: u16,
    proto: u8,
    frontend: u32,
}

/// Checks a prefix record: length within its family, host bits zero,
/// reserved bytes zero.
pub(crate) fn check_prefix(p: &PrefixRecord) -> Result<(), String> {
    let max = max_len(&p.addr);
    if p.len > max {
        return Err(format!(
            "prefix length {} is longer than {max} ({})",
            p.len,
            ip_from16(p.addr)
        ));
    }
    if masked(&p.addr, p.canonical_len()) != p.addr {
        return Err(format!("{}/{} has host bits set", ip_from16(p.addr), p.len));
    }
    if p.reserved != [0; 3] {
        return Err("reserved bytes are not zero".to_owned());
    }
    Ok(())
}

/// Checks the frontend names of a table of `frontends` frontends: no
/// offsets (no names), or `frontends + 1` offsets from 0 to the end of
/// `names`, never going back, each name at most [`MAX_NAME_LEN`] bytes of
/// UTF-8.
fn check_names(frontends: usize, offsets: &[u32], names: Vec<u8>) -> Result<Box<str>, TableError> {
    let bad_offsets = |what| Err(TableError::NameOffsets { what });
    if offsets.is_empty() {
        if !names.is_empty() {
            return bad_offsets(format!("none, but the names hold {} bytes", names.len()));
        }
        return Ok(Box::default());
    }
    if offsets.len() != frontends + 1 {
        return bad_offsets(format!(
            "{} offsets for {frontends} frontends (expected 0 or {})",
            offsets.len(),
            frontends + 1
        ));
    }
    if offsets[0] != 0 {
        return bad_offsets(format!("the first offset is {}, expected 0", offsets[0]));
    }
    for (index, w) in offsets.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        let bad = |what| Err(TableError::BadName { index, what });
        if end < start {
            return bad(format!("offsets {start}..{end} go backwards"));
        }
        if end > names.len() {
            return bad(format!(
                "offsets {start}..{end} exceed the {} bytes of names",
                names.len()
            ));
        }
        if end - start > MAX_NAME_LEN {
            return bad(format!("{} bytes, at most {MAX_NAME_LEN}", end - start));
        }
        if let Err(e) = std::str::from_utf8(&names[start..end]) {
            return bad(format!(
                "bytes {start}..{end} are not UTF-8 (at byte {})",
                start + e.valid_up_to()
            ));
        }
    }
    let last = offsets[frontends] as usize;
    if last != names.len() {
        return bad_offsets(format!(
            "the last offset is {last}, but the names hold {} bytes",
            names.len()
        ));
    }
    // Each name is UTF-8 and they cover the blob: so is the blob.
    String::from_utf8(names)
        .map(String::into_boxed_str)
        .map_err(|e| TableError::NameOffsets {
            what: format!("the names are not UTF-8: {e}"),
        })
}

/// The unspecified address of a family: where node ports live in the table.
fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
}

/// Hash for the in-process frontend index (not part of any ABI): a folded
/// multiply over the address words, port and protocol.
#[inline]
fn key_hash(seed: u64, addr: &Addr16, port: u16, proto: u8) -> u64 {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&addr[..8]);
    hi.copy_from_slice(&addr[8..]);
    let mix = |a: u64, b: u64| {
        let x = u128::from(a) * u128::from(b);
        (x as u64) ^ ((x >> 64) as u64)
    };
    let tail = u64::from(port) << 8 | u64::from(proto);
    crate::conntrack::fmix64(mix(
        u64::from_ne_bytes(lo) ^ seed,
        u64::from_ne_bytes(hi) ^ tail ^ 0x9e37_79b9_7f4a_7c15,
    ))
}

/// Builds one frontend's block from its spec (`index`: its place, for
/// errors), keeping each ring's size from `previous` while it still serves
/// the ring's backends.
fn build_front(
    index: usize,
    s: &ServiceSpec,
    known_nodes: &std::collections::BTreeSet<u32>,
    max_ring: u32,
    previous: impl Fn(RingKey) -> Option<u32>,
    version: u64,
    mb: &mut Vec<MaglevBackend>,
) -> Result<Front, TableError> {
    let name = format!("{}:{}/{}", s.addr, s.port, s.proto.as_str());
    let label = s.name.as_deref().unwrap_or("");
    if label.len() > MAX_NAME_LEN {
        return Err(TableError::BadName {
            index,
            what: format!("{} bytes, at most {MAX_NAME_LEN}", label.len()),
        });
    }
    if s.backends.len() > MAX_BACKENDS_PER_FRONTEND {
        return Err(TableError::BadFrontend {
            index,
            what: format!(
                "{name}: {} backends, at most {MAX_BACKENDS_PER_FRONTEND} per frontend",
                s.backends.len()
            ),
        });
    }
    if s.kind == FrontendKind::NodePort && s.addr != unspecified(s.addr.is_ipv4()) {
        return Err(TableError::BadFrontend {
            index,
            what: format!(
                "a node port on {} (node ports are on 0.0.0.0 or ::)",
                s.addr
            ),
        });
    }
    let mut backends = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        if b.addr.is_ipv4() != s.addr.is_ipv4() {
            return Err(TableError::FamilyMismatch {
                frontend: s.addr,
                backend: b.addr,
            });
        }
        backends.push(BackendRecord {
            addr: addr16(b.addr),
            port: b.port,
            state: b.state as u8,
            reserved: 0,
            weight: b.weight,
        });
    }
    let key = |node| RingKey {
        addr: addr16(s.addr),
        port: s.port,
        proto: s.proto.ip_number(),
        node,
    };
    let mut ring: Vec<u16> = Vec::new();
    let mut ring_for = |members: &[usize], key: RingKey| -> Result<(u32, u32), TableError> {
        mb.clear();
        mb.extend(members.iter().map(|&i| {
            let b = &s.backends[i];
            MaglevBackend {
                addr: addr16(b.addr),
                port: b.port,
                weight: b.weight,
            }
        }));
        let start = ring.len() as u32;
        // Draining backends (weight 0) take no slots: not counted.
        let taking = mb.iter().filter(|b| b.weight > 0).count();
        if taking == 0 {
            return Ok((start, 0));
        }
        let m = ring_size_after(previous(key), taking, max_ring);
        let slots = build_ring(mb, m).map_err(|source| TableError::Maglev {
            frontend: name.clone(),
            source,
        })?;
        // Slots are two bytes: a frontend has at most 65 536 backends.
        ring.extend(slots.iter().map(|&b| members[b as usize] as u16));
        Ok((start, slots.len() as u32))
    };
    let all: Vec<usize> = (0..s.backends.len()).collect();
    let (ring_start, ring_len) = ring_for(&all, key(None))?;
    let mut flags = 0;
    if s.affinity_timeout_s.is_some() {
        flags |= FRONTEND_AFFINITY;
    }
    let mut locals = Vec::new();
    if s.node_local {
        flags |= FRONTEND_NODE_LOCAL;
        let mut by_node: std::collections::BTreeMap<u32, Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, b) in s.backends.iter().enumerate() {
            if let Some(n) = b.node {
                if !known_nodes.contains(&n) {
                    return Err(TableError::BadFrontend {
                        index,
                        what: format!(
                            "{name}: backend {} is on node {n}, which has no prefix",
                            b.addr
                        ),
                    });
                }
                by_node.entry(n).or_default().push(i);
            }
        }
        for (node, members) in by_node {
            let (ring_start, ring_len) = ring_for(&members, key(Some(node)))?;
            locals.push(LocalRecord {
                node,
                ring_start,
                ring_len,
                reserved: 0,
            });
        }
    }
    let mut ranges = Vec::new();
    if let Some(list) = &s.source_ranges {
        flags |= FRONTEND_SOURCE_RANGES;
        for r in list {
            if r.addr().is_ipv4() != s.addr.is_ipv4() {
                return Err(TableError::BadFrontend {
                    index,
                    what: format!("{name}: source range {r} is of another IP family"),
                });
            }
            ranges.push(PrefixRecord::new(*r, 0));
        }
    }
    Ok(Front {
        record: FrontendRecord {
            addr: addr16(s.addr),
            port: s.port,
            proto: s.proto.ip_number(),
            kind: s.kind as u8,
            flags,
            affinity_timeout_s: s.affinity_timeout_s.unwrap_or(0),
            backends_start: 0,
            backends_len: backends.len() as u32,
            ring_start,
            ring_len,
            return_path: s.return_path as u8,
            reserved: [0; 3],
            ranges_start: 0,
            ranges_len: ranges.len() as u32,
            locals_start: 0,
            locals_len: locals.len() as u32,
        },
        ring: ring.into_boxed_slice(),
        backends: backends.into_boxed_slice(),
        ranges: ranges.into_boxed_slice(),
        locals: locals.into_boxed_slice(),
        name: label.into(),
        policy_of: Box::default(),
        version,
    })
}

/// The frontend index of `fronts`.
fn build_index(generation: u64, fronts: &[Arc<Front>]) -> Result<Index, TableError> {
    let seed = (generation ^ 0x5851_f42d_4c95_7f2d) | 1 << 63;
    let mut index = HashTable::with_capacity(fronts.len());
    for (i, f) in fronts.iter().enumerate() {
        let h = key_hash(seed, &f.addr, f.port, f.proto);
        if index
            .find(h, |s: &IndexSlot| {
                s.addr == f.addr && s.port == f.port && s.proto == f.proto
            })
            .is_some()
        {
            return Err(TableError::DuplicateFrontend {
                addr: ip_from16(f.addr),
                port: f.port,
                proto: Proto::from_ip_number(f.proto).map_or("?", Proto::as_str),
            });
        }
        let slot = IndexSlot {
            addr: f.addr,
            port: f.port,
            proto: f.proto,
            frontend: i as u32,
        };
        index.insert_unique(h, slot, |s| key_hash(seed, &s.addr, s.port, s.proto));
        // One address-only entry (port 0, protocol 0, which no frontend
        // has) per virtual address, for `is_virtual_addr`.
        let virtual_kind =
            f.kind == FrontendKind::ClusterIp as u8 || f.kind == FrontendKind::LoadBalancer as u8;
        let ha = key_hash(seed, &f.addr, 0, 0);
        let any = |s: &IndexSlot| s.addr == f.addr && s.port == 0 && s.proto == 0;
        if virtual_kind && index.find(ha, any).is_none() {
            let slot = IndexSlot {
                port: 0,
                proto: 0,
                ..slot
            };
            index.insert_unique(ha, slot, |s| key_hash(seed, &s.addr, s.port, s.proto));
        }
    }
    // Where hashbrown put the index (a prefetch hint only; see
    // `conntrack::prefetch_layout_matches_hashbrown` for the layout).
    let (ctrl, mask) = index
        .iter()
        .next()
        .and_then(|s| {
            let h = key_hash(seed, &s.addr, s.port, s.proto);
            let i = index.find_bucket_index(h, |x| {
                x.addr == s.addr && x.port == s.port && x.proto == s.proto
            })?;
            Some((crate::conntrack::ctrl_of(s, i), index.num_buckets() - 1))
        })
        .unwrap_or((0, 0));
    Ok(Index {
        table: index,
        seed,
        ctrl,
        mask,
    })
}

/// Per frontend, the index of its first backend among all, then the total.
fn bases_of(fronts: &[Arc<Front>]) -> Box<[u32]> {
    let mut at = 0u32;
    let mut bases: Vec<u32> = fronts
        .iter()
        .map(|f| {
            let b = at;
            at = at.saturating_add(f.backends_len);
            b
        })
        .collect();
    bases.push(at);
    bases.into_boxed_slice()
}

/// Gives a block its backends' policy records under `policy`.
fn set_policy(f: &mut Arc<Front>, policy: &PolicyTable) {
    if policy.is_empty() && f.policy_of.is_empty() {
        return;
    }
    let of: Box<[u32]> = if policy.is_empty() {
        Box::default()
    } else {
        f.backends
            .iter()
            .map(|b| policy.backend_record(&b.addr).unwrap_or(u32::MAX))
            .collect()
    };
    Arc::make_mut(f).policy_of = of;
}

fn proto_of(p: u8) -> Result<Proto, DeltaError> {
    Proto::from_ip_number(p).ok_or(DeltaError::Table(TableError::BadFrontend {
        index: 0,
        what: format!("protocol {p} is not TCP, UDP or SCTP"),
    }))
}

/// Why a delta was refused ([`Table::apply_delta`]); the table it was for
/// stays in use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta is for another table.
    #[error("the delta applies to generation {base}, but generation {have} is in use")]
    Base {
        /// Its base.
        base: u64,
        /// Ours.
        have: u64,
    },
    /// The delta's generation does not follow.
    #[error("the delta makes generation {generation}, not above generation {have} in use")]
    Generation {
        /// Its generation.
        generation: u64,
        /// Ours.
        have: u64,
    },
    /// Another flow-hash seed.
    #[error("the delta's flow-hash seed is not the table's")]
    Seed,
    /// A removed frontend the table does not have (or removed twice).
    #[error("the delta removes {}:{}/{}, which the table does not have", ip_from16(.0.addr), .0.port, .0.proto)]
    NotThere(FrontKey),
    /// The table it would make is refused.
    #[error(transparent)]
    Table(TableError),
}

/// A frontend's key and kind: what its entries in the index depend on.
type KeyKind = (FrontKey, u8);

/// Builds tables from specs, rebuilding only the frontends whose spec
/// changed since the last build (control's side): an unchanged frontend's
/// block, ring included, is shared with the last table, and keeps its
/// version, so [`Table::delta_from`] leaves it out.
#[derive(Debug)]
pub struct Builder {
    hash_seed: u64,
    max_ring: u32,
    /// Ring sizes to keep for frontends not built yet by this builder (those
    /// of the snapshot published before a restart).
    sizes: RingSizes,
    /// Per frontend built: its spec, its block, and the generation that
    /// last wanted it.
    built: HashMap<FrontKey, (ServiceSpec, Arc<Front>, u64)>,
    /// The frontend keys and kinds of the last table, in order, and its
    /// index: the next table with the same ones shares it.
    last_index: Option<(Vec<KeyKind>, Arc<Index>)>,
    nodes: Vec<(IpNet, u32)>,
    policy: Arc<PolicyTable>,
}

impl Builder {
    /// A builder with nothing built yet; rings keep their size from `sizes`.
    #[must_use]
    pub fn new(hash_seed: u64, max_ring: u32, sizes: RingSizes) -> Self {
        Self {
            hash_seed,
            max_ring,
            sizes,
            built: HashMap::new(),
            last_index: None,
            nodes: Vec::new(),
            policy: Arc::new(PolicyTable::default()),
        }
    }

    /// The table of `spec` as generation `generation`: the same table
    /// [`Table::build_keeping`] makes (byte for byte in a snapshot), with
    /// the frontends whose spec did not change shared with the last one.
    /// When it fails, the blocks it built stay cached (they are what their
    /// specs give), and the last table's are still there.
    ///
    /// # Errors
    /// As [`Table::build_keeping`].
    pub fn build(&mut self, generation: u64, spec: &TableSpec) -> Result<Table, TableError> {
        let known_nodes: std::collections::BTreeSet<u32> =
            spec.nodes.iter().map(|(_, n)| *n).collect();
        let nodes_same = spec.nodes == self.nodes;
        let policy_same = self.policy.parts() == &spec.policy;
        let policy = if policy_same {
            Arc::clone(&self.policy)
        } else {
            Arc::new(PolicyTable::assemble(spec.policy.clone())?)
        };
        let mut mb = Vec::new();
        let mut fronts = Vec::with_capacity(spec.services.len());
        for (index, s) in spec.services.iter().enumerate() {
            let key = FrontKey {
                addr: addr16(s.addr),
                port: s.port,
                proto: s.proto.ip_number(),
            };
            let old = self.built.get_mut(&key);
            let reuse = old
                .as_ref()
                .is_some_and(|(was, _, _)| was == s && (nodes_same || !s.node_local));
            if reuse {
                // A node-local frontend checks its nodes: built again when
                // they change.
                if let Some((_, f, seen)) = old {
                    *seen = generation;
                    let mut front = Arc::clone(f);
                    if !policy_same {
                        set_policy(&mut front, &policy);
                        *f = Arc::clone(&front);
                    }
                    fronts.push(front);
                }
                continue;
            }
            let old = old.map(|(_, f, _)| Arc::clone(f));
            let front = {
                let sizes = &self.sizes;
                let previous = |k: RingKey| match &old {
                    Some(f) => match k.node {
                        None => Some(f.ring_len).filter(|&m| m > 0),
                        Some(n) => f
                            .locals
                            .iter()
                            .find(|l| l.node == n)
                            .map(|l| l.ring_len)
                            .filter(|&m| m > 0),
                    },
                    None => sizes.get(&k),
                };
                let mut f = Arc::new(build_front(
                    index,
                    s,
                    &known_nodes,
                    self.max_ring,
                    previous,
                    generation,
                    &mut mb,
                )?);
                set_policy(&mut f, &policy);
                f
            };
            self.built
                .insert(key, (s.clone(), Arc::clone(&front), generation));
            fronts.push(front);
        }
        let keys: Vec<KeyKind> = fronts.iter().map(|f| (f.key(), f.kind)).collect();
        let index = match &self.last_index {
            Some((k, index)) if *k == keys => Some(Arc::clone(index)),
            _ => None,
        };
        let table = Table::from_fronts_with(
            generation,
            self.hash_seed,
            fronts,
            spec.nodes
                .iter()
                .map(|(net, node)| PrefixRecord::new(*net, *node))
                .collect(),
            spec.node_port_addresses
                .iter()
                .map(|net| PrefixRecord::new(*net, 0))
                .collect(),
            Arc::clone(&policy),
            index,
        )?;
        self.last_index = Some((keys, Arc::clone(&table.index)));
        self.built.retain(|_, (_, _, seen)| *seen == generation);
        // Every frontend of the table is in `built` now: the sizes from
        // before a restart are not wanted again (a frontend removed and
        // added later starts afresh, as it would without the restart).
        self.sizes = RingSizes::default();
        self.nodes.clone_from(&spec.nodes);
        self.policy = policy;
        Ok(table)
    }

    /// The table `last` (the one this builder built last) becomes when only
    /// the frontends at the positions of `changed` may differ, each given
    /// with its spec now: their frontends stay where they are, with the
    /// same address, port, protocol and kind, and the node prefixes,
    /// node-port addresses and policy stay as they are. Costs the changed
    /// specs (a frontend whose spec is the one it was built from keeps its
    /// block) and one pointer per frontend; the index is shared.
    ///
    /// Returns `Ok(None)` when nothing changed, and [`Update::Reshaped`]
    /// when a change is not in place (a position past the end, or another
    /// frontend at it): then build the whole table with
    /// [`Builder::build`].
    ///
    /// # Errors
    /// As [`Table::build_keeping`], for the changed frontends.
    pub fn update<'s>(
        &mut self,
        generation: u64,
        last: &Table,
        changed: impl IntoIterator<Item = (usize, &'s ServiceSpec)>,
    ) -> Result<Update, TableError> {
        let known_nodes: std::collections::BTreeSet<u32> =
            self.nodes.iter().map(|(_, n)| *n).collect();
        let mut mb = Vec::new();
        let mut replaced: Vec<(usize, Arc<Front>)> = Vec::new();
        let mut built: Vec<(FrontKey, ServiceSpec, Arc<Front>)> = Vec::new();
        for (index, s) in changed {
            let key = FrontKey {
                addr: addr16(s.addr),
                port: s.port,
                proto: s.proto.ip_number(),
            };
            let Some(was) = last.fronts.get(index) else {
                return Ok(Update::Reshaped);
            };
            if was.key() != key || was.kind != s.kind as u8 {
                return Ok(Update::Reshaped);
            }
            if self
                .built
                .get(&key)
                .is_some_and(|(spec, f, _)| spec == s && Arc::ptr_eq(f, was))
            {
                continue;
            }
            let mut f = Arc::new(build_front(
                index,
                s,
                &known_nodes,
                self.max_ring,
                |k: RingKey| match k.node {
                    None => Some(was.ring_len).filter(|&m| m > 0),
                    Some(n) => was
                        .locals
                        .iter()
                        .find(|l| l.node == n)
                        .map(|l| l.ring_len)
                        .filter(|&m| m > 0),
                },
                generation,
                &mut mb,
            )?);
            set_policy(&mut f, &self.policy);
            built.push((key, s.clone(), Arc::clone(&f)));
            replaced.push((index, f));
        }
        if replaced.is_empty() {
            return Ok(Update::Unchanged);
        }
        for (key, spec, f) in built {
            self.built.insert(key, (spec, f, generation));
        }
        Ok(Update::Table(last.with_replaced(generation, replaced)))
    }
}

/// What [`Builder::update`] made.
#[derive(Debug)]
pub enum Update {
    /// The new table.
    Table(Table),
    /// Every changed spec is the one its frontend was built from.
    Unchanged,
    /// A change is not in place: build the whole table.
    Reshaped,
}

impl Table {
    /// An empty table (no services): every frame is passed to the kernel.
    #[must_use]
    pub fn empty(generation: u64) -> Self {
        Self::from_parts(generation, 0, Vec::new(), Vec::new(), Vec::new())
            .unwrap_or_else(|_| unreachable!("an empty table is always valid"))
    }

    /// Builds a table from plain descriptions, computing Maglev rings capped at
    /// [`DEFAULT_MAX_RING_SIZE`].
    ///
    /// # Errors
    /// Duplicate frontends, mixed IP families, or backends Maglev refuses.
    pub fn build(
        generation: u64,
        hash_seed: u64,
        services: &[ServiceSpec],
    ) -> Result<Self, TableError> {
        Self::build_with_cap(generation, hash_seed, services, DEFAULT_MAX_RING_SIZE)
    }

    /// As [`Table::build`], with a ring-size cap.
    ///
    /// # Errors
    /// As [`Table::build`].
    pub fn build_with_cap(
        generation: u64,
        hash_seed: u64,
        services: &[ServiceSpec],
        max_ring: u32,
    ) -> Result<Self, TableError> {
        let spec = TableSpec {
            services: services.to_vec(),
            ..TableSpec::default()
        };
        Self::build_full(generation, hash_seed, &spec, max_ring)
    }

    /// Builds a table from a whole [`TableSpec`]: frontends of every kind,
    /// with their source ranges and per-node rings, the nodes' prefixes and
    /// the node-port addresses.
    ///
    /// # Errors
    /// As [`Table::build`]; also a source range of another family than its
    /// frontend, a backend on a node that has no prefix, or a node prefix
    /// given twice.
    pub fn build_full(
        generation: u64,
        hash_seed: u64,
        spec: &TableSpec,
        max_ring: u32,
    ) -> Result<Self, TableError> {
        Self::build_keeping(generation, hash_seed, spec, max_ring, &RingSizes::default())
    }

    /// As [`Table::build_full`], keeping each ring's size from `previous`
    /// (usually [`Table::ring_sizes`] of the table this one replaces) while
    /// that size still serves the ring's backends
    /// (`maglev::ring_size_after`). The same spec and the same `previous`
    /// always give the same table, byte for byte.
    ///
    /// # Errors
    /// As [`Table::build_full`].
    pub fn build_keeping(
        generation: u64,
        hash_seed: u64,
        spec: &TableSpec,
        max_ring: u32,
        previous: &RingSizes,
    ) -> Result<Self, TableError> {
        let known_nodes: std::collections::BTreeSet<u32> =
            spec.nodes.iter().map(|(_, n)| *n).collect();
        let mut mb = Vec::new();
        let fronts = spec
            .services
            .iter()
            .enumerate()
            .map(|(index, s)| {
                build_front(
                    index,
                    s,
                    &known_nodes,
                    max_ring,
                    |key| previous.get(&key),
                    generation,
                    &mut mb,
                )
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = Arc::new(PolicyTable::assemble(spec.policy.clone())?);
        let mut fronts = fronts;
        for f in &mut fronts {
            set_policy(f, &policy);
        }
        Self::from_fronts(
            generation,
            hash_seed,
            fronts,
            spec.nodes
                .iter()
                .map(|(net, node)| PrefixRecord::new(*net, *node))
                .collect(),
            spec.node_port_addresses
                .iter()
                .map(|net| PrefixRecord::new(*net, 0))
                .collect(),
            policy,
        )
    }

    /// Accepts the three frontend arrays alone (no source ranges, per-node
    /// rings, node prefixes or node-port addresses); see [`Table::assemble`].
    ///
    /// # Errors
    /// As [`Table::assemble`].
    pub fn from_parts(
        generation: u64,
        hash_seed: u64,
        frontends: Vec<FrontendRecord>,
        backends: Vec<BackendRecord>,
        ring: Vec<u16>,
    ) -> Result<Self, TableError> {
        Self::assemble(
            generation,
            hash_seed,
            TableParts {
                frontends,
                backends,
                ring,
                ..TableParts::default()
            },
        )
    }

    /// Accepts flat arrays (for example from a snapshot) after checking every
    /// range and index, and builds the frontend and node indexes.
    ///
    /// # Errors
    /// The first record that is out of range, a duplicate frontend, or a
    /// duplicate node prefix.
    pub fn assemble(
        generation: u64,
        hash_seed: u64,
        parts: TableParts,
    ) -> Result<Self, TableError> {
        let TableParts {
            frontends,
            backends,
            ring,
            source_ranges,
            locals,
            node_prefixes,
            node_port_prefixes,
            name_offsets,
            names,
            policy,
        } = parts;
        let names = check_names(frontends.len(), &name_offsets, names)?;
        let policy = PolicyTable::assemble(policy)?;
        let bad = |index: usize, what: String| TableError::BadFrontend { index, what };
        for (section, list, names_nodes) in [
            ("source range", &source_ranges, false),
            ("node prefix", &node_prefixes, true),
            ("node-port address", &node_port_prefixes, false),
        ] {
            for (index, p) in list.iter().enumerate() {
                let bad_prefix = |what| TableError::BadPrefix {
                    section,
                    index,
                    what,
                };
                check_prefix(p).map_err(bad_prefix)?;
                if !names_nodes && p.node != 0 {
                    return Err(bad_prefix(format!(
                        "names node {} (only node prefixes name one)",
                        p.node
                    )));
                }
            }
        }
        if let Some((index, l)) = locals.iter().enumerate().find(|(_, l)| l.reserved != 0) {
            return Err(TableError::BadLocal {
                index,
                what: format!("reserved is {}, expected 0", l.reserved),
            });
        }
        let check_ring = |i: usize, what: &str, start: u32, len: u32, backends_len: u32| {
            let r_end = u64::from(start) + u64::from(len);
            if r_end > ring.len() as u64 {
                return Err(bad(
                    i,
                    format!("{what} {start}..{r_end} exceeds {}", ring.len()),
                ));
            }
            if len > 0 && backends_len == 0 {
                return Err(bad(i, format!("a {what} without backends")));
            }
            let slots = &ring[start as usize..r_end as usize];
            if let Some(s) = slots.iter().find(|&&s| u32::from(s) >= backends_len) {
                return Err(bad(
                    i,
                    format!("{what} slot names backend {s} of {backends_len}"),
                ));
            }
            Ok(())
        };
        for (i, f) in frontends.iter().enumerate() {
            if Proto::from_ip_number(f.proto).is_none() {
                return Err(bad(
                    i,
                    format!("protocol {} is not TCP, UDP or SCTP", f.proto),
                ));
            }
            if f.kind > FrontendKind::LoadBalancer as u8 {
                return Err(bad(i, format!("kind {} is unknown", f.kind)));
            }
            let v4 = ip_from16(f.addr).is_ipv4();
            if f.kind == FrontendKind::NodePort as u8 && ip_from16(f.addr) != unspecified(v4) {
                return Err(bad(
                    i,
                    format!(
                        "a node port on {} (node ports are on 0.0.0.0 or ::)",
                        ip_from16(f.addr)
                    ),
                ));
            }
            if f.flags & !FRONTEND_FLAGS != 0 {
                return Err(bad(i, format!("flags {:#x} name unknown bits", f.flags)));
            }
            if ReturnPath::from_u8(f.return_path).is_none() {
                return Err(bad(i, format!("return path {} is unknown", f.return_path)));
            }
            if f.reserved != [0; 3] {
                return Err(bad(i, "reserved bytes are not zero".to_owned()));
            }
            let b_end = u64::from(f.backends_start) + u64::from(f.backends_len);
            if b_end > backends.len() as u64 {
                return Err(bad(
                    i,
                    format!(
                        "backends {}..{b_end} exceed {}",
                        f.backends_start,
                        backends.len()
                    ),
                ));
            }
            check_ring(i, "ring", f.ring_start, f.ring_len, f.backends_len)?;
            let own = &backends[f.backends_start as usize..b_end as usize];
            if let Some(b) = own.iter().find(|b| ip_from16(b.addr).is_ipv4() != v4) {
                return Err(TableError::FamilyMismatch {
                    frontend: ip_from16(f.addr),
                    backend: ip_from16(b.addr),
                });
            }
            if let Some(b) = own
                .iter()
                .find(|b| b.state > BackendState::Terminating as u8)
            {
                return Err(bad(i, format!("backend state {} is unknown", b.state)));
            }
            // Source ranges: only with the flag, within the array, same family.
            let g_end = u64::from(f.ranges_start) + u64::from(f.ranges_len);
            if f.flags & FRONTEND_SOURCE_RANGES == 0 && f.ranges_len > 0 {
                return Err(bad(
                    i,
                    "source ranges without the source-range flag".to_owned(),
                ));
            }
            if g_end > source_ranges.len() as u64 {
                return Err(bad(
                    i,
                    format!(
                        "source ranges {}..{g_end} exceed {}",
                        f.ranges_start,
                        source_ranges.len()
                    ),
                ));
            }
            if let Some(r) = source_ranges[f.ranges_start as usize..g_end as usize]
                .iter()
                .find(|r| is_v4_mapped(&r.addr) != v4)
            {
                return Err(bad(
                    i,
                    format!("source range {} is of another IP family", r.net()),
                ));
            }
            // Per-node rings: only with the flag, within the array, sorted
            // by node, each ring within the ring array.
            let l_end = u64::from(f.locals_start) + u64::from(f.locals_len);
            if f.flags & FRONTEND_NODE_LOCAL == 0 && f.locals_len > 0 {
                return Err(bad(
                    i,
                    "per-node rings without the node-local flag".to_owned(),
                ));
            }
            if l_end > locals.len() as u64 {
                return Err(bad(
                    i,
                    format!(
                        "per-node rings {}..{l_end} exceed {}",
                        f.locals_start,
                        locals.len()
                    ),
                ));
            }
            let mine = &locals[f.locals_start as usize..l_end as usize];
            if mine.windows(2).any(|w| w[0].node >= w[1].node) {
                return Err(bad(i, "per-node rings are not sorted by node".to_owned()));
            }
            for l in mine {
                check_ring(i, "per-node ring", l.ring_start, l.ring_len, f.backends_len)?;
            }
        }
        let policy = Arc::new(policy);
        let fronts = frontends
            .iter()
            .enumerate()
            .map(|(i, f)| {
                // Validated above: every range lies within its array.
                let cut = |start: u32, len: u32| start as usize..(start + len) as usize;
                let mut locals: Box<[LocalRecord]> =
                    locals[cut(f.locals_start, f.locals_len)].into();
                // Per-node rings move into the block: a frontend's rings lie
                // where the writer put them, so each is copied after its own.
                let mut own_ring: Vec<u16> = ring[cut(f.ring_start, f.ring_len)].to_vec();
                for l in locals.iter_mut() {
                    let at = own_ring.len() as u32;
                    own_ring.extend_from_slice(&ring[cut(l.ring_start, l.ring_len)]);
                    l.ring_start = at;
                }
                let name = if name_offsets.is_empty() {
                    ""
                } else {
                    &names[name_offsets[i] as usize..name_offsets[i + 1] as usize]
                };
                Arc::new(Front {
                    record: FrontendRecord {
                        backends_start: 0,
                        ring_start: 0,
                        ranges_start: 0,
                        locals_start: 0,
                        ..*f
                    },
                    ring: own_ring.into_boxed_slice(),
                    backends: backends[cut(f.backends_start, f.backends_len)].into(),
                    ranges: source_ranges[cut(f.ranges_start, f.ranges_len)].into(),
                    locals,
                    name: name.into(),
                    policy_of: Box::default(),
                    version: generation,
                })
            })
            .collect::<Vec<_>>();
        let mut fronts = fronts;
        for f in &mut fronts {
            set_policy(f, &policy);
        }
        Self::from_fronts(
            generation,
            hash_seed,
            fronts,
            node_prefixes,
            node_port_prefixes,
            policy,
        )
    }

    /// A table of `fronts`, with the cluster's node prefixes, node-port
    /// addresses and policy: builds the frontend and node indexes. The
    /// blocks are taken as they are (built here, or split from checked
    /// arrays by [`Table::assemble`]).
    ///
    /// # Errors
    /// A duplicate frontend, or a node prefix given for two nodes.
    fn from_fronts(
        generation: u64,
        hash_seed: u64,
        fronts: Vec<Arc<Front>>,
        node_prefixes: Vec<PrefixRecord>,
        node_port_prefixes: Vec<PrefixRecord>,
        policy: Arc<PolicyTable>,
    ) -> Result<Self, TableError> {
        Self::from_fronts_with(
            generation,
            hash_seed,
            fronts,
            node_prefixes,
            node_port_prefixes,
            policy,
            None,
        )
    }

    /// [`Table::from_fronts`], sharing `index` when given: the index of a
    /// table whose frontends had the same keys and kinds in the same order.
    fn from_fronts_with(
        generation: u64,
        hash_seed: u64,
        fronts: Vec<Arc<Front>>,
        node_prefixes: Vec<PrefixRecord>,
        node_port_prefixes: Vec<PrefixRecord>,
        policy: Arc<PolicyTable>,
        index: Option<Arc<Index>>,
    ) -> Result<Self, TableError> {
        let index = match index {
            Some(i) => i,
            None => Arc::new(build_index(generation, &fronts)?),
        };
        let mut nodes = HashMap::with_capacity(node_prefixes.len());
        let mut node_lens = Vec::new();
        for (i, p) in node_prefixes.iter().enumerate() {
            let key = (is_v4_mapped(&p.addr), p.canonical_len(), p.addr);
            // The same prefix twice for one node is harmless; for two nodes
            // it would make the client's node a matter of order.
            if let Some(other) = nodes.insert(key, p.node).filter(|&o| o != p.node) {
                return Err(TableError::BadPrefix {
                    section: "node prefix",
                    index: i,
                    what: format!(
                        "{} is already a prefix of node {other} (now node {})",
                        p.net(),
                        p.node
                    ),
                });
            }
            if !node_lens.contains(&(key.0, key.1)) {
                node_lens.push((key.0, key.1));
            }
        }
        node_lens.sort_by_key(|&(_, len)| std::cmp::Reverse(len));
        Ok(Self {
            generation,
            hash_seed,
            has_node_ports: fronts
                .iter()
                .any(|f| f.kind == FrontendKind::NodePort as u8),
            backend_bases: bases_of(&fronts),
            fronts,
            node_prefixes,
            node_port_prefixes,
            index,
            nodes,
            node_lens,
            policy,
        })
    }

    /// The same policy as `prev` (most often the very same one, shared).
    fn same_policy(&self, prev: &Table) -> bool {
        Arc::ptr_eq(&self.policy, &prev.policy) || self.policy.parts() == prev.policy.parts()
    }

    /// Everything but the generation is `prev`'s: the same seed, node
    /// prefixes, node-port addresses and policy, and the very same frontend
    /// blocks (shared, as [`Builder`] shares a frontend whose spec did not
    /// change) in the same order. Such a table need not be published.
    #[must_use]
    pub fn same_blocks(&self, prev: &Table) -> bool {
        self.hash_seed == prev.hash_seed
            && self.node_prefixes == prev.node_prefixes
            && self.node_port_prefixes == prev.node_port_prefixes
            && self.same_policy(prev)
            && self.fronts.len() == prev.fronts.len()
            && self
                .fronts
                .iter()
                .zip(&prev.fronts)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// This table as `generation`, with the frontends at the positions of
    /// `replaced` replaced (same keys and kinds: the index is shared).
    fn with_replaced(&self, generation: u64, replaced: Vec<(usize, Arc<Front>)>) -> Self {
        let mut fronts = self.fronts.clone();
        for (i, f) in replaced {
            debug_assert_eq!(fronts[i].key(), f.key());
            fronts[i] = f;
        }
        Self {
            generation,
            hash_seed: self.hash_seed,
            has_node_ports: self.has_node_ports,
            backend_bases: bases_of(&fronts),
            fronts,
            node_prefixes: self.node_prefixes.clone(),
            node_port_prefixes: self.node_port_prefixes.clone(),
            index: Arc::clone(&self.index),
            nodes: self.nodes.clone(),
            node_lens: self.node_lens.clone(),
            policy: Arc::clone(&self.policy),
        }
    }

    /// The table `delta` makes of this one: its removed frontends gone, its
    /// changed ones added or replaced, every other frontend's block shared
    /// (and so its version kept: its flows are not looked at again). Costs
    /// the changed blocks and one pointer per frontend; the frontend index is
    /// shared too when no frontend was added or removed.
    ///
    /// # Errors
    /// A delta for another base generation or flow-hash seed, a generation
    /// that does not grow, a removed frontend this table does not have, or a
    /// changed one that makes a frontend appear twice.
    pub fn apply_delta(&self, delta: &Delta) -> Result<Self, DeltaError> {
        if delta.base != self.generation {
            return Err(DeltaError::Base {
                base: delta.base,
                have: self.generation,
            });
        }
        if delta.generation <= self.generation || delta.changed.generation != delta.generation {
            return Err(DeltaError::Generation {
                generation: delta.generation,
                have: self.generation,
            });
        }
        if delta.changed.hash_seed != self.hash_seed {
            return Err(DeltaError::Seed);
        }
        let mut fronts = self.fronts.clone();
        let mut moved = false;
        let mut gone = vec![false; fronts.len()];
        for k in &delta.removed {
            match self.frontend(&k.addr, k.port, proto_of(k.proto)?) {
                Some(fi) if !gone[fi as usize] => gone[fi as usize] = true,
                _ => return Err(DeltaError::NotThere(*k)),
            }
            moved = true;
        }
        let mut added = Vec::new();
        for f in &delta.changed.fronts {
            let mut f = Arc::clone(f);
            set_policy(&mut f, &self.policy);
            match self.frontend(&f.addr, f.port, proto_of(f.proto)?) {
                Some(fi) if !gone[fi as usize] => {
                    // A node port stays a node port: the kind is part of
                    // the address rule the index enforces.
                    if fronts[fi as usize].kind != f.kind {
                        moved = true;
                    }
                    fronts[fi as usize] = f;
                }
                _ => {
                    added.push(f);
                    moved = true;
                }
            }
        }
        if moved {
            let mut i = 0;
            fronts.retain(|_| {
                i += 1;
                !gone[i - 1]
            });
            fronts.extend(added);
        }
        let index = if moved {
            Arc::new(build_index(delta.generation, &fronts).map_err(DeltaError::Table)?)
        } else {
            Arc::clone(&self.index)
        };
        Ok(Self {
            generation: delta.generation,
            hash_seed: self.hash_seed,
            has_node_ports: fronts
                .iter()
                .any(|f| f.kind == FrontendKind::NodePort as u8),
            backend_bases: bases_of(&fronts),
            fronts,
            node_prefixes: self.node_prefixes.clone(),
            node_port_prefixes: self.node_port_prefixes.clone(),
            index,
            nodes: self.nodes.clone(),
            node_lens: self.node_lens.clone(),
            policy: Arc::clone(&self.policy),
        })
    }

    /// The delta from `prev` to this table: the frontends this one lacks,
    /// and the blocks this one does not share with `prev`. `None` when the
    /// rest differs (nodes, node-port addresses, policy, seed): then only a
    /// full snapshot says it.
    #[must_use]
    pub fn delta_from(&self, prev: &Table) -> Option<Delta> {
        if self.hash_seed != prev.hash_seed
            || self.node_prefixes != prev.node_prefixes
            || self.node_port_prefixes != prev.node_port_prefixes
            || !self.same_policy(prev)
            || self.generation <= prev.generation
        {
            return None;
        }
        // The same frontends at the same places (most changes): no lookups.
        let same_places = self.fronts.len() == prev.fronts.len()
            && self
                .fronts
                .iter()
                .zip(&prev.fronts)
                .all(|(a, b)| a.key() == b.key());
        let mut removed = Vec::new();
        if !same_places {
            for f in &prev.fronts {
                if self
                    .frontend(&f.addr, f.port, Proto::from_ip_number(f.proto)?)
                    .is_none()
                {
                    removed.push(f.key());
                }
            }
        }
        let changed: Vec<Arc<Front>> = self
            .fronts
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                let before = if same_places {
                    prev.fronts.get(*i).map(|p| &**p)
                } else {
                    Proto::from_ip_number(f.proto)
                        .and_then(|p| prev.frontend(&f.addr, f.port, p))
                        .map(|pi| &*prev.fronts[pi as usize])
                };
                before.is_none_or(|p| p.version != f.version)
            })
            .map(|(_, f)| Arc::clone(f))
            .collect();
        let changed = Self::from_fronts(
            self.generation,
            self.hash_seed,
            changed,
            Vec::new(),
            Vec::new(),
            Arc::new(PolicyTable::default()),
        )
        .ok()?;
        Some(Delta {
            generation: self.generation,
            base: prev.generation,
            removed,
            changed,
        })
    }

    /// Shares `prev`'s block for every frontend whose content did not
    /// change (and so keeps its version: its flows are not looked at
    /// again). For a full snapshot that replaces `prev`; off the packet
    /// path, once per table, before it is published.
    pub fn adopt_unchanged(&mut self, prev: &Table) {
        if self.policy.parts() != prev.policy.parts() {
            return;
        }
        for f in &mut self.fronts {
            let Some(p) = Proto::from_ip_number(f.proto) else {
                continue;
            };
            if let Some(pi) = prev.frontend(&f.addr, f.port, p) {
                let old = &prev.fronts[pi as usize];
                if old.same_as(f) {
                    *f = Arc::clone(old);
                }
            }
        }
    }

    /// Whether NetworkPolicy allows a new flow from `client` to backend
    /// `backend_index` of frontend `f` (at `addr`, port `port`).
    #[inline]
    #[must_use]
    pub fn policy_allows(
        &self,
        client: &Addr16,
        f: &Front,
        backend_index: u32,
        addr: &Addr16,
        proto: Proto,
        port: u16,
    ) -> bool {
        if self.policy.is_empty() {
            return true;
        }
        let record = match f.policy_of.get(backend_index as usize) {
            Some(&u32::MAX) => None,
            Some(&i) => Some(i),
            None => self.policy.backend_record(addr),
        };
        self.policy.allows_at(client, addr, record, proto, port)
    }

    /// The compiled NetworkPolicy (empty: none, everything allowed).
    #[inline]
    #[must_use]
    pub fn policy(&self) -> &PolicyTable {
        &self.policy
    }

    /// The generation this table was published as.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The flow-hash seed of this table.
    #[must_use]
    pub fn hash_seed(&self) -> u64 {
        self.hash_seed
    }

    /// All frontends, in order.
    #[must_use]
    pub fn frontends(&self) -> Frontends<'_> {
        Frontends(&self.fronts)
    }

    /// The frontends' blocks, in order, shared: a frontend whose block did
    /// not change between two tables (a delta left it alone) is the same
    /// `Arc` in both, so a follower finds the changed ones by pointer
    /// without reading every block.
    #[must_use]
    pub fn front_blocks(&self) -> &[Arc<Front>] {
        &self.fronts
    }

    /// The table as flat arrays, as a full snapshot carries them: each
    /// frontend's backends, rings (its own, then its per-node ones), source
    /// ranges and per-node rings back to back in frontend order, the
    /// records' starts counted in those arrays. Off the packet path.
    #[must_use]
    pub fn to_parts(&self) -> TableParts {
        let mut p = TableParts::default();
        let named = self.fronts.iter().any(|f| !f.name.is_empty());
        if named {
            p.name_offsets.push(0);
        }
        for f in &self.fronts {
            let ring_start = p.ring.len() as u32;
            let mut r = f.record;
            r.backends_start = p.backends.len() as u32;
            r.ring_start = ring_start + f.record.ring_start;
            r.ranges_start = p.source_ranges.len() as u32;
            r.locals_start = p.locals.len() as u32;
            p.frontends.push(r);
            p.backends.extend_from_slice(&f.backends);
            p.ring.extend_from_slice(&f.ring);
            p.source_ranges.extend_from_slice(&f.ranges);
            p.locals.extend(f.locals.iter().map(|l| LocalRecord {
                ring_start: ring_start + l.ring_start,
                ..*l
            }));
            if named {
                p.names.extend_from_slice(f.name.as_bytes());
                p.name_offsets.push(p.names.len() as u32);
            }
        }
        p.node_prefixes.clone_from(&self.node_prefixes);
        p.node_port_prefixes.clone_from(&self.node_port_prefixes);
        p.policy = self.policy.parts().clone();
        p
    }

    /// All backends, in order ([`Table::to_parts`]): a backend's index
    /// here is [`Table::backend_base`] of its frontend plus its index among
    /// the frontend's.
    #[must_use]
    pub fn backend_records(&self) -> Vec<BackendRecord> {
        self.fronts
            .iter()
            .flat_map(|f| f.backends.iter().copied())
            .collect()
    }

    /// How many backends all frontends have together.
    #[must_use]
    pub fn backends_total(&self) -> usize {
        self.backend_bases.last().copied().unwrap_or(0) as usize
    }

    /// The index among all backends ([`Table::backend_records`]) of
    /// frontend `fi`'s first backend.
    #[inline]
    #[must_use]
    pub fn backend_base(&self, fi: u32) -> Option<u32> {
        self.backend_bases
            .get(fi as usize)
            .copied()
            .filter(|_| (fi as usize) < self.fronts.len())
    }

    /// All ring slots, in order ([`Table::to_parts`]).
    #[must_use]
    pub fn ring_slots(&self) -> Vec<u16> {
        self.to_parts().ring
    }

    /// All source ranges, in order ([`Table::to_parts`]).
    #[must_use]
    pub fn source_range_records(&self) -> Vec<PrefixRecord> {
        self.to_parts().source_ranges
    }

    /// All per-node rings, in order ([`Table::to_parts`]).
    #[must_use]
    pub fn local_records(&self) -> Vec<LocalRecord> {
        self.to_parts().locals
    }

    /// The size of every ring, by frontend (and node): what
    /// [`Table::build_keeping`] takes to keep them in the next table.
    #[must_use]
    pub fn ring_sizes(&self) -> RingSizes {
        let mut sizes = RingSizes::default();
        for f in &self.fronts {
            let key = |node| RingKey {
                addr: f.addr,
                port: f.port,
                proto: f.proto,
                node,
            };
            sizes.insert(key(None), f.ring_len);
            for l in f.locals() {
                sizes.insert(key(Some(l.node)), l.ring_len);
            }
        }
        sizes
    }

    /// All node prefixes.
    #[must_use]
    pub fn node_prefix_records(&self) -> &[PrefixRecord] {
        &self.node_prefixes
    }

    /// All node-port address ranges.
    #[must_use]
    pub fn node_port_prefix_records(&self) -> &[PrefixRecord] {
        &self.node_port_prefixes
    }

    /// Does some frontend listen on a node port?
    #[inline]
    #[must_use]
    pub fn has_node_ports(&self) -> bool {
        self.has_node_ports
    }

    /// Is `addr` within the node-port addresses (`--nodeport-addresses`)?
    /// Whether it is one of this node's own addresses is the caller's
    /// question (the gateway knows them; `replay` takes every address).
    #[inline]
    #[must_use]
    pub fn selects_node_port_address(&self, addr: &Addr16) -> bool {
        self.node_port_prefixes.iter().any(|p| p.contains(addr))
    }

    /// The node-port frontend for a packet to `addr:port`: the frontend on
    /// the unspecified address of `addr`'s family, when `addr` is within the
    /// node-port addresses. The caller has checked that `addr` is the node's.
    #[inline]
    #[must_use]
    pub fn node_port(&self, addr: &Addr16, port: u16, proto: Proto) -> Option<u32> {
        if !self.has_node_ports {
            return None;
        }
        let any = addr16(unspecified(is_v4_mapped(addr)));
        let fi = self.frontend(&any, port, proto)?;
        (self.fronts.get(fi as usize)?.kind == FrontendKind::NodePort as u8
            && self.selects_node_port_address(addr))
        .then_some(fi)
    }

    /// Does frontend `f` take new flows from `src`? Always, unless it has
    /// source ranges ([`FRONTEND_SOURCE_RANGES`]) and none holds `src`.
    #[inline]
    #[must_use]
    pub fn source_allowed(&self, f: &Front, src: &Addr16) -> bool {
        if f.flags & FRONTEND_SOURCE_RANGES == 0 {
            return true;
        }
        f.ranges.iter().any(|r| r.contains(src))
    }

    /// The node of a client address: the node with the longest prefix (pod
    /// CIDR or address) holding it.
    #[inline]
    #[must_use]
    pub fn client_node(&self, src: &Addr16) -> Option<u32> {
        let v4 = is_v4_mapped(src);
        self.node_lens
            .iter()
            .filter(|(f, _)| *f == v4)
            .find_map(|&(f, len)| self.nodes.get(&(f, len, masked(src, len))).copied())
    }

    /// The per-node rings of frontend `f`.
    #[must_use]
    pub fn locals_of<'a>(&self, f: &'a Front) -> &'a [LocalRecord] {
        &f.locals
    }

    /// Starts loading the index lines [`Table::frontend`] of (address,
    /// port, protocol) will read: a batch prefetches every frame's before it
    /// looks any up, so their misses overlap.
    #[inline]
    pub fn prefetch_frontend(&self, addr: &Addr16, port: u16, proto: Proto) {
        let h = key_hash(self.index.seed, addr, port, proto.ip_number());
        crate::conntrack::prefetch_slot::<IndexSlot>(self.index.ctrl, self.index.mask, h);
    }

    /// Starts loading frontend `fi`'s block (its record's line).
    #[inline]
    pub fn prefetch_frontend_record(&self, fi: u32) {
        if let Some(f) = self.fronts.get(fi as usize) {
            crate::prefetch::prefetch(&f.record as *const FrontendRecord as usize);
        }
    }

    /// The frontend for (address, port, protocol), by index.
    #[inline]
    #[must_use]
    pub fn frontend(&self, addr: &Addr16, port: u16, proto: Proto) -> Option<u32> {
        let p = proto.ip_number();
        let h = key_hash(self.index.seed, addr, port, p);
        self.index
            .table
            .find(h, |s| s.addr == *addr && s.port == port && s.proto == p)
            .map(|s| s.frontend)
    }

    /// Is there any frontend on this address (any port or protocol)?
    /// Slow path only (ICMP errors); linear.
    #[must_use]
    pub fn is_frontend_addr(&self, addr: &Addr16) -> bool {
        self.fronts.iter().any(|f| f.addr == *addr)
    }

    /// Is this a virtual address: the address of a cluster IP or
    /// load-balancer frontend (any port or protocol), which no host has? Not
    /// an external IP (it may be a node's own address) nor the node-port
    /// wildcard. One hashed lookup (new flows ask it: such a source is
    /// spoofed).
    #[inline]
    #[must_use]
    pub fn is_virtual_addr(&self, addr: &Addr16) -> bool {
        let h = key_hash(self.index.seed, addr, 0, 0);
        self.index
            .table
            .find(h, |s| s.addr == *addr && s.port == 0 && s.proto == 0)
            .is_some()
    }

    /// The name of the frontend at `index` ([`ServiceSpec::name`]; control
    /// writes `"namespace/name"` or `"namespace/name:port-name"`), `None`
    /// when unknown.
    #[must_use]
    pub fn frontend_name(&self, index: u32) -> Option<&str> {
        self.fronts
            .get(index as usize)
            .map(|f| &*f.name)
            .filter(|n| !n.is_empty())
    }

    /// The frontend at `index` (from [`Table::frontend`]).
    #[inline]
    #[must_use]
    pub fn frontend_record(&self, index: u32) -> Option<&Front> {
        self.fronts.get(index as usize).map(|f| &**f)
    }

    /// The backends of a frontend.
    #[inline]
    #[must_use]
    pub fn backends_of<'a>(&self, f: &'a Front) -> &'a [BackendRecord] {
        &f.backends
    }

    /// Maglev pick for a new flow to frontend `f`: `ring[hash % M]`, where the
    /// hash is [`flow_hash`] of the tuple, or [`client_hash`] of the client
    /// address when the frontend has ClientIP affinity. The ring is the
    /// frontend's, or with [`FRONTEND_NODE_LOCAL`] the client's node's. `None`
    /// when no backend (of the client's node) takes new flows.
    #[inline]
    #[must_use]
    pub fn pick<'a>(&self, f: &'a Front, t: &FlowTuple) -> Option<&'a BackendRecord> {
        self.pick_index(f, t).map(|(_, b)| b)
    }

    /// [`Table::pick`], with the backend's index among the frontend's
    /// backends.
    #[inline]
    #[must_use]
    pub fn pick_index<'a>(&self, f: &'a Front, t: &FlowTuple) -> Option<(u32, &'a BackendRecord)> {
        let local = *f.ring.get(self.slot_of(f, t)?)? as usize;
        let b = f.backends.get(local)?;
        Some((local as u32, b))
    }

    /// Starts loading the ring slot [`Table::pick`] would read for `t`
    /// (the batch's first pass does this for connection openings).
    #[inline]
    pub fn prefetch_pick(&self, f: &Front, t: &FlowTuple) {
        if let Some(slot) = self.slot_of(f, t) {
            if let Some(r) = f.ring.get(slot) {
                crate::prefetch::prefetch(r as *const u16 as usize);
            }
        }
    }

    /// Index in the frontend's ring slots of the slot for `t`, or `None`
    /// without a ring: the frontend's ring, or for a [`FRONTEND_NODE_LOCAL`]
    /// frontend the ring of the client's node (`None` when the client's node
    /// is unknown or has none of the frontend's backends).
    #[inline]
    fn slot_of(&self, f: &Front, t: &FlowTuple) -> Option<usize> {
        let (start, len) = if f.flags & FRONTEND_NODE_LOCAL == 0 {
            (f.ring_start, f.ring_len)
        } else {
            let node = self.client_node(&t.src_addr)?;
            let mine = &f.locals;
            let l = mine
                .binary_search_by_key(&node, |l| l.node)
                .ok()
                .and_then(|i| mine.get(i))?;
            (l.ring_start, l.ring_len)
        };
        if len == 0 {
            return None;
        }
        let h = if f.flags & FRONTEND_AFFINITY != 0 {
            client_hash(self.hash_seed, &t.src_addr)
        } else {
            flow_hash(self.hash_seed, t)
        };
        Some(start as usize + (h % u64::from(len)) as usize)
    }

    /// The return path of a frontend (validated by [`Table::from_parts`]).
    #[inline]
    #[must_use]
    pub fn return_path(f: &FrontendRecord) -> ReturnPath {
        ReturnPath::from_u8(f.return_path).unwrap_or(ReturnPath::Routed)
    }

    /// Is `(addr, port)` still a backend of frontend `f`?
    #[inline]
    #[must_use]
    pub fn has_backend(&self, f: &Front, addr: &Addr16, port: u16) -> bool {
        self.backend_index(f, addr, port).is_some()
    }

    /// The index among frontend `f`'s backends of `(addr, port)`, if it is
    /// one.
    #[inline]
    #[must_use]
    pub fn backend_index(&self, f: &Front, addr: &Addr16, port: u16) -> Option<u32> {
        f.backends
            .iter()
            .position(|b| b.addr == *addr && b.port == port)
            .map(|i| i as u32)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(vip: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        ServiceSpec::cluster_ip(
            ip(vip),
            port,
            Proto::Tcp,
            backends
                .iter()
                .map(|b| BackendSpec::ready(ip(b), 8080))
                .collect(),
        )
    }

    /// The frontend-index prefetch aims where hashbrown put the index: every
    /// slot's control bytes are at the recorded address.
    #[test]
    fn the_frontend_prefetch_aims_at_the_index() {
        let specs: Vec<ServiceSpec> = (0..300u32)
            .map(|i| {
                svc(
                    &format!("198.19.{}.{}", i / 200, i % 200 + 1),
                    80,
                    &["198.18.1.1"],
                )
            })
            .collect();
        let t = Table::build(1, 0, &specs).unwrap();
        assert_ne!(t.index.ctrl, 0);
        assert_eq!(t.index.mask, t.index.table.num_buckets() - 1);
        for s in t.index.table.iter() {
            let h = key_hash(t.index.seed, &s.addr, s.port, s.proto);
            let i = t
                .index
                .table
                .find_bucket_index(h, |x| {
                    x.addr == s.addr && x.port == s.port && x.proto == s.proto
                })
                .unwrap();
            assert_eq!(crate::conntrack::ctrl_of(s, i), t.index.ctrl);
        }
        // An empty table has nothing to aim at, and prefetching is harmless.
        let e = Table::build(1, 0, &[]).unwrap();
        assert_eq!(e.index.ctrl, 0);
        e.prefetch_frontend(&addr16(ip("198.19.0.1")), 80, Proto::Tcp);
    }

    /// After a change to one Service, the others' blocks are shared, so
    /// their version (which their flows were bound under) stays; the
    /// changed Service's block is new, and a delta carries only it.
    #[test]
    fn unchanged_frontends_keep_their_version() {
        let a = svc(
            "198.19.0.10",
            80,
            &["198.18.1.1", "198.18.1.2", "198.18.1.3"],
        );
        let b = svc("198.19.0.11", 80, &["198.18.2.1", "198.18.2.2"]);
        let t1 = Table::build(1, 0, &[b.clone(), a.clone()]).unwrap();
        // A new Service ahead of both, and b loses a backend.
        let b2 = svc("198.19.0.11", 80, &["198.18.2.2"]);
        let new = svc(
            "198.19.0.9",
            80,
            &["198.18.3.1", "198.18.3.2", "198.18.3.3"],
        );
        let mut t2 = Table::build(2, 0, &[new, b2, a]).unwrap();
        t2.adopt_unchanged(&t1);
        let version = |t: &Table, vip: &str| {
            let fi = t.frontend(&addr16(ip(vip)), 80, Proto::Tcp).unwrap();
            t.frontend_record(fi).unwrap().version()
        };
        assert_eq!(version(&t2, "198.19.0.10"), 1, "a kept its block");
        assert_eq!(version(&t2, "198.19.0.11"), 2, "b changed");
        assert_eq!(version(&t2, "198.19.0.9"), 2, "new");
        // The delta from t1 holds b and the new one, and makes t2 from t1.
        let d = t2.delta_from(&t1).unwrap();
        assert_eq!(d.changed.frontends().len(), 2);
        assert!(d.removed.is_empty());
        let t3 = t1.apply_delta(&d).unwrap();
        assert_eq!(t3.generation(), 2);
        for vip in ["198.19.0.9", "198.19.0.10", "198.19.0.11"] {
            let (f2, f3) = (
                t2.frontend(&addr16(ip(vip)), 80, Proto::Tcp).unwrap(),
                t3.frontend(&addr16(ip(vip)), 80, Proto::Tcp).unwrap(),
            );
            let (e2, e3) = (
                t2.frontend_record(f2).unwrap(),
                t3.frontend_record(f3).unwrap(),
            );
            assert!(e2.same_as(e3), "{vip}");
            assert_eq!(e2.version(), e3.version(), "{vip}");
        }
        // Not for another base.
        assert!(matches!(
            t2.apply_delta(&d),
            Err(DeltaError::Base { base: 1, have: 2 })
        ));
    }

    #[test]
    fn lookup_finds_each_frontend_and_only_those() {
        let t = Table::build(
            1,
            0,
            &[
                svc("198.19.0.10", 80, &["198.18.1.1", "198.18.1.2"]),
                svc("198.19.0.11", 80, &["198.18.1.3"]),
                ServiceSpec::cluster_ip(ip("198.19.0.10"), 80, Proto::Udp, vec![]),
                svc("2001:db8::10", 443, &["2001:db8:1::1"]),
            ],
        )
        .unwrap();
        let a = addr16(ip("198.19.0.10"));
        let tcp = t.frontend(&a, 80, Proto::Tcp).unwrap();
        let udp = t.frontend(&a, 80, Proto::Udp).unwrap();
        assert_ne!(tcp, udp);
        assert_eq!(t.frontend_record(udp).unwrap().ring_len, 0);
        assert_eq!(t.backends_of(t.frontend_record(tcp).unwrap()).len(), 2);
        assert!(t.frontend(&a, 81, Proto::Tcp).is_none());
        assert!(t.frontend(&a, 80, Proto::Sctp).is_none());
        assert!(t
            .frontend(&addr16(ip("2001:db8::10")), 443, Proto::Tcp)
            .is_some());
        assert_eq!(
            t.frontend_record(tcp).unwrap().ring_len,
            401,
            "the smallest prime >= min_ring_size(2·2) = 400"
        );
    }

    #[test]
    fn duplicate_frontend_is_refused() {
        let e = Table::build(
            1,
            0,
            &[svc("198.19.0.10", 80, &[]), svc("198.19.0.10", 80, &[])],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "frontend 198.19.0.10:80/TCP appears twice");
    }

    #[test]
    fn mixed_family_is_refused() {
        let e = Table::build(1, 0, &[svc("198.19.0.10", 80, &["2001:db8::1"])]).unwrap_err();
        assert!(matches!(e, TableError::FamilyMismatch { .. }), "{e}");
    }

    #[test]
    fn from_parts_checks_every_index() {
        let good = Table::build(
            1,
            0,
            &[svc("198.19.0.10", 80, &["198.18.1.1", "198.18.1.2"])],
        )
        .unwrap();
        let parts = good.to_parts();
        let (f, b, r) = (parts.frontends, parts.backends, parts.ring);
        let mut f1 = f.clone();
        f1[0].backends_len = 3;
        assert!(Table::from_parts(1, 0, f1, b.clone(), r.clone())
            .unwrap_err()
            .to_string()
            .contains("backends 0..3 exceed 2"));
        let mut f2 = f.clone();
        f2[0].ring_start = 1;
        assert!(Table::from_parts(1, 0, f2, b.clone(), r.clone()).is_err());
        let mut r3 = r.clone();
        r3[5] = 2;
        assert!(Table::from_parts(1, 0, f.clone(), b.clone(), r3)
            .unwrap_err()
            .to_string()
            .contains("names backend 2 of 2"));
        let mut f4 = f.clone();
        f4[0].proto = 1;
        assert!(Table::from_parts(1, 0, f4, b.clone(), r.clone()).is_err());
        let mut b5 = b.clone();
        b5[0].state = 9;
        assert!(Table::from_parts(1, 0, f.clone(), b5, r.clone()).is_err());
        assert!(Table::from_parts(1, 0, f, b, r).is_ok());
    }

    /// A table built from the previous one's ring sizes keeps M when one of
    /// four backends is removed, so new flows of the other three keep their
    /// backends (Maglev's consistency survives endpoint changes); built from
    /// nothing, it would pick the fresh size for three.
    #[test]
    fn removal_keeps_the_ring_size_and_other_picks() {
        let four = Table::build(
            1,
            0,
            &[svc(
                "198.19.0.10",
                80,
                &["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"],
            )],
        )
        .unwrap();
        let spec = TableSpec {
            services: vec![svc(
                "198.19.0.10",
                80,
                &["198.18.1.1", "198.18.1.2", "198.18.1.3"],
            )],
            ..TableSpec::default()
        };
        let sizes = four.ring_sizes();
        assert_eq!(sizes.len(), 1);
        let three = Table::build_keeping(2, 0, &spec, DEFAULT_MAX_RING_SIZE, &sizes).unwrap();
        let fresh = Table::build_full(2, 0, &spec, DEFAULT_MAX_RING_SIZE).unwrap();
        assert_eq!(fresh.frontend_record(0).unwrap().ring_len, 601);
        let (f4, f3) = (
            four.frontend_record(0).unwrap(),
            three.frontend_record(0).unwrap(),
        );
        assert_eq!((f4.ring_len, f3.ring_len), (809, 809), "the size is kept");
        let gone = addr16(ip("198.18.1.4"));
        let (mut kept, mut others) = (0, 0);
        for p in 0..20_000u16 {
            let t = FlowTuple {
                src_addr: addr16(ip("198.18.0.1")),
                dst_addr: f4.addr,
                src_port: p,
                dst_port: 80,
                proto: Proto::Tcp,
            };
            let before = four.pick(f4, &t).unwrap().addr;
            let after = three.pick(f3, &t).unwrap().addr;
            assert_ne!(after, gone);
            if before != gone {
                others += 1;
                kept += usize::from(before == after);
            }
        }
        assert!(
            kept * 100 >= others * 95,
            "only {kept} of {others} flows kept their backend"
        );
    }

    #[test]
    fn draining_backends_take_no_new_flows() {
        let mut s = svc("198.19.0.10", 80, &["198.18.1.1", "198.18.1.2"]);
        s.backends[0].weight = 0;
        let t = Table::build(1, 0, &[s]).unwrap();
        let f = t.frontend_record(0).unwrap();
        for p in 0..500 {
            let tu = FlowTuple {
                src_addr: addr16(ip("198.18.0.1")),
                dst_addr: f.addr,
                src_port: 1000 + p,
                dst_port: 80,
                proto: Proto::Tcp,
            };
            assert_eq!(t.pick(f, &tu).unwrap().addr, addr16(ip("198.18.1.2")));
        }
        assert!(
            t.has_backend(f, &addr16(ip("198.18.1.1")), 8080),
            "draining stays a backend"
        );
    }

    #[test]
    fn affinity_picks_by_client_address_only() {
        let mut s = svc(
            "198.19.0.10",
            80,
            &["198.18.1.1", "198.18.1.2", "198.18.1.3"],
        );
        s.affinity_timeout_s = Some(10800);
        let t = Table::build(1, 0, &[s]).unwrap();
        let f = t.frontend_record(0).unwrap();
        let pick = |port| {
            t.pick(
                f,
                &FlowTuple {
                    src_addr: addr16(ip("198.18.0.1")),
                    dst_addr: f.addr,
                    src_port: port,
                    dst_port: 80,
                    proto: Proto::Tcp,
                },
            )
            .unwrap()
            .addr
        };
        let first = pick(1000);
        assert!((1001..1100).all(|p| pick(p) == first));
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> FlowTuple {
        FlowTuple {
            src_addr: addr16(ip(src)),
            dst_addr: addr16(ip(dst)),
            src_port: sport,
            dst_port: dport,
            proto: Proto::Tcp,
        }
    }

    fn full(spec: TableSpec) -> Table {
        Table::build_full(1, 0, &spec, DEFAULT_MAX_RING_SIZE).unwrap()
    }

    fn parts_of(t: &Table) -> TableParts {
        t.to_parts()
    }

    #[test]
    fn node_port_lookup_honours_node_port_addresses_and_kind() {
        let np =
            svc("0.0.0.0", 30080, &["198.18.1.1"]).with_kind(FrontendKind::NodePort, ip("0.0.0.0"));
        let np6 = ServiceSpec::cluster_ip(
            ip("::"),
            30080,
            Proto::Udp,
            vec![BackendSpec::ready(ip("2001:2:1::1"), 53)],
        )
        .with_kind(FrontendKind::NodePort, ip("::"));
        // A ClusterIP that happens to sit on the unspecified address is no
        // node port.
        let cip6 = ServiceSpec::cluster_ip(ip("::"), 30081, Proto::Tcp, vec![]);
        let t = full(TableSpec {
            services: vec![svc("198.19.0.10", 80, &["198.18.1.1"]), np, np6, cip6],
            nodes: vec![],
            node_port_addresses: vec![
                net("198.18.0.0/24"),
                net("198.18.7.7/32"),
                net("2001:2::/48"),
            ],
            policy: Default::default(),
        });
        assert!(t.has_node_ports());
        let a = |s: &str| addr16(ip(s));
        assert_eq!(t.node_port(&a("198.18.0.11"), 30080, Proto::Tcp), Some(1));
        assert_eq!(t.node_port(&a("198.18.7.7"), 30080, Proto::Tcp), Some(1));
        assert_eq!(
            t.node_port(&a("198.18.7.8"), 30080, Proto::Tcp),
            None,
            "outside the addresses"
        );
        assert_eq!(
            t.node_port(&a("198.18.0.11"), 30081, Proto::Tcp),
            None,
            "other port"
        );
        assert_eq!(
            t.node_port(&a("198.18.0.11"), 30080, Proto::Udp),
            None,
            "other protocol"
        );
        assert_eq!(t.node_port(&a("2001:2::5"), 30080, Proto::Udp), Some(2));
        assert_eq!(t.node_port(&a("2001:2::5"), 30080, Proto::Tcp), None);
        assert_eq!(t.node_port(&a("2001:3::5"), 30080, Proto::Udp), None);
        assert_eq!(
            t.node_port(&a("2001:2::5"), 30081, Proto::Tcp),
            None,
            "a ClusterIP on ::"
        );
        assert!(t.selects_node_port_address(&a("198.18.0.200")));
        assert!(!t.selects_node_port_address(&a("198.18.1.1")));
        // No node-port addresses: node ports are served nowhere.
        let t = full(TableSpec {
            services: vec![svc("0.0.0.0", 30080, &["198.18.1.1"])
                .with_kind(FrontendKind::NodePort, ip("0.0.0.0"))],
            ..TableSpec::default()
        });
        assert!(t.has_node_ports());
        assert_eq!(t.node_port(&a("198.18.0.11"), 30080, Proto::Tcp), None);
        // No node ports at all.
        let t = full(TableSpec {
            services: vec![svc("198.19.0.10", 30080, &["198.18.1.1"])],
            nodes: vec![],
            node_port_addresses: vec![net("0.0.0.0/0")],
            policy: Default::default(),
        });
        assert!(!t.has_node_ports());
        assert_eq!(t.node_port(&a("198.18.0.11"), 30080, Proto::Tcp), None);
        // A node port elsewhere than on the unspecified address is refused.
        let e = Table::build(
            1,
            0,
            &[svc("198.19.0.10", 30080, &[]).with_kind(FrontendKind::NodePort, ip("198.19.0.10"))],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("node ports are on 0.0.0.0 or ::"),
            "{e}"
        );
    }

    #[test]
    fn source_ranges_open_close_and_keep_families_apart() {
        let mut open = svc("198.19.0.10", 80, &["198.18.1.1"]);
        open.kind = FrontendKind::LoadBalancer;
        let mut closed = open.clone();
        closed.port = 81;
        closed.source_ranges = Some(vec![]);
        let mut some = open.clone();
        some.port = 82;
        some.source_ranges = Some(vec![net("198.18.0.0/24"), net("198.18.9.9/32")]);
        let mut all4 = open.clone();
        all4.port = 83;
        all4.source_ranges = Some(vec![net("0.0.0.0/0")]);
        let mut six = ServiceSpec::cluster_ip(ip("2001:2::10"), 80, Proto::Tcp, vec![]);
        six.source_ranges = Some(vec![net("::/0")]);
        let t = Table::build(1, 0, &[open, closed, some, all4, six]).unwrap();
        let f = |i| t.frontend_record(i).unwrap();
        let a = |s: &str| addr16(ip(s));
        assert_eq!(f(0).flags & FRONTEND_SOURCE_RANGES, 0);
        assert!(t.source_allowed(f(0), &a("203.0.113.1")), "None: open");
        assert_eq!(f(1).flags & FRONTEND_SOURCE_RANGES, FRONTEND_SOURCE_RANGES);
        assert_eq!(f(1).ranges_len, 0);
        assert!(
            !t.source_allowed(f(1), &a("198.18.0.1")),
            "Some(empty): closed"
        );
        assert!(t.source_allowed(f(2), &a("198.18.0.255")));
        assert!(t.source_allowed(f(2), &a("198.18.9.9")));
        assert!(!t.source_allowed(f(2), &a("198.18.9.8")));
        assert!(!t.source_allowed(f(2), &a("198.18.1.0")));
        assert_eq!((f(2).ranges_start, f(2).ranges_len), (0, 2));
        assert!(t.source_allowed(f(3), &a("198.19.255.255")));
        // 0.0.0.0/0 holds no IPv6 source, ::/0 no IPv4 source.
        assert!(!t.source_allowed(f(3), &a("2001:2::1")));
        assert!(t.source_allowed(f(4), &a("2001:2::1")));
        assert!(!t.source_allowed(f(4), &a("198.18.0.1")));
        // A range of the other family is refused when building.
        let mut bad = svc("198.19.0.10", 80, &[]);
        bad.source_ranges = Some(vec![net("2001:2::/48")]);
        let e = Table::build(1, 0, &[bad]).unwrap_err();
        assert!(
            e.to_string()
                .contains("source range 2001:2::/48 is of another IP family"),
            "{e}"
        );
    }

    #[test]
    fn client_node_is_the_longest_prefix_of_the_family() {
        let t = full(TableSpec {
            services: vec![],
            nodes: vec![
                (net("198.18.0.0/16"), 1),
                (net("198.18.5.0/24"), 2),
                (net("198.18.5.7/32"), 3),
                (net("::/0"), 4),
                (net("2001:2:0:5::/64"), 5),
                (net("2001:2:0:5::7/128"), 6),
            ],
            node_port_addresses: vec![],
            policy: Default::default(),
        });
        let n = |s: &str| t.client_node(&addr16(ip(s)));
        assert_eq!(n("198.18.5.7"), Some(3));
        assert_eq!(n("198.18.5.8"), Some(2));
        assert_eq!(n("198.18.6.1"), Some(1));
        assert_eq!(n("198.19.0.1"), None, "::/0 does not hold IPv4 clients");
        assert_eq!(n("2001:2:0:5::7"), Some(6));
        assert_eq!(n("2001:2:0:5::8"), Some(5));
        assert_eq!(n("2001:2:0:6::1"), Some(4));
        // 0.0.0.0/0 does not hold IPv6 clients either.
        let t = full(TableSpec {
            nodes: vec![(net("0.0.0.0/0"), 7), (net("2001:2::/48"), 8)],
            ..TableSpec::default()
        });
        let n = |s: &str| t.client_node(&addr16(ip(s)));
        assert_eq!(n("198.19.0.1"), Some(7));
        assert_eq!(n("2001:2::1"), Some(8));
        assert_eq!(n("2001:3::1"), None);
        // Host bits are cleared when building.
        let t = full(TableSpec {
            nodes: vec![(net("198.18.5.9/24"), 2)],
            ..TableSpec::default()
        });
        assert_eq!(t.node_prefix_records()[0].net(), net("198.18.5.0/24"));
        assert_eq!(t.client_node(&addr16(ip("198.18.5.200"))), Some(2));
        // One prefix, two nodes: refused. One prefix twice for one node: fine.
        let e = Table::build_full(
            1,
            0,
            &TableSpec {
                nodes: vec![(net("198.18.5.0/24"), 2), (net("198.18.5.0/24"), 3)],
                ..TableSpec::default()
            },
            DEFAULT_MAX_RING_SIZE,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("already a prefix of node 2 (now node 3)"),
            "{e}"
        );
        let t = full(TableSpec {
            nodes: vec![(net("198.18.5.0/24"), 2), (net("198.18.5.0/24"), 2)],
            ..TableSpec::default()
        });
        assert_eq!(t.client_node(&addr16(ip("198.18.5.1"))), Some(2));
    }

    /// A node-local frontend: nodes 1 (two backends), 2 (three), 3 (one,
    /// draining) and one backend on no known node.
    fn local_spec(backends: &[(&str, Option<u32>, u32)]) -> TableSpec {
        let mut s = svc("198.19.0.10", 80, &[]);
        s.backends = backends
            .iter()
            .map(|&(a, node, weight)| BackendSpec {
                node,
                weight,
                ..BackendSpec::ready(ip(a), 8080)
            })
            .collect();
        s.node_local = true;
        TableSpec {
            services: vec![s],
            nodes: vec![
                (net("198.18.64.0/24"), 1),
                (net("198.18.0.1/32"), 1),
                (net("198.18.65.0/24"), 2),
                (net("198.18.66.0/24"), 3),
                (net("198.18.67.0/24"), 4),
            ],
            node_port_addresses: vec![],
            policy: Default::default(),
        }
    }

    const LOCAL_BACKENDS: [(&str, Option<u32>, u32); 7] = [
        ("198.18.1.1", Some(1), 1),
        ("198.18.1.2", Some(1), 1),
        ("198.18.1.3", Some(2), 1),
        ("198.18.1.4", Some(2), 1),
        ("198.18.1.5", Some(2), 1),
        ("198.18.1.6", Some(3), 0),
        ("198.18.1.7", None, 1),
    ];

    #[test]
    fn per_node_rings_pick_only_the_clients_nodes_backends() {
        let t = full(local_spec(&LOCAL_BACKENDS));
        let f = t.frontend_record(0).unwrap();
        assert_eq!(f.flags, FRONTEND_NODE_LOCAL);
        let nodes: Vec<(u32, u32)> = t
            .locals_of(f)
            .iter()
            .map(|l| (l.node, l.ring_len))
            .collect();
        assert_eq!(nodes.len(), 3);
        assert_eq!((nodes[0].0, nodes[1].0, nodes[2].0), (1, 2, 3));
        assert_eq!(nodes[2].1, 0, "node 3's only backend is draining");
        let picks = |client: &str| -> std::collections::BTreeSet<String> {
            (0..2000u16)
                .map(|p| t.pick(f, &tuple(client, "198.19.0.10", 1024 + p, 80)))
                .map(|b| b.map_or("none".to_owned(), |b| ip_from16(b.addr).to_string()))
                .collect()
        };
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| (*s).to_owned())
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(picks("198.18.64.9"), set(&["198.18.1.1", "198.18.1.2"]));
        assert_eq!(
            picks("198.18.0.1"),
            set(&["198.18.1.1", "198.18.1.2"]),
            "by node address"
        );
        assert_eq!(
            picks("198.18.65.9"),
            set(&["198.18.1.3", "198.18.1.4", "198.18.1.5"])
        );
        assert_eq!(
            picks("198.18.66.9"),
            set(&["none"]),
            "only draining backends"
        );
        assert_eq!(
            picks("198.18.67.9"),
            set(&["none"]),
            "a node without backends"
        );
        assert_eq!(picks("198.18.99.9"), set(&["none"]), "an unknown node");
        // The frontend's own ring still covers every backend taking flows.
        let all: std::collections::BTreeSet<u16> = t.ring_slots()
            [f.ring_start as usize..(f.ring_start + f.ring_len) as usize]
            .iter()
            .copied()
            .collect();
        assert_eq!(all, [0, 1, 2, 3, 4, 6].into_iter().collect());
    }

    /// Removing one of node 2's four backends (its ring keeps its size, as
    /// a frontend's does, when built from the previous table's sizes) leaves
    /// node 1's picks exactly as they were and keeps most of node 2's other
    /// flows where they were.
    #[test]
    fn per_node_rings_stay_consistent() {
        let mut more = LOCAL_BACKENDS.to_vec();
        more.push(("198.18.1.8", Some(2), 1));
        let before = full(local_spec(&more));
        more.remove(4); // 198.18.1.5, node 2
        let sizes = before.ring_sizes();
        // The frontend's ring and node 1's and node 2's (node 3 has none).
        assert_eq!(sizes.len(), 3);
        let key = RingKey {
            addr: addr16(ip("198.19.0.10")),
            port: 80,
            proto: Proto::Tcp.ip_number(),
            node: Some(2),
        };
        assert_eq!(sizes.get(&key), Some(before.local_records()[1].ring_len));
        let after =
            Table::build_keeping(1, 0, &local_spec(&more), DEFAULT_MAX_RING_SIZE, &sizes).unwrap();
        assert_eq!(after.ring_sizes(), sizes, "every ring keeps its size");
        let (fb, fa) = (
            before.frontend_record(0).unwrap(),
            after.frontend_record(0).unwrap(),
        );
        let addr = |t: &Table, f: &Front, c: &str, p: u16| {
            t.pick(f, &tuple(c, "198.19.0.10", p, 80)).map(|b| b.addr)
        };
        for p in 0..3000u16 {
            assert_eq!(
                addr(&before, fb, "198.18.64.3", p),
                addr(&after, fa, "198.18.64.3", p)
            );
        }
        let gone = addr16(ip("198.18.1.5"));
        let (mut kept, mut others) = (0, 0);
        for p in 0..3000u16 {
            let b = addr(&before, fb, "198.18.65.3", p).unwrap();
            let a = addr(&after, fa, "198.18.65.3", p).unwrap();
            assert_ne!(a, gone);
            if b != gone {
                others += 1;
                kept += usize::from(a == b);
            }
        }
        assert!(kept * 100 >= others * 95, "only {kept} of {others} kept");
    }

    #[test]
    fn a_backend_on_a_node_without_prefix_is_refused() {
        let mut spec = local_spec(&LOCAL_BACKENDS);
        spec.services[0].backends[0].node = Some(9);
        let e = Table::build_full(1, 0, &spec, DEFAULT_MAX_RING_SIZE).unwrap_err();
        assert!(
            e.to_string().contains("is on node 9, which has no prefix"),
            "{e}"
        );
        // Not node-local: the node is not looked at.
        spec.services[0].node_local = false;
        assert!(Table::build_full(1, 0, &spec, DEFAULT_MAX_RING_SIZE).is_ok());
    }

    #[test]
    fn assemble_refuses_bad_records() {
        let mut spec = local_spec(&LOCAL_BACKENDS);
        let mut lb = svc("198.19.0.11", 80, &["198.18.1.9"])
            .with_kind(FrontendKind::LoadBalancer, ip("198.19.0.11"));
        lb.source_ranges = Some(vec![net("198.18.0.0/16")]);
        spec.services.push(lb);
        spec.node_port_addresses = vec![net("198.18.0.0/16")];
        let good = full(spec);
        let base = parts_of(&good);
        assert!(Table::assemble(1, 0, base.clone()).is_ok());
        let refused = |edit: &dyn Fn(&mut TableParts)| {
            let mut p = base.clone();
            edit(&mut p);
            Table::assemble(1, 0, p).unwrap_err().to_string()
        };
        type Edit<'a> = &'a dyn Fn(&mut TableParts);
        let cases: [(&str, Edit); 14] = [
            ("prefix length 33 is longer than 32", &|p| {
                p.source_ranges[0].len = 33
            }),
            ("has host bits set", &|p| p.node_prefixes[0].addr[15] = 1),
            ("node-port address #0: reserved", &|p| {
                p.node_port_prefixes[0].reserved[1] = 1
            }),
            ("names node 5", &|p| p.node_port_prefixes[0].node = 5),
            ("source range #0: names node 1", &|p| {
                p.source_ranges[0].node = 1
            }),
            ("not sorted by node", &|p| p.locals.swap(0, 1)),
            ("not sorted by node", &|p| p.locals[1].node = 1),
            ("per-node ring slot names backend 7 of 7", &|p| {
                let at = p.locals[1].ring_start as usize;
                p.ring[at] = 7;
            }),
            ("per-node ring 4294967295..", &|p| {
                p.locals[0].ring_start = u32::MAX
            }),
            ("per-node ring #2: reserved is 1", &|p| {
                p.locals[2].reserved = 1
            }),
            ("source ranges without the source-range flag", &|p| {
                p.frontends[1].flags = 0
            }),
            ("per-node rings without the node-local flag", &|p| {
                p.frontends[0].flags = 0
            }),
            ("source ranges 0..2 exceed 1", &|p| {
                p.frontends[1].ranges_len = 2
            }),
            ("per-node rings 0..4 exceed 3", &|p| {
                p.frontends[0].locals_len = 4
            }),
        ];
        for (want, edit) in cases {
            let m = refused(edit);
            assert!(m.contains(want), "want {want:?}, got {m:?}");
        }
        let m = refused(&|p| p.frontends[0].flags = 8);
        assert!(m.contains("flags 0x8 name unknown bits"), "{m}");
        let m = refused(&|p| p.frontends[0].kind = 4);
        assert!(m.contains("kind 4 is unknown"), "{m}");
        let m = refused(&|p| p.frontends[1].kind = FrontendKind::NodePort as u8);
        assert!(m.contains("a node port on 198.19.0.11"), "{m}");
        let m = refused(&|p| {
            p.source_ranges[0] = PrefixRecord::new(net("2001:2::/48"), 0);
        });
        assert!(
            m.contains("source range 2001:2::/48 is of another IP family"),
            "{m}"
        );
    }
}
