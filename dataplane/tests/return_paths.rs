//! The return paths through the pure core: source NAT, direct server return
//! and routed, with what a user would check on the wire: the addresses and
//! ports each side sees, every checksum recomputed in full
//! ([`testkit::wire`]), the ICMP answers, which ports are handed out and
//! when they are free again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack, FlowState, Timeouts};
use clustergate_dataplane::flow::{addr16, Addr16, FlowTuple, Proto};
use clustergate_dataplane::packet::checksum;
use clustergate_dataplane::packet::parse::Family;
use clustergate_dataplane::pipeline::{DropReason, Side, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{ReturnPath, Table};
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp, Wire};
use clustergate_dataplane::time::Now;
use proptest::prelude::*;

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

const CLIENT: &str = "198.18.0.1";
const VIP: &str = "198.19.0.10";
const B1: &str = "198.18.1.1";
const B2: &str = "198.18.1.2";
/// The gateway's own address on the backends' side.
const GW: &str = "198.18.2.1";
const GW2: &str = "198.18.2.2";
/// A router between the gateway and the backends.
const ROUTER: &str = "198.18.2.254";
const CLIENT6: &str = "2001:2::1";
const VIP6: &str = "2001:2:100::10";
const B6: &str = "2001:2:1::1";
const GW6: &str = "2001:2:2::1";

/// VIP:81 has one backend, so that every flow to it competes for the same
/// (backend address, backend port, protocol).
fn services(rp: ReturnPath) -> Vec<ServiceSpec> {
    let spec = |vip: &str, port, proto, backends: &[(&str, u16)]| {
        ServiceSpec::cluster_ip(
            vip.parse().unwrap(),
            port,
            proto,
            backends
                .iter()
                .map(|(b, p)| BackendSpec::ready(b.parse().unwrap(), *p))
                .collect(),
        )
        .with_return_path(rp)
    };
    vec![
        spec(VIP, 80, Proto::Tcp, &[(B1, 8080), (B2, 8080)]),
        spec(VIP, 81, Proto::Tcp, &[(B1, 8081)]),
        spec(VIP, 53, Proto::Udp, &[(B1, 5353)]),
        spec(VIP, 3868, Proto::Sctp, &[(B1, 3868)]),
        spec(VIP6, 80, Proto::Tcp, &[(B6, 8080)]),
        spec(VIP6, 53, Proto::Udp, &[(B6, 5353)]),
    ]
}

fn table(generation: u64, rp: ReturnPath) -> Table {
    Table::build(generation, 0, &services(rp)).unwrap()
}

fn conntrack(timeouts: Timeouts) -> Arc<Conntrack> {
    Arc::new(Conntrack::new(&Config {
        capacity: 4096,
        shards: 16,
        partitions: 1,
        affinity_capacity: 64,
        fragment_capacity: 64,
        timeouts,
    }))
}

fn ports(lo: u16, hi: u16) -> PortRange {
    PortRange::new(lo, hi).unwrap()
}

/// A worker whose source addresses come from "the routes": GW and GW6.
fn worker(ct: &Arc<Conntrack>, range: PortRange) -> Worker {
    let mut w = Worker::with_config(
        Arc::clone(ct),
        ReturnConfig {
            ports: range,
            ..ReturnConfig::default()
        },
    );
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(a(GW)),
        v6: Some(a(GW6)),
    })));
    w
}

/// Runs one frame; returns the verdict and the bytes that come out.
fn run(w: &mut Worker, now: Now, t: &Table, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let (mut buf, len) = testkit::to_buf(frame);
    let v = w.process(now, t, &mut buf, len);
    let out = match v {
        Verdict::Forward { len, .. } | Verdict::Reject { len } => len,
        _ => len,
    };
    buf.truncate(out);
    (v, buf)
}

fn forwarded(v: Verdict, side: Side) -> Addr16 {
    match v {
        Verdict::Forward { next_hop, .. } if next_hop.side == side => next_hop.addr,
        other => panic!("expected a forward to the {side:?} side, got {other:?}"),
    }
}

fn l4(proto: Proto, tcp: Tcp) -> L4Spec {
    match proto {
        Proto::Tcp => L4Spec::Tcp(tcp),
        Proto::Udp => L4Spec::Udp,
        Proto::Sctp => L4Spec::Sctp,
    }
}

