//! The two parse paths give one answer.
//!
//! `parse_fast` (fixed-offset header views) answers for the common frames
//! and declines the rest; `parse_full` (etherparse, the extension-header
//! walk, fragments, ICMP errors) decides everything. Wherever the fast path
//! answers, its `Parsed` (or "not ours") must be the full path's, bit for
//! bit, and `parse` must always give the full path's answer, drop reasons
//! included:
//!
//! - every fixture, every truncation of it, and every byte of its first 80
//!   set to a few telling values (deterministic sweep);
//! - random frames (noise behind plausible Ethernet, IPv4 and IPv6 headers)
//!   and random stacks of mutations of the fixtures (proptest);
//! - the fast path does answer for the frames it is for (IPv4 TCP/UDP/SCTP
//!   with and without options, IPv6 without extension headers, one VLAN
//!   tag), so the comparison cannot pass by the fast path declining all;
//! - `Parsed` fits one cache line; frames past 65 535 bytes are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::OnceLock;

use clustergate_dataplane::flow::{v4_to_16, Addr16, FlowTuple, Proto};
use clustergate_dataplane::packet::parse::{
    parse, parse_fast, parse_full, Family, Parsed, L4, MAX_FRAME,
};
use clustergate_dataplane::pipeline::DropReason;
use clustergate_dataplane::testkit::{
    client_frame, ethernet, frame, icmp_error, ipv4_raw, ipv6_fragment, udp_datagram, L4Spec, Tcp,
    CLIENT_MAC, GATEWAY_MAC,
};
use etherparse::{
    ip_number, EtherType, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6Header,
    Ipv6RawExtHeader, PacketBuilder,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

const C4: Addr16 = v4_to_16([198, 18, 0, 1]);
const VIP4: Addr16 = v4_to_16([198, 19, 0, 10]);
/// 2001:2::1
const C6: Addr16 = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 2001:2::10
const VIP6: Addr16 = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

fn syn() -> L4Spec {
    L4Spec::Tcp(Tcp::syn(1000))
}

fn tagged(src: Addr16, dst: Addr16, l4: L4Spec) -> Vec<u8> {
    frame(
        CLIENT_MAC,
        GATEWAY_MAC,
        Some(42),
        src,
        40000,
        dst,
        80,
        l4,
        64,
        b"tagged",
    )
}

fn ipv4_with_options(opts: &[u8], l4: L4Spec) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, ip_number::TCP, [198, 18, 0, 1], [198, 19, 0, 10]).unwrap();
    h.options = Ipv4Options::try_from(opts).unwrap();
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()));
    match l4 {
        L4Spec::Udp => b.udp(40000, 53).write(&mut out, b"opts").unwrap(),
        _ => b
            .tcp(40000, 80, 1000, 64240)
            .syn()
            .write(&mut out, b"opts")
            .unwrap(),
    }
    out
}

fn ipv6_with(exts: Ipv6Extensions) -> Vec<u8> {
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
}

fn raw_ext(next: IpNumber, data: &[u8]) -> Ipv6RawExtHeader {
    Ipv6RawExtHeader::new_raw(next, data).unwrap()
}

/// The frames the fast path is for: it must answer each with a flow.
fn fast_fixtures() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ipv4 tcp", client_frame(C4, 40000, VIP4, 80, syn(), b"x")),
        (
            "ipv4 tcp ack",
            client_frame(C4, 40000, VIP4, 80, L4Spec::Tcp(Tcp::ack(5, 6)), &[7; 30]),
        ),
        (
            "ipv4 udp",
            client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"q"),
        ),
        (
            "ipv4 sctp",
            client_frame(C4, 40000, VIP4, 3868, L4Spec::Sctp, b"s"),
        ),
        ("ipv6 tcp", client_frame(C6, 40000, VIP6, 80, syn(), b"x")),
        (
            "ipv6 udp",
            client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"q"),
        ),
        (
            "ipv6 sctp",
            client_frame(C6, 40000, VIP6, 3868, L4Spec::Sctp, b"s"),
        ),
        ("vlan ipv4 tcp", tagged(C4, VIP4, syn())),
        ("vlan ipv6 udp", tagged(C6, VIP6, L4Spec::Udp)),
        (
            "ipv4 options (NOPs, end)",
            ipv4_with_options(&[1, 1, 1, 0], syn()),
        ),
        (
            "ipv4 options (record route)",
            ipv4_with_options(&[7, 7, 4, 0, 0, 0, 0, 0], L4Spec::Udp),
        ),
        ("ipv4 padded to 60 bytes", {
            let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"");
            f.resize(60, 0);
            f
        }),
    ]
}

