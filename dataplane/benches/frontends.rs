//! What each way into a Service costs in the core, as ratios from one run.
//!
//! Run with `cargo bench -p clustergate-dataplane --bench frontends`.
//!
//! One TCP Service with four backends and source NAT (control's default)
//! reached three ways: its cluster IP, a node port on the node's address
//! (the exact lookup misses, then the node-port lookup hits), and a
//! load-balancer IP with four source ranges (the client's is the last one
//! scanned). `N` flows per way are opened (SYN, and the backend's SYN-ACK)
//! before measuring; then each iteration is one frame:
//! - `forward/<way>/<N>`: a client's data segment of an established flow;
//! - `reply/<way>/<N>`: the backend's segment back to the gateway's SNAT
//!   address (every reply first misses the frontend lookup, and, when the
//!   table has node ports, the node-port lookup too);
//! - `reply/plain/<N>`: the cluster-IP replies through a table without node
//!   ports, the baseline of what a node port costs other traffic.
//!
//! Flows are visited in a pseudo-random order, and every frame is checked
//! once before measuring (a `Forward` to the expected side). Summary lines
//! give ns/frame and the ratio to the cluster IP's of the same direction.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::pipeline::{NodeAddrs, Side, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{FrontendKind, ReturnPath, Table};
use clustergate_dataplane::testkit::{self, client_frame, L4Spec, Tcp, BUF_LEN};
use clustergate_dataplane::time::Now;
use criterion::{Criterion, Throughput};

const NOW: Now = Now(1_000_000_000_000);
const NODE: &str = "198.18.2.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("bench address")
}

/// The ways in: name, destination address, port.
const WAYS: [(&str, &str, u16); 3] = [
    ("clusterIP", "198.19.0.10", 80),
    ("nodePort", NODE, 30080),
    ("loadBalancer", "198.19.1.10", 80),
];

fn table(node_ports: bool) -> Table {
    let backends: Vec<BackendSpec> = (1..=4)
        .map(|i| BackendSpec::ready(ip(&format!("198.18.1.{i}")), 8080))
        .collect();
    let base = ServiceSpec::cluster_ip(ip("198.19.0.10"), 80, Proto::Tcp, backends)
        .with_return_path(ReturnPath::Snat);
    let mut services = vec![base.clone()];
    if node_ports {
        services.push(
            ServiceSpec {
                port: 30080,
                ..base.clone()
            }
            .with_kind(FrontendKind::NodePort, ip("0.0.0.0")),
        );
        let mut lb = base.with_kind(FrontendKind::LoadBalancer, ip("198.19.1.10"));
        lb.source_ranges = Some(
            [
                "198.18.64.0/20",
                "198.18.80.0/20",
                "198.18.96.0/19",
                "198.18.128.0/18",
            ]
            .iter()
            .map(|r| r.parse().expect("range"))
            .collect(),
        );
        services.push(lb);
    }
    let spec = TableSpec {
        services,
        nodes: Vec::new(),
        node_port_addresses: vec!["0.0.0.0/0".parse().expect("cidr")],
        policy: Default::default(),
    };
    Table::build_full(1, 0, &spec, 65_537).expect("bench table")
}

fn client(i: u32) -> (Addr16, u16) {
    (
        addr16(ip(&format!(
            "198.18.{}.{}",
            128 + (i >> 16) % 64,
            (i >> 8) & 0xff
        ))),
        1024 + (i & 0xff) as u16,
    )
}

/// Opens `flows` flows to `dst:port` (clients `base..base+flows`) and
/// returns, shuffled, each flow's forward and reply frames.
fn open(
    worker: &mut Worker,
    table: &Table,
    dst: Addr16,
    port: u16,
    base: u32,
    flows: u32,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut order: Vec<u32> = (base..base + flows).collect();
    let mut x = 0x9e37_79b9_u64 ^ u64::from(base);
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let (mut forward, mut reply) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; BUF_LEN];
    for i in order {
        let (c, p) = client(i);
        let syn = client_frame(c, p, dst, port, L4Spec::Tcp(Tcp::syn(1)), b"");
        buf[..syn.len()].copy_from_slice(&syn);
        let Verdict::Forward { len, .. } = worker.process(NOW, table, &mut buf, syn.len()) else {
            panic!("SYN of flow {i} not forwarded")
        };
        let seen = testkit::wire(&buf[..len]);
        let back = |f: Tcp| {
            client_frame(
                seen.dst,
                seen.dport,
                seen.src,
                seen.sport,
                L4Spec::Tcp(f),
                b"0123456789",
            )
        };
        let synack = back(Tcp {
            syn: true,
            ack: Some(2),
            seq: 9,
            ..Tcp::default()
        });
        buf[..synack.len()].copy_from_slice(&synack);
        let v = worker.process(NOW, table, &mut buf, synack.len());
        assert!(
            matches!(v, Verdict::Forward { .. }),
            "SYN-ACK of flow {i}: {v:?}"
        );
        reply.push(back(Tcp::ack(10, 2)));
        forward.push(client_frame(
            c,
            p,
            dst,
            port,
            L4Spec::Tcp(Tcp::ack(2, 10)),
            b"0123456789",
        ));
    }
    (forward, reply)
}

