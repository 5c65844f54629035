//! The Kubernetes API source: Services, EndpointSlices and Nodes from a live
//! API server.
//!
//! Owns: [`follow`], which watches the three kinds with kube-rs watchers and
//! reflector stores, keeps a [`Model`] equal to what
//! [`crate::model::build_model`] gives for the stores' objects (sorted by
//! namespace and name), updated per object applied or deleted
//! ([`IncrementalModel`]; a relist compares every object of its kind), and
//! hands each new model to a callback;
//! [`follow_with`] also tells [`Hooks`] what it sees (the first change of
//! each build, its objects, watch failures and recoveries) for metrics and
//! health; [`list_objects`] lists the same objects once (for `show`).
//!
//! - **Selectors.** Services with the field selector `spec.clusterIP!=None`
//!   ([`SERVICE_FIELD_SELECTOR`]) and EndpointSlices with the label selector
//!   `!service.kubernetes.io/headless` ([`SLICE_LABEL_SELECTOR`]), as
//!   kube-proxy's informers. The proxy-name label is *not* selected on the
//!   server: unlabelled Services and those labelled with our name are both
//!   served, which one selector cannot express, so the model filters it.
//!   Nodes are all watched (their pod CIDRs and addresses place clients on
//!   nodes for `internalTrafficPolicy: Local`).
//! - **Lists and watches.** kube-rs's watcher lists, then watches from the
//!   list's resourceVersion with bookmarks. The reflector store replaces its
//!   contents atomically when a (re)list is done (`InitDone`): objects not
//!   listed again are gone. A watch that ends is resumed from the last
//!   resourceVersion seen (object or bookmark); `410 Gone` relists at once.
//!   Errors (API unreachable, watch failures) are retried with backoff
//!   ([`WatchBackoff`]).
//! - **Readiness.** No model is built before every kind has been listed once:
//!   services without their slices would have no backends.
//! - **Coalescing.** Changes that arrive together are folded into one build;
//!   builds are at least [`FollowConfig::min_sync`] apart (kube-proxy's
//!   `minSyncPeriod`). A build that changed nothing in the model (its
//!   [`IncrementalModel::version`] is the same) hands nothing over.
//! - **Outages.** While the API is unreachable nothing changes: the last model
//!   stays the last one handed over (and the caller keeps its snapshot).
//!   Retries back off as client-go's reflector does (0.8 s doubling to 30 s,
//!   with jitter), but the backoff is reset by any answer from the server,
//!   a `410 Gone` included: after an API-server restart the relist starts at
//!   once instead of waiting out a backoff escalated by the refused
//!   connections ([`WatchBackoff`]).
//! - **Bad objects.** An object that cannot be used is skipped, alone
//!   ([`crate::model`]); the others are served and later changes flow. Each
//!   skip is logged once, when it appears and when it goes away.
//!
//! Must never: hand over a model built from a half-finished list, or panic.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::ops::ControlFlow;
use std::path::Path;
use std::pin::pin;
use std::time::Duration;

use futures::{stream, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::incremental::{api_source, IncrementalModel, TableChanges};
use crate::manifest::{identity, Objects};
use crate::model::{Model, ModelOptions, SkipLog};

/// Field selector for Services: headless ones are never proxied.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";
/// Pods that hold an address: finished ones do not (NetworkPolicy).
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";
/// Label selector for EndpointSlices: not those of headless Services.
pub const SLICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/headless";

/// The most events folded into a build once it is due (see [`follow`]).
const MAX_FOLD: usize = 4096;

/// How [`follow`] builds models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowConfig {
    /// Our proxy name and default return path (see [`crate::model::build_model`]).
    pub model: ModelOptions,
    /// The least time between two model builds; zero (the default): build as
    /// soon as the changes that have arrived are folded in.
    pub min_sync: Duration,
    /// Also watch Pods, Namespaces and NetworkPolicies, for NetworkPolicy
    /// (`run --network-policy`, on by default there; off in this default).
    pub network_policy: bool,
}

/// Which of the watched kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services,
    Slices,
    Nodes,
    Pods,
    Namespaces,
    Policies,
}

impl Kind {
    const fn index(self) -> usize {
        match self {
            Self::Services => 0,
            Self::Slices => 1,
            Self::Nodes => 2,
            Self::Pods => 3,
            Self::Namespaces => 4,
            Self::Policies => 5,
        }
    }
}

