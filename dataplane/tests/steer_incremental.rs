//! The steering maps updated per frontend ([`Steering::sync`] after a
//! change to some frontends), against the kernel, as root.
//!
//! - `per_frontend_sync_leaves_the_maps_of_a_whole_sync`: the program is
//!   loaded, attached nowhere; a table of IPv4 and IPv6 Services and node
//!   ports is synced, then changed the ways a cluster changes it (one
//!   endpoint moved, a backend two frontends share dropped by one, a
//!   Service removed and one added as a delta applies them, a backend kept
//!   for its TCP connections, a node port's endpoints, the node's
//!   addresses, nothing). After each, the kernel's maps ([`MapDump`]) are
//!   those a freshly loaded program gets from one whole sync of the same
//!   table; [`SyncStats::added`] and [`SyncStats::removed`] count exactly the
//!   entries that differ from before; the sync says it looked only at the
//!   frontends that changed; and `BPF_PROG_TEST_RUN` shows the program
//!   steering the new backend's replies and passing the old one's.
//! - `one_endpoint_at_ten_thousand_services`: 10 000 Services × 10
//!   endpoints; moving one endpoint writes four entries (the new backend
//!   and its address in, the old ones out), per frontend, and also when a
//!   change of the node's addresses makes the sync whole; the maps end
//!   equal to a whole sync's. The median times of both kinds of sync are
//!   printed, not asserted (run it with `--release` for figures).
//!
//! Not root: skipped with a message, except under CI (CI runs as root, so a
//! skip there is a defect). No traffic: frames only go through
//! `BPF_PROG_TEST_RUN`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use clustergate_builder::table::{BackendSpec, Builder, RingSizes, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::io::steer::{
    Classified, MapDump, SteerKey, Steering, SyncScope, SyncStats, WholeSync,
};
use clustergate_dataplane::table::{FrontendKind, Table};
use clustergate_dataplane::testkit::{self, L4Spec};
use support::root_or_skip;

mod support;

const NEEDS: &str = "BPF programs and maps";
const SEED: u64 = 7;
const MAX_RING: u32 = 257;
const CLIENT: &str = "198.18.220.7";
const NODE: &str = "198.18.210.1";
const NODE6: &str = "2001:2::1";
const NODE_NEW: &str = "198.18.210.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn a16(s: &str) -> Addr16 {
    addr16(ip(s))
}

fn udp_key(addr: &str, port: u16) -> SteerKey {
    SteerKey {
        addr: a16(addr),
        port,
        proto: Proto::Udp as u8,
    }
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    testkit::client_frame(a16(src), sport, a16(dst), dport, L4Spec::Udp, b"hello")
}

/// A reply from backend `be` (port 8053) to the client.
fn reply(be: &str) -> Vec<u8> {
    udp(be, 8053, CLIENT, 5353)
}

fn be(addr: &str) -> BackendSpec {
    BackendSpec::ready(ip(addr), 8053)
}

/// 40 IPv4 and 10 IPv6 DNS Services of two endpoints each, and a UDP node
/// port on each family whose IPv4 endpoint is also Service 1's.
fn spec() -> TableSpec {
    let mut services = Vec::new();
    for i in 0..40 {
        services.push(ServiceSpec::cluster_ip(
            ip(&format!("198.18.211.{i}")),
            53,
            Proto::Udp,
            vec![
                be(&format!("198.18.212.{i}")),
                be(&format!("198.18.213.{i}")),
            ],
        ));
    }
    for i in 0..10 {
        services.push(ServiceSpec::cluster_ip(
            ip(&format!("2001:2::a:{i}")),
            53,
            Proto::Udp,
            vec![be(&format!("2001:2::b:{i}")), be(&format!("2001:2::c:{i}"))],
        ));
    }
    services.push(
        ServiceSpec::cluster_ip(ip("0.0.0.0"), 30053, Proto::Udp, vec![be("198.18.212.1")])
            .with_kind(FrontendKind::NodePort, ip("0.0.0.0")),
    );
    services.push(
        ServiceSpec::cluster_ip(ip("::"), 30053, Proto::Udp, vec![be("2001:2::b:1")])
            .with_kind(FrontendKind::NodePort, ip("::")),
    );
    TableSpec {
        services,
        nodes: vec![],
        node_port_addresses: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        policy: Default::default(),
    }
}