/// The frame a backend sends back for what it received (`seen`).
fn reply_to(seen: &Wire, proto: Proto, payload: &[u8]) -> Vec<u8> {
    let synack = Tcp {
        syn: true,
        ack: Some(seen.seq.wrapping_add(1)),
        seq: 7000,
        ..Tcp::default()
    };
    testkit::client_frame(
        seen.dst,
        seen.dport,
        seen.src,
        seen.sport,
        l4(proto, synack),
        payload,
    )
}

const NOW: Now = Now(100_000_000_000);

/// Source NAT rewrites both ends on the way in, and the reply, which comes
/// back to the gateway's address and port, gets both restored: the client
/// sees the VIP, the backend sees the gateway. TCP, UDP and SCTP over IPv4,
/// TCP and UDP over IPv6; the reply is taken by the other worker.
#[test]
fn snat_rewrites_both_ends_and_the_reply_restores_them() {
    let t = table(1, ReturnPath::Snat);
    let ct = conntrack(Timeouts::default());
    let range = ports(20_000, 29_999);
    let shares = range.split(2).unwrap();
    let mut w = [worker(&ct, shares[0]), worker(&ct, shares[1])];
    let cases = [
        (CLIENT, VIP, 80, Proto::Tcp, GW),
        (CLIENT, VIP, 53, Proto::Udp, GW),
        (CLIENT, VIP, 3868, Proto::Sctp, GW),
        (CLIENT6, VIP6, 80, Proto::Tcp, GW6),
        (CLIENT6, VIP6, 53, Proto::Udp, GW6),
    ];
    for (i, (client, vip, vport, proto, gw)) in cases.into_iter().enumerate() {
        let cport = 40_000 + i as u16;
        let req = testkit::client_frame(
            a(client),
            cport,
            a(vip),
            vport,
            l4(proto, Tcp::syn(100)),
            b"hello",
        );
        let (v, out) = run(&mut w[0], NOW, &t, &req);
        let backend = forwarded(v, Side::Backend);
        let seen = wire(&out);
        assert_eq!(seen.src, a(gw), "{proto:?}: the backend sees the gateway");
        assert!(
            shares[0].contains(seen.sport),
            "{proto:?}: port {} from worker 0's share {}",
            seen.sport,
            shares[0]
        );
        assert_eq!(
            range.owner(2, seen.sport),
            Some(0),
            "the port names its worker"
        );
        assert_eq!(seen.dst, backend);
        assert_eq!(seen.ttl, 63);
        assert_eq!(seen.payload.get(..5), Some(&b"hello"[..]));

        let (v, back) = run(&mut w[1], NOW, &t, &reply_to(&seen, proto, b"world"));
        assert_eq!(forwarded(v, Side::Client), a(client));
        let got = wire(&back);
        assert_eq!(
            (got.src, got.sport, got.dst, got.dport),
            (a(vip), vport, a(client), cport),
            "{proto:?}: the client sees the VIP and its own port"
        );
        assert_eq!(got.payload.get(..5), Some(&b"world"[..]));

        // The flow keeps its port.
        let again = testkit::client_frame(
            a(client),
            cport,
            a(vip),
            vport,
            l4(proto, Tcp::ack(101, 7001)),
            b"",
        );
        let (_, out) = run(&mut w[0], NOW, &t, &again);
        let second = wire(&out);
        assert_eq!((second.src, second.sport), (seen.src, seen.sport));
    }
    let replies: u64 = w.iter().map(|w| w.counters.replies).sum();
    assert_eq!(replies, cases.len() as u64);
}

