//! Kubernetes Service semantics: from Services and EndpointSlices to frontends.
//!
//! Owns: [`build_model`], the [`ModelOptions`] it takes and the [`Model`] it
//! returns. The rules mirror kube-proxy (`kubernetes/pkg/proxy`);
//! `docs/semantics.md` gives each rule with the kube-proxy function it follows
//! and the few places where we differ.
//!
//! In short:
//! - Services labelled `service.kubernetes.io/service-proxy-name` with another
//!   proxy's name, ExternalName, headless (`clusterIP: None`) and services
//!   without a cluster IP are skipped.
//! - EndpointSlices join their Service through the `kubernetes.io/service-name`
//!   label in the slice's namespace; a service's slices are merged and
//!   endpoints de-duplicated by (address, port).
//! - Each service port (name, protocol) takes, per slice, the slice port of the
//!   same name and protocol: named target ports resolve per slice.
//! - One frontend per (cluster IP, port, protocol); dual-stack services get one
//!   per family, each with the endpoints of its family only.
//! - Ready endpoints take new flows; serving-and-terminating ones drain
//!   (weight 0: they keep their flows, take no new ones) while any endpoint
//!   is ready, and take new flows when none is (per node for
//!   `internalTrafficPolicy: Local`); endpoints not serving are left out; no
//!   backends: the gateway rejects.
//! - Every kind is served: ClusterIP, NodePort (a `nodePort` within
//!   [`ModelOptions::node_port_range`], on the unspecified address of its
//!   family; the gateway serves it on its addresses within
//!   [`ModelOptions::node_port_addresses`]), ExternalIP (`spec.externalIPs`)
//!   and LoadBalancer (`status.loadBalancer.ingress[].ip`, not `ipMode: Proxy`).
//! - `loadBalancerSourceRanges` restrict the LoadBalancer frontends only; a
//!   family without a range of its own is closed; a range that is not a CIDR
//!   closes the Service's LoadBalancer frontends (skipped, fail closed).
//! - `internalTrafficPolicy: Local`: the ClusterIP frontends are node-local;
//!   backends carry their endpoint's node (`nodeName`), and Nodes
//!   ([`Model::nodes`]) give each node's pod CIDRs and addresses.
//! - `externalTrafficPolicy: Local` with a `healthCheckNodePort`: a
//!   [`HealthCheck`] in [`Model::health_checks`].
//! - Bad or clashing parts of objects (a node port out of range, an external
//!   IP that is a cluster IP, a bad Node) are skipped, naming the field.
//! - Each frontend has a return path: the Service's
//!   `clustergate.io/return-path` annotation, else [`ModelOptions::return_path`]
//!   (`--return-path`, default `snat`). The external frontends (node port,
//!   external IP, load balancer) of a Service with `externalTrafficPolicy:
//!   Local` never get `snat`, which would hide the client's address: they get
//!   `routed` instead.
//! - [`Model::notes`] lists what is used but may not work as the user expects:
//!   `dsr` with a backend port that is not the frontend's, and an annotated
//!   `snat` that `externalTrafficPolicy: Local` overrides.
//!
//! One bad object never stops the others (kube-proxy's way): an invalid value
//! in a served Service (its return-path annotation included) or in an
//! EndpointSlice of a served Service, the same object twice, or a second
//! Service claiming a cluster IP frontend skips that object, or only the
//! field, port or endpoint concerned, into [`Model::skipped`]; the rest is
//! served. Each such case is also a [`ModelError`] in [`Model::errors`], which
//! [`Model::strict`] (`--strict`) turns back into a refusal of the whole set.
//! Addresses and CIDRs are read as kube-proxy reads them ([`crate::ip`]:
//! leading zeros are decimal).
//!
//! Must never: depend on input order (the output is sorted), or panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::ops::RangeInclusive;

use clustergate_dataplane::flow::Proto;
use clustergate_dataplane::table::{BackendState, FrontendKind, ReturnPath};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

use crate::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::manifest::{identity, label, ManifestError, Objects, Skipped};
use crate::policy::PolicySet;

/// The proxy name clustergate answers to by default.
pub const DEFAULT_PROXY_NAME: &str = "clustergate";
/// Label naming the proxy that should serve a Service (absent: the default proxy).
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label the endpoints controllers put on the endpoints of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// ClientIP affinity timeout when the Service gives none (the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest ClientIP affinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;
/// Annotation choosing a Service's return path: `snat`, `dsr` or `routed`.
pub const RETURN_PATH_ANNOTATION: &str = "clustergate.io/return-path";
/// The return path of Services without [`RETURN_PATH_ANNOTATION`], unless
/// [`ModelOptions::return_path`] (`--return-path`) chooses another.
pub const DEFAULT_RETURN_PATH: ReturnPath = ReturnPath::Snat;
/// The API server's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// kube-proxy's default node-port addresses: every address of the node.
#[must_use]
pub fn default_node_port_addresses() -> Vec<IpNet> {
    vec![
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ]
}

/// What the command line decides for [`build_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// The value of `service.kubernetes.io/service-proxy-name` this gateway
    /// serves (normally [`DEFAULT_PROXY_NAME`]): Services without the label are
    /// served too, those with another value are skipped.
    pub proxy_name: String,
    /// The return path of Services without [`RETURN_PATH_ANNOTATION`]
    /// (normally [`DEFAULT_RETURN_PATH`]).
    pub return_path: ReturnPath,
    /// `--service-node-port-range`: node ports (and health-check node ports)
    /// outside it are skipped (normally [`DEFAULT_NODE_PORT_RANGE`]).
    pub node_port_range: RangeInclusive<u16>,
    /// `--nodeport-addresses`: node ports are served on the node's addresses
    /// within these (normally [`default_node_port_addresses`]: all of them).
    pub node_port_addresses: Vec<IpNet>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            proxy_name: DEFAULT_PROXY_NAME.to_owned(),
            return_path: DEFAULT_RETURN_PATH,
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            node_port_addresses: default_node_port_addresses(),
        }
    }
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Endpoint address.
    pub address: IpAddr,
    /// Endpoint port (the slice's resolved target port).
    pub port: u16,
    /// Ready, or serving and terminating.
    pub state: BackendState,
    /// Maglev weight: 1 takes new flows; 0 is draining (a serving and
    /// terminating endpoint while a ready one exists: it keeps its
    /// established flows and gets no new ones). A terminating backend has
    /// weight 1 only when no endpoint is ready (per node on a node-local
    /// frontend): kube-proxy's fallback.
    pub weight: u32,
    /// The number of the node it runs on ([`Model::nodes`]), when its
    /// endpoint names a known node (`nodeName`).
    pub node: Option<u32>,
}