/// What a freshly loaded program's maps hold after one (whole) sync of
/// `table` with these node addresses and lingering backends.
fn whole(table: &Table, node: &[Addr16], lingering: &BTreeSet<SteerKey>) -> MapDump {
    let mut s = Steering::load(&[]).expect("load");
    s.set_node_addrs(node);
    s.set_lingering(lingering.clone());
    let st = s.sync(table).unwrap();
    assert_eq!(st.scope, SyncScope::Whole(WholeSync::First));
    s.dump().unwrap()
}

/// Entries of `a` that `b` lacks, over the four lookup maps.
fn missing(a: &MapDump, b: &MapDump) -> usize {
    fn n<K: Ord>(a: &[K], b: &[K]) -> usize {
        a.iter().filter(|k| b.binary_search(k).is_err()).count()
    }
    n(&a.frontends, &b.frontends)
        + n(&a.backends, &b.backends)
        + n(&a.vip_addrs, &b.vip_addrs)
        + n(&a.backend_addrs, &b.backend_addrs)
}

/// Syncs `table`, and checks that the maps are a whole sync's, that the
/// sync looked at `changed` frontends only, and that it counted exactly
/// the entries that changed. Returns the stats and the maps.
fn step(
    what: &str,
    steer: &mut Steering,
    table: &Table,
    node: &[Addr16],
    lingering: &BTreeSet<SteerKey>,
    before: &MapDump,
) -> (SyncStats, MapDump) {
    let st = steer.sync(table).unwrap();
    let after = steer.dump().unwrap();
    assert_eq!(
        after,
        whole(table, node, lingering),
        "{what}: the maps differ from a whole sync's"
    );
    assert_eq!(
        (st.added, st.removed),
        (missing(&after, before), missing(before, &after)),
        "{what}: added/removed must count only the entries that changed"
    );
    eprintln!("{what}: {st:?}");
    (st, after)
}