/// A port is unique per (SNAT address, backend address, backend port,
/// protocol): every backend gets the whole range; when the range is used up
/// towards one backend, new flows to it are dropped and counted, and a port
/// is free again once its flow is gone (reset, closed, timed out).
#[test]
fn snat_ports_are_unique_per_backend_and_exhaustion_is_counted() {
    let t = table(1, ReturnPath::Snat);
    let timeouts = Timeouts {
        tcp_rst: 10,
        tcp_fin: 20,
        ..Timeouts::default()
    };
    let ct = conntrack(timeouts);
    let mut w = worker(&ct, ports(20_000, 20_003));
    let open = |w: &mut Worker, now, cport| {
        let syn =
            testkit::client_frame(a(CLIENT), cport, a(VIP), 81, L4Spec::Tcp(Tcp::syn(1)), b"");
        run(w, now, &t, &syn)
    };
    let mut used = BTreeSet::new();
    for cport in 1000..1004 {
        let (v, out) = open(&mut w, NOW, cport);
        forwarded(v, Side::Backend);
        let seen = wire(&out);
        assert!(
            used.insert(seen.sport),
            "port {} handed out twice",
            seen.sport
        );
    }
    assert_eq!(used, (20_000..=20_003).collect());
    let (v, _) = open(&mut w, NOW, 1004);
    assert_eq!(v, Verdict::Drop(DropReason::SnatPortsExhausted));
    assert_eq!(w.counters.dropped(DropReason::SnatPortsExhausted), 1);

    // Another backend port has the whole range to itself.
    let other = testkit::client_frame(a(CLIENT), 1004, a(VIP), 53, L4Spec::Udp, b"q");
    let (v, out) = run(&mut w, NOW, &t, &other);
    forwarded(v, Side::Backend);
    assert!((20_000..=20_003).contains(&wire(&out).sport));

    // A reset frees its port once the reset timeout has passed and the
    // sweep went by; until then nothing is handed out twice.
    let rst = Tcp {
        rst: true,
        seq: 2,
        ..Tcp::default()
    };
    let (v, _) = run(
        &mut w,
        NOW,
        &t,
        &testkit::client_frame(a(CLIENT), 1000, a(VIP), 81, L4Spec::Tcp(rst), b""),
    );
    forwarded(v, Side::Backend);
    let (v, _) = open(&mut w, NOW.plus_secs(9), 1005);
    assert_eq!(v, Verdict::Drop(DropReason::SnatPortsExhausted));
    let mut cursor = 0;
    ct.expire(NOW.plus_secs(10), &mut cursor, 16);
    let (v, out) = open(&mut w, NOW.plus_secs(10), 1005);
    forwarded(v, Side::Backend);
    let freed = wire(&out).sport;
    assert!(used.contains(&freed));

    // A FIN closes; its port is free after the close timeout.
    let fin = Tcp {
        fin: true,
        ack: Some(1),
        seq: 2,
        ..Tcp::default()
    };
    run(
        &mut w,
        NOW.plus_secs(10),
        &t,
        &testkit::client_frame(a(CLIENT), 1001, a(VIP), 81, L4Spec::Tcp(fin), b""),
    );
    ct.expire(NOW.plus_secs(29), &mut cursor, 16);
    let (v, _) = open(&mut w, NOW.plus_secs(29), 1006);
    assert_eq!(v, Verdict::Drop(DropReason::SnatPortsExhausted));
    ct.expire(NOW.plus_secs(31), &mut cursor, 16);
    let (v, _) = open(&mut w, NOW.plus_secs(31), 1006);
    forwarded(v, Side::Backend);
}