fn worker(capacity: usize) -> Worker {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity,
        ..Config::default()
    }));
    let mut w = Worker::with_config(
        ct,
        ReturnConfig {
            // Clear of the node port: a reply to 30080 would be a new flow.
            ports: PortRange::new(1024, 29_999).expect("range"),
            ..ReturnConfig::default()
        },
    );
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(addr16(ip(NODE))),
        v6: None,
    })));
    w.set_node_addrs(Some(Arc::new(Node(addr16(ip(NODE))))));
    w
}

/// The node has one address.
#[derive(Debug)]
struct Node(Addr16);

impl NodeAddrs for Node {
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        *addr == self.0
    }
}

/// Runs every frame once, checking the side each goes to.
fn check(w: &mut Worker, table: &Table, frames: &[Vec<u8>], side: Side) {
    let mut buf = vec![0u8; BUF_LEN];
    for f in frames {
        buf[..f.len()].copy_from_slice(f);
        match w.process(NOW, table, &mut buf, f.len()) {
            Verdict::Forward { next_hop, .. } if next_hop.side == side => {}
            v => panic!("expected a forward to the {side:?} side, got {v:?}"),
        }
    }
}

/// Benches one frame per iteration over `frames`; returns ns/frame.
fn bench(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    w: &mut Worker,
    table: &Table,
    frames: &[Vec<u8>],
) -> f64 {
    let mut buf = vec![0u8; BUF_LEN];
    let mut i = 0usize;
    let mut total = (0u64, Duration::ZERO);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let f = &frames[i % frames.len()];
                i = i.wrapping_add(1);
                buf[..f.len()].copy_from_slice(f);
                black_box(w.process(NOW, table, &mut buf, f.len()));
            }
            let d = start.elapsed();
            total = (total.0 + iters, total.1 + d);
            d
        });
    });
    total.1.as_nanos() as f64 / total.0.max(1) as f64
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let sizes: &[u32] = if std::env::args().any(|a| a == "--test") {
        &[1000]
    } else {
        &[1000, 20_000]
    };
    let mut results: Vec<(String, f64)> = Vec::new();
    for &n in sizes {
        let mut g = c.benchmark_group("frontends");
        g.throughput(Throughput::Elements(1));
        g.sample_size(30);
        let full = table(true);
        let mut w = worker(n as usize * 8);
        let mut sets = Vec::new();
        for (k, (way, dst, port)) in WAYS.iter().enumerate() {
            let (fwd, rep) = open(&mut w, &full, addr16(ip(dst)), *port, k as u32 * n, n);
            check(&mut w, &full, &fwd, Side::Backend);
            check(&mut w, &full, &rep, Side::Client);
            sets.push((*way, fwd, rep));
        }
        for (way, fwd, rep) in &sets {
            for (dir, frames) in [("forward", fwd), ("reply", rep)] {
                let name = format!("{dir}/{way}/{n}");
                let ns = bench(&mut g, &name, &mut w, &full, frames);
                results.push((name, ns));
            }
        }
        // The same cluster-IP flows through a table without node ports.
        let plain = table(false);
        let mut w = worker(n as usize * 4);
        let (_, rep) = open(&mut w, &plain, addr16(ip(WAYS[0].1)), WAYS[0].2, 0, n);
        check(&mut w, &plain, &rep, Side::Client);
        let name = format!("reply/plain/{n}");
        let ns = bench(&mut g, &name, &mut w, &plain, &rep);
        results.push((name, ns));
        g.finish();
    }
    for (name, ns) in &results {
        let mut parts = name.split('/');
        let (dir, n) = (parts.next().unwrap_or(""), parts.nth(1).unwrap_or(""));
        let base = results
            .iter()
            .find(|(r, _)| *r == format!("{dir}/clusterIP/{n}"))
            .map_or(*ns, |(_, v)| *v);
        println!(
            "frontends {name}: {ns:.1} ns/frame, {:.2}× clusterIP",
            ns / base
        );
    }
}
