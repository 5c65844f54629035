//! Workers that own their flows: each holds its partition of the connection
//! table for a whole batch, and hands the frames of other workers' flows to
//! them (`Verdict::Handoff`). Frames arrive at workers as a NIC's RSS spreads
//! them (a hash unrelated to ownership), requests and replies on different
//! workers, from threads running at the same time. What a user checks:
//! every reply is reverse-NATed to the client with the frontend as its
//! source, a flow keeps one backend from its first packet to its last, the
//! source-NAT ports never collide, and every frame is decided by exactly one
//! worker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Barrier, Mutex};

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::packet::parse::Family;
use clustergate_dataplane::pipeline::{Frame, Ownership, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{ReturnPath, Table};
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp};
use clustergate_dataplane::time::Now;
use crossbeam_queue::ArrayQueue;

const WORKERS: usize = 4;
const FLOWS: u32 = 3000;
const NOW: Now = Now(100_000_000_000);
const GW: &str = "198.18.2.1";

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

fn vip(i: u32) -> Addr16 {
    addr16(IpAddr::from([198, 19, 0, 10 + (i % 4) as u8]))
}

/// Four services: two routed, two source-NATed, each with eight backends.
fn table() -> Table {
    let specs: Vec<ServiceSpec> = (0..4u32)
        .map(|s| {
            let backends = (0..8u8)
                .map(|b| BackendSpec::ready(IpAddr::from([198, 18, 1 + s as u8, 1 + b]), 8080))
                .collect();
            let rp = if s % 2 == 0 {
                ReturnPath::Routed
            } else {
                ReturnPath::Snat
            };
            ServiceSpec::cluster_ip(
                clustergate_dataplane::flow::ip_from16(vip(s)),
                80,
                Proto::Tcp,
                backends,
            )
            .with_return_path(rp)
        })
        .collect();
    Table::build(1, 0, &specs).unwrap()
}

fn client(i: u32) -> (Addr16, u16) {
    (
        addr16(IpAddr::from([
            198,
            18,
            128 + (i % 64) as u8,
            (i / 64) as u8,
        ])),
        10_000 + (i % 5000) as u16,
    )
}

fn snat_range() -> PortRange {
    PortRange::new(20_000, 59_999).unwrap()
}

fn workers(ct: &Arc<Conntrack>) -> Vec<Worker> {
    let range = snat_range();
    let shares = range.split(WORKERS).unwrap();
    (0..WORKERS)
        .map(|i| {
            let mut w = Worker::with_ownership(
                Arc::clone(ct),
                ReturnConfig {
                    ports: shares[i],
                    ..ReturnConfig::default()
                },
                Ownership {
                    index: i as u16,
                    count: WORKERS as u16,
                    snat: range,
                },
            );
            w.set_sources(Some(Arc::new(FixedSources {
                v4: Some(a(GW)),
                v6: None,
            })));
            w
        })
        .collect()
}

/// RSS: which worker a frame arrives at, from its whole 5-tuple (seeded,
/// symmetric in nothing, unrelated to ownership).
fn rss(frame: &[u8]) -> usize {
    let w = wire(frame);
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for x in w.src.iter().chain(w.dst.iter()) {
        h = (h ^ u64::from(*x)).wrapping_mul(0x1000_0000_01b3);
    }
    h = (h ^ u64::from(w.sport) << 16 ^ u64::from(w.dport)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h >> 40) as usize % WORKERS
}

/// One frame's outcome: which worker decided it, and what came out.
#[derive(Debug, Clone)]
struct Out {
    decided_by: usize,
    verdict: Verdict,
    bytes: Vec<u8>,
}

