//! Katran-style fixture table for `Worker::process`.
//!
//! Each case is a short list of steps (most have one) that share one
//! [`Worker`] and a fresh [`Conntrack`]; every step is a frame, the verdict
//! expected for it, and checks on the bytes that come out. Frames are built
//! with `testkit`, etherparse's `PacketBuilder`, or by hand. Outputs are
//! checked against an independent model: the input with only the NAT fields,
//! the TTL and the checksum fields changed, and every checksum recomputed in
//! full by etherparse (SCTP: `checksum::sctp_crc32c`).
//!
//! Generic checks the runner makes for every step:
//! - `Pass`: the whole buffer is unchanged.
//! - `Forward`: the length is the input's and nothing past it was written.
//! - `Reject`: nothing past the reject (or the input, whichever is longer).
//! - `Drop`: nothing past the input was written.
//!
//! Addresses: 198.18.0.0/15 and 2001:db8::/32 only (and, in one bug test,
//! the IPv4-mapped IPv6 form of a 198.19.0.0/16 address).
//!
//! Tests whose doc comment starts with "LIBRARY BUG" assert the correct
//! behaviour the library does not have yet: they fail until it is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{ip_from16, v4_to_16, Addr16, Proto};
use clustergate_dataplane::packet::checksum::sctp_crc32c;
use clustergate_dataplane::pipeline::{Counters, DropReason, Side, Verdict, VerdictKind, Worker};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{
    self, client_frame, ethernet, frame, icmp_error, ipv4_raw, ipv6_fragment, to_buf, udp_datagram,
    L4Spec, Tcp, BUF_LEN, CLIENT_MAC, GATEWAY_MAC,
};
use clustergate_dataplane::time::Now;
use etherparse::{
    ip_number, EtherType, Icmpv4Header, Icmpv6Header, IpHeaders, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader, NetSlice, PacketBuilder, SlicedPacket, TcpHeader,
    TransportSlice, UdpHeader,
};

// ---------------------------------------------------------------------------
// Addresses and the service table
// ---------------------------------------------------------------------------

const NOW: Now = Now(1_000_000_000_000);

const C4: Addr16 = v4_to_16([198, 18, 0, 1]);
const VIP4: Addr16 = v4_to_16([198, 19, 0, 10]);
const B1: Addr16 = v4_to_16([198, 18, 1, 1]);
const B2: Addr16 = v4_to_16([198, 18, 1, 2]);
const EMPTY4: Addr16 = v4_to_16([198, 19, 0, 12]);
const OTHER4: Addr16 = v4_to_16([198, 19, 0, 99]);

/// 2001:db8:2::1
const C6: Addr16 = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 2001:db8::10
const VIP6: Addr16 = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
/// 2001:db8:1::1
const B6: Addr16 = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 2001:db8::12
const EMPTY6: Addr16 = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12,
];

const TCP_BPORT: u16 = 8080;
const UDP_BPORT: u16 = 5353;
const SCTP_PORT: u16 = 3868;
const SCTP_BPORT: u16 = 38680;

fn svc(addr: Addr16, port: u16, proto: Proto, backends: &[(Addr16, u16)]) -> ServiceSpec {
    ServiceSpec::cluster_ip(
        ip_from16(addr),
        port,
        proto,
        backends
            .iter()
            .map(|(a, p)| BackendSpec::ready(ip_from16(*a), *p))
            .collect(),
    )
}

fn table() -> Table {
    let services = [
        svc(VIP4, 80, Proto::Tcp, &[(B1, TCP_BPORT), (B2, TCP_BPORT)]),
        svc(VIP4, 53, Proto::Udp, &[(B1, UDP_BPORT)]),
        svc(VIP4, SCTP_PORT, Proto::Sctp, &[(B1, SCTP_BPORT)]),
        svc(VIP6, 80, Proto::Tcp, &[(B6, TCP_BPORT)]),
        svc(VIP6, 53, Proto::Udp, &[(B6, UDP_BPORT)]),
        svc(EMPTY4, 80, Proto::Tcp, &[]),
        svc(EMPTY4, 53, Proto::Udp, &[]),
        svc(EMPTY4, SCTP_PORT, Proto::Sctp, &[]),
        svc(EMPTY6, 80, Proto::Tcp, &[]),
        svc(EMPTY6, 53, Proto::Udp, &[]),
    ];
    Table::build(1, 0, &services).expect("fixture table builds")
}

fn worker() -> Worker {
    let cfg = Config {
        capacity: 1024,
        shards: 4,
        partitions: 1,
        affinity_capacity: 64,
        fragment_capacity: 64,
        ..Config::default()
    };
    Worker::new(Arc::new(Conntrack::new(&cfg)))
}

fn v4(a: &Addr16) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

// ---------------------------------------------------------------------------
// Frame builders
// ---------------------------------------------------------------------------

fn syn(seq: u32) -> L4Spec {
    L4Spec::Tcp(Tcp::syn(seq))
}

fn tcp_syn4(sport: u16, dst: Addr16, dport: u16) -> Vec<u8> {
    client_frame(C4, sport, dst, dport, syn(1000), &[])
}

/// IPv4 TCP SYN with 8 bytes of options (router alert, then NOP NOP NOP EOL).
fn tcp4_with_options() -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, ip_number::TCP, v4(&C4), v4(&VIP4)).unwrap();
    h.options =
        Ipv4Options::try_from(&[0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00][..]).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(40000, 80, 1000, 64240)
        .syn()
        .write(&mut out, b"opts")
        .unwrap();
    assert_eq!(out[14], 0x47, "fixture: IHL 7");
    out
}

/// IPv6 TCP SYN with one raw extension header (hop-by-hop or destination
/// options, holding a 4-byte PadN) before TCP.
fn tcp6_with_ext(hop_by_hop: bool) -> Vec<u8> {
    let ext = Ipv6RawExtHeader::new_raw(ip_number::TCP, &[1, 4, 0, 0, 0, 0]).unwrap();
    let mut exts = Ipv6Extensions::default();
    if hop_by_hop {
        exts.hop_by_hop_options = Some(ext);
    } else {
        exts.destination_options = Some(ext);
    }
    let h = Ipv6Header {
        hop_limit: 64,
        source: C6,
        destination: VIP6,
        ..Default::default()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv6(h, exts))
        .tcp(40000, 80, 1000, 64240)
        .syn()
        .write(&mut out, b"ext")
        .unwrap();
    assert_eq!(
        out[14 + 6],
        if hop_by_hop { 0 } else { 60 },
        "fixture: next header"
    );
    out
}

/// An ARP request for the VIP.
fn arp() -> Vec<u8> {
    let mut out = ethernet(EtherType::ARP);
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&v4(&C4));
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&v4(&VIP4));
    out
}

fn icmp_echo4() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(v4(&C4), v4(&VIP4), 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

/// Fixes the IPv4 header checksum of the frame's IP header at `l3` after an edit.
fn fix_ipv4_checksum(f: &mut [u8], l3: usize) {
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    f[l3 + 10..l3 + 12].fill(0);
    let c = Ipv4Header::from_slice(&f[l3..l3 + ihl.max(20)])
        .map(|(h, _)| h.calc_header_checksum())
        .unwrap_or_else(|_| raw_ipv4_checksum(&f[l3..l3 + ihl.max(20)]));
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// RFC 1071 over a header whose checksum field is zero (for headers etherparse refuses).
fn raw_ipv4_checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

// ---------------------------------------------------------------------------
// Independent checks (etherparse)
// ---------------------------------------------------------------------------

/// Where a frame's layers are, according to etherparse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    l3: usize,
    l4: usize,
    ip_end: usize,
    v4: bool,
    proto: u8,
    /// The packet is an IP fragment.
    fragmented: bool,
    /// The transport header is in this packet (not a non-first fragment).
    has_l4: bool,
}

fn offset(base: &[u8], sub: &[u8]) -> usize {
    sub.as_ptr() as usize - base.as_ptr() as usize
}

fn layout(f: &[u8]) -> Layout {
    let p = SlicedPacket::from_ethernet(f).expect("etherparse slices the frame");
    match p.net.expect("an IP packet") {
        NetSlice::Ipv4(ip) => {
            let pl = ip.payload();
            Layout {
                l3: offset(f, ip.header().slice()),
                l4: offset(f, pl.payload),
                ip_end: offset(f, pl.payload) + pl.payload.len(),
                v4: true,
                proto: pl.ip_number.0,
                fragmented: pl.fragmented,
                has_l4: ip.header().fragments_offset().value() == 0,
            }
        }
        NetSlice::Ipv6(ip) => {
            let pl = ip.payload();
            let mut has_l4 = true;
            for e in ip.extensions().clone() {
                if let etherparse::Ipv6ExtensionSlice::Fragment(fr) = e {
                    has_l4 = fr.fragment_offset().value() == 0;
                }
            }
            Layout {
                l3: offset(f, ip.header().slice()),
                l4: offset(f, pl.payload),
                ip_end: offset(f, pl.payload) + pl.payload.len(),
                v4: false,
                proto: pl.ip_number.0,
                fragmented: pl.fragmented,
                has_l4,
            }
        }
        NetSlice::Arp(_) => panic!("ARP"),
    }
}

/// Recomputes every checksum of `f` in full and compares it with the field.
/// Fragments: only the IPv4 header checksum (the transport one covers the
/// whole datagram; see the fragment cases for the reassembled check).
fn verify_checksums(f: &[u8]) {
    let p = SlicedPacket::from_ethernet(f).expect("etherparse slices the output");
    let l = layout(f);
    let (src, dst): (Addr16, Addr16) = match p.net.as_ref().expect("IP") {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            assert_eq!(
                h.header_checksum(),
                h.to_header().calc_header_checksum(),
                "IPv4 header checksum"
            );
            (v4_to_16(h.source()), v4_to_16(h.destination()))
        }
        NetSlice::Ipv6(ip) => (ip.header().source(), ip.header().destination()),
        NetSlice::Arp(_) => panic!("ARP"),
    };
    if l.fragmented {
        return;
    }
    match p.transport.as_ref() {
        Some(TransportSlice::Tcp(t)) => {
            let want = if l.v4 {
                t.calc_checksum_ipv4(v4(&src), v4(&dst))
            } else {
                t.calc_checksum_ipv6(src, dst)
            }
            .unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            if l.v4 && u.checksum() == 0 {
                return; // "no checksum" (RFC 768)
            }
            let h = u.to_header();
            let want = if l.v4 {
                h.calc_checksum_ipv4_raw(v4(&src), v4(&dst), u.payload())
            } else {
                h.calc_checksum_ipv6_raw(src, dst, u.payload())
            }
            .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum");
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let want = Icmpv4Header::with_checksum(i.icmp_type(), i.payload()).checksum;
            assert_eq!(i.checksum(), want, "ICMP checksum");
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let want = Icmpv6Header::with_checksum(i.icmp_type(), src, dst, i.payload())
                .unwrap()
                .checksum;
            assert_eq!(i.checksum(), want, "ICMPv6 checksum");
        }
        Some(other) => panic!("unexpected transport {other:?}"),
        None if l.proto == 132 => {
            let s = &f[l.l4..l.ip_end];
            assert_eq!(
                u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
                sctp_crc32c(s),
                "SCTP CRC32c"
            );
        }
        None => {}
    }
}

