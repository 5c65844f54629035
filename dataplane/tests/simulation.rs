//! In-memory simulation: a client, the gateway (two workers sharing one
//! conntrack) and three backends, driven with a fake clock.
//!
//! Every step checks what a user would check on the wire: which backend got the
//! packet, the rewritten addresses and ports, and checksums recomputed in full.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::net::IpAddr;
use std::sync::Arc;

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack, Timeouts};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::packet::checksum;
use clustergate_dataplane::pipeline::{DropReason, Side, Verdict, Worker};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp};
use clustergate_dataplane::time::Now;

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

const VIP: &str = "198.19.0.10";
const VIP_AFFINITY: &str = "198.19.0.11";
const VIP_EMPTY: &str = "198.19.0.12";
const CLIENT: &str = "198.18.0.1";
const B: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];

fn backends(list: &[&str], port: u16) -> Vec<BackendSpec> {
    list.iter()
        .map(|b| BackendSpec::ready(b.parse().unwrap(), port))
        .collect()
}

fn services(list: &[&str]) -> Vec<ServiceSpec> {
    let mut affinity = ServiceSpec::cluster_ip(
        VIP_AFFINITY.parse().unwrap(),
        80,
        Proto::Tcp,
        backends(list, 8080),
    );
    affinity.affinity_timeout_s = Some(60);
    vec![
        ServiceSpec::cluster_ip(VIP.parse().unwrap(), 80, Proto::Tcp, backends(list, 8080)),
        ServiceSpec::cluster_ip(VIP.parse().unwrap(), 53, Proto::Udp, backends(list, 5353)),
        affinity,
        ServiceSpec::cluster_ip(VIP_EMPTY.parse().unwrap(), 80, Proto::Tcp, vec![]),
        ServiceSpec::cluster_ip(VIP_EMPTY.parse().unwrap(), 53, Proto::Udp, vec![]),
    ]
}

/// The gateway: two workers over one conntrack, and the current table.
struct Gateway {
    workers: [Worker; 2],
    table: Table,
}

/// What came out of the gateway.
#[derive(Debug)]
struct Out {
    verdict: Verdict,
    frame: Vec<u8>,
}

impl Gateway {
    fn new(table: Table) -> Self {
        let ct = Arc::new(Conntrack::new(&Config {
            capacity: 4096,
            shards: 8,
            partitions: 1,
            ..Config::default()
        }));
        Self {
            workers: [Worker::new(Arc::clone(&ct)), Worker::new(ct)],
            table,
        }
    }

    fn send(&mut self, worker: usize, now: Now, frame: &[u8]) -> Out {
        let (mut buf, len) = testkit::to_buf(frame);
        let verdict = self.workers[worker].process(now, &self.table, &mut buf, len);
        let out_len = match verdict {
            Verdict::Forward { len, .. } | Verdict::Reject { len } => len,
            _ => len,
        };
        buf.truncate(out_len);
        Out {
            verdict,
            frame: buf,
        }
    }
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, f: Tcp, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(a(src), sport, a(dst), dport, L4Spec::Tcp(f), payload)
}

fn forwarded_to(o: &Out) -> Addr16 {
    match o.verdict {
        Verdict::Forward { next_hop, .. } => {
            assert_eq!(next_hop.side, Side::Backend);
            next_hop.addr
        }
        v => panic!("expected a forward to a backend, got {v:?}"),
    }
}

fn backend_name(x: Addr16) -> &'static str {
    B.iter().copied().find(|b| a(b) == x).unwrap_or("?")
}