/// A live tuple is never handed out twice: under churn through a small
/// range (flows opened, reset and expired at random, on two workers), every
/// reply a backend sends to a live flow's (gateway address, port) reaches
/// that flow's own client, never another's.
#[test]
fn a_live_tuple_is_never_reused_under_churn() {
    let t = table(1, ReturnPath::Snat);
    let ct = conntrack(Timeouts {
        tcp_rst: 2,
        tcp_syn: 5,
        ..Timeouts::default()
    });
    let range = ports(20_000, 20_015);
    let shares = range.split(2).unwrap();
    let mut w = [worker(&ct, shares[0]), worker(&ct, shares[1])];
    // cport → the tuple the backend saw.
    let mut live: std::collections::BTreeMap<u16, Wire> = std::collections::BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut now = NOW;
    let mut cursor = 0;
    let mut exhausted = 0;
    for step in 0..3000u32 {
        let r = next();
        let wi = (r & 1) as usize;
        let cport = 1000 + (r >> 8) as u16 % 64;
        if r >> 20 & 3 == 0 {
            now = now.plus_secs(1);
            ct.expire(now, &mut cursor, 16);
        }
        // Flows the table let go of (timeouts) are no longer live to us either.
        live.retain(|cport, _| {
            let f = FlowTuple {
                src_addr: a(CLIENT),
                dst_addr: a(VIP),
                src_port: *cport,
                dst_port: 81,
                proto: Proto::Tcp,
            };
            ct.lookup_original(now, Family::V4, &f, 0, false).is_some()
        });
        match (live.get(&cport).cloned(), r >> 24 & 1) {
            (None, _) => {
                let syn = testkit::client_frame(
                    a(CLIENT),
                    cport,
                    a(VIP),
                    81,
                    L4Spec::Tcp(Tcp::syn(1)),
                    b"",
                );
                match run(&mut w[wi], now, &t, &syn) {
                    (Verdict::Forward { .. }, out) => {
                        let seen = wire(&out);
                        assert!(
                            !live.values().any(|o| o.sport == seen.sport),
                            "step {step}: port {} is live already",
                            seen.sport
                        );
                        live.insert(cport, seen);
                    }
                    (Verdict::Drop(DropReason::SnatPortsExhausted), _) => exhausted += 1,
                    other => panic!("step {step}: {other:?}"),
                }
            }
            (Some(seen), 0) => {
                // The backend answers: it must reach this flow's client.
                let (v, back) = run(&mut w[1 - wi], now, &t, &reply_to(&seen, Proto::Tcp, b""));
                assert_eq!(
                    forwarded(v, Side::Client),
                    a(CLIENT),
                    "step {step}: reply of {cport}"
                );
                assert_eq!(wire(&back).dport, cport, "step {step}: reply of {cport}");
            }
            (Some(_), _) => {
                // The client resets; the flow is over for us.
                let rst = Tcp {
                    rst: true,
                    seq: 2,
                    ..Tcp::default()
                };
                let f = testkit::client_frame(a(CLIENT), cport, a(VIP), 81, L4Spec::Tcp(rst), b"");
                run(&mut w[wi], now, &t, &f);
                live.remove(&cport);
            }
        }
    }
    assert!(exhausted > 0, "the range was used up at times");
    assert!(ct.len() <= 16 + 1);
}

/// Without a `--snat-address` and without a route to the backend, a new
/// source-NAT or DSR flow has no address to leave with: a counted drop.
#[test]
fn no_source_address_is_a_counted_drop() {
    let ct = conntrack(Timeouts::default());
    let syn = testkit::client_frame(a(CLIENT), 1, a(VIP), 80, L4Spec::Tcp(Tcp::syn(1)), b"");
    for rp in [ReturnPath::Snat, ReturnPath::Dsr] {
        let mut w = Worker::new(Arc::clone(&ct));
        let (v, _) = run(&mut w, NOW, &table(1, rp), &syn);
        assert_eq!(v, Verdict::Drop(DropReason::SnatNoAddress), "{rp}");
        assert_eq!(w.counters.dropped(DropReason::SnatNoAddress), 1);
    }
    assert!(ct.is_empty(), "nothing half-bound");
}

/// `--snat-address` given twice multiplies the port space: two addresses
/// with two ports each carry four flows to one backend.
#[test]
fn several_snat_addresses_multiply_the_port_space() {
    let t = table(1, ReturnPath::Snat);
    let ct = conntrack(Timeouts::default());
    let mut w = Worker::with_config(
        Arc::clone(&ct),
        ReturnConfig {
            snat_v4: vec![a(GW), a(GW2)],
            ports: ports(20_000, 20_001),
            ..ReturnConfig::default()
        },
    );
    let mut seen = BTreeSet::new();
    for cport in 0..4 {
        let syn = testkit::client_frame(
            a(CLIENT),
            2000 + cport,
            a(VIP),
            81,
            L4Spec::Tcp(Tcp::syn(1)),
            b"",
        );
        let (v, out) = run(&mut w, NOW, &t, &syn);
        forwarded(v, Side::Backend);
        let o = wire(&out);
        assert!(seen.insert((o.src, o.sport)));
    }
    assert_eq!(seen.iter().filter(|(s, _)| *s == a(GW)).count(), 2);
    let syn = testkit::client_frame(a(CLIENT), 2004, a(VIP), 81, L4Spec::Tcp(Tcp::syn(1)), b"");
    assert_eq!(
        run(&mut w, NOW, &t, &syn).0,
        Verdict::Drop(DropReason::SnatPortsExhausted)
    );
}

