//! Presenting a [`Model`]: `show`'s JSON and table, and the dataplane's specs.
//!
//! Owns: [`Model::to_json`] (a stable shape, see `docs/semantics.md`),
//! [`Model::to_table`] (for people, like `ipvsadm -Ln`) and
//! [`Model::table_spec`] (what `Table::build_full`
//! takes: every frontend, the nodes' prefixes and the node-port addresses).

use std::fmt::Write as _;
use std::net::IpAddr;

use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use serde_json::{json, Value};

use crate::manifest::Skipped;
use crate::model::{kind_name, Frontend, Model};

/// `addr:port`, with IPv6 addresses in brackets.
fn host_port(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// kube-proxy's `ServicePortName` string: `ns/name` or `ns/name:port`; the
/// frontend's name in the snapshot (`Table::frontend_name`).
fn service_port_name(f: &Frontend) -> String {
    if f.port_name.is_empty() {
        f.service.clone()
    } else {
        format!("{}:{}", f.service, f.port_name)
    }
}

impl Model {
    /// `show`'s JSON: `{"frontends": [...], "skipped": [...], "notes": [...]}`.
    ///
    /// Each frontend is `{"service", "port_name", "kind", "address", "port",
    /// "protocol", "affinity_timeout_s", "return_path", "source_ranges",
    /// "node_local", "backends": [{"address", "port", "state", "node"}]}`;
    /// each skipped entry is `{"object", "reason", "label"}` (`label`: the
    /// short reason of [`crate::label`], as in the metric), each note
    /// `{"object", "reason"}`; `nodes`
    /// is `[{"name", "number", "prefixes"}]`, `node_port_addresses` a list of
    /// CIDRs and `health_checks` `[{"service", "port", "endpoints"}]`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let frontends: Vec<Value> = self
            .frontends
            .iter()
            .map(|f| {
                let backends: Vec<Value> = f
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "address": b.address.to_string(),
                            "port": b.port,
                            "state": b.state_name(),
                            "node": b.node.and_then(|n| self.node_name(n)),
                        })
                    })
                    .collect();
                json!({
                    "service": f.service,
                    "port_name": f.port_name,
                    "kind": kind_name(f.kind),
                    "address": f.address.to_string(),
                    "port": f.port,
                    "protocol": f.protocol.as_str(),
                    "affinity_timeout_s": f.affinity_timeout_s,
                    "return_path": f.return_path.as_str(),
                    "source_ranges": f.source_ranges.as_ref().map(|r| {
                        r.iter().map(ToString::to_string).collect::<Vec<_>>()
                    }),
                    "node_local": f.node_local,
                    "backends": backends,
                })
            })
            .collect();
        let entries = |list: &[Skipped]| -> Vec<Value> {
            list.iter()
                .map(|s| json!({"object": s.object, "reason": s.reason}))
                .collect()
        };
        let skipped: Vec<Value> = self
            .skipped
            .iter()
            .map(|s| json!({"object": s.object, "reason": s.reason, "label": s.label}))
            .collect();
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "number": n.number,
                    "prefixes": n.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        let health_checks: Vec<Value> = self
            .health_checks
            .iter()
            .map(|h| {
                json!({
                    "service": format!("{}/{}", h.namespace, h.name),
                    "port": h.port,
                    "endpoints": h.endpoints,
                })
            })
            .collect();
        json!({
            "frontends": frontends,
            "skipped": skipped,
            "notes": entries(&self.notes),
            "nodes": nodes,
            "node_port_addresses": self
                .node_port_addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            "health_checks": health_checks,
        })
    }

    /// The name of node `number`.
    fn node_name(&self, number: u32) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.number == number)
            .map(|n| n.name.as_str())
    }

    /// A table for people, in the manner of `ipvsadm -Ln`:
    ///
    /// ```text
    /// Prot LocalAddress:Port Kind Service ReturnPath
    ///   -> RemoteAddress:Port           State
    /// TCP  198.19.0.10:80 ClusterIP default/web:http snat
    ///   -> 198.18.1.1:8080              ready
    /// ```
    ///
    /// ClientIP affinity shows as `persistent <seconds>`, source ranges as
    /// `from <cidr>,…` (`from nowhere` when none is of the frontend's family),
    /// `internalTrafficPolicy: Local` as `node-local` (and each backend's
    /// node); node ports are followed by where they are served; health-check
    /// node ports follow under `Health checks:`, skipped objects under
    /// `Skipped:`, then the model's notes under `Notes:`.
    #[must_use]
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str("Prot LocalAddress:Port Kind Service ReturnPath\n");
        out.push_str("  -> RemoteAddress:Port           State\n");
        for f in &self.frontends {
            let _ = write!(
                out,
                "{:<4} {} {} {} {}",
                f.protocol.as_str(),
                host_port(f.address, f.port),
                kind_name(f.kind),
                service_port_name(f),
                f.return_path
            );
            if let Some(t) = f.affinity_timeout_s {
                let _ = write!(out, " persistent {t}");
            }
            match &f.source_ranges {
                Some(r) if r.is_empty() => out.push_str(" from nowhere"),
                Some(r) => {
                    let list: Vec<String> = r.iter().map(ToString::to_string).collect();
                    let _ = write!(out, " from {}", list.join(","));
                }
                None => {}
            }
            if f.node_local {
                out.push_str(" node-local");
            }
            if f.kind == clustergate_dataplane::table::FrontendKind::NodePort {
                let on: Vec<String> = self
                    .node_port_addresses
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == f.address.is_ipv4())
                    .map(ToString::to_string)
                    .collect();
                let _ = write!(
                    out,
                    " on node addresses in {}",
                    if on.is_empty() {
                        "(none)".to_owned()
                    } else {
                        on.join(",")
                    }
                );
            }
            out.push('\n');
            if f.backends.is_empty() {
                out.push_str("  (no endpoints: connections are rejected)\n");
            }
            for b in &f.backends {
                let _ = write!(
                    out,
                    "  -> {:<28} {}",
                    host_port(b.address, b.port),
                    b.state_name()
                );
                if f.node_local {
                    let _ = write!(
                        out,
                        " node {}",
                        b.node
                            .and_then(|n| self.node_name(n))
                            .unwrap_or("(unknown)")
                    );
                }
                if let Some(who) = self.policy.ingress_summary(b.address) {
                    let _ = write!(out, " policy: {who}");
                }
                out.push('\n');
            }
        }
        if !self.health_checks.is_empty() {
            out.push_str("\nHealth checks:\n");
            for h in &self.health_checks {
                let _ = writeln!(
                    out,
                    "  :{} {}/{} endpoints {}",
                    h.port, h.namespace, h.name, h.endpoints
                );
            }
        }
        for (heading, list) in [("Skipped", &self.skipped), ("Notes", &self.notes)] {
            if !list.is_empty() {
                let _ = writeln!(out, "\n{heading}:");
                for s in list {
                    let _ = writeln!(out, "  {}: {}", s.object, s.reason);
                }
            }
        }
        out
    }

    /// Every backend address of every frontend, once.
    #[must_use]
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .frontends
            .iter()
            .flat_map(|f| f.backends.iter().map(|b| b.address))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// What the dataplane's table is built from: [`Model::service_specs`],
    /// each node's prefixes with its number, and the node-port addresses.
    #[must_use]
    pub fn table_spec(&self) -> TableSpec {
        TableSpec {
            services: self.service_specs(),
            nodes: self
                .nodes
                .iter()
                .flat_map(|n| n.prefixes.iter().map(move |p| (*p, n.number)))
                .collect(),
            node_port_addresses: self.node_port_addresses.clone(),
            // Without policies there is nothing to compile: the backend
            // addresses (all of them, sorted) are not collected.
            policy: if self.policy.is_empty() {
                Default::default()
            } else {
                self.policy.compile(&self.backend_addresses())
            },
        }
    }

    /// Every frontend as the dataplane's [`ServiceSpec`]s, each with its
    /// `ServicePortName` (`ns/name` or `ns/name:port`, which `inspect`
    /// shows), return path, source ranges and node-locality. Each backend
    /// has the model's weight: 0 for a draining one (serving and terminating
    /// while another is ready: it keeps its flows and takes no new ones), 1
    /// otherwise. Backends carry their node only on node-local frontends (the
    /// only ones that use it).
    #[must_use]
    pub fn service_specs(&self) -> Vec<ServiceSpec> {
        self.frontends.iter().map(frontend_spec).collect()
    }

    /// The positions in [`Model::frontends`] of the frontends of Service
    /// `key` (`"ns/name"`): they are contiguous, the list being sorted by
    /// Service first.
    #[must_use]
    pub fn frontends_of_service(&self, key: &str) -> std::ops::Range<usize> {
        let list = &self.frontends;
        let start = list.partition_point(|f| f.service.as_str() < key);
        start..start + list[start..].partition_point(|f| f.service == key)
    }
}

