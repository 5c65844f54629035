//! NetworkPolicy lookup cost for a new flow, at 10 000 pods and 1 000
//! policies, against a random memory read measured in the same run.
//!
//! The world: 100 namespaces × 100 pods (10 apps of 10 pods each), and 10
//! policies per namespace, one per app: ingress from its own app's clients
//! in 3 other namespaces (namespaceSelector AND podSelector) on a named port,
//! from an ipBlock with an except, and egress for one app in 5 namespaces.
//! Control compiles it as `run` does (for every pod address as a backend);
//! the bench measures what a worker adds to a new flow: `PolicyTable::allows`
//! for random (client, backend) pairs, 1 024 per iteration, clients half pods
//! and half addresses outside the pods. `random_read` reads 1 024 random
//! words of a 256 MiB array, the machine's memory limit.
//!
//! `cargo bench -p clustergate-control --bench policy`

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: a benchmark fails loudly on purpose

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use clustergate_control::policy::PolicySet;
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::policy::PolicyTable;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

const NAMESPACES: u32 = 100;
const APPS: u32 = 10;
const PODS_PER_APP: u32 = 10;

fn pod_ip(ns: u32, app: u32, i: u32) -> String {
    let n = ns * APPS * PODS_PER_APP + app * PODS_PER_APP + i;
    format!("198.18.{}.{}", n >> 8, n & 0xff)
}

fn world() -> (Vec<Pod>, Vec<Namespace>, Vec<NetworkPolicy>) {
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    let mut policies = Vec::new();
    for ns in 0..NAMESPACES {
        namespaces.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("t{}", ns % 10)}}
            }))
            .unwrap(),
        );
        for app in 0..APPS {
            for i in 0..PODS_PER_APP {
                let ip = pod_ip(ns, app, i);
                pods.push(
                    serde_json::from_value(json!({
                        "metadata": {"name": format!("app{app}-{i}"), "namespace": format!("ns-{ns}"),
                                     "labels": {"app": format!("app{app}"), "tier": format!("{}", i % 3)}},
                        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
                    }))
                    .unwrap(),
                );
            }
            let mut spec = json!({
                "podSelector": {"matchLabels": {"app": format!("app{app}")}},
                "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (ns + 1) % 10)}},
                               "podSelector": {"matchLabels": {"app": format!("app{app}")}}},
                              {"namespaceSelector": {"matchLabels": {"team": format!("t{}", (ns + 2) % 10)}}},
                              {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["0", "1"]}]}}],
                     "ports": [{"port": "http"}]},
                    {"from": [{"ipBlock": {"cidr": "198.20.0.0/16", "except": [format!("198.20.{ns}.0/24")]}}],
                     "ports": [{"port": 8080, "endPort": 8090}]}
                ]
            });
            if app == 0 && ns % 20 == 0 {
                spec["egress"] =
                    json!([{"to": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]);
            }
            policies.push(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("app{app}"), "namespace": format!("ns-{ns}")},
                    "spec": spec
                }))
                .unwrap(),
            );
        }
    }
    (pods, namespaces, policies)
}

/// A small xorshift: the same pairs on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bench(c: &mut Criterion) {
    let (pods, namespaces, policies) = world();
    let set = PolicySet::new(&pods, &namespaces, &policies);
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    let backends: Vec<IpAddr> = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect();
    let started = Instant::now();
    let parts = set.compile(&backends);
    let compile = started.elapsed();
    let table = PolicyTable::assemble(parts.clone()).unwrap();
    eprintln!(
        "policy: {} pods, {} policies: compiled in {:.0} ms into {} classes, {} prefixes, {} \
         backends, {} rules, {} port ranges, {} bitmap words ({} KiB)",
        pods.len(),
        policies.len(),
        compile.as_secs_f64() * 1e3,
        parts.classes.len(),
        parts.prefixes.len(),
        parts.backends.len(),
        parts.rules.len(),
        parts.ports.len(),
        parts.bits.len(),
        (parts.prefixes.len() * 24
            + parts.classes.len() * 16
            + parts.backends.len() * 32
            + parts.rules.len() * 16
            + parts.ports.len() * 8
            + parts.bits.len() * 8)
            / 1024
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pairs: Vec<(Addr16, Addr16)> = (0..1024)
        .map(|i| {
            let client = if i % 2 == 0 {
                backends[rng.next() as usize % backends.len()]
            } else {
                format!("198.20.{}.{}", rng.next() % 256, rng.next() % 256)
                    .parse()
                    .unwrap()
            };
            let backend = backends[rng.next() as usize % backends.len()];
            (addr16(client), addr16(backend))
        })
        .collect();
    let allowed = pairs
        .iter()
        .filter(|(c, b)| table.allows(c, b, Proto::Tcp, 8080))
        .count();
    eprintln!("policy: {allowed} of {} sampled flows allowed", pairs.len());

    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function("allows_10k_pods_1k_policies", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for (cl, be) in &pairs {
                n += u32::from(table.allows(black_box(cl), black_box(be), Proto::Tcp, 8080));
            }
            n
        });
    });
    // As the pipeline calls it: the backend's policy record is kept per
    // table backend, so a new flow does not look it up by address.
    let with_records: Vec<(Addr16, Addr16, Option<u32>)> = pairs
        .iter()
        .map(|(c, b)| (*c, *b, table.backend_record(b)))
        .collect();
    g.bench_function("allows_at_10k_pods_1k_policies", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for (cl, be, rec) in &with_records {
                n += u32::from(table.allows_at(
                    black_box(cl),
                    black_box(be),
                    *rec,
                    Proto::Tcp,
                    8080,
                ));
            }
            n
        });
    });
    let empty = PolicyTable::default();
    g.bench_function("allows_no_policy", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for (cl, be) in &pairs {
                n += u32::from(empty.allows(black_box(cl), black_box(be), Proto::Tcp, 8080));
            }
            n
        });
    });
    // The baseline: independent random reads of a 256 MiB array.
    let words: Vec<u64> = (0..(256u64 << 20) / 8).collect();
    let idx: Vec<usize> = (0..1024)
        .map(|_| rng.next() as usize % words.len())
        .collect();
    g.bench_function("random_read", |b| {
        b.iter(|| {
            let mut s = 0u64;
            for &i in &idx {
                s = s.wrapping_add(black_box(words[i]));
            }
            s
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
