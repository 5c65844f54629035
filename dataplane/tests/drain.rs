//! Draining through the pure core, with kube-proxy's and Linux conntrack's
//! semantics (`docs/semantics.md`, "Draining"): a backend of weight 0 keeps
//! its flows and gets no new ones; a backend that leaves the table keeps its
//! TCP connections until they close or time out, while its UDP flows pick
//! again. Each case checks the bytes on the wire: the frame a flow's packet
//! becomes is the same, byte for byte, before and after the change, and
//! replies still leave from the frontend.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::net::IpAddr;
use std::sync::Arc;

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack, Timeouts};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::pipeline::{Side, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, ReturnConfig};
use clustergate_dataplane::table::{BackendState, ReturnPath, Table};
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp, Wire};
use clustergate_dataplane::time::Now;

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

const CLIENT: &str = "198.18.0.1";
const VIP: &str = "198.19.0.10";
/// A ClientIP-affinity frontend with the same backends.
const VIP_STICKY: &str = "198.19.0.11";
const B: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
/// The gateway's own address on the backends' side.
const GW: &str = "198.18.2.1";
const NOW: Now = Now::from_secs(100);

/// `(backend, weight)`: weight 0 is a draining (terminating) backend.
type Members<'a> = &'a [(&'a str, u32)];

fn backends(list: Members<'_>, port: u16) -> Vec<BackendSpec> {
    list.iter()
        .map(|&(b, weight)| BackendSpec {
            weight,
            state: if weight == 0 {
                BackendState::Terminating
            } else {
                BackendState::Ready
            },
            ..BackendSpec::ready(b.parse().unwrap(), port)
        })
        .collect()
}

/// VIP:80/TCP, VIP:53/UDP and VIP_STICKY:80/TCP (ClientIP affinity), each
/// with `list`.
fn table(generation: u64, rp: ReturnPath, list: Members<'_>) -> Table {
    let spec = |vip: &str, port, proto, bport| {
        ServiceSpec::cluster_ip(vip.parse().unwrap(), port, proto, backends(list, bport))
            .with_return_path(rp)
    };
    let mut sticky = spec(VIP_STICKY, 80, Proto::Tcp, 8080);
    sticky.affinity_timeout_s = Some(600);
    Table::build(
        generation,
        0,
        &[
            spec(VIP, 80, Proto::Tcp, 8080),
            spec(VIP, 53, Proto::Udp, 5353),
            sticky,
        ],
    )
    .unwrap()
}

fn all(weight: u32) -> Vec<(&'static str, u32)> {
    B.iter().map(|b| (*b, weight)).collect()
}

/// `all(1)` with `b` at weight 0.
fn draining(b: &str) -> Vec<(&'static str, u32)> {
    B.iter().map(|x| (*x, u32::from(*x != b))).collect()
}

/// `all(1)` without `b`.
fn without(b: &str) -> Vec<(&'static str, u32)> {
    B.iter().filter(|x| **x != b).map(|x| (*x, 1)).collect()
}

fn worker() -> Worker {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 8192,
        shards: 8,
        partitions: 1,
        affinity_capacity: 1024,
        fragment_capacity: 64,
        timeouts: Timeouts::default(),
    }));
    let mut w = Worker::with_config(ct, ReturnConfig::default());
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(a(GW)),
        v6: None,
    })));
    w
}

/// Runs one frame; returns the verdict and the bytes that come out.
fn run(w: &mut Worker, t: &Table, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let (mut buf, len) = testkit::to_buf(frame);
    let v = w.process(NOW, t, &mut buf, len);
    let out = match v {
        Verdict::Forward { len, .. } | Verdict::Reject { len } => len,
        _ => len,
    };
    buf.truncate(out);
    (v, buf)
}

fn to(v: Verdict, side: Side) -> Addr16 {
    match v {
        Verdict::Forward { next_hop, .. } if next_hop.side == side => next_hop.addr,
        other => panic!("expected a forward to the {side:?} side, got {other:?}"),
    }
}

fn tcp(vip: &str, sport: u16, dport: u16, f: Tcp, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(a(CLIENT), sport, a(vip), dport, L4Spec::Tcp(f), payload)
}

fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(a(CLIENT), sport, a(VIP), 53, L4Spec::Udp, payload)
}

/// The frame a backend sends back for what it received (`seen`): to its
/// source, from its destination (the backend's address and port).
fn reply_to(seen: &Wire, l4: L4Spec, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(seen.dst, seen.dport, seen.src, seen.sport, l4, payload)
}