/// One frontend: where a Service port is reached, and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `"ns/name"` of the Service.
    pub service: String,
    /// The service port's name (`""` for an unnamed port).
    pub port_name: String,
    /// How it is exposed.
    pub kind: FrontendKind,
    /// The address: a cluster IP, an external or load-balancer IP, or the
    /// unspecified address of the family (`0.0.0.0`, `::`) for a node port.
    pub address: IpAddr,
    /// The service port, or the node port for [`FrontendKind::NodePort`].
    pub port: u16,
    /// Protocol.
    pub protocol: Proto,
    /// ClientIP affinity timeout, when the Service has `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// How replies come back: the Service's annotation, else the default of
    /// [`ModelOptions`]; never [`ReturnPath::Snat`] on an external frontend of a
    /// Service with `externalTrafficPolicy: Local`.
    pub return_path: ReturnPath,
    /// Backends sorted by (address, port); empty: traffic is rejected.
    pub backends: Vec<Backend>,
    /// `loadBalancerSourceRanges` of its family (LoadBalancer frontends of a
    /// Service with ranges only): sources outside are dropped; an empty list
    /// lets no source in. `None`: open.
    pub source_ranges: Option<Vec<IpNet>>,
    /// `internalTrafficPolicy: Local` (ClusterIP frontends only): a client is
    /// served only by the backends on its own node.
    pub node_local: bool,
}

impl Frontend {
    /// The order of the model's frontends: by Service, port name, address,
    /// protocol, kind and port.
    #[must_use]
    pub fn order(a: &Self, b: &Self) -> std::cmp::Ordering {
        (
            &a.service,
            &a.port_name,
            a.address,
            a.protocol,
            a.kind as u8,
            a.port,
        )
            .cmp(&(
                &b.service,
                &b.port_name,
                b.address,
                b.protocol,
                b.kind as u8,
                b.port,
            ))
    }
}

/// A Node as the gateway sees it: which client addresses are on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// Its number in the table (1, 2, … in name order).
    pub number: u32,
    /// Its pod CIDRs, then its InternalIP and ExternalIP addresses as host
    /// prefixes; none of them is another node's.
    pub prefixes: Vec<IpNet>,
}

/// A `healthCheckNodePort` the gateway answers on (kube-proxy's service health
/// server).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// The endpoints the gateway uses for the Service: distinct backend
    /// addresses over all its frontends (kube-proxy's `localEndpoints`).
    pub endpoints: usize,
}

/// The gateway's view of a manifest: every frontend, what was skipped, and
/// caveats about what is used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Sorted by (service, port name, address, protocol, kind, port).
    pub frontends: Vec<Frontend>,
    /// Objects (and parts of objects) not used, sorted by (object, reason).
    pub skipped: Vec<Skipped>,
    /// Things used that may not work as the user expects (a `dsr` frontend
    /// whose backends listen on another port; an annotated `snat` replaced by
    /// `routed`), sorted by (object, reason). `run` logs them as warnings.
    pub notes: Vec<Skipped>,
    /// The Nodes with at least one prefix, in name order (numbered from 1).
    pub nodes: Vec<NodeInfo>,
    /// Where node ports are served ([`ModelOptions::node_port_addresses`]).
    pub node_port_addresses: Vec<IpNet>,
    /// Health-check node ports, sorted by (namespace, name).
    pub health_checks: Vec<HealthCheck>,
    /// What `--strict` refuses, in the order found: invalid values, duplicate
    /// objects, clashing cluster IP frontends. Each is also in
    /// [`Model::skipped`], with what was skipped because of it.
    pub errors: Vec<ModelError>,
    /// The NetworkPolicies with the Pods and Namespaces they select
    /// (`crate::policy`); what cannot be read of them is in
    /// [`Model::skipped`] (`invalid_value`), and fails closed.
    pub policy: PolicySet,
}

impl Model {
    /// The model, or (`--strict`) the first of [`Model::errors`]: any invalid
    /// object refuses the whole set, as before issue 18.
    ///
    /// # Errors
    /// The first of [`Model::errors`].
    pub fn strict(self) -> Result<Self, ModelError> {
        match self.errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(self),
        }
    }
}

/// Why a set of objects was refused as a whole.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// A field of a served object has an invalid value.
    #[error("{object}: {field}: {message}")]
    Invalid {
        /// `"Service ns/name"` or `"EndpointSlice ns/name"`.
        object: String,
        /// The field path, e.g. `spec.ports[1].port`.
        field: String,
        /// What is wrong with its value.
        message: String,
    },
    /// The same object appears twice.
    #[error("{object}: appears more than once")]
    Duplicate {
        /// `"Kind ns/name"`.
        object: String,
    },
    /// An object of the manifest cannot be read (see [`crate::manifest`]).
    #[error(transparent)]
    Unreadable(#[from] ManifestError),
    /// Two Services claim the same cluster IP, port and protocol.
    #[error("{second}: frontend {frontend} is already a frontend of {first}")]
    Conflict {
        /// The Service that keeps it (first in name order).
        first: String,
        /// The other Service.
        second: String,
        /// `address:port/protocol`.
        frontend: String,
    },
}

impl ModelError {
    /// The object skipped because of it (for a conflict, the second Service).
    #[must_use]
    pub fn object(&self) -> &str {
        match self {
            Self::Invalid { object, .. } | Self::Duplicate { object } => object,
            Self::Conflict { second, .. } => second,
            Self::Unreadable(ManifestError::Object { object, .. }) => object,
            Self::Unreadable(ManifestError::Syntax { .. }) => "manifest",
        }
    }

    /// The message without the object.
    fn detail(&self) -> String {
        match self {
            Self::Invalid { field, message, .. } => format!("{field}: {message}"),
            Self::Duplicate { .. } => "appears more than once".to_owned(),
            Self::Unreadable(ManifestError::Object { message, .. }) => message.clone(),
            Self::Unreadable(e @ ManifestError::Syntax { .. }) => e.to_string(),
            Self::Conflict {
                first, frontend, ..
            } => format!("spec.clusterIPs: frontend {frontend} is already a frontend of {first}"),
        }
    }
}

fn invalid(object: &str, field: impl Into<String>, message: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        object: object.to_owned(),
        field: field.into(),
        message: message.into(),
    }
}

/// What a build skips, and the errors `--strict` would refuse.
#[derive(Debug, Default)]
pub(crate) struct Skips {
    pub(crate) list: Vec<Skipped>,
    pub(crate) errors: Vec<ModelError>,
}

impl Skips {
    /// Skips something kube-proxy would skip too (not an error).
    pub(crate) fn skip(
        &mut self,
        object: impl Into<String>,
        label: &'static str,
        reason: impl Into<String>,
    ) {
        self.list.push(Skipped::new(object, label, reason));
    }

