//! Property tests: `Worker::process` never panics and never writes where it
//! should not, whatever the bytes.
//!
//! - Random byte vectors (pure noise, and noise behind plausible Ethernet /
//!   IPv4 / IPv6 headers aimed at frontends) give some verdict; a `Forward`
//!   keeps the frame length, a `Reject` fits the buffer, and nothing is
//!   written past the frame (or past the reject), a `Pass` changes nothing.
//! - Mutations of valid fixture frames (bytes flipped or set, truncated,
//!   extended) obey the same rules, and when they are forwarded the output is
//!   still a packet etherparse slices, its destination is the next hop, its
//!   TTL one lower, and every checksum that was valid on input (IPv4 header,
//!   TCP, UDP, ICMP, SCTP CRC32c; full recomputation) is valid on output: the
//!   incremental updates keep a wrong checksum wrong, so only those are
//!   checked. Rejects are new packets: all their checksums must be valid.
//! - A `len` past the buffer is `Drop(BadFrameLength)`.
//! - Hostile packets, one test per class (`docs/architecture.md`, "Hostile
//!   packets"): the verdict and drop reason, and the bytes and checksums of
//!   what is forwarded. The broad corpus is `hostile_corpus.rs`.
//!
//! Failure persistence is off (no regression files are written); a failure
//! prints the minimal input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::{Arc, OnceLock};

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{ip_from16, v4_to_16, Addr16, Proto};
use clustergate_dataplane::packet::checksum::sctp_crc32c;
use clustergate_dataplane::pipeline::{DropReason, Verdict, Worker};
use clustergate_dataplane::table::{FrontendKind, Table};
use clustergate_dataplane::testkit::{
    client_frame, ethernet, frame, icmp_error, ipv4_raw, ipv6_fragment, udp_datagram, L4Spec, Tcp,
    BUF_LEN, CLIENT_MAC, GATEWAY_MAC,
};
use clustergate_dataplane::time::Now;
use etherparse::{
    ip_number, EtherType, Icmpv4Header, Icmpv6Header, IpHeaders, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

const NOW: Now = Now(1_000_000_000_000);

const C4: Addr16 = v4_to_16([198, 18, 0, 1]);
const VIP4: Addr16 = v4_to_16([198, 19, 0, 10]);
const B1: Addr16 = v4_to_16([198, 18, 1, 1]);
const B2: Addr16 = v4_to_16([198, 18, 1, 2]);
const EMPTY4: Addr16 = v4_to_16([198, 19, 0, 12]);
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

const SCTP_PORT: u16 = 3868;

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

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let services = [
            svc(VIP4, 80, Proto::Tcp, &[(B1, 8080), (B2, 8080)]),
            svc(VIP4, 53, Proto::Udp, &[(B1, 5353)]),
            svc(VIP4, SCTP_PORT, Proto::Sctp, &[(B1, 38680)]),
            svc(VIP6, 80, Proto::Tcp, &[(B6, 8080)]),
            svc(VIP6, 53, Proto::Udp, &[(B6, 5353)]),
            svc(EMPTY4, 80, Proto::Tcp, &[]),
            svc(EMPTY4, 53, Proto::Udp, &[]),
            svc(EMPTY4, SCTP_PORT, Proto::Sctp, &[]),
            svc(EMPTY6, 80, Proto::Tcp, &[]),
            svc(EMPTY6, 53, Proto::Udp, &[]),
        ];
        Table::build(1, 0, &services).expect("table builds")
    })
}

fn worker() -> Worker {
    let cfg = Config {
        capacity: 256,
        shards: 2,
        partitions: 1,
        affinity_capacity: 16,
        fragment_capacity: 16,
        ..Config::default()
    };
    Worker::new(Arc::new(Conntrack::new(&cfg)))
}

fn v4(a: &Addr16) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

// ---------------------------------------------------------------------------
// Fixture frames (the seeds of the mutations)
// ---------------------------------------------------------------------------

/// A frame and the frames a worker sees before it (to set up state).
#[derive(Debug, Clone)]
struct Fixture {
    name: &'static str,
    setup: Vec<Vec<u8>>,
    frame: Vec<u8>,
}

fn fx(name: &'static str, frame: Vec<u8>) -> Fixture {
    Fixture {
        name,
        setup: Vec::new(),
        frame,
    }
}

fn fx_after(name: &'static str, setup: Vec<Vec<u8>>, frame: Vec<u8>) -> Fixture {
    Fixture { name, setup, frame }
}

fn syn() -> L4Spec {
    L4Spec::Tcp(Tcp::syn(1000))
}