/// Runs `frames` through the workers on `WORKERS` threads at once: each
/// thread takes the frames RSS gives it in batches, hands the others' over
/// rings, and works through what it is handed until every frame is decided.
fn run(ws: &mut [Worker], t: &Table, frames: &[Vec<u8>]) -> Vec<Out> {
    let inbox: Vec<ArrayQueue<usize>> = (0..WORKERS)
        .map(|_| ArrayQueue::new(frames.len().max(1)))
        .collect();
    let decided = Mutex::new(vec![None::<Out>; frames.len()]);
    let remaining = std::sync::atomic::AtomicUsize::new(frames.len());
    let barrier = Barrier::new(WORKERS);
    std::thread::scope(|s| {
        for (me, w) in ws.iter_mut().enumerate() {
            let (inbox, decided, remaining, barrier) = (&inbox, &decided, &remaining, &barrier);
            s.spawn(move || {
                let mine: Vec<usize> = (0..frames.len())
                    .filter(|&i| rss(&frames[i]) == me)
                    .collect();
                barrier.wait();
                let batch = |ids: &[usize], w: &mut Worker| {
                    let mut bufs: Vec<Vec<u8>> = ids
                        .iter()
                        .map(|&i| {
                            let mut b = frames[i].clone();
                            b.resize(testkit::BUF_LEN, 0);
                            b
                        })
                        .collect();
                    let mut fr: Vec<Frame<'_>> = bufs
                        .iter_mut()
                        .zip(ids)
                        .map(|(b, &i)| Frame {
                            buf: b,
                            len: frames[i].len(),
                        })
                        .collect();
                    let mut vs = vec![Verdict::Pass; ids.len()];
                    w.process_batch(NOW, t, &mut fr, &mut vs);
                    drop(fr);
                    for ((&i, v), b) in ids.iter().zip(vs).zip(bufs) {
                        match v {
                            Verdict::Handoff { owner } => {
                                assert_ne!(usize::from(owner), me, "a worker hands off to itself");
                                assert_eq!(
                                    b[..frames[i].len()],
                                    frames[i][..],
                                    "handed off changed"
                                );
                                inbox[usize::from(owner)].push(i).unwrap();
                            }
                            v => {
                                let len = match v {
                                    Verdict::Forward { len, .. } | Verdict::Reject { len } => len,
                                    _ => frames[i].len(),
                                };
                                let mut d = decided.lock().unwrap();
                                assert!(d[i].is_none(), "frame {i} decided twice");
                                d[i] = Some(Out {
                                    decided_by: me,
                                    verdict: v,
                                    bytes: b[..len].to_vec(),
                                });
                                remaining.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                };
                for chunk in mine.chunks(64) {
                    batch(chunk, w);
                }
                // What others hand over, until every frame is decided (a
                // handed frame is never handed on: its owner decides it).
                let start = std::time::Instant::now();
                while remaining.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    let mut got = Vec::new();
                    while let Some(i) = inbox[me].pop() {
                        got.push(i);
                        if got.len() == 64 {
                            break;
                        }
                    }
                    if got.is_empty() {
                        assert!(start.elapsed().as_secs() < 30, "frames were lost");
                        std::thread::yield_now();
                        continue;
                    }
                    batch(&got, w);
                }
            });
        }
    });
    decided
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|o| o.expect("every frame decided"))
        .collect()
}

#[test]
fn owners_decide_their_flows_and_every_reply_is_reverse_natted() {
    let t = table();
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 4 * FLOWS as usize,
        shards: 64,
        partitions: WORKERS,
        ..Config::default()
    }));
    let mut ws = workers(&ct);

    // 1. A SYN per flow.
    let syns: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| {
            let (c, p) = client(i);
            testkit::client_frame(c, p, vip(i), 80, L4Spec::Tcp(Tcp::syn(1)), b"")
        })
        .collect();
    let out = run(&mut ws, &t, &syns);
    let mut backend = Vec::new();
    let mut owner = Vec::new();
    let mut snat_tuples = BTreeSet::new();
    for (i, o) in out.iter().enumerate() {
        assert!(
            matches!(o.verdict, Verdict::Forward { .. }),
            "SYN {i}: {:?}",
            o.verdict
        );
        let w = wire(&o.bytes);
        let (c, p) = client(i as u32);
        if i % 2 == 0 {
            assert_eq!((w.src, w.sport), (c, p), "routed: the client's own address");
        } else {
            assert_eq!(w.src, a(GW), "source NAT: the gateway's address");
            assert!(snat_range().contains(w.sport));
            assert!(
                snat_tuples.insert((w.sport, w.dst, w.dport)),
                "flow {i}: SNAT port {} reused towards the same backend",
                w.sport
            );
            // The port's replies belong to the worker that picked it.
            assert_eq!(
                ct.owner(Family::V4, &w.src, w.sport, Proto::Tcp),
                o.decided_by,
                "flow {i}: its port's replies go to another worker"
            );
        }
        assert_eq!(ct.owner(Family::V4, &c, p, Proto::Tcp), o.decided_by);
        backend.push((w.dst, w.dport));
        owner.push(o.decided_by);
    }
    let handed: u64 = ws.iter().map(|w| w.counters.handoffs).sum();
    assert!(
        handed > u64::from(FLOWS) / 2,
        "RSS puts most frames on another worker than the owner: {handed} hand-offs"
    );
    assert_eq!(
        owner.iter().collect::<BTreeSet<_>>().len(),
        WORKERS,
        "every worker owns flows"
    );

    // 2. Each backend's SYN-ACK, arriving wherever RSS puts the reply
    //    tuple: reverse-NATed to the client, from the frontend.
    let replies: Vec<Vec<u8>> = out
        .iter()
        .map(|o| {
            let w = wire(&o.bytes);
            let synack = Tcp {
                syn: true,
                ack: Some(2),
                seq: 7000,
                ..Tcp::default()
            };
            testkit::client_frame(w.dst, w.dport, w.src, w.sport, L4Spec::Tcp(synack), b"")
        })
        .collect();
    let back = run(&mut ws, &t, &replies);
    let mut elsewhere = 0;
    for (i, o) in back.iter().enumerate() {
        assert!(
            matches!(o.verdict, Verdict::Forward { .. }),
            "reply {i}: {:?}",
            o.verdict
        );
        let w = wire(&o.bytes);
        let (c, p) = client(i as u32);
        assert_eq!(
            (w.src, w.sport),
            (vip(i as u32), 80),
            "reply {i}: from the frontend"
        );
        assert_eq!((w.dst, w.dport), (c, p), "reply {i}: to the client");
        assert_eq!(
            o.decided_by, owner[i],
            "reply {i}: decided by the flow's owner"
        );
        if rss(&replies[i]) != rss(&syns[i]) {
            elsewhere += 1;
        }
    }
    assert!(
        elsewhere > FLOWS / 2,
        "replies mostly arrive on other workers: {elsewhere}"
    );

    // 3. Data from the clients, three rounds, in a shuffled order: every
    //    packet reaches the backend the SYN got.
    let mut data = Vec::new();
    for round in 0..3u32 {
        for k in 0..FLOWS {
            let i = (k * 7919 + round * 13) % FLOWS;
            let (c, p) = client(i);
            data.push((
                i,
                testkit::client_frame(
                    c,
                    p,
                    vip(i),
                    80,
                    L4Spec::Tcp(Tcp::ack(2 + round, 7001)),
                    b"x",
                ),
            ));
        }
    }
    let frames: Vec<Vec<u8>> = data.iter().map(|(_, f)| f.clone()).collect();
    let fwd = run(&mut ws, &t, &frames);
    let mut seen: BTreeMap<u32, (Addr16, u16)> = BTreeMap::new();
    for ((i, _), o) in data.iter().zip(&fwd) {
        assert!(
            matches!(o.verdict, Verdict::Forward { .. }),
            "{:?}",
            o.verdict
        );
        let w = wire(&o.bytes);
        assert_eq!(
            (w.dst, w.dport),
            backend[*i as usize],
            "flow {i} changed backend"
        );
        assert_eq!(
            *seen.entry(*i).or_insert((w.dst, w.dport)),
            (w.dst, w.dport)
        );
        assert_eq!(o.decided_by, owner[*i as usize]);
    }
    assert_eq!(ct.len(), FLOWS as usize, "one entry per flow");
    let forwarded: u64 = ws.iter().map(|w| w.counters.new_flows).sum();
    assert_eq!(forwarded, u64::from(FLOWS), "each flow bound once");
}