    /// Skips what `error` makes unusable; `then` says what (`"the Service is
    /// skipped"`, `"the endpoint is skipped"`, …).
    pub(crate) fn refuse(&mut self, error: ModelError, label: &'static str, then: &str) {
        self.list.push(Skipped::new(
            error.object(),
            label,
            format!("{}; {then}", error.detail()),
        ));
        self.errors.push(error);
    }
}

/// Label of an invalid address or CIDR.
const BAD_ADDRESS: &str = label::INVALID_ADDRESS;
/// Label of another invalid value.
const BAD_VALUE: &str = label::INVALID_VALUE;
/// Consequence of a second copy of a Service or EndpointSlice.
pub(crate) const DUPLICATE_THEN: &str = "this copy is ignored (the first is used)";
/// Consequence of an error that skips a whole Service.
const SKIP_SERVICE: &str = "the Service is skipped";
/// Consequence of an error that skips a whole EndpointSlice.
const SKIP_SLICE: &str = "the EndpointSlice is skipped";

/// The wire name of a kind, as `show` prints it.
#[must_use]
pub const fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "ExternalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

/// The metric label of a kind (`clusterIP`, `nodePort`, `externalIP`,
/// `loadBalancer`).
#[must_use]
pub const fn kind_label(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "clusterIP",
        FrontendKind::NodePort => "nodePort",
        FrontendKind::ExternalIp => "externalIP",
        FrontendKind::LoadBalancer => "loadBalancer",
    }
}

/// Every kind, in kind order.
pub const KINDS: [FrontendKind; 4] = [
    FrontendKind::ClusterIp,
    FrontendKind::NodePort,
    FrontendKind::ExternalIp,
    FrontendKind::LoadBalancer,
];

/// The field a frontend of `kind` comes from, for skip reasons.
const fn kind_field(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "spec.clusterIPs",
        FrontendKind::NodePort => "spec.ports[].nodePort",
        FrontendKind::ExternalIp => "spec.externalIPs",
        FrontendKind::LoadBalancer => "status.loadBalancer.ingress[].ip",
    }
}

/// The wire name of a backend state, as `show` prints it.
#[must_use]
pub const fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Ready => "ready",
        BackendState::Terminating => "terminating",
    }
}

impl Backend {
    /// Its state as `show` prints it: `ready`, `terminating` (the fallback:
    /// takes new flows because nothing is ready) or `draining` (terminating
    /// while something is ready: weight 0).
    #[must_use]
    pub const fn state_name(&self) -> &'static str {
        match self.state {
            BackendState::Terminating if self.weight == 0 => "draining",
            s => state_name(s),
        }
    }
}

/// `addr:port/PROTO`, with IPv6 addresses in brackets.
#[must_use]
pub fn endpoint_string(address: IpAddr, port: u16, protocol: Proto) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}/{}", protocol.as_str()),
        IpAddr::V6(a) => format!("[{a}]:{port}/{}", protocol.as_str()),
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(a: IpAddr) -> Self {
        if a.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// How usable an endpoint is, worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Usable {
    /// Not ready, and not (serving and terminating).
    No,
    /// Serving and terminating: a fallback when nothing is ready.
    Terminating,
    /// Ready.
    Ready,
}

/// A service port after validation.
#[derive(Debug)]
struct SvcPort {
    /// Its index in `spec.ports`.
    index: usize,
    name: String,
    port: u16,
    protocol: Proto,
    node_port: Option<u16>,
}

/// A slice port with a number.
#[derive(Debug)]
struct SlicePort {
    name: String,
    protocol: Proto,
    port: u16,
}

#[derive(Debug)]
struct SliceEndpoint {
    address: IpAddr,
    usable: Usable,
    /// `nodeName`.
    node: Option<String>,
}

