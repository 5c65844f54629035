//! NetworkPolicy for the traffic the gateway carries: the rules of the
//! `networking.k8s.io/v1` API, evaluated for one connection through the
//! gateway, with the reason.
//!
//! Source NAT hides the client from the backend pod, so the pod network can
//! no longer enforce the policies that select the backend; the gateway must,
//! before NAT, once it has picked the backend. A connection from address
//! `client` to backend pod `P` on (protocol, port) — the port after the
//! Service's DNAT, the pod's own — is allowed when both hold:
//!
//! 1. **ingress of `P`**: no policy of `P`'s namespace that selects `P` has
//!    the `Ingress` type (then `P` is open), or one of their ingress rules
//!    admits `client` on that port;
//! 2. **egress of the client**, only when `client` is a known pod `Q`: no
//!    policy of `Q`'s namespace that selects `Q` has the `Egress` type, or
//!    one of their egress rules admits `P` (its address, its labels) on that
//!    port. Kubernetes evaluates egress after DNAT, so the rules see the pod,
//!    not the Service.
//!
//! Several policies are a union; a rule admits when one of its peers matches
//! (or it lists none) and one of its ports matches (or it lists none). The
//! details, with their sources, are in `docs/semantics.md` ("NetworkPolicy").
//!
//! This module is the reference: plain loops over the objects, the way the
//! API reference words them, used by `show --policy` to explain a decision
//! and by the tests as the oracle for what the dataplane is given.
//!
//! Bad input fails closed: a policy that cannot be read in part still
//! selects its pods (they stay isolated), and the part that cannot be read
//! admits nothing; each such part is named in [`PolicySet::problems`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::policy::{
    PolicyBackendRecord, PolicyClassRecord, PolicyParts, PolicyPortRecord, PolicyRuleRecord,
    BACKEND_INGRESS_ISOLATED, CLASS_EGRESS_ISOLATED, PROTO_ANY,
};
use clustergate_dataplane::table::PrefixRecord;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::ip::{parse_cidr_sloppy, parse_ip_sloppy};

/// The label every namespace carries with its own name (Kubernetes ≥ 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

type Labels = BTreeMap<String, String>;

/// A pod as policies see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP`), hostNetwork pods excluded.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Container ports: (name, protocol, number), for named ports.
    pub ports: Vec<(String, Proto, u16)>,
}

/// A label selector, read once; `None` in a field means "not given".
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    /// Matches what every requirement matches (none: everything).
    Requirements(Vec<Requirement>),
    /// Could not be read: matches nothing.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    fn read(s: &LabelSelector, place: &str, problems: &mut Vec<String>) -> Self {
        let mut reqs: Vec<Requirement> = s
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
            .collect();
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let values = e.values.clone().unwrap_or_default();
            let r = match e.operator.as_str() {
                "In" if !values.is_empty() => Requirement::In(e.key.clone(), values),
                "NotIn" if !values.is_empty() => Requirement::NotIn(e.key.clone(), values),
                "Exists" if values.is_empty() => Requirement::Exists(e.key.clone()),
                "DoesNotExist" if values.is_empty() => Requirement::DoesNotExist(e.key.clone()),
                op => {
                    problems.push(format!(
                        "{place}.matchExpressions[{i}]: operator {op:?} with {} value(s) is not \
                         a valid requirement (In/NotIn need values, Exists/DoesNotExist none); \
                         the selector matches nothing",
                        values.len()
                    ));
                    return Self::Invalid;
                }
            };
            reqs.push(r);
        }
        Self::Requirements(reqs)
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::Invalid => false,
            Self::Requirements(reqs) => reqs.iter().all(|r| match r {
                Requirement::Equals(k, v) => labels.get(k) == Some(v),
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            }),
        }
    }
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// Pods matching `pods` (absent: every pod) in the namespaces matching
    /// `namespaces` (absent: the policy's own namespace).
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    /// Addresses in `cidr` and in none of `except`.
    Block { cidr: IpNet, except: Vec<IpNet> },
    /// Could not be read: matches nothing.
    Invalid,
}

/// One port entry of a rule: protocol and a port, a range or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PortMatch {
    /// Every port of the protocol.
    Any(Proto),
    /// `lo..=hi`.
    Range(Proto, u16, u16),
    /// A container port's name, resolved on the destination pod.
    Named(Proto, String),
    /// Could not be read: matches nothing.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `None`: the rule lists no peers, so every peer matches.
    peers: Option<Vec<Peer>>,
    /// `None`: the rule lists no ports, so every port matches.
    ports: Option<Vec<PortMatch>>,
}

/// One policy, read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    namespace: String,
    name: String,
    selector: Selector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

/// Which side of the connection a rule or a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The backend pod's ingress.
    Ingress,
    /// The client pod's egress.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// How one side was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// No policy selects the pod for this direction (or, for egress, the
    /// client is not a known pod): open.
    Open,
    /// Admitted by this policy's rule (namespace/name, rule index).
    Allowed(String, usize),
    /// Isolated by these policies, and no rule of theirs admits it.
    Denied(Vec<String>),
}

