//! Property tests for `packet::rewrite` and `packet::checksum`.
//!
//! Every incremental update is checked against a full recomputation: frames
//! are built with etherparse, rewritten with random sequences of address,
//! port and TTL changes, re-parsed, and their checksums recomputed by
//! etherparse. Every rewrite must also change exactly the bytes it means to
//! (checksum fields aside), and return an error, never panic, for offsets
//! outside the frame.

use clustergate_dataplane::packet::checksum::{
    finish, fold, pseudo_header_v4, pseudo_header_v6, sctp_crc32c, sum_bytes, update_words,
    update_words_odd,
};
use clustergate_dataplane::packet::rewrite::{
    adjust_checksum_at, adjust_checksum_at_odd, decrement_hop_limit_ipv6, decrement_ttl_ipv4,
    sctp_update_crc, set_dst_port, set_ipv4_dst, set_ipv4_src, set_ipv6_dst, set_ipv6_src,
    set_macs, set_src_port, swap_macs, L4Csum, RewriteError,
};
use etherparse::{
    ip_number, IpHeaders, Ipv4Header, Ipv4Options, Ipv6Header, NetSlice, PacketBuilder,
    SlicedPacket, TcpHeader, TransportSlice,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Offset of the IP header: every frame here starts with a plain Ethernet II header.
const L3: usize = 14;
/// Ethernet source and destination used by the builders.
const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Ethernet destination used by the builders.
const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The IP layer of a generated packet.
#[derive(Debug, Clone)]
enum IpSpec {
    /// IPv4 with a header of 20 + `options.len()` bytes.
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        ttl: u8,
        identification: u16,
        options: Vec<u8>,
    },
    /// IPv6 without extension headers.
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        hop_limit: u8,
    },
}

/// The transport layer of a generated packet.
#[derive(Debug, Clone)]
enum L4Spec {
    /// TCP with random flags and raw options.
    Tcp {
        src: u16,
        dst: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        options: Vec<u8>,
    },
    /// UDP with a computed checksum.
    Udp { src: u16, dst: u16 },
    /// UDP over IPv4 with checksum 0 ("none", RFC 768).
    UdpNoChecksum { src: u16, dst: u16 },
}

/// A generated packet.
#[derive(Debug, Clone)]
struct Spec {
    ip: IpSpec,
    l4: L4Spec,
    payload: Vec<u8>,
}

/// One rewrite to apply.
#[derive(Debug, Clone)]
enum Op {
    SrcAddr([u8; 16]),
    DstAddr([u8; 16]),
    SrcPort(u16),
    DstPort(u16),
    DecrementTtl,
}

/// A built frame and where its fields are.
#[derive(Debug, Clone)]
struct Built {
    frame: Vec<u8>,
    l4: usize,
    kind: L4Csum,
    is_v4: bool,
    no_checksum: bool,
}

impl Built {
    /// Offset of the transport checksum field in the frame.
    fn l4_csum_at(&self) -> usize {
        self.l4 + self.kind.field_offset().expect("TCP or UDP")
    }
}

/// A TTL that a few decrements can drive to zero, or any other non-zero one.
fn ttl() -> impl Strategy<Value = u8> {
    prop_oneof![1u8..=3, 1u8..=255]
}

/// IPv4 options: 0 to 40 bytes, a multiple of 4 (RFC 791 §3.1).
fn ipv4_options() -> impl Strategy<Value = Vec<u8>> {
    (0usize..=10).prop_flat_map(|words| vec(any::<u8>(), words * 4))
}

fn ip_spec() -> impl Strategy<Value = IpSpec> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            ttl(),
            any::<u16>(),
            ipv4_options()
        )
            .prop_map(|(src, dst, ttl, identification, options)| IpSpec::V4 {
                src,
                dst,
                ttl,
                identification,
                options,
            }),
        (any::<[u8; 16]>(), any::<[u8; 16]>(), ttl()).prop_map(|(src, dst, hop_limit)| {
            IpSpec::V6 {
                src,
                dst,
                hop_limit,
            }
        }),
    ]
}

fn l4_spec() -> impl Strategy<Value = L4Spec> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u16>(),
            ipv4_options(),
        )
            .prop_map(|(src, dst, seq, ack, flags, window, options)| L4Spec::Tcp {
                src,
                dst,
                seq,
                ack,
                flags,
                window,
                options,
            }),
        (any::<u16>(), any::<u16>()).prop_map(|(src, dst)| L4Spec::Udp { src, dst }),
        (any::<u16>(), any::<u16>()).prop_map(|(src, dst)| L4Spec::UdpNoChecksum { src, dst }),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (ip_spec(), l4_spec(), vec(any::<u8>(), 0..200)).prop_map(|(ip, l4, payload)| {
        // UDP without a checksum only exists over IPv4 (RFC 8200 §8.1).
        let l4 = match (&ip, l4) {
            (IpSpec::V6 { .. }, L4Spec::UdpNoChecksum { src, dst }) => L4Spec::Udp { src, dst },
            (_, l4) => l4,
        };
        Spec { ip, l4, payload }
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(Op::SrcAddr),
        any::<[u8; 16]>().prop_map(Op::DstAddr),
        any::<u16>().prop_map(Op::SrcPort),
        any::<u16>().prop_map(Op::DstPort),
        Just(Op::DecrementTtl),
    ]
}

