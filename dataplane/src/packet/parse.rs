//! Frame parsing: from raw bytes to the offsets and fields the pipeline needs.
//!
//! Owns: [`parse`], which validates a frame with etherparse layer by layer and
//! returns a [`Parsed`] (offsets into the frame plus the flow fields), or `None`
//! for frames that are not ours to handle (non-IP, protocols we do not balance),
//! or a [`DropReason`] for anything truncated or inconsistent.
//!
//! Must never: panic on any input, allocate, or modify the frame. Every offset
//! in a [`Parsed`] is in bounds of the frame it came from.
//!
//! Supported: Ethernet II, at most one 802.1Q tag, IPv4 with or without options,
//! IPv6 with extension headers, TCP, UDP, SCTP, and ICMPv4/ICMPv6 errors that
//! quote a TCP/UDP/SCTP packet. Fragments: see [`Fragment`].
//!
//! Refused here, whatever the destination (`docs/architecture.md`, "Hostile
//! packets"): source routes (IPv4 LSRR/SSRR, IPv6 routing headers with
//! segments left), fragments reaching past 65 535 bytes, TCP fragments at
//! offset 8 bytes. The IPv6 chain is walked here, not by etherparse: it stops
//! at a non-first fragment's Fragment header, whose data is not headers.

use etherparse::{
    EtherType, Ethernet2HeaderSlice, Ipv4Slice, Ipv6HeaderSlice, SingleVlanHeaderSlice, TcpSlice,
};

use super::rewrite::L4Csum;
use crate::flow::{v4_to_16, Addr16, FlowTuple, Proto};
use crate::verdict::DropReason;

/// IP version of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// An IP fragment (RFC 791 §3.2, RFC 8200 §4.5).
///
/// Policy (documented in `docs/architecture.md`): a **first** fragment carries
/// the transport header, so it is balanced like any packet of its flow, and its
/// rewrite is remembered under (src, dst, `next`, identification). A
/// **non-first** fragment has no ports: it gets the rewrite remembered for its
/// datagram, or is dropped as [`DropReason::FragmentUntracked`] when the first
/// fragment was not seen (for example, when it arrived out of order). Each
/// fragment's byte range is remembered too: one that overlaps or repeats a
/// range already forwarded is dropped ([`DropReason::FragmentOverlap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Identification field (16 bits in IPv4, 32 in IPv6).
    pub id: u32,
    /// True for the fragment at offset 0.
    pub first: bool,
    /// Where its data starts in the datagram's fragmentable part, in bytes.
    pub offset: u32,
    /// Bytes of fragmentable data it carries.
    pub len: u32,
    /// More fragments follow (the MF / M flag).
    pub more: bool,
    /// The protocol number that names the datagram with the addresses and
    /// the identification: the IPv4 protocol, or the IPv6 Fragment header's
    /// Next Header (which a non-first fragment carries too, whatever
    /// extension headers follow it in the fragmentable part).
    pub next: u8,
}

/// The transport part of a flow packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowL4 {
    /// Offset of the transport header in the frame.
    pub offset: usize,
    /// Protocol.
    pub proto: Proto,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// TCP flags byte (offset 13); zero for UDP and SCTP.
    pub tcp_flags: u8,
    /// How the transport checksum must be kept right.
    pub csum: L4Csum,
}

/// TCP flag bits (RFC 9293 §3.1).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The packet quoted inside an ICMP error (RFC 792, RFC 4443 §2.4(c)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Offset of the quoted IP header in the frame.
    pub l3: usize,
    /// Offset of the quoted transport header in the frame.
    pub l4: usize,
    /// End of the quoted bytes in the frame (the ICMP message end).
    pub end: usize,
    /// The flow as the quoted packet carried it.
    pub tuple: FlowTuple,
    /// The quote holds the whole quoted packet (its IP length ends where the
    /// ICMP message ends), so a checksum over all of it can be kept right.
    pub whole: bool,
}

/// An ICMP or ICMPv6 error message about one of our flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// Offset of the ICMP header in the frame.
    pub offset: usize,
    /// The quoted packet.
    pub quoted: Quoted,
}