impl Kind {
    const fn name(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Slices => "endpointslices",
            Self::Nodes => "nodes",
            Self::Pods => "pods",
            Self::Namespaces => "namespaces",
            Self::Policies => "networkpolicies",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened to the watch of one kind (`"services"`, `"endpointslices"`
/// or `"nodes"`), for [`Hooks::watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// The watch started failing (logged once per outage); it is retried.
    Failed(&'static str),
    /// Events flow again after a failure.
    Recovered(&'static str),
    /// The watch expired (`410 Gone`) and relists.
    Expired(&'static str),
}

/// Observers of [`follow_with`] (metrics and health); all optional.
#[derive(Default)]
#[allow(clippy::type_complexity)] // reason: three plain callbacks
pub struct Hooks<'a> {
    /// Called when a store changes while no build is pending: the first change
    /// the next build will include (where its sync latency starts).
    pub changed: Option<Box<dyn FnMut() + Send + 'a>>,
    /// Called at every build, before the model is updated, with the number
    /// of Services and of EndpointSlices that changed since the last build
    /// and the EndpointSlices applied since then (for their trigger times).
    pub changes: Option<Box<dyn FnMut(u64, u64, &[EndpointSlice]) + Send + 'a>>,
    /// Called when a watch fails, recovers or expires.
    pub watch: Option<Box<dyn FnMut(WatchEvent) + Send + 'a>>,
}

impl fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("changed", &self.changed.is_some())
            .field("changes", &self.changes.is_some())
            .field("watch", &self.watch.is_some())
            .finish()
    }
}

/// What one watcher event means for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The store changed (an object applied or deleted, or a list finished).
    Changed,
    /// A (re)list finished: the store holds exactly the listed objects.
    Listed,
    /// Nothing visible yet (a list in progress).
    Nothing,
}

/// An object's (namespace, name); no namespace for Nodes and Namespaces.
type Key = (Option<String>, String);

/// The object an event applies or deletes.
fn key_of<K: kube::Resource>(event: &Event<K>) -> Option<Key> {
    match event {
        Event::Apply(o) | Event::Delete(o) => {
            let meta = o.meta();
            Some((
                meta.namespace.clone(),
                meta.name.clone().unwrap_or_default(),
            ))
        }
        Event::InitDone | Event::Init | Event::InitApply(_) => None,
    }
}

fn step_of<K>(event: &Event<K>) -> Step {
    match event {
        Event::Apply(_) | Event::Delete(_) => Step::Changed,
        Event::InitDone => Step::Listed,
        Event::Init | Event::InitApply(_) => Step::Nothing,
    }
}

/// One kind's watch: how it is doing, for readiness and for logs.
#[derive(Debug, Default, Clone, Copy)]
struct Health {
    /// Listed at least once.
    ready: bool,
    /// The last event was an error.
    failing: bool,
}

/// Watches `K` with `config`, keeping `writer`'s store, with backoff on errors.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    kind: Kind,
) -> impl Stream<Item = (Kind, Result<(Step, Option<Key>), watcher::Error>)> + Send
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watch_trimmed(api, config, writer, kind, |_: &mut K| {})
}

/// [`watch`], with `trim` applied to every object before it is stored (to
/// keep only the fields control reads).
fn watch_trimmed<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    kind: Kind,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> impl Stream<Item = (Kind, Result<(Step, Option<Key>), watcher::Error>)> + Send
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    with_backoff(watcher::watcher(api, config), WatchBackoff::default())
        .modify(trim)
        .reflect(writer)
        .map(move |r| (kind, r.map(|e| (step_of(&e), key_of(&e)))))
}

/// What a Pod keeps in control's store: labels, namespace and name, the
/// addresses and phase, `nodeName`, `hostNetwork` and the containers' ports.
/// A Pod as the API serves it is mostly other fields (managedFields,
/// annotations, volumes, container specs and statuses): at 100 000 pods
/// keeping them would cost gigabytes.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        let containers = std::mem::take(&mut spec.containers)
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name,
                ports: c.ports,
                ..Default::default()
            })
            .collect();
        *spec = k8s_openapi::api::core::v1::PodSpec {
            containers,
            node_name: spec.node_name.take(),
            host_network: spec.host_network,
            ..Default::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            pod_ips: status.pod_ips.take(),
            ..Default::default()
        };
    }
}