/// The first four bytes of a generated address, for IPv4.
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// Builds the IP headers of `spec` for etherparse's `PacketBuilder`.
fn ip_headers(ip: &IpSpec) -> IpHeaders {
    match ip {
        IpSpec::V4 {
            src,
            dst,
            ttl,
            identification,
            options,
        } => {
            let mut header =
                Ipv4Header::new(0, *ttl, ip_number::TCP, *src, *dst).expect("empty payload fits");
            header.identification = *identification;
            header.options =
                Ipv4Options::try_from(options.as_slice()).expect("a multiple of 4, at most 40");
            IpHeaders::Ipv4(header, Default::default())
        }
        IpSpec::V6 {
            src,
            dst,
            hop_limit,
        } => IpHeaders::Ipv6(
            Ipv6Header {
                hop_limit: *hop_limit,
                source: *src,
                destination: *dst,
                ..Default::default()
            },
            Default::default(),
        ),
    }
}

/// Serializes `spec` into an Ethernet frame and notes where its fields are.
fn build(spec: &Spec) -> Built {
    let is_v4 = matches!(spec.ip, IpSpec::V4 { .. });
    let l4 = match &spec.ip {
        IpSpec::V4 { options, .. } => L3 + 20 + options.len(),
        IpSpec::V6 { .. } => L3 + 40,
    };
    let step = PacketBuilder::ethernet2(MAC_SRC, MAC_DST).ip(ip_headers(&spec.ip));
    let mut frame = Vec::new();
    let (kind, no_checksum) = match &spec.l4 {
        L4Spec::Tcp {
            src,
            dst,
            seq,
            ack,
            flags,
            window,
            options,
        } => {
            let mut tcp = TcpHeader::new(*src, *dst, *seq, *window);
            tcp.acknowledgment_number = *ack;
            tcp.fin = flags & 0x01 != 0;
            tcp.syn = flags & 0x02 != 0;
            tcp.rst = flags & 0x04 != 0;
            tcp.psh = flags & 0x08 != 0;
            tcp.ack = flags & 0x10 != 0;
            tcp.urg = flags & 0x20 != 0;
            tcp.ece = flags & 0x40 != 0;
            tcp.cwr = flags & 0x80 != 0;
            tcp.set_options_raw(options)
                .expect("a multiple of 4, at most 40");
            step.tcp_header(tcp)
                .write(&mut frame, &spec.payload)
                .expect("write to a Vec");
            (L4Csum::Tcp, false)
        }
        L4Spec::Udp { src, dst } | L4Spec::UdpNoChecksum { src, dst } => {
            step.udp(*src, *dst)
                .write(&mut frame, &spec.payload)
                .expect("write to a Vec");
            let kind = if is_v4 { L4Csum::Udp } else { L4Csum::Udp6 };
            (kind, matches!(spec.l4, L4Spec::UdpNoChecksum { .. }))
        }
    };
    let mut built = Built {
        frame,
        l4,
        kind,
        is_v4,
        no_checksum,
    };
    if no_checksum {
        let at = built.l4_csum_at();
        built.frame[at..at + 2].copy_from_slice(&[0, 0]);
    }
    built
}

