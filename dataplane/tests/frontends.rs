//! Every way into a Service through the pure core: node ports on the node's
//! addresses (with the I/O layer's node addresses and without), external and
//! load-balancer IPs, `loadBalancerSourceRanges`, the reverse NAT of a node
//! port's replies under source NAT and routed, and
//! `internalTrafficPolicy: Local` (the client's node's backends only), over
//! IPv4 and IPv6. What comes out is checked as a user would on the wire:
//! addresses, ports, every checksum ([`testkit::wire`]), the exact backend,
//! the verdict and its counter.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::net::IpAddr;
use std::sync::Arc;

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack, Timeouts};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::pipeline::{DropReason, NodeAddrs, Side, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, ReturnConfig};
use clustergate_dataplane::table::{FrontendKind, ReturnPath, Table};
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp, Wire};
use clustergate_dataplane::time::Now;
use ipnet::IpNet;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn a(s: &str) -> Addr16 {
    addr16(ip(s))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Node 1's address; node 2's; an address in the node-port range that is
/// not a node's.
const NODE: &str = "198.18.0.11";
const NODE2: &str = "198.18.0.12";
const NOT_NODE: &str = "198.18.0.99";
/// Outside the node-port addresses (198.18.0.0/24).
const OUTSIDE_NP: &str = "198.18.7.7";
const NODE6: &str = "2001:2::11";
/// The Service "web": one backend, so every pick is known.
const CIP: &str = "198.19.0.10";
const EXT: &str = "198.19.8.1";
const LB: &str = "198.19.9.1";
const B1: &str = "198.18.64.21";
const NODE_PORT: u16 = 30080;
/// Clients: inside the load balancer's source ranges, and outside them
/// (and on no node).
const INSIDE: &str = "198.18.100.7";
const OUTSIDE: &str = "198.18.200.1";
/// The Service "local" (`internalTrafficPolicy: Local`): one backend on
/// node 1, one on node 2, none on node 3.
const LOCAL: &str = "198.19.0.20";
const BL1: &str = "198.18.64.31";
const BL2: &str = "198.18.65.32";
/// A node-local Service without endpoints.
const EMPTY: &str = "198.19.0.21";
const LB6: &str = "2001:2:100::9";
const B6: &str = "2001:2:1::1";
const CLIENT6_IN: &str = "2001:2:ff::7";
const CLIENT6_OUT: &str = "2001:2:fe::7";
/// The gateway's own addresses (source NAT).
const GW: &str = "198.18.2.1";
const GW6: &str = "2001:2:2::1";

const NOW: Now = Now(100_000_000_000);

/// Every frontend kind, all with return path `rp`.
fn spec(rp: ReturnPath, lb_ranges: &[&str]) -> TableSpec {
    let web = ServiceSpec::cluster_ip(
        ip(CIP),
        80,
        Proto::Tcp,
        vec![BackendSpec::ready(ip(B1), 8080).on_node(1)],
    )
    .with_return_path(rp);
    let mut lb = web.clone().with_kind(FrontendKind::LoadBalancer, ip(LB));
    lb.source_ranges = Some(lb_ranges.iter().map(|r| net(r)).collect());
    let mut local = ServiceSpec::cluster_ip(
        ip(LOCAL),
        80,
        Proto::Tcp,
        vec![
            BackendSpec::ready(ip(BL1), 8080).on_node(1),
            BackendSpec::ready(ip(BL2), 8080).on_node(2),
        ],
    )
    .with_return_path(rp);
    local.node_local = true;
    let mut empty = ServiceSpec::cluster_ip(ip(EMPTY), 80, Proto::Tcp, vec![]);
    empty.node_local = true;
    let web6 = ServiceSpec::cluster_ip(
        ip("2001:2:100::10"),
        80,
        Proto::Tcp,
        vec![BackendSpec::ready(ip(B6), 8080)],
    )
    .with_return_path(rp);
    let mut lb6 = web6.clone().with_kind(FrontendKind::LoadBalancer, ip(LB6));
    lb6.source_ranges = Some(vec![net("2001:2:ff::/64")]);
    let node_port = |s: &ServiceSpec, any: &str| {
        let mut np = s.clone().with_kind(FrontendKind::NodePort, ip(any));
        np.port = NODE_PORT;
        np
    };
    TableSpec {
        services: vec![
            web.clone(),
            node_port(&web, "0.0.0.0"),
            web.with_kind(FrontendKind::ExternalIp, ip(EXT)),
            lb,
            local,
            empty,
            node_port(&web6, "::"),
            web6,
            lb6,
        ],
        nodes: vec![
            (net("198.18.64.0/24"), 1),
            (net("198.18.0.11/32"), 1),
            (net("198.18.65.0/24"), 2),
            (net("198.18.0.12/32"), 2),
            (net("198.18.66.0/24"), 3),
        ],
        node_port_addresses: vec![net("198.18.0.0/24"), net("2001:2::/64")],
        policy: Default::default(),
    }
}

fn table_with(generation: u64, rp: ReturnPath, lb_ranges: &[&str]) -> Table {
    Table::build_full(generation, 0, &spec(rp, lb_ranges), DEFAULT_MAX_RING_SIZE).unwrap()
}

fn table(rp: ReturnPath) -> Table {
    table_with(1, rp, &["198.18.100.0/24", "198.18.101.0/24"])
}

/// The node's addresses as the I/O layer would know them.
#[derive(Debug)]
struct Addrs(Vec<Addr16>);

impl NodeAddrs for Addrs {
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        self.0.contains(addr)
    }
}