/// The retry policy of the watchers: kube-rs's [`watcher::DefaultBackoff`]
/// (client-go's: 0.8 s doubling to 30 s, with jitter) after each error, reset
/// by every successful response, `410 Gone` included: the server has answered
/// and asks for a relist, which starts at once (unless the previous 410 came
/// less than [`WatchBackoff::EXPIRED_AGAIN`] before: then it backs off, so a
/// server that keeps expiring is not hammered).
#[derive(Default)]
pub struct WatchBackoff {
    backoff: watcher::DefaultBackoff,
    last_expired: Option<Instant>,
}

impl fmt::Debug for WatchBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchBackoff")
            .field("last_expired", &self.last_expired)
            .finish_non_exhaustive()
    }
}

impl WatchBackoff {
    /// Two 410s closer than this: the second one backs off.
    pub const EXPIRED_AGAIN: Duration = Duration::from_secs(1);

    /// How long to wait before polling the watcher again after `result`
    /// (`None`: at once).
    pub fn after<T>(
        &mut self,
        result: &Result<T, watcher::Error>,
        now: Instant,
    ) -> Option<Duration> {
        match result {
            Ok(_) => {
                self.backoff.reset();
                None
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                self.backoff.reset();
                let again = self
                    .last_expired
                    .is_some_and(|t| now.saturating_duration_since(t) < Self::EXPIRED_AGAIN);
                self.last_expired = Some(now);
                if again {
                    self.backoff.next()
                } else {
                    None
                }
            }
            Err(_) => self.backoff.next(),
        }
    }
}

/// `stream` (a watcher), paused after each error as `backoff` says. Unlike
/// kube-rs's `StreamBackoff`, which resets only on `Ok`, a 410 resets too.
fn with_backoff<S, T>(
    stream: S,
    backoff: WatchBackoff,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send
where
    S: Stream<Item = Result<T, watcher::Error>> + Send,
    T: Send,
{
    let stream = Box::pin(stream);
    stream::unfold(
        (stream, backoff, None::<Duration>),
        |(mut stream, mut backoff, wait)| async move {
            if let Some(d) = wait {
                debug!(?d, "backing off");
                tokio::time::sleep(d).await;
            }
            let item = stream.next().await?;
            let wait = backoff.after(&item, Instant::now());
            Some((item, (stream, backoff, wait)))
        },
    )
}

/// The stores of the watched kinds.
struct Stores {
    /// Services.
    services: Store<Service>,
    /// EndpointSlices.
    slices: Store<EndpointSlice>,
    /// Nodes.
    nodes: Store<Node>,
    /// Pods (NetworkPolicy).
    pods: Store<Pod>,
    /// Namespaces (NetworkPolicy).
    namespaces: Store<Namespace>,
    /// NetworkPolicies.
    policies: Store<NetworkPolicy>,
}

/// The objects, sorted by (namespace, name), the order of [`follow`]'s model.
fn sorted_objects(
    mut services: Vec<Service>,
    mut slices: Vec<EndpointSlice>,
    mut nodes: Vec<Node>,
) -> Objects {
    services.sort_by(|a, b| identity(&a.metadata).cmp(&identity(&b.metadata)));
    slices.sort_by(|a, b| identity(&a.metadata).cmp(&identity(&b.metadata)));
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Objects {
        services,
        slices,
        nodes,
        ..Objects::default()
    }
}

/// Lists Services, EndpointSlices and Nodes once through `client`, with the
/// selectors of [`follow`], and returns them in [`follow`]'s order
/// (`clustergate-control show --kubeconfig`/`--in-cluster`).
///
/// # Errors
/// The first list that fails (the API unreachable, access denied, …); no retry.
pub async fn list_objects(client: Client) -> Result<Objects, kube::Error> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().fields(SERVICE_FIELD_SELECTOR))
        .await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels(SLICE_LABEL_SELECTOR))
        .await?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut o = sorted_objects(services.items, slices.items, nodes.items);
    o.pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(POD_FIELD_SELECTOR))
        .await?
        .items;
    o.namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    o.policies = Api::<NetworkPolicy>::all(client)
        .list(&ListParams::default())
        .await?
        .items;
    Ok(o)
}

/// Follows Services and EndpointSlices through `client` and calls `on_model`
/// with every new model (see the module documentation for when).
///
/// Returns when `on_model` returns [`ControlFlow::Break`]; it never returns
/// otherwise (errors are retried with backoff and logged), so run it in a task
/// that can be dropped or aborted.
pub async fn follow(
    client: Client,
    config: &FollowConfig,
    on_model: impl FnMut(&Model) -> ControlFlow<()>,
) {
    let mut on_model = on_model;
    follow_with(client, config, Hooks::default(), |model, _| on_model(model)).await;
}

