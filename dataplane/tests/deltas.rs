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
//! - The full snapshot after 64 deltas is written in the background: the
//!   publish does not wait for it, a gateway that starts meanwhile loads the
//!   current generation from the older full snapshot and the deltas, pruning
//!   meanwhile removes nothing a reader needs, the file holds byte for byte
//!   the table published, a failed write is retried by the next delta, and
//!   a full publish or a stop finishes it first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::snapshot::{encode, Writer, Written, DELTAS_PER_FULL};
use clustergate_builder::table::{BackendSpec, Builder, RingSizes, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::delta::{delta_path, load_chain};
use clustergate_dataplane::flow::{addr16, ip_from16, FlowTuple, Proto};
use clustergate_dataplane::snapshot::{
    load_file, read_current, snapshot_path, PollOutcome, SnapshotError, TableHandle, Watcher,
};
use clustergate_dataplane::table::Table;
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
        // Every step that changed frontends alone was a delta (a sequence of
        // node changes alone has none).
        let nodes_alone = changes.iter().all(|c| matches!(c, Change::Nodes { .. }));
        prop_assert!(deltas > 0 || nodes_alone);
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
/// A delta that grows one frontend's backends and shrinks another's, in
/// place, leaves every frontend's first backend (the per-backend metrics'
/// index into the table's backends) where a whole build of the same
/// services puts it.
#[test]
fn backends_bases_after_resized_frontends_match_a_whole_build() {
    let lists = |grow: bool| -> Vec<ServiceSpec> {
        (0..10u32)
            .map(|i| {
                let n = match (i, grow) {
                    (2, true) => 7,
                    (7, true) => 1,
                    (5, true) => 3,
                    _ => 3,
                };
                let port_moved: Vec<u32> = (0..n).map(|b| i * 10 + b).collect();
                let mut s = service(i, &port_moved, false);
                if grow && i == 5 {
                    for b in &mut s.backends {
                        b.port = 9090;
                    }
                }
                s
            })
            .collect()
    };
    let spec = |grow| TableSpec {
        services: lists(grow),
        ..TableSpec::default()
    };
    let mut builder = Builder::new(1, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let t1 = builder.build(1, &spec(false)).unwrap();
    let t2 = builder.build(2, &spec(true)).unwrap();
    let applied = t1.apply_delta(&t2.delta_from(&t1).unwrap()).unwrap();
    let whole = Table::build(2, 1, &lists(true)).unwrap();
    assert_eq!(applied.backends_total(), whole.backends_total());
    for i in 0..10 {
        let (a, w) = (
            applied.frontend(&addr16(vip(i)), 80, Proto::Tcp).unwrap(),
            whole.frontend(&addr16(vip(i)), 80, Proto::Tcp).unwrap(),
        );
        assert_eq!(a, w, "the same place");
        assert_eq!(
            applied.backend_base(a),
            whole.backend_base(w),
            "service {i}"
        );
    }
    assert_eq!(applied.backend_records(), whole.backend_records());
}

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
    // The full snapshot after 64 deltas is written in the background (and
    // may have ended, and been counted, during the later publishes).
    writer.wait_compaction().unwrap();
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
        use clustergate_dataplane::delta::decode_delta;
        use clustergate_builder::delta::encode_delta;
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

/// A scratch snapshot directory with a writer, a builder (flow-hash seed
/// `seed`) and the model's first table, published in full.
fn published_rig(seed: u64) -> (TestDir, Writer, Builder, Model, Table) {
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let mut builder = Builder::new(seed, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let model = Model::new();
    let last = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    writer.publish_change(&last, None).unwrap();
    (dir, writer, builder, model, last)
}

/// Moves one backend of Service `k` (a new one each time) and publishes the
/// table after `last`; the full snapshot it started writing in the
/// background, if any.
fn step(
    writer: &mut Writer,
    builder: &mut Builder,
    model: &mut Model,
    last: &mut Table,
    k: u32,
) -> Option<PathBuf> {
    model.apply(&Change::Move { s: k, b: 100 + k });
    let t = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    let written = writer.publish_change(&t, Some(last)).unwrap();
    *last = t;
    match written {
        Written::Delta { full, .. } => full,
        w => panic!("expected a delta, got {w:?}"),
    }
}

/// The temporary name the full snapshot of `g` is written under.
fn tmp_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(format!(".gen-{g:020}.snap.tmp"))
}

/// The snapshot files in `dir` (not `current` nor the lock), sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "current" && n != ".lock")
        .collect();
    names.sort();
    names
}

fn names(fulls: &[u64], deltas: impl IntoIterator<Item = u64>, tmp: &[u64]) -> Vec<String> {
    let mut want: Vec<String> = deltas
        .into_iter()
        .map(|g| format!("delta-{g:020}.snap"))
        .chain(fulls.iter().map(|g| format!("gen-{g:020}.snap")))
        .chain(tmp.iter().map(|g| format!(".gen-{g:020}.snap.tmp")))
        .collect();
    want.sort();
    want
}

/// Control writes the full snapshot after 64 deltas in the background:
/// `publish_change` returns while it is still being written (held here
/// after its temporary file, before the rename), with `current` already on
/// the delta's generation; a gateway that starts meanwhile loads that
/// generation from the older full snapshot and the 64 deltas. Once in
/// place, the file holds byte for byte the table control published, and
/// the next full snapshot is due 64 deltas after it.
#[test]
fn the_full_snapshot_after_64_deltas_is_written_in_the_background() {
    let dir = TestDir::new();
    let mut writer = Writer::open(dir.path()).unwrap();
    let mut builder = Builder::new(11, DEFAULT_MAX_RING_SIZE, RingSizes::default());
    let mut model = Model::new();
    let t1 = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    writer.publish_change(&t1, None).unwrap();
    let hold = writer.hold_compactions();
    // The publishes run on their own thread: one that waited for the held
    // compaction would never return, and this test fails instead of hanging.
    let (done, publishes_returned) = std::sync::mpsc::channel();
    let publisher = std::thread::spawn(move || {
        let mut last = t1;
        let mut started = Vec::new();
        for k in 0..DELTAS_PER_FULL as u32 {
            let full = step(&mut writer, &mut builder, &mut model, &mut last, k);
            started.push((last.generation(), full));
        }
        let compacting = writer.compacting();
        done.send(()).unwrap();
        (writer, builder, model, last, started, compacting)
    });
    if publishes_returned
        .recv_timeout(std::time::Duration::from_secs(600))
        .is_err()
    {
        drop(hold);
        panic!("publish_change waited for the full snapshot written in the background");
    }
    let (mut writer, mut builder, mut model, mut last, started, compacting) =
        publisher.join().unwrap();
    let g = 1 + DELTAS_PER_FULL as u64;
    assert_eq!(last.generation(), g);
    let full = snapshot_path(dir.path(), g);
    for (generation, path) in &started {
        let want = (*generation == g).then(|| full.clone());
        assert_eq!(
            path, &want,
            "generation {generation}: only the 64th delta starts one"
        );
    }
    assert_eq!(
        compacting,
        Some(g),
        "still being written when publish_change returned"
    );
    hold.wait_written();
    assert_eq!(writer.compacting(), Some(g));
    assert!(
        tmp_path(dir.path(), g).exists(),
        "written under its temporary name"
    );
    assert!(!full.exists(), "not in place yet");
    assert_eq!(read_current(dir.path()).unwrap(), Some(g));
    // A gateway that starts now: the full snapshot 1 and the 64 deltas.
    let reached = load_chain(dir.path(), g, None).unwrap();
    assert!(reached.full);
    assert_eq!(reached.deltas, DELTAS_PER_FULL);
    assert_eq!(encode(&reached.table), encode(&last));
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: g });
    let seen = handle.load_full();
    for (i, _, _) in &model.services {
        assert_eq!(view(&seen, *i), view(&last, *i), "service {i}");
        assert_eq!(picks(&seen, *i), picks(&last, *i), "service {i}");
    }
    // In place: byte for byte the table published, and what a reader
    // that starts now loads alone.
    drop(hold);
    assert_eq!(writer.wait_compaction().unwrap(), Some(full.clone()));
    assert_eq!(writer.compacting(), None);
    assert!(!tmp_path(dir.path(), g).exists());
    assert_eq!(encode(&load_file(&full).unwrap()), encode(&last));
    assert_eq!(load_chain(dir.path(), g, None).unwrap().deltas, 0);
    assert_eq!(writer.wait_compaction().unwrap(), None, "nothing more");
    // The next one is due 64 deltas after it.
    for k in 0..DELTAS_PER_FULL as u32 {
        let started = step(&mut writer, &mut builder, &mut model, &mut last, k);
        let want =
            (k + 1 == DELTAS_PER_FULL as u32).then(|| snapshot_path(dir.path(), last.generation()));
        assert_eq!(started, want, "delta {} after the full snapshot", k + 1);
    }
    assert_eq!(
        writer.wait_compaction().unwrap(),
        Some(snapshot_path(dir.path(), g + DELTAS_PER_FULL as u64))
    );
}