#[test]
fn tcp_handshake_data_and_fin_with_replies_on_the_other_worker() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B)).unwrap());
    let t0 = Now::from_secs(1000);

    // SYN on worker 0.
    let syn = gw.send(0, t0, &tcp(CLIENT, 40000, VIP, 80, Tcp::syn(100), b""));
    let backend = forwarded_to(&syn);
    let w = wire(&syn.frame);
    assert_eq!((w.src, w.sport), (a(CLIENT), 40000), "source preserved");
    assert_eq!(
        (w.dst, w.dport),
        (backend, 8080),
        "destination is the backend"
    );
    assert_eq!(syn.frame[22], 63, "TTL decremented");

    // SYN-ACK from the backend, handled by worker 1.
    let synack = Tcp {
        syn: true,
        ack: Some(101),
        seq: 5000,
        ..Tcp::default()
    };
    let back = gw.send(
        1,
        t0,
        &tcp(backend_name(backend), 8080, CLIENT, 40000, synack, b""),
    );
    match back.verdict {
        Verdict::Forward { next_hop, .. } => {
            assert_eq!(next_hop.side, Side::Client);
            assert_eq!(next_hop.addr, a(CLIENT));
        }
        v => panic!("reply not forwarded: {v:?}"),
    }
    let w = wire(&back.frame);
    assert_eq!(
        (w.src, w.sport),
        (a(VIP), 80),
        "reply comes from the service"
    );
    assert_eq!((w.dst, w.dport), (a(CLIENT), 40000));
    assert_eq!(w.seq, 5000);

    // Data both ways, alternating workers; every segment reaches the same backend.
    for i in 0..10u32 {
        let d = gw.send(
            (i % 2) as usize,
            t0.plus_secs(u64::from(i)),
            &tcp(
                CLIENT,
                40000,
                VIP,
                80,
                Tcp::ack(101 + i * 5, 5001),
                b"hello",
            ),
        );
        assert_eq!(forwarded_to(&d), backend);
        let w = wire(&d.frame);
        assert_eq!(w.dport, 8080);
    }

    // FIN from the client, FIN from the backend, last ACK.
    let fin = Tcp {
        fin: true,
        ack: Some(5001),
        seq: 151,
        ..Tcp::default()
    };
    assert_eq!(
        forwarded_to(&gw.send(0, t0, &tcp(CLIENT, 40000, VIP, 80, fin, b""))),
        backend
    );
    let bfin = Tcp {
        fin: true,
        ack: Some(152),
        seq: 5001,
        ..Tcp::default()
    };
    let o = gw.send(
        1,
        t0,
        &tcp(backend_name(backend), 8080, CLIENT, 40000, bfin, b""),
    );
    assert!(wire(&o.frame).tcp_flags.2, "FIN delivered");
    assert_eq!(
        forwarded_to(&gw.send(
            0,
            t0,
            &tcp(CLIENT, 40000, VIP, 80, Tcp::ack(152, 5002), b"")
        )),
        backend
    );

    // After the FIN timeout the flow is gone: a late reply is not ours any more.
    let late = gw.send(
        1,
        t0.plus_secs(121),
        &tcp(
            backend_name(backend),
            8080,
            CLIENT,
            40000,
            Tcp::ack(5002, 152),
            b"",
        ),
    );
    assert_eq!(late.verdict, Verdict::Pass);

    let c0 = &gw.workers[0].counters;
    let c1 = &gw.workers[1].counters;
    assert_eq!(c0.new_flows + c1.new_flows, 1, "one connection, one flow");
    assert_eq!(c1.replies, 2);
}

#[test]
fn udp_request_and_reply() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B)).unwrap());
    let now = Now::from_secs(5);
    let q = gw.send(
        0,
        now,
        &testkit::client_frame(a(CLIENT), 5000, a(VIP), 53, L4Spec::Udp, b"query"),
    );
    let backend = forwarded_to(&q);
    let w = wire(&q.frame);
    assert_eq!(
        (w.dst, w.dport, w.src, w.sport),
        (backend, 5353, a(CLIENT), 5000)
    );
    let r = gw.send(
        1,
        now,
        &testkit::client_frame(backend, 5353, a(CLIENT), 5000, L4Spec::Udp, b"answer"),
    );
    let w = wire(&r.frame);
    assert_eq!(
        (w.src, w.sport, w.dst, w.dport),
        (a(VIP), 53, a(CLIENT), 5000)
    );
    // Unreplied UDP lives 30 s; answered and two seconds old, 120 s (a
    // lone query and answer keep the 30 s, as in Linux).
    let q2 = testkit::client_frame(a(CLIENT), 5000, a(VIP), 53, L4Spec::Udp, b"q2");
    assert_eq!(forwarded_to(&gw.send(0, now.plus_secs(29), &q2)), backend);
    let a2 = testkit::client_frame(backend, 5353, a(CLIENT), 5000, L4Spec::Udp, b"a2");
    assert_eq!(wire(&gw.send(1, now.plus_secs(29), &a2).frame).src, a(VIP));
    let again = gw.send(0, now.plus_secs(128), &q2);
    assert_eq!(forwarded_to(&again), backend);
    assert_eq!(gw.workers[0].counters.new_flows, 1);
}