/// Copies `frame` with the checksum fields zeroed, to compare everything else.
fn masked(frame: &[u8], b: &Built) -> Vec<u8> {
    let mut out = frame.to_vec();
    if b.is_v4 {
        out[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
    }
    let at = b.l4_csum_at();
    out[at..at + 2].copy_from_slice(&[0, 0]);
    out
}

/// Re-parses `frame` and checks every checksum against etherparse's full recomputation.
fn check_checksums(frame: &[u8], b: &Built) -> Result<(), TestCaseError> {
    let packet = SlicedPacket::from_ethernet(frame).expect("a rewritten frame still parses");
    let (src, dst): (Vec<u8>, Vec<u8>) = match packet.net.as_ref().expect("IP") {
        NetSlice::Ipv4(ip) => {
            let header = ip.header().to_header();
            prop_assert_eq!(header.header_checksum, header.calc_header_checksum());
            (header.source.to_vec(), header.destination.to_vec())
        }
        NetSlice::Ipv6(ip) => (
            ip.header().source().to_vec(),
            ip.header().destination().to_vec(),
        ),
        NetSlice::Arp(_) => return Err(TestCaseError::fail("ARP")),
    };
    match packet.transport.as_ref().expect("TCP or UDP") {
        TransportSlice::Tcp(tcp) => {
            let expected = match (<[u8; 4]>::try_from(&src[..]), <[u8; 4]>::try_from(&dst[..])) {
                (Ok(s), Ok(d)) => tcp.calc_checksum_ipv4(s, d),
                _ => tcp.calc_checksum_ipv6(
                    src.as_slice().try_into().expect("16 bytes"),
                    dst.as_slice().try_into().expect("16 bytes"),
                ),
            }
            .expect("small segment");
            prop_assert_eq!(tcp.checksum(), expected);
        }
        TransportSlice::Udp(udp) => {
            if b.no_checksum {
                prop_assert_eq!(udp.checksum(), 0);
            } else {
                let header = udp.to_header();
                let expected = match (<[u8; 4]>::try_from(&src[..]), <[u8; 4]>::try_from(&dst[..]))
                {
                    (Ok(s), Ok(d)) => header.calc_checksum_ipv4_raw(s, d, udp.payload()),
                    _ => header.calc_checksum_ipv6_raw(
                        src.as_slice().try_into().expect("16 bytes"),
                        dst.as_slice().try_into().expect("16 bytes"),
                        udp.payload(),
                    ),
                }
                .expect("small datagram");
                prop_assert_eq!(udp.checksum(), expected);
            }
        }
        other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
    }
    Ok(())
}

/// Applies `op` to the frame with the rewrite functions, and to `expected` by editing the field bytes directly.
fn apply(b: &mut Built, expected: &mut [u8], op: &Op) -> Result<(), TestCaseError> {
    let l4 = Some((b.l4, b.kind));
    match op {
        Op::SrcAddr(addr) if b.is_v4 => {
            set_ipv4_src(&mut b.frame, L3, l4, v4(addr)).expect("in bounds");
            expected[L3 + 12..L3 + 16].copy_from_slice(&v4(addr));
        }
        Op::DstAddr(addr) if b.is_v4 => {
            set_ipv4_dst(&mut b.frame, L3, l4, v4(addr)).expect("in bounds");
            expected[L3 + 16..L3 + 20].copy_from_slice(&v4(addr));
        }
        Op::SrcAddr(addr) => {
            set_ipv6_src(&mut b.frame, L3, l4, *addr).expect("in bounds");
            expected[L3 + 8..L3 + 24].copy_from_slice(addr);
        }
        Op::DstAddr(addr) => {
            set_ipv6_dst(&mut b.frame, L3, l4, *addr).expect("in bounds");
            expected[L3 + 24..L3 + 40].copy_from_slice(addr);
        }
        Op::SrcPort(port) => {
            set_src_port(&mut b.frame, b.l4, b.kind, *port).expect("in bounds");
            expected[b.l4..b.l4 + 2].copy_from_slice(&port.to_be_bytes());
        }
        Op::DstPort(port) => {
            set_dst_port(&mut b.frame, b.l4, b.kind, *port).expect("in bounds");
            expected[b.l4 + 2..b.l4 + 4].copy_from_slice(&port.to_be_bytes());
        }
        Op::DecrementTtl => {
            let at = if b.is_v4 { L3 + 8 } else { L3 + 7 };
            let before = b.frame.clone();
            let result = if b.is_v4 {
                decrement_ttl_ipv4(&mut b.frame, L3)
            } else {
                decrement_hop_limit_ipv6(&mut b.frame, L3)
            };
            match expected[at].checked_sub(1) {
                Some(new) => {
                    prop_assert_eq!(result, Ok(new));
                    expected[at] = new;
                }
                None => {
                    prop_assert_eq!(result, Err(RewriteError::TtlExpired));
                    prop_assert_eq!(&b.frame, &before, "an error must not write");
                }
            }
        }
    }
    Ok(())
}

/// Whether `len` bytes at `base + delta` lie inside a frame of `frame_len` bytes.
fn fits(frame_len: usize, base: usize, delta: usize, len: usize) -> bool {
    base.checked_add(delta)
        .and_then(|at| at.checked_add(len))
        .is_some_and(|end| end <= frame_len)
}

/// Whether the transport checksum field named by `l4` (if any) lies inside the frame.
fn l4_fits(frame_len: usize, l4: Option<(usize, L4Csum)>) -> bool {
    match l4.and_then(|(at, kind)| kind.field_offset().map(|o| (at, o))) {
        Some((at, o)) => fits(frame_len, at, o, 2),
        None => true,
    }
}

/// Offsets near the frame, and some that overflow when added to.
fn wild_offset() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..100, 1 => (0usize..64).prop_map(|d| usize::MAX - d)]
}

fn l4_csum() -> impl Strategy<Value = L4Csum> {
    prop_oneof![
        Just(L4Csum::Tcp),
        Just(L4Csum::Udp),
        Just(L4Csum::Udp6),
        Just(L4Csum::Icmpv6),
        Just(L4Csum::None),
    ]
}

