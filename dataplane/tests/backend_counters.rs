//! A worker's per-backend counters across table changes, and the copy the
//! metrics read: what an operator sees in `clustergate_backend_*` after
//! endpoints and Services changed.
//!
//! - A Service removed (the frontends move): every other frontend keeps
//!   its counts, at its new place.
//! - The readers' copy refreshed in parts, a bounded number of frontends
//!   per hand-off, is whole again after one pass and sums to the worker's
//!   counts; after the frontends moved it is copied whole at once, so that
//!   no frontend is counted at two places.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::table::{BackendSpec, Builder, RingSizes, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::pipeline::{BackendCount, BackendCounters, BackendKey};
use clustergate_dataplane::table::Table;

fn vip(i: u32) -> IpAddr {
    IpAddr::from([198, 19, 0, i as u8])
}

/// Service `i`'s backends: 198.18.i.1..=3, port `port`.
fn spec(services: &[u32], port_of: impl Fn(u32) -> u16) -> TableSpec {
    TableSpec {
        services: services
            .iter()
            .map(|&i| {
                ServiceSpec::cluster_ip(
                    vip(i),
                    80,
                    Proto::Tcp,
                    (1..=3)
                        .map(|b| {
                            BackendSpec::ready(IpAddr::from([198, 18, i as u8, b]), port_of(i))
                        })
                        .collect(),
                )
            })
            .collect(),
        ..TableSpec::default()
    }
}

fn fi(t: &Table, i: u32) -> u32 {
    t.frontend(&addr16(vip(i)), 80, Proto::Tcp).unwrap()
}

/// `n` of everything.
fn count(n: u64) -> BackendCount {
    BackendCount {
        new_flows: n,
        packets: n,
        bytes: n,
    }
}

/// Counts summed by key, as the metrics do.
fn sums(c: &BackendCounters) -> BTreeMap<BackendKey, BackendCount> {
    let mut m: BTreeMap<BackendKey, BackendCount> = BTreeMap::new();
    for (k, v) in c.iter() {
        m.entry(k).or_default().add(&v);
    }
    m
}

#[test]
fn counts_survive_a_service_removed_at_their_new_place() {
    let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let t1 = builder.build(1, &spec(&[0, 1, 2, 3], |_| 8080)).unwrap();
    let mut counters = BackendCounters::default();
    assert!(counters.follow(&t1));
    for i in 0..4 {
        *counters.get_mut(fi(&t1, i), 0).unwrap() = count(u64::from(i) + 1);
    }
    // Service 1 goes: the frontends after it move.
    let t2 = builder.build(2, &spec(&[0, 2, 3], |_| 8080)).unwrap();
    let t2 = t1.apply_delta(&t2.delta_from(&t1).unwrap()).unwrap();
    assert_eq!(t2.frontends().len(), 3);
    assert!(counters.follow(&t2));
    for i in [0u32, 2, 3] {
        let f = &counters.fronts[fi(&t2, i) as usize];
        assert_eq!(f.frontend, addr16(vip(i)));
        assert_eq!(f.counts[0], count(u64::from(i) + 1), "service {i}");
    }
    assert!(
        counters.fronts.iter().all(|f| f.frontend != addr16(vip(1))),
        "the removed service is gone"
    );
}

#[test]
fn a_copy_refreshed_in_parts_is_whole_after_one_pass() {
    let services: Vec<u32> = (0..10).collect();
    let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let t1 = builder.build(1, &spec(&services, |_| 8080)).unwrap();
    let mut worker = BackendCounters::default();
    worker.follow(&t1);
    let mut copy = BackendCounters::default();
    let mut cursor = 0;
    // The first copy after the frontends appeared is whole, budget or not.
    worker.publish_into(&mut copy, &mut cursor, 3);
    assert_eq!(copy, worker);

    for i in 0..10 {
        *worker.get_mut(fi(&t1, i), 1).unwrap() = count(7);
    }
    worker.publish_into(&mut copy, &mut cursor, 3);
    let fresh = copy
        .fronts
        .iter()
        .filter(|f| f.counts[1] == count(7))
        .count();
    assert_eq!(fresh, 3, "three frontends per hand-off");
    for _ in 0..3 {
        worker.publish_into(&mut copy, &mut cursor, 3);
    }
    assert_eq!(copy, worker, "whole after ceil(10 / 3) hand-offs");
    assert_eq!(sums(&copy), sums(&worker));

    // An endpoint's port moves (in place): the copy goes on in parts, and
    // the changed frontend's entry names its new backends when refreshed.
    let t2 = builder
        .build(2, &spec(&services, |i| if i == 4 { 9090 } else { 8080 }))
        .unwrap();
    let t2 = t1.apply_delta(&t2.delta_from(&t1).unwrap()).unwrap();
    assert!(worker.follow(&t2));
    assert_ne!(copy, worker);
    let before = cursor;
    worker.publish_into(&mut copy, &mut cursor, 3);
    assert_eq!(cursor, (before + 3) % 10, "in place: still in parts");
    for _ in 0..3 {
        worker.publish_into(&mut copy, &mut cursor, 3);
    }
    assert_eq!(copy, worker);
    let four = &copy.fronts[fi(&t2, 4) as usize];
    assert!(four.backends.iter().all(|&(_, port)| port == 9090));
    assert_eq!(four.counts, vec![BackendCount::default(); 3]);

    // Service 0 goes: the frontends move, and one hand-off copies them all.
    for i in 1..10 {
        *worker.get_mut(fi(&t2, i), 2).unwrap() = count(9);
    }
    let rest: Vec<u32> = (1..10).collect();
    let t3 = builder
        .build(3, &spec(&rest, |i| if i == 4 { 9090 } else { 8080 }))
        .unwrap();
    let t3 = t2.apply_delta(&t3.delta_from(&t2).unwrap()).unwrap();
    assert!(worker.follow(&t3));
    worker.publish_into(&mut copy, &mut cursor, 3);
    assert_eq!(copy, worker, "moved frontends are copied whole");
    assert_eq!(sums(&copy), sums(&worker));
}
