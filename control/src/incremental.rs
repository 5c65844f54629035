//! An incremental model: the [`Model`] of [`build_model`](crate::model::build_model), kept up to date
//! as objects change, at a cost that grows with what changed, not with the
//! cluster.
//!
//! Owns: [`IncrementalModel`]. Objects come in per *source* (a file of a
//! manifest directory, or one object of the API source, see [`api_source`]):
//! [`IncrementalModel::set_source`] replaces a source's objects, and only
//! those that differ at their position are taken up. A
//! change marks dirty only what it touches:
//! - a Service, or an EndpointSlice: the Service it is (or names, before and
//!   after the change);
//! - a Service whose cluster IPs change: also the Services with an external
//!   or load-balancer IP among them;
//! - a frontend key (address, port, protocol) claimed anew: the Services
//!   claiming it; a health-check node port: the Services asking for it;
//! - a Node: every Service's backends (node numbers); a Pod, Namespace or
//!   NetworkPolicy: the policy part only.
//!
//! [`IncrementalModel::model`] then brings the model up to date: frontends
//! are spliced into [`Model::frontends`] per Service, and skipped entries and
//! notes are counted per contribution, so the result equals [`build_model`](crate::model::build_model)
//! on the objects of all sources merged as
//! [`crate::manifest_dir::merge_files`] merges them (the same frontends, skipped list, notes,
//! errors in the same order, health checks, nodes and policy); the tests
//! (`tests/incremental.rs`) check it after every step of random changes.
//!
//! Still O(all objects) per change: nothing on Service and EndpointSlice
//! changes. A Node change revisits every Service's frontends; a policy
//! object change rebuilds the policy set from all Pods, Namespaces and
//! NetworkPolicies; [`Model::table_spec`] (outside) walks every frontend.
//!
//! Must never: differ from [`build_model`](crate::model::build_model) on the same objects, or panic.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clustergate_dataplane::flow::Proto;
use clustergate_dataplane::table::FrontendKind;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::manifest::{identity, label, ManifestError, Objects, Skipped};
use crate::manifest_dir::ManifestDir;
use crate::model::{
    endpoint_string, frontends_of, kind_name, nodes_of, notes_of, skip_reason, validate_service,
    validate_slice, Frontend, HealthCheck, Model, ModelError, ModelOptions, Served, Skips,
    DUPLICATE_THEN, HEADLESS_LABEL, SERVICE_NAME_LABEL,
};
use crate::policy::PolicySet;

/// `(namespace, name)`; `("", name)` for Nodes and Namespaces.
type Id = (String, String);

/// Where an object is: its source (a file name) and its index among the
/// objects of its kind there. Sources in name order, then index: the order of
/// [`crate::manifest_dir::merge_files`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Pos {
    source: Arc<str>,
    index: u32,
}

/// The object kinds, in the order a source lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service = 0,
    Slice = 1,
    Node = 2,
    Pod = 3,
    Namespace = 4,
    Policy = 5,
}

impl Kind {
    const fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::Slice => "EndpointSlice",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Namespace => "Namespace",
            Self::Policy => "NetworkPolicy",
        }
    }

    /// Nodes and Namespaces have no namespace.
    const fn namespaced(self) -> bool {
        !matches!(self, Self::Node | Self::Namespace)
    }
}

/// Where an error goes in [`Model::errors`]: [`build_model`](crate::model::build_model)'s order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ErrKey {
    /// The objects' own errors: per source, a copy of an object of an
    /// earlier source (by kind, then index), then what could not be read.
    Objects(Arc<str>, u8, u32),
    /// A Service copy, and its n-th error.
    Service(Pos, u32),
    /// An EndpointSlice copy, and its n-th error.
    Slice(Pos, u32),
    /// A clash of two cluster IP frontends, in frontend order.
    Conflict(ClaimKey),
}

/// A frontend in [`build_model`](crate::model::build_model)'s conflict order: kind, service, port
/// name, address, protocol.
type ClaimKey = (u8, String, String, IpAddr, Proto);
/// What a frontend claims: one frontend per address, port and protocol.
type Claim = (IpAddr, u16, Proto);

fn claim_key(f: &Frontend) -> ClaimKey {
    (
        f.kind as u8,
        f.service.clone(),
        f.port_name.clone(),
        f.address,
        f.protocol,
    )
}

/// What owns a set of skipped entries, notes and errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    /// The copies of one object: duplicates.
    Group(Kind, Id),
    /// An EndpointSlice that belongs to no Service by its labels.
    SliceSelf(Id),
    /// A Service (and its slices) validated.
    Validated(Id),
    /// A Service's frontends and backends.
    Frontends(Id),
    /// A Service's frontends kept, its health check and notes.
    Resolved(Id),
    /// The Nodes.
    Nodes,
    /// The policy set.
    Policy,
    /// A source's own skipped entries and errors.
    Source(Arc<str>),
}