/// Opens `n` flows from distinct client ports; returns each flow's backend.
fn open_flows(gw: &mut Gateway, now: Now, n: u16) -> Vec<Addr16> {
    (0..n)
        .map(|i| {
            let o = gw.send(
                usize::from(i % 2),
                now,
                &tcp(CLIENT, 10000 + i, VIP, 80, Tcp::syn(1), b""),
            );
            let b = forwarded_to(&o);
            let back = gw.send(
                usize::from((i + 1) % 2),
                now,
                &tcp(
                    backend_name(b),
                    8080,
                    CLIENT,
                    10000 + i,
                    Tcp {
                        syn: true,
                        ack: Some(2),
                        seq: 9,
                        ..Tcp::default()
                    },
                    b"",
                ),
            );
            assert!(matches!(back.verdict, Verdict::Forward { .. }));
            b
        })
        .collect()
}

fn data_backend(gw: &mut Gateway, now: Now, i: u16) -> Addr16 {
    forwarded_to(&gw.send(
        usize::from(i % 2),
        now,
        &tcp(CLIENT, 10000 + i, VIP, 80, Tcp::ack(2, 10), b"x"),
    ))
}

#[test]
fn table_swap_keeps_established_flows() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B[..2])).unwrap());
    let now = Now::from_secs(10);
    let before = open_flows(&mut gw, now, 300);
    // Generation 2 adds a third backend: Maglev would move about a third of
    // new flows to it, but established flows stay where they are.
    gw.table = Table::build(2, 0, &services(&B)).unwrap();
    for i in 0..300u16 {
        assert_eq!(
            data_backend(&mut gw, now, i),
            before[i as usize],
            "flow {i} kept its backend"
        );
    }
    // New connections do use the new backend.
    let fresh: Vec<Addr16> = (0..300u16)
        .map(|i| {
            forwarded_to(&gw.send(
                0,
                now,
                &tcp("198.18.0.2", 20000 + i, VIP, 80, Tcp::syn(1), b""),
            ))
        })
        .collect();
    assert!(
        fresh.contains(&a(B[2])),
        "new flows reach the added backend"
    );
}

#[test]
fn removing_a_backend_keeps_its_tcp_connections_until_they_close() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B)).unwrap());
    let now = Now::from_secs(10);
    let before = open_flows(&mut gw, now, 300);
    let removed = a(B[1]);
    assert!(before.contains(&removed));
    gw.table = Table::build(2, 0, &services(&[B[0], B[2]])).unwrap();
    // Established connections keep their backend, even the removed one (as
    // Linux conntrack keeps kube-proxy's DNAT).
    for i in 0..300u16 {
        assert_eq!(
            data_backend(&mut gw, now, i),
            before[i as usize],
            "flow {i} kept its backend"
        );
    }
    let c = gw.workers[0].counters.flows_moved + gw.workers[1].counters.flows_moved;
    assert_eq!(c, 0, "no established TCP connection moved");
    // Replies from the removed backend are still reverse-NATed.
    let i = before.iter().position(|b| *b == removed).unwrap() as u16;
    let r = gw.send(
        1,
        now,
        &tcp(B[1], 8080, CLIENT, 10000 + i, Tcp::ack(10, 3), b""),
    );
    assert!(matches!(r.verdict, Verdict::Forward { .. }), "{r:?}");
    assert_eq!(wire(&r.frame).src, a(VIP));
    // The client resets it; a new connection on the same tuple goes to a
    // backend still in the table, and the old binding is gone.
    let rst = Tcp {
        rst: true,
        ..Tcp::ack(3, 10)
    };
    let o = gw.send(0, now, &tcp(CLIENT, 10000 + i, VIP, 80, rst, b""));
    assert_eq!(forwarded_to(&o), removed, "the RST reaches the backend");
    let again = gw.send(0, now, &tcp(CLIENT, 10000 + i, VIP, 80, Tcp::syn(50), b""));
    let new_b = forwarded_to(&again);
    assert_ne!(
        new_b, removed,
        "a new connection never picks a removed backend"
    );
    let stale = gw.send(
        1,
        now,
        &tcp(B[1], 8080, CLIENT, 10000 + i, Tcp::ack(10, 3), b""),
    );
    assert_eq!(
        stale.verdict,
        Verdict::Pass,
        "the removed backend's binding is gone"
    );
}

