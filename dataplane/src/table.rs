//! The service table: frontends, backends and Maglev rings, immutable once built.
//!
//! Owns: [`Table`] and its flat records ([`FrontendRecord`], [`BackendRecord`],
//! ring slots as `u16`, a backend index within the frontend; [`PrefixRecord`]s
//! for source ranges, node prefixes and node-port addresses; [`LocalRecord`]s,
//! the per-node rings of `internalTrafficPolicy: Local` frontends). The
//! records are `#[repr(C)]` plain integers, so the shared-memory snapshot can
//! hold exactly these arrays; [`Table::assemble`] validates every length,
//! index and prefix before a table is used, whoever built it.
//! Control builds, the dataplane looks up: the Maglev rings and the tables
//! are built by the `clustergate-builder` crate (control, tests, benches),
//! which makes each frontend's block with [`Front::new`] and a table of
//! blocks with [`Table::from_blocks`] or [`Table::replace_blocks`]. Those
//! constructors and [`Table::assemble`] (a snapshot's arrays) run the same
//! checks, so no table reaches a lookup unchecked, whoever built it.
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
use crate::policy::{PolicyParts, PolicyTable};

/// Backends one frontend can have: ring slots are two-byte indices.
pub const MAX_BACKENDS_PER_FRONTEND: usize = 1 << 16;
/// The longest frontend name (`ServiceSpec::name`) a table holds, in bytes.
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
    /// The Maglev ring builder (control's) refused the backends.
    #[error("frontend {frontend}: {what}")]
    Maglev {
        /// Frontend address and port.
        frontend: String,
        /// What the ring builder said.
        what: String,
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
    /// A frontend's block from its parts, made in generation `version`
    /// (`index`: its place in the table, for errors). Validates: the
    /// record's starts are 0 and its lengths are the arrays' lengths, the
    /// name is at most [`MAX_NAME_LEN`] bytes, the source ranges are
    /// canonical, and the record passes the very checks
    /// [`Table::assemble`] makes of a snapshot's records (every ring slot
    /// names one of its backends, families agree, flags are known, ...).
    /// Its policy records are empty: [`Front::set_policy`] gives them.
    ///
    /// # Errors
    /// The first fault, as [`Table::assemble`] names it.
    pub fn new(index: usize, parts: FrontParts, version: u64) -> Result<Self, TableError> {
        let FrontParts {
            record,
            ring,
            backends,
            ranges,
            locals,
            name,
        } = parts;
        let bad = |what: String| TableError::BadFrontend { index, what };
        if record.backends_start != 0
            || record.ring_start != 0
            || record.ranges_start != 0
            || record.locals_start != 0
        {
            return Err(bad("a block's record starts its arrays at 0".to_owned()));
        }
        for (what, len, have) in [
            ("backends", record.backends_len, backends.len()),
            ("source ranges", record.ranges_len, ranges.len()),
            ("per-node rings", record.locals_len, locals.len()),
        ] {
            if len as usize != have {
                return Err(bad(format!(
                    "{len} {what} in the record, {have} in the block"
                )));
            }
        }
        if name.len() > MAX_NAME_LEN {
            return Err(TableError::BadName {
                index,
                what: format!("{} bytes, at most {MAX_NAME_LEN}", name.len()),
            });
        }
        check_prefixes("source range", &ranges, false)?;
        check_records(
            index,
            std::slice::from_ref(&record),
            &backends,
            &ring,
            &ranges,
            &locals,
        )?;
        Ok(Self {
            record,
            ring: ring.into_boxed_slice(),
            backends: backends.into_boxed_slice(),
            ranges: ranges.into_boxed_slice(),
            locals: locals.into_boxed_slice(),
            name: name.into_boxed_str(),
            policy_of: Box::default(),
            version,
        })
    }

    /// Gives a block its backends' policy records under `policy` (a cache
    /// of [`PolicyTable::backend_record`] per backend), copying the block
    /// only if it is shared and its records change. Every block of a table
    /// carries the records of the table's policy ([`Table::from_blocks`]).
    pub fn set_policy(front: &mut Arc<Self>, policy: &PolicyTable) {
        set_policy(front, policy);
    }

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
    #[must_use]
    pub fn same_as(&self, other: &Front) -> bool {
        self.record == other.record
            && self.ring == other.ring
            && self.backends == other.backends
            && self.ranges == other.ranges
            && self.locals == other.locals
            && self.name == other.name
    }
}