fn worker(node_addrs: Option<&[&str]>) -> Worker {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 4096,
        shards: 16,
        partitions: 1,
        affinity_capacity: 64,
        fragment_capacity: 64,
        timeouts: Timeouts::default(),
    }));
    let mut w = Worker::with_config(ct, ReturnConfig::default());
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(a(GW)),
        v6: Some(a(GW6)),
    })));
    w.set_node_addrs(
        node_addrs.map(|v| Arc::new(Addrs(v.iter().map(|s| a(s)).collect())) as Arc<dyn NodeAddrs>),
    );
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

fn syn(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    testkit::client_frame(
        a(src),
        sport,
        a(dst),
        dport,
        L4Spec::Tcp(Tcp::syn(100)),
        b"hello",
    )
}

/// A forward to the backend side: the backend, and what it sees.
fn to_backend(v: Verdict, out: &[u8]) -> (Addr16, Wire) {
    match v {
        Verdict::Forward { next_hop, .. } if next_hop.side == Side::Backend => {
            (next_hop.addr, wire(out))
        }
        other => panic!("expected a forward to a backend, got {other:?}"),
    }
}

/// The backend's SYN-ACK for what it received.
fn reply_to(seen: &Wire) -> Vec<u8> {
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
        L4Spec::Tcp(synack),
        b"world",
    )
}

/// A node port is served on the node's addresses within the node-port
/// addresses: with the I/O layer's addresses given, only on those; without
/// (`None`, as in replay), on every address within the node-port addresses.
/// A packet to a node port anywhere else, or to a port that is no node
/// port, is passed to the kernel.
#[test]
fn node_ports_are_served_on_the_nodes_addresses() {
    let t = table(ReturnPath::Routed);
    for (node_addrs, not_node_verdict_is_pass) in [(Some(&[NODE, NODE2][..]), true), (None, false)]
    {
        let mut w = worker(node_addrs);
        for (i, dst) in [NODE, NODE2].into_iter().enumerate() {
            let (v, out) = run(&mut w, &t, &syn(OUTSIDE, 40_000 + i as u16, dst, NODE_PORT));
            let (backend, seen) = to_backend(v, &out);
            assert_eq!(backend, a(B1));
            assert_eq!(
                (seen.src, seen.sport, seen.dst, seen.dport),
                (a(OUTSIDE), 40_000 + i as u16, a(B1), 8080),
                "{dst}: routed rewrites the destination only"
            );
            assert_eq!(seen.ttl, 63);
            assert_eq!(seen.payload, b"hello");
        }
        let (v, out) = run(&mut w, &t, &syn(OUTSIDE, 40_010, NOT_NODE, NODE_PORT));
        if not_node_verdict_is_pass {
            assert_eq!(v, Verdict::Pass, "{NOT_NODE} is not the node's");
            assert_eq!(out, syn(OUTSIDE, 40_010, NOT_NODE, NODE_PORT), "untouched");
        } else {
            assert_eq!(to_backend(v, &out).0, a(B1), "every address is the node's");
        }
        // Outside the node-port addresses, or not a node port: passed.
        for (dst, port) in [(OUTSIDE_NP, NODE_PORT), (NODE, 30_099), (NODE, 80)] {
            let frame = syn(OUTSIDE, 40_020, dst, port);
            let (v, out) = run(&mut w, &t, &frame);
            assert_eq!(v, Verdict::Pass, "{dst}:{port}");
            assert_eq!(out, frame);
        }
        // UDP to the TCP node port: passed.
        let udp = testkit::client_frame(a(OUTSIDE), 40_030, a(NODE), NODE_PORT, L4Spec::Udp, b"");
        assert_eq!(run(&mut w, &t, &udp).0, Verdict::Pass);
        assert_eq!(
            w.counters.new_flows,
            if not_node_verdict_is_pass { 2 } else { 3 }
        );
    }
}