/// An SCTP INIT packet (common header + chunk), from pion/sctp `packet_test.go`; its CRC32c bytes are 81 46 9d fc.
const SCTP_INIT: [u8; 100] = [
    0x13, 0x88, 0x13, 0x88, 0x00, 0x00, 0x00, 0x00, 0x81, 0x46, 0x9d, 0xfc, 0x01, 0x00, 0x00, 0x56,
    0x55, 0xb9, 0x64, 0xa5, 0x00, 0x02, 0x00, 0x00, 0x04, 0x00, 0x08, 0x00, 0xe8, 0x6d, 0x10, 0x30,
    0xc0, 0x00, 0x00, 0x04, 0x80, 0x08, 0x00, 0x09, 0xc0, 0x0f, 0xc1, 0x80, 0x82, 0x00, 0x00, 0x00,
    0x80, 0x02, 0x00, 0x24, 0x9f, 0xeb, 0xbb, 0x5c, 0x50, 0xc9, 0xbf, 0x75, 0x9c, 0xb1, 0x2c, 0x57,
    0x4f, 0xa4, 0x5a, 0x51, 0xba, 0x60, 0x17, 0x78, 0x27, 0x94, 0x5c, 0x31, 0xe6, 0x5d, 0x5b, 0x09,
    0x47, 0xe2, 0x22, 0x06, 0x80, 0x04, 0x00, 0x06, 0x00, 0x01, 0x00, 0x00, 0x80, 0x03, 0x00, 0x06,
    0x80, 0xc1, 0x00, 0x00,
];

/// Ethernet + IPv4 (protocol 132) + [`SCTP_INIT`] + `padding` bytes of Ethernet padding; returns the frame and where SCTP ends.
fn sctp_frame(src: [u8; 4], dst: [u8; 4], padding: usize) -> (Vec<u8>, usize) {
    let mut ip = Ipv4Header::new(SCTP_INIT.len() as u16, 64, ip_number::SCTP, src, dst)
        .expect("small payload");
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAC_DST);
    frame.extend_from_slice(&MAC_SRC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&SCTP_INIT);
    let end = frame.len();
    frame.resize(end + padding, 0);
    (frame, end)
}

/// Random rewrites of TCP/UDP over IPv4/IPv6 keep every checksum equal to a full recomputation.
fn rewrites_match_full(spec: &Spec, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut b = build(spec);
    check_checksums(&b.frame, &b)?;
    let mut expected = b.frame.clone();
    for op in ops {
        apply(&mut b, &mut expected, op)?;
        check_checksums(&b.frame, &b)?;
        prop_assert_eq!(
            masked(&b.frame, &b),
            masked(&expected, &b),
            "after {:?}",
            op
        );
    }
    Ok(())
}

/// An ICMPv6 echo request and the addresses to rewrite it to.
#[derive(Debug, Clone)]
struct Icmpv6Case {
    src: [u8; 16],
    dst: [u8; 16],
    id: u16,
    seq: u16,
    payload: Vec<u8>,
    new_src: [u8; 16],
    new_dst: [u8; 16],
}

prop_compose! {
    fn icmpv6_case()(
        src in any::<[u8; 16]>(),
        dst in any::<[u8; 16]>(),
        id in any::<u16>(),
        seq in any::<u16>(),
        payload in vec(any::<u8>(), 0..200),
        new_src in any::<[u8; 16]>(),
        new_dst in any::<[u8; 16]>(),
    ) -> Icmpv6Case {
        Icmpv6Case { src, dst, id, seq, payload, new_src, new_dst }
    }
}

/// ICMPv6 echo: address rewrites keep the checksum equal to etherparse's recomputation (RFC 4443 §2.3).
fn icmpv6_rewrites_match_full(c: &Icmpv6Case) -> Result<(), TestCaseError> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_SRC, MAC_DST)
        .ipv6(c.src, c.dst, 64)
        .icmpv6_echo_request(c.id, c.seq)
        .write(&mut frame, &c.payload)
        .expect("write to a Vec");
    let original = frame.clone();
    let l4 = Some((L3 + 40, L4Csum::Icmpv6));
    set_ipv6_src(&mut frame, L3, l4, c.new_src).expect("in bounds");
    set_ipv6_dst(&mut frame, L3, l4, c.new_dst).expect("in bounds");

    let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
    let Some(TransportSlice::Icmpv6(icmp)) = packet.transport else {
        return Err(TestCaseError::fail("not ICMPv6"));
    };
    let expected = icmp
        .header()
        .icmp_type
        .calc_checksum(c.new_src, c.new_dst, icmp.payload())
        .expect("small message");
    prop_assert_eq!(icmp.checksum(), expected);
    prop_assert!(icmp.is_checksum_valid(c.new_src, c.new_dst));

    let mut expected_frame = original;
    expected_frame[L3 + 8..L3 + 24].copy_from_slice(&c.new_src);
    expected_frame[L3 + 24..L3 + 40].copy_from_slice(&c.new_dst);
    let csum = L3 + 40 + 2;
    expected_frame[csum..csum + 2].copy_from_slice(&frame[csum..csum + 2]);
    prop_assert_eq!(&frame, &expected_frame);
    Ok(())
}