#[test]
fn per_frontend_sync_leaves_the_maps_of_a_whole_sync() {
    if !root_or_skip("per_frontend_sync_leaves_the_maps_of_a_whole_sync", NEEDS) {
        return;
    }
    use Classified::{Passed, Steered};
    let mut node = vec![a16(NODE), a16(NODE6)];
    let mut lingering = BTreeSet::new();
    let mut builder = Builder::new(SEED, MAX_RING, RingSizes::default());
    let mut steer = Steering::load(&[]).expect("load");
    steer.set_node_addrs(&node);

    let mut s = spec();
    let t1 = builder.build(1, &s).unwrap();
    let st = steer.sync(&t1).unwrap();
    assert_eq!(st.scope, SyncScope::Whole(WholeSync::First));
    let d1 = steer.dump().unwrap();
    assert_eq!(d1, whole(&t1, &node, &lingering));
    assert_eq!(st.added, missing(&d1, &MapDump::default()));
    assert_eq!(
        (st.frontends, st.node_port_keys, st.backends),
        (50 + 2, 2, 100)
    );
    assert_eq!(steer.classify(&reply("198.18.213.7")).unwrap(), Steered);
    assert_eq!(steer.classify(&reply("198.18.214.7")).unwrap(), Passed);

    // One endpoint of Service 7 moves to a new pod.
    s.services[7].backends[1] = be("198.18.214.7");
    let t2 = builder.build(2, &s).unwrap();
    let (st, d2) = step("moved endpoint", &mut steer, &t2, &node, &lingering, &d1);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 1 });
    assert_eq!(
        (st.added, st.removed),
        (2, 2),
        "backend key and address, each way"
    );
    assert!(d2.backends.contains(&udp_key("198.18.214.7", 8053)));
    assert_eq!(steer.classify(&reply("198.18.214.7")).unwrap(), Steered);
    assert_eq!(steer.classify(&reply("198.18.213.7")).unwrap(), Passed);

    // Service 1 drops the endpoint it shares with the IPv4 node port: its
    // key stays, for the node port.
    s.services[1].backends.remove(0);
    let t3 = builder.build(3, &s).unwrap();
    let (st, d3) = step("shared backend", &mut steer, &t3, &node, &lingering, &d2);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 1 });
    assert_eq!((st.added, st.removed), (0, 0));
    assert_eq!(steer.classify(&reply("198.18.212.1")).unwrap(), Steered);

    // Service 3 goes and a new one comes, as a delta: the new one is last.
    s.services.remove(3);
    s.services.push(ServiceSpec::cluster_ip(
        ip("198.18.211.250"),
        53,
        Proto::Udp,
        vec![be("198.18.215.1")],
    ));
    let full = builder.build(4, &s).unwrap();
    let t4 = t3.apply_delta(&full.delta_from(&t3).unwrap()).unwrap();
    assert_eq!(
        t4.frontends().iter().last().map(|f| f.addr),
        Some(a16("198.18.211.250"))
    );
    let (st, d4) = step("delta", &mut steer, &t4, &node, &lingering, &d3);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 2 });
    // In: frontend, VIP, backend, backend address; out: frontend, VIP, two
    // backends and their addresses.
    assert_eq!((st.added, st.removed), (4, 6));
    assert_eq!(
        steer
            .classify(&udp(CLIENT, 5353, "198.18.211.250", 53))
            .unwrap(),
        Steered
    );
    assert_eq!(
        steer
            .classify(&udp(CLIENT, 5353, "198.18.211.3", 53))
            .unwrap(),
        Passed
    );

    // A backend Service 3 had keeps a TCP connection: its replies stay
    // steered (on its protocol).
    lingering.insert(udp_key("198.18.213.3", 8053));
    assert!(steer.set_lingering(lingering.clone()));
    let (st, d5) = step("lingering", &mut steer, &t4, &node, &lingering, &d4);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 0 });
    assert_eq!((st.added, st.removed), (2, 0));
    assert_eq!(steer.classify(&reply("198.18.213.3")).unwrap(), Steered);

    // The IPv4 node port's endpoint moves.
    let np = s.services.len() - 3;
    assert_eq!(s.services[np].kind, FrontendKind::NodePort);
    s.services[np].backends = vec![be("198.18.216.1")];
    let t5 = builder.build(5, &s).unwrap();
    let (st, d6) = step("node port", &mut steer, &t5, &node, &lingering, &d5);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 1 });
    // 198.18.212.1 goes: Service 1 dropped it already.
    assert_eq!((st.added, st.removed), (2, 2));
    assert_eq!(steer.classify(&reply("198.18.216.1")).unwrap(), Steered);
    assert_eq!(steer.classify(&reply("198.18.212.1")).unwrap(), Passed);

    // The node gets an address: node ports are steered on it too (whole).
    node.push(a16(NODE_NEW));
    assert!(steer.set_node_addrs(&node));
    let (st, d7) = step("node address", &mut steer, &t5, &node, &lingering, &d6);
    assert_eq!(st.scope, SyncScope::Whole(WholeSync::NodePortAddresses));
    assert_eq!((st.added, st.removed, st.node_port_keys), (1, 0, 3));
    assert_eq!(
        steer.classify(&udp(CLIENT, 5353, NODE_NEW, 30053)).unwrap(),
        Steered
    );

    // The same table again: nothing looked at, nothing written.
    let (st, _) = step("same table", &mut steer, &t5, &node, &lingering, &d7);
    assert_eq!(st.scope, SyncScope::Frontends { changed: 0 });
    assert_eq!((st.added, st.removed), (0, 0));
}