/// A client port whose new connection to `vip` picks `backend` in `t`.
fn port_to(t: &Table, vip: &str, backend: &str) -> u16 {
    (20000..30000u16)
        .find(|&p| {
            let mut w = worker();
            let (v, _) = run(&mut w, t, &tcp(vip, p, 80, Tcp::syn(1), b""));
            to(v, Side::Backend) == a(backend)
        })
        .expect("some port picks it")
}

/// New connections from `n` client ports (from `first`) to VIP:80 in `t`:
/// the backends they reach.
fn new_picks(w: &mut Worker, t: &Table, first: u16, n: u16) -> Vec<Addr16> {
    (first..first + n)
        .map(|p| {
            to(
                run(w, t, &tcp(VIP, p, 80, Tcp::syn(9), b"")).0,
                Side::Backend,
            )
        })
        .collect()
}

#[test]
fn a_tcp_connection_keeps_its_backend_byte_for_byte_when_it_drains_and_when_it_leaves() {
    for rp in [ReturnPath::Routed, ReturnPath::Snat, ReturnPath::Dsr] {
        let t1 = table(1, rp, &all(1));
        let port = port_to(&t1, VIP, B[1]);
        let mut w = worker();
        // Handshake: SYN to B[1], its SYN-ACK (through the gateway unless DSR).
        let (v, syn) = run(&mut w, &t1, &tcp(VIP, port, 80, Tcp::syn(100), b""));
        assert_eq!(to(v, Side::Backend), a(B[1]), "{rp:?}");
        let seen = wire(&syn);
        let synack = Tcp {
            syn: true,
            ..Tcp::ack(7000, 101)
        };
        let data = tcp(VIP, port, 80, Tcp::ack(101, 7001), &[0x5a; 1000]);
        let answer = reply_to(&seen, L4Spec::Tcp(Tcp::ack(7001, 1101)), &[0xa5; 700]);
        if rp != ReturnPath::Dsr {
            let (v, back) = run(&mut w, &t1, &reply_to(&seen, L4Spec::Tcp(synack), b""));
            assert_eq!(to(v, Side::Client), a(CLIENT), "{rp:?}");
            assert_eq!(wire(&back).src, a(VIP));
        }
        let (v, data_before) = run(&mut w, &t1, &data);
        assert_eq!(to(v, Side::Backend), a(B[1]));
        let answer_before = (rp != ReturnPath::Dsr).then(|| {
            let (v, out) = run(&mut w, &t1, &answer);
            assert_eq!(to(v, Side::Client), a(CLIENT));
            out
        });

        // Generation 2: B[1] drains. Generation 3: B[1] is gone.
        let t2 = table(2, rp, &draining(B[1]));
        let t3 = table(3, rp, &without(B[1]));
        for (t, what) in [(&t2, "draining"), (&t3, "removed")] {
            let (v, out) = run(&mut w, t, &data);
            assert_eq!(to(v, Side::Backend), a(B[1]), "{rp:?} {what}");
            assert_eq!(
                out, data_before,
                "{rp:?} {what}: the same bytes to the backend"
            );
            if let Some(before) = &answer_before {
                let (v, out) = run(&mut w, t, &answer);
                assert_eq!(to(v, Side::Client), a(CLIENT), "{rp:?} {what}");
                assert_eq!(&out, before, "{rp:?} {what}: the same bytes to the client");
                let r = wire(&out);
                assert_eq!(
                    (r.src, r.sport, r.dst, r.dport),
                    (a(VIP), 80, a(CLIENT), port)
                );
                assert_eq!(r.payload, vec![0xa5; 700]);
            }
            // New connections never reach B[1].
            let picks = new_picks(&mut w, t, 40000, 300);
            assert!(
                !picks.contains(&a(B[1])),
                "{rp:?} {what}: a new flow on B[1]"
            );
            assert!(picks.contains(&a(B[0])) && picks.contains(&a(B[2])));
        }
        assert_eq!(w.counters.flows_moved, 0, "{rp:?}");

        // The connection closes (the client resets it): a new connection on
        // the same tuple goes to a backend still in the table.
        let rst = Tcp {
            rst: true,
            ..Tcp::ack(1101, 7701)
        };
        let (v, _) = run(&mut w, &t3, &tcp(VIP, port, 80, rst, b""));
        assert_eq!(
            to(v, Side::Backend),
            a(B[1]),
            "{rp:?}: the RST reaches B[1]"
        );
        let (v, _) = run(&mut w, &t3, &tcp(VIP, port, 80, Tcp::syn(5000), b""));
        assert_ne!(to(v, Side::Backend), a(B[1]), "{rp:?}: reopened on B[1]");
        if rp != ReturnPath::Dsr {
            let (v, _) = run(&mut w, &t3, &answer);
            assert_eq!(v, Verdict::Pass, "{rp:?}: B[1]'s binding is gone");
        }
    }
}