/// The decision for one connection, with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The backend pod's ingress.
    pub ingress: Side,
    /// The client pod's egress.
    pub egress: Side,
    /// The client pod, if the client address is one.
    pub client_pod: Option<String>,
}

impl Verdict {
    /// Whether the connection may be made.
    #[must_use]
    pub fn allowed(&self) -> bool {
        !matches!(self.ingress, Side::Denied(_)) && !matches!(self.egress, Side::Denied(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |f: &mut fmt::Formatter<'_>, d: Direction, s: &Side| match s {
            Side::Open => write!(f, "{d}: no policy"),
            Side::Allowed(p, r) => write!(f, "{d}: allowed by {p} rule {r}"),
            Side::Denied(ps) => write!(f, "{d}: denied (isolated by {})", ps.join(", ")),
        };
        f.write_str(if self.allowed() { "allowed" } else { "denied" })?;
        f.write_str(" (")?;
        side(f, Direction::Ingress, &self.ingress)?;
        f.write_str("; ")?;
        side(f, Direction::Egress, &self.egress)?;
        f.write_str(")")
    }
}

/// Pods, namespaces and policies, read once; answers [`PolicySet::decide`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pods: Vec<PodInfo>,
    /// Pod address → index in `pods` (the first pod that has it).
    by_ip: std::collections::HashMap<IpAddr, usize>,
    namespaces: BTreeMap<String, Labels>,
    policies: Vec<Policy>,
    /// What could not be read, each naming the object and field.
    pub problems: Vec<String>,
}

impl PolicySet {
    /// Reads `pods`, `namespaces` and `policies`. Never fails: what cannot
    /// be read is named in [`problems`](Self::problems) and fails closed.
    #[must_use]
    pub fn new(pods: &[Pod], namespaces: &[Namespace], policies: &[NetworkPolicy]) -> Self {
        let mut set = Self::default();
        for ns in namespaces {
            let Some(name) = ns.metadata.name.clone().filter(|n| !n.is_empty()) else {
                set.problems
                    .push("Namespace without metadata.name: skipped".to_owned());
                continue;
            };
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            // The API server sets it on every namespace; manifests may not.
            labels
                .entry(NAMESPACE_NAME_LABEL.to_owned())
                .or_insert_with(|| name.clone());
            set.namespaces.insert(name, labels);
        }
        for pod in pods {
            if let Some(p) = read_pod(pod, &mut set.problems) {
                set.namespaces
                    .entry(p.namespace.clone())
                    .or_insert_with(|| {
                        Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), p.namespace.clone())])
                    });
                for &a in &p.ips {
                    set.by_ip.entry(a).or_insert(set.pods.len());
                }
                set.pods.push(p);
            }
        }
        for np in policies {
            if let Some(p) = read_policy(np, &mut set.problems) {
                set.policies.push(p);
            }
        }
        set
    }

    /// The pods read.
    #[must_use]
    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    /// The pod that has `addr`, if any.
    #[must_use]
    pub fn pod_by_ip(&self, addr: IpAddr) -> Option<&PodInfo> {
        self.by_ip.get(&addr).map(|&i| &self.pods[i])
    }

    /// Whether a policy selects any pod at all (else everything is open).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The decision for a connection from `client` to the backend pod that
    /// has address `backend`, on `proto`/`port` (the backend's port). A
    /// backend address that is no known pod (an endpoint outside the
    /// cluster's pods) has no ingress policy: open.
    #[must_use]
    pub fn decide(&self, client: IpAddr, backend: IpAddr, proto: Proto, port: u16) -> Verdict {
        let dst = self.pod_by_ip(backend);
        let src = self.pod_by_ip(client);
        let ingress = match dst {
            None => Side::Open,
            Some(p) => self.side(
                Direction::Ingress,
                p,
                &|peer, pol| self.peer_matches(peer, pol, client, src),
                proto,
                port,
                p,
            ),
        };
        let egress = match src {
            None => Side::Open,
            Some(q) => match dst {
                Some(p) => self.side(
                    Direction::Egress,
                    q,
                    &|peer, pol| self.peer_matches(peer, pol, backend, Some(p)),
                    proto,
                    port,
                    p,
                ),
                // The backend is no pod: only ipBlocks can admit it, and
                // named ports cannot.
                None => self.side_to_address(q, backend, proto, port),
            },
        };
        Verdict {
            ingress,
            egress,
            client_pod: src.map(|q| format!("{}/{}", q.namespace, q.name)),
        }
    }

    /// The policies of `subject`'s namespace that select it for `dir`.
    fn isolating(&self, dir: Direction, subject: &PodInfo) -> Vec<&Policy> {
        self.policies
            .iter()
            .filter(|p| p.namespace == subject.namespace && p.selector.matches(&subject.labels))
            .filter(|p| match dir {
                Direction::Ingress => p.ingress.is_some(),
                Direction::Egress => p.egress.is_some(),
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)] // reason: one decision's facts, kept explicit
    fn side(
        &self,
        dir: Direction,
        subject: &PodInfo,
        peer_ok: &dyn Fn(&Peer, &Policy) -> bool,
        proto: Proto,
        port: u16,
        dst: &PodInfo,
    ) -> Side {
        let pols = self.isolating(dir, subject);
        if pols.is_empty() {
            return Side::Open;
        }
        for pol in &pols {
            let rules = match dir {
                Direction::Ingress => pol.ingress.as_deref(),
                Direction::Egress => pol.egress.as_deref(),
            }
            .unwrap_or_default();
            for (i, r) in rules.iter().enumerate() {
                let peers = r
                    .peers
                    .as_ref()
                    .is_none_or(|ps| ps.iter().any(|peer| peer_ok(peer, pol)));
                if peers && ports_match(r.ports.as_deref(), proto, port, Some(dst)) {
                    return Side::Allowed(format!("{}/{}", pol.namespace, pol.name), i);
                }
            }
        }
        Side::Denied(
            pols.iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
        )
    }

    /// Egress of pod `q` towards an address that is no pod.
    fn side_to_address(&self, q: &PodInfo, addr: IpAddr, proto: Proto, port: u16) -> Side {
        self.side(
            Direction::Egress,
            q,
            &|peer, _| matches!(peer, Peer::Block { cidr, except } if in_block(addr, cidr, except)),
            proto,
            port,
            &PodInfo {
                namespace: String::new(),
                name: String::new(),
                labels: Labels::new(),
                ips: Vec::new(),
                node: None,
                ports: Vec::new(),
            },
        )
    }

    /// Whether `peer` (of `pol`) matches the address `addr`, which is the pod
    /// `pod` when it is one.
    fn peer_matches(&self, peer: &Peer, pol: &Policy, addr: IpAddr, pod: Option<&PodInfo>) -> bool {
        match peer {
            Peer::Invalid => false,
            Peer::Block { cidr, except } => in_block(addr, cidr, except),
            Peer::Pods { pods, namespaces } => {
                let Some(p) = pod else { return false };
                let ns_ok = match namespaces {
                    None => p.namespace == pol.namespace,
                    Some(sel) => self
                        .namespaces
                        .get(&p.namespace)
                        .is_some_and(|labels| sel.matches(labels)),
                };
                ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&p.labels))
            }
        }
    }
}