fn fixtures() -> &'static [Fixture] {
    static F: OnceLock<Vec<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let query4 = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"query");
        let query6 = client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"query");
        // What the backends saw (the forwarded queries) and what the clients
        // saw (the reverse-NATed answers): the packets ICMP errors quote.
        let to_b1 = client_frame(C4, 40000, B1, 5353, L4Spec::Udp, b"query");
        let to_b6 = client_frame(C6, 40000, B6, 5353, L4Spec::Udp, b"query");
        let from_vip4 = frame(
            GATEWAY_MAC,
            CLIENT_MAC,
            None,
            VIP4,
            53,
            C4,
            40000,
            L4Spec::Udp,
            63,
            b"answer",
        );
        let dgram4 = udp_datagram(C4, VIP4, 40000, 53, 1600);
        let first4 = ipv4_raw(C4, VIP4, 17, 0x77, (0, true), &dgram4[..1480]);
        let second4 = ipv4_raw(C4, VIP4, 17, 0x77, (185, false), &dgram4[1480..]);
        let dgram6 = udp_datagram(C6, VIP6, 40000, 53, 1600);
        let first6 = ipv6_fragment(C6, VIP6, 17, 0x77, (0, true), &dgram6[..1232]);
        let second6 = ipv6_fragment(C6, VIP6, 17, 0x77, (154, false), &dgram6[1232..]);
        let options4 = {
            let mut h = Ipv4Header::new(0, 64, ip_number::TCP, v4(&C4), v4(&VIP4)).unwrap();
            h.options = Ipv4Options::try_from(&[0x94, 0x04, 0, 0, 1, 1, 1, 0][..]).unwrap();
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
                .ip(IpHeaders::Ipv4(h, Default::default()))
                .tcp(40000, 80, 1000, 64240)
                .syn()
                .write(&mut out, b"opts")
                .unwrap();
            out
        };
        let hbh6 = {
            let exts = Ipv6Extensions {
                hop_by_hop_options: Some(
                    Ipv6RawExtHeader::new_raw(ip_number::TCP, &[1, 4, 0, 0, 0, 0]).unwrap(),
                ),
                ..Default::default()
            };
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
            out
        };
        let mut padded = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"p");
        padded.resize(60, 0);
        vec![
            fx(
                "TCP/IPv4 SYN",
                client_frame(C4, 40000, VIP4, 80, syn(), b"hello"),
            ),
            fx(
                "TCP/IPv4/802.1Q",
                frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    Some(100),
                    C4,
                    40000,
                    VIP4,
                    80,
                    syn(),
                    64,
                    b"vlan",
                ),
            ),
            fx("TCP/IPv4 with options", options4),
            fx("UDP/IPv4", query4.clone()),
            fx("UDP/IPv4 with padding", padded),
            fx("UDP/IPv4 checksum 0", {
                let mut f = query4.clone();
                f[40..42].fill(0);
                f
            }),
            fx(
                "SCTP/IPv4",
                client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"beat"),
            ),
            fx(
                "TCP/IPv6",
                client_frame(C6, 40000, VIP6, 80, syn(), b"hello"),
            ),
            fx("TCP/IPv6 hop-by-hop", hbh6),
            fx("UDP/IPv6", query6.clone()),
            fx(
                "UDP/IPv6/802.1Q",
                frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    Some(9),
                    C6,
                    40000,
                    VIP6,
                    53,
                    L4Spec::Udp,
                    64,
                    b"q",
                ),
            ),
            fx(
                "TCP/IPv4 SYN to an empty service",
                client_frame(C4, 40000, EMPTY4, 80, syn(), b""),
            ),
            fx(
                "TCP/IPv4 ACK to an empty service",
                client_frame(C4, 40000, EMPTY4, 80, L4Spec::Tcp(Tcp::ack(5, 6)), b"data"),
            ),
            fx(
                "UDP/IPv4 to an empty service",
                client_frame(C4, 40000, EMPTY4, 53, L4Spec::Udp, b"q"),
            ),
            fx(
                "SCTP/IPv4 to an empty service",
                client_frame(C4, 40000, EMPTY4, SCTP_PORT, L4Spec::Sctp, b"q"),
            ),
            fx(
                "TCP/IPv6 to an empty service",
                client_frame(C6, 40000, EMPTY6, 80, syn(), b""),
            ),
            fx(
                "UDP/IPv6 to an empty service",
                client_frame(C6, 40000, EMPTY6, 53, L4Spec::Udp, b"q"),
            ),
            fx_after(
                "UDP/IPv4 reply from the backend",
                vec![query4.clone()],
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B1,
                    5353,
                    C4,
                    40000,
                    L4Spec::Udp,
                    64,
                    b"answer",
                ),
            ),
            fx_after(
                "UDP/IPv6 reply from the backend",
                vec![query6.clone()],
                frame(
                    GATEWAY_MAC,
                    CLIENT_MAC,
                    None,
                    B6,
                    5353,
                    C6,
                    40000,
                    L4Spec::Udp,
                    64,
                    b"answer",
                ),
            ),
            fx_after(
                "ICMPv4 error from the backend",
                vec![query4.clone()],
                icmp_error(B1, C4, (3, 3, [0; 4]), &to_b1, 64),
            ),
            fx_after(
                "ICMPv4 error from the client",
                vec![query4.clone()],
                icmp_error(C4, VIP4, (3, 4, [0, 0, 5, 0xdc]), &from_vip4, 64),
            ),
            fx_after(
                "ICMPv4 error with a short quote",
                vec![query4],
                icmp_error(B1, C4, (11, 0, [0; 4]), &to_b1, 28),
            ),
            fx_after(
                "ICMPv6 error from the backend",
                vec![query6],
                icmp_error(B6, C6, (1, 4, [0; 4]), &to_b6, 100),
            ),
            fx("IPv4 first fragment", first4.clone()),
            fx_after("IPv4 non-first fragment", vec![first4], second4),
            fx("IPv6 first fragment", first6.clone()),
            fx_after("IPv6 non-first fragment", vec![first6], second6),
        ]
    })
}

// ---------------------------------------------------------------------------
// Independent checks (etherparse)
// ---------------------------------------------------------------------------

/// Offset of the IP header: after the Ethernet header and one 802.1Q tag.
fn l3_of(f: &[u8]) -> Option<usize> {
    match f.get(12..14)? {
        [0x81, 0x00] => Some(18),
        _ => Some(14),
    }
}