#[test]
fn a_connection_its_backend_never_answered_picks_again_when_the_backend_leaves() {
    let t1 = table(1, ReturnPath::Snat, &all(1));
    let port = port_to(&t1, VIP, B[2]);
    let mut w = worker();
    let (v, _) = run(&mut w, &t1, &tcp(VIP, port, 80, Tcp::syn(1), b""));
    assert_eq!(to(v, Side::Backend), a(B[2]));
    // Draining keeps it (the backend may still answer) ...
    let t2 = table(2, ReturnPath::Snat, &draining(B[2]));
    let (v, _) = run(&mut w, &t2, &tcp(VIP, port, 80, Tcp::syn(1), b""));
    assert_eq!(to(v, Side::Backend), a(B[2]));
    // ... removal moves the retransmitted SYN.
    let t3 = table(3, ReturnPath::Snat, &without(B[2]));
    let (v, _) = run(&mut w, &t3, &tcp(VIP, port, 80, Tcp::syn(1), b""));
    assert_ne!(to(v, Side::Backend), a(B[2]));
    assert_eq!(w.counters.flows_moved, 1);
}

#[test]
fn a_udp_flow_stays_on_a_draining_backend_and_moves_when_it_leaves() {
    let t1 = table(1, ReturnPath::Snat, &all(1));
    let mut w = worker();
    // Flows from many ports; find one on each backend.
    let first: Vec<(u16, Addr16, Vec<u8>)> = (30000..30300u16)
        .map(|p| {
            let (v, out) = run(&mut w, &t1, &udp(p, b"query"));
            (p, to(v, Side::Backend), out)
        })
        .collect();
    let t2 = table(2, ReturnPath::Snat, &draining(B[0]));
    for (p, b, out) in &first {
        let (v, again) = run(&mut w, &t2, &udp(*p, b"query"));
        assert_eq!(to(v, Side::Backend), *b, "port {p} kept its backend");
        assert_eq!(&again, out, "port {p}: the same bytes");
    }
    let t3 = table(3, ReturnPath::Snat, &without(B[0]));
    let mut moved = 0;
    for (p, b, out) in &first {
        let (v, again) = run(&mut w, &t3, &udp(*p, b"query"));
        let now_b = to(v, Side::Backend);
        if *b == a(B[0]) {
            assert_ne!(now_b, a(B[0]), "port {p} left the removed backend");
            // Its reply comes back from the frontend, from the new backend.
            let (v, back) = run(
                &mut w,
                &t3,
                &reply_to(&wire(&again), L4Spec::Udp, b"answer"),
            );
            assert_eq!(to(v, Side::Client), a(CLIENT));
            let r = wire(&back);
            assert_eq!((r.src, r.sport, r.dport), (a(VIP), 53, *p));
            moved += 1;
        } else {
            assert_eq!(now_b, *b, "port {p} kept its backend");
            assert_eq!(&again, out);
        }
    }
    assert!(moved > 0, "some flow was on B[0]");
    assert_eq!(w.counters.flows_moved, moved);
}

#[test]
fn new_connections_never_pick_a_draining_backend() {
    let mut w = worker();
    // One draining backend among three, then two: only the others are picked.
    for (gen, list) in [
        (1, draining(B[1])),
        (2, vec![(B[0], 0), (B[1], 0), (B[2], 1)]),
    ] {
        let t = table(gen, ReturnPath::Snat, &list);
        let picks = new_picks(&mut w, &t, 10000 + 1000 * gen as u16, 500);
        for (b, weight) in &list {
            assert_eq!(
                picks.contains(&a(b)),
                *weight > 0,
                "generation {gen}: {b} of weight {weight}"
            );
        }
    }
    // Every backend draining (control never writes this: with nothing ready
    // the terminating ones have weight 1): no new flow, the SYN is rejected.
    let t = table(3, ReturnPath::Snat, &all(0));
    let (v, _) = run(&mut w, &t, &tcp(VIP, 50000, 80, Tcp::syn(1), b""));
    assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
}

