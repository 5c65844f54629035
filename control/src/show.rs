//! Presenting a [`Model`]: `show`'s JSON and table, and the dataplane's specs.
//!
//! Owns: [`Model::to_json`] (a stable shape, see `docs/semantics.md`),
//! [`Model::to_table`] (for people, like `ipvsadm -Ln`) and
//! [`Model::service_specs`] (what [`clustergate_dataplane::table::Table::build`]
//! takes: ClusterIP frontends only, for now, each with its return path).

use std::fmt::Write as _;
use std::net::IpAddr;

use clustergate_dataplane::table::{BackendSpec, ServiceSpec};
use serde_json::{json, Value};

use crate::manifest::Skipped;
use crate::model::{kind_name, state_name, Frontend, Model};

/// `addr:port`, with IPv6 addresses in brackets.
fn host_port(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// kube-proxy's `ServicePortName` string: `ns/name` or `ns/name:port`.
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
    /// "protocol", "affinity_timeout_s", "return_path", "backends":
    /// [{"address", "port", "state"}]}`; each skipped entry and each note is
    /// `{"object", "reason"}`.
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
                            "state": state_name(b.state),
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
                    "backends": backends,
                })
            })
            .collect();
        let entries = |list: &[Skipped]| -> Vec<Value> {
            list.iter()
                .map(|s| json!({"object": s.object, "reason": s.reason}))
                .collect()
        };
        json!({
            "frontends": frontends,
            "skipped": entries(&self.skipped),
            "notes": entries(&self.notes),
        })
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
    /// Frontends that are not forwarded yet are marked `(not served yet)`;
    /// ClientIP affinity shows as `persistent <seconds>`; skipped objects
    /// follow under `Skipped:`, then the model's notes under `Notes:`.
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
            if !f.is_served() {
                out.push_str(" (not served yet)");
            }
            out.push('\n');
            if f.backends.is_empty() {
                out.push_str("  (no endpoints: connections are rejected)\n");
            }
            for b in &f.backends {
                let _ = writeln!(
                    out,
                    "  -> {:<28} {}",
                    host_port(b.address, b.port),
                    state_name(b.state)
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

    /// The served frontends (ClusterIP only, for now) as the dataplane's
    /// [`ServiceSpec`]s, each with its frontend's return path. Every backend
    /// has weight 1: terminating backends are present only when no backend is
    /// ready, so they carry the traffic.
    #[must_use]
    pub fn service_specs(&self) -> Vec<ServiceSpec> {
        self.frontends
            .iter()
            .filter(|f| f.is_served())
            .map(|f| ServiceSpec {
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
                        weight: 1,
                        state: b.state,
                        node: None,
                    })
                    .collect(),
                source_ranges: None,
                node_local: false,
            })
            .collect()
    }
}