/// Validity of the outer IPv4 header checksum (full recomputation), if the
/// frame starts with an IPv4 header etherparse can read.
fn ipv4_header_ok(f: &[u8]) -> Option<bool> {
    let l3 = l3_of(f)?;
    let h = etherparse::Ipv4HeaderSlice::from_slice(f.get(l3..)?).ok()?;
    Some(h.header_checksum() == h.to_header().calc_header_checksum())
}

/// The outer IP header's (destination, TTL or hop limit), if readable.
fn outer_dst_ttl(f: &[u8]) -> Option<(Addr16, u8)> {
    let l3 = l3_of(f)?;
    let ip = f.get(l3..)?;
    match ip.first()? >> 4 {
        4 => {
            let h = etherparse::Ipv4HeaderSlice::from_slice(ip).ok()?;
            Some((v4_to_16(h.destination()), h.ttl()))
        }
        6 => {
            let h = etherparse::Ipv6HeaderSlice::from_slice(ip).ok()?;
            Some((h.destination(), h.hop_limit()))
        }
        _ => None,
    }
}

/// Same checksum, allowing the two one's-complement zeros.
fn same_sum(field: u16, computed: u16) -> bool {
    field == computed || (field | computed == 0xffff && field & computed == 0)
}

/// Validity of the transport checksum (full recomputation), if the frame
/// slices and is not a fragment: TCP, UDP, ICMP, ICMPv6, SCTP.
fn l4_ok(f: &[u8]) -> Option<bool> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let (src, dst, v4_, payload) = match p.net.as_ref()? {
        NetSlice::Ipv4(ip) => (
            v4_to_16(ip.header().source()),
            v4_to_16(ip.header().destination()),
            true,
            ip.payload(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source(),
            ip.header().destination(),
            false,
            ip.payload(),
        ),
        NetSlice::Arp(_) => return None,
    };
    if payload.fragmented {
        return None;
    }
    Some(match p.transport.as_ref() {
        Some(TransportSlice::Tcp(t)) => {
            let c = if v4_ {
                t.calc_checksum_ipv4(v4(&src), v4(&dst))
            } else {
                t.calc_checksum_ipv6(src, dst)
            }
            .ok()?;
            same_sum(t.checksum(), c)
        }
        Some(TransportSlice::Udp(u)) => {
            if v4_ && u.checksum() == 0 {
                return Some(true);
            }
            let h = u.to_header();
            let c = if v4_ {
                h.calc_checksum_ipv4_raw(v4(&src), v4(&dst), u.payload())
            } else {
                h.calc_checksum_ipv6_raw(src, dst, u.payload())
            }
            .ok()?;
            same_sum(u.checksum(), c)
        }
        Some(TransportSlice::Icmpv4(i)) => same_sum(
            i.checksum(),
            Icmpv4Header::with_checksum(i.icmp_type(), i.payload()).checksum,
        ),
        Some(TransportSlice::Icmpv6(i)) => same_sum(
            i.checksum(),
            Icmpv6Header::with_checksum(i.icmp_type(), src, dst, i.payload())
                .ok()?
                .checksum,
        ),
        Some(_) => return None,
        None if payload.ip_number.0 == 132 && payload.payload.len() >= 12 => {
            let s = payload.payload;
            u32::from_le_bytes([s[8], s[9], s[10], s[11]]) == sctp_crc32c(s)
        }
        None => return None,
    })
}

/// The rules every verdict obeys; returns the verdict.
fn process_checked(
    w: &mut Worker,
    input: &[u8],
    room: bool,
) -> Result<(Verdict, Vec<u8>), TestCaseError> {
    let mut buf = input.to_vec();
    if room {
        buf.resize(BUF_LEN.max(input.len()), 0x5a);
    }
    let len = input.len();
    let before = buf.clone();
    let v = w.process(NOW, table(), &mut buf, len);
    match v {
        Verdict::Forward { len: l, .. } => {
            // Up to the IP packet's end: padding and trailing bytes are trimmed.
            prop_assert!(l <= len, "a forward longer than its frame: {} > {}", l, len);
            prop_assert!(buf[len..] == before[len..], "forward wrote past the frame");
        }
        Verdict::Reject { len: l } => {
            prop_assert!(l <= buf.len(), "reject longer than the buffer");
            let end = l.max(len);
            prop_assert!(buf[end..] == before[end..], "reject wrote past itself");
        }
        Verdict::Pass | Verdict::Handoff { .. } => {
            prop_assert!(
                buf == before,
                "a passed or handed-off frame must be unchanged"
            )
        }
        Verdict::Drop(_) => {
            prop_assert!(buf[len..] == before[len..], "drop wrote past the frame");
        }
    }
    let out_len = match v {
        Verdict::Forward { len, .. } | Verdict::Reject { len } => len,
        _ => len,
    };
    if let Verdict::Reject { .. } = v {
        // A reject is a new packet: it must slice and all its checksums hold.
        let out = &buf[..out_len];
        prop_assert!(
            SlicedPacket::from_ethernet(out).is_ok(),
            "reject does not slice: {:02x?}",
            out
        );
        if ipv4_header_ok(out).is_some() {
            prop_assert_eq!(ipv4_header_ok(out), Some(true), "reject IPv4 checksum");
        }
        prop_assert_eq!(
            l4_ok(out),
            Some(true),
            "reject transport checksum: {:02x?}",
            out
        );
    }
    buf.truncate(out_len);
    Ok((v, buf))
}

