//! Building service tables: from plain descriptions ([`ServiceSpec`],
//! [`TableSpec`]) to a [`Table`] the dataplane looks up, computing the
//! Maglev rings ([`crate::maglev`]).
//!
//! Owns: the spec types, [`RingSizes`] (the ring sizes a table keeps for
//! the next one), the [`TableBuild`] constructors (`Table::build`,
//! `build_full`, `build_keeping`, ...) and the incremental [`Builder`]
//! control uses, which rebuilds only the frontends whose spec changed and
//! shares every other block with the last table.
//!
//! Must never: make a table the dataplane's checks would refuse. Each block
//! goes through [`Front::new`] and each table through [`Table::from_blocks`]
//! or [`Table::replace_blocks`], the same checks a snapshot's records pass
//! ([`Table::assemble`]); nothing here knows the table's insides.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;

use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::policy::{PolicyParts, PolicyTable};
use clustergate_dataplane::table::{
    BackendRecord, BackendState, Delta, Front, FrontKey, FrontParts, FrontendKind, FrontendRecord,
    LocalRecord, PrefixRecord, ReturnPath, Table, TableError, FRONTEND_AFFINITY,
    FRONTEND_NODE_LOCAL, FRONTEND_SOURCE_RANGES, MAX_BACKENDS_PER_FRONTEND, MAX_NAME_LEN,
};
use hashbrown::HashMap;
use ipnet::IpNet;

use super::maglev::{build_ring, ring_size_after, MaglevBackend, DEFAULT_MAX_RING_SIZE};

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
    /// unknown. Never used on the packet path (`Table::frontend_name`).
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

/// The Maglev ring sizes of a table, by ring ([`TableBuild::ring_sizes`]): what
/// [`TableBuild::build_keeping`] keeps for the next table of the same frontends,
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

/// The constructors of a [`Table`] from specs, and what a writer asks of
/// two tables: `use clustergate_builder::TableBuild;` and
/// `Table::build(..)` reads as it always did.
pub trait TableBuild: Sized {
    /// Builds a table from plain descriptions, computing Maglev rings capped at
    /// [`DEFAULT_MAX_RING_SIZE`].
    ///
    /// # Errors
    /// Duplicate frontends, mixed IP families, or backends Maglev refuses.
    fn build(generation: u64, hash_seed: u64, services: &[ServiceSpec])
        -> Result<Self, TableError>;

    /// As [`TableBuild::build`], with a ring-size cap.
    ///
    /// # Errors
    /// As [`TableBuild::build`].
    fn build_with_cap(
        generation: u64,
        hash_seed: u64,
        services: &[ServiceSpec],
        max_ring: u32,
    ) -> Result<Self, TableError>;

    /// Builds a table from a whole [`TableSpec`]: frontends of every kind,
    /// with their source ranges and per-node rings, the nodes' prefixes and
    /// the node-port addresses.
    ///
    /// # Errors
    /// As [`TableBuild::build`]; also a source range of another family than its
    /// frontend, a backend on a node that has no prefix, or a node prefix
    /// given twice.
    fn build_full(
        generation: u64,
        hash_seed: u64,
        spec: &TableSpec,
        max_ring: u32,
    ) -> Result<Self, TableError>;

    /// As [`TableBuild::build_full`], keeping each ring's size from `previous`
    /// (usually [`TableBuild::ring_sizes`] of the table this one replaces) while
    /// that size still serves the ring's backends
    /// (`maglev::ring_size_after`). The same spec and the same `previous`
    /// always give the same table, byte for byte.
    ///
    /// # Errors
    /// As [`TableBuild::build_full`].
    fn build_keeping(
        generation: u64,
        hash_seed: u64,
        spec: &TableSpec,
        max_ring: u32,
        previous: &RingSizes,
    ) -> Result<Self, TableError>;

    /// The size of every ring, by frontend (and node): what
    /// [`TableBuild::build_keeping`] takes to keep them in the next table.
    #[must_use]
    fn ring_sizes(&self) -> RingSizes;

    /// The delta from `prev` to this table: the frontends this one lacks,
    /// and the blocks this one does not share with `prev`. `None` when the
    /// rest differs (nodes, node-port addresses, policy, seed): then only a
    /// full snapshot says it. What the snapshot writer publishes as a delta
    /// file.
    #[must_use]
    fn delta_from(&self, prev: &Table) -> Option<Delta>;
}

impl TableBuild for Table {
    fn build(
        generation: u64,
        hash_seed: u64,
        services: &[ServiceSpec],
    ) -> Result<Self, TableError> {
        Self::build_with_cap(generation, hash_seed, services, DEFAULT_MAX_RING_SIZE)
    }

