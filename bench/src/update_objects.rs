//! The cluster of `clustergate-bench update-latency`: S Services × E
//! endpoints, as API objects (JSON, for the scripted API server) and as
//! manifests (a YAML `kind: List`, for the manifest sources), and the changes
//! that move one endpoint.
//!
//! Every address is in 198.18.0.0/15 and off the topology's links:
//!
//! - service k's frontend is 198.19.(k / 256 % 256).(k % 256) port
//!   80 + k / 65 536 (the client's route to the gateway covers them): every
//!   Service has its own cluster IP up to 65 536 Services, beyond that two
//!   share one on different ports ([`MAX_SERVICES`] in all), as the
//!   gateway's steering program holds 65 536 frontend addresses;
//! - the endpoints of services other than 0 come from a pool of
//!   [`POOL`] addresses, 198.18.4.0–198.18.255.255, that no route of the
//!   gateway reaches (they need not exist on the wire: only service 0 gets
//!   traffic); with 10 000 × 10 endpoints they repeat across services, never
//!   within one;
//! - service 0's first endpoint is backend 1 (the sink), ready; its other
//!   E − 1 endpoints are pool addresses that are not ready, so every probe
//!   still reaches backend 1 and the probe period stays the resolution.
//!
//! Each Service has a UDP and a TCP port 80 (two frontends) and one
//! EndpointSlice, `svc-K-a`, whose ports are where its endpoints listen.
//! Moving service 0 changes its slice's port (the sink sees the first packet
//! at the new port); moving another service changes the address of its last
//! endpoint to the next pool address.

use std::net::Ipv4Addr;
use std::ops::Range;

use serde_json::{json, Value};

use crate::layout::{backend_addr, BACKEND_PORT, SERVICE_PORT};

/// Most services: the 65 536 addresses of 198.19.0.0/16, on ports 80 and 81.
pub const MAX_SERVICES: u32 = 2 * 65_536;
/// Endpoint addresses of services other than 0: 198.18.4.0–198.18.255.255.
pub const POOL: u32 = 252 * 256;
/// Most endpoints per service (one EndpointSlice holds at most 1 000).
pub const MAX_ENDPOINTS: u32 = 1000;
/// The namespace of every object.
pub const NAMESPACE: &str = "bench";

/// Service `k`'s cluster IP and port (`k` < [`MAX_SERVICES`]).
#[must_use]
pub fn frontend(k: u32) -> (Ipv4Addr, u16) {
    debug_assert!(k < MAX_SERVICES);
    (
        Ipv4Addr::new(198, 19, (k >> 8) as u8, k as u8),
        SERVICE_PORT + (k >> 16) as u16,
    )
}

/// Pool address `n` (taken modulo [`POOL`]).
#[must_use]
pub fn pool_addr(n: u64) -> Ipv4Addr {
    let n = (n % u64::from(POOL)) as u32;
    Ipv4Addr::new(198, 18, 4 + (n >> 8) as u8, n as u8)
}

/// The Services and EndpointSlices, and where each one's endpoints are now.
#[derive(Debug, Clone)]
pub struct Objects {
    services: u32,
    endpoints: u32,
    /// Service 0's slice port: where the probes go.
    probe_port: u16,
    /// Per service, how often its last endpoint has moved.
    moves: Vec<u32>,
}

impl Objects {
    /// `services` Services of `endpoints` endpoints each, service 0's on
    /// `probe_port`, the others' on [`BACKEND_PORT`].
    ///
    /// # Panics
    /// `services` not in 1..=[`MAX_SERVICES`] or `endpoints` not in
    /// 1..=[`MAX_ENDPOINTS`] (the flags' ranges).
    #[must_use]
    pub fn new(services: u32, endpoints: u32, probe_port: u16) -> Self {
        assert!(
            (1..=MAX_SERVICES).contains(&services),
            "{services} services"
        );
        assert!(
            (1..=MAX_ENDPOINTS).contains(&endpoints),
            "{endpoints} endpoints"
        );
        Self {
            services,
            endpoints,
            probe_port,
            moves: vec![0; services as usize],
        }
    }

    /// Services.
    #[must_use]
    pub fn services(&self) -> u32 {
        self.services
    }

    /// Service 0's endpoints move to `port`.
    pub fn move_probe(&mut self, port: u16) {
        self.probe_port = port;
    }

    /// Service `k`'s last endpoint moves to another address (service 0:
    /// see [`Self::move_probe`]).
    pub fn move_endpoint(&mut self, k: u32) {
        debug_assert!(k != 0 && k < self.services);
        self.moves[k as usize] = self.moves[k as usize].wrapping_add(1);
    }

    /// Service `k`'s endpoints: (address, ready).
    #[must_use]
    pub fn endpoints_of(&self, k: u32) -> Vec<(Ipv4Addr, bool)> {
        let e = self.endpoints;
        if k == 0 {
            return std::iter::once((backend_addr(1), true))
                .chain((1..e).map(|j| (pool_addr(u64::from(j - 1)), false)))
                .collect();
        }
        let base = u64::from(k) * u64::from(e);
        // The last endpoint's offset runs over POOL - E + 1 values that none
        // of the others' E - 1 offsets take, so they stay distinct.
        let last = u64::from(e - 1) + u64::from(self.moves[k as usize] % (POOL - e + 1));
        (0..e)
            .map(|j| {
                let off = if j + 1 == e { last } else { u64::from(j) };
                (pool_addr(base + off), true)
            })
            .collect()
    }

