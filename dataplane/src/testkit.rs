//! Frame fixtures built with etherparse's `PacketBuilder`, shared by the unit
//! tests, the simulation tests, the fuzz seeds and the benches.
//!
//! Owns: a few named MACs and builders for TCP/UDP/SCTP frames over IPv4 and
//! IPv6, with or without an 802.1Q tag, and ICMP errors quoting a frame.
//! Allocates freely: it is never on the packet path.

use etherparse::{PacketBuilder, PacketBuilderStep, TcpHeader};

use crate::flow::{ip_from16, Addr16};
use crate::packet::checksum;

/// The client's MAC in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The gateway's MAC in fixtures.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Room every fixture buffer has, like an AF_XDP chunk.
pub const BUF_LEN: usize = 2048;

/// TCP flags of a fixture segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tcp {
    /// SYN.
    pub syn: bool,
    /// ACK (with this acknowledgment number).
    pub ack: Option<u32>,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// Sequence number.
    pub seq: u32,
}

impl Tcp {
    /// A bare SYN with sequence number `seq`.
    #[must_use]
    pub fn syn(seq: u32) -> Self {
        Self {
            syn: true,
            seq,
            ..Self::default()
        }
    }

    /// An ACK segment.
    #[must_use]
    pub fn ack(seq: u32, ack: u32) -> Self {
        Self {
            ack: Some(ack),
            seq,
            ..Self::default()
        }
    }
}

fn tcp_step(b: PacketBuilderStep<TcpHeader>, f: Tcp) -> PacketBuilderStep<TcpHeader> {
    let mut b = b;
    if f.syn {
        b = b.syn();
    }
    if let Some(a) = f.ack {
        b = b.ack(a);
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    b
}

/// Transport of a fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Spec {
    /// TCP with these flags.
    Tcp(Tcp),
    /// UDP.
    Udp,
    /// SCTP (a DATA-less common header plus one 4-byte chunk, valid CRC32c).
    Sctp,
}

/// A frame from `src:sport` to `dst:dport`, IPv4 or IPv6 by address family,
/// optionally VLAN-tagged, with `ttl` and `payload`.
///
/// # Panics
/// When the addresses are of different families (a fixture bug).
#[allow(clippy::too_many_arguments)] // reason: a fixture builder; every field is a knob tests turn
#[must_use]
pub fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src: Addr16,
    sport: u16,
    dst: Addr16,
    dport: u16,
    l4: L4Spec,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut out = Vec::new();
    macro_rules! finish {
        ($ip:expr) => {{
            let ip = $ip;
            match l4 {
                L4Spec::Tcp(f) => tcp_step(ip.tcp(sport, dport, f.seq, 64240), f)
                    .write_to_vec(&mut out, payload)
                    .expect("fixture fits"),
                L4Spec::Udp => ip
                    .udp(sport, dport)
                    .write_to_vec(&mut out, payload)
                    .expect("fixture fits"),
                L4Spec::Sctp => {
                    let sctp = sctp_segment(sport, dport, payload);
                    // 132: SCTP has no builder step; write the IP layer with the raw segment.
                    ip.write_to_vec(&mut out, etherparse::IpNumber(132), &sctp)
                        .expect("fixture fits")
                }
            }
        }};
    }
    match (ip_from16(src), ip_from16(dst)) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => match vlan {
            Some(v) => finish!(eth
                .single_vlan(etherparse::VlanId::try_new(v).expect("vlan id"))
                .ipv4(s.octets(), d.octets(), ttl)),
            None => finish!(eth.ipv4(s.octets(), d.octets(), ttl)),
        },
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => match vlan {
            Some(v) => finish!(eth
                .single_vlan(etherparse::VlanId::try_new(v).expect("vlan id"))
                .ipv6(s.octets(), d.octets(), ttl)),
            None => finish!(eth.ipv6(s.octets(), d.octets(), ttl)),
        },
        _ => panic!("fixture mixes IPv4 and IPv6"),
    }
    out
}