/// Which address and port a NAT rewrite replaces.
#[derive(Debug, Clone, Copy)]
enum Dir {
    /// Destination: client → frontend becomes client → backend.
    Dst,
    /// Source: backend → client becomes frontend → client.
    Src,
}

/// Offsets and lengths of every checksum field of a packet with layout `l`.
fn checksum_fields(l: &Layout) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    if l.v4 {
        v.push((l.l3 + 10, 2));
    }
    if l.has_l4 {
        match l.proto {
            6 => v.push((l.l4 + 16, 2)),
            17 => v.push((l.l4 + 6, 2)),
            132 => v.push((l.l4 + 8, 4)),
            _ => {}
        }
    }
    v
}

/// The output must be the input with the `dir` address set to `addr`, the
/// `dir` port to `port` (when given), the TTL or hop limit one lower, and the
/// checksums changed; nothing else. Every checksum must be valid.
fn assert_nat(input: &[u8], output: &[u8], dir: Dir, addr: Addr16, port: Option<u16>) {
    let li = layout(input);
    assert_eq!(li, layout(output), "layout kept");
    // Bytes after the IP packet (Ethernet padding) are trimmed.
    let mut want = input[..li.ip_end.min(input.len())].to_vec();
    if li.v4 {
        let at = li.l3 + if matches!(dir, Dir::Src) { 12 } else { 16 };
        want[at..at + 4].copy_from_slice(&v4(&addr));
        want[li.l3 + 8] -= 1;
    } else {
        let at = li.l3 + if matches!(dir, Dir::Src) { 8 } else { 24 };
        want[at..at + 16].copy_from_slice(&addr);
        want[li.l3 + 7] -= 1;
    }
    if let Some(p) = port {
        let at = li.l4 + if matches!(dir, Dir::Src) { 0 } else { 2 };
        want[at..at + 2].copy_from_slice(&p.to_be_bytes());
    }
    let mut got = output.to_vec();
    for (at, n) in checksum_fields(&li) {
        want[at..at + n].fill(0);
        got[at..at + n].fill(0);
    }
    assert_eq!(
        got, want,
        "only the NAT fields, the TTL and the checksums may change"
    );
    verify_checksums(output);
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// ---------------------------------------------------------------------------
// The fixture runner
// ---------------------------------------------------------------------------

/// What a step saw: for later steps that build on earlier outputs.
#[derive(Debug, Clone)]
struct Seen {
    verdict: Verdict,
    output: Vec<u8>,
}

impl Seen {
    fn next_hop(&self) -> Addr16 {
        match self.verdict {
            Verdict::Forward { next_hop, .. } => next_hop.addr,
            v => panic!("expected a forward, got {v:?}"),
        }
    }
}

/// What a check gets.
struct Ctx<'a> {
    input: &'a [u8],
    /// `buf[..len]` for Forward and Reject, the input length otherwise.
    output: &'a [u8],
    verdict: Verdict,
    seen: &'a [Seen],
    worker: &'a Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Forward(Side),
    Reject,
    Pass,
    Drop(DropReason),
}

impl Expect {
    fn kind(self) -> VerdictKind {
        match self {
            Self::Forward(_) => VerdictKind::Forward,
            Self::Reject => VerdictKind::Reject,
            Self::Pass => VerdictKind::Pass,
            Self::Drop(_) => VerdictKind::Drop,
        }
    }
}

