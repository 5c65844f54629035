//! Per-frontend updates: the incremental builder, delta snapshots and the
//! reader that follows them.
//!
//! - Model test: any sequence of random Service changes (endpoints moved,
//!   added, removed; Services added and removed; a node-local Service whose
//!   nodes change), built incrementally ([`Builder`]) and published as
//!   deltas, gives the gateway the same lookups as a full rebuild from the
//!   final specs, and control's table the same snapshot bytes.
//! - Only the frontends that changed get a new block (version); the
//!   others' flows are not looked at again.
//! - A torn or corrupt delta is refused with its fault named, forwarding
//!   keeps the last good table, and the next good generation is taken.
//! - A gateway that starts in the middle of a burst (full snapshot, then a
//!   chain of deltas) and a restarted control converge.
//! - A slow reader that holds an old table keeps reading it whole while many
//!   newer generations are published and the old files are pruned.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::fs;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clustergate_dataplane::delta::{delta_path, load_chain};
use clustergate_dataplane::flow::{addr16, ip_from16, FlowTuple, Proto};
use clustergate_dataplane::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_dataplane::snapshot::{
    encode, snapshot_path, PollOutcome, TableHandle, Watcher, Writer, Written,
};
use clustergate_dataplane::table::{
    BackendSpec, Builder, RingSizes, ServiceSpec, Table, TableSpec,
};
use ipnet::IpNet;
use proptest::prelude::*;

#[path = "support/scratch.rs"]
mod scratch;
use scratch::TestDir;

fn vip(i: u32) -> IpAddr {
    IpAddr::from([198, 19, (i >> 8) as u8, i as u8])
}

fn backend(i: u32) -> IpAddr {
    IpAddr::from([198, 18, (i >> 8) as u8, i as u8])
}

/// Service `i` with backends `list` (numbers), on node `list[j] % 3` when
/// node-local.
fn service(i: u32, list: &[u32], node_local: bool) -> ServiceSpec {
    let mut s = ServiceSpec::cluster_ip(
        vip(i),
        80,
        Proto::Tcp,
        list.iter()
            .map(|&b| BackendSpec::ready(backend(b), 8080).on_node(b % 3))
            .collect(),
    )
    .with_name(format!("ns/svc-{i}"));
    s.node_local = node_local;
    s
}

fn nodes(n: u32) -> Vec<(IpNet, u32)> {
    (0..n)
        .map(|k| (format!("198.18.{}.0/24", 200 + k).parse().unwrap(), k))
        .collect()
}

/// What a gateway sees of frontend `key` in `t`: its record, backends,
/// ring and name (not where it sits, nor its version).
fn view(t: &Table, i: u32) -> Option<String> {
    let fi = t.frontend(&addr16(vip(i)), 80, Proto::Tcp)?;
    let f = t.frontend_record(fi)?;
    Some(format!(
        "{:?} {:?} {:?} {:?} {:?}",
        f.record(),
        f.backends(),
        f.ring(),
        f.locals(),
        f.name()
    ))
}

fn picks(t: &Table, i: u32) -> Vec<Option<IpAddr>> {
    let Some(fi) = t.frontend(&addr16(vip(i)), 80, Proto::Tcp) else {
        return Vec::new();
    };
    let f = t.frontend_record(fi).unwrap();
    (0..64u16)
        .map(|p| {
            let t5 = FlowTuple {
                src_addr: addr16(IpAddr::from([198, 18, 200 + (p % 3) as u8, 7])),
                dst_addr: addr16(vip(i)),
                src_port: 40_000 + p,
                dst_port: 80,
                proto: Proto::Tcp,
            };
            t.pick(f, &t5).map(|b| ip_from16(b.addr))
        })
        .collect()
}