/// An SCTP packet (RFC 9260 §3): common header and one zero-length-data chunk
/// carrying `payload`, with a valid CRC32c.
#[must_use]
pub fn sctp_segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(16 + payload.len());
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
    s.extend_from_slice(&[0; 4]); // checksum
                                  // Chunk: type 0 (DATA) would need more fields; use a HEARTBEAT (4) chunk.
    let chunk_len = 4 + payload.len();
    s.push(4);
    s.push(0);
    s.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    s.extend_from_slice(payload);
    while s.len() % 4 != 0 {
        s.push(0);
    }
    let crc = checksum::sctp_crc32c(&s);
    s[8..12].copy_from_slice(&crc.to_le_bytes());
    s
}

/// A plain client → frontend frame with fixture MACs and TTL 64.
#[must_use]
pub fn client_frame(
    src: Addr16,
    sport: u16,
    dst: Addr16,
    dport: u16,
    l4: L4Spec,
    payload: &[u8],
) -> Vec<u8> {
    frame(
        CLIENT_MAC,
        GATEWAY_MAC,
        None,
        src,
        sport,
        dst,
        dport,
        l4,
        64,
        payload,
    )
}

/// An ICMP error from `from` to `to` quoting the IP packet inside `quoted_frame`
/// (its first `quote_len` IP bytes). `icmp` is (type, code, bytes 5..8), e.g.
/// `(3, 4, [0, 0, 0x05, 0xdc])` for IPv4 "fragmentation needed, MTU 1500" or
/// `(2, 0, 1280u32.to_be_bytes())` for ICMPv6 "packet too big".
///
/// # Panics
/// When `quoted_frame` is not an untagged IP frame (a fixture bug).
#[must_use]
pub fn icmp_error(
    from: Addr16,
    to: Addr16,
    icmp: (u8, u8, [u8; 4]),
    quoted_frame: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let ip = &quoted_frame[14..];
    let quote = &ip[..quote_len.min(ip.len())];
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC);
    let mut out = Vec::new();
    match (ip_from16(from), ip_from16(to)) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4_raw(icmp.0, icmp.1, icmp.2)
            .write_to_vec(&mut out, quote)
            .expect("fixture fits"),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_raw(icmp.0, icmp.1, icmp.2)
            .write_to_vec(&mut out, quote)
            .expect("fixture fits"),
        _ => panic!("fixture mixes IPv4 and IPv6"),
    }
    out
}

/// Copies a frame into a [`BUF_LEN`] buffer; returns it and the frame length.
#[must_use]
pub fn to_buf(frame: &[u8]) -> (Vec<u8>, usize) {
    let mut b = vec![0u8; BUF_LEN.max(frame.len())];
    b[..frame.len()].copy_from_slice(frame);
    (b, frame.len())
}

/// The Ethernet header of a frame from the client to the gateway.
#[must_use]
pub fn ethernet(ether_type: etherparse::EtherType) -> Vec<u8> {
    etherparse::Ethernet2Header {
        source: CLIENT_MAC,
        destination: GATEWAY_MAC,
        ether_type,
    }
    .to_bytes()
    .to_vec()
}

fn v4(a: &Addr16) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// An IPv4 packet from the client with `data` as its payload and the given
/// fragment fields (`(offset in 8-byte units, more fragments)`), e.g. one
/// fragment of a datagram built with [`udp_datagram`].
///
/// # Panics
/// When `data` is too long for one IPv4 packet or the offset is out of range
/// (a fixture bug).
#[must_use]
pub fn ipv4_raw(
    src: Addr16,
    dst: Addr16,
    proto: u8,
    id: u16,
    frag: (u16, bool),
    data: &[u8],
) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::new(
        u16::try_from(data.len()).expect("fixture fits"),
        64,
        etherparse::IpNumber(proto),
        v4(&src),
        v4(&dst),
    )
    .expect("fixture fits");
    h.identification = id;
    h.dont_fragment = false;
    h.fragment_offset = etherparse::IpFragOffset::try_new(frag.0).expect("fragment offset");
    h.more_fragments = frag.1;
    h.header_checksum = h.calc_header_checksum();
    let mut out = ethernet(etherparse::EtherType::IPV4);
    h.write(&mut out).expect("fixture fits");
    out.extend_from_slice(data);
    out
}