/// Checks on a forwarded frame, given its input.
fn check_forward(input: &[u8], v: Verdict, out: &[u8]) -> Result<(), TestCaseError> {
    let Verdict::Forward { next_hop, .. } = v else {
        return Ok(());
    };
    prop_assert!(
        SlicedPacket::from_ethernet(out).is_ok(),
        "forwarded frame does not slice: {:02x?}",
        out
    );
    let (dst, ttl) = outer_dst_ttl(out).expect("forwarded frame has an IP header");
    let (_, ttl_in) = outer_dst_ttl(input).expect("forwarded input has an IP header");
    prop_assert_eq!(dst, next_hop.addr, "the destination is the next hop");
    prop_assert_eq!(ttl, ttl_in - 1, "TTL one lower");
    if ipv4_header_ok(input) == Some(true) {
        prop_assert_eq!(
            ipv4_header_ok(out),
            Some(true),
            "IPv4 header checksum kept valid"
        );
    }
    if l4_ok(input) == Some(true) {
        prop_assert_eq!(l4_ok(out), Some(true), "transport checksum kept valid");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Noise behind an Ethernet header with an IP (or VLAN) ether type.
fn ethernet_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0x0800u16, 0x86dd, 0x8100, 0x0806]),
        vec(any::<u8>(), 0..186),
    )
        .prop_map(|(et, rest)| {
            let mut f = ethernet(EtherType(et));
            f.extend_from_slice(&rest);
            f
        })
}

/// An IPv4 header that reads (version 4, IHL 5..=7, total length = what
/// follows unless `bad_len`), aimed at a frontend, with noise as its payload
/// behind a port pair that often names a service.
fn ipv4_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![6u8, 17, 132, 1, 58, 51]),
        prop::sample::select(vec![VIP4, EMPTY4, C4]),
        5u8..=7,
        any::<[u8; 4]>(), // id, flags/fragment offset
        0u8..=3,          // TTL
        prop::sample::select(vec![80u16, 53, SCTP_PORT, 1]),
        vec(any::<u8>(), 0..120),
        any::<bool>(),
        any::<u16>(),
    )
        .prop_map(
            |(proto, dst, ihl, idfrag, ttl, dport, rest, bad_len, len_noise)| {
                let mut ip = vec![0x40 | ihl, 0, 0, 0];
                ip.extend_from_slice(&idfrag);
                ip.extend_from_slice(&[if ttl == 3 { 64 } else { ttl }, proto, 0, 0]);
                ip.extend_from_slice(&v4(&C4));
                ip.extend_from_slice(&v4(&dst));
                ip.resize(usize::from(ihl) * 4, 1); // NOP options
                ip.extend_from_slice(&40000u16.to_be_bytes());
                ip.extend_from_slice(&dport.to_be_bytes());
                ip.extend_from_slice(&rest);
                let total = if bad_len { len_noise } else { ip.len() as u16 };
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                let c = raw_checksum(&ip[..usize::from(ihl) * 4]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                let mut f = ethernet(EtherType::IPV4);
                f.extend_from_slice(&ip);
                f
            },
        )
}

/// An IPv6 header aimed at a frontend with a next header from a small set
/// (transports, ICMP both kinds, extension headers) and noise after it.
fn ipv6_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![6u8, 17, 132, 58, 1, 0, 43, 44, 60, 51, 59]),
        prop::sample::select(vec![VIP6, EMPTY6, C6]),
        0u8..=3,
        prop::sample::select(vec![80u16, 53, 1]),
        vec(any::<u8>(), 0..120),
        any::<bool>(),
        any::<u16>(),
    )
        .prop_map(|(nh, dst, hl, dport, rest, bad_len, len_noise)| {
            let mut p = Vec::new();
            p.extend_from_slice(&40000u16.to_be_bytes());
            p.extend_from_slice(&dport.to_be_bytes());
            p.extend_from_slice(&rest);
            let h = Ipv6Header {
                payload_length: if bad_len { len_noise } else { p.len() as u16 },
                next_header: IpNumber(nh),
                hop_limit: if hl == 3 { 64 } else { hl },
                source: C6,
                destination: dst,
                ..Default::default()
            };
            let mut f = ethernet(EtherType::IPV6);
            h.write(&mut f).unwrap();
            f.extend_from_slice(&p);
            f
        })
}

fn raw_checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A byte vector of any of the kinds above.
fn random_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        ethernet_noise(),
        ipv4_noise(),
        ipv6_noise(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte with a non-zero mask.
    Flip(Index, u8),
    /// Set a byte (often to a boundary value).
    Set(Index, u8),
    /// Cut the frame at a point.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => (any::<Index>(), prop_oneof![Just(0u8), Just(1), Just(0xff), Just(0x45), Just(0x86), any::<u8>()])
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
    ]
}

fn apply(f: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, x) if !f.is_empty() => {
            let at = i.index(f.len());
            f[at] ^= x;
        }
        Mutation::Set(i, b) if !f.is_empty() => {
            let at = i.index(f.len());
            f[at] = *b;
        }
        Mutation::Truncate(i) => {
            let at = i.index(f.len() + 1);
            f.truncate(at);
        }
        Mutation::Extend(tail) => f.extend_from_slice(tail),
        _ => {}
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    /// Any bytes: some verdict, no panic, no write out of place.
    #[test]
    fn random_bytes_never_panic(f in random_frame(), room in any::<bool>()) {
        let mut w = worker();
        let (v, out) = process_checked(&mut w, &f, room)?;
        check_forward(&f, v, &out)?;
    }
}

