//! What each return path costs in the core, as ratios from one run.
//!
//! Run with `cargo bench -p clustergate-dataplane --bench return_paths`.
//!
//! For routed, source NAT and DSR frontends (one TCP service, four backends),
//! `N` flows are opened (SYN, and the backend's SYN-ACK where replies come
//! through the gateway) before measuring; then each iteration is one frame:
//! - `forward/<path>/<N>`: a client's data segment of an established flow
//!   (conntrack hit, then the path's rewrite: DNAT, both ends, or
//!   encapsulation);
//! - `reply/<path>/<N>`: a backend's segment back (reverse entry hit, then
//!   reverse NAT; none for DSR, whose replies bypass the gateway);
//! - `copy/<N>`: only restoring the frame into the buffer (the overhead inside
//!   every other bench's timing), the baseline.
//!
//! Flows are visited in a pseudo-random order. Every frame is checked once
//! before measuring (a `Forward` to the expected side), so a bench cannot
//! silently measure drops. Summary lines at the end give ns/frame and the
//! ratio to routed of the same direction and size.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::pipeline::{Side, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{ReturnPath, Table};
use clustergate_dataplane::testkit::{self, client_frame, L4Spec, Tcp, BUF_LEN};
use clustergate_dataplane::time::Now;
use criterion::{Criterion, Throughput};

const NOW: Now = Now(1_000_000_000_000);

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().expect("bench address"))
}

fn table(rp: ReturnPath) -> Table {
    let backends = (1..=4)
        .map(|i| BackendSpec::ready(format!("198.18.1.{i}").parse().expect("ip"), 8080))
        .collect();
    let s = ServiceSpec::cluster_ip("198.19.0.10".parse().expect("ip"), 80, Proto::Tcp, backends)
        .with_return_path(rp);
    Table::build(1, 0, &[s]).expect("bench table")
}

fn client(i: u32) -> (Addr16, u16) {
    (
        a(&format!(
            "198.18.{}.{}",
            128 + (i >> 16) % 64,
            (i >> 8) & 0xff
        )),
        1024 + (i & 0xff) as u16,
    )
}

/// A worker with `flows` established flows, and the frames of both
/// directions for each (in a shuffled order).
struct Setup {
    worker: Worker,
    table: Table,
    forward: Vec<Vec<u8>>,
    reply: Vec<Vec<u8>>,
}

fn setup(rp: ReturnPath, flows: u32) -> Setup {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: (flows as usize * 2).max(1024),
        ..Config::default()
    }));
    let mut worker = Worker::with_config(
        ct,
        ReturnConfig {
            ports: PortRange::new(1024, 65_535).expect("range"),
            ..ReturnConfig::default()
        },
    );
    worker.set_sources(Some(Arc::new(FixedSources {
        v4: Some(a("198.18.2.1")),
        v6: None,
    })));
    let table = table(rp);
    let vip = a("198.19.0.10");
    let mut order: Vec<u32> = (0..flows).collect();
    let mut x = 0x9e37_79b9_u64;
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let mut forward = Vec::new();
    let mut reply = Vec::new();
    let mut buf = vec![0u8; BUF_LEN];
    for i in order {
        let (c, p) = client(i);
        let syn = client_frame(c, p, vip, 80, L4Spec::Tcp(Tcp::syn(1)), b"");
        buf[..syn.len()].copy_from_slice(&syn);
        let v = worker.process(NOW, &table, &mut buf, syn.len());
        let Verdict::Forward { len, .. } = v else {
            panic!("SYN of flow {i}: {v:?}")
        };
        let seen = testkit::wire(&buf[..len]);
        // The backend's answer, as it sends it.
        let (to, to_port) = (seen.src, seen.sport);
        let back = |f: Tcp| {
            client_frame(
                seen.dst,
                seen.dport,
                to,
                to_port,
                L4Spec::Tcp(f),
                b"0123456789",
            )
        };
        if rp != ReturnPath::Dsr {
            let synack = back(Tcp {
                syn: true,
                ack: Some(2),
                seq: 9,
                ..Tcp::default()
            });
            buf[..synack.len()].copy_from_slice(&synack);
            let v = worker.process(NOW, &table, &mut buf, synack.len());
            assert!(
                matches!(v, Verdict::Forward { .. }),
                "SYN-ACK of flow {i}: {v:?}"
            );
            reply.push(back(Tcp::ack(10, 2)));
        }
        forward.push(client_frame(
            c,
            p,
            vip,
            80,
            L4Spec::Tcp(Tcp::ack(2, 10)),
            b"0123456789",
        ));
    }
    Setup {
        worker,
        table,
        forward,
        reply,
    }
}