/// An IPv6 fragment from the client: fixed header, fragment header
/// (`(offset in 8-byte units, more fragments)`, identification `id`), `data`.
///
/// # Panics
/// When `data` is too long for one IPv6 packet (a fixture bug).
#[must_use]
pub fn ipv6_fragment(
    src: Addr16,
    dst: Addr16,
    proto: u8,
    id: u32,
    frag: (u16, bool),
    data: &[u8],
) -> Vec<u8> {
    let h = etherparse::Ipv6Header {
        payload_length: u16::try_from(8 + data.len()).expect("fixture fits"),
        next_header: etherparse::ip_number::IPV6_FRAGMENTATION_HEADER,
        hop_limit: 64,
        source: src,
        destination: dst,
        ..Default::default()
    };
    let mut out = ethernet(etherparse::EtherType::IPV6);
    h.write(&mut out).expect("fixture fits");
    out.push(proto);
    out.push(0);
    out.extend_from_slice(&((frag.0 << 3) | u16::from(frag.1)).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A UDP datagram (header and a `len - 8`-byte patterned payload) with its
/// checksum computed over the whole of it, for splitting into fragments.
///
/// # Panics
/// When `len < 8` or does not fit a UDP length (a fixture bug).
#[must_use]
pub fn udp_datagram(src: Addr16, dst: Addr16, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 8).map(|i| (i * 7 % 251) as u8).collect();
    let mut h = etherparse::UdpHeader {
        source_port: sport,
        destination_port: dport,
        length: u16::try_from(len).expect("fixture fits"),
        checksum: 0,
    };
    h.checksum = if ip_from16(src).is_ipv4() {
        h.calc_checksum_ipv4_raw(v4(&src), v4(&dst), &payload)
    } else {
        h.calc_checksum_ipv6_raw(src, dst, &payload)
    }
    .expect("fixture fits");
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

/// What a test sees of a frame on the wire, once every checksum was verified
/// in full ([`wire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// Source address (of the inner packet, for IP in IP).
    pub src: Addr16,
    /// Destination address (of the inner packet, for IP in IP).
    pub dst: Addr16,
    /// Source port (0 for ICMP).
    pub sport: u16,
    /// Destination port (0 for ICMP).
    pub dport: u16,
    /// TTL or hop limit (of the inner packet, for IP in IP).
    pub ttl: u8,
    /// TCP flags: SYN, ACK, FIN, RST.
    pub tcp_flags: (bool, bool, bool, bool),
    /// TCP sequence number; for ICMP, `type << 8 | code`.
    pub seq: u32,
    /// TCP acknowledgment number.
    pub ack: u32,
    /// ICMP: the four bytes after the checksum (the MTU of a too-big error).
    pub icmp_rest: [u8; 4],
    /// For IP in IP: the outer (source, destination, TTL).
    pub outer: Option<(Addr16, Addr16, u8)>,
    /// Transport payload (for ICMP errors, the quoted packet; for SCTP, the
    /// first chunk's value).
    pub payload: Vec<u8>,
}

/// Parses `frame` (Ethernet; IPv4 or IPv6; TCP, UDP, SCTP or ICMP; possibly
/// IPv4-in-IPv4 or IPv6-in-IPv6) and checks every checksum in full: the IPv4
/// header checksums (outer and inner), TCP and UDP over their pseudo-headers,
/// ICMP and ICMPv6, SCTP's CRC32c. Panics naming the first one that is wrong.
#[must_use]
pub fn wire(frame: &[u8]) -> Wire {
    use etherparse::{IpSlice, LinkSlice, NetSlice, SlicedPacket};
    let p = SlicedPacket::from_ethernet(frame).expect("the frame parses");
    assert!(
        matches!(p.link, Some(LinkSlice::Ethernet2(_))),
        "an Ethernet II frame"
    );
    let (src, dst, ttl, proto, payload) = ip_parts(p.net.as_ref().expect("an IP packet"));
    if proto == 4 || proto == 41 {
        let inner = IpSlice::from_slice(payload).expect("the inner packet parses");
        let inner_net: NetSlice<'_> = match inner {
            IpSlice::Ipv4(v) => NetSlice::Ipv4(v),
            IpSlice::Ipv6(v) => NetSlice::Ipv6(v),
        };
        let mut w = transport(&inner_net);
        w.outer = Some((src, dst, ttl));
        return w;
    }
    transport(p.net.as_ref().expect("an IP packet"))
}