/// What follows the IP header(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or SCTP with its ports (including a first fragment).
    Flow(FlowL4),
    /// A non-first fragment: no ports. The protocol when its Next Header
    /// names TCP, UDP or SCTP; `None` for an IPv6 fragment whose fragmentable
    /// part starts with an extension header (the first fragment's rewrite
    /// still applies when there was one; otherwise it is not ours).
    NonFirstFragment(Option<Proto>),
    /// An ICMP error quoting a TCP/UDP/SCTP packet.
    IcmpError(IcmpError),
}

/// A validated IP packet inside an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// IP version.
    pub family: Family,
    /// Offset of the IP header (14, or 18 after an 802.1Q tag).
    pub l3: usize,
    /// End of the IP packet in the frame (Ethernet padding lies beyond it).
    pub ip_end: usize,
    /// Source address, canonical 16-byte form.
    pub src: Addr16,
    /// Destination address, canonical 16-byte form.
    pub dst: Addr16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Set when the packet is an IP fragment.
    pub fragment: Option<Fragment>,
    /// The transport part.
    pub l4: L4,
}

impl Parsed {
    /// The flow tuple of a [`L4::Flow`] packet.
    #[must_use]
    pub fn tuple(&self) -> Option<FlowTuple> {
        match self.l4 {
            L4::Flow(f) => Some(FlowTuple {
                src_addr: self.src,
                dst_addr: self.dst,
                src_port: f.src_port,
                dst_port: f.dst_port,
                proto: f.proto,
            }),
            _ => None,
        }
    }
}

const IP_ICMP: u8 = 1;
const IP_TCP: u8 = 6;
const IP_ICMPV6: u8 = 58;

/// Offset of `sub` inside `base`; `sub` must be a subslice of `base`.
fn offset_in(base: &[u8], sub: &[u8]) -> usize {
    (sub.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize)
}

/// Is this an IPv4-mapped IPv6 address (`::ffff:0:0/96`)?
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses one Ethernet frame.
///
/// Returns `Ok(None)` for frames that are not ours (not IPv4/IPv6, a second
/// VLAN tag, an IP protocol we do not balance, ICMP that is not an error about a
/// flow); those go to the kernel.
///
/// # Errors
/// A [`DropReason`] naming the first layer that is truncated or inconsistent.
pub fn parse(frame: &[u8]) -> Result<Option<Parsed>, DropReason> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| DropReason::EthernetTruncated)?;
    let mut l3 = eth.slice().len();
    let mut ether_type = eth.ether_type();
    if ether_type == EtherType::VLAN_TAGGED_FRAME {
        let rest = frame.get(l3..).ok_or(DropReason::VlanTruncated)?;
        let vlan =
            SingleVlanHeaderSlice::from_slice(rest).map_err(|_| DropReason::VlanTruncated)?;
        l3 += vlan.slice().len();
        ether_type = vlan.ether_type();
    }
    let ip = frame.get(l3..).ok_or(DropReason::EthernetTruncated)?;
    match ether_type {
        EtherType::IPV4 => parse_ipv4(frame, l3, ip),
        EtherType::IPV6 => parse_ipv6(frame, l3, ip),
        _ => Ok(None),
    }
}

fn ip_len_error(e: &etherparse::err::LenError) -> bool {
    // A length error that comes from the slice (the frame) is truncation; one
    // from a header field is an inconsistent header.
    matches!(e.len_source, etherparse::LenSource::Slice)
}

/// IPv4 option types that route the packet by its source (RFC 791 §3.1).
const OPT_LSRR: u8 = 131;
const OPT_SSRR: u8 = 137;

/// Walks the IPv4 options: each must fit the header (RFC 791 §3.1, as
/// Linux's `ip_options_compile` checks), and source routes are refused.
fn check_ipv4_options(opts: &[u8]) -> Result<(), DropReason> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            t => {
                let l = usize::from(*opts.get(i + 1).ok_or(DropReason::Ipv4Malformed)?);
                if l < 2 || i + l > opts.len() {
                    return Err(DropReason::Ipv4Malformed);
                }
                if t == OPT_LSRR || t == OPT_SSRR {
                    return Err(DropReason::SourceRoute);
                }
                i += l;
            }
        }
    }
    Ok(())
}

/// The largest IP datagram (IPv4 total length; IPv6 payload length).
const IP_MAX: u32 = 65_535;
/// A TCP fragment at this offset can only overwrite the header's flags
/// (RFC 3128 §3: fragment offset 1).
const TCP_TINY_OFFSET: u32 = 8;