type FrameFn = Box<dyn Fn(&[Seen]) -> Vec<u8>>;
type Check = Box<dyn Fn(&Ctx<'_>)>;

struct Step {
    what: &'static str,
    frame: FrameFn,
    expect: Expect,
    check: Option<Check>,
}

impl Step {
    fn new(what: &'static str, f: Vec<u8>, expect: Expect) -> Self {
        Self {
            what,
            frame: Box::new(move |_| f.clone()),
            expect,
            check: None,
        }
    }

    /// A step whose frame depends on what earlier steps saw.
    fn after(what: &'static str, f: impl Fn(&[Seen]) -> Vec<u8> + 'static, expect: Expect) -> Self {
        Self {
            what,
            frame: Box::new(f),
            expect,
            check: None,
        }
    }

    fn check(mut self, c: impl Fn(&Ctx<'_>) + 'static) -> Self {
        self.check = Some(Box::new(c));
        self
    }
}

struct Case {
    name: &'static str,
    steps: Vec<Step>,
}

fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case { name, steps }
}

/// A one-step case.
fn one(name: &'static str, f: Vec<u8>, expect: Expect) -> Case {
    case(name, vec![Step::new(name, f, expect)])
}

/// A one-step case with a check.
fn one_check(
    name: &'static str,
    f: Vec<u8>,
    expect: Expect,
    c: impl Fn(&Ctx<'_>) + 'static,
) -> Case {
    case(name, vec![Step::new(name, f, expect).check(c)])
}

/// Expected totals, counted as steps run.
#[derive(Debug, Default)]
struct Expected {
    packets: [u64; 4],
    drops: Vec<u64>,
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Runs one case with a fresh worker. Returns its counters (also when a step
/// fails: the counters test must see every frame processed) and the failure,
/// if any; a failing step ends its case, since later steps build on it.
fn run_case(table: &Table, c: &Case, expected: &mut Expected) -> (Counters, Option<String>) {
    let mut w = worker();
    let mut seen: Vec<Seen> = Vec::new();
    for (i, s) in c.steps.iter().enumerate() {
        let ctx_name = format!("case {:?}, step {i} ({:?})", c.name, s.what);
        let input = match catch_unwind(AssertUnwindSafe(|| (s.frame)(&seen))) {
            Ok(f) => f,
            Err(e) => {
                return (
                    w.counters.clone(),
                    Some(format!(
                        "{ctx_name}: building the frame: {}",
                        panic_message(&*e)
                    )),
                )
            }
        };
        let (mut buf, len) = to_buf(&input);
        let before = buf.clone();
        expected.packets[s.expect.kind() as usize] += 1;
        if let Expect::Drop(r) = s.expect {
            expected.drops[r.index()] += 1;
        }
        let v = w.process(NOW, table, &mut buf, len);
        let generic = catch_unwind(AssertUnwindSafe(|| match (s.expect, v) {
            (Expect::Forward(side), Verdict::Forward { len: l, next_hop }) => {
                assert_eq!(
                    l,
                    ip_end(&input).min(len),
                    "a forward keeps the frame up to its IP packet's end (padding trimmed)"
                );
                assert_eq!(next_hop.side, side, "next hop side");
                assert!(buf[len..] == before[len..], "wrote past the frame");
                l
            }
            (Expect::Reject, Verdict::Reject { len: l }) => {
                assert!(l <= buf.len(), "reject longer than the buffer");
                let end = l.max(len);
                assert!(buf[end..] == before[end..], "wrote past the reject");
                l
            }
            (Expect::Pass, Verdict::Pass) => {
                assert!(buf == before, "a passed frame must be unchanged");
                len
            }
            (Expect::Drop(r), Verdict::Drop(got)) if r == got => {
                assert!(buf[len..] == before[len..], "wrote past the frame");
                len
            }
            (e, got) => panic!("expected {e:?}, got {got:?}"),
        }));
        let out_len = match generic {
            Ok(l) => l,
            Err(e) => {
                return (
                    w.counters.clone(),
                    Some(format!("{ctx_name}: {}", panic_message(&*e))),
                )
            }
        };
        let output = buf[..out_len].to_vec();
        if let Some(check) = &s.check {
            let ctx = Ctx {
                input: &input,
                output: &output,
                verdict: v,
                seen: &seen,
                worker: &w,
            };
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(&ctx))) {
                return (
                    w.counters.clone(),
                    Some(format!("{ctx_name}: {}", panic_message(&*e))),
                );
            }
        }
        seen.push(Seen { verdict: v, output });
    }
    (w.counters.clone(), None)
}

/// Runs every case; returns the failures, the summed counters and the expected totals.
fn run_table() -> (Vec<String>, Counters, Expected) {
    let table = table();
    let mut total = Counters::default();
    let mut expected = Expected {
        packets: [0; 4],
        drops: vec![0; DropReason::COUNT],
    };
    let mut failures = Vec::new();
    for c in cases() {
        let (counters, failure) = run_case(&table, &c, &mut expected);
        total.add(&counters);
        failures.extend(failure);
    }
    (failures, total, expected)
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// Forward to B1 or B2 at 8080, destination NAT.
fn forwarded_to_tcp_backend(ctx: &Ctx<'_>) {
    let Verdict::Forward { next_hop, .. } = ctx.verdict else {
        unreachable!()
    };
    assert!(
        next_hop.addr == B1 || next_hop.addr == B2,
        "next hop is a backend: {next_hop:?}"
    );
    assert_nat(
        ctx.input,
        ctx.output,
        Dir::Dst,
        next_hop.addr,
        Some(TCP_BPORT),
    );
}

fn forwarded_to(addr: Addr16, port: Option<u16>) -> impl Fn(&Ctx<'_>) + 'static {
    move |ctx: &Ctx<'_>| {
        let Verdict::Forward { next_hop, .. } = ctx.verdict else {
            unreachable!()
        };
        assert_eq!(next_hop.addr, addr, "next hop");
        assert_nat(ctx.input, ctx.output, Dir::Dst, addr, port);
    }
}

fn no_flow_tracked(ctx: &Ctx<'_>) {
    assert_eq!(ctx.worker.conntrack().len(), 0, "no conntrack entry");
}

/// Checks a TCP RST reject: from `vip`:`vport` to `client`:`cport`.
fn assert_rst(
    ctx: &Ctx<'_>,
    l3: usize,
    (vip, vport): (Addr16, u16),
    (client, cport): (Addr16, u16),
    (seq, ack, flags): (u32, u32, u8),
) {
    let o = ctx.output;
    let v4 = ip_from16(vip).is_ipv4();
    let ip_len = if v4 { 20 } else { 40 };
    assert_eq!(o.len(), l3 + ip_len + 20, "reject length");
    assert_eq!(o[0..6], CLIENT_MAC, "MACs swapped (dst)");
    assert_eq!(o[6..12], GATEWAY_MAC, "MACs swapped (src)");
    assert_eq!(o[12..l3], ctx.input[12..l3], "ether type / VLAN tag kept");
    let l = layout(o);
    assert_eq!(
        (l.l3, l.l4, l.ip_end, l.proto),
        (l3, l3 + ip_len, o.len(), 6)
    );
    if v4 {
        assert_eq!(o[l3], 0x45);
        assert_eq!(be16(o, l3 + 2), 40, "IPv4 total length");
        assert_eq!(o[l3 + 12..l3 + 16], v4_ref(&vip), "src = frontend");
        assert_eq!(o[l3 + 16..l3 + 20], v4_ref(&client), "dst = client");
    } else {
        assert_eq!(be16(o, l3 + 4), 20, "IPv6 payload length");
        assert_eq!(o[l3 + 8..l3 + 24], vip, "src = frontend");
        assert_eq!(o[l3 + 24..l3 + 40], client, "dst = client");
    }
    let t = l3 + ip_len;
    assert_eq!(be16(o, t), vport, "RST source port");
    assert_eq!(be16(o, t + 2), cport, "RST destination port");
    assert_eq!(be32(o, t + 4), seq, "RST seq");
    assert_eq!(be32(o, t + 8), ack, "RST ack");
    assert_eq!(o[t + 12], 0x50, "data offset 5");
    assert_eq!(o[t + 13], flags, "RST flags");
    verify_checksums(o);
}

fn v4_ref(a: &Addr16) -> [u8; 4] {
    v4(a)
}

/// Checks an ICMP / ICMPv6 port unreachable from `vip` to `client` quoting
/// `quote` bytes of the input's IP packet.
fn assert_unreachable(ctx: &Ctx<'_>, vip: Addr16, client: Addr16, quote: usize) {
    assert_unreachable_at(ctx, 14, vip, client, quote);
}

/// [`assert_unreachable`] for an IP header at `l3` (18 after an 802.1Q tag).
fn assert_unreachable_at(ctx: &Ctx<'_>, l3: usize, vip: Addr16, client: Addr16, quote: usize) {
    let o = ctx.output;
    let i = ctx.input;
    let v4 = ip_from16(vip).is_ipv4();
    let ip_len = if v4 { 20 } else { 40 };
    assert_eq!(o.len(), l3 + ip_len + 8 + quote, "reject length");
    assert_eq!(o[12..l3], ctx.input[12..l3], "ether type / VLAN tag kept");
    assert_eq!(o[0..6], CLIENT_MAC, "MACs swapped (dst)");
    assert_eq!(o[6..12], GATEWAY_MAC, "MACs swapped (src)");
    let l = layout(o);
    let icmp = l3 + ip_len;
    assert_eq!((l.l4, l.ip_end), (icmp, o.len()));
    if v4 {
        assert_eq!(l.proto, 1);
        assert_eq!(o[l3 + 12..l3 + 16], v4_ref(&vip), "src = frontend");
        assert_eq!(o[l3 + 16..l3 + 20], v4_ref(&client), "dst = client");
        assert_eq!((o[icmp], o[icmp + 1]), (3, 3), "port unreachable");
    } else {
        assert_eq!(l.proto, 58);
        assert_eq!(o[l3 + 8..l3 + 24], vip, "src = frontend");
        assert_eq!(o[l3 + 24..l3 + 40], client, "dst = client");
        assert_eq!((o[icmp], o[icmp + 1]), (1, 4), "port unreachable");
    }
    assert_eq!(o[icmp + 4..icmp + 8], [0, 0, 0, 0], "unused");
    assert_eq!(
        o[icmp + 8..],
        i[l3..l3 + quote],
        "the quote is the original IP packet's first bytes"
    );
    verify_checksums(o);
}

#[allow(clippy::too_many_lines)] // reason: it is the table
fn cases() -> Vec<Case> {
    let mut v = Vec::new();

    // ---- Forward, IPv4 ----
    v.push(one_check(
        "IPv4 TCP SYN to the TCP service",
        tcp_syn4(40000, VIP4, 80),
        Expect::Forward(Side::Backend),
        forwarded_to_tcp_backend,
    ));
    v.push(one_check(
        "IPv4 TCP SYN with an 802.1Q tag",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            Some(100),
            C4,
            40000,
            VIP4,
            80,
            syn(1000),
            64,
            b"vlan",
        ),
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(ctx.output[12..16], [0x81, 0x00, 0x00, 100], "VLAN tag kept");
            assert_eq!(layout(ctx.output).l3, 18);
            forwarded_to_tcp_backend(ctx);
        },
    ));
    v.push(one_check(
        "IPv4 with options (IHL 7) TCP SYN",
        tcp4_with_options(),
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(layout(ctx.output).l4, 14 + 28);
            forwarded_to_tcp_backend(ctx);
        },
    ));
    v.push(one_check(
        "IPv4 TCP data segment (ACK + payload) with no conntrack entry",
        client_frame(
            C4,
            40001,
            VIP4,
            80,
            L4Spec::Tcp(Tcp::ack(5000, 7000)),
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        Expect::Forward(Side::Backend),
        forwarded_to_tcp_backend,
    ));
    v.push(one_check(
        "IPv4 UDP to the UDP service",
        client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"query"),
        Expect::Forward(Side::Backend),
        forwarded_to(B1, Some(UDP_BPORT)),
    ));
    v.push(one_check(
        "IPv4 UDP with checksum 0 stays 0",
        {
            let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"no checksum");
            f[34 + 6..34 + 8].fill(0);
            f
        },
        Expect::Forward(Side::Backend),
        |ctx| {
            forwarded_to(B1, Some(UDP_BPORT))(ctx);
            assert_eq!(ctx.output[34 + 6..34 + 8], [0, 0], "UDP checksum stays 0");
        },
    ));
    v.push(one_check(
        "IPv4 SCTP to the SCTP service",
        client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"beat"),
        Expect::Forward(Side::Backend),
        forwarded_to(B1, Some(SCTP_BPORT)),
    ));
    v.push(one_check(
        "60-byte minimum frame: short UDP plus Ethernet padding",
        {
            let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"hi");
            assert_eq!(f.len(), 44);
            f.resize(60, 0);
            f
        },
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(ctx.output.len(), 44, "padding trimmed, as the kernel does");
            assert_eq!(layout(ctx.output).ip_end, 44);
            forwarded_to(B1, Some(UDP_BPORT))(ctx);
        },
    ));
    v.push(one_check(
        "60-byte minimum frame: SCTP plus Ethernet padding (CRC over the IP payload only)",
        {
            let mut f = client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, &[]);
            assert_eq!(f.len(), 14 + 20 + 16);
            f.resize(60, 0);
            f
        },
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(
                ctx.output.len(),
                50,
                "padding trimmed, the CRC over the IP payload"
            );
            forwarded_to(B1, Some(SCTP_BPORT))(ctx);
        },
    ));

    v.push(one_check(
        "54-byte TCP SYN padded to 60 bytes with non-zero padding",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            assert_eq!(f.len(), 54);
            f.resize(60, 0xee);
            f
        },
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(ctx.output.len(), 54, "non-zero padding trimmed");
            forwarded_to_tcp_backend(ctx);
        },
    ));
    // ---- Forward, IPv6 ----
    v.push(one_check(
        "IPv6 TCP SYN",
        client_frame(C6, 40000, VIP6, 80, syn(1000), b"v6"),
        Expect::Forward(Side::Backend),
        forwarded_to(B6, Some(TCP_BPORT)),
    ));
    v.push(one_check(
        "IPv6 hop-by-hop options header before TCP",
        tcp6_with_ext(true),
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(layout(ctx.output).l4, 14 + 40 + 8);
            forwarded_to(B6, Some(TCP_BPORT))(ctx);
        },
    ));
    v.push(one_check(
        "IPv6 destination options header before TCP",
        tcp6_with_ext(false),
        Expect::Forward(Side::Backend),
        |ctx| {
            assert_eq!(layout(ctx.output).l4, 14 + 40 + 8);
            forwarded_to(B6, Some(TCP_BPORT))(ctx);
        },
    ));
    v.push(one_check(
        "IPv6 TCP with an 802.1Q tag",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            Some(7),
            C6,
            40000,
            VIP6,
            80,
            syn(1),
            64,
            &[],
        ),
        Expect::Forward(Side::Backend),
        forwarded_to(B6, Some(TCP_BPORT)),
    ));
    v.push(one_check(
        "IPv6 UDP",
        client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"query"),
        Expect::Forward(Side::Backend),
        forwarded_to(B6, Some(UDP_BPORT)),
    ));
    v.push(one(
        "IPv6 UDP with checksum 0",
        {
            let mut f = client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"zero");
            f[54 + 6..54 + 8].fill(0);
            f
        },
        Expect::Drop(DropReason::Udp6ZeroChecksum),
    ));

    // ---- Pass ----
    v.push(one(
        "TCP to an address that is not a frontend",
        tcp_syn4(40000, OTHER4, 80),
        Expect::Pass,
    ));
    v.push(one("ARP request for the VIP", arp(), Expect::Pass));
    v.push(one(
        "ICMP echo request to the VIP",
        icmp_echo4(),
        Expect::Pass,
    ));
    v.push(one(
        "TCP to the VIP on a port with no frontend",
        tcp_syn4(40000, VIP4, 8443),
        Expect::Pass,
    ));
    v.push(one(
        "UDP to the VIP on the TCP service's port",
        client_frame(C4, 40000, VIP4, 80, L4Spec::Udp, b"x"),
        Expect::Pass,
    ));
    v.push(one(
        "IPv4 protocol that is not balanced (GRE)",
        ipv4_raw(C4, VIP4, 47, 1, (0, false), &[0; 8]),
        Expect::Pass,
    ));
    v.push(one(
        "Two 802.1Q tags (QinQ in 0x8100): not ours",
        {
            let inner = frame(
                CLIENT_MAC,
                GATEWAY_MAC,
                Some(5),
                C4,
                40000,
                VIP4,
                80,
                syn(1),
                64,
                &[],
            );
            let mut f = inner[..12].to_vec();
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x09]);
            f.extend_from_slice(&inner[12..]);
            f
        },
        Expect::Pass,
    ));

    // ---- TTL ----
    v.push(one_check(
        "IPv4 TTL 1 to a frontend",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            None,
            C4,
            40000,
            VIP4,
            80,
            syn(1),
            1,
            &[],
        ),
        Expect::Drop(DropReason::TtlExpired),
        no_flow_tracked,
    ));
    v.push(one_check(
        "IPv4 TTL 0 to a frontend",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            None,
            C4,
            40000,
            VIP4,
            53,
            L4Spec::Udp,
            0,
            &[],
        ),
        Expect::Drop(DropReason::TtlExpired),
        no_flow_tracked,
    ));
    v.push(one_check(
        "IPv6 hop limit 1 to a frontend",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            None,
            C6,
            40000,
            VIP6,
            80,
            syn(1),
            1,
            &[],
        ),
        Expect::Drop(DropReason::TtlExpired),
        no_flow_tracked,
    ));
    v.push(one(
        "TTL 1 to a non-frontend is not ours",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            None,
            C4,
            40000,
            OTHER4,
            80,
            syn(1),
            1,
            &[],
        ),
        Expect::Pass,
    ));

    // ---- Inconsistent headers ----
    v.push(one(
        "IPv4 total length larger than the frame",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            let tl = be16(&f, 16) + 10;
            f[16..18].copy_from_slice(&tl.to_be_bytes());
            fix_ipv4_checksum(&mut f, 14);
            f
        },
        Expect::Drop(DropReason::IpTruncated),
    ));
    v.push(one(
        "IPv4 total length smaller than the header",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            f[16..18].copy_from_slice(&19u16.to_be_bytes());
            fix_ipv4_checksum(&mut f, 14);
            f
        },
        Expect::Drop(DropReason::Ipv4Malformed),
    ));
    v.push(one(
        "IPv4 IHL < 5",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            f[14] = 0x44;
            f
        },
        Expect::Drop(DropReason::Ipv4Malformed),
    ));
    v.push(one(
        "IPv4 ether type with an IPv6 version nibble",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            f[14] = 0x65;
            f
        },
        Expect::Drop(DropReason::Ipv4Malformed),
    ));
    v.push(one(
        "IPv6 ether type with an IPv4 version nibble",
        {
            let mut f = client_frame(C6, 40000, VIP6, 80, syn(1), &[]);
            f[14] = 0x45;
            f
        },
        Expect::Drop(DropReason::Ipv6Malformed),
    ));
    v.push(one(
        "UDP length field larger than the IP payload",
        {
            let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"abcd");
            f[34 + 4..34 + 6].copy_from_slice(&100u16.to_be_bytes());
            f
        },
        Expect::Drop(DropReason::L4Malformed),
    ));
    v.push(one(
        "UDP length field below 8",
        {
            let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"abcd");
            f[34 + 4..34 + 6].copy_from_slice(&7u16.to_be_bytes());
            f
        },
        Expect::Drop(DropReason::L4Malformed),
    ));
    v.push(one(
        "TCP data offset < 5",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            f[34 + 12] = 0x40;
            f
        },
        Expect::Drop(DropReason::L4Malformed),
    ));
    v.push(one(
        "TCP data offset past the segment",
        {
            let mut f = tcp_syn4(40000, VIP4, 80);
            f[34 + 12] = 0xf0;
            f
        },
        Expect::Drop(DropReason::L4Malformed),
    ));
    v.push(one(
        "SCTP shorter than its common header",
        ipv4_raw(
            C4,
            VIP4,
            132,
            1,
            (0, false),
            &[0x9c, 0x40, 0x0f, 0x1c, 0, 0, 0, 0],
        ),
        Expect::Drop(DropReason::L4Malformed),
    ));
    v.push(one(
        "ICMPv4 inside IPv6 (next header 1)",
        {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
                .ipv6(C6, VIP6, 64)
                .write(&mut f, IpNumber(1), &[8, 0, 0, 0, 0, 1, 0, 1])
                .unwrap();
            f
        },
        Expect::Drop(DropReason::IcmpFamilyMismatch),
    ));
    v.push(one(
        "ICMPv6 inside IPv4 (protocol 58)",
        ipv4_raw(C4, VIP4, 58, 1, (0, false), &[128, 0, 0, 0, 0, 1, 0, 1]),
        Expect::Drop(DropReason::IcmpFamilyMismatch),
    ));
    v.push(one(
        "802.1Q tag cut off",
        {
            let mut f = ethernet(EtherType::VLAN_TAGGED_FRAME);
            f.extend_from_slice(&[0x00]);
            f
        },
        Expect::Drop(DropReason::VlanTruncated),
    ));

    // ---- Fragments, IPv4 ----
    {
        let dgram = udp_datagram(C4, VIP4, 40000, 53, 3000);
        let id = 0x1234;
        let f1 = ipv4_raw(C4, VIP4, 17, id, (0, true), &dgram[..1480]);
        let f2 = ipv4_raw(C4, VIP4, 17, id, (185, true), &dgram[1480..2960]);
        let f3 = ipv4_raw(C4, VIP4, 17, id, (370, false), &dgram[2960..]);
        let stray = ipv4_raw(C4, VIP4, 17, id + 1, (185, true), &dgram[1480..2960]);
        v.push(case(
            "IPv4 UDP datagram in three fragments",
            vec![
                Step::new("first fragment", f1, Expect::Forward(Side::Backend))
                    .check(forwarded_to(B1, Some(UDP_BPORT))),
                Step::new("second fragment", f2, Expect::Forward(Side::Backend))
                    .check(forwarded_to(B1, None)),
                Step::new("third fragment", f3, Expect::Forward(Side::Backend)).check(|ctx| {
                    forwarded_to(B1, None)(ctx);
                    // Reassemble the outputs: the UDP checksum must hold over the
                    // whole datagram with the new destination.
                    let mut whole = Vec::new();
                    for o in ctx.seen.iter().map(|s| &s.output[..]).chain([ctx.output]) {
                        whole.extend_from_slice(&o[34..]);
                    }
                    assert_eq!(whole.len(), 3000);
                    let (h, payload) = UdpHeader::from_slice(&whole).unwrap();
                    assert_eq!(h.destination_port, UDP_BPORT);
                    assert_eq!(
                        h.checksum,
                        h.calc_checksum_ipv4_raw(v4(&C4), v4(&B1), payload).unwrap(),
                        "UDP checksum of the reassembled datagram"
                    );
                }),
                Step::new(
                    "non-first fragment of an unknown datagram",
                    stray,
                    Expect::Drop(DropReason::FragmentUntracked),
                )
                .check(|ctx| {
                    assert_eq!(ctx.worker.counters.fragments_first, 1);
                    assert_eq!(ctx.worker.counters.fragments_nonfirst, 3);
                }),
            ],
        ));
    }
    {
        let dgram = udp_datagram(C4, VIP4, 40000, 53, 3000);
        let f2 = ipv4_raw(C4, VIP4, 17, 77, (185, true), &dgram[1480..2960]);
        let f1 = ipv4_raw(C4, VIP4, 17, 77, (0, true), &dgram[..1480]);
        v.push(case(
            "IPv4 fragments out of order: the early non-first one is dropped",
            vec![
                Step::new(
                    "second fragment first",
                    f2.clone(),
                    Expect::Drop(DropReason::FragmentUntracked),
                ),
                Step::new("first fragment", f1, Expect::Forward(Side::Backend)),
                Step::new("second fragment again", f2, Expect::Forward(Side::Backend))
                    .check(forwarded_to(B1, None)),
            ],
        ));
    }
    v.push(one(
        "non-first IPv4 fragment whose first fragment was never seen",
        ipv4_raw(C4, VIP4, 17, 5, (185, false), &[0; 40]),
        Expect::Drop(DropReason::FragmentUntracked),
    ));

    // ---- Fragments, IPv6 ----
    {
        let dgram = udp_datagram(C6, VIP6, 40000, 53, 2000);
        let id = 0xdead_beef;
        let f1 = ipv6_fragment(C6, VIP6, 17, id, (0, true), &dgram[..1232]);
        let f2 = ipv6_fragment(C6, VIP6, 17, id, (154, false), &dgram[1232..]);
        let stray = ipv6_fragment(C6, VIP6, 17, id ^ 1, (154, false), &dgram[1232..]);
        v.push(case(
            "IPv6 UDP datagram in two fragments",
            vec![
                Step::new("first fragment", f1, Expect::Forward(Side::Backend))
                    .check(forwarded_to(B6, Some(UDP_BPORT))),
                Step::new("second fragment", f2, Expect::Forward(Side::Backend)).check(|ctx| {
                    forwarded_to(B6, None)(ctx);
                    let mut whole = Vec::new();
                    for o in ctx.seen.iter().map(|s| &s.output[..]).chain([ctx.output]) {
                        whole.extend_from_slice(&o[14 + 40 + 8..]);
                    }
                    assert_eq!(whole.len(), 2000);
                    let (h, payload) = UdpHeader::from_slice(&whole).unwrap();
                    assert_eq!(
                        h.checksum,
                        h.calc_checksum_ipv6_raw(C6, B6, payload).unwrap(),
                        "UDP checksum of the reassembled datagram"
                    );
                }),
                Step::new(
                    "non-first fragment of an unknown datagram",
                    stray,
                    Expect::Drop(DropReason::FragmentUntracked),
                )
                .check(|ctx| {
                    assert_eq!(ctx.worker.counters.fragments_first, 1);
                    assert_eq!(ctx.worker.counters.fragments_nonfirst, 2);
                }),
            ],
        ));
    }

    // ---- Rejects ----
    v.push(one_check(
        "TCP SYN to the service without endpoints → RST|ACK",
        tcp_syn4(40000, EMPTY4, 80),
        Expect::Reject,
        |ctx| {
            assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40000), (0, 1001, 0x14));
            no_flow_tracked(ctx);
        },
    ));
    v.push(one_check(
        "TCP SYN with 802.1Q tag to the service without endpoints → RST|ACK, tag kept",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            Some(100),
            C4,
            40000,
            EMPTY4,
            80,
            syn(1000),
            64,
            &[],
        ),
        Expect::Reject,
        |ctx| assert_rst(ctx, 18, (EMPTY4, 80), (C4, 40000), (0, 1001, 0x14)),
    ));
    v.push(one_check(
        "IPv4 with options, TCP SYN to the service without endpoints → 20-byte IP header RST",
        {
            let mut f = tcp4_with_options();
            f[14 + 16..14 + 20].copy_from_slice(&v4(&EMPTY4));
            fix_ipv4_checksum(&mut f, 14);
            let l4 = 14 + 28;
            let mut seg = f[l4..].to_vec();
            seg[16..18].fill(0);
            let (h, payload) = TcpHeader::from_slice(&seg).unwrap();
            let c = h
                .calc_checksum_ipv4_raw(v4(&C4), v4(&EMPTY4), payload)
                .unwrap();
            f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
            f
        },
        Expect::Reject,
        // SYN with 4 bytes of data: ack = seq + 4 + 1.
        |ctx| assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40000), (0, 1005, 0x14)),
    ));
    v.push(one_check(
        "padded TCP SYN to the service without endpoints → RST|ACK, padding not counted as data",
        {
            let mut f = tcp_syn4(40000, EMPTY4, 80);
            f.resize(60, 0xee);
            f
        },
        Expect::Reject,
        |ctx| assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40000), (0, 1001, 0x14)),
    ));
    v.push(one_check(
        "TCP ACK with payload to the service without endpoints → RST, seq = its ack",
        client_frame(
            C4,
            40001,
            EMPTY4,
            80,
            L4Spec::Tcp(Tcp::ack(5000, 7777)),
            b"hello",
        ),
        Expect::Reject,
        |ctx| assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40001), (7777, 0, 0x04)),
    ));
    v.push(one_check(
        "TCP FIN (no ACK) with payload to the service without endpoints → RST|ACK covering data + FIN",
        client_frame(
            C4,
            40002,
            EMPTY4,
            80,
            L4Spec::Tcp(Tcp {
                fin: true,
                seq: 100,
                ..Tcp::default()
            }),
            b"abc",
        ),
        Expect::Reject,
        |ctx| assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40002), (0, 104, 0x14)),
    ));
    v.push(one(
        "TCP RST to the service without endpoints",
        client_frame(
            C4,
            40000,
            EMPTY4,
            80,
            L4Spec::Tcp(Tcp {
                rst: true,
                seq: 1,
                ..Tcp::default()
            }),
            &[],
        ),
        Expect::Drop(DropReason::NoEndpoints),
    ));
    v.push(one_check(
        "IPv6 TCP SYN to the service without endpoints → RST|ACK",
        client_frame(C6, 40000, EMPTY6, 80, syn(9), &[]),
        Expect::Reject,
        |ctx| assert_rst(ctx, 14, (EMPTY6, 80), (C6, 40000), (0, 10, 0x14)),
    ));
    v.push(one_check(
        "UDP to the service without endpoints → ICMP port unreachable",
        client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, b"query"),
        Expect::Reject,
        |ctx| {
            let orig = ctx.input.len() - 14;
            assert_unreachable(ctx, EMPTY4, C4, orig);
            let icmp = 14 + 20;
            assert_eq!(ctx.output[icmp + 8..icmp + 8 + 28], ctx.input[14..14 + 28]);
        },
    ));
    v.push(one_check(
        "large UDP to the service without endpoints → ICMP quote capped at 576 bytes",
        client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, &[0xab; 1000]),
        Expect::Reject,
        |ctx| {
            assert_unreachable(ctx, EMPTY4, C4, 576 - 28);
            assert_eq!(ctx.output.len() - 14, 576);
            assert_eq!(be16(ctx.output, 16), 576, "IPv4 total length");
        },
    ));
    v.push(one_check(
        "UDP with Ethernet padding to the service without endpoints → quote without the padding",
        {
            let mut f = client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, b"q");
            f.resize(60, 0xee);
            f
        },
        Expect::Reject,
        |ctx| assert_unreachable(ctx, EMPTY4, C4, 20 + 8 + 1),
    ));
    v.push(one_check(
        "SCTP to the service without endpoints → ICMP port unreachable",
        client_frame(C4, 40000, EMPTY4, SCTP_PORT, L4Spec::Sctp, b"beat"),
        Expect::Reject,
        |ctx| {
            let orig = ctx.input.len() - 14;
            assert_unreachable(ctx, EMPTY4, C4, orig);
        },
    ));
    v.push(one_check(
        "IPv6 UDP to the service without endpoints → ICMPv6 port unreachable",
        client_frame(C6, 40000, EMPTY6, 53, L4Spec::Udp, b"query"),
        Expect::Reject,
        |ctx| {
            let orig = ctx.input.len() - 14;
            assert_unreachable(ctx, EMPTY6, C6, orig);
        },
    ));
    v.push(one_check(
        "UDP with 802.1Q tag to the service without endpoints → ICMP, tag kept",
        frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            Some(42),
            C4,
            40000,
            EMPTY4,
            53,
            L4Spec::Udp,
            64,
            b"q",
        ),
        Expect::Reject,
        |ctx| {
            let orig = ctx.input.len() - 18;
            assert_unreachable_at(ctx, 18, EMPTY4, C4, orig);
        },
    ));
    v.push(one_check(
        "large IPv6 UDP to the service without endpoints → ICMPv6 packet capped at 1280 bytes",
        client_frame(C6, 40000, EMPTY6, 53, L4Spec::Udp, &[0xcd; 1400]),
        Expect::Reject,
        |ctx| {
            assert_unreachable(ctx, EMPTY6, C6, 1280 - 48);
            assert_eq!(ctx.output.len() - 14, 1280);
        },
    ));
    v.push(one_check(
        "TCP SYN with options (MSS, SACK-permitted) to the service without endpoints → ack = seq + 1",
        {
            let mut tcp = TcpHeader::new(40003, 80, 4242, 64240);
            tcp.syn = true;
            tcp.set_options_raw(&[2, 4, 0x05, 0xb4, 4, 2, 1, 1]).unwrap();
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
                .ipv4(v4(&C4), v4(&EMPTY4), 64)
                .tcp_header(tcp)
                .write(&mut f, &[])
                .unwrap();
            f
        },
        Expect::Reject,
        |ctx| assert_rst(ctx, 14, (EMPTY4, 80), (C4, 40003), (0, 4243, 0x14)),
    ));
    v.push(one(
        "non-first fragment to the service without endpoints",
        ipv4_raw(C4, EMPTY4, 17, 9, (185, false), &[0; 16]),
        Expect::Drop(DropReason::FragmentUntracked),
    ));

    // ---- Reply path and ICMP errors ----
    v.push(case(
        "reply path: SYN, SYN-ACK reverse NAT, ICMP errors both ways",
        vec![
            Step::new(
                "client SYN",
                tcp_syn4(40000, VIP4, 80),
                Expect::Forward(Side::Backend),
            )
            .check(forwarded_to_tcp_backend),
            Step::after(
                "backend SYN-ACK",
                |seen| {
                    let b = seen[0].next_hop();
                    let syn_ack = Tcp {
                        syn: true,
                        ack: Some(1001),
                        seq: 5000,
                        ..Tcp::default()
                    };
                    frame(
                        GATEWAY_MAC,
                        CLIENT_MAC,
                        None,
                        b,
                        TCP_BPORT,
                        C4,
                        40000,
                        L4Spec::Tcp(syn_ack),
                        64,
                        &[],
                    )
                },
                Expect::Forward(Side::Client),
            )
            .check(|ctx| {
                let Verdict::Forward { next_hop, .. } = ctx.verdict else {
                    unreachable!()
                };
                assert_eq!(next_hop.addr, C4, "next hop is the client");
                assert_nat(ctx.input, ctx.output, Dir::Src, VIP4, Some(80));
                assert_eq!(ctx.worker.counters.replies, 1);
            }),
            Step::after(
                "backend to another client port",
                |seen| {
                    let b = seen[0].next_hop();
                    frame(
                        GATEWAY_MAC,
                        CLIENT_MAC,
                        None,
                        b,
                        TCP_BPORT,
                        C4,
                        40001,
                        L4Spec::Tcp(Tcp::ack(1, 1)),
                        64,
                        &[],
                    )
                },
                Expect::Pass,
            ),
            Step::after(
                "ICMP frag-needed from the backend about the forwarded SYN",
                |seen| {
                    let b = seen[0].next_hop();
                    icmp_error(b, C4, (3, 4, [0, 0, 0x05, 0xdc]), &seen[0].output, 40)
                },
                Expect::Forward(Side::Client),
            )
            .check(|ctx| {
                let Verdict::Forward { next_hop, .. } = ctx.verdict else {
                    unreachable!()
                };
                assert_eq!(next_hop.addr, C4);
                assert_icmp_follow(
                    ctx.input,
                    ctx.output,
                    (Dir::Src, VIP4),
                    (Dir::Dst, VIP4, 80),
                );
            }),
            Step::after(
                "ICMP frag-needed from the client about the reverse-NATed SYN-ACK",
                |seen| icmp_error(C4, VIP4, (3, 4, [0, 0, 0x05, 0xdc]), &seen[1].output, 40),
                Expect::Forward(Side::Backend),
            )
            .check(|ctx| {
                let b = ctx.seen[0].next_hop();
                let Verdict::Forward { next_hop, .. } = ctx.verdict else {
                    unreachable!()
                };
                assert_eq!(next_hop.addr, b);
                assert_icmp_follow(
                    ctx.input,
                    ctx.output,
                    (Dir::Dst, b),
                    (Dir::Src, b, TCP_BPORT),
                );
                assert_eq!(ctx.worker.counters.icmp_errors, 2);
            }),
            Step::after(
                "ICMP error about a known flow with a bad ICMP checksum",
                |seen| {
                    let b = seen[0].next_hop();
                    let mut f = icmp_error(b, C4, (3, 4, [0, 0, 0x05, 0xdc]), &seen[0].output, 40);
                    f[34 + 2] ^= 0x55;
                    f
                },
                Expect::Drop(DropReason::IcmpMalformed),
            ),
            Step::new(
                "ICMP error about a flow nobody knows",
                {
                    let q = client_frame(C4, 41000, OTHER4, 80, syn(1), &[]);
                    icmp_error(OTHER4, C4, (3, 1, [0; 4]), &q, 28)
                },
                Expect::Pass,
            ),
        ],
    ));
    v.push(case(
        "IPv6 reply path",
        vec![
            Step::new(
                "client SYN",
                client_frame(C6, 40000, VIP6, 80, syn(1), &[]),
                Expect::Forward(Side::Backend),
            ),
            Step::new(
                "backend SYN-ACK",
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B6,
                    TCP_BPORT,
                    C6,
                    40000,
                    L4Spec::Tcp(Tcp {
                        syn: true,
                        ack: Some(2),
                        seq: 9,
                        ..Tcp::default()
                    }),
                    64,
                    &[],
                ),
                Expect::Forward(Side::Client),
            )
            .check(|ctx| assert_nat(ctx.input, ctx.output, Dir::Src, VIP6, Some(80))),
            Step::after(
                "ICMPv6 packet too big from the backend about the forwarded SYN",
                |seen| icmp_error(B6, C6, (2, 0, 1280u32.to_be_bytes()), &seen[0].output, 60),
                Expect::Forward(Side::Client),
            )
            .check(|ctx| {
                let Verdict::Forward { next_hop, .. } = ctx.verdict else {
                    unreachable!()
                };
                assert_eq!(next_hop.addr, C6);
                assert_icmp_follow(
                    ctx.input,
                    ctx.output,
                    (Dir::Src, VIP6),
                    (Dir::Dst, VIP6, 80),
                );
            }),
            Step::after(
                "ICMPv6 packet too big from the client about the reverse-NATed SYN-ACK",
                |seen| icmp_error(C6, VIP6, (2, 0, 1280u32.to_be_bytes()), &seen[1].output, 60),
                Expect::Forward(Side::Backend),
            )
            .check(|ctx| {
                let Verdict::Forward { next_hop, .. } = ctx.verdict else {
                    unreachable!()
                };
                assert_eq!(next_hop.addr, B6);
                assert_icmp_follow(
                    ctx.input,
                    ctx.output,
                    (Dir::Dst, B6),
                    (Dir::Src, B6, TCP_BPORT),
                );
            }),
        ],
    ));
    v.push(case(
        "UDP reply path",
        vec![
            Step::new(
                "client query",
                client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"q"),
                Expect::Forward(Side::Backend),
            ),
            Step::new(
                "backend answer",
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B1,
                    UDP_BPORT,
                    C4,
                    40000,
                    L4Spec::Udp,
                    64,
                    b"answer",
                ),
                Expect::Forward(Side::Client),
            )
            .check(|ctx| assert_nat(ctx.input, ctx.output, Dir::Src, VIP4, Some(53))),
            Step::new(
                "backend reply with TTL 1",
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B1,
                    UDP_BPORT,
                    C4,
                    40000,
                    L4Spec::Udp,
                    1,
                    b"answer",
                ),
                Expect::Drop(DropReason::TtlExpired),
            ),
        ],
    ));
    {
        let dgram = udp_datagram(B1, C4, UDP_BPORT, 40000, 1600);
        let f1 = {
            let mut f = ipv4_raw(B1, C4, 17, 0x4242, (0, true), &dgram[..1480]);
            f[..12].copy_from_slice(&[GATEWAY_MAC, CLIENT_MAC].concat());
            f
        };
        let f2 = ipv4_raw(B1, C4, 17, 0x4242, (185, false), &dgram[1480..]);
        v.push(case(
            "fragmented UDP reply from the backend",
            vec![
                Step::new(
                    "client query",
                    client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"q"),
                    Expect::Forward(Side::Backend),
                ),
                Step::new("first reply fragment", f1, Expect::Forward(Side::Client))
                    .check(|ctx| assert_nat(ctx.input, ctx.output, Dir::Src, VIP4, Some(53))),
                Step::new("second reply fragment", f2, Expect::Forward(Side::Client)).check(
                    |ctx| {
                        assert_nat(ctx.input, ctx.output, Dir::Src, VIP4, None);
                        let mut whole = ctx.seen[1].output[34..].to_vec();
                        whole.extend_from_slice(&ctx.output[34..]);
                        let (h, payload) = UdpHeader::from_slice(&whole).unwrap();
                        assert_eq!(h.source_port, 53);
                        assert_eq!(
                            h.checksum,
                            h.calc_checksum_ipv4_raw(v4(&VIP4), v4(&C4), payload)
                                .unwrap(),
                            "UDP checksum of the reassembled reply"
                        );
                    },
                ),
            ],
        ));
    }
    v.push(case(
        "SCTP reply path",
        vec![
            Step::new(
                "client",
                client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"init"),
                Expect::Forward(Side::Backend),
            ),
            Step::new(
                "backend",
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B1,
                    SCTP_BPORT,
                    C4,
                    40000,
                    L4Spec::Sctp,
                    64,
                    b"ack!",
                ),
                Expect::Forward(Side::Client),
            )
            .check(|ctx| assert_nat(ctx.input, ctx.output, Dir::Src, VIP4, Some(SCTP_PORT))),
        ],
    ));
    v.push(case(
        "established flow keeps its backend",
        vec![
            Step::new(
                "SYN",
                tcp_syn4(40010, VIP4, 80),
                Expect::Forward(Side::Backend),
            ),
            Step::after(
                "ACK",
                |_| {
                    client_frame(
                        C4,
                        40010,
                        VIP4,
                        80,
                        L4Spec::Tcp(Tcp::ack(1001, 5001)),
                        b"data",
                    )
                },
                Expect::Forward(Side::Backend),
            )
            .check(|ctx| {
                let b = ctx.seen[0].next_hop();
                forwarded_to(b, Some(TCP_BPORT))(ctx);
                assert_eq!(ctx.worker.conntrack().len(), 1);
                assert_eq!(ctx.worker.counters.new_flows, 1);
            }),
        ],
    ));

    v
}