/// One change to the specs.
#[derive(Debug, Clone)]
enum Change {
    /// Service `s % n` gets backend `b` instead of its first.
    Move { s: u32, b: u32 },
    /// Service `s % n` gets one backend more.
    Add { s: u32, b: u32 },
    /// Service `s % n` loses its last backend.
    Drop { s: u32 },
    /// A new Service.
    New { b: u32 },
    /// Service `s % n` goes away.
    Remove { s: u32 },
    /// One node more or less (node-local Services are built again).
    Nodes { n: u32 },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0..64u32, 0..500u32).prop_map(|(s, b)| Change::Move { s, b }),
        2 => (0..64u32, 0..500u32).prop_map(|(s, b)| Change::Add { s, b }),
        2 => (0..64u32).prop_map(|s| Change::Drop { s }),
        1 => (0..500u32).prop_map(|b| Change::New { b }),
        1 => (0..64u32).prop_map(|s| Change::Remove { s }),
        1 => (2..5u32).prop_map(|n| Change::Nodes { n }),
    ]
}

/// The specs: per Service number, its backends and whether node-local.
struct Model {
    services: Vec<(u32, Vec<u32>, bool)>,
    next: u32,
    nodes: u32,
}

impl Model {
    fn new() -> Self {
        Self {
            services: (0..12u32)
                .map(|i| (i, vec![i * 3, i * 3 + 1, i * 3 + 2], i.is_multiple_of(4)))
                .collect(),
            next: 12,
            nodes: 3,
        }
    }

    fn apply(&mut self, c: &Change) {
        let n = self.services.len() as u32;
        match *c {
            Change::Move { s, b } if n > 0 => {
                let list = &mut self.services[(s % n) as usize].1;
                if !list.contains(&b) && !list.is_empty() {
                    list[0] = b;
                }
            }
            Change::Add { s, b } if n > 0 => {
                let list = &mut self.services[(s % n) as usize].1;
                if !list.contains(&b) {
                    list.push(b);
                }
            }
            Change::Drop { s } if n > 0 => {
                self.services[(s % n) as usize].1.pop();
            }
            Change::New { b } => {
                self.services
                    .push((self.next, vec![b], self.next.is_multiple_of(3)));
                self.next += 1;
            }
            Change::Remove { s } if n > 0 => {
                self.services.remove((s % n) as usize);
            }
            Change::Nodes { n } => self.nodes = n,
            _ => {}
        }
    }