proptest! {
    #![proptest_config(config(3000))]

    /// Mutated fixtures: the same rules, and forwarded outputs stay valid.
    #[test]
    fn mutated_fixtures_stay_sound(
        which in any::<Index>(),
        muts in vec(mutation(), 1..4),
        room in any::<bool>(),
    ) {
        let fxs = fixtures();
        let fxt = &fxs[which.index(fxs.len())];
        let mut w = worker();
        for s in &fxt.setup {
            let (v, _) = process_checked(&mut w, s, true)?;
            prop_assert!(matches!(v, Verdict::Forward { .. }), "setup of {}: {:?}", fxt.name, v);
        }
        let mut f = fxt.frame.clone();
        for m in &muts {
            apply(&mut f, m);
        }
        let (v, out) = process_checked(&mut w, &f, room)?;
        check_forward(&f, v, &out)?;
    }

    /// `len` past the end of the buffer: `BadFrameLength`, nothing touched.
    #[test]
    fn length_past_the_buffer_is_bad_frame_length(
        f in random_frame(),
        extra in 1usize..100,
    ) {
        let mut w = worker();
        let mut buf = f.clone();
        let v = w.process(NOW, table(), &mut buf, f.len() + extra);
        prop_assert_eq!(v, Verdict::Drop(DropReason::BadFrameLength));
        prop_assert_eq!(buf, f);
    }
}

/// Every unmutated fixture goes through the checks (and is what it claims).
#[test]
fn fixtures_themselves_are_handled() {
    for fxt in fixtures() {
        let mut w = worker();
        for s in &fxt.setup {
            let (v, _) = process_checked(&mut w, s, true).unwrap();
            assert!(
                matches!(v, Verdict::Forward { .. }),
                "setup of {}",
                fxt.name
            );
        }
        let (v, out) = process_checked(&mut w, &fxt.frame, true).unwrap();
        assert!(
            matches!(v, Verdict::Forward { .. } | Verdict::Reject { .. }),
            "{}: {v:?}",
            fxt.name
        );
        check_forward(&fxt.frame, v, &out).unwrap();
        if let Verdict::Forward { .. } = v {
            if fxt.name.contains("fragment") {
                continue;
            }
            assert_eq!(
                l4_ok(&fxt.frame),
                Some(true),
                "{}: input checksum",
                fxt.name
            );
        }
    }
}

/// An SCTP packet whose CRC32c is wrong is dropped before its ports are
/// rewritten (which would give it a valid CRC: laundering), and counted;
/// the same packet with its CRC intact is forwarded with a valid one.
#[test]
fn a_corrupt_sctp_packet_is_not_given_a_valid_crc() {
    let good = client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"heartbeat");
    let l4 = 14 + 20;
    let mut w = worker();
    let mut buf = vec![0u8; BUF_LEN];
    buf[..good.len()].copy_from_slice(&good);
    let v = w.process(NOW, table(), &mut buf, good.len());
    let Verdict::Forward { len, .. } = v else {
        panic!("a valid SCTP packet: {v:?}")
    };
    let sctp = &buf[l4..len];
    assert_eq!(
        u32::from_le_bytes(sctp[8..12].try_into().unwrap()),
        sctp_crc32c(sctp),
        "forwarded with a valid CRC"
    );
    assert_eq!(
        u16::from_be_bytes([sctp[2], sctp[3]]),
        38680,
        "port rewritten"
    );

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01; // one payload bit: the CRC no longer matches
    buf[..bad.len()].copy_from_slice(&bad);
    let v = w.process(NOW, table(), &mut buf, bad.len());
    assert_eq!(v, Verdict::Drop(DropReason::SctpBadChecksum));
    assert_eq!(w.counters.dropped(DropReason::SctpBadChecksum), 1);
    assert_eq!(&buf[..bad.len()], &bad[..], "nothing rewritten");
}

/// A packet to a frontend from a martian source (0/8, loopback, multicast,
/// broadcast; IPv6 unspecified, loopback, multicast), or sent to a
/// link-layer group address, is dropped and counted, never forwarded or
/// answered; the same packet from a real client is forwarded.
#[test]
fn martian_sources_and_link_broadcasts_are_dropped() {
    let mut w = worker();
    let mut buf = vec![0u8; BUF_LEN];
    let mut run = |w: &mut Worker, f: &[u8]| {
        buf[..f.len()].copy_from_slice(f);
        w.process(NOW, table(), &mut buf, f.len())
    };
    for (src, vip) in [
        (v4_to_16([0, 0, 0, 0]), VIP4),
        (v4_to_16([0, 1, 2, 3]), VIP4),
        (v4_to_16([127, 0, 0, 1]), VIP4),
        (v4_to_16([224, 0, 0, 1]), VIP4),
        (v4_to_16([255, 255, 255, 255]), VIP4),
        ([0; 16], VIP6),
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], VIP6),
        ([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], VIP6),
    ] {
        let f = client_frame(src, 40000, vip, 80, syn(), b"");
        assert_eq!(
            run(&mut w, &f),
            Verdict::Drop(DropReason::MartianSource),
            "from {}",
            ip_from16(src)
        );
    }
    assert_eq!(w.counters.dropped(DropReason::MartianSource), 8);

    let good = client_frame(C4, 40000, VIP4, 80, syn(), b"");
    let mut bcast = good.clone();
    bcast[..6].copy_from_slice(&[0xff; 6]);
    assert_eq!(
        run(&mut w, &bcast),
        Verdict::Drop(DropReason::LinkBroadcast)
    );
    let mut mcast = good.clone();
    mcast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    assert_eq!(
        run(&mut w, &mcast),
        Verdict::Drop(DropReason::LinkBroadcast)
    );
    assert!(matches!(run(&mut w, &good), Verdict::Forward { .. }));
}