/// SCTP: port rewrites plus `sctp_update_crc` give the CRC32c of the new packet; IPv4 address rewrites leave SCTP alone.
fn sctp_rewrites_match_full(
    ports: (u16, u16),
    new_dst: [u8; 4],
    padding: usize,
) -> Result<(), TestCaseError> {
    let (new_src_port, new_dst_port) = ports;
    let (mut frame, end) = sctp_frame([10, 0, 0, 1], [10, 0, 0, 2], padding);
    let original = frame.clone();
    let l4 = L3 + 20;

    set_ipv4_dst(&mut frame, L3, Some((l4, L4Csum::None)), new_dst).expect("in bounds");
    set_src_port(&mut frame, l4, L4Csum::None, new_src_port).expect("in bounds");
    set_dst_port(&mut frame, l4, L4Csum::None, new_dst_port).expect("in bounds");
    sctp_update_crc(&mut frame, l4, end).expect("in bounds");

    prop_assert_eq!(
        &frame[l4 + 8..l4 + 12],
        &sctp_crc32c(&frame[l4..end]).to_le_bytes()[..]
    );
    let ip = Ipv4Header::from_slice(&frame[L3..]).expect("parses").0;
    prop_assert_eq!(ip.header_checksum, ip.calc_header_checksum());

    let mut expected = original.clone();
    expected[L3 + 16..L3 + 20].copy_from_slice(&new_dst);
    expected[L3 + 10..L3 + 12].copy_from_slice(&frame[L3 + 10..L3 + 12]);
    expected[l4..l4 + 2].copy_from_slice(&new_src_port.to_be_bytes());
    expected[l4 + 2..l4 + 4].copy_from_slice(&new_dst_port.to_be_bytes());
    expected[l4 + 8..l4 + 12].copy_from_slice(&frame[l4 + 8..l4 + 12]);
    prop_assert_eq!(&frame, &expected);

    // Back to the captured ports and address: the captured CRC32c comes back (known answer).
    set_src_port(&mut frame, l4, L4Csum::None, 5000).expect("in bounds");
    set_dst_port(&mut frame, l4, L4Csum::None, 5000).expect("in bounds");
    set_ipv4_dst(&mut frame, L3, None, [10, 0, 0, 2]).expect("in bounds");
    sctp_update_crc(&mut frame, l4, end).expect("in bounds");
    prop_assert_eq!(&frame[l4 + 8..l4 + 12], &[0x81, 0x46, 0x9d, 0xfc][..]);
    prop_assert_eq!(&frame, &original);
    Ok(())
}

/// `update_words`/`update_words_odd` and `adjust_checksum_at*` agree with a full RFC 1071 sum, at even and odd offsets.
fn checksum_update_matches_full(
    mut data: Vec<u8>,
    start: prop::sample::Index,
    new: &[u8],
) -> Result<(), TestCaseError> {
    // The checksum lives at bytes 0..2 of the data it covers, as in ICMP's header.
    data[0..2].copy_from_slice(&[0, 0]);
    let c = finish(sum_bytes(0, &data));
    data[0..2].copy_from_slice(&c.to_be_bytes());

    let start = 2 + start.index(data.len() - 2);
    let new = &new[..new.len().min(data.len() - start)];
    let old = data[start..start + new.len()].to_vec();
    let odd = start % 2 == 1;
    let inc = if odd {
        update_words_odd(c, &old, new)
    } else {
        update_words(c, &old, new)
    };

    let mut region = data;
    region[start..start + new.len()].copy_from_slice(new);
    if odd {
        adjust_checksum_at_odd(&mut region, 0, &old, new).expect("in bounds");
    } else {
        adjust_checksum_at(&mut region, 0, &old, new).expect("in bounds");
    }
    prop_assert_eq!(u16::from_be_bytes([region[0], region[1]]), inc);

    region[0..2].copy_from_slice(&[0, 0]);
    let full = finish(sum_bytes(0, &region));
    if region.iter().any(|&b| b != 0) {
        // RFC 1624 eqn. 3 gives exactly what a full computation gives.
        prop_assert_eq!(inc, full);
    } else {
        // All-zero data: 0x0000 and 0xFFFF are both one's-complement zero.
        prop_assert!(inc == 0 || inc == 0xFFFF);
    }
    Ok(())
}

/// A short random frame and offsets that may lie anywhere, or overflow.
#[derive(Debug, Clone)]
struct BadCase {
    frame: Vec<u8>,
    /// Used as `l3`, the SCTP end, and the checksum offset.
    a: usize,
    /// Used as `l4`.
    b: usize,
    kind: L4Csum,
    with_l4: bool,
    addr: [u8; 16],
    port: u16,
    old: Vec<u8>,
    new: Vec<u8>,
}

prop_compose! {
    fn bad_case()(
        frame in vec(any::<u8>(), 0..80),
        a in wild_offset(),
        b in wild_offset(),
        kind in l4_csum(),
        with_l4 in any::<bool>(),
        addr in any::<[u8; 16]>(),
        port in any::<u16>(),
        old in vec(any::<u8>(), 0..6),
        new in vec(any::<u8>(), 0..6),
    ) -> BadCase {
        BadCase { frame, a, b, kind, with_l4, addr, port, old, new }
    }
}

/// A rewrite of an address, as the bad-offset test calls it.
type SetAddr = fn(&mut [u8], usize, Option<(usize, L4Csum)>, [u8; 16]) -> Result<(), RewriteError>;
/// A rewrite of a port, as the bad-offset test calls it.
type SetPort = fn(&mut [u8], usize, L4Csum, u16) -> Result<(), RewriteError>;