/// A worker that owns its flows takes source-NAT ports whose replies come
/// back to it, and can still use most of the range: many flows from one
/// worker towards one backend get distinct ports.
#[test]
fn an_owner_takes_only_ports_whose_replies_come_back_to_it() {
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 1 << 14,
        shards: 16,
        partitions: 4,
        ..Config::default()
    }));
    let t = table();
    let mut ws = workers(&ct);
    let mut ports = BTreeSet::new();
    let mut n = 0;
    for i in 0..20_000u32 {
        let c = addr16(IpAddr::from([198, 18, 200, (i % 200) as u8]));
        let p = 1024 + (i / 200) as u16;
        // Service 1: source-NATed; its backends hash the same for a given client.
        let o = ct.owner(Family::V4, &c, p, Proto::Tcp);
        if o != 2 {
            continue;
        }
        let f = testkit::client_frame(c, p, vip(1), 80, L4Spec::Tcp(Tcp::syn(1)), b"");
        let (mut buf, len) = testkit::to_buf(&f);
        let v = ws[2].process(NOW, &t, &mut buf, len);
        let Verdict::Forward { len, .. } = v else {
            panic!("{v:?}")
        };
        let w = wire(&buf[..len]);
        assert_eq!(ct.owner(Family::V4, &w.src, w.sport, Proto::Tcp), 2);
        assert!(
            ports.insert((w.sport, w.dst)),
            "port reused towards {:?}",
            w.dst
        );
        n += 1;
        if n == 2000 {
            break;
        }
    }
    assert_eq!(n, 2000);
    assert_eq!(ws[2].counters.handoffs, 0);
}