fn in_block(addr: IpAddr, cidr: &IpNet, except: &[IpNet]) -> bool {
    cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
}

/// Whether one of `ports` (none listed: any) admits `proto`/`port` on the
/// destination pod `dst` (which resolves named ports).
fn ports_match(
    ports: Option<&[PortMatch]>,
    proto: Proto,
    port: u16,
    dst: Option<&PodInfo>,
) -> bool {
    let Some(ports) = ports else { return true };
    ports.iter().any(|m| match m {
        PortMatch::Invalid => false,
        PortMatch::Any(p) => *p == proto,
        PortMatch::Range(p, lo, hi) => *p == proto && (*lo..=*hi).contains(&port),
        PortMatch::Named(p, name) => {
            *p == proto
                && dst.is_some_and(|d| {
                    d.ports
                        .iter()
                        .any(|(n, pp, num)| n == name && *pp == proto && *num == port)
                })
        }
    })
}

fn proto_of(s: Option<&str>) -> Option<Proto> {
    match s.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

fn read_pod(pod: &Pod, problems: &mut Vec<String>) -> Option<PodInfo> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    if name.is_empty() {
        problems.push(format!("Pod in {namespace} without metadata.name: skipped"));
        return None;
    }
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    // Finished pods hold no address any more; hostNetwork pods share the
    // node's, which says nothing about which pod is talking.
    let phase = status.and_then(|s| s.phase.as_deref());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut ips = Vec::new();
    if !host_network && !matches!(phase, Some("Succeeded" | "Failed")) {
        let listed: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().map(|p| p.ip.as_str()).collect())
            .unwrap_or_default();
        let listed = if listed.is_empty() {
            status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .collect()
        } else {
            listed
        };
        for (i, s) in listed.iter().enumerate() {
            match parse_ip_sloppy(s) {
                Some(a) => ips.push(a),
                None => problems.push(format!(
                    "Pod {namespace}/{name}: status.podIPs[{i}]: {s:?} is not an IP address; \
                     that address is not the pod's"
                )),
            }
        }
    }
    let mut ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for p in c.ports.iter().flatten() {
            let (Some(n), Some(proto), Ok(num)) = (
                p.name.as_ref().filter(|n| !n.is_empty()),
                proto_of(p.protocol.as_deref()),
                u16::try_from(p.container_port),
            ) else {
                continue;
            };
            ports.push((n.clone(), proto, num));
        }
    }
    Some(PodInfo {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()),
        ports,
    })
}