// ---------------------------------------------------------------------------
// Hostile packets, one class at a time (docs/architecture.md, "Hostile
// packets")
// ---------------------------------------------------------------------------

/// Runs frames through one worker, each in a fresh [`BUF_LEN`] buffer;
/// returns the verdict and the buffer.
fn run(w: &mut Worker, f: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; BUF_LEN.max(f.len() + 200)];
    buf[..f.len()].copy_from_slice(f);
    let v = w.process(NOW, table(), &mut buf, f.len());
    (v, buf)
}

/// The frame's bytes when forwarded; panics otherwise.
fn fwd(w: &mut Worker, f: &[u8], what: &str) -> Vec<u8> {
    match run(w, f) {
        (Verdict::Forward { len, .. }, buf) => buf[..len].to_vec(),
        (v, _) => panic!("{what}: expected a forward, got {v:?}"),
    }
}

fn drop_of(w: &mut Worker, f: &[u8]) -> Verdict {
    run(w, f).0
}

/// One's-complement sum of 16-bit words (odd byte padded), unfolded.
fn ones_sum(mut acc: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn folds_to_ffff(mut s: u32) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// An IPv6 datagram whose fragmentable part starts with Destination Options
/// (RFC 8200 §4.5): the first fragment carries them and the UDP header; the
/// last one's first bytes are UDP payload, which would not parse as an
/// extension header. Both are forwarded to the backend, and the datagram
/// they make up has a valid UDP checksum for its new destination.
#[test]
fn an_ipv6_non_first_fragment_is_data_not_headers() {
    let mut w = worker();
    let dgram = udp_datagram(C6, VIP6, 40000, 53, 200);
    let mut first_data = vec![17, 0, 1, 4, 0, 0, 0, 0]; // Destination Options, PadN
    first_data.extend_from_slice(&dgram[..48]);
    let first = ipv6_fragment(C6, VIP6, 60, 0x5151, (0, true), &first_data);
    // Offset 56 bytes: the options (8) and 48 UDP bytes.
    let last = ipv6_fragment(C6, VIP6, 60, 0x5151, (7, false), &dgram[48..]);
    assert!(
        (u16::from(dgram[49]) + 1) * 8 > 152,
        "the data would be an extension header longer than the fragment"
    );
    let a = fwd(&mut w, &first, "first fragment");
    let b = fwd(&mut w, &last, "last fragment");
    for f in [&a, &b] {
        assert_eq!(&f[14 + 24..14 + 40], &B6[..], "to the backend");
    }
    assert_eq!(&b[14 + 48..], &dgram[48..], "fragment data unchanged");
    let mut udp = a[14 + 40 + 8 + 8..].to_vec();
    udp.extend_from_slice(&b[14 + 48..]);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 5353, "backend port");
    let pseudo = ones_sum(ones_sum(0, &C6), &B6) + udp.len() as u32 + 17;
    assert!(
        folds_to_ffff(ones_sum(pseudo, &udp)),
        "reassembled UDP checksum"
    );
    assert_eq!(w.counters.fragments_nonfirst, 1);
}

/// Overlapping, repeated and past-the-end fragments are dropped and counted
/// (RFC 5722, RFC 1858 §3), and so is the rest of a datagram that had an
/// overlap; the fragments before it were forwarded.
#[test]
fn overlapping_fragments_are_dropped() {
    let mut w = worker();
    let dgram = udp_datagram(C4, VIP4, 40000, 53, 200);
    let frag =
        |id: u16, off: u16, more: bool, data: &[u8]| ipv4_raw(C4, VIP4, 17, id, (off, more), data);
    let overlap = Verdict::Drop(DropReason::FragmentOverlap);
    // A repeat, then a valid last fragment of the poisoned datagram.
    fwd(&mut w, &frag(1, 0, true, &dgram[..64]), "1 first");
    fwd(&mut w, &frag(1, 8, true, &dgram[64..128]), "1 middle");
    assert_eq!(drop_of(&mut w, &frag(1, 8, true, &dgram[64..128])), overlap);
    assert_eq!(drop_of(&mut w, &frag(1, 16, false, &dgram[128..])), overlap);
    // Past the end the last fragment set.
    fwd(&mut w, &frag(2, 0, true, &dgram[..64]), "2 first");
    fwd(
        &mut w,
        &frag(2, 16, false, &dgram[128..]),
        "2 last, out of order",
    );
    fwd(
        &mut w,
        &frag(2, 8, true, &dgram[64..128]),
        "2 middle fills the hole",
    );
    assert_eq!(drop_of(&mut w, &frag(2, 25, false, &[0; 8])), overlap);
    // The first fragment twice.
    fwd(&mut w, &frag(3, 0, true, &dgram[..64]), "3 first");
    assert_eq!(drop_of(&mut w, &frag(3, 0, true, &dgram[..64])), overlap);
    // Into the first fragment's bytes.
    fwd(&mut w, &frag(4, 0, true, &dgram[..64]), "4 first");
    assert_eq!(drop_of(&mut w, &frag(4, 4, true, &dgram[32..96])), overlap);
    assert_eq!(w.counters.dropped(DropReason::FragmentOverlap), 5);
    // IPv6 alike.
    let d6 = udp_datagram(C6, VIP6, 40000, 53, 200);
    fwd(
        &mut w,
        &ipv6_fragment(C6, VIP6, 17, 9, (0, true), &d6[..64]),
        "v6 first",
    );
    let mid = ipv6_fragment(C6, VIP6, 17, 9, (4, true), &d6[32..96]);
    assert_eq!(drop_of(&mut w, &mid), overlap);
}