/// [`follow`], telling `hooks` what it sees, and `on_model` what changed in
/// the model's tables since its last call
/// ([`IncrementalModel::take_table_changes`]).
pub async fn follow_with(
    client: Client,
    config: &FollowConfig,
    mut hooks: Hooks<'_>,
    mut on_model: impl FnMut(&Model, &TableChanges) -> ControlFlow<()>,
) {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
    let (policies, policies_writer) = reflector::store::<NetworkPolicy>();
    let policy_events = if config.network_policy {
        stream::select(
            stream::select(
                watch_trimmed(
                    Api::<Pod>::all(client.clone()),
                    watcher::Config::default().fields(POD_FIELD_SELECTOR),
                    pods_writer,
                    Kind::Pods,
                    trim_pod,
                ),
                watch(
                    Api::<Namespace>::all(client.clone()),
                    watcher::Config::default(),
                    namespaces_writer,
                    Kind::Namespaces,
                ),
            ),
            watch(
                Api::<NetworkPolicy>::all(client.clone()),
                watcher::Config::default(),
                policies_writer,
                Kind::Policies,
            ),
        )
        .boxed()
    } else {
        stream::empty().boxed()
    };
    let service_events = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().fields(SERVICE_FIELD_SELECTOR),
        services_writer,
        Kind::Services,
    );
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let slice_events = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
        slices_writer,
        Kind::Slices,
    );
    let node_events = watch(
        Api::<Node>::all(client),
        watcher::Config::default(),
        nodes_writer,
        Kind::Nodes,
    );
    let mut events = pin!(stream::select(
        stream::select(stream::select(service_events, slice_events), node_events),
        policy_events
    ));

    let mut health = [Health::default(); 6];
    if !config.network_policy {
        for h in &mut health[Kind::Pods.index()..] {
            h.ready = true;
        }
    }
    let stores = Stores {
        services,
        slices,
        nodes,
        pods,
        namespaces,
        policies,
    };
    let mut dirty = false;
    let mut last_build: Option<Instant> = None;
    // The model, updated per object changed (see crate::incremental).
    let mut model = IncrementalModel::new(config.model.clone(), Path::new(""));
    let mut pending = Pending::default();
    let mut last: Option<u64> = None;
    let mut skip_log = SkipLog::default();
    // Events taken while a build was already due: bounded, so that a steady
    // stream of events cannot hold a build off for ever.
    let mut folded = 0usize;
    loop {
        let ready = health.iter().all(|h| h.ready);
        let due =
            (dirty && ready).then(|| last_build.map_or_else(Instant::now, |t| t + config.min_sync));
        let event = match due {
            // Events first: whatever has already arrived is folded into this build.
            Some(at) => tokio::select! {
                biased;
                event = events.next(), if folded < MAX_FOLD => {
                    if at <= Instant::now() {
                        folded += 1;
                    }
                    Some(event)
                }
                () = tokio::time::sleep_until(at) => None,
            },
            None => Some(events.next().await),
        };
        match event {
            Some(Some((kind, result))) => {
                let was_failing = health[kind.index()].failing;
                let expired =
                    matches!(&result, Err(watcher::Error::WatchError(s)) if s.code == 410);
                let result = result.map(|(step, key)| {
                    pending.note(kind, step, key);
                    step
                });
                if note(kind, result, &mut health[kind.index()]) {
                    if !dirty {
                        if let Some(hook) = hooks.changed.as_mut() {
                            hook();
                        }
                    }
                    dirty = true;
                }
                if let Some(hook) = hooks.watch.as_mut() {
                    let failing = health[kind.index()].failing;
                    if expired {
                        hook(WatchEvent::Expired(kind.name()));
                    } else if failing && !was_failing {
                        hook(WatchEvent::Failed(kind.name()));
                    } else if was_failing && !failing {
                        hook(WatchEvent::Recovered(kind.name()));
                    }
                }
            }
            Some(None) => {
                // The watchers never end (their backoff never gives up).
                error!("the watch streams ended; no more updates");
                return;
            }
            None => {
                dirty = false;
                folded = 0;
                last_build = Some(Instant::now());
                let started = std::time::Instant::now();
                let (services, slices, applied) = pending.apply(&stores, &mut model);
                if let Some(hook) = hooks.changes.as_mut() {
                    hook(services, slices, &applied);
                }
                let version = model.version();
                let changes = model.take_table_changes();
                let model = model.model();
                skip_log.log(model);
                if last == Some(version) {
                    debug!("objects changed but the model did not");
                } else {
                    debug!(
                        services,
                        endpointslices = slices,
                        frontends = model.frontends.len(),
                        skipped = model.skipped.len(),
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "new model"
                    );
                    last = Some(version);
                    if on_model(model, &changes).is_break() {
                        return;
                    }
                }
            }
        }
    }
}