/// Checks that `result` is `want`, and that an error left `buf` equal to `frame`.
fn expect_result<T: PartialEq + std::fmt::Debug>(
    name: &str,
    result: Result<T, RewriteError>,
    want: Result<T, RewriteError>,
    buf: &[u8],
    frame: &[u8],
) -> Result<(), TestCaseError> {
    let failed = result.is_err();
    prop_assert_eq!(result, want, "{}", name);
    if failed {
        prop_assert_eq!(buf, frame, "{} wrote on error", name);
    }
    Ok(())
}

/// `Ok(())` if `ok`, else `OutOfBounds`.
fn in_bounds(ok: bool) -> Result<(), RewriteError> {
    if ok {
        Ok(())
    } else {
        Err(RewriteError::OutOfBounds)
    }
}

/// Every rewrite returns an error, never panics, for short frames and wild offsets; an error writes nothing.
fn bad_offsets_are_errors(c: &BadCase) -> Result<(), TestCaseError> {
    let frame = &c.frame[..];
    let n = frame.len();
    let (a, b) = (c.a, c.b);
    let l4 = c.with_l4.then_some((b, c.kind));

    let addr_cases: [(&str, usize, usize, bool, SetAddr); 4] = [
        ("set_ipv4_src", 12, 4, true, |f, l3, l4, x| {
            set_ipv4_src(f, l3, l4, [x[0], x[1], x[2], x[3]])
        }),
        ("set_ipv4_dst", 16, 4, true, |f, l3, l4, x| {
            set_ipv4_dst(f, l3, l4, [x[0], x[1], x[2], x[3]])
        }),
        ("set_ipv6_src", 8, 16, false, set_ipv6_src),
        ("set_ipv6_dst", 24, 16, false, set_ipv6_dst),
    ];
    for (name, field, len, v4, set) in addr_cases {
        let mut buf = frame.to_vec();
        let ok = fits(n, a, field, len) && (!v4 || fits(n, a, 10, 2)) && l4_fits(n, l4);
        let result = set(&mut buf, a, l4, c.addr);
        expect_result(name, result, in_bounds(ok), &buf, frame)?;
    }

    let port_cases: [(&str, usize, SetPort); 2] = [
        ("set_src_port", 0, set_src_port),
        ("set_dst_port", 2, set_dst_port),
    ];
    for (name, field, set) in port_cases {
        let mut buf = frame.to_vec();
        let want = if c.kind == L4Csum::Icmpv6 {
            Err(RewriteError::NoPorts)
        } else {
            in_bounds(fits(n, b, field, 2) && l4_fits(n, Some((b, c.kind))))
        };
        let result = set(&mut buf, b, c.kind, c.port);
        expect_result(name, result, want, &buf, frame)?;
    }

    let mut buf = frame.to_vec();
    let result = sctp_update_crc(&mut buf, b, a);
    let ok = b <= a && a <= n && a - b >= 12;
    expect_result("sctp_update_crc", result, in_bounds(ok), &buf, frame)?;

    let mut buf = frame.to_vec();
    let result = decrement_ttl_ipv4(&mut buf, a);
    let want = if !(fits(n, a, 8, 2) && fits(n, a, 10, 2)) {
        Err(RewriteError::OutOfBounds)
    } else {
        frame[a + 8].checked_sub(1).ok_or(RewriteError::TtlExpired)
    };
    expect_result("decrement_ttl_ipv4", result, want, &buf, frame)?;

    let mut buf = frame.to_vec();
    let result = decrement_hop_limit_ipv6(&mut buf, a);
    let want = if fits(n, a, 7, 1) {
        frame[a + 7].checked_sub(1).ok_or(RewriteError::TtlExpired)
    } else {
        Err(RewriteError::OutOfBounds)
    };
    expect_result("decrement_hop_limit_ipv6", result, want, &buf, frame)?;

    let want = if c.old.len() == c.new.len() {
        in_bounds(fits(n, a, 0, 2))
    } else {
        Err(RewriteError::LengthMismatch)
    };
    let mut buf = frame.to_vec();
    let result = adjust_checksum_at(&mut buf, a, &c.old, &c.new);
    expect_result("adjust_checksum_at", result, want, &buf, frame)?;
    let mut buf = frame.to_vec();
    let result = adjust_checksum_at_odd(&mut buf, a, &c.old, &c.new);
    expect_result("adjust_checksum_at_odd", result, want, &buf, frame)?;

    let mut buf = frame.to_vec();
    let result = swap_macs(&mut buf);
    expect_result("swap_macs", result, in_bounds(n >= 12), &buf, frame)?;
    let mut buf = frame.to_vec();
    let result = set_macs(&mut buf, [1; 6], [2; 6]);
    expect_result("set_macs", result, in_bounds(n >= 12), &buf, frame)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_rewrites_match_full(spec in spec(), ops in vec(op(), 1..8)) {
        rewrites_match_full(&spec, &ops)?;
    }

    #[test]
    fn prop_icmpv6_rewrites_match_full(case in icmpv6_case()) {
        icmpv6_rewrites_match_full(&case)?;
    }

    #[test]
    fn prop_sctp_rewrites_match_full(
        ports in any::<(u16, u16)>(),
        new_dst in any::<[u8; 4]>(),
        padding in 0usize..8,
    ) {
        sctp_rewrites_match_full(ports, new_dst, padding)?;
    }

    #[test]
    fn prop_checksum_update_matches_full(
        data in vec(any::<u8>(), 4..300),
        start in any::<prop::sample::Index>(),
        new in vec(any::<u8>(), 0..24),
    ) {
        checksum_update_matches_full(data, start, &new)?;
    }

    #[test]
    fn prop_bad_offsets_are_errors(case in bad_case()) {
        bad_offsets_are_errors(&case)?;
    }

    #[test]
    fn prop_one_pass_nat_equals_the_steps(
        spec in spec(),
        dst in any::<bool>(),
        addr in any::<[u8; 16]>(),
        port in any::<u16>(),
    ) {
        one_pass_nat_equals_the_steps(&spec, dst, addr, port)?;
    }

    #[test]
    fn prop_two_ended_nat_equals_the_steps(
        spec in spec(),
        src in (any::<[u8; 16]>(), any::<u16>()),
        dst in (any::<[u8; 16]>(), any::<u16>()),
    ) {
        two_ended_nat_equals_the_steps(&spec, src, dst)?;
    }
}