#[test]
fn client_ip_affinity_and_its_timeout() {
    // Generation 1 has two backends; find a client whose affinity pick changes
    // once a third backend arrives, so that the timeout is observable.
    let t1 = Table::build(1, 0, &services(&B[..2])).unwrap();
    let t2 = Table::build(2, 0, &services(&B)).unwrap();
    let (client, first, later) = (2..=250u8)
        .find_map(|x| {
            let c = format!("198.18.0.{x}");
            let mut g1 = Gateway::new(Table::build(1, 0, &services(&B[..2])).unwrap());
            let mut g2 = Gateway::new(Table::build(2, 0, &services(&B)).unwrap());
            let b1 =
                forwarded_to(&g1.send(0, Now(0), &tcp(&c, 1, VIP_AFFINITY, 80, Tcp::syn(1), b"")));
            let b2 =
                forwarded_to(&g2.send(0, Now(0), &tcp(&c, 1, VIP_AFFINITY, 80, Tcp::syn(1), b"")));
            (b1 != b2).then_some((c, b1, b2))
        })
        .expect("some client's pick changes");
    let mut gw = Gateway::new(t1);
    let t0 = Now::from_secs(100);
    // Every connection of this client, on either worker, goes to one backend.
    for p in 0..20u16 {
        let o = gw.send(
            usize::from(p % 2),
            t0,
            &tcp(&client, 30000 + p, VIP_AFFINITY, 80, Tcp::syn(1), b""),
        );
        assert_eq!(forwarded_to(&o), first);
    }
    // The table changes; within the timeout new connections still stick.
    gw.table = t2;
    let o = gw.send(
        0,
        t0.plus_secs(59),
        &tcp(&client, 31000, VIP_AFFINITY, 80, Tcp::syn(1), b""),
    );
    assert_eq!(
        forwarded_to(&o),
        first,
        "affinity holds within timeoutSeconds"
    );
    assert!(gw.workers[0].counters.affinity_hits > 0);
    // 60 s after the last new connection, affinity has expired: Maglev decides.
    let o = gw.send(
        1,
        t0.plus_secs(59 + 60),
        &tcp(&client, 31001, VIP_AFFINITY, 80, Tcp::syn(1), b""),
    );
    assert_eq!(
        forwarded_to(&o),
        later,
        "after the timeout the new pick applies"
    );
}

#[test]
fn no_endpoints_gives_rejects() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B)).unwrap());
    let now = Now::from_secs(1);
    let o = gw.send(
        0,
        now,
        &tcp(CLIENT, 40001, VIP_EMPTY, 80, Tcp::syn(777), b""),
    );
    assert_eq!(o.verdict, Verdict::Reject { len: 54 });
    assert_eq!(
        &o.frame[0..6],
        &testkit::CLIENT_MAC,
        "back to the sender's MAC"
    );
    let w = wire(&o.frame);
    assert_eq!(
        (w.src, w.sport, w.dst, w.dport),
        (a(VIP_EMPTY), 80, a(CLIENT), 40001)
    );
    assert_eq!(w.tcp_flags, (false, true, false, true), "RST|ACK");
    assert_eq!((w.seq, w.ack), (0, 778));

    let udp = testkit::client_frame(a(CLIENT), 5001, a(VIP_EMPTY), 53, L4Spec::Udp, b"query");
    let o = gw.send(1, now, &udp);
    assert!(matches!(o.verdict, Verdict::Reject { .. }));
    let w = wire(&o.frame);
    assert_eq!((w.src, w.dst), (a(VIP_EMPTY), a(CLIENT)));
    assert_eq!(
        w.seq,
        3 << 8 | 3,
        "ICMP destination unreachable, port unreachable"
    );
    assert_eq!(
        &o.frame[14 + 28..],
        &udp[14..],
        "the whole offending packet is quoted"
    );

    // A RST is never answered.
    let rst = Tcp {
        rst: true,
        seq: 5,
        ..Tcp::default()
    };
    assert_eq!(
        gw.send(0, now, &tcp(CLIENT, 40002, VIP_EMPTY, 80, rst, b""))
            .verdict,
        Verdict::Drop(DropReason::NoEndpoints)
    );
}