/// A fragmented datagram whose fragments all reach a worker that does not
/// own the flow (a NIC hashes fragments by their addresses, having no
/// ports): the first fragment is decided there, in the owner's partition,
/// and the others, which carry no ports, follow its rewrite; the reply's
/// fragments come back the same way. Nothing is handed off, nothing lost.
#[test]
fn fragments_that_reach_another_worker_follow_their_first_fragment() {
    let t = table();
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 1 << 12,
        shards: 16,
        partitions: WORKERS,
        ..Config::default()
    }));
    let mut ws = workers(&ct);
    let vip1 = vip(1); // source-NATed
    let mut checked = 0;
    for i in 0..64u16 {
        let c = addr16(IpAddr::from([198, 18, 130, 1 + i as u8]));
        let port = 5000 + i;
        let owner = ct.owner(Family::V4, &c, port, Proto::Tcp);
        let here = (owner + 1) % WORKERS;
        // The services are TCP: a SYN with data, its segment in fragments.
        let seg = testkit::client_frame(c, port, vip1, 80, L4Spec::Tcp(Tcp::syn(1)), &[7u8; 1200]);
        // The IP payload (TCP header + data), cut in two fragments.
        let payload = &seg[34..];
        let cut = 800;
        let first = testkit::ipv4_raw(c, vip1, 6, 900 + i, (0, true), &payload[..cut]);
        let rest = testkit::ipv4_raw(
            c,
            vip1,
            6,
            900 + i,
            ((cut / 8) as u16, false),
            &payload[cut..],
        );
        let mut outs = Vec::new();
        for f in [&first, &rest] {
            let (mut buf, len) = testkit::to_buf(f);
            let v = ws[here].process(NOW, &t, &mut buf, len);
            let Verdict::Forward { len, .. } = v else {
                panic!("datagram {i}: a fragment was not forwarded by worker {here}: {v:?}")
            };
            outs.push(buf[..len].to_vec());
        }
        let src = |o: &Vec<u8>| [o[26], o[27], o[28], o[29]];
        let dst = |o: &Vec<u8>| [o[30], o[31], o[32], o[33]];
        assert_eq!(
            src(&outs[0]),
            [198, 18, 2, 1],
            "the first fragment is source-NATed"
        );
        assert_eq!(src(&outs[1]), src(&outs[0]), "the other fragment follows");
        assert_eq!(dst(&outs[1]), dst(&outs[0]), "to the same backend");
        // The gateway's port is the owner's: its replies go there.
        let sport = u16::from_be_bytes([outs[0][34], outs[0][35]]);
        assert_eq!(ct.owner(Family::V4, &a(GW), sport, Proto::Tcp), owner);
        checked += 1;
    }
    assert_eq!(checked, 64);
    assert_eq!(ws.iter().map(|w| w.counters.handoffs).sum::<u64>(), 0);
}