/// The quoted packet of an ICMP error at `out`, as (src, sport, dst, dport),
/// with its IPv4 header checksum checked.
fn quoted(w: &Wire) -> (Addr16, u16, Addr16, u16) {
    let q = &w.payload;
    assert_eq!(
        checksum::ipv4_header_checksum(&q[..20]),
        u16::from_be_bytes([q[10], q[11]]),
        "quoted IPv4 header checksum"
    );
    let addr = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&q[at..at + 4]);
        clustergate_dataplane::flow::v4_to_16(b)
    };
    let port = |at: usize| u16::from_be_bytes([q[at], q[at + 1]]);
    (addr(12), port(20), addr(16), port(22))
}

/// ICMP errors about a source-NATed flow are translated both ways, the
/// quoted packet included: the client gets its own packet back as it sent
/// it (to the VIP), and the backend its own reply as it sent it (to the
/// gateway's address and port).
#[test]
fn icmp_errors_about_a_snat_flow_are_translated_both_ways() {
    let t = table(1, ReturnPath::Snat);
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    let syn = testkit::client_frame(a(CLIENT), 40_000, a(VIP), 81, L4Spec::Tcp(Tcp::syn(1)), b"");
    let (_, out) = run(&mut w, NOW, &t, &syn);
    let fwd = wire(&out);
    let sport = fwd.sport;
    let mtu = [0, 0, 0x05, 0x00];

    // 1. A router between the gateway and the backend cannot forward our
    //    packet (gateway:sport → backend) and tells the gateway.
    let sent = testkit::client_frame(
        a(GW),
        sport,
        a(B1),
        8081,
        L4Spec::Tcp(Tcp::ack(2, 9)),
        &[0; 1400],
    );
    let err = testkit::icmp_error(a(ROUTER), a(GW), (3, 4, mtu), &sent, 28);
    let (v, out) = run(&mut w, NOW, &t, &err);
    assert_eq!(forwarded(v, Side::Client), a(CLIENT));
    let e = wire(&out);
    assert_eq!(
        (e.src, e.dst),
        (a(ROUTER), a(CLIENT)),
        "outer: the router → the client"
    );
    assert_eq!(e.icmp_rest, mtu, "MTU untouched");
    assert_eq!(
        quoted(&e),
        (a(CLIENT), 40_000, a(VIP), 81),
        "quoted: the client's own packet"
    );

    // 2. The backend itself answers our packet with an error: the client
    //    sees it from the VIP.
    let err = testkit::icmp_error(a(B1), a(GW), (3, 3, [0; 4]), &sent, 28);
    let (v, out) = run(&mut w, NOW, &t, &err);
    assert_eq!(forwarded(v, Side::Client), a(CLIENT));
    let e = wire(&out);
    assert_eq!((e.src, e.dst), (a(VIP), a(CLIENT)));
    assert_eq!(quoted(&e), (a(CLIENT), 40_000, a(VIP), 81));

    // 3. A router on the client's side cannot deliver one of our replies
    //    (VIP → client): the backend gets the error about the reply as it
    //    sent it (backend → gateway:sport), from the gateway.
    let reply = testkit::client_frame(
        a(VIP),
        81,
        a(CLIENT),
        40_000,
        L4Spec::Tcp(Tcp::ack(9, 2)),
        &[0; 1400],
    );
    let err = testkit::icmp_error(a("198.18.0.254"), a(VIP), (3, 4, mtu), &reply, 28);
    let (v, out) = run(&mut w, NOW, &t, &err);
    assert_eq!(forwarded(v, Side::Backend), a(B1));
    let e = wire(&out);
    assert_eq!(
        (e.src, e.dst),
        (a(GW), a(B1)),
        "outer: the gateway → the backend"
    );
    assert_eq!(
        quoted(&e),
        (a(B1), 8081, a(GW), sport),
        "quoted: the backend's reply"
    );
    assert_eq!(w.counters.icmp_errors, 3);
}