/// One frontend's block as plain arrays, for [`Front::new`]: the record's
/// starts are 0 (relative to the block), its own ring is `ring[..ring_len]`
/// and its per-node rings' `ring_start` count within `ring` too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontParts {
    /// The record.
    pub record: FrontendRecord,
    /// Ring slots: its own ring, then its per-node rings.
    pub ring: Vec<u16>,
    /// Its backends.
    pub backends: Vec<BackendRecord>,
    /// Its source ranges.
    pub ranges: Vec<PrefixRecord>,
    /// Its per-node rings.
    pub locals: Vec<LocalRecord>,
    /// Its name (`""`: unknown).
    pub name: String,
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

/// Checks the prefix records of section `section` ([`check_prefix`]); only
/// node prefixes (`names_nodes`) may name a node.
fn check_prefixes(
    section: &'static str,
    list: &[PrefixRecord],
    names_nodes: bool,
) -> Result<(), TableError> {
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
    Ok(())
}

/// Checks frontend records against the arrays their starts and lengths
/// point into: protocol, kind, flags, return path and reserved bytes; every
/// range within its array; every ring slot naming one of the frontend's
/// backends; backends and source ranges of the frontend's family; per-node
/// rings only with their flag and sorted by node. Errors name frontend
/// `first + i` for record `i`. The one validation of records, for a
/// snapshot's arrays ([`Table::assemble`]) and a block ([`Front::new`]).
fn check_records(
    first: usize,
    frontends: &[FrontendRecord],
    backends: &[BackendRecord],
    ring: &[u16],
    source_ranges: &[PrefixRecord],
    locals: &[LocalRecord],
) -> Result<(), TableError> {
    let bad = |index: usize, what: String| TableError::BadFrontend { index, what };
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
        let i = first + i;
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
    Ok(())
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

/// `bases` (as [`bases_of`] makes them) after the frontends at the given
/// indices changed their backend count by the given amounts: each later
/// base moves by the changes before it.
fn moved_bases(bases: &[u32], resized: &mut [(usize, i64)]) -> Box<[u32]> {
    let mut out: Box<[u32]> = bases.into();
    if resized.is_empty() {
        return out;
    }
    resized.sort_unstable_by_key(|r| r.0);
    let mut shift = 0i64;
    let mut next = resized.iter().peekable();
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i64::from(*b) + shift).clamp(0, i64::from(u32::MAX)) as u32;
        while let Some(&&(at, d)) = next.peek() {
            if at != i {
                break;
            }
            shift += d;
            next.next();
        }
    }
    out
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