/// A Service (namespace, name) and what was derived from it.
#[derive(Debug, Default)]
struct Unit {
    /// `"ns/name"`.
    key: String,
    /// The primary EndpointSlices naming it, by position.
    slices: BTreeSet<(Pos, Id)>,
    served: Option<Served>,
    /// Its cluster IPs (served only).
    cluster_ips: Vec<IpAddr>,
    /// Its external and load-balancer IPs (served only).
    outer_ips: Vec<IpAddr>,
    /// Its frontends before conflicts are resolved.
    candidates: Vec<Frontend>,
    /// Distinct backend addresses, for its health check.
    endpoints: usize,
    health_port: Option<u16>,
}

/// Counts of equal entries; the sorted, distinct list of those present.
#[derive(Debug, Default)]
struct Counted {
    count: HashMap<Skipped, usize>,
}

impl Counted {
    fn add(&mut self, list: &mut Vec<Skipped>, s: &Skipped) {
        let n = self.count.entry(s.clone()).or_default();
        *n += 1;
        if *n == 1 {
            if let Err(i) = list.binary_search(s) {
                list.insert(i, s.clone());
            }
        }
    }

    fn remove(&mut self, list: &mut Vec<Skipped>, s: &Skipped) {
        if let Some(n) = self.count.get_mut(s) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(s);
                if let Ok(i) = list.binary_search(s) {
                    list.remove(i);
                }
            }
        }
    }
}

/// The objects of one source, by kind, as identities in index order.
#[derive(Debug, Default)]
struct SourceIds {
    ids: [Vec<Id>; 6],
    skipped: Vec<Skipped>,
    errors: Vec<ManifestError>,
    error: Option<String>,
}

/// Every copy of each object, by identity.
type Copies<T> = HashMap<Id, BTreeMap<Pos, T>>;

/// A [`Model`] kept up to date per change (see the module docs).
#[derive(Debug)]
pub struct IncrementalModel {
    options: ModelOptions,
    /// The directory the sources are files of (for duplicate messages).
    dir: PathBuf,
    sources: BTreeMap<Arc<str>, SourceIds>,
    services: Copies<Service>,
    slices: Copies<EndpointSlice>,
    nodes: Copies<Node>,
    pods: Copies<Pod>,
    namespaces: Copies<Namespace>,
    policies: Copies<NetworkPolicy>,
    /// The Service each EndpointSlice's primary copy names, with its position.
    slice_unit: HashMap<Id, (Pos, Id)>,
    units: HashMap<Id, Unit>,
    /// The served Services that have each cluster IP (the first owns it).
    cluster_ips: HashMap<IpAddr, BTreeSet<Id>>,
    /// The served Services with each external or load-balancer IP.
    outer_ips: HashMap<IpAddr, BTreeSet<Id>>,
    /// Candidate frontends of each claim, with their number of copies.
    claims: HashMap<Claim, BTreeMap<ClaimKey, usize>>,
    /// The served Services asking for each health-check node port.
    health_ports: HashMap<u16, BTreeSet<Id>>,
    node_numbers: HashMap<String, u32>,
    skips: HashMap<Owner, Vec<Skipped>>,
    skip_count: Counted,
    notes: HashMap<Owner, Vec<Skipped>>,
    note_count: Counted,
    error_keys: HashMap<Owner, Vec<ErrKey>>,
    /// Each with its owner: a position may change owners in one update.
    errors: BTreeMap<ErrKey, (Owner, ModelError)>,
    health: BTreeMap<Id, HealthCheck>,
    dirty_groups: HashSet<(Kind, Id)>,
    dirty_units: BTreeSet<Id>,
    nodes_dirty: bool,
    policy_dirty: bool,
    errors_dirty: bool,
    health_dirty: bool,
    /// Counts the updates that changed the model.
    version: u64,
    model: Model,
    /// Since the last [`IncrementalModel::take_table_changes`]: the
    /// Services whose frontends changed, and whether anything else of the
    /// tables changed (nodes, policy, or a frontend added, removed or moved).
    table_changes: TableChanges,
}

/// What changed in the dataplane's tables of the model
/// ([`Model::table_spec`]) since the last look
/// ([`IncrementalModel::take_table_changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableChanges {
    /// The Services (`"ns/name"`) whose frontends changed, sorted.
    pub services: BTreeSet<String>,
    /// Something beyond those frontends' specs changed: the nodes, the
    /// policy, or the list of frontends itself (one added, removed, or
    /// given another address, port, protocol or kind), so that the whole
    /// table must be built. Also true on the first look.
    pub whole: bool,
}

fn id_of(kind: Kind, meta: &ObjectMeta) -> Id {
    if kind.namespaced() {
        let (ns, name) = identity(meta);
        (ns.to_owned(), name.to_owned())
    } else {
        (String::new(), meta.name.clone().unwrap_or_default())
    }
}

fn object_name(kind: Kind, id: &Id) -> String {
    if id.0.is_empty() && !kind.namespaced() {
        format!("{} {}", kind.name(), id.1)
    } else {
        format!("{} {}/{}", kind.name(), id.0, id.1)
    }
}