    fn spec(&self) -> TableSpec {
        TableSpec {
            services: self
                .services
                .iter()
                .map(|(i, list, local)| {
                    // A backend on a node the cluster no longer has runs
                    // nowhere known.
                    let mut s = service(*i, list, *local);
                    for b in &mut s.backends {
                        if b.node.is_some_and(|k| k >= self.nodes) {
                            b.node = None;
                        }
                    }
                    s
                })
                .collect(),
            nodes: nodes(self.nodes),
            ..TableSpec::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Incremental builds published as deltas give the gateway what a full
    /// rebuild gives, after every step; control's table is byte for byte
    /// the table `build_keeping` makes from the same specs and sizes.
    #[test]
    fn deltas_give_what_a_full_rebuild_gives(changes in prop::collection::vec(change(), 1..24)) {
        let dir = TestDir::new();
        let mut writer = Writer::open(dir.path()).unwrap();
        let handle = Arc::new(TableHandle::default());
        let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
        let mut builder = Builder::new(7, DEFAULT_MAX_RING_SIZE, RingSizes::default());
        let mut model = Model::new();
        let mut last: Option<Table> = None;
        let mut sizes = RingSizes::default();
        let mut deltas = 0;
        for (step, c) in std::iter::once(None).chain(changes.iter().map(Some)).enumerate() {
            if let Some(c) = c {
                model.apply(c);
            }
            let spec = model.spec();
            let g = writer.next_generation();
            let table = builder.build(g, &spec).unwrap();
            let full = Table::build_keeping(g, 7, &spec, DEFAULT_MAX_RING_SIZE, &sizes).unwrap();
            prop_assert_eq!(encode(&table), encode(&full), "step {}: control's table", step);
            sizes = full.ring_sizes();
            if matches!(writer.publish_change(&table, last.as_ref()).unwrap(), Written::Delta { .. }) {
                deltas += 1;
            }
            let outcome = watcher.poll();
            prop_assert_eq!(outcome, PollOutcome::Applied { generation: g }, "step {}", step);
            let seen = handle.load_full();
            prop_assert_eq!(seen.frontends().len(), full.frontends().len());
            for (i, _, _) in &model.services {
                prop_assert_eq!(view(&seen, *i), view(&full, *i), "step {}: service {}", step, i);
                prop_assert_eq!(picks(&seen, *i), picks(&full, *i), "step {}: service {}", step, i);
            }
            last = Some(table);
        }
        // The gateway applied every delta it was given as one.
        prop_assert_eq!(watcher.stats.deltas, deltas);
        prop_assert!(deltas > 0);
    }
}

/// Ten Services; a change to one of them is published as a delta that
/// holds it alone, and only its block gets a new version at the gateway.
#[test]
fn a_change_to_one_service_touches_only_its_frontend() {
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let mut model = Model::new();
    let t1 = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    assert!(matches!(
        writer.publish_change(&t1, None).unwrap(),
        Written::Full(_)
    ));
    watcher.poll();
    let before = handle.load_full();
    model.apply(&Change::Move { s: 5, b: 400 });
    let t2 = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    match writer.publish_change(&t2, Some(&t1)).unwrap() {
        Written::Delta {
            changed,
            removed,
            full,
            ..
        } => {
            assert_eq!((changed, removed, full), (1, 0, None));
        }
        w => panic!("expected a delta, got {w:?}"),
    }
    // The delta file is small: one frontend's block.
    let len = fs::metadata(delta_path(dir.path(), 2)).unwrap().len();
    let full_len = fs::metadata(snapshot_path(dir.path(), 1)).unwrap().len();
    assert!(len * 5 < full_len, "delta {len} bytes, full {full_len}");
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 2 });
    let after = handle.load_full();
    for (i, _, _) in &model.services {
        let v = |t: &Table| {
            let fi = t.frontend(&addr16(vip(*i)), 80, Proto::Tcp).unwrap();
            t.frontend_record(fi).unwrap().version()
        };
        let expect = if *i == 5 { 2 } else { 1 };
        assert_eq!(v(&after), expect, "service {i}");
        assert_eq!(v(&before), 1);
    }
    assert!(
        picks(&after, 5).contains(&Some(backend(400))),
        "the moved backend takes new flows"
    );
}