#[test]
fn one_endpoint_at_ten_thousand_services() {
    if !root_or_skip("one_endpoint_at_ten_thousand_services", NEEDS) {
        return;
    }
    const SERVICES: usize = 10_000;
    const ENDPOINTS: usize = 10;
    const CHANGES: usize = 7;
    // 198.18.0.0/15 holds 131 072 addresses: VIPs from 198.18.0.0, pod
    // addresses from 198.18.64.0 (10 000 × 10 = 100 000 of them, up to
    // 198.19.198.x, then the moved ones).
    let nth =
        |base: u32, i: usize| -> IpAddr { IpAddr::V4(std::net::Ipv4Addr::from(base + i as u32)) };
    let vips = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0));
    let pods = u32::from(std::net::Ipv4Addr::new(198, 18, 64, 0));
    let mut s = TableSpec {
        services: (0..SERVICES)
            .map(|i| {
                ServiceSpec::cluster_ip(
                    nth(vips, i),
                    80,
                    Proto::Tcp,
                    (0..ENDPOINTS)
                        .map(|e| BackendSpec::ready(nth(pods, i * ENDPOINTS + e), 8080))
                        .collect(),
                )
            })
            .collect(),
        // No node port: a change of the node's addresses costs a whole
        // recompute and writes nothing (what every change cost before).
        node_port_addresses: vec!["198.18.0.0/15".parse().unwrap()],
        ..TableSpec::default()
    };
    let mut builder = Builder::new(SEED, MAX_RING, RingSizes::default());
    let mut table = builder.build(1, &s).unwrap();
    let mut steer = Steering::load(&[]).expect("load");
    let start = Instant::now();
    let st = steer.sync(&table).unwrap();
    let fill = start.elapsed();
    assert_eq!(st.scope, SyncScope::Whole(WholeSync::First));
    assert_eq!(
        (st.frontends, st.backends),
        (SERVICES, SERVICES * ENDPOINTS)
    );

    // Each change moves endpoint 3 of one Service to a pod address no one
    // had; every other one also changes the node's addresses, which makes
    // that sync whole.
    let mut per_frontend = Vec::new();
    let mut whole_syncs = Vec::new();
    for k in 0..2 * CHANGES {
        let svc = 1_000 * (k % 10) + 7 + k;
        let fresh = nth(pods, SERVICES * ENDPOINTS + k);
        s.services[svc].backends[3] = BackendSpec::ready(fresh, 8080);
        let next = match builder
            .update(2 + k as u64, &table, [(svc, &s.services[svc])])
            .unwrap()
        {
            clustergate_builder::table::Update::Table(t) => t,
            other => panic!("an endpoint change is in place: {other:?}"),
        };
        let force_whole = k % 2 == 1;
        if force_whole {
            let node = nth(vips, 60_000 + k);
            assert!(steer.set_node_addrs(&[addr16(node)]));
        }
        let start = Instant::now();
        let st = steer.sync(&next).unwrap();
        let took = start.elapsed();
        if force_whole {
            assert_eq!(st.scope, SyncScope::Whole(WholeSync::NodePortAddresses));
            whole_syncs.push(took);
        } else {
            assert_eq!(st.scope, SyncScope::Frontends { changed: 1 });
            per_frontend.push(took);
        }
        assert_eq!((st.added, st.removed), (2, 2), "change {k}");
        table = next;
    }
    let d = steer.dump().unwrap();
    assert_eq!(d.backend_addrs.len(), SERVICES * ENDPOINTS);
    let node: Vec<Addr16> = vec![addr16(nth(vips, 60_000 + 2 * CHANGES - 1))];
    assert_eq!(d, whole(&table, &node, &BTreeSet::new()));
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort_unstable();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (p, w) = (median(&mut per_frontend), median(&mut whole_syncs));
    eprintln!(
        "one_endpoint_at_ten_thousand_services: {SERVICES} services x {ENDPOINTS} endpoints; \
         fill {:.1} ms; one moved endpoint, median of {CHANGES}: per frontend {p:.3} ms, \
         whole recompute {w:.3} ms ({:.0}x)",
        fill.as_secs_f64() * 1e3,
        w / p
    );
}
