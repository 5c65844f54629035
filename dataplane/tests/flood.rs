//! Confirmed flows first, as a user checks it: a flood of new flows (SYN,
//! mid-stream ACK, UDP, fragments) of ten times the connection table's
//! capacity, from spoofed sources, through `clustergate replay` (pcap in,
//! pcap out) and through the pipeline with source NAT; every flow that its
//! backend confirmed before the flood still leaves with exactly the same
//! bytes, during and after it, and the table never holds more than its
//! capacity. And a new flow never takes over a live flow's reply tuple.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clustergate_builder::snapshot;
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack, FlowClass, Timeouts};
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::pipeline::{DropReason, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{ReturnPath, Table};
use clustergate_dataplane::testkit::{self, wire, L4Spec, Tcp};
use clustergate_dataplane::time::Now;
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

const VIP: &str = "198.19.0.10";
const VIP2: &str = "198.19.0.11";
const DSR_VIP: &str = "198.19.0.20";
const B1: &str = "198.18.1.1";
const B2: &str = "198.18.1.2";
const GW: &str = "198.18.2.1";

fn spec(vip: &str, port: u16, proto: Proto, b: &str, bport: u16, rp: ReturnPath) -> ServiceSpec {
    ServiceSpec::cluster_ip(
        vip.parse().unwrap(),
        port,
        proto,
        vec![BackendSpec::ready(b.parse().unwrap(), bport)],
    )
    .with_return_path(rp)
}

fn tcp(src: Addr16, sport: u16, dst: Addr16, dport: u16, f: Tcp, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(src, sport, dst, dport, L4Spec::Tcp(f), payload)
}

fn udp(src: Addr16, sport: u16, dst: Addr16, dport: u16, payload: &[u8]) -> Vec<u8> {
    testkit::client_frame(src, sport, dst, dport, L4Spec::Udp, payload)
}

/// The `n`-th spoofed source of a flood: 198.19.128.0/17, inside the
/// benchmarking range (RFC 2544) and away from every address above.
fn spoofed(n: u32) -> (Addr16, u16) {
    let src = a(&format!("198.19.{}.{}", 128 + (n >> 8) % 128, n & 0xff));
    (src, 1024 + (n % 60_000) as u16)
}

/// The `n`-th frame of a flood of new flows to `vip` (and `dsr_vip` when
/// given): SYN, mid-stream ACK, UDP, and a UDP datagram in two fragments,
/// in turn.
fn flood_frames(n: u32, vip: Addr16, dsr_vip: Option<Addr16>) -> Vec<Vec<u8>> {
    let (src, sport) = spoofed(n);
    let dst = match (dsr_vip, n % 7) {
        (Some(d), 0) => d,
        _ => vip,
    };
    match n % 4 {
        0 => vec![tcp(src, sport, dst, 80, Tcp::syn(n), b"")],
        1 => vec![tcp(src, sport, dst, 80, Tcp::ack(n, 7), b"x")],
        2 => vec![udp(src, sport, vip, 53, b"query")],
        _ => {
            let dgram = testkit::udp_datagram(src, vip, sport, 53, 64);
            let id = (n & 0xffff) as u16;
            vec![
                testkit::ipv4_raw(src, vip, 17, id, (0, true), &dgram[..32]),
                testkit::ipv4_raw(src, vip, 17, id, (4, false), &dgram[32..]),
            ]
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("clustergate-flood-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pcap of `frames`, each at its own time (seconds after 1 700 000 000).
fn write_pcap(path: &Path, frames: &[(f64, Vec<u8>)]) {
    let mut w = PcapWriter::new(File::create(path).unwrap()).unwrap();
    for (t, f) in frames {
        let ts = Duration::from_secs(1_700_000_000) + Duration::from_secs_f64(*t);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

/// One input packet's verdict line and the frame it wrote, if any.
type Outcome = (String, Option<Vec<u8>>);

/// Runs `clustergate replay`; returns its stderr and, per input packet
/// (from 1), its verdict line and the frame it wrote, if any.
fn replay(
    dir: &Path,
    table: &Table,
    frames: &[(f64, Vec<u8>)],
    flows: usize,
) -> (String, Vec<Outcome>) {
    let snap = dir.join("table.snap");
    std::fs::write(&snap, snapshot::encode(table)).unwrap();
    let input = dir.join("in.pcap");
    write_pcap(&input, frames);
    let run = Command::new(env!("CARGO_BIN_EXE_clustergate"))
        .args(["replay", "--snapshot"])
        .arg(&snap)
        .arg("--pcap")
        .arg(&input)
        .arg("--out")
        .arg(dir.join("out.pcap"))
        .arg("--verdicts")
        .arg(dir.join("verdicts.txt"))
        .args(["--flows", &flows.to_string(), "--snat-address", GW])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "replay failed: {stderr}");
    let mut written = Vec::new();
    let mut r = PcapReader::new(File::open(dir.join("out.pcap")).unwrap()).unwrap();
    while let Some(p) = r.next_packet() {
        written.push(p.unwrap().data.to_vec());
    }
    let mut written = written.into_iter();
    let lines = std::fs::read_to_string(dir.join("verdicts.txt")).unwrap();
    let per_packet: Vec<Outcome> = lines
        .lines()
        .map(|l| {
            let out = (l.contains(" forward ") || l.contains(" reject ")).then(|| {
                written
                    .next()
                    .expect("a written frame per forward and reject")
            });
            (l.to_owned(), out)
        })
        .collect();
    assert_eq!(per_packet.len(), frames.len());
    (stderr, per_packet)
}

/// `NAME N` in a summary line, as a number.
fn field(summary: &str, name: &str) -> u64 {
    let at = summary
        .find(name)
        .unwrap_or_else(|| panic!("{name:?} not in {summary}"));
    summary[at + name.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name:?} has no number in {summary}"))
}

/// `class=N` of one class in a summary line's `evicted unconfirmed` part.
fn evicted(summary: &str, class: FlowClass) -> u64 {
    let part = &summary[summary.find("evicted unconfirmed").unwrap()..];
    let part = &part[..part.find("refused").unwrap()];
    part.find(&format!("{}=", class.label()))
        .map_or(0, |_| field(part, &format!("{}=", class.label())))
}

/// What a confirmed flow sends and gets: the frames of one probe round.
struct Probes {
    frames: Vec<Vec<u8>>,
}

#[test]
fn a_flood_through_replay_loses_no_confirmed_flow() {
    let dir = TempDir::new("replay");
    let table = Table::build(
        3,
        0,
        &[
            spec(VIP, 80, Proto::Tcp, B1, 8080, ReturnPath::Routed),
            spec(VIP, 53, Proto::Udp, B1, 5353, ReturnPath::Routed),
            spec(DSR_VIP, 80, Proto::Tcp, B2, 80, ReturnPath::Dsr),
        ],
    )
    .unwrap();
    let (vip, dsr_vip, b1) = (a(VIP), a(DSR_VIP), a(B1));
    let client = |i: u32| (a(&format!("198.18.0.{}", 1 + i / 100)), 20_000 + i as u16);

    // 300 routed TCP connections, 100 routed UDP streams, 100 DSR TCP
    // connections, each confirmed by its backend (or, for DSR, by the
    // client's ACK completing a handshake the gateway saw).
    let mut setup: Vec<(f64, Vec<u8>)> = Vec::new();
    let mut probes = Probes { frames: Vec::new() };
    for i in 0..500u32 {
        let (c, cp) = client(i);
        match i {
            0..300 => {
                setup.push((0.0, tcp(c, cp, vip, 80, Tcp::syn(1), b"")));
                let synack = Tcp {
                    syn: true,
                    ack: Some(2),
                    seq: 9,
                    ..Tcp::default()
                };
                setup.push((0.0, tcp(b1, 8080, c, cp, synack, b"")));
                setup.push((0.0, tcp(c, cp, vip, 80, Tcp::ack(2, 10), b"GET /")));
                setup.push((0.0, tcp(b1, 8080, c, cp, Tcp::ack(10, 7), b"200 OK")));
                // The reply first: a flow that lost its entries would be
                // picked up again by its client's next packet, but a reply
                // before it would leave un-NATed.
                probes
                    .frames
                    .push(tcp(b1, 8080, c, cp, Tcp::ack(16, 11), b"data"));
                probes
                    .frames
                    .push(tcp(c, cp, vip, 80, Tcp::ack(7, 16), b"more"));
            }
            300..400 => {
                setup.push((0.0, udp(c, cp, vip, 53, b"q1")));
                setup.push((0.0, udp(b1, 5353, c, cp, b"a1")));
                // Still talking two seconds in: a stream, confirmed.
                setup.push((2.5, udp(c, cp, vip, 53, b"q2")));
                probes.frames.push(udp(b1, 5353, c, cp, b"a3"));
                probes.frames.push(udp(c, cp, vip, 53, b"q3"));
            }
            _ => {
                setup.push((0.0, tcp(c, cp, dsr_vip, 80, Tcp::syn(1), b"")));
                setup.push((0.0, tcp(c, cp, dsr_vip, 80, Tcp::ack(2, 10), b"")));
                probes
                    .frames
                    .push(tcp(c, cp, dsr_vip, 80, Tcp::ack(2, 10), b"more"));
            }
        }
    }
    setup.sort_by(|x, y| x.0.total_cmp(&y.0));

    // The table's capacity, from a run of the set-up alone.
    let (summary, _) = replay(&dir.0, &table, &setup, 1024);
    let capacity = field(&summary, "(capacity") as u32;
    assert!(capacity >= 1024, "{summary}");

    // Set-up; a probe round (the reference); the flood of ten times the
    // capacity in new flows, with a probe round after every 2 000 of them;
    // a last probe round.
    let mut frames = setup.clone();
    let mut rounds = Vec::new();
    let mut round = |frames: &mut Vec<(f64, Vec<u8>)>, t: f64| {
        rounds.push(frames.len());
        frames.extend(probes.frames.iter().map(|f| (t, f.clone())));
    };
    round(&mut frames, 3.0);
    let flood_flows = 10 * capacity;
    for n in 0..flood_flows {
        let t = 4.0 + f64::from(n) / f64::from(flood_flows);
        frames.extend(
            flood_frames(n, vip, Some(dsr_vip))
                .into_iter()
                .map(|f| (t, f)),
        );
        if n % 2000 == 1999 {
            round(&mut frames, t);
        }
    }
    round(&mut frames, 6.0);

    let (summary, out) = replay(&dir.0, &table, &frames, 1024);
    eprintln!("{summary}");
    let reference: Vec<&Outcome> = out[rounds[0]..rounds[0] + probes.frames.len()]
        .iter()
        .collect();
    for (k, r) in reference.iter().enumerate() {
        assert!(
            r.0.contains(" forward "),
            "probe {k} before the flood: {}",
            r.0
        );
    }
    // Every probe round, during and after the flood, is forwarded and
    // NATed exactly as before it: the same bytes.
    for (n, &start) in rounds.iter().enumerate().skip(1) {
        for (k, r) in reference.iter().enumerate() {
            let got = &out[start + k];
            assert_eq!(
                got.1, r.1,
                "round {n}, probe {k}: {} (before the flood: {})",
                got.0, r.0
            );
        }
    }
    // The reference is what a user expects: requests to the backend,
    // replies from the frontend, DSR encapsulated to its backend.
    let w = wire(reference[0].1.as_ref().unwrap());
    assert_eq!((w.src, w.sport, w.dst), (vip, 80, client(0).0));
    let w = wire(reference[1].1.as_ref().unwrap());
    assert_eq!((w.dst, w.dport), (b1, 8080));
    let w = wire(reference[probes.frames.len() - 1].1.as_ref().unwrap());
    assert_eq!(w.outer.map(|o| o.1), Some(a(B2)));

    let entries = field(&summary, "conntrack:");
    assert!(entries <= u64::from(capacity), "{summary}");
    assert_eq!(field(&summary, "refused"), 0, "{summary}");
    for c in [FlowClass::TcpSyn, FlowClass::TcpMidstream, FlowClass::Udp] {
        assert!(evicted(&summary, c) > 0, "no {c:?} evicted: {summary}");
    }
    assert!(
        field(&summary, "evicted unconfirmed") >= u64::from(flood_flows - capacity),
        "{summary}"
    );
}

/// The same flood through the pipeline, against source-NATed flows (whose
/// port the gateway picks, so the backend's replies are built from what
/// came out) and routed ones, with a table of 16 shards.
#[test]
fn a_flood_loses_no_confirmed_source_nated_flow() {
    let table = Table::build(
        1,
        0,
        &[
            spec(VIP, 80, Proto::Tcp, B1, 8080, ReturnPath::Snat),
            spec(VIP, 53, Proto::Udp, B1, 5353, ReturnPath::Snat),
        ],
    )
    .unwrap();
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: 2048,
        shards: 16,
        partitions: 1,
        affinity_capacity: 64,
        fragment_capacity: 1024,
        timeouts: Timeouts::default(),
    }));
    let mut w = Worker::with_config(
        Arc::clone(&ct),
        ReturnConfig {
            ports: PortRange::new(20_000, 60_999).unwrap(),
            ..ReturnConfig::default()
        },
    );
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(a(GW)),
        v6: None,
    })));
    let run = |w: &mut Worker, now: Now, f: &[u8]| {
        let (mut buf, len) = testkit::to_buf(f);
        match w.process(now, &table, &mut buf, len) {
            Verdict::Forward { len, .. } => Some(buf[..len].to_vec()),
            _ => None,
        }
    };
    let (vip, b1, gw) = (a(VIP), a(B1), a(GW));
    let t0 = Now::from_secs(1000);
    let mut probes = Vec::new();
    for i in 0..1200u32 {
        let c = a(&format!("198.18.0.{}", 1 + i / 200));
        let cp = 20_000 + i as u16;
        if i % 2 == 0 {
            let out = run(&mut w, t0, &tcp(c, cp, vip, 80, Tcp::syn(1), b"")).unwrap();
            let sp = wire(&out).sport;
            let back = |f, p: &[u8]| tcp(b1, 8080, gw, sp, f, p);
            run(&mut w, t0, &back(Tcp::ack(9, 2), b"hello")).unwrap();
            probes.push(back(Tcp::ack(15, 6), b"data"));
            probes.push(tcp(c, cp, vip, 80, Tcp::ack(2, 15), b"more"));
        } else {
            let out = run(&mut w, t0, &udp(c, cp, vip, 53, b"q1")).unwrap();
            let sp = wire(&out).sport;
            run(&mut w, t0, &udp(b1, 5353, gw, sp, b"a1")).unwrap();
            run(&mut w, t0.plus_secs(2), &udp(c, cp, vip, 53, b"q2")).unwrap();
            probes.push(udp(b1, 5353, gw, sp, b"a3"));
            probes.push(udp(c, cp, vip, 53, b"q3"));
        }
    }
    let now = t0.plus_secs(3);
    let reference: Vec<Vec<u8>> = probes
        .iter()
        .map(|p| run(&mut w, now, p).expect("a probe before the flood"))
        .collect();
    let before = ct.stats();
    let cap = ct.capacity() as u32;
    for n in 0..10 * cap {
        for f in flood_frames(n, vip, None) {
            let _ = run(&mut w, now, &f);
        }
        assert!(ct.len() <= cap as usize);
        if n % 4000 == 3999 || n == 10 * cap - 1 {
            for (k, p) in probes.iter().enumerate() {
                assert_eq!(
                    run(&mut w, now, p).as_ref(),
                    Some(&reference[k]),
                    "probe {k} after {n} flood flows"
                );
            }
        }
    }
    let s = ct.stats();
    assert!(
        s.evicted_total() - before.evicted_total() >= u64::from(9 * cap),
        "{s:?}"
    );
    assert_eq!(s.refused_total(), 0, "{s:?}");
    assert_eq!(w.counters.dropped(DropReason::ConntrackFull), 0);
}