/// A delta torn (cut short) or with a flipped byte is refused with the
/// fault named; forwarding keeps the last good table; the next good
/// generation (a full snapshot) is taken.
#[test]
fn a_torn_or_corrupt_delta_is_refused_and_forwarding_continues() {
    for damage in ["torn", "flipped", "other base"] {
        let dir = TestDir::new();
        let mut writer = Writer::open(dir.path()).unwrap();
        let handle = Arc::new(TableHandle::default());
        let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
        let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
        let mut model = Model::new();
        let t1 = builder.build(1, &model.spec()).unwrap();
        writer.publish_change(&t1, None).unwrap();
        watcher.poll();
        model.apply(&Change::Move { s: 2, b: 300 });
        let t2 = builder.build(2, &model.spec()).unwrap();
        writer.publish_change(&t2, Some(&t1)).unwrap();
        let path = delta_path(dir.path(), 2);
        let mut bytes = fs::read(&path).unwrap();
        match damage {
            "torn" => bytes.truncate(bytes.len() - 100),
            "flipped" => {
                let at = bytes.len() / 2;
                bytes[at] ^= 0x40;
            }
            _ => {
                // A delta for generation 5 (a base this reader never had),
                // checksums intact: it leads back to a full snapshot that
                // is not there.
                bytes[24..32].copy_from_slice(&5u64.to_le_bytes());
                let head = clustergate_dataplane::snapshot::body_checksum(&bytes[..56]);
                bytes[56..64].copy_from_slice(&head.to_le_bytes());
            }
        }
        fs::remove_file(&path).unwrap();
        fs::write(&path, &bytes).unwrap();
        match watcher.poll() {
            PollOutcome::Refused { fault, .. } => assert_eq!(fault, "bad_delta", "{damage}"),
            o => panic!("{damage}: expected a refusal, got {o:?}"),
        }
        assert_eq!(
            handle.generation(),
            1,
            "{damage}: the last good table stays"
        );
        assert_eq!(
            view(&handle.load_full(), 2),
            view(&t1, 2),
            "{damage}: still forwarding as before"
        );
        assert!(watcher.stats.last_refusal.is_some());
        // The next delta leads back through the bad one: refused too.
        model.apply(&Change::Move { s: 2, b: 301 });
        let t3 = builder.build(3, &model.spec()).unwrap();
        writer.publish_change(&t3, Some(&t2)).unwrap();
        assert!(matches!(watcher.poll(), PollOutcome::Refused { .. }));
        assert_eq!(handle.generation(), 1, "{damage}");
        // The full snapshot a writer writes at least every 30 s (here at
        // once) after a delta is taken: back on the current table.
        let mut writer = {
            drop(writer);
            Writer::open(dir.path())
                .unwrap()
                .with_full_every(std::time::Duration::ZERO)
        };
        model.apply(&Change::Move { s: 2, b: 302 });
        let t4 = builder
            .build(writer.next_generation(), &model.spec())
            .unwrap();
        // A restarted writer publishes in full first; one that runs on
        // publishes a delta and, being due, the full snapshot after it.
        writer.publish_change(&t4, None).unwrap();
        model.apply(&Change::Move { s: 2, b: 303 });
        let t5 = builder
            .build(writer.next_generation(), &model.spec())
            .unwrap();
        assert!(matches!(
            writer.publish_change(&t5, Some(&t4)).unwrap(),
            Written::Delta { full: Some(_), .. }
        ));
        assert_eq!(
            watcher.poll(),
            PollOutcome::Applied {
                generation: t5.generation()
            }
        );
        assert_eq!(view(&handle.load_full(), 2), view(&t5, 2), "{damage}");
    }
}

/// A gateway that starts after a full snapshot and 100 deltas (more than
/// a writer writes before the next full one) reaches the same table, by
/// the newest full snapshot and the deltas after it; a restarted control
/// continues above every generation and publishes in full first.
#[test]
fn restarts_in_the_middle_of_a_burst_converge() {
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let mut builder = Builder::new(3, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let mut model = Model::new();
    let mut last: Option<Table> = None;
    let mut fulls = 0;
    for k in 0..100u32 {
        model.apply(&Change::Move { s: k, b: 100 + k });
        let t = builder
            .build(writer.next_generation(), &model.spec())
            .unwrap();
        match writer.publish_change(&t, last.as_ref()).unwrap() {
            Written::Full(_) => fulls += 1,
            Written::Delta { full: Some(_), .. } => fulls += 1,
            Written::Delta { .. } => {}
        }
        last = Some(t);
    }
    assert_eq!(fulls, 2, "the first publish, and one after 64 deltas");
    let last = last.unwrap();
    // A gateway starting now.
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(
        watcher.poll(),
        PollOutcome::Applied {
            generation: last.generation()
        }
    );
    let seen = handle.load_full();
    for (i, _, _) in &model.services {
        assert_eq!(view(&seen, *i), view(&last, *i), "service {i}");
    }
    // Full snapshots at 1 and 65 (the newest two), and the deltas a chain
    // from either needs; nothing half written.
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "current" && n != ".lock")
        .collect();
    names.sort();
    let mut want: Vec<String> = (2..=100u64)
        .map(|g| format!("delta-{g:020}.snap"))
        .chain([1u64, 65].map(|g| format!("gen-{g:020}.snap")))
        .collect();
    want.sort();
    assert_eq!(names, want);
    // A control that restarts continues above every generation, and its
    // first publish is in full.
    drop(writer);
    let mut writer = Writer::open(dir.path()).unwrap();
    assert_eq!(writer.next_generation(), last.generation() + 1);
    let mut builder = Builder::new(3, DEFAULT_MAX_RING_SIZE, last.ring_sizes());
    model.apply(&Change::Move { s: 1, b: 499 });
    let t = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    assert!(matches!(
        writer.publish_change(&t, None).unwrap(),
        Written::Full(_)
    ));
    assert_eq!(
        watcher.poll(),
        PollOutcome::Applied {
            generation: t.generation()
        }
    );
    // The services that did not change keep their blocks (and their flows).
    let now = handle.load_full();
    let fi = now.frontend(&addr16(vip(7)), 80, Proto::Tcp).unwrap();
    let fj = seen.frontend(&addr16(vip(7)), 80, Proto::Tcp).unwrap();
    assert_eq!(
        now.frontend_record(fi).unwrap().version(),
        seen.frontend_record(fj).unwrap().version()
    );
    assert_eq!(
        load_chain(dir.path(), t.generation(), None).unwrap().deltas,
        0
    );
}