/// An EndpointSlice after validation.
#[derive(Debug)]
pub(crate) struct SliceInfo {
    family: Family,
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

/// A served Service after validation.
#[derive(Debug)]
pub(crate) struct Served {
    /// `"ns/name"`.
    pub(crate) key: String,
    pub(crate) cluster_ips: Vec<IpAddr>,
    ports: Vec<SvcPort>,
    /// With the field each comes from.
    pub(crate) external_ips: Vec<(String, IpAddr)>,
    /// With the field each comes from.
    pub(crate) lb_ips: Vec<(String, IpAddr)>,
    /// `loadBalancerSourceRanges`, when there are any.
    lb_ranges: Option<Vec<IpNet>>,
    /// A source range is not a CIDR: no LoadBalancer frontends (fail closed).
    lb_closed: bool,
    /// `internalTrafficPolicy: Local`.
    internal_local: bool,
    /// `healthCheckNodePort`, when `external_local` and within the range.
    pub(crate) health_check_port: Option<u16>,
    affinity: Option<u32>,
    /// The annotation's return path, or the default.
    return_path: ReturnPath,
    /// The annotation said `snat` (for the note when Local overrides it).
    annotated_snat: bool,
    /// kube-proxy's `ExternalPolicyLocal`: externally accessible, and
    /// `externalTrafficPolicy: Local`.
    external_local: bool,
    pub(crate) slices: Vec<SliceInfo>,
}

impl Served {
    /// The return path of a frontend of `kind`: the Service's, except `snat`
    /// on an external frontend with `externalTrafficPolicy: Local`.
    fn return_path(&self, kind: FrontendKind) -> ReturnPath {
        if self.external_local
            && kind != FrontendKind::ClusterIp
            && self.return_path == ReturnPath::Snat
        {
            ReturnPath::Routed
        } else {
            self.return_path
        }
    }
}

/// Builds the model of a set of objects.
///
/// `options.proxy_name` selects the Services served (see [`ModelOptions`]);
/// `options.return_path` is the return path of Services without the
/// [`RETURN_PATH_ANNOTATION`].
///
/// Never refuses: an object, or the part of one, that cannot be used is
/// skipped ([`Model::skipped`]) and, when it is an invalid value, a duplicate
/// or a clash, noted in [`Model::errors`] (see [`Model::strict`]).
#[must_use]
pub fn build_model(objects: &Objects, options: &ModelOptions) -> Model {
    let mut skips = Skips {
        list: objects.skipped.clone(),
        errors: objects
            .errors
            .iter()
            .cloned()
            .map(ModelError::Unreadable)
            .collect(),
    };
    let mut served: BTreeMap<(String, String), Served> = BTreeMap::new();
    let mut not_served: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen = BTreeSet::new();

    for svc in &objects.services {
        let (ns, name) = identity(&svc.metadata);
        let object = format!("Service {ns}/{name}");
        if !seen.insert(object.clone()) {
            skips.refuse(
                ModelError::Duplicate { object },
                label::DUPLICATE,
                DUPLICATE_THEN,
            );
            continue;
        }
        let id = (ns.to_owned(), name.to_owned());
        if let Some((label, reason)) = skip_reason(svc, &options.proxy_name) {
            skips.skip(object, label, reason);
            not_served.insert(id);
            continue;
        }
        match validate_service(svc, &object, options, &mut skips) {
            Some(s) => {
                served.insert(id, s);
            }
            None => {
                not_served.insert(id);
            }
        }
    }

    for slice in &objects.slices {
        let (ns, name) = identity(&slice.metadata);
        let object = format!("EndpointSlice {ns}/{name}");
        if !seen.insert(object.clone()) {
            skips.refuse(
                ModelError::Duplicate { object },
                label::DUPLICATE,
                DUPLICATE_THEN,
            );
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        let Some(svc_name) = labels
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
        else {
            skips.skip(
                object,
                label::NO_SERVICE,
                format!("no {SERVICE_NAME_LABEL} label: it belongs to no Service"),
            );
            continue;
        };
        if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
            skips.skip(
                object,
                label::NOT_PROXIED,
                format!("labelled {HEADLESS_LABEL} (endpoints of a headless Service)"),
            );
            continue;
        }
        let id = (ns.to_owned(), svc_name.clone());
        let Some(svc) = served.get_mut(&id) else {
            let reason = if not_served.contains(&id) {
                format!("its Service {ns}/{svc_name} is skipped")
            } else {
                format!("no Service {ns}/{svc_name} in the manifest")
            };
            skips.skip(object, label::NO_SERVICE, reason);
            continue;
        };
        if let Some(info) = validate_slice(slice, &object, &mut skips) {
            svc.slices.push(info);
        }
    }

    let (nodes, node_numbers) = nodes_of(&objects.nodes, &mut skips);

    // Every cluster IP and its Service: an external or load-balancer IP that
    // is one is not served (it would take over another Service's address).
    let mut cluster_ips: HashMap<IpAddr, &str> = HashMap::new();
    for s in served.values() {
        for &ip in &s.cluster_ips {
            cluster_ips.entry(ip).or_insert(s.key.as_str());
        }
    }

    let mut frontends = Vec::new();
    let mut health_checks = Vec::new();
    let mut health_ports: BTreeMap<u16, &str> = BTreeMap::new();
    for s in served.values() {
        let object = format!("Service {}", s.key);
        let owner = |ip: IpAddr| cluster_ips.get(&ip).map(|k| (*k).to_owned());
        let endpoints = frontends_of(s, &owner, &node_numbers, &mut frontends, &mut skips);
        if let Some(port) = s.health_check_port {
            if let Some(first) = health_ports.get(&port) {
                skips.skip(
                    object,
                    label::CONFLICT,
                    format!(
                        "spec.healthCheckNodePort: {port} is already the health check node port \
                         of Service {first}; no health check is answered"
                    ),
                );
            } else {
                health_ports.insert(port, s.key.as_str());
                let (ns, name) = s.key.split_once('/').unwrap_or(("", s.key.as_str()));
                health_checks.push(HealthCheck {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    port,
                    endpoints,
                });
            }
        }
    }
    let frontends = resolve_conflicts(frontends, &mut skips);
    let mut notes = notes_of(served.values(), &frontends);
    let policy = PolicySet::new(&objects.pods, &objects.namespaces, &objects.policies);
    for p in &policy.problems {
        let (object, reason) = p.split_once(": ").unwrap_or((p.as_str(), ""));
        skips.skip(object, label::INVALID_VALUE, reason);
    }

    let Skips {
        list: mut skipped,
        errors,
    } = skips;
    skipped.sort();
    skipped.dedup();
    notes.sort();
    notes.dedup();
    health_checks.sort();
    Model {
        frontends,
        skipped,
        notes,
        nodes,
        node_port_addresses: options.node_port_addresses.clone(),
        health_checks,
        errors,
        policy,
    }
}

/// The Nodes with their prefixes and numbers, and the number of each node
/// name. A Node with an invalid pod CIDR or address, or seen twice, is
/// skipped (its endpoints are on no known node: never local); a prefix that
/// an earlier Node (in name order) has is left out of the later one.
pub(crate) fn nodes_of<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    skips: &mut Skips,
) -> (Vec<NodeInfo>, HashMap<String, u32>) {
    let mut sorted: Vec<&Node> = nodes.into_iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut owner: HashMap<IpNet, String> = HashMap::new();
    let mut out: Vec<NodeInfo> = Vec::new();
    let mut seen = BTreeSet::new();
    'nodes: for node in sorted {
        let name = node.metadata.name.clone().unwrap_or_default();
        let object = format!("Node {name}");
        if !seen.insert(name.clone()) {
            skips.skip(object, label::DUPLICATE, "appears more than once; ignored");
            continue;
        }
        let mut prefixes: Vec<IpNet> = Vec::new();
        let spec = node.spec.as_ref();
        let cidrs: Vec<(String, &str)> = match spec.and_then(|s| s.pod_cidrs.as_deref()) {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.as_str()))
                .collect(),
            _ => spec
                .and_then(|s| s.pod_cidr.as_deref())
                .filter(|c| !c.is_empty())
                .map(|c| ("spec.podCIDR".to_owned(), c))
                .into_iter()
                .collect(),
        };
        for (field, c) in cidrs {
            let net = match parse_cidr_sloppy(c) {
                Some(net) if !is_mapped(net.addr()) => net.trunc(),
                _ => {
                    skips.skip(
                        object,
                        BAD_ADDRESS,
                        format!("{field}: {c:?} is not a CIDR; the Node is ignored (its endpoints are never node-local)"),
                    );
                    continue 'nodes;
                }
            };
            prefixes.push(net);
        }
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, a) in addresses.into_iter().flatten().enumerate() {
            if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                continue;
            }
            match parse_ip(&a.address) {
                Ok(ip) => prefixes.push(IpNet::from(ip)),
                Err(m) => {
                    skips.skip(
                        object,
                        BAD_ADDRESS,
                        format!("status.addresses[{i}].address: {m}; the Node is ignored (its endpoints are never node-local)"),
                    );
                    continue 'nodes;
                }
            }
        }
        let mut kept = Vec::new();
        for net in prefixes {
            if kept.contains(&net) {
                continue;
            }
            if let Some(first) = owner.get(&net) {
                skips.skip(
                    object.clone(),
                    label::CONFLICT,
                    format!("{net} is already a prefix of Node {first}; left out"),
                );
                continue;
            }
            kept.push(net);
        }
        if kept.is_empty() {
            continue;
        }
        for net in &kept {
            owner.insert(*net, name.clone());
        }
        out.push(NodeInfo {
            name,
            number: 0,
            prefixes: kept,
        });
    }
    let mut numbers = HashMap::new();
    for (i, n) in out.iter_mut().enumerate() {
        n.number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        numbers.insert(n.name.clone(), n.number);
    }
    (out, numbers)
}