/// `nat_both_ipv4`/`nat_both_ipv6` (source NAT and destination NAT in one
/// pass) give byte for byte what the five named rewrites give in sequence
/// (source address and port, destination address and port, TTL), and
/// checksums a full recomputation agrees with; errors leave the frame
/// untouched.
fn two_ended_nat_equals_the_steps(
    spec: &Spec,
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
) -> Result<(), TestCaseError> {
    use clustergate_dataplane::packet::rewrite::{self, nat_both_ipv4, nat_both_ipv6};
    let b = build(spec);
    let l3 = L3;
    let l4 = Some((b.l4, b.kind));
    let mut steps = b.frame.clone();
    let stepped: Result<u8, RewriteError> = (|| {
        if b.is_v4 {
            rewrite::set_ipv4_src(&mut steps, l3, l4, v4(&src))?;
            rewrite::set_src_port(&mut steps, b.l4, b.kind, sport)?;
            rewrite::set_ipv4_dst(&mut steps, l3, l4, v4(&dst))?;
            rewrite::set_dst_port(&mut steps, b.l4, b.kind, dport)?;
            rewrite::decrement_ttl_ipv4(&mut steps, l3)
        } else {
            rewrite::set_ipv6_src(&mut steps, l3, l4, src)?;
            rewrite::set_src_port(&mut steps, b.l4, b.kind, sport)?;
            rewrite::set_ipv6_dst(&mut steps, l3, l4, dst)?;
            rewrite::set_dst_port(&mut steps, b.l4, b.kind, dport)?;
            rewrite::decrement_hop_limit_ipv6(&mut steps, l3)
        }
    })();
    let mut fused = b.frame.clone();
    let one = if b.is_v4 {
        nat_both_ipv4(
            &mut fused,
            l3,
            b.l4,
            b.kind,
            (v4(&src), sport),
            (v4(&dst), dport),
        )
    } else {
        nat_both_ipv6(&mut fused, l3, b.l4, b.kind, (&src, sport), (&dst, dport))
    };
    match (stepped, one) {
        (Ok(a), Ok(c)) => {
            prop_assert_eq!(a, c, "new TTL");
            prop_assert_eq!(&fused, &steps, "the two-ended NAT differs from the steps");
            check_checksums(&fused, &b)?;
        }
        (Err(RewriteError::TtlExpired), Err(RewriteError::TtlExpired)) => {
            prop_assert_eq!(&fused, &b.frame, "an error leaves the frame untouched");
        }
        (x, y) => prop_assert!(false, "steps gave {:?}, one pass gave {:?}", x, y),
    }
    Ok(())
}

/// `nat_ipv4`/`nat_ipv6` give byte for byte what the three named rewrites give
/// in sequence (address, port, TTL), and checksums a full recomputation agrees
/// with; errors leave the frame untouched.
fn one_pass_nat_equals_the_steps(
    spec: &Spec,
    dst: bool,
    addr: [u8; 16],
    port: u16,
) -> Result<(), TestCaseError> {
    use clustergate_dataplane::packet::rewrite::{self, nat_ipv4, nat_ipv6, NatSide};
    let b = build(spec);
    let l3 = L3;
    let side = if dst { NatSide::Dst } else { NatSide::Src };
    let mut steps = b.frame.clone();
    let stepped: Result<u8, RewriteError> = (|| {
        if b.is_v4 {
            let a4 = v4(&addr);
            if dst {
                rewrite::set_ipv4_dst(&mut steps, l3, Some((b.l4, b.kind)), a4)?;
            } else {
                rewrite::set_ipv4_src(&mut steps, l3, Some((b.l4, b.kind)), a4)?;
            }
        } else if dst {
            rewrite::set_ipv6_dst(&mut steps, l3, Some((b.l4, b.kind)), addr)?;
        } else {
            rewrite::set_ipv6_src(&mut steps, l3, Some((b.l4, b.kind)), addr)?;
        }
        if dst {
            rewrite::set_dst_port(&mut steps, b.l4, b.kind, port)?;
        } else {
            rewrite::set_src_port(&mut steps, b.l4, b.kind, port)?;
        }
        if b.is_v4 {
            rewrite::decrement_ttl_ipv4(&mut steps, l3)
        } else {
            rewrite::decrement_hop_limit_ipv6(&mut steps, l3)
        }
    })();
    let mut fused = b.frame.clone();
    let one = if b.is_v4 {
        nat_ipv4(&mut fused, l3, b.l4, b.kind, side, v4(&addr), port)
    } else {
        nat_ipv6(&mut fused, l3, b.l4, b.kind, side, &addr, port)
    };
    match (stepped, one) {
        (Ok(a), Ok(c)) => {
            prop_assert_eq!(a, c, "new TTL");
            prop_assert_eq!(&fused, &steps, "the one-pass NAT differs from the steps");
            check_checksums(&fused, &b)?;
        }
        (Err(RewriteError::TtlExpired), Err(RewriteError::TtlExpired)) => {
            // The step version wrote the address before finding the TTL at
            // zero; the one-pass version must not have written anything.
            prop_assert_eq!(&fused, &b.frame, "an error leaves the frame untouched");
        }
        (x, y) => prop_assert!(false, "steps gave {:?}, one pass gave {:?}", x, y),
    }
    Ok(())
}