/// Replaces the copies of one kind at `source` by `new`; marks the groups
/// whose copies changed.
fn replace<T: Clone + PartialEq>(
    copies: &mut Copies<T>,
    kind: Kind,
    meta: impl Fn(&T) -> &ObjectMeta,
    source: &Arc<str>,
    old: &[Id],
    new: &[T],
    dirty: &mut HashSet<(Kind, Id)>,
) -> (Vec<Id>, u64) {
    let mut ids = Vec::with_capacity(new.len());
    let mut changed = 0;
    for i in 0..old.len().max(new.len()) {
        let pos = Pos {
            source: Arc::clone(source),
            index: u32::try_from(i).unwrap_or(u32::MAX),
        };
        let new_id = new.get(i).map(|o| id_of(kind, meta(o)));
        if let (Some(old_id), Some(new_id), Some(o)) = (old.get(i), new_id.as_ref(), new.get(i)) {
            if old_id == new_id && copies.get(old_id).and_then(|c| c.get(&pos)) == Some(o) {
                ids.push(new_id.clone());
                continue;
            }
        }
        changed += 1;
        if let Some(old_id) = old.get(i) {
            if let Some(c) = copies.get_mut(old_id) {
                c.remove(&pos);
                if c.is_empty() {
                    copies.remove(old_id);
                }
            }
            dirty.insert((kind, old_id.clone()));
        }
        if let (Some(new_id), Some(o)) = (new_id, new.get(i)) {
            copies
                .entry(new_id.clone())
                .or_default()
                .insert(pos, o.clone());
            dirty.insert((kind, new_id.clone()));
            ids.push(new_id);
        }
    }
    (ids, changed)
}

/// The copies of all objects of one kind that a manifest directory's
/// objects keep (those of the first source that has the object), in order.
fn kept_copies<T>(copies: &Copies<T>) -> Vec<(&Pos, &T)> {
    let mut out: Vec<(&Pos, &T)> = Vec::new();
    for c in copies.values() {
        let Some((first, _)) = c.first_key_value() else {
            continue;
        };
        out.extend(c.iter().filter(|(p, _)| p.source == first.source));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// The primary copy (the first) of an object, with its position.
fn primary<'a, T>(copies: &'a Copies<T>, id: &Id) -> Option<(&'a Pos, &'a T)> {
    copies.get(id).and_then(BTreeMap::first_key_value)
}

/// The Service an EndpointSlice belongs to by its labels, or why none.
fn slice_owner(slice: &EndpointSlice, ns: &str) -> Result<Id, (&'static str, String)> {
    let labels = slice.metadata.labels.as_ref();
    let Some(svc_name) = labels
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
    else {
        return Err((
            label::NO_SERVICE,
            format!("no {SERVICE_NAME_LABEL} label: it belongs to no Service"),
        ));
    };
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Err((
            label::NOT_PROXIED,
            format!("labelled {HEADLESS_LABEL} (endpoints of a headless Service)"),
        ));
    }
    Ok((ns.to_owned(), svc_name.clone()))
}

impl IncrementalModel {
    /// An empty model; `dir` is the manifest directory the sources are files
    /// of (it names them in duplicate messages).
    #[must_use]
    pub fn new(options: ModelOptions, dir: &Path) -> Self {
        let model = Model {
            node_port_addresses: options.node_port_addresses.clone(),
            ..Model::default()
        };
        Self {
            options,
            dir: dir.to_owned(),
            sources: BTreeMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            nodes: HashMap::new(),
            pods: HashMap::new(),
            namespaces: HashMap::new(),
            policies: HashMap::new(),
            slice_unit: HashMap::new(),
            units: HashMap::new(),
            cluster_ips: HashMap::new(),
            outer_ips: HashMap::new(),
            claims: HashMap::new(),
            health_ports: HashMap::new(),
            node_numbers: HashMap::new(),
            skips: HashMap::new(),
            skip_count: Counted::default(),
            notes: HashMap::new(),
            note_count: Counted::default(),
            error_keys: HashMap::new(),
            errors: BTreeMap::new(),
            health: BTreeMap::new(),
            dirty_groups: HashSet::new(),
            dirty_units: BTreeSet::new(),
            nodes_dirty: true,
            policy_dirty: true,
            errors_dirty: true,
            health_dirty: true,
            version: 0,
            model,
            table_changes: TableChanges {
                services: BTreeSet::new(),
                whole: true,
            },
        }
    }