fn is_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// Why a Service is not served, if it is not (kube-proxy's informer label
/// selector, then `ShouldSkipService` and `GetClusterIPByFamily`).
pub(crate) fn skip_reason(svc: &Service, proxy_name: &str) -> Option<(&'static str, String)> {
    if let Some(owner) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PROXY_NAME_LABEL))
    {
        if owner != proxy_name {
            return Some((
                label::OTHER_PROXY,
                format!(
                    "{PROXY_NAME_LABEL} is {owner:?}, not {proxy_name:?}: another proxy serves it"
                ),
            ));
        }
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Some((label::NOT_PROXIED, "no spec, so no cluster IP".to_owned()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some((
            label::NOT_PROXIED,
            "type ExternalName: a DNS alias, not proxied".to_owned(),
        ));
    }
    let first = spec
        .cluster_ips
        .as_ref()
        .and_then(|ips| ips.first())
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .or(spec.cluster_ip.as_deref().filter(|s| !s.is_empty()));
    match first {
        Some("None") => Some((
            label::NOT_PROXIED,
            "headless (clusterIP None): not proxied".to_owned(),
        )),
        None => Some((label::NOT_PROXIED, "no clusterIP".to_owned())),
        Some(_) => None,
    }
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

fn parse_proto(p: Option<&str>) -> Option<Proto> {
    match p {
        None | Some("TCP") => Some(Proto::Tcp),
        Some("UDP") => Some(Proto::Udp),
        Some("SCTP") => Some(Proto::Sctp),
        Some(_) => None,
    }
}

/// Parses an IP address of any family, refusing IPv4-mapped IPv6 addresses
/// (the dataplane's canonical form would turn them into IPv4).
///
/// Read as kube-proxy reads it ([`parse_ip_sloppy`]: IPv4 parts with leading
/// zeros are decimal).
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    match parse_ip_sloppy(s) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
            Err(format!("{s:?} is an IPv4-mapped IPv6 address"))
        }
        Some(ip) => Ok(ip),
        None => Err(format!("{s:?} is not an IP address")),
    }
}