/// Frames the fast path must leave to the full path (or answer "not ours").
fn other_fixtures() -> Vec<(&'static str, Vec<u8>)> {
    let dgram4 = udp_datagram(C4, VIP4, 40000, 53, 64);
    let dgram6 = udp_datagram(C6, VIP6, 40000, 53, 64);
    let quoted4 = client_frame(VIP4, 80, C4, 40000, L4Spec::Tcp(Tcp::ack(1, 2)), b"data");
    let quoted6 = client_frame(VIP6, 53, C6, 40000, L4Spec::Udp, b"data");
    let hbh = Ipv6Extensions {
        hop_by_hop_options: Some(raw_ext(ip_number::TCP, &[1, 4, 0, 0, 0, 0])),
        ..Default::default()
    };
    let dest = Ipv6Extensions {
        destination_options: Some(raw_ext(ip_number::TCP, &[1, 4, 0, 0, 0, 0])),
        ..Default::default()
    };
    let routing = |left: u8| Ipv6Extensions {
        routing: Some(etherparse::Ipv6RoutingExtensions {
            routing: raw_ext(ip_number::TCP, &[4, left, 0, 0, 0, 0]),
            final_destination_options: None,
        }),
        ..Default::default()
    };
    vec![
        ("arp", {
            let mut f = ethernet(EtherType::ARP);
            f.extend_from_slice(&[0; 28]);
            f
        }),
        ("qinq", {
            let mut f = tagged(C4, VIP4, syn());
            f[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
            f
        }),
        (
            "ipv4 first fragment",
            ipv4_raw(C4, VIP4, 17, 7, (0, true), &dgram4[..32]),
        ),
        (
            "ipv4 last fragment",
            ipv4_raw(C4, VIP4, 17, 7, (4, false), &dgram4[32..]),
        ),
        (
            "ipv6 first fragment",
            ipv6_fragment(C6, VIP6, 17, 7, (0, true), &dgram6[..32]),
        ),
        (
            "ipv6 last fragment",
            ipv6_fragment(C6, VIP6, 17, 7, (4, false), &dgram6[32..]),
        ),
        (
            "ipv6 atomic fragment",
            ipv6_fragment(C6, VIP6, 17, 7, (0, false), &dgram6),
        ),
        ("ipv6 hop-by-hop", ipv6_with(hbh)),
        ("ipv6 destination options", ipv6_with(dest)),
        ("ipv6 routing, done", ipv6_with(routing(0))),
        ("ipv6 routing, to follow", ipv6_with(routing(1))),
        (
            "ipv4 source route",
            ipv4_with_options(&[131, 7, 4, 0, 0, 0, 0, 1], syn()),
        ),
        (
            "icmp frag needed",
            icmp_error(
                v4_to_16([198, 18, 9, 9]),
                VIP4,
                (3, 4, [0, 0, 5, 0xdc]),
                &quoted4,
                28,
            ),
        ),
        (
            "icmp whole quote",
            icmp_error(C4, VIP4, (3, 3, [0; 4]), &quoted4, 1000),
        ),
        (
            "icmpv6 too big",
            icmp_error(C6, VIP6, (2, 0, 1280u32.to_be_bytes()), &quoted6, 48),
        ),
        (
            "icmp echo",
            icmp_error(C4, VIP4, (8, 0, [0; 4]), &quoted4, 28),
        ),
        ("ipv4 gre", ipv4_raw(C4, VIP4, 47, 1, (0, false), &[0; 24])),
        (
            "ipv4 ah",
            ipv4_raw(
                C4,
                VIP4,
                51,
                1,
                (0, false),
                &[
                    6, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            ),
        ),
        ("ipv6 no next header", {
            let mut f = client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"q");
            f[20] = 59;
            f
        }),
        ("ipv6 udp zero checksum", {
            let mut f = client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"q");
            f[60..62].copy_from_slice(&[0, 0]);
            f
        }),
    ]
}