fn parse_ipv4(frame: &[u8], l3: usize, ip: &[u8]) -> Result<Option<Parsed>, DropReason> {
    use etherparse::err::ipv4::SliceError;
    let v4 = Ipv4Slice::from_slice(ip).map_err(|e| match e {
        SliceError::Len(l) if ip_len_error(&l) && ip.len() >= 20 => DropReason::IpTruncated,
        _ => DropReason::Ipv4Malformed,
    })?;
    let h = v4.header();
    check_ipv4_options(h.options())?;
    if !v4.extensions().is_empty() {
        // An authentication header cannot survive NAT (RFC 4302 covers the
        // addresses); it is not ours to rewrite.
        return Ok(None);
    }
    let payload = v4.payload();
    let l4 = offset_in(frame, payload.payload);
    let ip_end = l4 + payload.payload.len();
    let proto_number = payload.ip_number.0;
    let fragment = if h.is_fragmenting_payload() {
        let offset = u32::from(h.fragments_offset().value()) * 8;
        let len = (ip_end - l4) as u32;
        let header = (l4 - l3) as u32;
        if header + offset + len > IP_MAX {
            return Err(DropReason::FragmentOversize);
        }
        Some(Fragment {
            id: u32::from(h.identification()),
            first: offset == 0,
            offset,
            len,
            more: h.more_fragments(),
            next: proto_number,
        })
    } else {
        None
    };
    let mut parsed = Parsed {
        family: Family::V4,
        l3,
        ip_end,
        src: v4_to_16(h.source()),
        dst: v4_to_16(h.destination()),
        ttl: h.ttl(),
        fragment,
        l4: L4::NonFirstFragment(None),
    };
    finish_l4(frame, &mut parsed, proto_number, l4, ip_end)
}

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// Parses the IPv6 header and walks its extension headers itself: after
/// the Fragment header of a non-first fragment, the bytes are fragment data
/// (maybe the middle of a Destination Options header), never headers.
fn parse_ipv6(frame: &[u8], l3: usize, ip: &[u8]) -> Result<Option<Parsed>, DropReason> {
    let h = Ipv6HeaderSlice::from_slice(ip).map_err(|_| DropReason::Ipv6Malformed)?;
    let payload_len = usize::from(h.payload_length());
    if payload_len == 0 {
        // A jumbogram needs a Hop-by-Hop jumbo option (RFC 2675 §3) and cannot
        // cross Ethernet; without it the length is simply wrong.
        return Err(DropReason::Ipv6Malformed);
    }
    if is_v4_mapped(&h.source()) || is_v4_mapped(&h.destination()) {
        return Err(DropReason::Ipv6MappedAddress);
    }
    let payload = ip
        .get(40..40 + payload_len)
        .ok_or(DropReason::IpTruncated)?;
    let ip_end = l3 + 40 + payload_len;
    let mut next = h.next_header().0;
    let mut at = 0usize;
    let mut fragment: Option<Fragment> = None;
    loop {
        match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                // Hop-by-Hop only right after the fixed header (RFC 8200 §4.3).
                if next == EXT_HOP_BY_HOP && at != 0 {
                    return Err(DropReason::Ipv6Malformed);
                }
                let len = payload
                    .get(at + 1)
                    .map(|l| (usize::from(*l) + 1) * 8)
                    .filter(|l| at + l <= payload_len)
                    .ok_or(DropReason::Ipv6Malformed)?;
                // A routing header still to be followed names this node as a
                // waypoint: refused, whatever its type (RFC 8200 §4.4, RFC 5095).
                if next == EXT_ROUTING && payload[at + 3] != 0 {
                    return Err(DropReason::SourceRoute);
                }
                next = payload[at];
                at += len;
            }
            EXT_FRAGMENT => {
                let f = payload.get(at..at + 8).ok_or(DropReason::Ipv6Malformed)?;
                if fragment.is_some() {
                    return Err(DropReason::Ipv6Malformed);
                }
                let offset = u32::from(u16::from_be_bytes([f[2], f[3]]) & 0xfff8);
                let more = f[3] & 1 != 0;
                let unfragmentable = at as u32;
                next = f[0];
                at += 8;
                if offset == 0 && !more {
                    // An atomic fragment (RFC 6946): a whole packet.
                    continue;
                }
                let len = (payload_len - at) as u32;
                // Every fragment but the last is a multiple of 8 bytes, and
                // none reaches past a 65 535-byte payload (RFC 8200 §4.5).
                if more && !len.is_multiple_of(8) {
                    return Err(DropReason::Ipv6Malformed);
                }
                if unfragmentable + offset + len > IP_MAX {
                    return Err(DropReason::FragmentOversize);
                }
                fragment = Some(Fragment {
                    id: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
                    first: offset == 0,
                    offset,
                    len,
                    more,
                    next,
                });
                if offset != 0 {
                    // Fragment data, not headers.
                    break;
                }
            }
            // AH covers the addresses; NAT would break it.
            EXT_AUTH => return Ok(None),
            _ => break,
        }
    }
    let l4 = l3 + 40 + at;
    let mut parsed = Parsed {
        family: Family::V6,
        l3,
        ip_end,
        src: h.source(),
        dst: h.destination(),
        ttl: h.hop_limit(),
        fragment,
        l4: L4::NonFirstFragment(None),
    };
    finish_l4(frame, &mut parsed, next, l4, ip_end)
}