/// Runs every frame once, checking the side each goes to.
fn check(s: &mut Setup, frames: &[Vec<u8>], side: Side) {
    let mut buf = vec![0u8; BUF_LEN];
    for f in frames {
        buf[..f.len()].copy_from_slice(f);
        match s.worker.process(NOW, &s.table, &mut buf, f.len()) {
            Verdict::Forward { next_hop, .. } if next_hop.side == side => {}
            v => panic!("expected a forward to the {side:?} side, got {v:?}"),
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let sizes: &[u32] = if std::env::args().any(|a| a == "--test") {
        &[1000]
    } else {
        &[1000, 100_000]
    };
    let mut results: Vec<(String, f64)> = Vec::new();
    for &n in sizes {
        let mut g = c.benchmark_group("return_paths");
        g.throughput(Throughput::Elements(1));
        g.sample_size(30);
        for rp in [ReturnPath::Snat, ReturnPath::Routed, ReturnPath::Dsr] {
            let mut s = setup(rp, n);
            let fwd = std::mem::take(&mut s.forward);
            let rep = std::mem::take(&mut s.reply);
            check(&mut s, &fwd, Side::Backend);
            check(&mut s, &rep, Side::Client);
            for (dir, frames) in [("forward", &fwd), ("reply", &rep)] {
                if frames.is_empty() {
                    continue;
                }
                let name = format!("{dir}/{rp}/{n}");
                let mut buf = vec![0u8; BUF_LEN];
                let mut i = 0usize;
                let mut total = (0u64, std::time::Duration::ZERO);
                g.bench_function(&name, |b| {
                    b.iter_custom(|iters| {
                        let start = std::time::Instant::now();
                        for _ in 0..iters {
                            let f = &frames[i % frames.len()];
                            i = i.wrapping_add(1);
                            buf[..f.len()].copy_from_slice(f);
                            black_box(s.worker.process(NOW, &s.table, &mut buf, f.len()));
                        }
                        let d = start.elapsed();
                        total = (total.0 + iters, total.1 + d);
                        d
                    });
                });
                if total.0 > 0 {
                    results.push((name, total.1.as_nanos() as f64 / total.0 as f64));
                }
            }
        }
        // The baseline: the copy alone.
        let s = setup(ReturnPath::Routed, n);
        let mut buf = vec![0u8; BUF_LEN];
        let mut i = 0usize;
        let mut total = (0u64, std::time::Duration::ZERO);
        g.bench_function(format!("copy/{n}"), |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let f = &s.forward[i % s.forward.len()];
                    i = i.wrapping_add(1);
                    buf[..f.len()].copy_from_slice(f);
                    black_box(&mut buf);
                }
                let d = start.elapsed();
                total = (total.0 + iters, total.1 + d);
                d
            });
        });
        results.push((
            format!("copy/{n}"),
            total.1.as_nanos() as f64 / total.0.max(1) as f64,
        ));
        g.finish();
    }
    for (name, ns) in &results {
        let mut parts = name.split('/');
        let (dir, path, n) = (parts.next(), parts.next(), parts.next());
        let routed = match (dir, n) {
            (Some(d), Some(n)) if path != Some("routed") => results
                .iter()
                .find(|(r, _)| *r == format!("{d}/routed/{n}"))
                .map(|(_, v)| *v),
            _ => None,
        };
        match routed {
            Some(r) => println!(
                "return_paths {name}: {ns:.1} ns/frame, {:.2}× routed",
                ns / r
            ),
            None => println!("return_paths {name}: {ns:.1} ns/frame"),
        }
    }
}