#[test]
fn client_ip_affinity_never_sends_a_new_connection_to_a_draining_backend() {
    let t1 = table(1, ReturnPath::Snat, &all(1));
    let mut w = worker();
    // The client's first connection fixes its backend.
    let (v, syn) = run(&mut w, &t1, &tcp(VIP_STICKY, 1000, 80, Tcp::syn(1), b""));
    let sticky = to(v, Side::Backend);
    let synack = Tcp {
        syn: true,
        ..Tcp::ack(9, 2)
    };
    run(
        &mut w,
        &t1,
        &reply_to(&wire(&syn), L4Spec::Tcp(synack), b""),
    );
    for p in 1001..1010 {
        let (v, _) = run(&mut w, &t1, &tcp(VIP_STICKY, p, 80, Tcp::syn(1), b""));
        assert_eq!(to(v, Side::Backend), sticky, "affinity holds");
    }
    // The sticky backend drains: the established connection stays, new ones
    // go elsewhere, all to one other backend (the affinity entry follows).
    let name = B.iter().find(|b| a(b) == sticky).unwrap();
    let t2 = table(2, ReturnPath::Snat, &draining(name));
    let (v, _) = run(
        &mut w,
        &t2,
        &tcp(VIP_STICKY, 1000, 80, Tcp::ack(2, 10), b"more"),
    );
    assert_eq!(to(v, Side::Backend), sticky, "the open connection stays");
    let news: Vec<Addr16> = (2000..2020)
        .map(|p| {
            to(
                run(&mut w, &t2, &tcp(VIP_STICKY, p, 80, Tcp::syn(1), b"")).0,
                Side::Backend,
            )
        })
        .collect();
    assert!(!news.contains(&sticky), "{news:?}");
    assert!(news.iter().all(|b| *b == news[0]), "{news:?}");
}

#[test]
fn an_ipv6_connection_keeps_a_removed_backend_with_source_nat() {
    const CLIENT6: &str = "2001:2::1";
    const VIP6: &str = "2001:2:100::10";
    const GW6: &str = "2001:2:2::1";
    const B6: [&str; 2] = ["2001:2:1::1", "2001:2:1::2"];
    let table6 = |generation, list: &[&str]| {
        let b = list
            .iter()
            .map(|x| BackendSpec::ready(x.parse().unwrap(), 8080))
            .collect();
        Table::build(
            generation,
            0,
            &[
                ServiceSpec::cluster_ip(VIP6.parse().unwrap(), 80, Proto::Tcp, b)
                    .with_return_path(ReturnPath::Snat),
            ],
        )
        .unwrap()
    };
    let ct = Arc::new(Conntrack::new(&Config::default()));
    let mut w = Worker::with_config(ct, ReturnConfig::default());
    w.set_sources(Some(Arc::new(FixedSources {
        v4: None,
        v6: Some(a(GW6)),
    })));
    let t1 = table6(1, &B6);
    let seg = |f: Tcp, payload: &[u8]| {
        testkit::client_frame(a(CLIENT6), 5555, a(VIP6), 80, L4Spec::Tcp(f), payload)
    };
    let (v, syn) = run(&mut w, &t1, &seg(Tcp::syn(1), b""));
    let b = to(v, Side::Backend);
    let seen = wire(&syn);
    assert_eq!(seen.src, a(GW6), "source-NATed");
    let synack = Tcp {
        syn: true,
        ..Tcp::ack(40, 2)
    };
    run(&mut w, &t1, &reply_to(&seen, L4Spec::Tcp(synack), b""));
    let data = seg(Tcp::ack(2, 41), &[7; 900]);
    let answer = reply_to(&seen, L4Spec::Tcp(Tcp::ack(41, 902)), &[8; 300]);
    let (_, data_before) = run(&mut w, &t1, &data);
    let (_, answer_before) = run(&mut w, &t1, &answer);
    // The backend leaves: the connection keeps it, byte for byte both ways.
    let other = B6.iter().copied().find(|x| a(x) != b).unwrap();
    let t2 = table6(2, &[other]);
    let (v, out) = run(&mut w, &t2, &data);
    assert_eq!(to(v, Side::Backend), b);
    assert_eq!(out, data_before);
    let (v, out) = run(&mut w, &t2, &answer);
    assert_eq!(to(v, Side::Client), a(CLIENT6));
    assert_eq!(out, answer_before);
    let r = wire(&out);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (a(VIP6), 80, a(CLIENT6), 5555)
    );
    // A new connection goes to the backend that is left.
    let (v, _) = run(
        &mut w,
        &t2,
        &testkit::client_frame(a(CLIENT6), 5556, a(VIP6), 80, L4Spec::Tcp(Tcp::syn(1)), b""),
    );
    assert_eq!(to(v, Side::Backend), a(other));
}