/// Checks a Service that is to be served. `None`: it has nothing to serve
/// (no usable ports), or a value that decides how all of it is served is
/// invalid; either is noted in `skips`. An invalid port, external IP or
/// load-balancer IP skips only itself. `default_return_path` applies unless
/// the Service is annotated.
#[allow(clippy::too_many_lines)] // reason: one Service, field by field
pub(crate) fn validate_service(
    svc: &Service,
    object: &str,
    options: &ModelOptions,
    skips: &mut Skips,
) -> Option<Served> {
    let default_return_path = options.return_path;
    let node_port_range = &options.node_port_range;
    let (ns, name) = identity(&svc.metadata);
    let Some(spec) = svc.spec.as_ref() else {
        return None; // skip_reason has ruled this out
    };
    // An invalid value that decides how the whole Service is served skips it.
    let refuse = |skips: &mut Skips, field: &str, label: &'static str, message: String| {
        skips.refuse(invalid(object, field, message), label, SKIP_SERVICE);
    };

    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some(other) => {
            refuse(
                skips,
                "spec.type",
                BAD_VALUE,
                format!("{other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
            );
            return None;
        }
    }

    // Cluster IPs: spec.clusterIPs when given (its first entry must equal
    // spec.clusterIP), else spec.clusterIP. At most one per family.
    let cluster_ip = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let raw: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => {
            if let (Some(single), Some(first)) = (cluster_ip, list.first()) {
                if single != first {
                    refuse(
                        skips,
                        "spec.clusterIPs[0]",
                        BAD_VALUE,
                        format!("{first:?} differs from spec.clusterIP {single:?}"),
                    );
                    return None;
                }
            }
            list.iter()
                .enumerate()
                .map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s.as_str()))
                .collect()
        }
        _ => cluster_ip
            .map(|s| ("spec.clusterIP".to_owned(), s))
            .into_iter()
            .collect(),
    };
    if raw.len() > 2 {
        refuse(
            skips,
            "spec.clusterIPs",
            BAD_VALUE,
            format!("{} addresses; at most one per family", raw.len()),
        );
        return None;
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for (field, s) in &raw {
        let ip = match parse_ip(s) {
            Ok(ip) => ip,
            Err(m) => {
                refuse(skips, field, BAD_ADDRESS, m);
                return None;
            }
        };
        if cluster_ips.iter().any(|c| Family::of(*c) == Family::of(ip)) {
            refuse(
                skips,
                field,
                BAD_VALUE,
                format!("a second {} address", Family::of(ip).name()),
            );
            return None;
        }
        cluster_ips.push(ip);
    }
    let families: Vec<Family> = cluster_ips.iter().map(|ip| Family::of(*ip)).collect();

    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t),
                    _ => {
                        refuse(
                            skips,
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            BAD_VALUE,
                            format!("{t} is not in 1..={MAX_AFFINITY_TIMEOUT_S}"),
                        );
                        return None;
                    }
                },
            }
        }
        Some(other) => {
            refuse(
                skips,
                "spec.sessionAffinity",
                BAD_VALUE,
                format!("{other:?} is not None or ClientIP"),
            );
            return None;
        }
    };

    let annotated = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RETURN_PATH_ANNOTATION))
    {
        None => None,
        Some(v) => match v.parse::<ReturnPath>() {
            Ok(p) => Some(p),
            Err(m) => {
                refuse(
                    skips,
                    &format!("metadata.annotations[{RETURN_PATH_ANNOTATION:?}]"),
                    BAD_VALUE,
                    m,
                );
                return None;
            }
        },
    };

    // kube-proxy's ExternalPolicyLocal: Local counts only for a Service that is
    // externally accessible (NodePort, LoadBalancer, or ClusterIP with
    // external IPs). Empty is what the API stores for the others.
    let local = match spec.external_traffic_policy.as_deref() {
        None | Some("" | "Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            refuse(
                skips,
                "spec.externalTrafficPolicy",
                BAD_VALUE,
                format!("{other:?} is not Cluster or Local"),
            );
            return None;
        }
    };
    let externally_accessible = match spec.type_.as_deref() {
        Some("NodePort" | "LoadBalancer") => true,
        _ => spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty()),
    };

    let mut ports: Vec<SvcPort> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        // An invalid port skips that port (kube-proxy keys ports by name).
        let skip_port = |skips: &mut Skips, f: &str, message: String| {
            skips.refuse(
                invalid(object, field(f), message),
                BAD_VALUE,
                "the port is skipped",
            );
        };
        let Some(port) = valid_port(p.port) else {
            skip_port(skips, "port", format!("{} is not a valid port", p.port));
            continue;
        };
        let Some(protocol) = parse_proto(p.protocol.as_deref()) else {
            skip_port(
                skips,
                "protocol",
                format!(
                    "{:?} is not TCP, UDP or SCTP",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
            continue;
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match u16::try_from(n)
                .ok()
                .filter(|n| node_port_range.contains(n))
            {
                Some(n) => Some(n),
                None => {
                    skips.skip(
                        object,
                        label::OUT_OF_RANGE,
                        format!(
                            "{}: {n} is outside the node port range {}-{} \
                             (--service-node-port-range); its NodePort frontends are not served",
                            field("nodePort"),
                            node_port_range.start(),
                            node_port_range.end()
                        ),
                    );
                    None
                }
            },
        };
        let name = p.name.clone().unwrap_or_default();
        if let Some(q) = ports.iter().find(|q| q.name == name) {
            let j = q.index;
            skip_port(
                skips,
                "name",
                format!("{name:?} is also the name of spec.ports[{j}]"),
            );
            continue;
        }
        if let Some(q) = ports
            .iter()
            .find(|q| q.port == port && q.protocol == protocol)
        {
            let j = q.index;
            skip_port(
                skips,
                "port",
                format!("{port}/{} is also spec.ports[{j}]", protocol.as_str()),
            );
            continue;
        }
        ports.push(SvcPort {
            index: i,
            name,
            port,
            protocol,
            node_port,
        });
    }
    if ports.is_empty() {
        let reason = if spec.ports.as_ref().is_some_and(|p| !p.is_empty()) {
            "no usable ports"
        } else {
            "no ports"
        };
        skips.skip(object, label::NOT_PROXIED, reason);
        return None;
    }

    // External and load-balancer IPs of a family the Service has a cluster IP
    // of (kube-proxy's MapIPsByIPFamily per proxier family).
    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        // kube-proxy's MapIPsByIPFamily skips an invalid IP, and only it.
        let ip = match parse_ip(s) {
            Ok(ip) => ip,
            Err(m) => {
                skips.refuse(
                    invalid(object, field, m),
                    BAD_ADDRESS,
                    "that external IP is not served",
                );
                continue;
            }
        };
        if families.contains(&Family::of(ip)) {
            external_ips.push((field, ip));
        } else {
            skips.skip(
                object,
                label::WRONG_FAMILY,
                format!(
                    "{field}: {ip} is {}, and the Service has no {0} cluster IP; ignored",
                    Family::of(ip).name()
                ),
            );
        }
    }
    let mut lb_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let field = format!("status.loadBalancer.ingress[{i}]");
        let Some(s) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue; // a hostname-only ingress has no IP to serve
        };
        let ip = match parse_ip(s) {
            Ok(ip) => ip,
            Err(m) => {
                skips.refuse(
                    invalid(object, format!("{field}.ip"), m),
                    BAD_ADDRESS,
                    "that load-balancer IP is not served",
                );
                continue;
            }
        };
        if ing.ip_mode.as_deref() == Some("Proxy") {
            skips.skip(
                object,
                label::NOT_PROXIED,
                format!("{field}: ipMode Proxy: the load balancer proxies to nodes itself; {ip} ignored"),
            );
        } else if families.contains(&Family::of(ip)) {
            lb_ips.push((format!("{field}.ip"), ip));
        } else {
            skips.skip(
                object,
                label::WRONG_FAMILY,
                format!(
                    "{field}: {ip} is {}, and the Service has no {0} cluster IP; ignored",
                    Family::of(ip).name()
                ),
            );
        }
    }

    // loadBalancerSourceRanges, trimmed as kube-proxy does (the API's
    // validation lets whitespace through). One that is not a CIDR closes the
    // LoadBalancer frontends: serving them open would let in sources the user
    // meant to keep out.
    let mut lb_ranges = Vec::new();
    let mut lb_closed = false;
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match parse_cidr_sloppy(r.trim()) {
            Some(net) => lb_ranges.push(net.trunc()),
            None => {
                lb_closed = true;
                skips.skip(
                    object,
                    BAD_ADDRESS,
                    format!(
                        "spec.loadBalancerSourceRanges[{i}]: {r:?} is not a CIDR; \
                         its LoadBalancer frontends are not served (fail closed)"
                    ),
                );
            }
        }
    }

    // internalTrafficPolicy: Cluster (or empty, the API's default) or Local.
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("" | "Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            skips.skip(
                object,
                BAD_VALUE,
                format!(
                    "spec.internalTrafficPolicy: {other:?} is not Cluster or Local; not served"
                ),
            );
            return None;
        }
    };

    // healthCheckNodePort: kube-proxy's NeedsHealthCheck (type LoadBalancer
    // and ExternalPolicyLocal); elsewhere the API does not allocate one.
    let mut health_check_port = None;
    if local && spec.type_.as_deref() == Some("LoadBalancer") {
        match spec.health_check_node_port {
            None | Some(0) => {}
            Some(n) => match u16::try_from(n)
                .ok()
                .filter(|n| node_port_range.contains(n))
            {
                Some(n) => health_check_port = Some(n),
                None => skips.skip(
                    object,
                    label::OUT_OF_RANGE,
                    format!(
                        "spec.healthCheckNodePort: {n} is outside the node port range {}-{} \
                         (--service-node-port-range); no health check is answered",
                        node_port_range.start(),
                        node_port_range.end()
                    ),
                ),
            },
        }
    }

    Some(Served {
        key: format!("{ns}/{name}"),
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        lb_ranges: (!lb_ranges.is_empty()).then_some(lb_ranges),
        lb_closed,
        internal_local,
        health_check_port,
        affinity,
        return_path: annotated.unwrap_or(default_return_path),
        annotated_snat: annotated == Some(ReturnPath::Snat),
        external_local: local && externally_accessible,
        slices: Vec::new(),
    })
}