#[test]
fn icmp_frag_needed_follows_its_flow_both_ways() {
    let mut gw = Gateway::new(Table::build(1, 0, &services(&B)).unwrap());
    let now = Now::from_secs(1);
    let syn = gw.send(0, now, &tcp(CLIENT, 40000, VIP, 80, Tcp::syn(1), b""));
    let backend = forwarded_to(&syn);

    // 1. A router on the client's side cannot forward one of our replies
    //    (VIP:80 → client) and tells the VIP: the error must reach the backend
    //    that sent the reply, quoting the packet as the backend sent it.
    let reply_as_client_saw = tcp(VIP, 80, CLIENT, 40000, Tcp::ack(9, 2), &[0u8; 1400]);
    let mtu = [0, 0, 0x05, 0x00]; // next-hop MTU 1280
    let err = testkit::icmp_error(
        a("198.18.0.254"),
        a(VIP),
        (3, 4, mtu),
        &reply_as_client_saw,
        28,
    );
    let o = gw.send(1, now, &err);
    assert_eq!(forwarded_to(&o), backend);
    let w = wire(&o.frame);
    assert_eq!((w.src, w.dst), (a("198.18.0.254"), backend));
    let quoted = &o.frame[14 + 20 + 8..];
    assert_eq!(
        &quoted[12..16],
        &backend[12..16],
        "quoted source is the backend"
    );
    assert_eq!(
        u16::from_be_bytes([quoted[20], quoted[21]]),
        8080,
        "quoted source port is the backend's"
    );
    assert_eq!(
        checksum::ipv4_header_checksum(&quoted[..20]),
        u16::from_be_bytes([quoted[10], quoted[11]]),
        "quoted IPv4 checksum"
    );
    assert_eq!(&o.frame[14 + 20 + 4..14 + 20 + 8], &mtu, "MTU untouched");

    // 2. The backend itself cannot take a packet we forwarded (client → backend)
    //    and answers with frag-needed: the client must see it from the VIP,
    //    quoting the packet it sent to the VIP.
    let fwd_as_backend_saw = tcp(
        CLIENT,
        40000,
        backend_name(backend),
        8080,
        Tcp::ack(2, 9),
        &[0u8; 1400],
    );
    let err = testkit::icmp_error(backend, a(CLIENT), (3, 4, mtu), &fwd_as_backend_saw, 28);
    let o = gw.send(0, now, &err);
    match o.verdict {
        Verdict::Forward { next_hop, .. } => {
            assert_eq!((next_hop.side, next_hop.addr), (Side::Client, a(CLIENT)))
        }
        v => panic!("not forwarded: {v:?}"),
    }
    let w = wire(&o.frame);
    assert_eq!(
        (w.src, w.dst),
        (a(VIP), a(CLIENT)),
        "the error comes from the service address"
    );
    let quoted = &o.frame[14 + 20 + 8..];
    assert_eq!(
        &quoted[16..20],
        &a(VIP)[12..16],
        "quoted destination is the VIP"
    );
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 80);
    assert_eq!(
        gw.workers[0].counters.icmp_errors + gw.workers[1].counters.icmp_errors,
        2
    );

    // An ICMP error about a flow we never saw goes to the kernel.
    let unknown = tcp(VIP, 80, CLIENT, 49999, Tcp::ack(9, 2), b"");
    let err = testkit::icmp_error(a("198.18.0.254"), a(VIP), (3, 4, mtu), &unknown, 28);
    assert_eq!(gw.send(0, now, &err).verdict, Verdict::Pass);

    // A corrupt ICMP checksum is dropped, not laundered.
    let mut bad = testkit::icmp_error(
        a("198.18.0.254"),
        a(VIP),
        (3, 4, mtu),
        &reply_as_client_saw,
        28,
    );
    bad[14 + 20 + 2] ^= 0xff;
    assert_eq!(
        gw.send(0, now, &bad).verdict,
        Verdict::Drop(DropReason::IcmpMalformed)
    );
}

#[test]
fn idle_flows_expire_with_the_clock() {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 1024,
        shards: 4,
        partitions: 1,
        timeouts: Timeouts {
            tcp_syn: 5,
            ..Timeouts::default()
        },
        ..Config::default()
    }));
    let table = Table::build(1, 0, &services(&B)).unwrap();
    let mut w = Worker::new(Arc::clone(&ct));
    let f = tcp(CLIENT, 40000, VIP, 80, Tcp::syn(1), b"");
    let (mut buf, len) = testkit::to_buf(&f);
    assert!(matches!(
        w.process(Now::from_secs(0), &table, &mut buf, len),
        Verdict::Forward { .. }
    ));
    assert_eq!(ct.len(), 1);
    let mut cursor = 0;
    assert_eq!(ct.expire(Now::from_secs(4), &mut cursor, 4), 0);
    assert_eq!(ct.expire(Now::from_secs(5), &mut cursor, 4), 1);
    assert!(ct.is_empty());
}