/// The fragments of a source-NATed datagram follow its first fragment: both
/// addresses are rewritten in every one, and the datagram the backend puts
/// together carries a valid UDP checksum for the gateway's address.
#[test]
fn snat_fragments_follow_their_first_fragment() {
    let t = table(1, ReturnPath::Snat);
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    let dgram = testkit::udp_datagram(a(CLIENT), a(VIP), 5000, 53, 1200);
    let first = testkit::ipv4_raw(a(CLIENT), a(VIP), 17, 77, (0, true), &dgram[..800]);
    let rest = testkit::ipv4_raw(a(CLIENT), a(VIP), 17, 77, (100, false), &dgram[800..]);
    let (v, out1) = run(&mut w, NOW, &t, &first);
    assert_eq!(forwarded(v, Side::Backend), a(B1));
    let (v, out2) = run(&mut w, NOW, &t, &rest);
    assert_eq!(forwarded(v, Side::Backend), a(B1));
    for out in [&out1, &out2] {
        assert_eq!(&out[14 + 12..14 + 16], &a(GW)[12..], "source: the gateway");
        assert_eq!(
            &out[14 + 16..14 + 20],
            &a(B1)[12..],
            "destination: the backend"
        );
        assert_eq!(
            checksum::ipv4_header_checksum(&out[14..34]),
            u16::from_be_bytes([out[24], out[25]])
        );
    }
    let mut whole = out1[34..].to_vec();
    whole.extend_from_slice(&out2[34..]);
    let sum = checksum::sum_bytes(
        checksum::pseudo_header_v4([198, 18, 2, 1], [198, 18, 1, 1], 17, whole.len() as u16),
        &whole,
    );
    assert_eq!(checksum::fold(sum), 0xffff, "reassembled UDP checksum");
    assert_eq!(u16::from_be_bytes([whole[2], whole[3]]), 5353);
}

/// DSR: the packet reaches the backend inside an outer header from the
/// gateway, unchanged but for its TTL (client → VIP:port); the gateway keeps
/// no reverse entry (replies bypass it), and the client's ACK establishes
/// the flow.
#[test]
fn dsr_encapsulates_to_the_backend() {
    let t = table(1, ReturnPath::Dsr);
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    for (client, vip, gw, extra) in [(CLIENT, VIP, GW, 20), (CLIENT6, VIP6, GW6, 40)] {
        let syn = testkit::client_frame(
            a(client),
            40_000,
            a(vip),
            80,
            L4Spec::Tcp(Tcp::syn(1)),
            b"data",
        );
        let (v, out) = run(&mut w, NOW, &t, &syn);
        let backend = forwarded(v, Side::Backend);
        assert_eq!(out.len(), syn.len() + extra);
        let got = wire(&out);
        assert_eq!(
            got.outer,
            Some((a(gw), backend, 64)),
            "outer: gateway → backend"
        );
        assert_eq!(
            (got.src, got.sport, got.dst, got.dport, got.ttl),
            (a(client), 40_000, a(vip), 80, 63),
            "inner: the client's packet to the VIP"
        );
        assert_eq!(got.payload, b"data");
        // A "reply" from the backend to the client is not ours.
        let back = testkit::client_frame(
            backend,
            80,
            a(client),
            40_000,
            L4Spec::Tcp(Tcp::ack(5, 2)),
            b"",
        );
        assert_eq!(run(&mut w, NOW, &t, &back).0, Verdict::Pass);
        // The client's ACK after the backend's SYN-ACK establishes the flow.
        let ack = testkit::client_frame(
            a(client),
            40_000,
            a(vip),
            80,
            L4Spec::Tcp(Tcp::ack(2, 6)),
            b"",
        );
        let (v, _) = run(&mut w, NOW, &t, &ack);
        assert_eq!(forwarded(v, Side::Backend), backend);
        let f = FlowTuple {
            src_addr: a(client),
            dst_addr: a(vip),
            src_port: 40_000,
            dst_port: 80,
            proto: Proto::Tcp,
        };
        let family = if client == CLIENT {
            Family::V4
        } else {
            Family::V6
        };
        let hit = ct.lookup_original(NOW, family, &f, 0, false).unwrap();
        assert_eq!(hit.state, FlowState::TcpEstablished);
    }
}