fn all_fixtures() -> &'static [(&'static str, Vec<u8>)] {
    static ALL: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut v = fast_fixtures();
        v.extend(other_fixtures());
        v
    })
}

/// The one property: the fast path, where it answers, and `parse`, always,
/// agree with the full path.
fn agree(f: &[u8]) -> Result<(), String> {
    let full = parse_full(f);
    if let Some(fast) = parse_fast(f) {
        if Ok(fast) != full {
            return Err(format!(
                "fast path {fast:?}\nfull path {full:?}\nframe {f:02x?}"
            ));
        }
    }
    let p = parse(f);
    if p != full {
        return Err(format!("parse {p:?}\nfull path {full:?}\nframe {f:02x?}"));
    }
    Ok(())
}

#[test]
fn parsed_fits_one_cache_line() {
    assert!(std::mem::size_of::<Parsed>() <= 64);
    assert!(std::mem::size_of::<Result<Option<Parsed>, DropReason>>() <= 64);
}

#[test]
fn the_fast_path_answers_for_the_common_frames() {
    for (name, f) in fast_fixtures() {
        let fast = parse_fast(&f).unwrap_or_else(|| panic!("{name}: the fast path declined"));
        let p = fast.unwrap_or_else(|| panic!("{name}: the fast path said not ours"));
        assert!(matches!(p.l4, L4::Flow(_)), "{name}: {p:?}");
        assert_eq!(Ok(Some(p)), parse_full(&f), "{name}");
    }
}

#[test]
fn the_fast_path_reads_the_fields() {
    let f = tagged(C4, VIP4, syn());
    let p = parse_fast(&f).unwrap().unwrap();
    assert_eq!(
        (p.family, p.l3(), p.ip_end(), p.ttl),
        (Family::V4, 18, f.len(), 64)
    );
    assert_eq!(p.fragment(), None);
    assert_eq!(
        p.tuple(),
        Some(FlowTuple {
            src_addr: C4,
            dst_addr: VIP4,
            src_port: 40000,
            dst_port: 80,
            proto: Proto::Tcp,
        })
    );
    let L4::Flow(l4) = p.l4 else { panic!() };
    assert_eq!((l4.offset(), l4.tcp_flags), (38, 0x02));

    // Ethernet padding lies beyond the IP packet.
    let mut f = client_frame(C6, 40000, VIP6, 53, L4Spec::Udp, b"");
    let ip_end = f.len();
    f.resize(ip_end + 10, 0);
    let p = parse_fast(&f).unwrap().unwrap();
    assert_eq!((p.family, p.l3(), p.ip_end()), (Family::V6, 14, ip_end));
    assert_eq!((p.src, p.dst), (C6, VIP6));
}

#[test]
fn the_fast_path_leaves_the_rest_to_the_full_path() {
    for (name, f) in other_fixtures() {
        match parse_fast(&f) {
            None => {}
            Some(None) => assert_eq!(parse_full(&f), Ok(None), "{name}"),
            Some(Some(p)) => panic!("{name}: the fast path took {p:?}"),
        }
        agree(&f).unwrap();
    }
}