/// A reader that holds an old table (a worker in the middle of a batch)
/// keeps reading every one of its blocks, unchanged, while 200 newer
/// generations are published, applied and pruned; the blocks go when the
/// last reader lets the table go.
#[test]
fn a_slow_reader_keeps_its_table_whole() {
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    let mut builder = Builder::new(5, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let mut model = Model::new();
    let t1 = builder.build(1, &model.spec()).unwrap();
    writer.publish_change(&t1, None).unwrap();
    watcher.poll();
    let held = handle.load_full();
    let expect: Vec<Option<String>> = (0..12).map(|i| view(&held, i)).collect();
    let weak = Arc::downgrade(&held);
    let reader = std::thread::spawn(move || {
        // Slow: reads its table over and over while the writer moves on.
        for _ in 0..50 {
            for i in 0..12u32 {
                assert_eq!(view(&held, i), expect[i as usize], "service {i}");
                assert!(!picks(&held, i).is_empty());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(held);
    });
    let mut last = t1;
    for k in 0..200u32 {
        model.apply(&Change::Move {
            s: k % 12,
            b: 200 + k,
        });
        let t = builder
            .build(writer.next_generation(), &model.spec())
            .unwrap();
        writer.publish_change(&t, Some(&last)).unwrap();
        assert!(matches!(watcher.poll(), PollOutcome::Applied { .. }));
        last = t;
    }
    reader.join().unwrap();
    // The watcher retired the old table; with the reader gone it is freed.
    watcher.poll();
    assert!(weak.upgrade().is_none(), "the old table was freed");
}

/// A worker's per-backend counters follow a delta without touching the
/// frontends that did not change (their counts stay where they are), and
/// a changed frontend's backends that stayed keep their counts.
#[test]
fn per_backend_counters_follow_only_changed_frontends() {
    use clustergate_dataplane::pipeline::{BackendCount, BackendCounters};
    let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let mut model = Model::new();
    let t1 = builder.build(1, &model.spec()).unwrap();
    let mut counters = BackendCounters::default();
    assert!(counters.follow(&t1));
    let fi = |t: &Table, i: u32| t.frontend(&addr16(vip(i)), 80, Proto::Tcp).unwrap();
    let one = BackendCount {
        new_flows: 1,
        packets: 10,
        bytes: 100,
    };
    for i in [3u32, 5] {
        for local in 0..3 {
            *counters.get_mut(fi(&t1, i), local).unwrap() = one;
        }
    }
    let kept_at = counters.fronts[fi(&t1, 3) as usize].counts.as_ptr();
    // Service 5's first backend is replaced.
    model.apply(&Change::Move { s: 5, b: 450 });
    let t2 = builder.build(2, &model.spec()).unwrap();
    let d = t2.delta_from(&t1).unwrap();
    let t2 = t1.apply_delta(&d).unwrap();
    assert!(counters.follow(&t2));
    assert!(!counters.follow(&t2), "once per generation");
    let three = &counters.fronts[fi(&t2, 3) as usize];
    assert_eq!(three.counts.as_ptr(), kept_at, "not copied");
    assert_eq!(three.counts, vec![one; 3]);
    let five = &counters.fronts[fi(&t2, 5) as usize];
    assert_eq!(five.version, 2);
    assert_eq!(
        five.backends[0],
        (addr16(backend(450)), 8080),
        "the new backend is first"
    );
    assert_eq!(five.counts, vec![BackendCount::default(), one, one]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Bytes of a valid delta changed or cut anywhere never panic the
    /// reader; with the checksums left as they were, every change is
    /// refused; whatever is accepted applies or is refused as a whole.
    #[test]
    fn damaged_deltas_never_panic_and_are_refused(
        edits in prop::collection::vec((any::<u32>(), 1..=255u8), 1..6),
        cut in prop::option::of(any::<u32>()),
    ) {
        use clustergate_dataplane::delta::{decode_delta, encode_delta};
        let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
        let mut model = Model::new();
        let t1 = builder.build(1, &model.spec()).unwrap();
        model.apply(&Change::Move { s: 4, b: 333 });
        model.apply(&Change::Remove { s: 7 });
        let t2 = builder.build(2, &model.spec()).unwrap();
        let good = encode_delta(&t2.delta_from(&t1).unwrap());
        prop_assert!(decode_delta(&good).is_ok());
        let mut bad = good.clone();
        for (at, x) in &edits {
            let at = *at as usize % bad.len();
            bad[at] ^= x;
        }
        if let Some(c) = cut {
            bad.truncate(c as usize % bad.len());
        }
        if bad != good {
            prop_assert!(decode_delta(&bad).is_err(), "a damaged delta was taken");
        }
        // Resealed, the reader's own checks stand alone: no panic, and what
        // it takes either applies whole or is refused.
        if bad.len() >= 64 {
            let body = clustergate_dataplane::snapshot::body_checksum(&bad[64..]);
            bad[48..56].copy_from_slice(&body.to_le_bytes());
            let head = clustergate_dataplane::snapshot::body_checksum(&bad[..56]);
            bad[56..64].copy_from_slice(&head.to_le_bytes());
            if let Ok(d) = decode_delta(&bad) {
                if let Ok(t) = t1.apply_delta(&d) {
                    prop_assert_eq!(t.generation(), d.generation);
                }
            }
        }
    }
}

/// Workers reading the table while 300 deltas are applied never see a
/// frontend half-updated: each change gives every backend of one Service
/// the same new port, and every block a reader sees has one port for all
/// its backends, a ring within them, and a version no newer than its table.
#[test]
fn workers_never_see_a_frontend_half_updated() {
    use std::sync::atomic::AtomicBool;
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    let mut builder = Builder::new(9, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let spec_at = |ports: &[u16]| TableSpec {
        services: ports
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                ServiceSpec::cluster_ip(
                    vip(i as u32),
                    80,
                    Proto::Tcp,
                    (0..4)
                        .map(|b| BackendSpec::ready(backend(i as u32 * 4 + b), p))
                        .collect(),
                )
            })
            .collect(),
        ..TableSpec::default()
    };
    let mut ports = vec![1000u16; 16];
    let t = builder.build(1, &spec_at(&ports)).unwrap();
    writer.publish_change(&t, None).unwrap();
    watcher.poll();
    let mut last = t;
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let handle = Arc::clone(&handle);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !done.load(Ordering::Acquire) {
                    let t = handle.load_full();
                    for f in t.frontends().iter() {
                        let b = f.backends();
                        assert!(b.iter().all(|x| x.port == b[0].port), "mixed ports");
                        assert!(f.ring().iter().all(|&s| usize::from(s) < b.len()));
                        assert!(f.version() <= t.generation());
                    }
                    seen = seen.max(t.generation());
                }
                seen
            })
        })
        .collect();
    for k in 0..300u16 {
        ports[usize::from(k % 16)] = 1001 + k;
        let t = builder
            .build(writer.next_generation(), &spec_at(&ports))
            .unwrap();
        writer.publish_change(&t, Some(&last)).unwrap();
        assert!(matches!(watcher.poll(), PollOutcome::Applied { .. }));
        last = t;
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 1, "the readers saw new generations");
    }
    assert_eq!(watcher.stats.deltas, 300);
}