/// DSR: a packet that would exceed the backend side's MTU once
/// encapsulated gets ICMP fragmentation needed (IPv4, with the MTU left for
/// the inner packet) or packet too big (IPv6) back, from the VIP, counted; a
/// fragment that cannot be answered is dropped and counted.
#[test]
fn dsr_too_big_gets_icmp_back() {
    let t = table(1, ReturnPath::Dsr);
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    for (client, vip, room, icmp) in [
        (CLIENT, VIP, 1480u32, (3u32, 4u32)),
        (CLIENT6, VIP6, 1460, (2, 0)),
    ] {
        let overhead = if client == CLIENT { 40 } else { 60 };
        let fits = testkit::client_frame(
            a(client),
            1,
            a(vip),
            80,
            L4Spec::Tcp(Tcp::ack(1, 1)),
            &vec![0; room as usize - overhead],
        );
        assert!(matches!(
            run(&mut w, NOW, &t, &fits).0,
            Verdict::Forward { .. }
        ));
        let big = testkit::client_frame(
            a(client),
            1,
            a(vip),
            80,
            L4Spec::Tcp(Tcp::ack(1, 1)),
            &vec![0; room as usize - overhead + 1],
        );
        let (v, out) = run(&mut w, NOW, &t, &big);
        assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
        let e = wire(&out);
        assert_eq!((e.src, e.dst), (a(vip), a(client)));
        assert_eq!(e.seq, icmp.0 << 8 | icmp.1, "ICMP type and code");
        let mtu = if client == CLIENT {
            u32::from(u16::from_be_bytes([e.icmp_rest[2], e.icmp_rest[3]]))
        } else {
            u32::from_be_bytes(e.icmp_rest)
        };
        assert_eq!(mtu, room, "the MTU left for the client's packets");
    }
    assert_eq!(w.counters.encap_too_big, 2);
    // A non-first fragment that does not fit cannot be answered.
    let first = testkit::ipv4_raw(a(CLIENT), a(VIP), 6, 9, (0, true), &[0u8; 24]);
    let mut tcp_first = first.clone();
    // Make the first fragment a TCP header to VIP:80 (data offset 5).
    tcp_first[34..38].copy_from_slice(&[0x9c, 0x40, 0, 80]);
    tcp_first[46] = 0x50;
    let (v, _) = run(&mut w, NOW, &t, &tcp_first);
    let backend = forwarded(v, Side::Backend);
    let rest = testkit::ipv4_raw(a(CLIENT), a(VIP), 6, 9, (3, false), &[0u8; 1480]);
    assert_eq!(
        run(&mut w, NOW, &t, &rest).0,
        Verdict::Drop(DropReason::EncapTooBig)
    );
    let rest = testkit::ipv4_raw(a(CLIENT), a(VIP), 6, 9, (3, false), &[0u8; 100]);
    let (v, out) = run(&mut w, NOW, &t, &rest);
    assert_eq!(forwarded(v, Side::Backend), backend);
    assert_eq!(out[14 + 9], 4, "a fitting fragment is encapsulated too");
}

/// DSR: an ICMP error the client sends about a reply (which the backend
/// sent itself, from the VIP) goes to that backend encapsulated, as it is.
#[test]
fn dsr_icmp_errors_go_to_the_backend_as_they_are() {
    let t = table(1, ReturnPath::Dsr);
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    let syn = testkit::client_frame(a(CLIENT), 40_000, a(VIP), 80, L4Spec::Tcp(Tcp::syn(1)), b"");
    let backend = forwarded(run(&mut w, NOW, &t, &syn).0, Side::Backend);
    let reply = testkit::client_frame(
        a(VIP),
        80,
        a(CLIENT),
        40_000,
        L4Spec::Tcp(Tcp::ack(9, 2)),
        &[0; 100],
    );
    let err = testkit::icmp_error(a(CLIENT), a(VIP), (3, 3, [0; 4]), &reply, 28);
    let (v, out) = run(&mut w, NOW, &t, &err);
    assert_eq!(forwarded(v, Side::Backend), backend);
    let e = wire(&out);
    assert_eq!(e.outer, Some((a(GW), backend, 64)));
    assert_eq!(
        (e.src, e.dst),
        (a(CLIENT), a(VIP)),
        "the error as the client sent it"
    );
    assert_eq!(quoted(&e), (a(VIP), 80, a(CLIENT), 40_000));
}