fn read_policy(np: &NetworkPolicy, problems: &mut Vec<String>) -> Option<Policy> {
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace = np
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    if name.is_empty() {
        problems.push(format!(
            "NetworkPolicy in {namespace} without metadata.name: skipped"
        ));
        return None;
    }
    let place = format!("NetworkPolicy {namespace}/{name}");
    let spec = np.spec.clone().unwrap_or_default();
    let mut selector = Selector::read(
        spec.pod_selector
            .as_ref()
            .unwrap_or(&LabelSelector::default()),
        &format!("{place}: spec.podSelector"),
        problems,
    );
    if selector == Selector::Invalid {
        // Selecting nothing would leave the pods it meant open: select every
        // pod of the namespace instead (their rules still admit what they
        // say), and say so.
        problems.push(format!(
            "{place}: spec.podSelector cannot be read, so the policy applies to every pod of \
             namespace {namespace}"
        ));
        selector = Selector::Requirements(Vec::new());
    }
    // policyTypes: given, or Ingress, plus Egress when egress rules exist.
    let (mut has_in, mut has_eg) = (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        has_in = false;
        has_eg = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => has_in = true,
                "Egress" => has_eg = true,
                other => {
                    // Unknown type: isolate both ways, admit only what the
                    // rules say (fails closed).
                    problems.push(format!(
                        "{place}: spec.policyTypes[{i}]: {other:?} is neither Ingress nor \
                         Egress; the policy isolates both directions"
                    ));
                    has_in = true;
                    has_eg = true;
                }
            }
        }
    }
    let ingress = has_in.then(|| {
        read_rules(
            spec.ingress.as_deref(),
            &format!("{place}: spec.ingress"),
            problems,
        )
    });
    let egress = has_eg.then(|| {
        read_rules(
            spec.egress.as_deref(),
            &format!("{place}: spec.egress"),
            problems,
        )
    });
    Some(Policy {
        namespace,
        name,
        selector,
        ingress,
        egress,
    })
}

/// The fields a rule of either direction has (`from` or `to`, and `ports`).
trait RuleFields {
    /// `from` or `to`, for messages.
    const PEERS: &'static str;
    fn peers(&self) -> Option<&Vec<NetworkPolicyPeer>>;
    fn ports(&self) -> Option<&Vec<NetworkPolicyPort>>;
}

impl RuleFields for NetworkPolicyIngressRule {
    const PEERS: &'static str = "from";
    fn peers(&self) -> Option<&Vec<NetworkPolicyPeer>> {
        self.from.as_ref()
    }
    fn ports(&self) -> Option<&Vec<NetworkPolicyPort>> {
        self.ports.as_ref()
    }
}

impl RuleFields for NetworkPolicyEgressRule {
    const PEERS: &'static str = "to";
    fn peers(&self) -> Option<&Vec<NetworkPolicyPeer>> {
        self.to.as_ref()
    }
    fn ports(&self) -> Option<&Vec<NetworkPolicyPort>> {
        self.ports.as_ref()
    }
}

fn read_rules<R: RuleFields>(
    list: Option<&[R]>,
    place: &str,
    problems: &mut Vec<String>,
) -> Vec<Rule> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| read_rule(r, &format!("{place}[{i}]"), problems))
        .collect()
}

fn read_rule<R: RuleFields>(r: &R, place: &str, problems: &mut Vec<String>) -> Rule {
    let peers = r.peers().filter(|p| !p.is_empty()).map(|ps| {
        ps.iter()
            .enumerate()
            .map(|(i, p)| read_peer(p, &format!("{place}.{}[{i}]", R::PEERS), problems))
            .collect()
    });
    let ports = r.ports().filter(|p| !p.is_empty()).map(|ps| {
        ps.iter()
            .enumerate()
            .map(|(i, p)| read_port(p, &format!("{place}.ports[{i}]"), problems))
            .collect()
    });
    Rule { peers, ports }
}

fn read_peer(p: &NetworkPolicyPeer, place: &str, problems: &mut Vec<String>) -> Peer {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(b), None, None) => {
            let Some(cidr) = parse_cidr_sloppy(&b.cidr) else {
                problems.push(format!(
                    "{place}.ipBlock.cidr: {:?} is not a CIDR; the peer matches nothing",
                    b.cidr
                ));
                return Peer::Invalid;
            };
            let mut except = Vec::new();
            for (i, e) in b.except.iter().flatten().enumerate() {
                match parse_cidr_sloppy(e) {
                    Some(n) => except.push(n),
                    None => {
                        problems.push(format!(
                            "{place}.ipBlock.except[{i}]: {e:?} is not a CIDR; the peer \
                             matches nothing"
                        ));
                        return Peer::Invalid;
                    }
                }
            }
            Peer::Block { cidr, except }
        }
        (None, None, None) => {
            problems.push(format!(
                "{place}: a peer needs podSelector, namespaceSelector or ipBlock; it matches \
                 nothing"
            ));
            Peer::Invalid
        }
        (Some(_), _, _) => {
            problems.push(format!(
                "{place}: ipBlock cannot be combined with a selector; the peer matches nothing"
            ));
            Peer::Invalid
        }
        (None, pods, namespaces) => Peer::Pods {
            pods: pods
                .as_ref()
                .map(|s| Selector::read(s, &format!("{place}.podSelector"), problems)),
            namespaces: namespaces
                .as_ref()
                .map(|s| Selector::read(s, &format!("{place}.namespaceSelector"), problems)),
        },
    }
}