/// The objects changed since the last build, by kind: those applied or
/// deleted, and the kinds relisted (all their objects are compared).
#[derive(Debug, Default)]
struct Pending {
    keys: [BTreeSet<Key>; 6],
    relisted: [bool; 6],
    /// The source names ([`api_source`]) in the model, by kind.
    known: [HashSet<String>; 6],
}

/// The kind name of a [`Kind`] in [`api_source`] names.
const fn kind_object(kind: Kind) -> &'static str {
    match kind {
        Kind::Services => "Service",
        Kind::Slices => "EndpointSlice",
        Kind::Nodes => "Node",
        Kind::Pods => "Pod",
        Kind::Namespaces => "Namespace",
        Kind::Policies => "NetworkPolicy",
    }
}

impl Pending {
    fn note(&mut self, kind: Kind, step: Step, key: Option<Key>) {
        match (step, key) {
            (Step::Listed, _) => self.relisted[kind.index()] = true,
            (Step::Changed, Some(key)) => {
                self.keys[kind.index()].insert(key);
            }
            _ => {}
        }
    }

    /// Takes the changes up into `model`; returns the number of Services
    /// and of EndpointSlices changed, and the EndpointSlices applied.
    fn apply(
        &mut self,
        stores: &Stores,
        model: &mut IncrementalModel,
    ) -> (u64, u64, Vec<EndpointSlice>) {
        let mut counts = (0, 0);
        let mut applied = Vec::new();
        let mut out = Changed {
            model,
            counts: &mut counts,
        };
        self.kind(Kind::Services, &stores.services, &mut out, |o, s| {
            o.services = vec![s]
        });
        self.kind(Kind::Slices, &stores.slices, &mut out, |o, s| {
            applied.push(s.clone());
            o.slices = vec![s];
        });
        self.kind(Kind::Nodes, &stores.nodes, &mut out, |o, s| {
            o.nodes = vec![s]
        });
        self.kind(Kind::Pods, &stores.pods, &mut out, |o, s| o.pods = vec![s]);
        self.kind(Kind::Namespaces, &stores.namespaces, &mut out, |o, s| {
            o.namespaces = vec![s];
        });
        self.kind(Kind::Policies, &stores.policies, &mut out, |o, s| {
            o.policies = vec![s]
        });
        (counts.0, counts.1, applied)
    }

    /// One kind: every object of its store when it was relisted (and those
    /// no longer there removed), else those applied or deleted.
    fn kind<K>(
        &mut self,
        kind: Kind,
        store: &Store<K>,
        out: &mut Changed<'_>,
        mut put: impl FnMut(&mut Objects, K),
    ) where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let i = kind.index();
        let keys = std::mem::take(&mut self.keys[i]);
        let known = &mut self.known[i];
        let mut set = |known: &mut HashSet<String>, key: &Key, object: Option<K>| {
            let (ns, name) = identity_of(kind, key);
            let source = api_source(kind_object(kind), ns, name);
            let (a, b) = match object {
                Some(o) => {
                    let mut objects = Objects::default();
                    put(&mut objects, o);
                    known.insert(source.clone());
                    out.model.set_api_object(&source, Some(&objects))
                }
                None => {
                    known.remove(&source);
                    out.model.set_api_object(&source, None)
                }
            };
            out.counts.0 += a;
            out.counts.1 += b;
        };
        if std::mem::take(&mut self.relisted[i]) {
            let mut listed = HashSet::new();
            for o in store.state() {
                let meta = o.meta();
                let key = (
                    meta.namespace.clone(),
                    meta.name.clone().unwrap_or_default(),
                );
                set(known, &key, Some((*o).clone()));
                let (ns, name) = identity_of(kind, &key);
                listed.insert(api_source(kind_object(kind), ns, name));
            }
            let gone: Vec<String> = known.difference(&listed).cloned().collect();
            for source in gone {
                known.remove(&source);
                let (a, b) = out.model.set_api_object(&source, None);
                out.counts.0 += a;
                out.counts.1 += b;
            }
            return;
        }
        for key in keys {
            let r = ObjectRef::<K>::new(&key.1);
            let r = match &key.0 {
                Some(ns) => r.within(ns),
                None => r,
            };
            set(known, &key, store.get(&r).map(|o| (*o).clone()));
        }
    }
}