    fn build_with_cap(
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

    fn build_full(
        generation: u64,
        hash_seed: u64,
        spec: &TableSpec,
        max_ring: u32,
    ) -> Result<Self, TableError> {
        Self::build_keeping(generation, hash_seed, spec, max_ring, &RingSizes::default())
    }

    fn build_keeping(
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
            Front::set_policy(f, &policy);
        }
        Table::from_blocks(
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
            None,
        )
    }

    fn ring_sizes(&self) -> RingSizes {
        let mut sizes = RingSizes::default();
        for f in self.frontends() {
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

    fn delta_from(&self, prev: &Table) -> Option<Delta> {
        if self.hash_seed() != prev.hash_seed()
            || self.node_prefix_records() != prev.node_prefix_records()
            || self.node_port_prefix_records() != prev.node_port_prefix_records()
            || !self.same_policy(prev)
            || self.generation() <= prev.generation()
        {
            return None;
        }
        let (now, before) = (self.blocks(), prev.blocks());
        // The same frontends at the same places (most changes): no lookups.
        let same_places =
            now.len() == before.len() && now.iter().zip(before).all(|(a, b)| a.key() == b.key());
        let mut removed = Vec::new();
        if !same_places {
            for f in before {
                if self
                    .frontend(&f.addr, f.port, Proto::from_ip_number(f.proto)?)
                    .is_none()
                {
                    removed.push(f.key());
                }
            }
        }
        let changed: Vec<Arc<Front>> = now
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                let was = if same_places {
                    before.get(*i).map(|p| &**p)
                } else {
                    Proto::from_ip_number(f.proto)
                        .and_then(|p| prev.frontend(&f.addr, f.port, p))
                        .map(|pi| &*before[pi as usize])
                };
                was.is_none_or(|p| p.version() != f.version())
            })
            .map(|(_, f)| Arc::clone(f))
            .collect();
        let changed = Table::from_blocks(
            self.generation(),
            self.hash_seed(),
            changed,
            Vec::new(),
            Vec::new(),
            Arc::new(PolicyTable::default()),
            None,
        )
        .ok()?;
        Some(Delta {
            generation: self.generation(),
            base: prev.generation(),
            removed,
            changed,
        })
    }
}

/// The unspecified address of a family: where node ports live in a table.
fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
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
        let slots = build_ring(mb, m).map_err(|e| TableError::Maglev {
            frontend: name.clone(),
            what: e.to_string(),
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
    let record = FrontendRecord {
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
    };
    // Checked as a snapshot's records are: a bug here is refused, not
    // published.
    Front::new(
        index,
        FrontParts {
            record,
            ring,
            backends,
            ranges,
            locals,
            name: label.to_owned(),
        },
        version,
    )
}

/// Builds tables from specs, rebuilding only the frontends whose spec
/// changed since the last build (control's side): an unchanged frontend's
/// block, ring included, is shared with the last table, and keeps its
/// version, so [`TableBuild::delta_from`] leaves it out.
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
    /// The last table built: the next one with the same frontend keys and
    /// kinds in the same order shares its index.
    last: Option<Table>,
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
            last: None,
            nodes: Vec::new(),
            policy: Arc::new(PolicyTable::default()),
        }
    }

    /// The table of `spec` as generation `generation`: the same table
    /// [`TableBuild::build_keeping`] makes (byte for byte in a snapshot), with
    /// the frontends whose spec did not change shared with the last one.
    /// When it fails, the blocks it built stay cached (they are what their
    /// specs give), and the last table's are still there.
    ///
    /// # Errors
    /// As [`TableBuild::build_keeping`].
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
                        Front::set_policy(&mut front, &policy);
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
                            .locals()
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
                Front::set_policy(&mut f, &policy);
                f
            };
            self.built
                .insert(key, (s.clone(), Arc::clone(&front), generation));
            fronts.push(front);
        }
        let table = Table::from_blocks(
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
            self.last.as_ref(),
        )?;
        self.last = Some(table.clone());
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
    /// As [`TableBuild::build_keeping`], for the changed frontends.
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
            let Some(was) = last.blocks().get(index) else {
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
                        .locals()
                        .iter()
                        .find(|l| l.node == n)
                        .map(|l| l.ring_len)
                        .filter(|&m| m > 0),
                },
                generation,
                &mut mb,
            )?);
            Front::set_policy(&mut f, &self.policy);
            built.push((key, s.clone(), Arc::clone(&f)));
            replaced.push((index, f));
        }
        if replaced.is_empty() {
            return Ok(Update::Unchanged);
        }
        for (key, spec, f) in built {
            self.built.insert(key, (spec, f, generation));
        }
        Ok(Update::Table(last.replace_blocks(generation, replaced)?))
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
// Not again in the dataplane's unit tests, which compile these sources
// (`clustergate_dataplane::test_builder`).
#[cfg(all(test, not(clustergate_builder_in_dataplane)))]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;
    use clustergate_dataplane::flow::{ip_from16, FlowTuple};
    use clustergate_dataplane::table::{DeltaError, TableParts};

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