/// Checks an EndpointSlice of a served Service. `None`: an FQDN slice, or one
/// whose address type is invalid. An invalid port skips that port; an
/// endpoint whose address (its first, the one kube-proxy uses) is invalid
/// skips that endpoint.
pub(crate) fn validate_slice(
    slice: &EndpointSlice,
    object: &str,
    skips: &mut Skips,
) -> Option<SliceInfo> {
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => {
            skips.skip(
                object,
                label::NOT_PROXIED,
                "addressType FQDN: no semantics for proxies (kube-proxy ignores it too)",
            );
            return None;
        }
        other => {
            skips.refuse(
                invalid(
                    object,
                    "addressType",
                    format!("{other:?} is not IPv4, IPv6 or FQDN"),
                ),
                BAD_VALUE,
                SKIP_SLICE,
            );
            return None;
        }
    };

    let mut ports: Vec<SlicePort> = Vec::new();
    let mut names: Vec<(String, Proto, usize)> = Vec::new();
    for (j, p) in slice.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("ports[{j}].{f}");
        let skip_port = |skips: &mut Skips, f: &str, message: String| {
            skips.refuse(
                invalid(object, field(f), message),
                BAD_VALUE,
                "the port is skipped",
            );
        };
        let name = p.name.clone().unwrap_or_default();
        let Some(protocol) = parse_proto(p.protocol.as_deref()) else {
            skip_port(
                skips,
                "protocol",
                format!(
                    "{:?} is not TCP, UDP or SCTP",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
            continue;
        };
        if let Some((_, _, k)) = names
            .iter()
            .find(|(n, pr, _)| *n == name && *pr == protocol)
        {
            skip_port(
                skips,
                "name",
                format!("{name:?}/{} is also ports[{k}]", protocol.as_str()),
            );
            continue;
        }
        names.push((name.clone(), protocol, j));
        match p.port {
            None | Some(0) => skips.skip(
                object,
                label::EMPTY,
                format!("ports[{j}]: no port number; ignored"),
            ),
            Some(n) => {
                let Some(port) = valid_port(n) else {
                    skip_port(skips, "port", format!("{n} is not a valid port"));
                    continue;
                };
                ports.push(SlicePort {
                    name,
                    protocol,
                    port,
                });
            }
        }
    }

    let mut endpoints = Vec::new();
    for (k, ep) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses an endpoint's first address only.
        let Some(s) = ep.addresses.first() else {
            skips.skip(
                object,
                label::EMPTY,
                format!("endpoints[{k}]: no addresses; ignored"),
            );
            continue;
        };
        let field = format!("endpoints[{k}].addresses[0]");
        let address = match parse_ip(s) {
            Ok(ip) if Family::of(ip) == family => ip,
            other => {
                let message = match other {
                    Err(m) if family == Family::V6 && m.contains("IPv4-mapped") => m,
                    _ => format!("{s:?} is not an {} address", family.name()),
                };
                skips.refuse(
                    invalid(object, field.as_str(), message),
                    BAD_ADDRESS,
                    "the endpoint is skipped",
                );
                continue;
            }
        };
        // Nil conditions as the API documents them (EndpointConditions):
        // ready nil = ready; serving nil = ready's value; terminating nil = false.
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let usable = if ready {
            Usable::Ready
        } else if serving && terminating {
            Usable::Terminating
        } else {
            Usable::No
        };
        let node = ep.node_name.clone().filter(|n| !n.is_empty());
        endpoints.push(SliceEndpoint {
            address,
            usable,
            node,
        });
    }

    Some(SliceInfo {
        family,
        ports,
        endpoints,
    })
}

/// The backends of one service port in one family: the slice port of the same
/// name and protocol in each slice of that family, endpoints merged by
/// (address, port) keeping the best condition; ready ones and serving and
/// terminating ones, weighed by [`weigh`] over all of them (not serving: left
/// out).
fn backends_for(
    s: &Served,
    family: Family,
    port: &SvcPort,
    nodes: &HashMap<String, u32>,
) -> Vec<Backend> {
    let mut merged: BTreeMap<(IpAddr, u16), (Usable, Option<u32>)> = BTreeMap::new();
    for slice in s.slices.iter().filter(|sl| sl.family == family) {
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let node = ep.node.as_ref().and_then(|n| nodes.get(n)).copied();
            let (u, n) = merged
                .entry((ep.address, sp.port))
                .or_insert((Usable::No, None));
            // The best copy's node; among equals, the first known one.
            if ep.usable > *u || n.is_none() {
                *n = node.or(*n);
            }
            *u = (*u).max(ep.usable);
        }
    }
    let mut backends: Vec<Backend> = merged
        .iter()
        .filter_map(|(&(address, port), &(u, node))| {
            let state = match u {
                Usable::Ready => BackendState::Ready,
                Usable::Terminating => BackendState::Terminating,
                Usable::No => return None,
            };
            Some(Backend {
                address,
                port,
                state,
                weight: 1,
                node,
            })
        })
        .collect();
    weigh(&mut backends, |_| ());
    backends
}

/// Sets the weights of one set of backends (kube-proxy's
/// `CategorizeEndpoints`, KEP-1669): within each group that `group` makes, a
/// ready backend has weight 1; a serving-and-terminating one has weight 0
/// (draining: keeps its flows, takes no new ones) while the group has a ready
/// one, and weight 1 (the fallback) when it has none.
fn weigh<K: Ord>(backends: &mut [Backend], group: impl Fn(&Backend) -> K) {
    let with_ready: BTreeSet<K> = backends
        .iter()
        .filter(|b| b.state == BackendState::Ready)
        .map(&group)
        .collect();
    for b in backends.iter_mut() {
        b.weight = u32::from(b.state == BackendState::Ready || !with_ready.contains(&group(b)));
    }
}