fn read_port(p: &NetworkPolicyPort, place: &str, problems: &mut Vec<String>) -> PortMatch {
    let Some(proto) = proto_of(p.protocol.as_deref()) else {
        problems.push(format!(
            "{place}.protocol: {:?} is not TCP, UDP or SCTP; the entry matches nothing",
            p.protocol.as_deref().unwrap_or("")
        ));
        return PortMatch::Invalid;
    };
    match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any(proto),
        (None, Some(_)) => {
            problems.push(format!(
                "{place}.endPort: needs a numeric port; the entry matches nothing"
            ));
            PortMatch::Invalid
        }
        (Some(IntOrString::String(name)), None) => {
            if let Ok(n) = name.parse::<u16>() {
                // A number written as a string (kubectl accepts "80").
                if n > 0 {
                    return PortMatch::Range(proto, n, n);
                }
            }
            PortMatch::Named(proto, name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            problems.push(format!(
                "{place}.endPort: cannot go with a named port; the entry matches nothing"
            ));
            PortMatch::Invalid
        }
        (Some(IntOrString::Int(n)), end) => {
            let lo = u16::try_from(*n).ok().filter(|&v| v > 0);
            let hi = match end {
                None => lo,
                Some(e) => u16::try_from(e)
                    .ok()
                    .filter(|&v| lo.is_some_and(|l| v >= l)),
            };
            match (lo, hi) {
                (Some(lo), Some(hi)) => PortMatch::Range(proto, lo, hi),
                _ => {
                    problems.push(format!(
                        "{place}: port {n}{} is not a port or range within 1-65535; the entry \
                         matches nothing",
                        end.map(|e| format!(", endPort {e}")).unwrap_or_default()
                    ));
                    PortMatch::Invalid
                }
            }
        }
    }
}

/// Ports admitted, per protocol (TCP, UDP, SCTP), as sorted disjoint
/// inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct PortSet([Vec<(u16, u16)>; 3]);

const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

fn proto_slot(p: Proto) -> usize {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
        Proto::Sctp => 2,
    }
}

impl PortSet {
    fn full() -> Self {
        Self(std::array::from_fn(|_| vec![(0, u16::MAX)]))
    }

    fn is_full(&self) -> bool {
        self.0.iter().all(|r| r == &[(0, u16::MAX)])
    }

    fn add(&mut self, p: Proto, lo: u16, hi: u16) {
        let v = &mut self.0[proto_slot(p)];
        v.push((lo, hi));
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for &(l, h) in v.iter() {
            match out.last_mut() {
                Some(last) if u32::from(l) <= u32::from(last.1) + 1 => last.1 = last.1.max(h),
                _ => out.push((l, h)),
            }
        }
        *v = out;
    }

    /// What a rule's port list admits on the destination pod `dst`.
    fn of_rule(ports: Option<&[PortMatch]>, dst: Option<&PodInfo>) -> Self {
        let Some(ports) = ports else {
            return Self::full();
        };
        let mut s = Self::default();
        for m in ports {
            match m {
                PortMatch::Invalid => {}
                PortMatch::Any(p) => s.add(*p, 0, u16::MAX),
                PortMatch::Range(p, lo, hi) => s.add(*p, *lo, *hi),
                PortMatch::Named(p, name) => {
                    for (n, pp, num) in dst.map(|d| d.ports.as_slice()).unwrap_or_default() {
                        if n == name && pp == p {
                            s.add(*p, *num, *num);
                        }
                    }
                }
            }
        }
        s
    }
}

/// A client class, as control tells them apart: the pod identity
/// (namespace, labels and named ports) if the addresses are pods', and
/// which ipBlocks hold them.
type ClassKey = (Option<(String, Labels, Vec<(String, u8, u16)>)>, Vec<bool>);

/// Backends alike for ingress: their isolating policies and named ports.
type IngressGroup = (Vec<usize>, Vec<(String, Proto, u16)>);

/// Builds the rule, port and bitmap arrays of [`PolicyParts`].
struct RuleWriter<'p> {
    parts: &'p mut PolicyParts,
    words: usize,
}