    /// Replaces the objects of `source` (a file name) with `objects` (`None`:
    /// the source is gone). `error`: why the source as it is now was not read
    /// (its `objects` are then the last good ones). Only objects that differ
    /// at their position (kind, index) are taken up. Returns the number of
    /// Services and of EndpointSlices that changed.
    pub fn set_source(
        &mut self,
        source: &str,
        objects: Option<&Objects>,
        error: Option<&str>,
    ) -> (u64, u64) {
        let key: Arc<str> = self
            .sources
            .get_key_value(source)
            .map_or_else(|| Arc::from(source), |(k, _)| Arc::clone(k));
        let old = self.sources.remove(source).unwrap_or_default();
        let empty = Objects::default();
        let new = objects.unwrap_or(&empty);
        let d = &mut self.dirty_groups;
        let [o0, o1, o2, o3, o4, o5] = &old.ids;
        let (s0, services) = replace(
            &mut self.services,
            Kind::Service,
            |o| &o.metadata,
            &key,
            o0,
            &new.services,
            d,
        );
        let (s1, slices) = replace(
            &mut self.slices,
            Kind::Slice,
            |o| &o.metadata,
            &key,
            o1,
            &new.slices,
            d,
        );
        let (s2, n) = replace(
            &mut self.nodes,
            Kind::Node,
            |o| &o.metadata,
            &key,
            o2,
            &new.nodes,
            d,
        );
        self.nodes_dirty |= n > 0;
        let (s3, a) = replace(
            &mut self.pods,
            Kind::Pod,
            |o| &o.metadata,
            &key,
            o3,
            &new.pods,
            d,
        );
        let (s4, b) = replace(
            &mut self.namespaces,
            Kind::Namespace,
            |o| &o.metadata,
            &key,
            o4,
            &new.namespaces,
            d,
        );
        let (s5, c) = replace(
            &mut self.policies,
            Kind::Policy,
            |o| &o.metadata,
            &key,
            o5,
            &new.policies,
            d,
        );
        self.policy_dirty |= a + b + c > 0;
        let ids = SourceIds {
            ids: [s0, s1, s2, s3, s4, s5],
            skipped: new.skipped.clone(),
            errors: new.errors.clone(),
            error: error.map(str::to_owned),
        };
        if ids.skipped != old.skipped || ids.errors != old.errors || ids.error != old.error {
            let mut skips = ids.skipped.clone();
            if let Some(e) = &ids.error {
                skips.push(Skipped::new(
                    format!("file {}", self.dir.join(&*key).display()),
                    label::INVALID_VALUE,
                    format!("{e}; the file's last good objects are kept"),
                ));
            }
            let errors = ids
                .errors
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let i = u32::try_from(i).unwrap_or(u32::MAX);
                    (
                        ErrKey::Objects(Arc::clone(&key), 6, i),
                        ModelError::Unreadable(e.clone()),
                    )
                })
                .collect();
            let owner = Owner::Source(Arc::clone(&key));
            self.set_skips(owner.clone(), skips);
            self.set_errors(owner, errors);
        }
        if objects.is_some() {
            self.sources.insert(key, ids);
        }
        (services, slices)
    }

    /// Takes up the files of `dir` named in `names` (`None`: every file it
    /// has, and forgets the sources it no longer has). Returns the number of
    /// Services and of EndpointSlices that changed.
    pub fn sync_dir(&mut self, dir: &ManifestDir, names: Option<&[String]>) -> (u64, u64) {
        let names: Vec<String> = match names {
            Some(n) => n.to_vec(),
            None => {
                let mut all: BTreeSet<String> =
                    self.sources.keys().map(|k| k.to_string()).collect();
                all.extend(dir.names().map(str::to_owned));
                all.into_iter().collect()
            }
        };
        let (mut services, mut slices) = (0, 0);
        for name in names {
            let (a, b) = match dir.file(&name) {
                Some((objects, error)) => self.set_source(&name, Some(objects), error),
                None => self.set_source(&name, None, None),
            };
            services += a;
            slices += b;
        }
        (services, slices)
    }

    /// Sets one object of the API source (`objects` holds it alone), or
    /// removes it (`None`). Each object is a source of its own, named by
    /// [`api_source`], so that objects are in the API source's order (by
    /// namespace, then name). Returns the number of Services and of
    /// EndpointSlices that changed.
    pub fn set_api_object(&mut self, source: &str, objects: Option<&Objects>) -> (u64, u64) {
        self.set_source(source, objects, None)
    }

    /// Counts the updates that changed the model (frontends, skipped
    /// entries, notes, errors, health checks, nodes or policy): the same
    /// version after [`IncrementalModel::model`] means the same model.
    pub fn version(&mut self) -> u64 {
        self.flush();
        self.version
    }

    /// The model of the objects now, brought up to date.
    pub fn model(&mut self) -> &Model {
        self.flush();
        &self.model
    }

    /// What changed in the model's tables since the last call (the first
    /// call: everything), brought up to date: a publisher that built the
    /// last tables from [`IncrementalModel::model`] rebuilds only these
    /// Services' frontends, in place, unless [`TableChanges::whole`].
    pub fn take_table_changes(&mut self) -> TableChanges {
        self.flush();
        std::mem::take(&mut self.table_changes)
    }

    fn set_skips(&mut self, owner: Owner, new: Vec<Skipped>) {
        let old = if new.is_empty() {
            self.skips.remove(&owner).unwrap_or_default()
        } else {
            self.skips.insert(owner, new.clone()).unwrap_or_default()
        };
        if old == new {
            return;
        }
        self.version += 1;
        for s in &new {
            self.skip_count.add(&mut self.model.skipped, s);
        }
        for s in &old {
            self.skip_count.remove(&mut self.model.skipped, s);
        }
    }

    fn set_notes(&mut self, owner: Owner, new: Vec<Skipped>) {
        let old = if new.is_empty() {
            self.notes.remove(&owner).unwrap_or_default()
        } else {
            self.notes.insert(owner, new.clone()).unwrap_or_default()
        };
        if old == new {
            return;
        }
        self.version += 1;
        for s in &new {
            self.note_count.add(&mut self.model.notes, s);
        }
        for s in &old {
            self.note_count.remove(&mut self.model.notes, s);
        }
    }

    fn set_errors(&mut self, owner: Owner, new: Vec<(ErrKey, ModelError)>) {
        let old = self.error_keys.remove(&owner).unwrap_or_default();
        if old.is_empty() && new.is_empty() {
            return;
        }
        for k in &old {
            if self.errors.get(k).is_some_and(|(o, _)| *o == owner) {
                self.errors.remove(k);
            }
        }
        let mut keys = Vec::with_capacity(new.len());
        for (k, e) in new {
            keys.push(k.clone());
            self.errors.insert(k, (owner.clone(), e));
        }
        if !keys.is_empty() {
            self.error_keys.insert(owner, keys);
        }
        self.errors_dirty = true;
    }

    /// Duplicates of one object: copies in a later source than the first
    /// (the directory's duplicates), and, for Services and EndpointSlices,
    /// later copies in the first's source ([`build_model`](crate::model::build_model)'s).
    fn group_changed(&mut self, kind: Kind, id: &Id) {
        let positions: Vec<Pos> = match kind {
            Kind::Service => keys(&self.services, id),
            Kind::Slice => keys(&self.slices, id),
            Kind::Node => keys(&self.nodes, id),
            Kind::Pod => keys(&self.pods, id),
            Kind::Namespace => keys(&self.namespaces, id),
            Kind::Policy => keys(&self.policies, id),
        };
        let mut skips = Vec::new();
        let mut errors = Vec::new();
        if let Some(first) = positions.first() {
            let object = object_name(kind, id);
            for pos in positions.iter().skip(1) {
                if pos.source != first.source {
                    let message = format!(
                        "in both {} and {}; the one in {} (first in name order) is used",
                        self.dir.join(&*first.source).display(),
                        self.dir.join(&*pos.source).display(),
                        self.dir.join(&*first.source).display(),
                    );
                    skips.push(Skipped::new(
                        object.clone(),
                        label::DUPLICATE,
                        message.clone(),
                    ));
                    errors.push((
                        ErrKey::Objects(Arc::clone(&pos.source), kind as u8, pos.index),
                        ModelError::Unreadable(ManifestError::Object {
                            object: object.clone(),
                            message,
                        }),
                    ));
                } else if matches!(kind, Kind::Service | Kind::Slice) {
                    let e = ModelError::Duplicate {
                        object: object.clone(),
                    };
                    let mut s = Skips::default();
                    s.refuse(e, label::DUPLICATE, DUPLICATE_THEN);
                    skips.append(&mut s.list);
                    let key = if kind == Kind::Service {
                        ErrKey::Service(pos.clone(), 0)
                    } else {
                        ErrKey::Slice(pos.clone(), 0)
                    };
                    errors.extend(s.errors.into_iter().map(|e| (key.clone(), e)));
                }
            }
        }
        let owner = Owner::Group(kind, id.clone());
        self.set_skips(owner.clone(), skips);
        self.set_errors(owner, errors);
        match kind {
            Kind::Service => {
                self.dirty_units.insert(id.clone());
            }
            Kind::Slice => self.slice_changed(id),
            Kind::Node => self.nodes_dirty = true,
            Kind::Pod | Kind::Namespace | Kind::Policy => self.policy_dirty = true,
        }
    }

    /// Moves an EndpointSlice to the Service its primary copy names now.
    fn slice_changed(&mut self, id: &Id) {
        let now =
            primary(&self.slices, id).map(|(pos, slice)| (pos.clone(), slice_owner(slice, &id.0)));
        let mut self_skip = Vec::new();
        let unit_now = match now {
            Some((pos, Ok(unit))) => Some((pos, unit)),
            Some((_, Err((label, reason)))) => {
                self_skip.push(Skipped::new(object_name(Kind::Slice, id), label, reason));
                None
            }
            None => None,
        };
        self.set_skips(Owner::SliceSelf(id.clone()), self_skip);
        let before = self.slice_unit.remove(id);
        if let Some((pos, unit)) = &before {
            if let Some(u) = self.units.get_mut(unit) {
                u.slices.remove(&(pos.clone(), id.clone()));
            }
            self.dirty_units.insert(unit.clone());
        }
        if let Some((pos, unit)) = unit_now {
            self.units
                .entry(unit.clone())
                .or_default()
                .slices
                .insert((pos.clone(), id.clone()));
            self.dirty_units.insert(unit.clone());
            self.slice_unit.insert(id.clone(), (pos, unit));
        }
    }

    fn flush(&mut self) {
        let groups: Vec<(Kind, Id)> = self.dirty_groups.drain().collect();
        for (kind, id) in groups {
            self.group_changed(kind, &id);
        }
        let mut frontends_dirty: BTreeSet<Id> = BTreeSet::new();
        if self.nodes_dirty {
            self.nodes_dirty = false;
            let kept = kept_copies(&self.nodes);
            let mut skips = Skips::default();
            let (nodes, numbers) = nodes_of(kept.into_iter().map(|(_, n)| n), &mut skips);
            if self.model.nodes != nodes {
                self.model.nodes = nodes;
                self.version += 1;
                self.table_changes.whole = true;
            }
            self.set_skips(Owner::Nodes, skips.list);
            if numbers != self.node_numbers {
                self.node_numbers = numbers;
                frontends_dirty.extend(
                    self.units
                        .iter()
                        .filter(|(_, u)| u.served.is_some())
                        .map(|(id, _)| id.clone()),
                );
            }
        }
        let validate: Vec<Id> = std::mem::take(&mut self.dirty_units).into_iter().collect();
        for id in &validate {
            self.validate(id, &mut frontends_dirty);
        }
        frontends_dirty.extend(validate);
        let mut resolve = BTreeSet::new();
        for id in &frontends_dirty {
            self.frontends(id, &mut resolve);
        }
        resolve.extend(frontends_dirty);
        for id in &resolve {
            self.resolve(id);
        }
        if self.policy_dirty {
            self.policy_dirty = false;
            let pods: Vec<Pod> = kept_copies(&self.pods)
                .into_iter()
                .map(|(_, o)| o.clone())
                .collect();
            let namespaces: Vec<Namespace> = kept_copies(&self.namespaces)
                .into_iter()
                .map(|(_, o)| o.clone())
                .collect();
            let policies: Vec<NetworkPolicy> = kept_copies(&self.policies)
                .into_iter()
                .map(|(_, o)| o.clone())
                .collect();
            let policy = PolicySet::new(&pods, &namespaces, &policies);
            let mut skips = Skips::default();
            for p in &policy.problems {
                let (object, reason) = p.split_once(": ").unwrap_or((p.as_str(), ""));
                skips.skip(object, label::INVALID_VALUE, reason);
            }
            self.set_skips(Owner::Policy, skips.list);
            if self.model.policy != policy {
                self.model.policy = policy;
                self.version += 1;
                self.table_changes.whole = true;
            }
        }
        if self.errors_dirty {
            self.errors_dirty = false;
            let errors: Vec<ModelError> = self.errors.values().map(|(_, e)| e.clone()).collect();
            if errors != self.model.errors {
                self.model.errors = errors;
                self.version += 1;
            }
        }
        if self.health_dirty {
            self.health_dirty = false;
            let mut health: Vec<HealthCheck> = self.health.values().cloned().collect();
            health.sort();
            if health != self.model.health_checks {
                self.model.health_checks = health;
                self.version += 1;
            }
        }
    }

    /// Validates a Service and its slices; marks for [`Self::frontends`]
    /// the Services whose external IPs meet its changed cluster IPs.
    fn validate(&mut self, id: &Id, frontends_dirty: &mut BTreeSet<Id>) {
        let (ns, name) = (id.0.as_str(), id.1.as_str());
        let svc = primary(&self.services, id);
        let object = format!("Service {ns}/{name}");
        let mut skips = Skips::default();
        let mut errors = Vec::new();
        let mut served = match svc {
            None => None,
            Some((pos, svc)) => {
                let s = match skip_reason(svc, &self.options.proxy_name) {
                    Some((label, reason)) => {
                        skips.skip(object.clone(), label, reason);
                        None
                    }
                    None => validate_service(svc, &object, &self.options, &mut skips),
                };
                for (i, e) in skips.errors.drain(..).enumerate() {
                    errors.push((
                        ErrKey::Service(pos.clone(), u32::try_from(i).unwrap_or(u32::MAX)),
                        e,
                    ));
                }
                s
            }
        };
        let unit = self.units.entry(id.clone()).or_default();
        unit.key = format!("{ns}/{name}");
        for (pos, slice_id) in &unit.slices {
            let Some((_, slice)) = primary(&self.slices, slice_id) else {
                continue;
            };
            let slice_object = format!("EndpointSlice {}/{}", slice_id.0, slice_id.1);
            match served.as_mut() {
                Some(s) => {
                    if let Some(info) = validate_slice(slice, &slice_object, &mut skips) {
                        s.slices.push(info);
                    }
                    for (i, e) in skips.errors.drain(..).enumerate() {
                        errors.push((
                            ErrKey::Slice(pos.clone(), u32::try_from(i).unwrap_or(u32::MAX)),
                            e,
                        ));
                    }
                }
                None => {
                    let reason = if svc.is_some() {
                        format!("its Service {ns}/{name} is skipped")
                    } else {
                        format!("no Service {ns}/{name} in the manifest")
                    };
                    skips.skip(slice_object, label::NO_SERVICE, reason);
                }
            }
        }
        let cluster_ips = served
            .as_ref()
            .map_or_else(Vec::new, |s| s.cluster_ips.clone());
        let outer_ips: Vec<IpAddr> = served.as_ref().map_or_else(Vec::new, |s| {
            s.external_ips
                .iter()
                .chain(&s.lb_ips)
                .map(|(_, ip)| *ip)
                .collect()
        });
        let old_cluster = std::mem::replace(&mut unit.cluster_ips, cluster_ips.clone());
        let old_outer = std::mem::replace(&mut unit.outer_ips, outer_ips.clone());
        unit.served = served;
        for ip in &old_cluster {
            if !cluster_ips.contains(ip) {
                remove_from(&mut self.cluster_ips, ip, id);
                frontends_dirty.extend(self.outer_ips.get(ip).into_iter().flatten().cloned());
            }
        }
        for ip in &cluster_ips {
            if !old_cluster.contains(ip) {
                self.cluster_ips.entry(*ip).or_default().insert(id.clone());
                frontends_dirty.extend(self.outer_ips.get(ip).into_iter().flatten().cloned());
            }
        }
        for ip in &old_outer {
            remove_from(&mut self.outer_ips, ip, id);
        }
        for ip in &outer_ips {
            self.outer_ips.entry(*ip).or_default().insert(id.clone());
        }
        self.set_skips(Owner::Validated(id.clone()), skips.list);
        self.set_errors(Owner::Validated(id.clone()), errors);
    }

    /// Builds a Service's candidate frontends; marks for [`Self::resolve`]
    /// the Services that claim what it claimed or claims.
    fn frontends(&mut self, id: &Id, resolve: &mut BTreeSet<Id>) {
        let Some(unit) = self.units.get(id) else {
            return;
        };
        let mut skips = Skips::default();
        let mut candidates = Vec::new();
        let mut endpoints = 0;
        if let Some(s) = &unit.served {
            let owners = &self.cluster_ips;
            let owner = |ip: IpAddr| {
                owners
                    .get(&ip)
                    .and_then(BTreeSet::first)
                    .map(|(ns, name)| format!("{ns}/{name}"))
            };
            endpoints = frontends_of(s, &owner, &self.node_numbers, &mut candidates, &mut skips);
        }
        let health_port = unit.served.as_ref().and_then(|s| s.health_check_port);
        let Some(unit) = self.units.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut unit.candidates, candidates);
        unit.endpoints = endpoints;
        let old_health = std::mem::replace(&mut unit.health_port, health_port);
        let mut touched: BTreeSet<Claim> = BTreeSet::new();
        for f in &old {
            let claim = (f.address, f.port, f.protocol);
            if let Some(c) = self.claims.get_mut(&claim) {
                let k = claim_key(f);
                if let Some(n) = c.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        c.remove(&k);
                    }
                }
                if c.is_empty() {
                    self.claims.remove(&claim);
                }
            }
            touched.insert(claim);
        }
        for f in &unit.candidates {
            let claim = (f.address, f.port, f.protocol);
            *self
                .claims
                .entry(claim)
                .or_default()
                .entry(claim_key(f))
                .or_default() += 1;
            touched.insert(claim);
        }
        for claim in &touched {
            for k in self.claims.get(claim).into_iter().flat_map(BTreeMap::keys) {
                if let Some((ns, name)) = k.1.split_once('/') {
                    resolve.insert((ns.to_owned(), name.to_owned()));
                }
            }
        }
        if old_health != health_port {
            if let Some(p) = old_health {
                if let Some(set) = self.health_ports.get_mut(&p) {
                    set.remove(id);
                    resolve.extend(set.iter().cloned());
                    if set.is_empty() {
                        self.health_ports.remove(&p);
                    }
                }
            }
            if let Some(p) = health_port {
                let set = self.health_ports.entry(p).or_default();
                set.insert(id.clone());
                resolve.extend(set.iter().cloned());
            }
        }
        self.set_skips(Owner::Frontends(id.clone()), skips.list);
    }

    /// Keeps the candidate frontends a Service wins, splices them into the
    /// model; its health check and notes.
    fn resolve(&mut self, id: &Id) {
        let Some(unit) = self.units.get(id) else {
            return;
        };
        let mut skips = Skips::default();
        let mut errors = Vec::new();
        let mut kept: Vec<Frontend> = Vec::new();
        let mut mine: HashSet<ClaimKey> = HashSet::new();
        for f in &unit.candidates {
            let k = claim_key(f);
            let first = self
                .claims
                .get(&(f.address, f.port, f.protocol))
                .and_then(BTreeMap::first_key_value)
                .map(|(w, _)| w);
            let Some(first) = first else {
                continue; // never: every candidate is claimed
            };
            if *first == k && mine.insert(k.clone()) {
                kept.push(f.clone());
                continue;
            }
            let frontend = endpoint_string(f.address, f.port, f.protocol);
            let first_kind = first.0;
            if first_kind == FrontendKind::ClusterIp as u8 && f.kind == FrontendKind::ClusterIp {
                let mut s = Skips::default();
                s.refuse(
                    ModelError::Conflict {
                        first: format!("Service {}", first.1),
                        second: format!("Service {}", f.service),
                        frontend,
                    },
                    label::CONFLICT,
                    "that frontend is not served",
                );
                skips.list.append(&mut s.list);
                errors.extend(
                    s.errors
                        .into_iter()
                        .map(|e| (ErrKey::Conflict(k.clone()), e)),
                );
                continue;
            }
            let first_name = kind_of(first_kind).map_or("", kind_name);
            skips.skip(
                format!("Service {}", f.service),
                label::CONFLICT,
                format!(
                    "{}: {} frontend {frontend} is already a {} frontend of {}; ignored",
                    kind_field(f.kind),
                    kind_name(f.kind),
                    first_name,
                    first.1
                ),
            );
        }
        kept.sort_by(Frontend::order);
        // Health check: the first Service (by namespace, name) asking for a
        // port answers on it.
        let mut health = None;
        if let (Some(s), Some(port)) = (&unit.served, unit.health_port) {
            let first = self.health_ports.get(&port).and_then(BTreeSet::first);
            match first {
                Some(first) if first != id => skips.skip(
                    format!("Service {}", s.key),
                    label::CONFLICT,
                    format!(
                        "spec.healthCheckNodePort: {port} is already the health check node port \
                         of Service {}/{}; no health check is answered",
                        first.0, first.1
                    ),
                ),
                _ => {
                    let (ns, name) = s.key.split_once('/').unwrap_or(("", s.key.as_str()));
                    health = Some(HealthCheck {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                        port,
                        endpoints: unit.endpoints,
                    });
                }
            }
        }
        let notes = notes_of(unit.served.iter(), &kept);
        let key = unit.key.clone();
        let gone = unit.served.is_none()
            && unit.slices.is_empty()
            && unit.candidates.is_empty()
            && !self.services.contains_key(id);
        // Splice: a Service's frontends are contiguous (sorted by service).
        let list = &mut self.model.frontends;
        let start = list.partition_point(|f| f.service.as_str() < key.as_str());
        let end = start + list[start..].partition_point(|f| f.service == key);
        if end - start != kept.len() || list[start..end] != kept[..] {
            let same_keys = end - start == kept.len()
                && list[start..end].iter().zip(&kept).all(|(a, b)| {
                    (a.address, a.port, a.protocol, a.kind)
                        == (b.address, b.port, b.protocol, b.kind)
                });
            self.table_changes.whole |= !same_keys;
            self.table_changes.services.insert(key.clone());
            list.splice(start..end, kept);
            self.version += 1;
        }
        let changed = match health {
            Some(h) => self.health.insert(id.clone(), h.clone()) != Some(h),
            None => self.health.remove(id).is_some(),
        };
        self.health_dirty |= changed;
        self.set_skips(Owner::Resolved(id.clone()), skips.list);
        self.set_errors(Owner::Resolved(id.clone()), errors);
        self.set_notes(Owner::Resolved(id.clone()), notes);
        if gone {
            self.units.remove(id);
        }
    }
}