/// One frontend as the dataplane's [`ServiceSpec`] (see
/// [`Model::service_specs`]).
#[must_use]
pub fn frontend_spec(f: &Frontend) -> ServiceSpec {
    ServiceSpec {
        addr: f.address,
        port: f.port,
        proto: f.protocol,
        kind: f.kind,
        affinity_timeout_s: f.affinity_timeout_s,
        return_path: f.return_path,
        backends: f
            .backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.address,
                port: b.port,
                weight: b.weight,
                state: b.state,
                node: if f.node_local { b.node } else { None },
            })
            .collect(),
        source_ranges: f.source_ranges.clone(),
        node_local: f.node_local,
        name: Some(service_port_name(f)),
    }
}

impl Model {
    /// `show --policy-from ADDR --policy-to ns/name[:port]`: for each port of
    /// the Service (or the one named, by name or number) and each of its
    /// backends, whether a new connection from `from` is allowed, and by
    /// which policy rule, or denied, isolated by which policies.
    ///
    /// # Errors
    /// The Service (or its port) is not served.
    pub fn explain_policy(&self, from: IpAddr, to: &str) -> Result<String, String> {
        let (service, port) = match to.split_once(':') {
            Some((s, p)) => (s, Some(p)),
            None => (to, None),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut out = String::new();
        for f in self.frontends.iter().filter(|f| f.service == service) {
            if let Some(p) = port {
                if f.port_name != p && f.port.to_string() != p {
                    continue;
                }
            }
            if f.address.is_ipv4() != from.is_ipv4() {
                continue;
            }
            for b in &f.backends {
                if !seen.insert((f.port_name.clone(), f.protocol, b.address, b.port)) {
                    continue;
                }
                let v = self.policy.decide(from, b.address, f.protocol, b.port);
                let pod = self.policy.pod_by_ip(b.address).map_or(String::new(), |p| {
                    format!(" (pod {}/{})", p.namespace, p.name)
                });
                let client = v
                    .client_pod
                    .as_ref()
                    .map_or(String::new(), |p| format!(" (pod {p})"));
                let port_name = if f.port_name.is_empty() {
                    String::new()
                } else {
                    format!("{} ", f.port_name)
                };
                let _ = writeln!(
                    out,
                    "from {from}{client} to Service {service} port {port_name}({}/{}), backend \
                     {}{pod}: {v}",
                    f.port,
                    f.protocol.as_str(),
                    std::net::SocketAddr::new(b.address, b.port),
                );
            }
        }
        if out.is_empty() {
            return Err(format!(
                "no served port of Service {to} with backends of {from}'s family"
            ));
        }
        Ok(out)
    }
}
