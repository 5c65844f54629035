//! Snapshot ABI, publish protocol and hand-over to workers.
//!
//! - Round trip: `Table::build_full` → `encode` → `decode` keeps every record
//!   (source ranges, per-node rings, node and node-port prefixes included),
//!   the generation, the seed and every pick.
//! - Every kind of bad snapshot (bad magic, foreign version, truncated,
//!   half-written, checksum mismatch, bounds, overlap, alignment, bad indexes
//!   with valid checksums, bad pointers, missing files, older generations) is
//!   refused by `Watcher::poll` with the right fault label and one count, the
//!   handle keeps forwarding with the previous table, and a later good
//!   generation is picked up.
//! - Property tests: random mutations never panic `decode`; with the
//!   checksums intact they never pass as another table, and with the
//!   checksums recomputed anything accepted is a consistent table.
//! - Readers on several threads never see a mix of two generations, nor a
//!   generation go backwards, while a writer swaps 200 generations.
//! - The writer keeps the newest two files, leaves no temporary files, and a
//!   restarted writer (or dataplane) continues from what is published.
//!
//! Directories live under /dev/shm (or the temporary directory) with the
//! process id in their name, and are removed at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::snapshot::{encode, seal, Writer};
use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{addr16, FlowTuple, Proto};
use clustergate_dataplane::snapshot::{
    decode, load_current, load_file, read_current, snapshot_path, Header, PollOutcome,
    SnapshotError, TableHandle, Watcher, CURRENT, FAULT_LABELS, HEADER_LEN,
};
use clustergate_dataplane::table::{
    BackendState, FrontendKind, ReturnPath, Table, FRONTEND_NODE_LOCAL,
};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::Index;

#[path = "support/scratch.rs"]
mod scratch;
use scratch::TestDir;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A varied set of services whose backends all have port `marker`: IPv4 and
/// IPv6, weights (one draining), a terminating backend, ClientIP affinity,
/// UDP and SCTP, and a service without endpoints.
fn services(marker: u16) -> Vec<ServiceSpec> {
    let b = |a: &str, weight: u32, state: BackendState| BackendSpec {
        addr: ip(a),
        port: marker,
        weight,
        state,
        node: None,
    };
    let mut weighted = ServiceSpec::cluster_ip(
        ip("198.19.0.10"),
        80,
        Proto::Tcp,
        vec![
            b("198.18.1.1", 1, BackendState::Ready),
            b("198.18.1.2", 3, BackendState::Ready),
            b("198.18.1.3", 0, BackendState::Ready),
            b("198.18.1.4", 1, BackendState::Terminating),
        ],
    );
    weighted.kind = FrontendKind::LoadBalancer;
    weighted.name = Some("default/weighted:http".into());
    let mut sticky = ServiceSpec::cluster_ip(
        ip("2001:db8::10"),
        443,
        Proto::Tcp,
        vec![
            b("2001:db8:1::1", 1, BackendState::Ready),
            b("2001:db8:1::2", 1, BackendState::Ready),
        ],
    );
    sticky.affinity_timeout_s = Some(10_800);
    sticky.name = Some("prod/sticky".into());
    vec![
        weighted,
        sticky,
        ServiceSpec::cluster_ip(ip("198.19.0.11"), 53, Proto::Udp, vec![]),
        ServiceSpec::cluster_ip(
            ip("198.19.0.11"),
            53,
            Proto::Tcp,
            vec![b("198.18.1.5", 1, BackendState::Ready)],
        ),
        ServiceSpec::cluster_ip(
            ip("2001:db8::11"),
            9000,
            Proto::Sctp,
            vec![b("2001:db8:1::3", 2, BackendState::Terminating)],
        ),
    ]
}