/// The source name of an API object of `kind` (`"Service"`, …) for
/// [`IncrementalModel::set_api_object`]: sources of one kind sort by
/// (namespace, name), as the API source lists them (`\0` sorts before any
/// character of a name).
#[must_use]
pub fn api_source(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}\0{namespace}\0{name}")
}

fn keys<T>(copies: &Copies<T>, id: &Id) -> Vec<Pos> {
    copies
        .get(id)
        .map(|c| c.keys().cloned().collect())
        .unwrap_or_default()
}

fn remove_from(index: &mut HashMap<IpAddr, BTreeSet<Id>>, ip: &IpAddr, id: &Id) {
    if let Some(set) = index.get_mut(ip) {
        set.remove(id);
        if set.is_empty() {
            index.remove(ip);
        }
    }
}

const fn kind_of(n: u8) -> Option<FrontendKind> {
    match n {
        x if x == FrontendKind::ClusterIp as u8 => Some(FrontendKind::ClusterIp),
        x if x == FrontendKind::NodePort as u8 => Some(FrontendKind::NodePort),
        x if x == FrontendKind::ExternalIp as u8 => Some(FrontendKind::ExternalIp),
        x if x == FrontendKind::LoadBalancer as u8 => Some(FrontendKind::LoadBalancer),
        _ => None,
    }
}

/// The field a frontend of `kind` comes from, for skip reasons.
const fn kind_field(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "spec.clusterIPs",
        FrontendKind::NodePort => "spec.ports[].nodePort",
        FrontendKind::ExternalIp => "spec.externalIPs",
        FrontendKind::LoadBalancer => "status.loadBalancer.ingress[].ip",
    }
}