/// Two Services share an endpoint, and one client port opens a flow to
/// each. Routed: the second is refused (`flow_clash`) and the first keeps
/// its replies, which leave from its own frontend. Source NAT: the second
/// gets another port, and each connection's replies leave from its own
/// frontend to the client's port. DSR: the backend sees two different
/// tuples (each VIP is its destination), so both are forwarded.
#[test]
fn a_new_flow_never_takes_over_a_live_flows_replies() {
    let (vip1, vip2, b1, gw) = (a(VIP), a(VIP2), a(B1), a(GW));
    let c = a("198.18.0.1");
    let now = Now::from_secs(100);
    let mut outcome = BTreeMap::new();
    for rp in [ReturnPath::Routed, ReturnPath::Snat, ReturnPath::Dsr] {
        let table = Table::build(
            1,
            0,
            &[
                spec(VIP, 80, Proto::Tcp, B1, 8080, rp),
                spec(VIP2, 80, Proto::Tcp, B1, 8080, rp),
            ],
        )
        .unwrap();
        let ct = Arc::new(Conntrack::new(&Config {
            capacity: 1024,
            shards: 4,
            partitions: 1,
            ..Config::default()
        }));
        let mut w = Worker::new(Arc::clone(&ct));
        w.set_sources(Some(Arc::new(FixedSources {
            v4: Some(gw),
            v6: None,
        })));
        let mut run = |f: &[u8]| {
            let (mut buf, len) = testkit::to_buf(f);
            let v = w.process(now, &table, &mut buf, len);
            let out = match v {
                Verdict::Forward { len, .. } => Some(wire(&buf[..len])),
                _ => None,
            };
            (v, out)
        };
        let (_, first) = run(&tcp(c, 40000, vip1, 80, Tcp::syn(1), b""));
        let first = first.expect("the first flow is forwarded");
        let (v2, second) = run(&tcp(c, 40000, vip2, 80, Tcp::syn(5), b""));
        match rp {
            ReturnPath::Routed => {
                assert_eq!(v2, Verdict::Drop(DropReason::FlowClash));
                assert_eq!(ct.stats().clashes, 1);
                // The first connection's replies still leave from its frontend.
                let (_, r) = run(&tcp(b1, 8080, c, 40000, Tcp::ack(9, 2), b"first"));
                let r = r.unwrap();
                assert_eq!((r.src, r.sport, r.dst, r.dport), (vip1, 80, c, 40000));
                assert_eq!(r.payload, b"first");
            }
            ReturnPath::Snat => {
                let second = second.expect("the second flow is forwarded");
                assert_eq!(first.src, gw);
                assert_eq!(second.src, gw);
                assert_ne!(first.sport, second.sport, "another source port");
                for (port, vip, data) in [
                    (first.sport, vip1, &b"first"[..]),
                    (second.sport, vip2, b"second"),
                ] {
                    let (_, r) = run(&tcp(b1, 8080, gw, port, Tcp::ack(9, 2), data));
                    let r = r.unwrap();
                    assert_eq!((r.src, r.sport, r.dst, r.dport), (vip, 80, c, 40000));
                    assert_eq!(r.payload, data);
                }
            }
            _ => {
                let second = second.expect("the second flow is forwarded");
                assert_eq!(first.dst, vip1);
                assert_eq!(second.dst, vip2);
                assert_eq!(first.outer.map(|o| o.1), Some(b1));
            }
        }
        outcome.insert(format!("{rp:?}"), ct.stats().clashes);
    }
    assert_eq!(outcome.values().sum::<u64>(), 1, "{outcome:?}");
}