#[test]
fn the_quoted_flow_is_read_from_the_frame() {
    let q = client_frame(VIP4, 80, C4, 40000, L4Spec::Tcp(Tcp::ack(1, 2)), b"data");
    let f = icmp_error(
        v4_to_16([198, 18, 9, 9]),
        VIP4,
        (3, 4, [0, 0, 5, 0xdc]),
        &q,
        28,
    );
    let p = parse(&f).unwrap().unwrap();
    let L4::IcmpError(e) = p.l4 else {
        panic!("{p:?}")
    };
    assert_eq!(e.offset(), 34);
    assert_eq!((e.quoted.l3(), e.quoted.l4(), e.quoted.end()), (42, 62, 70));
    assert!(!e.quoted.whole);
    assert_eq!(
        e.quoted.tuple(&f),
        FlowTuple {
            src_addr: VIP4,
            dst_addr: C4,
            src_port: 80,
            dst_port: 40000,
            proto: Proto::Tcp,
        }
    );
    let q = client_frame(VIP6, 53, C6, 40000, L4Spec::Udp, b"data");
    let f = icmp_error(C6, VIP6, (2, 0, 1280u32.to_be_bytes()), &q, 1000);
    let p = parse(&f).unwrap().unwrap();
    let L4::IcmpError(e) = p.l4 else {
        panic!("{p:?}")
    };
    assert!(e.quoted.whole);
    assert_eq!(e.quoted.family, Family::V6);
    assert_eq!(
        e.quoted.tuple(&f),
        FlowTuple {
            src_addr: VIP6,
            dst_addr: C6,
            src_port: 53,
            dst_port: 40000,
            proto: Proto::Udp,
        }
    );
}

#[test]
fn fragments_keep_their_fields() {
    let d = udp_datagram(C6, VIP6, 40000, 53, 64);
    let f = ipv6_fragment(C6, VIP6, 17, 0xdead_beef, (3, true), &d[24..48]);
    let frag = parse(&f).unwrap().unwrap().fragment().unwrap();
    assert_eq!(
        (
            frag.id,
            frag.first,
            frag.offset,
            frag.len,
            frag.more,
            frag.next
        ),
        (0xdead_beef, false, 24, 24, true, 17)
    );
}

#[test]
fn frames_past_65535_bytes_are_refused() {
    let mut f = client_frame(C4, 40000, VIP4, 53, L4Spec::Udp, b"q");
    let n = f.len();
    f.resize(MAX_FRAME, 0);
    assert!(matches!(parse(&f), Ok(Some(p)) if p.ip_end() == n));
    f.push(0);
    assert_eq!(parse(&f), Err(DropReason::BadFrameLength));
    assert_eq!(parse_fast(&f), None);
}

/// Every fixture, every truncation, every byte of the headers set to a few
/// telling values.
#[test]
fn the_paths_agree_on_every_truncation_and_header_byte() {
    let mut checked = 0usize;
    for (name, f) in all_fixtures() {
        let f = f.as_slice();
        for n in 0..=f.len() {
            agree(&f[..n])
                .map_err(|e| format!("{name} cut at {n}: {e}"))
                .unwrap();
            checked += 1;
        }
        for at in 0..f.len().min(80) {
            let orig = f[at];
            for v in [
                0,
                1,
                4,
                5,
                6,
                0x08,
                0x40,
                0x45,
                0x46,
                0x4f,
                0x60,
                0x81,
                0xff,
                orig ^ 1,
                orig ^ 0x80,
                orig.wrapping_add(1),
                orig.wrapping_sub(1),
            ] {
                let mut g = f.to_vec();
                g[at] = v;
                agree(&g)
                    .map_err(|e| format!("{name}, byte {at} = {v:#x}: {e}"))
                    .unwrap();
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
}

// ---------------------------------------------------------------------------
// Random frames and mutations
// ---------------------------------------------------------------------------

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

/// Noise behind an Ethernet header with an IP (or VLAN) ether type.
fn ethernet_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0x0800u16, 0x86dd, 0x8100, 0x0806]),
        vec(any::<u8>(), 0..120),
    )
        .prop_map(|(et, rest)| {
            let mut f = ethernet(EtherType(et));
            f.extend_from_slice(&rest);
            f
        })
}

/// A plausible IPv4 header (IHL 5..=8, NOP options, total length right or
/// noise, fragment fields noise) behind an optional tag, a transport-ish
/// payload after it.
fn ipv4_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![6u8, 17, 132, 1, 58, 51, 47]),
        5u8..=8,
        prop::sample::select(vec![[0u8, 0], [0x40, 0], [0x20, 0], [0, 1], [0xff, 0xff]]),
        vec(any::<u8>(), 0..80),
        any::<bool>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(proto, ihl, frag, rest, bad_len, len_noise, vlan)| {
            let mut ip = vec![0x40 | ihl, 0, 0, 0, 0, 1];
            ip.extend_from_slice(&frag);
            ip.extend_from_slice(&[64, proto, 0, 0]);
            ip.extend_from_slice(&C4[12..]);
            ip.extend_from_slice(&VIP4[12..]);
            ip.resize(usize::from(ihl) * 4, 1);
            ip.extend_from_slice(&rest);
            let total = if bad_len { len_noise } else { ip.len() as u16 };
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            let c = raw_checksum(&ip[..usize::from(ihl) * 4]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            with_ethernet(EtherType::IPV4, vlan, &ip)
        })
}