    /// Service `k`'s slice port.
    #[must_use]
    pub fn port_of(&self, k: u32) -> u16 {
        if k == 0 {
            self.probe_port
        } else {
            BACKEND_PORT
        }
    }

    /// Service `k`.
    #[must_use]
    pub fn service_json(&self, k: u32) -> Value {
        let (vip, port) = frontend(k);
        let v = vip.to_string();
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{k}"), "namespace": NAMESPACE},
            "spec": {
                "type": "ClusterIP", "clusterIP": v, "clusterIPs": [v],
                "ports": [
                    {"name": "u", "port": port, "protocol": "UDP"},
                    {"name": "t", "port": port, "protocol": "TCP"},
                ],
            },
        })
    }

    /// Service `k`'s EndpointSlice, `svc-K-a`.
    #[must_use]
    pub fn slice_json(&self, k: u32) -> Value {
        let port = self.port_of(k);
        let endpoints: Vec<Value> = self
            .endpoints_of(k)
            .into_iter()
            .map(|(a, ready)| json!({"addresses": [a.to_string()], "conditions": {"ready": ready}}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("svc-{k}-a"), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": format!("svc-{k}")},
            },
            "addressType": "IPv4",
            "ports": [
                {"name": "u", "port": port, "protocol": "UDP"},
                {"name": "t", "port": port, "protocol": "TCP"},
            ],
            "endpoints": endpoints,
        })
    }

    /// The Services of `range` and their slices, as YAML documents, each
    /// starting with `---`.
    ///
    /// # Panics
    /// Never: a `serde_json::Value` always serializes.
    #[must_use]
    pub fn yaml(&self, range: Range<u32>) -> String {
        // One document per object, as GitOps repositories keep them: control
        // parses again only the documents that changed (a `kind: List`
        // document is parsed whole at each change).
        let mut out = String::new();
        for k in range {
            for object in [self.service_json(k), self.slice_json(k)] {
                out.push_str("---\n");
                out.push_str(
                    &serde_norway::to_string(&object).expect("a JSON value serializes to YAML"),
                );
            }
        }
        out
    }
}