/// External and load-balancer IPs are served like the cluster IP: the same
/// backend, the destination rewritten to it, every checksum right.
#[test]
fn external_and_load_balancer_ips_forward_like_the_cluster_ip() {
    let t = table(ReturnPath::Routed);
    let mut w = worker(None);
    for (i, dst) in [CIP, EXT, LB].into_iter().enumerate() {
        let sport = 41_000 + i as u16;
        let (v, out) = run(&mut w, &t, &syn(INSIDE, sport, dst, 80));
        let (backend, seen) = to_backend(v, &out);
        assert_eq!(backend, a(B1), "{dst}");
        assert_eq!(
            (seen.src, seen.sport, seen.dst, seen.dport),
            (a(INSIDE), sport, a(B1), 8080),
            "{dst}"
        );
        let (v, back) = run(&mut w, &t, &reply_to(&seen));
        assert!(
            matches!(v, Verdict::Forward { next_hop, .. } if next_hop.side == Side::Client && next_hop.addr == a(INSIDE)),
            "{v:?}"
        );
        let got = wire(&back);
        assert_eq!(
            (got.src, got.sport, got.dst, got.dport),
            (a(dst), 80, a(INSIDE), sport),
            "the reply comes from {dst}"
        );
    }
    assert_eq!(w.counters.new_flows, 3);
    assert_eq!(w.counters.replies, 3);
}

/// A load-balancer IP with source ranges takes new flows only from inside
/// them (outside: dropped and counted as `source_range`); the same
/// Service's cluster IP stays open. The ranges apply to new flows only: a
/// flow opened while its client was inside keeps going when a new table
/// leaves it outside.
#[test]
fn source_ranges_close_the_load_balancer_ip_to_new_flows_from_outside() {
    let t = table(ReturnPath::Routed);
    let mut w = worker(None);
    let (v, out) = run(&mut w, &t, &syn(OUTSIDE, 42_000, LB, 80));
    assert_eq!(v, Verdict::Drop(DropReason::SourceRange));
    assert_eq!(w.counters.dropped(DropReason::SourceRange), 1);
    assert_eq!(out.len(), syn(OUTSIDE, 42_000, LB, 80).len());
    let (v, out) = run(&mut w, &t, &syn(INSIDE, 42_001, LB, 80));
    assert_eq!(to_backend(v, &out).0, a(B1));
    let (v, out) = run(&mut w, &t, &syn(OUTSIDE, 42_002, CIP, 80));
    assert_eq!(to_backend(v, &out).0, a(B1), "the cluster IP has no ranges");
    let (v, out) = run(&mut w, &t, &syn("198.18.101.200", 42_003, LB, 80));
    assert_eq!(to_backend(v, &out).0, a(B1), "the second range");
    assert_eq!(w.counters.dropped(DropReason::SourceRange), 1);
    assert_eq!(w.counters.new_flows, 3);

    // Generation 2 drops INSIDE's range: its open flow goes on, a new one
    // is dropped.
    let t2 = table_with(2, ReturnPath::Routed, &["198.18.101.0/24"]);
    let ack = testkit::client_frame(
        a(INSIDE),
        42_001,
        a(LB),
        80,
        L4Spec::Tcp(Tcp::ack(101, 7001)),
        b"more",
    );
    let (v, out) = run(&mut w, &t2, &ack);
    let (backend, seen) = to_backend(v, &out);
    assert_eq!(
        (backend, seen.dport, seen.payload.as_slice()),
        (a(B1), 8080, &b"more"[..])
    );
    let (v, _) = run(&mut w, &t2, &syn(INSIDE, 42_004, LB, 80));
    assert_eq!(v, Verdict::Drop(DropReason::SourceRange));
    assert_eq!(w.counters.dropped(DropReason::SourceRange), 2);

    // No ranges at all (`Some(empty)`): closed to everyone.
    let t3 = table_with(3, ReturnPath::Routed, &[]);
    let (v, _) = run(&mut w, &t3, &syn("198.18.101.200", 42_005, LB, 80));
    assert_eq!(v, Verdict::Drop(DropReason::SourceRange));
}