/// The frontends of one Service (into `out`), and the number of distinct
/// endpoint addresses they use (for its health check).
pub(crate) fn frontends_of(
    s: &Served,
    cluster_ip_owner: &dyn Fn(IpAddr) -> Option<String>,
    nodes: &HashMap<String, u32>,
    out: &mut Vec<Frontend>,
    skips: &mut Skips,
) -> usize {
    let object = format!("Service {}", s.key);
    // External and load-balancer IPs that are a cluster IP are not served.
    let usable = |list: &[(String, IpAddr)], skips: &mut Skips| -> Vec<IpAddr> {
        let mut kept = Vec::new();
        for (field, ip) in list {
            if let Some(owner) = cluster_ip_owner(*ip) {
                skips.skip(
                    object.clone(),
                    label::CONFLICT,
                    format!("{field}: {ip} is the cluster IP of Service {owner}; not served"),
                );
            } else {
                kept.push(*ip);
            }
        }
        kept
    };
    let external_ips = usable(&s.external_ips, skips);
    let lb_ips = if s.lb_closed {
        Vec::new()
    } else {
        usable(&s.lb_ips, skips)
    };
    let mut addresses = BTreeSet::new();
    for port in &s.ports {
        for &cip in &s.cluster_ips {
            let family = Family::of(cip);
            let backends = backends_for(s, family, port, nodes);
            // internalTrafficPolicy: Local weighs each node's backends on
            // their own: a node without a ready backend falls back to its
            // serving-and-terminating ones (kube-proxy's local category).
            let local_backends = s.internal_local.then(|| {
                let mut b = backends.clone();
                weigh(&mut b, |b| b.node);
                b
            });
            // The health check counts what takes new flows (not draining).
            addresses.extend(backends.iter().filter(|b| b.weight > 0).map(|b| b.address));
            let ranges: Option<Vec<IpNet>> = s.lb_ranges.as_ref().map(|r| {
                r.iter()
                    .filter(|n| Family::of(n.addr()) == family)
                    .copied()
                    .collect()
            });
            let mut push = |kind, address, number| {
                out.push(Frontend {
                    service: s.key.clone(),
                    port_name: port.name.clone(),
                    kind,
                    address,
                    port: number,
                    protocol: port.protocol,
                    affinity_timeout_s: s.affinity,
                    return_path: s.return_path(kind),
                    backends: match &local_backends {
                        Some(b) if kind == FrontendKind::ClusterIp => b.clone(),
                        _ => backends.clone(),
                    },
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        ranges.clone()
                    } else {
                        None
                    },
                    node_local: kind == FrontendKind::ClusterIp && s.internal_local,
                });
            };
            push(FrontendKind::ClusterIp, cip, port.port);
            if let Some(np) = port.node_port {
                push(FrontendKind::NodePort, family.unspecified(), np);
            }
            for &ip in external_ips.iter().filter(|ip| Family::of(**ip) == family) {
                push(FrontendKind::ExternalIp, ip, port.port);
            }
            for &ip in lb_ips.iter().filter(|ip| Family::of(**ip) == family) {
                push(FrontendKind::LoadBalancer, ip, port.port);
            }
        }
    }
    addresses.len()
}

/// One (address, port, protocol) has one frontend: the first by (kind:
/// ClusterIP, NodePort, ExternalIP, LoadBalancer; service name) keeps it and
/// the others are skipped. Two cluster IP frontends on one key are also an
/// error for `--strict` (the API's IP allocator never allows it).
fn resolve_conflicts(mut all: Vec<Frontend>, skips: &mut Skips) -> Vec<Frontend> {
    all.sort_by(|a, b| {
        (
            a.kind as u8,
            &a.service,
            &a.port_name,
            a.address,
            a.protocol,
        )
            .cmp(&(
                b.kind as u8,
                &b.service,
                &b.port_name,
                b.address,
                b.protocol,
            ))
    });
    let mut owner: HashMap<(IpAddr, u16, Proto), (FrontendKind, String)> = HashMap::new();
    let mut kept = Vec::with_capacity(all.len());
    for f in all {
        let key = (f.address, f.port, f.protocol);
        if let Some((kind, first)) = owner.get(&key) {
            let frontend = endpoint_string(f.address, f.port, f.protocol);
            if *kind == FrontendKind::ClusterIp && f.kind == FrontendKind::ClusterIp {
                skips.refuse(
                    ModelError::Conflict {
                        first: format!("Service {first}"),
                        second: format!("Service {}", f.service),
                        frontend,
                    },
                    label::CONFLICT,
                    "that frontend is not served",
                );
                continue;
            }
            skips.skip(
                format!("Service {}", f.service),
                label::CONFLICT,
                format!(
                    "{}: {} frontend {frontend} is already a {} frontend of {first}; ignored",
                    kind_field(f.kind),
                    kind_name(f.kind),
                    kind_name(*kind)
                ),
            );
            continue;
        }
        owner.insert(key, (f.kind, f.service.clone()));
        kept.push(f);
    }
    kept.sort_by(Frontend::order);
    kept
}

/// The caveats about the kept frontends (see [`Model::notes`]).
pub(crate) fn notes_of<'a>(
    served: impl Iterator<Item = &'a Served>,
    frontends: &[Frontend],
) -> Vec<Skipped> {
    let mut notes = Vec::new();
    for s in served.filter(|s| s.annotated_snat && s.external_local) {
        // In kind order: NodePort, ExternalIP, LoadBalancer.
        let external: BTreeSet<(u8, &str)> = frontends
            .iter()
            .filter(|f| f.service == s.key && f.kind != FrontendKind::ClusterIp)
            .map(|f| (f.kind as u8, kind_name(f.kind)))
            .collect();
        if external.is_empty() {
            continue;
        }
        notes.push(Skipped::new(
            format!("Service {}", s.key),
            label::NOTE,
            format!(
                "{RETURN_PATH_ANNOTATION} is snat, but spec.externalTrafficPolicy is Local, \
                 which keeps the client's address: its {} frontends use routed",
                external
                    .into_iter()
                    .map(|(_, name)| name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for f in frontends
        .iter()
        .filter(|f| f.return_path == ReturnPath::Dsr)
    {
        let other: BTreeSet<u16> = f
            .backends
            .iter()
            .map(|b| b.port)
            .filter(|&p| p != f.port)
            .collect();
        if other.is_empty() {
            continue;
        }
        let ports = other
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        notes.push(Skipped::new(
            format!("Service {}", f.service),
            label::NOTE,
            format!(
                "dsr: {} frontend {} delivers the client's packets unchanged, to port {}, \
                 but backends listen on port{} {ports}: they must also accept port {2}",
                kind_name(f.kind),
                endpoint_string(f.address, f.port, f.protocol),
                f.port,
                if other.len() == 1 { "" } else { "s" },
            ),
        ));
    }
    notes
}

/// Whether a skip label means something is wrong with the object (an invalid
/// value, a duplicate, a clash), rather than something not meant for us.
#[must_use]
pub fn is_problem(label: &str) -> bool {
    matches!(
        label,
        label::INVALID_ADDRESS
            | label::INVALID_VALUE
            | label::DUPLICATE
            | label::CONFLICT
            | label::WRONG_FAMILY
            | label::OUT_OF_RANGE
    )
}

/// Logs each skipped entry once: when it first appears (a warning for a
/// [problem](is_problem), else info) and when it goes away.
#[derive(Debug, Default)]
pub struct SkipLog {
    last: BTreeSet<Skipped>,
}

impl SkipLog {
    /// Logs the entries of `model.skipped` new since the last call, and
    /// those gone.
    pub fn log(&mut self, model: &Model) {
        let now: BTreeSet<Skipped> = model.skipped.iter().cloned().collect();
        for s in now.difference(&self.last) {
            if is_problem(s.label) {
                tracing::warn!(object = %s.object, reason = s.label, "skipped: {}", s.reason);
            } else {
                tracing::info!(object = %s.object, reason = s.label, "skipped: {}", s.reason);
            }
        }
        for s in self.last.difference(&now) {
            tracing::info!(object = %s.object, reason = s.label, "no longer skipped: {}", s.reason);
        }
        self.last = now;
    }
}