/// Fills in `parsed.l4` from the transport bytes `frame[l4..ip_end]`.
fn finish_l4(
    frame: &[u8],
    parsed: &mut Parsed,
    proto_number: u8,
    l4: usize,
    ip_end: usize,
) -> Result<Option<Parsed>, DropReason> {
    let seg = frame.get(l4..ip_end).ok_or(DropReason::IpTruncated)?;
    if let Some(f) = parsed.fragment.filter(|f| !f.first) {
        if f.next == IP_TCP && f.offset == TCP_TINY_OFFSET {
            return Err(DropReason::FragmentTinyTcp);
        }
        let proto = Proto::from_ip_number(f.next);
        if proto.is_none() && !matches!(f.next, EXT_ROUTING | EXT_DEST_OPTS) {
            // ICMP and other protocols' fragments: the kernel's.
            return Ok(None);
        }
        parsed.l4 = L4::NonFirstFragment(proto);
        return Ok(Some(*parsed));
    }
    if let Some(proto) = Proto::from_ip_number(proto_number) {
        let whole = parsed.fragment.is_none();
        parsed.l4 = L4::Flow(parse_flow_l4(seg, l4, proto, parsed.family, whole)?);
        return Ok(Some(*parsed));
    }
    let icmp_for_family = match parsed.family {
        Family::V4 => IP_ICMP,
        Family::V6 => IP_ICMPV6,
    };
    if proto_number == IP_ICMP || proto_number == IP_ICMPV6 {
        if proto_number != icmp_for_family {
            return Err(DropReason::IcmpFamilyMismatch);
        }
        if parsed.fragment.is_some() {
            // Fragmented ICMP errors are not ours to reassemble.
            return Ok(None);
        }
        return Ok(parse_icmp_error(seg, l4, ip_end, parsed.family)?.map(|e| {
            parsed.l4 = L4::IcmpError(e);
            *parsed
        }));
    }
    Ok(None)
}

/// Transport header of a flow packet. `whole` is false for a first fragment,
/// whose segment is shorter than the transport length fields say.
fn parse_flow_l4(
    seg: &[u8],
    offset: usize,
    proto: Proto,
    family: Family,
    whole: bool,
) -> Result<FlowL4, DropReason> {
    match proto {
        Proto::Tcp => {
            let tcp = TcpSlice::from_slice(seg).map_err(|_| DropReason::L4Malformed)?;
            Ok(FlowL4 {
                offset,
                proto,
                src_port: tcp.source_port(),
                dst_port: tcp.destination_port(),
                tcp_flags: seg.get(13).copied().unwrap_or(0),
                csum: L4Csum::Tcp,
            })
        }
        Proto::Udp => {
            if seg.len() < 8 {
                return Err(DropReason::L4Malformed);
            }
            let udp_len = usize::from(be16(seg, 4).unwrap_or(0));
            // The UDP length must fit the IP payload (RFC 768); for a first
            // fragment it covers the whole datagram, so only a lower bound holds.
            if udp_len < 8 || (whole && udp_len > seg.len()) {
                return Err(DropReason::L4Malformed);
            }
            let checksum = be16(seg, 6).unwrap_or(0);
            let csum = match family {
                Family::V4 => L4Csum::Udp,
                Family::V6 if checksum == 0 => return Err(DropReason::Udp6ZeroChecksum),
                Family::V6 => L4Csum::Udp6,
            };
            Ok(FlowL4 {
                offset,
                proto,
                src_port: be16(seg, 0).unwrap_or(0),
                dst_port: be16(seg, 2).unwrap_or(0),
                tcp_flags: 0,
                csum,
            })
        }
        Proto::Sctp => {
            // Common header: ports, verification tag, CRC32c (RFC 9260 §3.1).
            if seg.len() < 12 {
                return Err(DropReason::L4Malformed);
            }
            Ok(FlowL4 {
                offset,
                proto,
                src_port: be16(seg, 0).unwrap_or(0),
                dst_port: be16(seg, 2).unwrap_or(0),
                tcp_flags: 0,
                csum: L4Csum::None,
            })
        }
    }
}