/// The reply of a node-port flow goes back to the client from the node's
/// address and the node port, under source NAT (the backend sees the
/// gateway) and under routed (the backend sees the client), IPv4 and IPv6.
#[test]
fn node_port_replies_come_back_from_the_node_port() {
    for rp in [ReturnPath::Snat, ReturnPath::Routed] {
        let t = table(rp);
        let mut w = worker(Some(&[NODE, NODE6]));
        for (client, node, backend, gw) in [(OUTSIDE, NODE, B1, GW), (CLIENT6_OUT, NODE6, B6, GW6)]
        {
            let (v, out) = run(&mut w, &t, &syn(client, 43_000, node, NODE_PORT));
            let (b, seen) = to_backend(v, &out);
            assert_eq!((b, seen.dst, seen.dport), (a(backend), a(backend), 8080));
            match rp {
                ReturnPath::Snat => {
                    assert_eq!(seen.src, a(gw), "{rp}: the backend sees the gateway");
                    assert_ne!(seen.sport, 43_000);
                }
                _ => assert_eq!((seen.src, seen.sport), (a(client), 43_000), "{rp}"),
            }
            let reply = reply_to(&seen);
            let (v, back) = run(&mut w, &t, &reply);
            assert!(
                matches!(v, Verdict::Forward { next_hop, .. } if next_hop.side == Side::Client && next_hop.addr == a(client)),
                "{rp} {client}: {v:?}"
            );
            // wire() verified the IP and TCP checksums in full.
            let got = wire(&back);
            assert_eq!(
                (got.src, got.sport, got.dst, got.dport),
                (a(node), NODE_PORT, a(client), 43_000),
                "{rp} {client}: the client sees the node port"
            );
            assert_eq!(got.payload, b"world");
            assert_eq!(got.tcp_flags, (true, true, false, false));
            assert_eq!(got.ack, 101);
            assert_eq!(got.ttl, 63);
            // The bytes themselves: the source address and port, in place.
            if node == NODE {
                assert_eq!(back[14 + 12..14 + 16], [198, 18, 0, 11]);
                assert_eq!(back[14 + 16..14 + 20], [198, 18, 200, 1]);
                assert_eq!(back[34..36], NODE_PORT.to_be_bytes());
                assert_eq!(back[36..38], 43_000u16.to_be_bytes());
            } else {
                assert_eq!(back[14 + 8..14 + 24], a(NODE6));
                assert_eq!(back[54..56], NODE_PORT.to_be_bytes());
            }
            assert_eq!(back.len(), reply.len(), "same length");
        }
        assert_eq!(w.counters.replies, 2, "{rp}");
    }
}