/// A known-answer check of the rewrite path on a fixed TCP/IPv4 frame, independent of proptest.
#[test]
fn tcp_ipv4_known_frame() {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_SRC, MAC_DST)
        .ipv4([192, 168, 0, 1], [10, 96, 0, 10], 64)
        .tcp(40000, 80, 1, 65535)
        .syn()
        .write(&mut frame, b"hello")
        .expect("write to a Vec");
    let built = Built {
        frame: frame.clone(),
        l4: L3 + 20,
        kind: L4Csum::Tcp,
        is_v4: true,
        no_checksum: false,
    };
    let l4 = Some((built.l4, L4Csum::Tcp));
    set_ipv4_dst(&mut frame, L3, l4, [10, 244, 1, 7]).expect("in bounds");
    set_dst_port(&mut frame, built.l4, L4Csum::Tcp, 8080).expect("in bounds");
    assert_eq!(decrement_ttl_ipv4(&mut frame, L3), Ok(63));
    swap_macs(&mut frame).expect("in bounds");
    check_checksums(&frame, &built).expect("checksums match etherparse");
    assert_eq!(&frame[0..6], &MAC_SRC);
    assert_eq!(&frame[6..12], &MAC_DST);
}

/// Rewrites the source port of `spec` to the value that makes the one's-complement sum zero, and returns the checksum field.
fn rewrite_to_zero_sum(spec: &Spec) -> u16 {
    let mut b = build(spec);
    let at = b.l4_csum_at();
    let mut segment = b.frame[b.l4..].to_vec();
    segment[at - b.l4..at - b.l4 + 2].copy_from_slice(&[0, 0]);
    let proto = match b.kind {
        L4Csum::Tcp => 6,
        _ => 17,
    };
    let pseudo = match &spec.ip {
        IpSpec::V4 { src, dst, .. } => pseudo_header_v4(*src, *dst, proto, segment.len() as u16),
        IpSpec::V6 { src, dst, .. } => pseudo_header_v6(src, dst, proto, segment.len() as u32),
    };
    let sum = fold(sum_bytes(pseudo, &segment));
    let old = u16::from_be_bytes([segment[0], segment[1]]);
    // sum − old + new ≡ 0 (mod 2^16 − 1).
    let new = fold(u32::from(old) + u32::from(!sum));
    set_src_port(&mut b.frame, b.l4, b.kind, new).expect("in bounds");
    check_checksums(&b.frame, &b).expect("checksums match etherparse");
    u16::from_be_bytes([b.frame[at], b.frame[at + 1]])
}

/// A computed zero is 0x0000 for TCP (RFC 1624 §5: eqn. 3, not eqn. 2) and 0xFFFF for UDP (RFC 768).
#[test]
fn zero_results_are_canonical() {
    let v4 = IpSpec::V4 {
        src: [192, 168, 0, 1],
        dst: [10, 96, 0, 10],
        ttl: 64,
        identification: 7,
        options: Vec::new(),
    };
    let v6 = IpSpec::V6 {
        src: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        dst: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a],
        hop_limit: 64,
    };
    let tcp = L4Spec::Tcp {
        src: 40000,
        dst: 80,
        seq: 1,
        ack: 0,
        flags: 0x02,
        window: 65535,
        options: Vec::new(),
    };
    let udp = L4Spec::Udp {
        src: 40000,
        dst: 53,
    };
    let payload = b"zero".to_vec();
    for (ip, l4, want) in [
        (&v4, &tcp, 0x0000),
        (&v6, &tcp, 0x0000),
        (&v4, &udp, 0xFFFF),
        (&v6, &udp, 0xFFFF),
    ] {
        let spec = Spec {
            ip: ip.clone(),
            l4: l4.clone(),
            payload: payload.clone(),
        };
        assert_eq!(rewrite_to_zero_sum(&spec), want, "{spec:?}");
    }
}