/// Frontends of the other kinds, backends with port `marker`: a node port,
/// an external IP, load-balancer IPs with source ranges (IPv4, IPv6) and a
/// node-local (`internalTrafficPolicy: Local`) frontend.
fn other_kinds(marker: u16) -> Vec<ServiceSpec> {
    let b = |a: &str, node: u32| BackendSpec::ready(ip(a), marker).on_node(node);
    let backends = vec![b("198.18.2.1", 1), b("198.18.2.2", 2), b("198.18.2.3", 2)];
    let base = ServiceSpec::cluster_ip(ip("198.19.0.20"), 80, Proto::Tcp, backends);
    let mut lb = base
        .clone()
        .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.1"));
    lb.source_ranges = Some(vec![net("198.18.0.0/24"), net("198.19.128.0/17")]);
    let mut closed = base
        .clone()
        .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.2"));
    closed.source_ranges = Some(vec![]);
    let mut local = base.clone();
    local.port = 81;
    local.node_local = true;
    let mut lb6 = ServiceSpec::cluster_ip(
        ip("2001:db8::20"),
        443,
        Proto::Tcp,
        vec![BackendSpec::ready(ip("2001:db8:1::9"), marker).on_node(2)],
    )
    .with_kind(FrontendKind::LoadBalancer, ip("2001:db8::99"));
    lb6.source_ranges = Some(vec![net("2001:db8:ff::/48")]);
    lb6.node_local = true;
    vec![
        base.clone()
            .with_kind(FrontendKind::NodePort, ip("0.0.0.0"))
            .with_return_path(ReturnPath::Snat),
        base.clone()
            .with_kind(FrontendKind::ExternalIp, ip("198.19.8.1")),
        lb,
        closed,
        local,
        lb6,
    ]
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Generation `g`'s table: every backend has port `g` (the generation
/// marker). It has every section: source ranges, per-node rings, node
/// prefixes and node-port addresses.
fn table(g: u64) -> Table {
    let mut services = services(g as u16);
    services.extend(other_kinds(g as u16));
    let spec = TableSpec {
        services,
        nodes: vec![
            (net("198.18.0.0/24"), 1),
            (net("198.18.0.11/32"), 1),
            (net("198.18.1.0/24"), 2),
            (net("2001:db8:ff::/64"), 2),
        ],
        node_port_addresses: vec![net("198.18.0.0/16"), net("2001:db8::/32")],
        policy: Default::default(),
    };
    Table::build_full(g, 0x5eed_0000 + g, &spec, DEFAULT_MAX_RING_SIZE).unwrap()
}

/// A small snapshot (one service, one backend) for exhaustive truncation.
fn small_table(g: u64) -> Table {
    Table::build(
        g,
        0,
        &[ServiceSpec::cluster_ip(
            ip("198.19.0.10"),
            80,
            Proto::Tcp,
            vec![BackendSpec::ready(ip("198.18.1.1"), 8080)],
        )],
    )
    .unwrap()
}

fn tuples_for(t: &Table, f: usize) -> Vec<FlowTuple> {
    let fr = &t.frontends()[f];
    let client = if fr.addr[..12] == addr16(ip("0.0.0.0"))[..12] {
        ip("198.18.0.1")
    } else {
        ip("2001:db8:ff::1")
    };
    (0..200u16)
        .map(|p| FlowTuple {
            src_addr: addr16(client),
            dst_addr: fr.addr,
            src_port: 1024 + p * 7,
            dst_port: fr.port,
            proto: Proto::from_ip_number(fr.proto).unwrap(),
        })
        .collect()
}

/// Same records, generation, seed, lookups and picks.
fn assert_same(a: &Table, b: &Table) {
    assert_eq!(a.generation(), b.generation());
    assert_eq!(a.hash_seed(), b.hash_seed());
    assert_eq!(a.frontends(), b.frontends());
    assert_eq!(a.backend_records(), b.backend_records());
    assert_eq!(a.ring_slots(), b.ring_slots());
    assert_eq!(a.source_range_records(), b.source_range_records());
    assert_eq!(a.local_records(), b.local_records());
    assert_eq!(a.node_prefix_records(), b.node_prefix_records());
    assert_eq!(a.node_port_prefix_records(), b.node_port_prefix_records());
    assert_eq!(a.has_node_ports(), b.has_node_ports());
    assert_eq!(a.to_parts().names, b.to_parts().names);
    assert_eq!(a.to_parts().name_offsets, b.to_parts().name_offsets);
    for (i, f) in a.frontends().iter().enumerate() {
        assert_eq!(a.frontend_name(i as u32), b.frontend_name(i as u32));
        let proto = Proto::from_ip_number(f.proto).unwrap();
        assert_eq!(a.frontend(&f.addr, f.port, proto), Some(i as u32));
        assert_eq!(b.frontend(&f.addr, f.port, proto), Some(i as u32));
        let fb = b.frontend_record(i as u32).unwrap();
        for t in tuples_for(a, i) {
            assert_eq!(
                a.pick(f, &t).map(|x| (x.addr, x.port)),
                b.pick(fb, &t).map(|x| (x.addr, x.port))
            );
        }
    }
}

/// Every range and ring slot in bounds, and every pick works (what a worker
/// relies on).
fn assert_consistent(t: &Table) {
    for (i, f) in t.frontends().iter().enumerate() {
        let ring = f.ring();
        assert_eq!(f.backends().len(), f.backends_len as usize);
        let r_end = f.ring_start as usize + f.ring_len as usize;
        assert!(r_end <= ring.len());
        assert!(ring[f.ring_start as usize..r_end]
            .iter()
            .all(|&s| u32::from(s) < f.backends_len));
        assert_eq!(f.ranges().len(), f.ranges_len as usize);
        assert_eq!(f.locals().len(), f.locals_len as usize);
        for l in t.locals_of(f) {
            let end = l.ring_start as usize + l.ring_len as usize;
            assert!(end <= ring.len());
            assert!(ring[l.ring_start as usize..end]
                .iter()
                .all(|&s| u32::from(s) < f.backends_len));
        }
        for tu in tuples_for(t, i).iter().take(20) {
            let picked = t.pick(f, tu);
            let _ = (
                t.source_allowed(f, &tu.src_addr),
                t.client_node(&tu.src_addr),
            );
            let _ = t.node_port(&tu.dst_addr, tu.dst_port, tu.proto);
            if f.flags & FRONTEND_NODE_LOCAL != 0 {
                assert!(picked.is_none() || f.ring_len > 0);
                continue;
            }
            assert_eq!(picked.is_some(), f.ring_len > 0);
        }
    }
}

fn header_of(bytes: &[u8]) -> Header {
    Header::from_bytes(&bytes[..HEADER_LEN].try_into().unwrap())
}

fn with_header(mut bytes: Vec<u8>, edit: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = header_of(&bytes);
    edit(&mut h);
    bytes[..HEADER_LEN].copy_from_slice(&h.to_bytes());
    bytes
}

#[test]
fn abi_round_trip_keeps_every_record_and_pick() {
    for t in [table(1), table(9), small_table(3), Table::empty(4)] {
        let bytes = encode(&t);
        let back = decode(&bytes).unwrap();
        assert_same(&t, &back);
        assert_eq!(encode(&back), bytes, "encoding is deterministic");
    }
    let t = table(1);
    assert!(t
        .frontends()
        .iter()
        .any(|f| f.flags != 0 && f.affinity_timeout_s == 10_800));
    assert!(t.frontends().iter().any(|f| f.backends_len == 0));
    assert!(t.backend_records().iter().any(|b| b.weight == 0));
    assert!(t
        .backend_records()
        .iter()
        .any(|b| b.state == BackendState::Terminating as u8));
    assert_eq!(t.source_range_records().len(), 3);
    assert_eq!(t.local_records().len(), 3, "two nodes, then one");
    assert_eq!(t.node_prefix_records().len(), 4);
    assert_eq!(t.node_port_prefix_records().len(), 2);
    assert!(t.has_node_ports());
    // Names: some frontends have one, the others none.
    let back = decode(&encode(&t)).unwrap();
    assert_eq!(back.frontend_name(0), Some("default/weighted:http"));
    assert_eq!(back.frontend_name(1), Some("prod/sticky"));
    assert_eq!(back.frontend_name(2), None);
}

#[test]
fn truncation_at_every_length_is_refused() {
    let bytes = encode(&small_table(1));
    assert!(bytes.len() > HEADER_LEN + 64 + 24);
    for len in 0..bytes.len() {
        let e = decode(&bytes[..len]).expect_err("a truncated snapshot must be refused");
        assert_eq!(e.label(), "truncated", "at {len}: {e}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert_eq!(decode(&longer).unwrap_err().label(), "length_mismatch");
    assert!(decode(&bytes).is_ok());
}

/// One kind of bad snapshot: what to put in the directory for generation 2.
struct BadCase {
    name: &'static str,
    fault: &'static str,
    /// Snapshot file for generation 2 (`None`: no file).
    file: Option<Vec<u8>>,
    /// Content of `current`.
    pointer: &'static [u8],
}

fn bad_cases() -> Vec<BadCase> {
    let good = encode(&table(2));
    let h = header_of(&good);
    let case = |name, fault, file: Vec<u8>| BadCase {
        name,
        fault,
        file: Some(file),
        pointer: b"2\n",
    };
    let mut v = Vec::new();

    let mut b = good.clone();
    b[0] = b'X';
    v.push(case("bad magic", "bad_magic", b));

    let b = with_header(good.clone(), |h| {
        h.abi_version = clustergate_dataplane::snapshot::ABI_VERSION + 1;
    });
    v.push(case("foreign ABI version", "abi_version", b));

    v.push(case("empty file", "truncated", Vec::new()));
    v.push(case("truncated header", "truncated", good[..100].to_vec()));
    v.push(case(
        "half-written (shorter than the header says)",
        "truncated",
        good[..good.len() - 50].to_vec(),
    ));

    let mut b = good.clone();
    b.extend_from_slice(&[0; 16]);
    v.push(case("longer than the header says", "length_mismatch", b));

    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    v.push(case("body byte flipped", "body_checksum", b));

    let mut b = good.clone();
    b[16] ^= 1; // generation, checksum not recomputed
    v.push(case("header byte flipped", "header_checksum", b));

    let mut b = with_header(good.clone(), |h| h.frontends_count = 1000);
    seal(&mut b);
    v.push(case("frontends past the end", "section_bounds", b));

    let mut b = with_header(good.clone(), |h| h.ring_off = h.file_len + 8);
    seal(&mut b);
    v.push(case("ring offset past the end", "section_bounds", b));

    let mut b = with_header(good.clone(), |h| h.backends_off = u64::MAX - 7);
    seal(&mut b);
    v.push(case("backends offset overflowing", "section_bounds", b));

    let mut b = with_header(good.clone(), |h| h.frontends_off = 64);
    seal(&mut b);
    v.push(case("frontends inside the header", "section_bounds", b));

    let mut b = with_header(good.clone(), |h| h.backends_off = h.frontends_off);
    seal(&mut b);
    v.push(case("overlapping sections", "section_overlap", b));

    let mut b = with_header(good.clone(), |h| {
        // Shifted by 4 bytes and shortened by as much, so it stays inside
        // the body: only its alignment is wrong.
        h.ring_off += 4;
        h.ring_count -= (4 / clustergate_dataplane::snapshot::RING_SLOT_LEN) as u64;
    });
    seal(&mut b);
    v.push(case("misaligned ring", "section_alignment", b));

    let mut b = with_header(good.clone(), |h| h.hash_id = 2);
    seal(&mut b);
    v.push(case("unknown flow hash", "hash_function", b));

    let mut b = with_header(good.clone(), |h| h.frontend_record_len = 56);
    seal(&mut b);
    v.push(case("other record size", "bad_header", b));

    let mut b = good.clone();
    let ring = h.ring_off as usize;
    b[ring..ring + 2].copy_from_slice(&99u16.to_le_bytes());
    seal(&mut b);
    v.push(case(
        "ring slot naming backend 99 (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    let first = h.frontends_off as usize;
    b[first + 28..first + 32].copy_from_slice(&1000u32.to_le_bytes()); // backends_start
    seal(&mut b);
    v.push(case(
        "backends range out of bounds (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    b[first + 18] = 1; // ICMP
    seal(&mut b);
    v.push(case(
        "unknown protocol (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    b[first + 44] = 7; // return path
    seal(&mut b);
    v.push(case(
        "unknown return path (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    b[first + 46] = 1; // reserved byte after the return path
    seal(&mut b);
    v.push(case("frontend reserved byte set", "bad_record", b));

    let mut b = good.clone();
    b[h.backends_off as usize + 19] = 1;
    seal(&mut b);
    v.push(case("backend reserved byte set", "bad_record", b));

    let mut b = good.clone();
    b[first + 20] = 0x80; // unknown flag
    seal(&mut b);
    v.push(case("unknown frontend flag", "bad_record", b));

    let mut b = good.clone();
    b[h.source_ranges_off as usize + 15] = 1; // 198.18.0.1/24
    seal(&mut b);
    v.push(case(
        "source range with host bits (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    let l = h.locals_off as usize;
    b[l..l + 4].copy_from_slice(&7u32.to_le_bytes()); // nodes 7, 2
    seal(&mut b);
    v.push(case(
        "per-node rings out of order (valid checksum)",
        "invalid_table",
        b,
    ));

    let mut b = good.clone();
    b[h.node_prefixes_off as usize + 19] = 1;
    seal(&mut b);
    v.push(case("node prefix reserved byte set", "bad_record", b));

    let mut b = with_header(good.clone(), |h| h.node_port_prefixes_off = h.locals_off);
    seal(&mut b);
    v.push(case(
        "node-port addresses over the per-node rings",
        "section_overlap",
        b,
    ));

    v.push(case(
        "file holds another generation",
        "generation_mismatch",
        encode(&table(5)),
    ));

    v.push(BadCase {
        name: "current names a missing file",
        fault: "missing_file",
        file: None,
        pointer: b"2\n",
    });
    for pointer in [
        &b"two\n"[..],
        b"",
        b"2\n\n",
        b"-2\n",
        b"0\n",
        b" 2\n",
        b"99999999999999999999999\n",
    ] {
        v.push(BadCase {
            name: "current holds garbage",
            fault: "bad_pointer",
            file: Some(good.clone()),
            pointer,
        });
    }
    v
}

/// A directory with generation 1 published and applied by a watcher.
fn applied_gen1() -> (TestDir, Arc<TableHandle>, Watcher) {
    let dir = TestDir::new();
    let mut w = Writer::open(dir.path()).unwrap();
    w.publish(&table(1)).unwrap();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 1 });
    (dir, handle, watcher)
}

fn assert_still_forwarding_gen1(handle: &TableHandle) {
    let t = handle.load();
    assert_eq!(t.generation(), 1);
    assert_same(&t, &table(1));
    let f = &t.frontends()[0];
    let tu = tuples_for(&t, 0)[0];
    assert_eq!(t.pick(f, &tu).unwrap().port, 1);
}

#[test]
fn bad_snapshots_are_refused_and_the_last_good_one_keeps_forwarding() {
    let cases = bad_cases();
    for c in &cases {
        assert!(FAULT_LABELS.contains(&c.fault), "{}", c.fault);
        let (dir, handle, mut watcher) = applied_gen1();
        if let Some(file) = &c.file {
            fs::write(snapshot_path(dir.path(), 2), file).unwrap();
        }
        fs::write(dir.path().join(CURRENT), c.pointer).unwrap();

        let outcome = watcher.poll();
        assert_eq!(
            outcome,
            PollOutcome::Refused {
                fault: c.fault,
                repeated: false
            },
            "{}: {:?}",
            c.name,
            watcher.stats.last_refusal
        );
        assert_still_forwarding_gen1(&handle);
        assert_eq!(watcher.stats.refused, 1, "{}", c.name);
        assert_eq!(watcher.stats.refused_by_fault.get(c.fault), Some(&1));
        assert_eq!(watcher.stats.generation, 1);
        let message = watcher.stats.last_refusal.clone().unwrap();
        assert!(
            message.contains(dir.path().to_str().unwrap()),
            "{}: the refusal names the file: {message}",
            c.name
        );

        // The same refusal again is reported but counted (and logged) once.
        assert_eq!(
            watcher.poll(),
            PollOutcome::Refused {
                fault: c.fault,
                repeated: true
            },
            "{}",
            c.name
        );
        assert_eq!(watcher.stats.refused, 1);
        assert_still_forwarding_gen1(&handle);

        // Control publishes a good newer generation: it is picked up.
        let mut w = Writer::open(dir.path()).unwrap();
        assert!(w.next_generation() >= 2);
        let g = w.next_generation().max(3);
        w.publish(&table(g)).unwrap();
        assert_eq!(
            watcher.poll(),
            PollOutcome::Applied { generation: g },
            "{}",
            c.name
        );
        assert_eq!(handle.generation(), g);
        assert_eq!(watcher.stats.applied, 2);
    }
}

#[test]
fn a_directory_in_place_of_a_snapshot_is_refused() {
    let (dir, handle, mut watcher) = applied_gen1();
    fs::create_dir(snapshot_path(dir.path(), 2)).unwrap();
    fs::write(dir.path().join(CURRENT), b"2\n").unwrap();
    assert_eq!(
        watcher.poll(),
        PollOutcome::Refused {
            fault: "not_a_file",
            repeated: false
        }
    );
    assert_still_forwarding_gen1(&handle);
}

#[test]
fn an_older_generation_is_refused() {
    let dir = TestDir::new();
    let mut w = Writer::open(dir.path()).unwrap();
    for g in 1..=3 {
        w.publish(&table(g)).unwrap();
    }
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 3 });
    // Someone points `current` back at generation 2 (its file is still there).
    assert!(snapshot_path(dir.path(), 2).exists());
    fs::write(dir.path().join(CURRENT), b"2\n").unwrap();
    assert_eq!(
        watcher.poll(),
        PollOutcome::Refused {
            fault: "stale_generation",
            repeated: false
        }
    );
    assert_eq!(handle.generation(), 3);
    assert_eq!(
        watcher.stats.refused_by_fault.get("stale_generation"),
        Some(&1)
    );
    // And the writer will not publish below what `current` names.
    drop(w);
    let mut w = Writer::open(dir.path()).unwrap();
    assert_eq!(w.next_generation(), 4, "continues after the highest file");
    let e = w.publish(&table(3)).unwrap_err();
    assert_eq!(e.label(), "stale_generation", "{e}");
}

/// Mutations of a valid snapshot: (position, new byte) pairs.
fn mutations() -> impl Strategy<Value = Vec<(Index, u8)>> {
    proptest::collection::vec((any::<Index>(), any::<u8>()), 1..6)
}

fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn reference() -> &'static (Table, Vec<u8>) {
    static R: OnceLock<(Table, Vec<u8>)> = OnceLock::new();
    R.get_or_init(|| {
        let t = table(7);
        let b = encode(&t);
        (t, b)
    })
}

proptest! {
    #![proptest_config(proptest_config(1000))]

    /// With the checksums left as they are, a mutated snapshot either decodes
    /// to exactly the original (the mutation changed nothing) or is refused.
    #[test]
    fn mutations_never_panic_and_never_pass_as_another_table(
        muts in mutations(),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let (original, bytes) = reference();
        let mut b = bytes.clone();
        for (at, v) in &muts {
            let i = at.index(b.len());
            b[i] = *v;
        }
        if let Some(cut) = cut {
            b.truncate(cut.index(b.len()));
        }
        if let Ok(t) = decode(&b) {
            prop_assert_eq!(&b, bytes);
            assert_same(&t, original);
        }
    }

    /// With the checksums recomputed after mutating (so validation past the
    /// checksums is exercised), decode never panics and anything it accepts
    /// is a consistent table.
    #[test]
    fn resealed_mutations_never_panic_and_accept_only_consistent_tables(
        muts in proptest::collection::vec((any::<Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let (_, bytes) = reference();
        let mut b = bytes.clone();
        // Half the mutations land in the header and records (the ring is most
        // of the file, and a bad slot is the easiest fault to find).
        // So do the sections after the ring (prefixes and per-node rings).
        let h = header_of(bytes);
        let records_end = h.ring_off as usize + 16;
        let tail = h.source_ranges_off as usize;
        for (at, v, front) in &muts {
            let i = if *front {
                let j = at.index(records_end + (b.len() - tail));
                if j < records_end { j } else { tail + (j - records_end) }
            } else {
                at.index(b.len())
            };
            b[i] = *v;
        }
        seal(&mut b);
        if let Ok(t) = decode(&b) {
            assert_consistent(&t);
        }
    }
}

/// Four readers load the handle in a loop while a writer stores 200
/// generations: every table a reader sees is one generation throughout (all
/// its backends carry that generation's port) and generations never go back.
#[test]
fn workers_never_see_a_mix_of_generations() {
    const GENERATIONS: u64 = 200;
    let handle = Arc::new(TableHandle::new(table(1)));
    let done = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(2);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let handle = Arc::clone(&handle);
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut last = 0;
                let mut seen = BTreeSet::new();
                let mut loads = 0u64;
                while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                    let t = handle.load();
                    let g = t.generation();
                    assert!(g >= last, "generation went back from {last} to {g}");
                    last = g;
                    seen.insert(g);
                    assert_eq!(t.frontends().len(), 11);
                    assert_eq!(t.hash_seed(), 0x5eed_0000 + g);
                    assert!(
                        t.backend_records().iter().all(|b| b.port == g as u16),
                        "generation {g} holds another generation's backends"
                    );
                    for f in t.frontends() {
                        let end = f.ring_start as usize + f.ring_len as usize;
                        assert!(f.ring()[f.ring_start as usize..end]
                            .iter()
                            .all(|&s| u32::from(s) < f.backends_len));
                    }
                    loads += 1;
                }
                (seen, loads)
            })
        })
        .collect();
    let tables: Vec<Arc<Table>> = (2..=GENERATIONS).map(|g| Arc::new(table(g))).collect();
    for t in tables {
        handle.store(t);
        thread::yield_now();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let (seen, loads) = r.join().expect("a reader saw a mix");
        assert!(loads > 0 && !seen.is_empty());
    }
    assert_eq!(handle.generation(), GENERATIONS);
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn writer_keeps_the_newest_two_and_continues_after_a_restart() {
    let dir = TestDir::new();
    let mut w = Writer::open(dir.path()).unwrap();
    assert_eq!(w.next_generation(), 1);
    assert_eq!(read_current(dir.path()).unwrap(), None);
    assert!(load_current(dir.path()).unwrap().is_none());
    for g in 1..=3 {
        assert_eq!(w.next_generation(), g);
        let path = w.publish(&table(g)).unwrap();
        assert_eq!(path, snapshot_path(dir.path(), g));
        assert_same(&load_file(&path).unwrap(), &table(g));
    }
    let expected: BTreeSet<String> = [
        ".lock".to_owned(),
        "current".to_owned(),
        "gen-00000000000000000002.snap".to_owned(),
        "gen-00000000000000000003.snap".to_owned(),
    ]
    .into();
    assert_eq!(names(dir.path()), expected, "no temporary files are left");
    assert_eq!(fs::read_to_string(dir.path().join(CURRENT)).unwrap(), "3\n");
    assert_eq!(read_current(dir.path()).unwrap(), Some(3));
    assert_same(&load_current(dir.path()).unwrap().unwrap(), &table(3));

    // A generation below the next one is refused; nothing changes.
    assert_eq!(
        w.publish(&table(2)).unwrap_err().label(),
        "stale_generation"
    );
    assert_eq!(read_current(dir.path()).unwrap(), Some(3));

    // Control restarts: it continues after the published generation.
    drop(w);
    let mut w = Writer::open(dir.path()).unwrap();
    assert_eq!(w.next_generation(), 4);

    // A second writer on the same directory is refused while this one lives.
    let e = Writer::open(dir.path()).unwrap_err();
    assert!(
        e.to_string().contains(".lock"),
        "the refusal names the lock: {e}"
    );
    assert!(e.to_string().contains("another writer"), "{e}");

    // Something that ignored the lock published meanwhile (a pointer written
    // by hand stands for it): this writer may not go back.
    fs::write(dir.path().join(CURRENT), b"5\n").unwrap();
    assert_eq!(
        w.publish(&table(4)).unwrap_err().label(),
        "stale_generation"
    );
    w.publish(&table(6)).unwrap();
    assert_eq!(read_current(dir.path()).unwrap(), Some(6));
    drop(w);
    assert_eq!(Writer::open(dir.path()).unwrap().next_generation(), 7);

    // Leftover temporary files of a writer that died are cleaned up on open.
    fs::write(
        dir.path().join(".gen-00000000000000000007.snap.tmp"),
        b"half",
    )
    .unwrap();
    let w = Writer::open(dir.path()).unwrap();
    assert_eq!(w.next_generation(), 7);
    assert!(names(dir.path())
        .iter()
        .all(|n| n == ".lock" || !n.starts_with('.')));
}

#[test]
fn writer_continues_after_a_snapshot_file_without_pointer() {
    // Control died between renaming generation 5 into place and updating
    // `current`: a restarted control must not reuse 5.
    let dir = TestDir::new();
    fs::write(snapshot_path(dir.path(), 5), encode(&table(5))).unwrap();
    assert_eq!(Writer::open(dir.path()).unwrap().next_generation(), 6);
    // A garbage `current` is replaced by the next publish.
    fs::write(dir.path().join(CURRENT), b"garbage").unwrap();
    let mut w = Writer::open(dir.path()).unwrap();
    w.publish(&table(6)).unwrap();
    assert_eq!(read_current(dir.path()).unwrap(), Some(6));
}

#[test]
fn watcher_picks_up_new_generations_and_ignores_unchanged_ones() {
    let dir = TestDir::new();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::NothingPublished);
    assert_eq!(handle.generation(), 0);

    let mut w = Writer::open(dir.path()).unwrap();
    w.publish(&table(1)).unwrap();
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 1 });
    assert_eq!(watcher.poll(), PollOutcome::Unchanged);
    let held = handle.load_full();
    w.publish(&table(2)).unwrap();
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 2 });
    assert_eq!(held.generation(), 1, "a worker's table stays whole");
    assert_same(&handle.load(), &table(2));
    assert_eq!(watcher.poll(), PollOutcome::Unchanged);
    assert_eq!(watcher.stats.applied, 2);
    assert_eq!(watcher.stats.refused, 0);
    assert_eq!(watcher.stats.generation, 2);
    drop(held);
    assert_eq!(watcher.poll(), PollOutcome::Unchanged);
}

#[test]
fn restarts_of_either_side_pick_up_where_they_were() {
    let dir = TestDir::new();
    let mut control = Writer::open(dir.path()).unwrap();
    control.publish(&table(1)).unwrap();
    control.publish(&table(2)).unwrap();
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 2 });

    // Control dies: the dataplane keeps its table.
    drop(control);
    assert_eq!(watcher.poll(), PollOutcome::Unchanged);
    assert_eq!(handle.generation(), 2);

    // Control restarts and publishes a newer generation: picked up.
    let mut control = Writer::open(dir.path()).unwrap();
    assert_eq!(control.next_generation(), 3);
    control.publish(&table(3)).unwrap();
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 3 });

    // The dataplane restarts: it maps the current snapshot at start-up.
    drop(watcher);
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir.path(), Arc::clone(&handle));
    assert_eq!(watcher.poll(), PollOutcome::Applied { generation: 3 });
    assert_same(&handle.load(), &table(3));
}

#[test]
fn error_messages_say_what_failed() {
    let good = encode(&small_table(1));
    let msg = |b: &[u8]| decode(b).unwrap_err().to_string();
    assert_eq!(msg(&good[..10]), "truncated: 10 bytes, header needs 320");
    let b = with_header(good.clone(), |h| h.abi_version = 2);
    assert_eq!(msg(&b), "ABI version 2, expected 7");
    let mut b = with_header(good.clone(), |h| h.frontends_count = 100);
    seal(&mut b);
    assert_eq!(
        msg(&b),
        format!(
            "frontends section 320..{} lies outside the body 320..{}",
            320 + 100 * 64,
            good.len()
        )
    );
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    let m = msg(&b);
    assert!(
        m.starts_with("body checksum 0x") && m.contains("does not match header 0x"),
        "{m}"
    );

    let dir = TestDir::new();
    let path = snapshot_path(dir.path(), 1);
    fs::write(&path, &good[..good.len() - 1]).unwrap();
    let e = load_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: truncated: {} bytes, header says the file has {}",
            path.display(),
            good.len() - 1,
            good.len()
        )
    );
    assert!(matches!(e.fault(), SnapshotError::ShortFile { .. }));
}