impl RuleWriter<'_> {
    /// Appends a rule admitting `ports` from the classes of `bits`; nothing
    /// when it admits nothing. Returns whether one was written.
    fn push(&mut self, bits: &[u64], ports: &PortSet) -> bool {
        if bits.iter().all(|&w| w == 0) || ports.0.iter().all(Vec::is_empty) {
            return false;
        }
        let ports_start = self.parts.ports.len() as u32;
        if ports.is_full() {
            self.parts
                .ports
                .push(PolicyPortRecord::new(PROTO_ANY, 0, u16::MAX));
        } else {
            for (i, p) in PROTOS.iter().enumerate() {
                for &(lo, hi) in &ports.0[i] {
                    self.parts
                        .ports
                        .push(PolicyPortRecord::new(p.ip_number(), lo, hi));
                }
            }
        }
        let bits_start = self.parts.bits.len() as u32;
        debug_assert_eq!(bits.len(), self.words);
        self.parts.bits.extend_from_slice(bits);
        self.parts.rules.push(PolicyRuleRecord {
            bits_start,
            ports_start,
            ports_len: self.parts.ports.len() as u32 - ports_start,
            reserved: 0,
        });
        true
    }
}

impl PolicySet {
    /// Every distinct ipBlock of every rule, in policy order.
    fn blocks(&self) -> Vec<(IpNet, Vec<IpNet>)> {
        let mut out: Vec<(IpNet, Vec<IpNet>)> = Vec::new();
        for pol in &self.policies {
            for rules in [pol.ingress.as_deref(), pol.egress.as_deref()] {
                for r in rules.unwrap_or_default() {
                    for peer in r.peers.as_deref().unwrap_or_default() {
                        if let Peer::Block { cidr, except } = peer {
                            let b = (*cidr, except.clone());
                            if !out.contains(&b) {
                                out.push(b);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The indices of the policies of `subject`'s namespace (`by_ns`) that
    /// isolate it for `dir`.
    fn isolating_idx(
        &self,
        by_ns: &std::collections::HashMap<&str, Vec<usize>>,
        dir: Direction,
        subject: &PodInfo,
    ) -> Vec<usize> {
        by_ns
            .get(subject.namespace.as_str())
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| {
                        let p = &self.policies[i];
                        p.selector.matches(&subject.labels)
                            && match dir {
                                Direction::Ingress => p.ingress.is_some(),
                                Direction::Egress => p.egress.is_some(),
                            }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Compiles the policies for the dataplane ([`PolicyParts`]: client
    /// prefixes and classes, rules as class bitmaps and port ranges, and per
    /// backend address its ingress rules), for the backend addresses of the
    /// table. No policy: empty parts (nothing is looked up). The result
    /// gives, for every client address, backend in `backends`, protocol and
    /// port, the same answer as [`decide`](Self::decide).
    ///
    /// Cost: one peer match per (rule, class), each rule's bitmap computed
    /// once and shared by every backend and class whose policies hold it;
    /// backends with the same isolating policies and named ports share their
    /// rules, and so do classes with the same egress policies.
    #[must_use]
    pub fn compile(&self, backends: &[IpAddr]) -> PolicyParts {
        use std::collections::HashMap;
        if self.policies.is_empty() {
            return PolicyParts::default();
        }
        let blocks = self.blocks();
        let member_addr =
            |a: IpAddr| -> Vec<bool> { blocks.iter().map(|(c, e)| in_block(a, c, e)).collect() };
        // A prefix's own addresses (those in no longer prefix) are in a
        // block when the block's CIDR holds the prefix and no except does.
        let member_net = |p: &IpNet| -> Vec<bool> {
            blocks
                .iter()
                .map(|(c, e)| c.contains(p) && !e.iter().any(|x| x.contains(p)))
                .collect()
        };
        let world: ClassKey = (None, vec![false; blocks.len()]);
        let mut classes: BTreeMap<ClassKey, u32> = BTreeMap::new();
        let mut reps: Vec<(Option<usize>, Vec<bool>)> = vec![(None, world.1.clone())];
        classes.insert(world, 0);
        let mut class_of = |key: ClassKey, pod: Option<usize>| -> u32 {
            let next = classes.len() as u32;
            *classes.entry(key.clone()).or_insert_with(|| {
                reps.push((pod, key.1));
                next
            })
        };
        let mut prefixes: BTreeMap<IpNet, u32> = BTreeMap::new();
        for (c, e) in &blocks {
            for net in std::iter::once(c).chain(e) {
                let net = net.trunc();
                let k = class_of((None, member_net(&net)), None);
                prefixes.insert(net, k);
            }
        }
        for (pi, pod) in self.pods.iter().enumerate() {
            let ports: Vec<(String, u8, u16)> = pod
                .ports
                .iter()
                .map(|(n, p, num)| (n.clone(), p.ip_number(), *num))
                .collect();
            for &a in &pod.ips {
                let key = (
                    Some((pod.namespace.clone(), pod.labels.clone(), ports.clone())),
                    member_addr(a),
                );
                let k = class_of(key, Some(pi));
                // A pod's own address is the pod, whatever block holds it.
                prefixes.insert(IpNet::from(a), k);
            }
        }
        let nclasses = reps.len();
        let words = nclasses.div_ceil(64);
        let rep_pod = |k: usize| reps[k].0.map(|i| &self.pods[i]);
        let mut by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in self.policies.iter().enumerate() {
            by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
        let block_index = |cidr: &IpNet, except: &[IpNet]| {
            blocks
                .iter()
                .position(|(c, e)| c == cidr && e.as_slice() == except)
        };
        // Each rule's class bitmap: the classes one of its peers matches.
        let mut bits_cache: HashMap<(usize, Direction, usize), Vec<u64>> = HashMap::new();
        let mut rule_bits = |pi: usize, dir: Direction, ri: usize| -> Vec<u64> {
            bits_cache
                .entry((pi, dir, ri))
                .or_insert_with(|| {
                    let pol = &self.policies[pi];
                    let rule = match dir {
                        Direction::Ingress => &pol.ingress.as_deref().unwrap_or_default()[ri],
                        Direction::Egress => &pol.egress.as_deref().unwrap_or_default()[ri],
                    };
                    let mut bits = vec![0u64; words];
                    for (k, (pod, member)) in reps.iter().enumerate() {
                        let pod = pod.map(|i| &self.pods[i]);
                        let hit = rule.peers.as_ref().is_none_or(|ps| {
                            ps.iter().any(|peer| match peer {
                                Peer::Invalid => false,
                                Peer::Block { cidr, except } => {
                                    block_index(cidr, except).is_some_and(|i| member[i])
                                }
                                Peer::Pods { .. } => {
                                    pod.is_some()
                                        && self.peer_matches(peer, pol, IpAddr::from([0u8; 4]), pod)
                                }
                            })
                        });
                        if hit {
                            bits[k / 64] |= 1 << (k % 64);
                        }
                    }
                    bits
                })
                .clone()
        };
        let mut parts = PolicyParts {
            prefixes: prefixes
                .iter()
                .map(|(net, k)| PrefixRecord::new(*net, *k))
                .collect(),
            classes: vec![PolicyClassRecord::default(); nclasses],
            ..PolicyParts::default()
        };
        let prefix_class = |a: IpAddr| -> u32 {
            prefixes
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map_or(0, |(_, k)| *k)
        };
        let mut w = RuleWriter {
            parts: &mut parts,
            words,
        };
        // Egress: per class, its pods' isolating policies' rules, by
        // destination class (named ports resolved on each destination).
        let mut egress_memo: HashMap<Vec<usize>, (u32, u32)> = HashMap::new();
        let mut class_records = vec![PolicyClassRecord::default(); nclasses];
        for (k, rec) in class_records.iter_mut().enumerate() {
            let Some(pod) = rep_pod(k) else { continue };
            let iso = self.isolating_idx(&by_ns, Direction::Egress, pod);
            if iso.is_empty() {
                continue;
            }
            let (start, len) = *egress_memo.entry(iso.clone()).or_insert_with(|| {
                let start = w.parts.rules.len() as u32;
                for &pi in &iso {
                    let pol = &self.policies[pi];
                    for (ri, r) in pol.egress.as_deref().unwrap_or_default().iter().enumerate() {
                        let bits = rule_bits(pi, Direction::Egress, ri);
                        let named = r
                            .ports
                            .as_deref()
                            .is_some_and(|ps| ps.iter().any(|m| matches!(m, PortMatch::Named(..))));
                        if !named {
                            w.push(&bits, &PortSet::of_rule(r.ports.as_deref(), None));
                            continue;
                        }
                        // Named ports: the port set depends on the
                        // destination; one rule per distinct set.
                        let mut by_set: HashMap<PortSet, Vec<u64>> = HashMap::new();
                        for d in 0..nclasses {
                            if bits[d / 64] >> (d % 64) & 1 == 0 {
                                continue;
                            }
                            let ps = PortSet::of_rule(r.ports.as_deref(), rep_pod(d));
                            by_set.entry(ps).or_insert_with(|| vec![0; words])[d / 64] |=
                                1 << (d % 64);
                        }
                        let mut sets: Vec<(PortSet, Vec<u64>)> = by_set.into_iter().collect();
                        sets.sort_by(|a, b| a.1.cmp(&b.1));
                        for (ps, b) in sets {
                            w.push(&b, &ps);
                        }
                    }
                }
                (start, w.parts.rules.len() as u32 - start)
            });
            *rec = PolicyClassRecord {
                flags: CLASS_EGRESS_ISOLATED,
                rules_start: start,
                rules_len: len,
                reserved: 0,
            };
        }
        // Ingress: per backend address, its pod's isolating policies' rules
        // (ports resolved on the pod), shared by pods alike.
        let mut addrs: Vec<IpAddr> = backends.to_vec();
        addrs.sort_unstable();
        addrs.dedup();
        let mut ingress_memo: HashMap<IngressGroup, (u32, u32)> = HashMap::new();
        let mut backend_records = Vec::with_capacity(addrs.len());
        for b in addrs {
            let dst = self.pod_by_ip(b);
            let iso = dst
                .map(|p| self.isolating_idx(&by_ns, Direction::Ingress, p))
                .unwrap_or_default();
            let (rules_start, rules_len) = match dst {
                Some(p) if !iso.is_empty() => *ingress_memo
                    .entry((iso.clone(), p.ports.clone()))
                    .or_insert_with(|| {
                        let start = w.parts.rules.len() as u32;
                        for &pi in &iso {
                            let pol = &self.policies[pi];
                            for (ri, r) in pol
                                .ingress
                                .as_deref()
                                .unwrap_or_default()
                                .iter()
                                .enumerate()
                            {
                                let bits = rule_bits(pi, Direction::Ingress, ri);
                                w.push(&bits, &PortSet::of_rule(r.ports.as_deref(), Some(p)));
                            }
                        }
                        (start, w.parts.rules.len() as u32 - start)
                    }),
                _ => (0, 0),
            };
            backend_records.push(PolicyBackendRecord {
                addr: addr16(b),
                rules_start,
                rules_len,
                flags: if iso.is_empty() {
                    0
                } else {
                    BACKEND_INGRESS_ISOLATED
                },
                class: prefix_class(b),
            });
        }
        parts.classes = class_records;
        parts.backends = backend_records;
        parts
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid => f.write_str("(invalid)"),
            Self::Requirements(r) if r.is_empty() => f.write_str("all"),
            Self::Requirements(reqs) => {
                let parts: Vec<String> = reqs
                    .iter()
                    .map(|r| match r {
                        Requirement::Equals(k, v) => format!("{k}={v}"),
                        Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                        Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                        Requirement::Exists(k) => k.clone(),
                        Requirement::DoesNotExist(k) => format!("!{k}"),
                    })
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl Peer {
    fn describe(&self, own_ns: &str) -> String {
        match self {
            Self::Invalid => "nothing (invalid peer)".to_owned(),
            Self::Block { cidr, except } if except.is_empty() => cidr.to_string(),
            Self::Block { cidr, except } => {
                let e: Vec<String> = except.iter().map(ToString::to_string).collect();
                format!("{cidr} except {}", e.join(","))
            }
            Self::Pods { pods, namespaces } => {
                let p = pods.as_ref().map_or("all".to_owned(), ToString::to_string);
                match namespaces {
                    None => format!("pods {p} in {own_ns}"),
                    Some(n) => format!("pods {p} in namespaces {n}"),
                }
            }
        }
    }
}

fn describe_ports(ports: Option<&[PortMatch]>) -> String {
    let Some(ports) = ports else {
        return "any port".to_owned();
    };
    let parts: Vec<String> = ports
        .iter()
        .map(|m| match m {
            PortMatch::Invalid => "(invalid)".to_owned(),
            PortMatch::Any(p) => format!("any {}", p.as_str()),
            PortMatch::Range(p, lo, hi) if lo == hi => format!("{}/{lo}", p.as_str()),
            PortMatch::Range(p, lo, hi) => format!("{}/{lo}-{hi}", p.as_str()),
            PortMatch::Named(p, n) => format!("{}/{n}", p.as_str()),
        })
        .collect();
    parts.join(",")
}

impl PolicySet {
    /// Who may open connections to the pod at `addr`, for `show`: `None`
    /// without any policy (or when `addr` is no pod); `open` when no policy
    /// isolates it for ingress; else each admitting rule, `from PEERS on
    /// PORTS (ns/policy rule N)`, or `nothing (isolated by …)`. Egress
    /// policies of the clients come on top (`show --policy-from`).
    #[must_use]
    pub fn ingress_summary(&self, addr: IpAddr) -> Option<String> {
        if self.policies.is_empty() {
            return None;
        }
        let pod = self.pod_by_ip(addr)?;
        let pols = self.isolating(Direction::Ingress, pod);
        if pols.is_empty() {
            return Some("open".to_owned());
        }
        let mut rules = Vec::new();
        for pol in &pols {
            for (i, r) in pol
                .ingress
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let from = match &r.peers {
                    None => "anywhere".to_owned(),
                    Some(ps) => ps
                        .iter()
                        .map(|p| p.describe(&pol.namespace))
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                rules.push(format!(
                    "from {from} on {} ({}/{} rule {i})",
                    describe_ports(r.ports.as_deref()),
                    pol.namespace,
                    pol.name
                ));
            }
        }
        if rules.is_empty() {
            let names: Vec<String> = pols
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            return Some(format!("nothing (isolated by {})", names.join(", ")));
        }
        Some(rules.join("; "))
    }
}