/// Where [`Pending::kind`] puts what changed.
struct Changed<'a> {
    model: &'a mut IncrementalModel,
    counts: &'a mut (u64, u64),
}

const fn kind_namespaced(kind: Kind) -> bool {
    !matches!(kind, Kind::Nodes | Kind::Namespaces)
}

/// The (namespace, name) of a key as [`identity`] gives it.
fn identity_of(kind: Kind, key: &Key) -> (&str, &str) {
    let ns = key.0.as_deref().unwrap_or("");
    if ns.is_empty() && kind_namespaced(kind) {
        (crate::manifest::DEFAULT_NAMESPACE, key.1.as_str())
    } else {
        (ns, key.1.as_str())
    }
}

/// Notes one watcher result; `true` when the store changed.
fn note(kind: Kind, result: Result<Step, watcher::Error>, health: &mut Health) -> bool {
    match result {
        Ok(step) => {
            if health.failing && step != Step::Nothing {
                info!(%kind, "watch recovered");
                health.failing = false;
            }
            match step {
                Step::Listed => {
                    if !health.ready {
                        info!(%kind, "listed");
                    } else {
                        debug!(%kind, "relisted");
                    }
                    health.ready = true;
                    true
                }
                Step::Changed => true,
                Step::Nothing => false,
            }
        }
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            info!(%kind, "watch expired ({}): relisting", status.message);
            false
        }
        Err(e) => {
            if health.failing {
                debug!(%kind, "still failing: {e}");
            } else {
                warn!(%kind, "{e}; retrying with backoff, keeping the last model");
                health.failing = true;
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    #[test]
    fn a_stored_pod_keeps_what_policies_read_and_little_else() {
        let full: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"big": "x".repeat(4096)},
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"nodeName": "node-a", "hostNetwork": false,
                     "volumes": [{"name": "v", "emptyDir": {}}],
                     "containers": [{"name": "c", "image": "web:1",
                                     "env": [{"name": "A", "value": "x".repeat(4096)}],
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "198.18.1.1", "podIPs": [{"ip": "198.18.1.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let mut trimmed = full.clone();
        trim_pod(&mut trimmed);
        let size = |p: &Pod| serde_json::to_vec(p).expect("json").len();
        assert!(size(&trimmed) < 600, "{} bytes left", size(&trimmed));
        assert!(size(&full) > 8000);
        assert_eq!(trimmed.metadata.labels, full.metadata.labels);
        assert_eq!(
            trimmed.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("node-a")
        );
        // What NetworkPolicy reads is the same either way.
        let read = |p: &Pod| crate::policy::PolicySet::new(std::slice::from_ref(p), &[], &[]);
        assert_eq!(read(&trimmed).pods(), read(&full).pods());
        assert_eq!(read(&trimmed).pods()[0].ports.len(), 1);
    }

    fn expired() -> Result<(), watcher::Error> {
        Err(watcher::Error::WatchError(Box::new(kube::core::Status {
            code: 410,
            ..kube::core::Status::default()
        })))
    }

    fn refused() -> Result<(), watcher::Error> {
        Err(watcher::Error::NoResourceVersion)
    }

    #[test]
    fn a_410_after_an_outage_relists_at_once() {
        let mut b = WatchBackoff::default();
        let now = Instant::now();
        // The API is down: each refused connection backs off longer.
        let waits: Vec<Duration> = (0..6).filter_map(|_| b.after(&refused(), now)).collect();
        assert_eq!(waits.len(), 6);
        assert!(waits[5] >= Duration::from_secs(25), "{waits:?}");
        // It is back and answers the resumed watch with 410: relist now.
        assert_eq!(b.after(&expired(), now), None);
        // The backoff starts again from its first step.
        let next = b.after(&refused(), now).unwrap();
        assert!(next < Duration::from_secs(2), "{next:?}");
        // A 410 right after a 410 backs off (from the first step again).
        let later = now + Duration::from_secs(5);
        assert_eq!(b.after(&expired(), later), None);
        let again = b.after(&expired(), later + Duration::from_millis(100));
        assert!(
            again.is_some_and(|d| d < Duration::from_secs(2)),
            "{again:?}"
        );
        // Any successful event resets it.
        for _ in 0..5 {
            b.after(&refused(), later);
        }
        assert_eq!(b.after(&Ok(()), later), None);
        assert!(b.after(&refused(), later).unwrap() < Duration::from_secs(2));
    }
}