/// An ICMP or ICMPv6 error that followed its flow: the outer `outer.0`
/// address set to `outer.1`; in the quoted packet the `quoted.0` address and
/// port set to `quoted.1`/`quoted.2`; the TTL or hop limit one lower; every
/// checksum valid (outer IPv4 header, ICMP/ICMPv6, quoted IPv4 header, quoted
/// TCP over its rewritten addresses); nothing else changed. The quote must
/// hold the whole quoted TCP header.
fn assert_icmp_follow(
    input: &[u8],
    output: &[u8],
    outer: (Dir, Addr16),
    quoted: (Dir, Addr16, u16),
) {
    let l = layout(input);
    let (ip_len, src_at, dst_at, ttl_at, alen) = if l.v4 {
        (20, 12, 16, 8, 4)
    } else {
        (40, 8, 24, 7, 16)
    };
    let addr = |a: &Addr16| if l.v4 { a[12..].to_vec() } else { a.to_vec() };
    let icmp = l.l4;
    let q3 = icmp + 8;
    let q4 = q3 + ip_len;
    let mut want = input.to_vec();
    let at = l.l3
        + if matches!(outer.0, Dir::Src) {
            src_at
        } else {
            dst_at
        };
    want[at..at + alen].copy_from_slice(&addr(&outer.1));
    want[l.l3 + ttl_at] -= 1;
    let at = q3
        + if matches!(quoted.0, Dir::Src) {
            src_at
        } else {
            dst_at
        };
    want[at..at + alen].copy_from_slice(&addr(&quoted.1));
    let at = q4 + if matches!(quoted.0, Dir::Src) { 0 } else { 2 };
    want[at..at + 2].copy_from_slice(&quoted.2.to_be_bytes());
    let mut got = output.to_vec();
    let mut fields = vec![(icmp + 2, 2), (q4 + 16, 2)];
    if l.v4 {
        fields.extend([(l.l3 + 10, 2), (q3 + 10, 2)]);
    }
    for (at, n) in fields {
        want[at..at + n].fill(0);
        got[at..at + n].fill(0);
    }
    assert_eq!(
        got, want,
        "only the followed fields and checksums may change"
    );
    verify_checksums(output);
    let quoted = &output[q3..l.ip_end];
    let (th, tpayload) = if l.v4 {
        let (qh, qrest) = Ipv4Header::from_slice(quoted).unwrap();
        assert_eq!(
            qh.header_checksum,
            qh.calc_header_checksum(),
            "quoted IPv4 checksum"
        );
        let (th, tp) = TcpHeader::from_slice(qrest).unwrap();
        let c = th
            .calc_checksum_ipv4_raw(qh.source, qh.destination, tp)
            .unwrap();
        (th, (tp, c))
    } else {
        let (qh, qrest) = Ipv6Header::from_slice(quoted).unwrap();
        let (th, tp) = TcpHeader::from_slice(qrest).unwrap();
        let c = th
            .calc_checksum_ipv6_raw(qh.source, qh.destination, tp)
            .unwrap();
        (th, (tp, c))
    };
    assert_eq!(th.checksum, tpayload.1, "quoted TCP checksum");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn fixture_table() {
    let (failures, _, _) = run_table();
    assert!(
        failures.is_empty(),
        "{} fixture case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn counters_match_fixture_table() {
    let (_, total, expected) = run_table();
    for k in VerdictKind::ALL {
        assert_eq!(
            total.count(k),
            expected.packets[k as usize],
            "packets with verdict {}",
            k.label()
        );
    }
    for r in DropReason::ALL {
        assert_eq!(
            total.dropped(*r),
            expected.drops[r.index()],
            "drops for {}",
            r.label()
        );
    }
    assert_eq!(
        total.packets.iter().sum::<u64>(),
        expected.packets.iter().sum::<u64>()
    );
}

/// Every prefix of a valid frame is dropped, with the reason naming the layer
/// that is cut. The parser's policy, as the code gives it: a cut inside the
/// Ethernet header is `EthernetTruncated`; inside the 802.1Q tag
/// `VlanTruncated`; inside the fixed IPv4 (20-byte) or IPv6 (40-byte) header
/// `Ipv4Malformed` / `Ipv6Malformed` (the header cannot be read at all, so the
/// total length is unknown); anywhere after the fixed header (IPv4 options,
/// IPv6 extension headers, transport header or payload) `IpTruncated`, since
/// the stated IP length exceeds the frame.
#[test]
fn every_prefix_is_dropped_with_the_layer_that_is_cut() {
    use DropReason::{EthernetTruncated, IpTruncated, Ipv4Malformed, Ipv6Malformed, VlanTruncated};
    let table = table();
    let vlan4 = frame(
        CLIENT_MAC,
        GATEWAY_MAC,
        Some(3),
        C4,
        40000,
        VIP4,
        80,
        syn(1),
        64,
        b"0123456789",
    );
    // (name, frame, [(end of region, reason for cuts before it)]).
    type Regions = Vec<(usize, DropReason)>;
    let frames: Vec<(&str, Vec<u8>, Regions)> = vec![
        (
            "TCP/IPv4",
            client_frame(C4, 40000, VIP4, 80, syn(1), b"0123456789"),
            vec![
                (14, EthernetTruncated),
                (34, Ipv4Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "TCP/IPv4/802.1Q",
            vlan4,
            vec![
                (14, EthernetTruncated),
                (18, VlanTruncated),
                (38, Ipv4Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "TCP/IPv4 with options",
            tcp4_with_options(),
            vec![
                (14, EthernetTruncated),
                (34, Ipv4Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "UDP/IPv4",
            client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"abc"),
            vec![
                (14, EthernetTruncated),
                (34, Ipv4Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "SCTP/IPv4",
            client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"abcd"),
            vec![
                (14, EthernetTruncated),
                (34, Ipv4Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "TCP/IPv6",
            client_frame(C6, 40000, VIP6, 80, syn(1), b"0123456789"),
            vec![
                (14, EthernetTruncated),
                (54, Ipv6Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
        (
            "TCP/IPv6 with hop-by-hop options",
            tcp6_with_ext(true),
            vec![
                (14, EthernetTruncated),
                (54, Ipv6Malformed),
                (usize::MAX, IpTruncated),
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (name, f, regions) in &frames {
        let mut w = worker();
        for cut in 0..f.len() {
            let want = regions
                .iter()
                .find(|(end, _)| cut < *end)
                .map(|(_, r)| *r)
                .unwrap();
            let (mut buf, len) = to_buf(&f[..cut]);
            let v = w.process(NOW, &table, &mut buf, len);
            if v != Verdict::Drop(want) {
                wrong.push(format!(
                    "{name}: prefix of {cut} bytes: want Drop({want:?}), got {v:?}"
                ));
            }
        }
        // The whole frame goes through.
        let (mut buf, len) = to_buf(f);
        let v = w.process(NOW, &table, &mut buf, len);
        assert!(
            matches!(v, Verdict::Forward { .. }),
            "{name}: whole frame: {v:?}"
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Prefixes whose IP length is fixed to match the cut (so the IP layer is
/// consistent) and which cut the transport header are `L4Malformed`; a cut
/// in TCP data is a valid (shorter) packet and goes through (TCP's checksum
/// is adjusted incrementally, never verified: the receiver judges it). A cut
/// in SCTP data no longer matches the packet's CRC32c, which is checked
/// before the rewrite would make it valid: `SctpBadChecksum`.
#[test]
fn consistent_prefixes_cut_in_the_transport_header_are_l4_malformed() {
    let table = table();
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        // (name, frame, transport header length)
        (
            "TCP",
            client_frame(C4, 40000, VIP4, 80, syn(1), b"0123456789"),
            20,
        ),
        (
            "UDP",
            client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"0123456789"),
            usize::MAX,
        ),
        (
            "SCTP",
            client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"0123"),
            12,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, f, hdr) in &cases {
        for cut in 34..f.len() {
            let mut g = f[..cut].to_vec();
            g[16..18].copy_from_slice(&((cut - 14) as u16).to_be_bytes());
            fix_ipv4_checksum(&mut g, 14);
            let mut w = worker();
            let (mut buf, len) = to_buf(&g);
            let v = w.process(NOW, &table, &mut buf, len);
            let ok = if cut - 34 < *hdr {
                v == Verdict::Drop(DropReason::L4Malformed)
            } else if *name == "SCTP" {
                v == Verdict::Drop(DropReason::SctpBadChecksum)
            } else {
                matches!(v, Verdict::Forward { .. })
            };
            if !ok {
                wrong.push(format!(
                    "{name}: IP payload of {} bytes: got {v:?}",
                    cut - 34
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `len` larger than the buffer is refused before anything is read.
#[test]
fn length_past_the_buffer_is_bad_frame_length() {
    let table = table();
    let mut w = worker();
    let f = tcp_syn4(40000, VIP4, 80);
    let mut buf = f.clone();
    let before = buf.clone();
    let v = w.process(NOW, &table, &mut buf, f.len() + 1);
    assert_eq!(v, Verdict::Drop(DropReason::BadFrameLength));
    assert_eq!(buf, before);
    assert_eq!(w.counters.dropped(DropReason::BadFrameLength), 1);
}

/// A reject needs room: a UDP datagram to an empty service in a buffer just
/// as long as the frame, too short to quote the IP header and 8 bytes after
/// the new headers, is dropped as `BufferTooSmall`; with a little more room
/// the quote is shortened but still covers the header and 8 bytes.
#[test]
fn reject_without_room_is_buffer_too_small() {
    let table = table();
    let f = client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, &[]);
    let mut w = worker();
    let mut buf = f.clone();
    let v = w.process(NOW, &table, &mut buf, f.len());
    assert_eq!(v, Verdict::Drop(DropReason::BufferTooSmall));

    let f = client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, &[0x5a; 40]);
    let mut buf = f.clone();
    let v = w.process(NOW, &table, &mut buf, f.len());
    // Room for a quote of 68 - 28 = 40 bytes of the 68-byte IP packet.
    assert_eq!(v, Verdict::Reject { len: f.len() });
    assert_eq!(buf[14 + 28..], f[14..14 + 40]);
    verify_checksums(&buf);
    assert!(BUF_LEN > f.len());
}

/// LIBRARY BUG (reported, not fixed here): an IPv6 packet with Payload Length
/// 0 and no Jumbo Payload option (RFC 2675 §3: only valid with a hop-by-hop
/// Jumbo option) is accepted: etherparse's slicer takes "the rest of the
/// frame" as the payload, so Ethernet padding becomes TCP/UDP payload, the
/// flow is tracked and the frame is forwarded (or a reject quotes the
/// padding). The correct verdict is a drop (`Ipv6Malformed` by the
/// `DropReason` docs).
#[test]
fn ipv6_payload_length_zero_without_jumbo_option_is_dropped() {
    let table = table();
    let mut w = worker();
    let mut f = client_frame(C6, 40000, VIP6, 80, syn(1), &[]);
    f[18..20].fill(0); // payload length 0; next header stays TCP
    f.extend_from_slice(&[0xee; 6]);
    let (mut buf, len) = to_buf(&f);
    let v = w.process(NOW, &table, &mut buf, len);
    assert!(
        matches!(v, Verdict::Drop(_)),
        "IPv6 payload length 0 without a jumbo option must be dropped, got {v:?}"
    );
}

/// LIBRARY BUG (reported, not fixed here): an IPv6 packet addressed to the
/// IPv4-mapped form of an IPv4 frontend (`::ffff:198.19.0.10`) matches that
/// IPv4 frontend, because frontends are keyed by the canonical 16-byte
/// address and the IPv6 parser hands the raw IPv6 destination to the lookup.
/// It is then balanced to an IPv4 backend and forwarded as IPv6 to
/// `::ffff:198.18.1.x` (a conntrack entry is created in the IPv6 table); to an
/// empty IPv4 service it is answered with a RST from `::ffff:198.19.0.12`.
/// IPv4-mapped addresses never appear on the wire (RFC 4291 §2.5.5.2,
/// RFC 4038 §4.2): this is not service traffic. Expected: `Pass` (or a drop),
/// no state.
#[test]
fn ipv6_to_an_ipv4_mapped_frontend_address_is_not_service_traffic() {
    let table = table();
    for (dst, what) in [
        (VIP4, "IPv4 VIP with endpoints"),
        (EMPTY4, "IPv4 VIP without endpoints"),
    ] {
        let mut w = worker();
        let mut f = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv6(C6, dst, 64) // dst = ::ffff:198.19.0.x
            .tcp(40000, 80, 1, 64240)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        let (mut buf, len) = to_buf(&f);
        let v = w.process(NOW, &table, &mut buf, len);
        assert!(
            matches!(v, Verdict::Pass | Verdict::Drop(_)),
            "IPv6 SYN to the IPv4-mapped {what}: got {v:?}"
        );
        assert_eq!(w.conntrack().len(), 0, "no flow tracked for {what}");
    }
}

/// LIBRARY BUG (reported, not fixed here): a fragmented SCTP packet to a
/// frontend whose backend port differs has its destination port rewritten in
/// the first fragment, but its CRC32c is not recomputed (it cannot be from one
/// fragment: `finish_l4` skips fragments), so the reassembled SCTP packet
/// carries a stale CRC and the backend discards it. docs/architecture.md says
/// the CRC32c "is recomputed after a port rewrite". Expected: either the
/// reassembled packet's CRC32c is valid, or the first fragment is not
/// forwarded with a stale CRC (dropped).
#[test]
fn fragmented_sctp_keeps_a_valid_crc32c_or_is_dropped() {
    let table = table();
    let mut w = worker();
    let seg = testkit::sctp_segment(40000, SCTP_PORT, &[0x11; 2000]);
    let f1 = ipv4_raw(C4, VIP4, 132, 9, (0, true), &seg[..1480]);
    let f2 = ipv4_raw(C4, VIP4, 132, 9, (185, false), &seg[1480..]);
    let mut whole = Vec::new();
    let mut verdicts = Vec::new();
    for f in [f1, f2] {
        let (mut buf, len) = to_buf(&f);
        let v = w.process(NOW, &table, &mut buf, len);
        verdicts.push(v);
        whole.extend_from_slice(&buf[34..len]);
    }
    if let Verdict::Forward { .. } = verdicts[0] {
        assert_eq!(be16(&whole, 2), SCTP_BPORT, "port rewritten");
        assert_eq!(
            u32::from_le_bytes([whole[8], whole[9], whole[10], whole[11]]),
            sctp_crc32c(&whole),
            "CRC32c of the reassembled SCTP packet ({verdicts:?})"
        );
    }
}

/// Where a frame's IP packet ends: its Ethernet (and one VLAN tag's) header
/// plus the IP header's own length; the frame's length when it is not IP.
fn ip_end(f: &[u8]) -> usize {
    let (mut l3, mut et) = (14, u16::from_be_bytes([f[12], f[13]]));
    if et == 0x8100 {
        l3 = 18;
        et = u16::from_be_bytes([f[16], f[17]]);
    }
    match et {
        0x0800 => l3 + usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]])),
        0x86dd => l3 + 40 + usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]])),
        _ => f.len(),
    }
}