/// A fragment that reaches past 65 535 bytes (the "ping of death") and a
/// TCP fragment at offset 8 bytes (RFC 3128's offset 1) are dropped before
/// anything is looked up; just below the limit, and UDP at offset 8, are
/// ordinary untracked fragments.
#[test]
fn oversize_and_tiny_tcp_fragments_are_dropped() {
    let mut w = worker();
    let oversize = Verdict::Drop(DropReason::FragmentOversize);
    let untracked = Verdict::Drop(DropReason::FragmentUntracked);
    let tiny = Verdict::Drop(DropReason::FragmentTinyTcp);
    // IPv4: header (20) + offset + data > 65 535.
    assert_eq!(
        drop_of(&mut w, &ipv4_raw(C4, VIP4, 17, 7, (8189, false), &[0; 48])),
        oversize
    );
    assert_eq!(
        drop_of(&mut w, &ipv4_raw(C4, VIP4, 17, 7, (8183, false), &[0; 48])),
        untracked
    );
    assert_eq!(
        drop_of(&mut w, &ipv4_raw(C4, VIP4, 1, 7, (8189, false), &[0; 48])),
        oversize,
        "ICMP too"
    );
    // IPv6: offset + data > 65 535.
    assert_eq!(
        drop_of(
            &mut w,
            &ipv6_fragment(C6, VIP6, 17, 7, (8190, false), &[0; 48])
        ),
        oversize
    );
    assert_eq!(
        drop_of(
            &mut w,
            &ipv6_fragment(C6, VIP6, 17, 7, (8185, false), &[0; 48])
        ),
        untracked
    );
    // TCP at offset 1 (8 bytes), even after a valid first fragment.
    let syn4 = client_frame(C4, 40000, VIP4, 80, syn(), &[0; 40]);
    let tcp4 = &syn4[34..];
    fwd(
        &mut w,
        &ipv4_raw(C4, VIP4, 6, 8, (0, true), &tcp4[..24]),
        "TCP first fragment",
    );
    assert_eq!(
        drop_of(&mut w, &ipv4_raw(C4, VIP4, 6, 8, (1, true), &tcp4[8..24])),
        tiny
    );
    assert_eq!(
        drop_of(&mut w, &ipv6_fragment(C6, VIP6, 6, 8, (1, false), &[0; 16])),
        tiny
    );
    assert_eq!(
        drop_of(&mut w, &ipv4_raw(C4, VIP4, 17, 8, (1, false), &[0; 16])),
        untracked
    );
    assert_eq!(w.counters.dropped(DropReason::FragmentOversize), 3);
    assert_eq!(w.counters.dropped(DropReason::FragmentTinyTcp), 2);
}

fn ipv4_with_options(opts: &[u8]) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, ip_number::TCP, v4(&C4), v4(&VIP4)).unwrap();
    h.options = Ipv4Options::try_from(opts).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(40000, 80, 1000, 64240)
        .syn()
        .write(&mut out, b"opts")
        .unwrap();
    out
}

fn ipv6_with_routing(segments_left: u8) -> Vec<u8> {
    let exts = Ipv6Extensions {
        routing: Some(etherparse::Ipv6RoutingExtensions {
            routing: Ipv6RawExtHeader::new_raw(ip_number::TCP, &[4, segments_left, 0, 0, 0, 0])
                .unwrap(),
            final_destination_options: None,
        }),
        ..Default::default()
    };
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
        .write(&mut out, b"rt")
        .unwrap();
    out
}

/// Source-routed packets are dropped: IPv4 LSRR and SSRR (RFC 7126 §4.3,
/// Linux `accept_source_route=0`), IPv6 routing headers with segments left
/// (RFC 8200 §4.4, RFC 5095). Record Route, and a routing header with no
/// segments left, are forwarded with valid checksums; options that overrun
/// the header are malformed.
#[test]
fn source_routed_packets_are_dropped() {
    let mut w = worker();
    let sr = Verdict::Drop(DropReason::SourceRoute);
    let lsrr = ipv4_with_options(&[131, 7, 4, 198, 18, 1, 1, 0]);
    let ssrr = ipv4_with_options(&[1, 137, 7, 4, 198, 18, 1, 1]);
    assert_eq!(drop_of(&mut w, &lsrr), sr);
    assert_eq!(drop_of(&mut w, &ssrr), sr);
    assert_eq!(drop_of(&mut w, &ipv6_with_routing(1)), sr);
    assert_eq!(
        drop_of(&mut w, &ipv4_with_options(&[7, 11, 4, 0, 0, 0, 0, 0])),
        Verdict::Drop(DropReason::Ipv4Malformed),
        "an option longer than the header"
    );
    assert_eq!(w.counters.dropped(DropReason::SourceRoute), 3);
    for (what, f) in [
        ("record route", ipv4_with_options(&[7, 7, 4, 0, 0, 0, 0, 0])),
        ("routing header, no segments left", ipv6_with_routing(0)),
    ] {
        let (v, out) = process_checked(&mut w, &f, true).unwrap();
        assert!(matches!(v, Verdict::Forward { .. }), "{what}: {v:?}");
        check_forward(&f, v, &out).unwrap();
        assert_eq!(l4_ok(&out), Some(true), "{what}: transport checksum");
    }
}