/// A plausible IPv6 header (next header from transports, ICMP and extension
/// headers; payload length right or noise) behind an optional tag.
fn ipv6_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![6u8, 17, 132, 58, 1, 0, 43, 44, 60, 51, 59]),
        vec(any::<u8>(), 0..80),
        any::<bool>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(nh, rest, bad_len, len_noise, vlan)| {
            let h = Ipv6Header {
                payload_length: if bad_len {
                    len_noise
                } else {
                    rest.len() as u16
                },
                next_header: IpNumber(nh),
                hop_limit: 64,
                source: C6,
                destination: VIP6,
                ..Default::default()
            };
            let mut ip = Vec::new();
            h.write(&mut ip).unwrap();
            ip.extend_from_slice(&rest);
            with_ethernet(EtherType::IPV6, vlan, &ip)
        })
}

fn with_ethernet(et: EtherType, vlan: bool, ip: &[u8]) -> Vec<u8> {
    let mut f = if vlan {
        let mut f = ethernet(EtherType::VLAN_TAGGED_FRAME);
        f.extend_from_slice(&[0, 42]);
        f.extend_from_slice(&et.0.to_be_bytes());
        f
    } else {
        ethernet(et)
    };
    f.extend_from_slice(ip);
    f
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte of the first 80 with a non-zero mask.
    FlipHeader(Index, u8),
    /// XOR any byte.
    Flip(Index, u8),
    /// Set a byte of the first 80.
    Set(Index, u8),
    /// Cut the frame.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Insert a byte (shifts every header after it).
    Insert(Index, u8),
    /// Remove a byte.
    Remove(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::FlipHeader(i, m)),
        1 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        3 => (any::<Index>(), prop_oneof![Just(0u8), Just(1), Just(0xff), Just(0x45), Just(0x60), any::<u8>()])
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..32).prop_map(Mutation::Extend),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<Index>().prop_map(Mutation::Remove),
    ]
}

fn apply(f: &mut Vec<u8>, m: &Mutation) {
    let head = f.len().min(80);
    match m {
        Mutation::FlipHeader(i, x) if head > 0 => f[i.index(head)] ^= x,
        Mutation::Flip(i, x) if !f.is_empty() => {
            let at = i.index(f.len());
            f[at] ^= x;
        }
        Mutation::Set(i, b) if head > 0 => f[i.index(head)] = *b,
        Mutation::Truncate(i) => {
            let at = i.index(f.len() + 1);
            f.truncate(at);
        }
        Mutation::Extend(tail) => f.extend_from_slice(tail),
        Mutation::Insert(i, b) => {
            let at = i.index(f.len() + 1);
            f.insert(at, *b);
        }
        Mutation::Remove(i) if !f.is_empty() => {
            let at = i.index(f.len());
            f.remove(at);
        }
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

proptest! {
    #![proptest_config(config(5000))]

    /// Noise, and noise behind plausible headers.
    #[test]
    fn the_paths_agree_on_random_frames(f in prop_oneof![
        vec(any::<u8>(), 0..120),
        ethernet_noise(),
        ipv4_noise(),
        ipv6_noise(),
    ]) {
        agree(&f).map_err(TestCaseError::fail)?;
    }

    /// Stacks of mutations of every fixture.
    #[test]
    fn the_paths_agree_on_mutated_fixtures(
        which in any::<Index>(),
        muts in vec(mutation(), 1..6),
    ) {
        let fixtures = all_fixtures();
        let mut f = fixtures[which.index(fixtures.len())].1.clone();
        for m in &muts {
            apply(&mut f, m);
            agree(&f).map_err(TestCaseError::fail)?;
        }
    }
}