/// A flow keeps the return path it was bound with when its frontend's
/// changes: a source-NATed connection stays source-NATed, both ways, while
/// new connections take the new path.
#[test]
fn flows_keep_their_return_path_across_a_table_change() {
    let ct = conntrack(Timeouts::default());
    let mut w = worker(&ct, ports(20_000, 29_999));
    let gen1 = table(1, ReturnPath::Snat);
    let syn = testkit::client_frame(a(CLIENT), 40_000, a(VIP), 81, L4Spec::Tcp(Tcp::syn(1)), b"");
    let (_, out) = run(&mut w, NOW, &gen1, &syn);
    let seen = wire(&out);
    assert_eq!(seen.src, a(GW));
    let gen2 = table(2, ReturnPath::Routed);
    let data = testkit::client_frame(
        a(CLIENT),
        40_000,
        a(VIP),
        81,
        L4Spec::Tcp(Tcp::ack(2, 2)),
        b"x",
    );
    let (_, out) = run(&mut w, NOW, &gen2, &data);
    assert_eq!((wire(&out).src, wire(&out).sport), (seen.src, seen.sport));
    let (v, back) = run(&mut w, NOW, &gen2, &reply_to(&seen, Proto::Tcp, b""));
    assert_eq!(forwarded(v, Side::Client), a(CLIENT));
    assert_eq!((wire(&back).src, wire(&back).dport), (a(VIP), 40_000));
    let new = testkit::client_frame(a(CLIENT), 40_001, a(VIP), 81, L4Spec::Tcp(Tcp::syn(1)), b"");
    let (_, out) = run(&mut w, NOW, &gen2, &new);
    assert_eq!(
        (wire(&out).src, wire(&out).sport),
        (a(CLIENT), 40_001),
        "a new flow is routed"
    );
}

fn client_addr() -> impl Strategy<Value = (Addr16, Addr16, Addr16, u16)> {
    prop_oneof![
        (1u8..=254, 1u8..=254).prop_map(|(x, y)| (a(&format!("198.18.{x}.{y}")), a(VIP), a(GW), 0)),
        any::<u16>().prop_map(|x| (a(&format!("2001:2:9::{x:x}")), a(VIP6), a(GW6), 1)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Source NAT then reverse NAT: the backend sees the gateway, every
    /// checksum holds both ways, and the reply restores the original tuple
    /// exactly; an ICMP error about the forwarded packet reaches the client
    /// quoting the client's own packet, and one about the reply reaches the
    /// backend quoting its own.
    #[test]
    fn snat_round_trip_restores_the_tuple(
        (client, vip, gw, fam) in client_addr(),
        cport in 1u16..,
        udp in any::<bool>(),
        len in 0usize..600,
    ) {
        let t = table(1, ReturnPath::Snat);
        let ct = conntrack(Timeouts::default());
        let mut w = worker(&ct, ports(1024, 29_999));
        let (proto, vport) = if udp { (Proto::Udp, 53) } else { (Proto::Tcp, 80) };
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let req = testkit::client_frame(client, cport, vip, vport, l4(proto, Tcp::syn(5)), &payload);
        let (v, out) = run(&mut w, NOW, &t, &req);
        let backend = forwarded(v, Side::Backend);
        let seen = wire(&out);
        prop_assert_eq!(seen.src, gw);
        prop_assert_eq!(seen.dst, backend);
        prop_assert!((1024..=29_999).contains(&seen.sport));
        prop_assert_eq!(&seen.payload, &payload);
        let (v, back) = run(&mut w, NOW, &t, &reply_to(&seen, proto, &payload));
        prop_assert_eq!(forwarded(v, Side::Client), client);
        let got = wire(&back);
        prop_assert_eq!((got.src, got.sport, got.dst, got.dport), (vip, vport, client, cport));
        if fam == 0 {
            // ICMP about the forwarded packet, from the backend.
            let err = testkit::icmp_error(backend, gw, (3, 3, [0; 4]), &out, 28);
            let (v, e) = run(&mut w, NOW, &t, &err);
            prop_assert_eq!(forwarded(v, Side::Client), client);
            let e = wire(&e);
            prop_assert_eq!((e.src, e.dst), (vip, client));
            prop_assert_eq!(quoted(&e), (client, cport, vip, vport));
            // ICMP about the reply, from the client.
            let err = testkit::icmp_error(client, vip, (3, 3, [0; 4]), &back, 28);
            let (v, e) = run(&mut w, NOW, &t, &err);
            prop_assert_eq!(forwarded(v, Side::Backend), backend);
            let e = wire(&e);
            prop_assert_eq!((e.src, e.dst), (gw, backend));
            prop_assert_eq!(quoted(&e), (backend, seen.dport, gw, seen.sport));
        }
    }
}