/// An ICMP error quoting a whole SCTP packet leaves with the quote's CRC32c
/// right for the translated ports (and a wrong one stays wrong); a cut quote
/// keeps the bytes it has, its CRC untouched.
#[test]
fn icmp_errors_keep_a_quoted_sctp_crc_consistent() {
    let mut w = worker();
    let init = client_frame(C4, 40000, VIP4, SCTP_PORT, L4Spec::Sctp, b"beat");
    let to_b1 = fwd(&mut w, &init, "SCTP to the backend");
    let sctp_len = to_b1.len() - 34;
    let quoted_crc = |out: &[u8]| {
        let q = &out[14 + 20 + 8 + 20..];
        (
            u32::from_le_bytes(q[8..12].try_into().unwrap()),
            sctp_crc32c(q),
            u16::from_be_bytes([q[2], q[3]]),
        )
    };
    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &to_b1, 20 + sctp_len);
    let out = fwd(&mut w, &err, "whole quote");
    let (stored, computed, dport) = quoted_crc(&out);
    assert_eq!(dport, SCTP_PORT, "quoted destination is the frontend again");
    assert_eq!(
        stored, computed,
        "quoted CRC right for the translated ports"
    );
    assert_eq!(l4_ok(&out), Some(true), "ICMP checksum");

    let mut corrupt = to_b1.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x10;
    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &corrupt, 20 + sctp_len);
    let out = fwd(&mut w, &err, "whole quote, wrong CRC");
    let (stored, computed, _) = quoted_crc(&out);
    let (s0, c0) = {
        let q = &corrupt[34..];
        (
            u32::from_le_bytes(q[8..12].try_into().unwrap()),
            sctp_crc32c(q),
        )
    };
    assert_eq!(stored ^ computed, s0 ^ c0, "wrong by the same amount");
    assert_ne!(stored, computed);

    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &to_b1, 28);
    let out = fwd(&mut w, &err, "8-byte quote");
    let q = &out[14 + 20 + 8 + 20..];
    assert_eq!(q.len(), 8);
    assert_eq!(u16::from_be_bytes([q[2], q[3]]), SCTP_PORT);
    assert_eq!(&q[4..8], &to_b1[38..42], "verification tag as sent");
    assert_eq!(l4_ok(&out), Some(true), "ICMP checksum");
}

/// An ICMP error quoting a non-first fragment is not matched to a flow,
/// whatever its first payload bytes look like (they are not ports).
#[test]
fn a_quoted_non_first_fragment_is_not_matched() {
    let mut w = worker();
    let query = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"query");
    fwd(&mut w, &query, "query");
    // A fragment at offset 8 whose data starts like the forwarded query's
    // UDP header (40000 → B1:5353).
    let mut data = vec![0x9c, 0x40, 0x14, 0xe9, 0, 16, 0, 0];
    data.extend_from_slice(&[0; 8]);
    let fragment = ipv4_raw(C4, B1, 17, 3, (1, false), &data);
    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &fragment, 36);
    assert_eq!(drop_of(&mut w, &err), Verdict::Pass);
    assert_eq!(w.counters.icmp_errors, 0);
    let mut whole = fragment.clone();
    whole[14 + 6..14 + 8].fill(0); // the same bytes as a whole packet
    let sum = raw_checksum(&{
        let mut h = whole[14..34].to_vec();
        h[10..12].fill(0);
        h
    });
    whole[24..26].copy_from_slice(&sum.to_be_bytes());
    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &whole, 36);
    assert!(
        matches!(drop_of(&mut w, &err), Verdict::Forward { .. }),
        "the control case matches"
    );
}

/// Nothing is sent towards a frontend: a new flow from a frontend's address
/// (a spoofed source: its replies and errors would go to the frontend) is
/// dropped, not forwarded or rejected, and an ICMP error addressed to a
/// frontend is dropped.
#[test]
fn nothing_is_sent_towards_a_frontend() {
    let mut w = worker();
    let fs = Verdict::Drop(DropReason::FrontendSource);
    for (src, dst, port) in [
        (VIP4, VIP4, 80),
        (EMPTY4, VIP4, 80),
        (VIP4, EMPTY4, 80),
        (VIP6, VIP6, 80),
    ] {
        let f = client_frame(src, 40000, dst, port, syn(), b"");
        assert_eq!(
            drop_of(&mut w, &f),
            fs,
            "{} → {}",
            ip_from16(src),
            ip_from16(dst)
        );
    }
    assert_eq!(w.counters.dropped(DropReason::FrontendSource), 4);
    assert_eq!(w.counters.new_flows, 0);
    let query = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"query");
    let to_b1 = fwd(&mut w, &query, "query");
    let err = icmp_error(B1, VIP4, (3, 3, [0; 4]), &to_b1, 64);
    assert_eq!(
        drop_of(&mut w, &err),
        Verdict::Drop(DropReason::ErrorToFrontend)
    );
    let err = icmp_error(B1, C4, (3, 3, [0; 4]), &to_b1, 64);
    assert!(
        matches!(drop_of(&mut w, &err), Verdict::Forward { .. }),
        "to the client"
    );

    // An external IP may be a real host's (a node's own address): a client
    // on it is served.
    let t = Table::build(
        2,
        0,
        &[
            svc(VIP4, 80, Proto::Tcp, &[(B1, 8080)]),
            svc(C4, 8443, Proto::Tcp, &[(B2, 8443)])
                .with_kind(FrontendKind::ExternalIp, ip_from16(C4)),
        ],
    )
    .unwrap();
    let f = client_frame(C4, 40000, VIP4, 80, syn(), b"");
    let mut buf = vec![0u8; BUF_LEN];
    buf[..f.len()].copy_from_slice(&f);
    let v = worker().process(NOW, &t, &mut buf, f.len());
    assert!(
        matches!(v, Verdict::Forward { .. }),
        "from an external IP: {v:?}"
    );
}