/// `internalTrafficPolicy: Local`: a client's new flows go to its own
/// node's backends only, the node found by pod CIDR or by node address; a
/// client on a node without endpoints, or on no known node, is dropped
/// (`no_local_endpoint`); a Service without endpoints rejects.
#[test]
fn node_local_picks_the_clients_nodes_backends() {
    let t = table(ReturnPath::Routed);
    let mut w = worker(None);
    let mut port = 44_000;
    for (client, want) in [
        ("198.18.64.5", BL1),
        ("198.18.64.200", BL1),
        (NODE, BL1),
        ("198.18.65.5", BL2),
        (NODE2, BL2),
    ] {
        for _ in 0..20 {
            port += 1;
            let (v, out) = run(&mut w, &t, &syn(client, port, LOCAL, 80));
            let (b, seen) = to_backend(v, &out);
            assert_eq!(b, a(want), "{client}:{port}");
            assert_eq!((seen.src, seen.dst, seen.dport), (a(client), a(want), 8080));
        }
    }
    assert_eq!(w.counters.new_flows, 100);
    for (i, client) in ["198.18.66.5", OUTSIDE, NOT_NODE].into_iter().enumerate() {
        let (v, _) = run(&mut w, &t, &syn(client, 45_000, LOCAL, 80));
        assert_eq!(v, Verdict::Drop(DropReason::NoLocalEndpoint), "{client}");
        assert_eq!(
            w.counters.dropped(DropReason::NoLocalEndpoint),
            i as u64 + 1
        );
    }
    // No endpoints at all: rejected (a TCP reset from the frontend).
    let (v, out) = run(&mut w, &t, &syn("198.18.64.5", 45_001, EMPTY, 80));
    assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
    let rst = wire(&out);
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport),
        (a(EMPTY), 80, a("198.18.64.5"), 45_001)
    );
    assert!(rst.tcp_flags.3, "a reset");
    assert_eq!(w.counters.dropped(DropReason::NoLocalEndpoint), 3);
    assert_eq!(w.counters.new_flows, 100);
}

/// IPv6: the node port on the node's IPv6 address only, the load-balancer
/// IP's source ranges, and the IPv4 node port never taken for IPv6.
#[test]
fn ipv6_node_ports_and_source_ranges() {
    let t = table(ReturnPath::Routed);
    let mut w = worker(Some(&[NODE, NODE6]));
    let (v, out) = run(&mut w, &t, &syn(CLIENT6_OUT, 46_000, NODE6, NODE_PORT));
    let (b, seen) = to_backend(v, &out);
    assert_eq!(
        (b, seen.src, seen.dst, seen.dport),
        (a(B6), a(CLIENT6_OUT), a(B6), 8080)
    );
    assert_eq!(seen.ttl, 63);
    // Another address in 2001:2::/64 that is not the node's: passed.
    let (v, _) = run(
        &mut w,
        &t,
        &syn(CLIENT6_OUT, 46_001, "2001:2::12", NODE_PORT),
    );
    assert_eq!(v, Verdict::Pass);
    // Outside the IPv6 node-port addresses, even when given as the node's.
    let mut w2 = worker(Some(&["2001:2:0:1::11"]));
    let (v, _) = run(
        &mut w2,
        &t,
        &syn(CLIENT6_OUT, 46_002, "2001:2:0:1::11", NODE_PORT),
    );
    assert_eq!(v, Verdict::Pass);

    let (v, _) = run(&mut w, &t, &syn(CLIENT6_OUT, 46_003, LB6, 80));
    assert_eq!(v, Verdict::Drop(DropReason::SourceRange));
    let (v, out) = run(&mut w, &t, &syn(CLIENT6_IN, 46_004, LB6, 80));
    let (b, seen) = to_backend(v, &out);
    assert_eq!((b, seen.src, seen.dst), (a(B6), a(CLIENT6_IN), a(B6)));
    let (v, out) = run(&mut w, &t, &syn(CLIENT6_OUT, 46_005, "2001:2:100::10", 80));
    assert_eq!(
        to_backend(v, &out).0,
        a(B6),
        "the IPv6 cluster IP stays open"
    );
    assert_eq!(w.counters.dropped(DropReason::SourceRange), 1);
    assert_eq!(w.counters.new_flows, 3);
}