impl Table {
    /// An empty table (no services): every frame is passed to the kernel.
    #[must_use]
    pub fn empty(generation: u64) -> Self {
        Self::from_parts(generation, 0, Vec::new(), Vec::new(), Vec::new())
            .unwrap_or_else(|_| unreachable!("an empty table is always valid"))
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
        for (section, list, names_nodes) in [
            ("source range", &source_ranges, false),
            ("node prefix", &node_prefixes, true),
            ("node-port address", &node_port_prefixes, false),
        ] {
            check_prefixes(section, list, names_nodes)?;
        }
        check_records(0, &frontends, &backends, &ring, &source_ranges, &locals)?;
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

    /// A table of already built frontend blocks ([`Front::new`]), with the
    /// cluster's node prefixes, node-port addresses and policy. Checks the
    /// prefixes as [`Table::assemble`] does, and builds the frontend index,
    /// unless `share_index_of` is a table whose frontends have the same
    /// addresses, ports, protocols and kinds in the same order: then its
    /// index is shared. Each block carries the policy records of `policy`
    /// ([`Front::set_policy`]); blocks are taken as they are, shared.
    ///
    /// # Errors
    /// A bad prefix, a duplicate frontend, or a node prefix given for two
    /// nodes.
    pub fn from_blocks(
        generation: u64,
        hash_seed: u64,
        fronts: Vec<Arc<Front>>,
        node_prefixes: Vec<PrefixRecord>,
        node_port_prefixes: Vec<PrefixRecord>,
        policy: Arc<PolicyTable>,
        share_index_of: Option<&Table>,
    ) -> Result<Self, TableError> {
        check_prefixes("node prefix", &node_prefixes, true)?;
        check_prefixes("node-port address", &node_port_prefixes, false)?;
        let index = share_index_of
            .filter(|t| {
                t.fronts.len() == fronts.len()
                    && t.fronts
                        .iter()
                        .zip(&fronts)
                        .all(|(a, b)| a.key() == b.key() && a.kind == b.kind)
            })
            .map(|t| Arc::clone(&t.index));
        Self::from_fronts_with(
            generation,
            hash_seed,
            fronts,
            node_prefixes,
            node_port_prefixes,
            policy,
            index,
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
    #[must_use]
    pub fn same_policy(&self, prev: &Table) -> bool {
        Arc::ptr_eq(&self.policy, &prev.policy) || self.policy.parts() == prev.policy.parts()
    }

    /// Everything but the generation is `prev`'s: the same seed, node
    /// prefixes, node-port addresses and policy, and the very same frontend
    /// blocks (shared, as control's table builder shares a frontend whose
    /// spec did not change) in the same order. Such a table need not be published.
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

    /// This table as `generation`, with the blocks at the positions of
    /// `replaced` replaced by blocks of the same frontends (same address,
    /// port, protocol and kind), so the frontend index is shared. Costs one
    /// pointer per frontend. The new blocks carry the policy records of
    /// this table's policy ([`Front::set_policy`]).
    ///
    /// # Errors
    /// [`TableError::BadFrontend`] for a position past the end, or a block
    /// of another frontend or kind than the one it replaces.
    pub fn replace_blocks(
        &self,
        generation: u64,
        replaced: Vec<(usize, Arc<Front>)>,
    ) -> Result<Self, TableError> {
        let mut fronts = self.fronts.clone();
        for (i, f) in replaced {
            let bad = |what: String| TableError::BadFrontend { index: i, what };
            let Some(was) = fronts.get_mut(i) else {
                return Err(bad(format!(
                    "no frontend to replace (the table has {})",
                    self.fronts.len()
                )));
            };
            if was.key() != f.key() || was.kind != f.kind {
                return Err(bad(format!(
                    "{}:{}/{} kind {} cannot replace {}:{}/{} kind {} in place",
                    ip_from16(f.addr),
                    f.port,
                    f.proto,
                    f.kind,
                    ip_from16(was.addr),
                    was.port,
                    was.proto,
                    was.kind
                )));
            }
            *was = f;
        }
        Ok(Self {
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
        })
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
        // Frontends replaced in place whose backend count changed: index and
        // the change in count, to move the later backends' bases.
        let mut resized: Vec<(usize, i64)> = Vec::new();
        for f in &delta.changed.fronts {
            let mut f = Arc::clone(f);
            set_policy(&mut f, &self.policy);
            match self.frontend(&f.addr, f.port, proto_of(f.proto)?) {
                Some(fi) if !gone[fi as usize] => {
                    let old = &fronts[fi as usize];
                    // A node port stays a node port: the kind is part of
                    // the address rule the index enforces.
                    if old.kind != f.kind {
                        moved = true;
                    }
                    if old.backends_len != f.backends_len {
                        resized.push((
                            fi as usize,
                            i64::from(f.backends_len) - i64::from(old.backends_len),
                        ));
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
        // Every frontend where it was, with its kind (the common change):
        // the index and whether any is a node port stay as they were, and
        // the backends' bases move by the changed counts, without reading
        // every block.
        let (index, has_node_ports, backend_bases) = if moved {
            (
                Arc::new(build_index(delta.generation, &fronts).map_err(DeltaError::Table)?),
                fronts
                    .iter()
                    .any(|f| f.kind == FrontendKind::NodePort as u8),
                bases_of(&fronts),
            )
        } else {
            (
                Arc::clone(&self.index),
                self.has_node_ports,
                moved_bases(&self.backend_bases, &mut resized),
            )
        };
        Ok(Self {
            generation: delta.generation,
            hash_seed: self.hash_seed,
            has_node_ports,
            backend_bases,
            fronts,
            node_prefixes: self.node_prefixes.clone(),
            node_port_prefixes: self.node_port_prefixes.clone(),
            index,
            nodes: self.nodes.clone(),
            node_lens: self.node_lens.clone(),
            policy: Arc::clone(&self.policy),
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

    /// The frontends' blocks, in order, as the table shares them: a
    /// frontend whose block did not change between two tables (a delta
    /// left it alone) is the same `Arc` in both, so a follower finds the
    /// changed ones by pointer without reading every block; and a builder
    /// makes the next table from them ([`Table::replace_blocks`],
    /// [`Table::from_blocks`]).
    #[must_use]
    pub fn blocks(&self) -> &[Arc<Front>] {
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

    /// The name of the frontend at `index` (`ServiceSpec::name`; control
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

    /// A TCP ClusterIP record on `vip`, port 80, with `backends` backends
    /// and a ring of `ring` slots, its arrays starting at 0.
    fn record(vip: &str, backends: u32, ring: u32) -> FrontendRecord {
        FrontendRecord {
            addr: addr16(ip(vip)),
            port: 80,
            proto: Proto::Tcp.ip_number(),
            kind: FrontendKind::ClusterIp as u8,
            flags: 0,
            affinity_timeout_s: 0,
            backends_start: 0,
            backends_len: backends,
            ring_start: 0,
            ring_len: ring,
            return_path: ReturnPath::Routed as u8,
            reserved: [0; 3],
            ranges_start: 0,
            ranges_len: 0,
            locals_start: 0,
            locals_len: 0,
        }
    }

    fn backend(addr: &str) -> BackendRecord {
        BackendRecord {
            addr: addr16(ip(addr)),
            port: 8080,
            state: BackendState::Ready as u8,
            reserved: 0,
            weight: 1,
        }
    }

    /// The frontend-index prefetch aims where hashbrown put the index: every
    /// slot's control bytes are at the recorded address.
    #[test]
    fn the_frontend_prefetch_aims_at_the_index() {
        let frontends: Vec<FrontendRecord> = (0..300u32)
            .map(|i| record(&format!("198.19.{}.{}", i / 200, i % 200 + 1), 0, 0))
            .collect();
        let t = Table::from_parts(1, 0, frontends, Vec::new(), Vec::new()).unwrap();
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
        let e = Table::empty(1);
        assert_eq!(e.index.ctrl, 0);
        e.prefetch_frontend(&addr16(ip("198.19.0.1")), 80, Proto::Tcp);
    }

    /// A block is checked as a snapshot's records are: a ring slot naming a
    /// backend the block lacks, lengths that are not the arrays', or starts
    /// that are not 0, are refused with the frontend's index.
    #[test]
    fn a_block_is_checked_as_a_snapshot_is() {
        let parts = FrontParts {
            record: record("198.19.0.10", 2, 3),
            ring: vec![0, 1, 0],
            backends: vec![backend("198.18.1.1"), backend("198.18.1.2")],
            ranges: Vec::new(),
            locals: Vec::new(),
            name: "default/web".to_owned(),
        };
        let good = Front::new(4, parts.clone(), 9).unwrap();
        assert_eq!(
            (good.version(), good.name(), good.ring()),
            (9, "default/web", &[0, 1, 0][..])
        );
        let refusal = |edit: &dyn Fn(&mut FrontParts)| {
            let mut p = parts.clone();
            edit(&mut p);
            Front::new(4, p, 9).unwrap_err().to_string()
        };
        assert_eq!(
            refusal(&|p| p.ring[2] = 2),
            "frontend #4: ring slot names backend 2 of 2"
        );
        assert_eq!(
            refusal(&|p| p.record.backends_len = 1),
            "frontend #4: 1 backends in the record, 2 in the block"
        );
        assert_eq!(
            refusal(&|p| p.record.ring_start = 1),
            "frontend #4: a block's record starts its arrays at 0"
        );
        assert_eq!(
            refusal(&|p| p.backends[1].addr = addr16(ip("2001:2::1"))),
            "frontend 198.19.0.10: backend 2001:2::1 is of another IP family"
        );
        assert_eq!(
            refusal(&|p| p.name = "x".repeat(MAX_NAME_LEN + 1)),
            format!(
                "frontend #4 name: {} bytes, at most {MAX_NAME_LEN}",
                MAX_NAME_LEN + 1
            )
        );
    }

    /// A table of blocks shares the index of a table with the same
    /// frontends, refuses a duplicate, and a block replaces only the same
    /// frontend in place.
    #[test]
    fn tables_of_blocks_share_the_index_and_replace_in_place() {
        let block = |vip: &str, version| {
            Arc::new(
                Front::new(
                    0,
                    FrontParts {
                        record: record(vip, 1, 1),
                        ring: vec![0],
                        backends: vec![backend("198.18.1.1")],
                        ranges: Vec::new(),
                        locals: Vec::new(),
                        name: String::new(),
                    },
                    version,
                )
                .unwrap(),
            )
        };
        let policy = Arc::new(PolicyTable::default());
        let (a, b) = (block("198.19.0.10", 1), block("198.19.0.11", 1));
        let of = |fronts: Vec<Arc<Front>>, gen, share: Option<&Table>| {
            Table::from_blocks(
                gen,
                0,
                fronts,
                Vec::new(),
                Vec::new(),
                Arc::clone(&policy),
                share,
            )
        };
        let t1 = of(vec![Arc::clone(&a), Arc::clone(&b)], 1, None).unwrap();
        let t2 = of(vec![Arc::clone(&a), block("198.19.0.11", 2)], 2, Some(&t1)).unwrap();
        assert!(
            Arc::ptr_eq(&t1.index, &t2.index),
            "same frontends: index shared"
        );
        let t3 = of(vec![Arc::clone(&b), Arc::clone(&a)], 3, Some(&t2)).unwrap();
        assert!(
            !Arc::ptr_eq(&t2.index, &t3.index),
            "another order: index built"
        );
        assert_eq!(
            t3.frontend(&addr16(ip("198.19.0.10")), 80, Proto::Tcp),
            Some(1)
        );
        assert_eq!(
            of(vec![Arc::clone(&a), Arc::clone(&a)], 4, None)
                .unwrap_err()
                .to_string(),
            "frontend 198.19.0.10:80/TCP appears twice"
        );
        let t4 = t1
            .replace_blocks(4, vec![(1, block("198.19.0.11", 4))])
            .unwrap();
        assert_eq!(t4.frontends()[1].version(), 4);
        assert!(
            Arc::ptr_eq(&t4.blocks()[0], &a),
            "the other block is shared"
        );
        assert_eq!(
            t1.replace_blocks(4, vec![(0, block("198.19.0.11", 4))])
                .unwrap_err()
                .to_string(),
            "frontend #0: 198.19.0.11:80/6 kind 0 cannot replace 198.19.0.10:80/6 kind 0 in place"
        );
        assert!(t1
            .replace_blocks(4, vec![(2, block("198.19.0.12", 4))])
            .is_err());
    }
}