/// Pruning while a full snapshot is written in the background (the
/// writer's after each delta, and the one after the full snapshot is in
/// place) removes nothing a reader needs: neither the file being written,
/// nor the older full snapshot and the deltas after it, which a gateway
/// that starts meanwhile loads from; once the new one is in place, the
/// files it makes unnecessary go.
#[test]
fn pruning_with_a_compaction_in_flight_keeps_what_readers_need() {
    let (dir, mut writer, mut builder, mut model, mut last) = published_rig(13);
    let mut k = 0;
    // Generations 2..=65 (the full snapshot 65 written), then 66..=129
    // with the full snapshot 129 held before its rename.
    while last.generation() < 65 {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    assert_eq!(
        writer.wait_compaction().unwrap(),
        Some(snapshot_path(dir.path(), 65))
    );
    let hold = writer.hold_compactions();
    while last.generation() < 129 {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    hold.wait_written();
    // Twelve more deltas, each followed by the writer's prune.
    while last.generation() < 141 {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    assert_eq!(writer.compacting(), Some(129));
    assert_eq!(
        files(dir.path()),
        names(&[1, 65], 2..=141, &[129]),
        "the writer's prune kept both full snapshots, every delta and the file being written"
    );
    // A gateway that starts now, and one that followed the deltas up to 100.
    let reached = load_chain(dir.path(), 141, None).unwrap();
    assert_eq!((reached.full, reached.deltas), (true, 141 - 65));
    assert_eq!(encode(&reached.table), encode(&last));
    let t100 = load_chain(dir.path(), 100, None).unwrap().table;
    let reached = load_chain(dir.path(), 141, Some(&t100)).unwrap();
    assert_eq!((reached.full, reached.deltas), (false, 41));
    assert_eq!(encode(&reached.table), encode(&last));
    // In place: the prune after it removed the full snapshot 1 and the
    // deltas up to 65, and nothing else.
    drop(hold);
    assert_eq!(
        writer.wait_compaction().unwrap(),
        Some(snapshot_path(dir.path(), 129))
    );
    assert_eq!(files(dir.path()), names(&[65, 129], 66..=141, &[]));
    let reached = load_chain(dir.path(), 141, None).unwrap();
    assert_eq!((reached.full, reached.deltas), (true, 141 - 129));
    assert_eq!(encode(&reached.table), encode(&last));
    let reached = load_chain(dir.path(), 141, Some(&t100)).unwrap();
    assert_eq!(encode(&reached.table), encode(&last));
}

/// A full snapshot that cannot be written in the background is reported,
/// naming the file, and no file of that name appears; the deltas go on,
/// and the next delta writes the full snapshot of its own generation.
#[test]
fn a_failed_compaction_is_retried_by_the_next_delta() {
    let (dir, mut writer, mut builder, mut model, mut last) = published_rig(17);
    let g = 1 + DELTAS_PER_FULL as u64;
    // Something in the way of the temporary file of the full snapshot `g`.
    fs::create_dir(tmp_path(dir.path(), g)).unwrap();
    let mut k = 0;
    while last.generation() < g {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    match writer.wait_compaction() {
        Err(SnapshotError::Io { path, .. }) => assert_eq!(path, snapshot_path(dir.path(), g)),
        r => panic!("expected the write to fail, got {r:?}"),
    }
    assert!(!snapshot_path(dir.path(), g).exists());
    assert_eq!(
        read_current(dir.path()).unwrap(),
        Some(g),
        "the delta stands"
    );
    let started = step(&mut writer, &mut builder, &mut model, &mut last, k);
    let full = snapshot_path(dir.path(), g + 1);
    assert_eq!(started, Some(full.clone()), "the next delta tries again");
    assert_eq!(writer.wait_compaction().unwrap(), Some(full.clone()));
    assert_eq!(encode(&load_file(&full).unwrap()), encode(&last));
    fs::remove_dir(tmp_path(dir.path(), g)).unwrap();
}

/// A full publish, and a writer that stops (control on SIGTERM), first
/// finish the full snapshot being written in the background: full
/// snapshots appear in generation order, and no file is left half
/// written.
#[test]
fn a_full_publish_and_a_stop_finish_the_compaction_first() {
    let (dir, mut writer, mut builder, mut model, mut last) = published_rig(19);
    let hold = writer.hold_compactions();
    let mut k = 0;
    while last.generation() < 65 {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    hold.wait_written();
    let t65 = encode(&last);
    // One node more: not a change of frontends alone, so published in full.
    model.apply(&Change::Nodes { n: 4 });
    let t66 = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    assert_eq!(
        writer.publish_change(&t66, Some(&last)).unwrap(),
        Written::Full(snapshot_path(dir.path(), 66))
    );
    assert_eq!(writer.compacting(), None);
    assert_eq!(
        encode(&load_file(&snapshot_path(dir.path(), 65)).unwrap()),
        t65,
        "the full snapshot 65 was finished first"
    );
    // Both full snapshots, and no delta (none is above 65).
    assert_eq!(files(dir.path()), names(&[65, 66], [], &[]));
    drop(hold);
    // Another one held, and the writer dropped.
    last = t66;
    let hold = writer.hold_compactions();
    while last.generation() < 66 + DELTAS_PER_FULL as u64 {
        step(&mut writer, &mut builder, &mut model, &mut last, k);
        k += 1;
    }
    hold.wait_written();
    drop(writer);
    let g = 66 + DELTAS_PER_FULL as u64;
    assert_eq!(
        encode(&load_file(&snapshot_path(dir.path(), g)).unwrap()),
        encode(&last)
    );
    assert!(
        files(dir.path()).iter().all(|n| !n.ends_with(".tmp")),
        "nothing half written: {:?}",
        files(dir.path())
    );
    drop(hold);
    // The next control starts above it.
    assert_eq!(Writer::open(dir.path()).unwrap().next_generation(), g + 1);
}

/// When the delta that makes the full snapshot due adds and removes
/// Services, the full snapshot written in the background still gives every
/// Service (and the one removed) the lookups of control's table.
#[test]
fn a_background_full_snapshot_after_added_and_removed_services_looks_up_the_same() {
    let (dir, mut writer, mut builder, mut model, mut last) = published_rig(23);
    for k in 0..DELTAS_PER_FULL as u32 - 1 {
        assert_eq!(
            step(&mut writer, &mut builder, &mut model, &mut last, k),
            None
        );
    }
    let gone = model.services[3].0;
    model.apply(&Change::Remove { s: 3 });
    model.apply(&Change::New { b: 450 });
    let t = builder
        .build(writer.next_generation(), &model.spec())
        .unwrap();
    let full = snapshot_path(dir.path(), t.generation());
    match writer.publish_change(&t, Some(&last)).unwrap() {
        Written::Delta {
            changed: 1,
            removed: 1,
            full: Some(path),
            ..
        } => assert_eq!(path, full),
        w => panic!("expected a delta with one Service added and one removed, got {w:?}"),
    }
    assert_eq!(writer.wait_compaction().unwrap(), Some(full.clone()));
    let loaded = load_file(&full).unwrap();
    assert_eq!(loaded.generation(), t.generation());
    assert_eq!(loaded.frontends().len(), t.frontends().len());
    assert_eq!(view(&loaded, gone), None);
    for (i, _, _) in &model.services {
        assert!(view(&t, *i).is_some(), "service {i}");
        assert_eq!(view(&loaded, *i), view(&t, *i), "service {i}");
        assert_eq!(picks(&loaded, *i), picks(&t, *i), "service {i}");
    }
}