/// Addresses, TTL, protocol and payload of an IP layer; checks an IPv4
/// header's checksum.
fn ip_parts<'a>(net: &etherparse::NetSlice<'a>) -> (Addr16, Addr16, u8, u8, &'a [u8]) {
    use etherparse::NetSlice;
    match net {
        NetSlice::Ipv4(v) => {
            let h = v.header();
            assert_eq!(
                h.header_checksum(),
                h.to_header().calc_header_checksum(),
                "IPv4 header checksum"
            );
            (
                crate::flow::v4_to_16(h.source()),
                crate::flow::v4_to_16(h.destination()),
                h.ttl(),
                v.payload().ip_number.0,
                v.payload().payload,
            )
        }
        NetSlice::Ipv6(v) => {
            let h = v.header();
            (
                h.source(),
                h.destination(),
                h.hop_limit(),
                v.payload().ip_number.0,
                v.payload().payload,
            )
        }
        NetSlice::Arp(_) => panic!("ARP, not IP"),
    }
}

/// The transport of an IP layer, every checksum verified.
fn transport(net: &etherparse::NetSlice<'_>) -> Wire {
    let (src, dst, ttl, proto, l4) = ip_parts(net);
    let v4 = ip_from16(src).is_ipv4();
    let s4 = [src[12], src[13], src[14], src[15]];
    let d4 = [dst[12], dst[13], dst[14], dst[15]];
    let pseudo = |n: u8| {
        if v4 {
            checksum::pseudo_header_v4(s4, d4, n, l4.len() as u16)
        } else {
            checksum::pseudo_header_v6(&src, &dst, n, l4.len() as u32)
        }
    };
    let mut w = Wire {
        src,
        dst,
        sport: 0,
        dport: 0,
        ttl,
        tcp_flags: (false, false, false, false),
        seq: 0,
        ack: 0,
        icmp_rest: [0; 4],
        outer: None,
        payload: Vec::new(),
    };
    let be16 = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]]);
    match proto {
        6 => {
            assert_eq!(
                checksum::fold(checksum::sum_bytes(pseudo(6), l4)),
                0xffff,
                "TCP checksum"
            );
            let flags = l4[13];
            w.sport = be16(0);
            w.dport = be16(2);
            w.seq = be32(4);
            w.ack = be32(8);
            w.tcp_flags = (
                flags & 0x02 != 0,
                flags & 0x10 != 0,
                flags & 0x01 != 0,
                flags & 0x04 != 0,
            );
            w.payload = l4[usize::from(l4[12] >> 4) * 4..].to_vec();
        }
        17 => {
            if !(v4 && be16(6) == 0) {
                assert_eq!(
                    checksum::fold(checksum::sum_bytes(pseudo(17), l4)),
                    0xffff,
                    "UDP checksum"
                );
            }
            w.sport = be16(0);
            w.dport = be16(2);
            w.payload = l4[8..].to_vec();
        }
        132 => {
            let mut copy = l4.to_vec();
            copy[8..12].fill(0);
            assert_eq!(
                u32::from_le_bytes([l4[8], l4[9], l4[10], l4[11]]),
                checksum::sctp_crc32c(&copy),
                "SCTP CRC32c"
            );
            w.sport = be16(0);
            w.dport = be16(2);
            // The value of the first chunk (the fixtures send one).
            w.payload = l4.get(16..).unwrap_or_default().to_vec();
        }
        1 | 58 => {
            let start = if proto == 58 { pseudo(58) } else { 0 };
            assert_eq!(
                checksum::fold(checksum::sum_bytes(start, l4)),
                0xffff,
                "ICMP checksum"
            );
            w.seq = u32::from(l4[0]) << 8 | u32::from(l4[1]);
            w.icmp_rest.copy_from_slice(&l4[4..8]);
            w.payload = l4[8..].to_vec();
        }
        other => panic!("unexpected IP protocol {other}"),
    }
    w
}