/// A kubeconfig whose current context is the API server at `url` (plain
/// HTTP, no credentials), as the control tests write it.
#[must_use]
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster: {{server: \"{url}\"}}\nusers:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context: {{cluster: bench, user: bench}}\ncurrent-context: bench\n"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use clustergate_control::{build_model, parse_manifest_strict, ModelOptions};
    use clustergate_dataplane::table::BackendState;

    use super::*;
    use crate::layout::{CLIENT_ADDR, GW_LAN_ADDR};

    fn in_bench_range(a: Ipv4Addr) -> bool {
        a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18
    }

    #[test]
    fn frontends_are_distinct_in_the_benchmarking_range_and_off_the_links() {
        let mut seen = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for k in 0..MAX_SERVICES {
            let (a, port) = frontend(k);
            assert!(in_bench_range(a), "service {k}: {a}");
            assert!(seen.insert((a, port)), "service {k}: {a}:{port} twice");
            addrs.insert(a);
            assert_eq!(a.octets()[1], 19, "{a}: the client routes 198.19.0.0/16");
        }
        // What the gateway's steering program holds.
        assert_eq!(addrs.len(), 65_536);
        for n in 0..u64::from(POOL) {
            let a = pool_addr(n);
            assert!(in_bench_range(a), "{a}");
            assert!(!addrs.contains(&a), "pool address {a} is a VIP");
            assert!(a.octets()[2] >= 4, "{a}: on the client or backend link");
            assert_ne!(a, CLIENT_ADDR);
            assert_ne!(a, GW_LAN_ADDR);
        }
        assert_eq!(frontend(0), (Ipv4Addr::new(198, 19, 0, 0), 80));
        assert_eq!(frontend(65_535), (Ipv4Addr::new(198, 19, 255, 255), 80));
        assert_eq!(frontend(65_536), (Ipv4Addr::new(198, 19, 0, 0), 81));
        assert_eq!(pool_addr(0), Ipv4Addr::new(198, 18, 4, 0));
        assert_eq!(
            pool_addr(u64::from(POOL) - 1),
            Ipv4Addr::new(198, 18, 255, 255)
        );
        assert_eq!(pool_addr(u64::from(POOL)), pool_addr(0));
    }

    #[test]
    fn endpoints_stay_distinct_within_a_service_as_they_move() {
        let mut o = Objects::new(100, 10, 8081);
        for round in 0..3 * POOL {
            let eps = o.endpoints_of(7);
            assert_eq!(eps.len(), 10);
            let distinct: BTreeSet<_> = eps.iter().map(|e| e.0).collect();
            assert_eq!(distinct.len(), 10, "after {round} moves: {eps:?}");
            assert!(eps.iter().all(|&(a, ready)| ready && in_bench_range(a)));
            o.move_endpoint(7);
        }
        // A move changes the last endpoint only.
        let before = o.endpoints_of(9);
        o.move_endpoint(9);
        let after = o.endpoints_of(9);
        assert_eq!(before[..9], after[..9]);
        assert_ne!(before[9], after[9]);
        // One endpoint per service, and the most a slice holds.
        let mut one = Objects::new(3, 1, 8081);
        let a = one.endpoints_of(2);
        one.move_endpoint(2);
        assert_ne!(a, one.endpoints_of(2));
        let big = Objects::new(MAX_SERVICES, MAX_ENDPOINTS, 8081);
        let eps = big.endpoints_of(MAX_SERVICES - 1);
        assert_eq!(
            eps.iter().map(|e| e.0).collect::<BTreeSet<_>>().len(),
            MAX_ENDPOINTS as usize
        );
    }

    #[test]
    fn control_reads_the_manifest_as_services_of_e_endpoints() {
        let mut o = Objects::new(5, 10, 8081);
        o.move_endpoint(3);
        let objects = parse_manifest_strict(&o.yaml(0..5)).unwrap();
        assert_eq!(objects.services.len(), 5);
        assert_eq!(objects.slices.len(), 5);
        let model = build_model(&objects, &ModelOptions::default());
        assert!(model.skipped.is_empty(), "{:?}", model.skipped);
        assert_eq!(model.frontends.len(), 10, "a UDP and a TCP port each");
        for f in &model.frontends {
            let k: u32 = f
                .service
                .strip_prefix("bench/svc-")
                .unwrap()
                .parse()
                .unwrap();
            let (vip, port) = frontend(k);
            assert_eq!((f.address, f.port), (IpAddr::V4(vip), port));
            let want: BTreeSet<(IpAddr, u16)> = o
                .endpoints_of(k)
                .into_iter()
                .filter(|e| e.1)
                .map(|e| (IpAddr::V4(e.0), o.port_of(k)))
                .collect();
            let got: BTreeSet<(IpAddr, u16)> =
                f.backends.iter().map(|b| (b.address, b.port)).collect();
            assert_eq!(got, want, "{}", f.service);
            assert!(f.backends.iter().all(|b| b.state == BackendState::Ready));
        }
        // Service 0: only backend 1 takes traffic, at the probe port.
        let s0: Vec<_> = model
            .frontends
            .iter()
            .filter(|f| f.service == "bench/svc-0")
            .collect();
        assert_eq!(s0.len(), 2);
        for f in s0 {
            assert_eq!(f.backends.len(), 1);
            assert_eq!(f.backends[0].address, IpAddr::V4(backend_addr(1)));
            assert_eq!(f.backends[0].port, 8081);
        }
        // A moved probe is what the slice says.
        o.move_probe(8090);
        assert_eq!(o.slice_json(0)["ports"][0]["port"], 8090);
        assert_eq!(o.slice_json(0)["endpoints"].as_array().unwrap().len(), 10);
    }

    #[test]
    fn services_beyond_65536_share_a_cluster_ip_on_another_port() {
        let o = Objects::new(MAX_SERVICES, 2, 8081);
        let text = format!("{}{}", o.yaml(1..3), o.yaml(65_537..65_539));
        let objects = parse_manifest_strict(&text).unwrap();
        let model = build_model(&objects, &ModelOptions::default());
        assert!(model.skipped.is_empty(), "{:?}", model.skipped);
        let frontends: BTreeSet<(String, IpAddr, u16)> = model
            .frontends
            .iter()
            .map(|f| (f.service.clone(), f.address, f.port))
            .collect();
        let ip = |c: u8| IpAddr::V4(Ipv4Addr::new(198, 19, 0, c));
        let want: BTreeSet<(String, IpAddr, u16)> = [
            ("bench/svc-1".to_owned(), ip(1), 80),
            ("bench/svc-2".to_owned(), ip(2), 80),
            ("bench/svc-65537".to_owned(), ip(1), 81),
            ("bench/svc-65538".to_owned(), ip(2), 81),
        ]
        .into();
        assert_eq!(frontends, want);
    }

    #[test]
    fn a_range_of_services_is_a_list_of_just_those() {
        let o = Objects::new(250, 2, 8081);
        let text = o.yaml(200..250);
        let objects = parse_manifest_strict(&text).unwrap();
        assert_eq!(objects.services.len(), 50);
        assert_eq!(
            objects.services[0].metadata.name.as_deref(),
            Some("svc-200")
        );
        assert_eq!(
            objects.slices[49].metadata.name.as_deref(),
            Some("svc-249-a")
        );
    }

    #[test]
    fn the_kubeconfig_points_at_the_server() {
        let url = "http://127.0.0.1:43210";
        let k = kube::config::Kubeconfig::from_yaml(&kubeconfig(url)).unwrap();
        assert_eq!(k.current_context.as_deref(), Some("bench"));
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some(url));
        assert_eq!(k.contexts[0].context.as_ref().unwrap().cluster, "bench");
    }
}