/// Is this ICMP type an error that quotes the offending packet?
fn is_icmp_error(family: Family, icmp_type: u8) -> bool {
    match family {
        // Destination unreachable (incl. fragmentation needed), time exceeded,
        // parameter problem (RFC 792, RFC 1191).
        Family::V4 => matches!(icmp_type, 3 | 11 | 12),
        // Destination unreachable, packet too big, time exceeded, parameter
        // problem (RFC 4443 §3).
        Family::V6 => matches!(icmp_type, 1..=4),
    }
}

fn parse_icmp_error(
    seg: &[u8],
    offset: usize,
    end: usize,
    family: Family,
) -> Result<Option<IcmpError>, DropReason> {
    if seg.len() < 8 {
        return Err(DropReason::IcmpMalformed);
    }
    if !is_icmp_error(family, seg[0]) {
        // Echo and the like: the kernel's business.
        return Ok(None);
    }
    let inner = &seg[8..];
    let inner_l3 = offset + 8;
    let (tuple, inner_l4_rel, whole) = match family {
        Family::V4 => {
            if inner.len() < 20 || inner[0] >> 4 != 4 {
                return Err(DropReason::IcmpMalformed);
            }
            let ihl = usize::from(inner[0] & 0x0f) * 4;
            if ihl < 20 || inner.len() < ihl + 4 {
                return Err(DropReason::IcmpMalformed);
            }
            let Some(proto) = Proto::from_ip_number(inner[9]) else {
                return Ok(None);
            };
            if be16(inner, 6).unwrap_or(0) & 0x1fff != 0 {
                // A non-first fragment quoted: its first bytes are payload,
                // not ports. Not matched to any flow.
                return Ok(None);
            }
            let mut s = [0u8; 4];
            let mut d = [0u8; 4];
            s.copy_from_slice(&inner[12..16]);
            d.copy_from_slice(&inner[16..20]);
            let t = FlowTuple {
                src_addr: v4_to_16(s),
                dst_addr: v4_to_16(d),
                src_port: be16(inner, ihl).unwrap_or(0),
                dst_port: be16(inner, ihl + 2).unwrap_or(0),
                proto,
            };
            let whole = usize::from(be16(inner, 2).unwrap_or(0)) == inner.len();
            (t, ihl, whole)
        }
        Family::V6 => {
            if inner.len() < 44 || inner[0] >> 4 != 6 {
                return Err(DropReason::IcmpMalformed);
            }
            // Quoted packets with extension headers are not followed; only a
            // transport header right after the fixed header is.
            let Some(proto) = Proto::from_ip_number(inner[6]) else {
                return Ok(None);
            };
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&inner[8..24]);
            d.copy_from_slice(&inner[24..40]);
            let t = FlowTuple {
                src_addr: s,
                dst_addr: d,
                src_port: be16(inner, 40).unwrap_or(0),
                dst_port: be16(inner, 42).unwrap_or(0),
                proto,
            };
            let whole = 40 + usize::from(be16(inner, 4).unwrap_or(0)) == inner.len();
            (t, 40, whole)
        }
    };
    Ok(Some(IcmpError {
        offset,
        quoted: Quoted {
            l3: inner_l3,
            l4: inner_l3 + inner_l4_rel,
            end,
            tuple,
            whole,
        },
    }))
}
