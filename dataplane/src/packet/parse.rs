//! Frame parsing: from raw bytes to the offsets and fields the pipeline needs.
//!
//! Owns: [`parse`], which validates a frame and returns a [`Parsed`] (offsets
//! into the frame plus the flow fields, in one 64-byte cache line), or `None`
//! for frames that are not ours to handle (non-IP, protocols we do not
//! balance), or a [`DropReason`] for anything truncated or inconsistent.
//!
//! Two paths, one answer:
//! - [`parse_fast`]: the common frames (Ethernet, at most one 802.1Q tag,
//!   IPv4 with or without options, IPv6 without extension headers, an
//!   unfragmented TCP, UDP or SCTP packet) through the fixed-offset header
//!   views of [`super::view`], lengths checked once. It answers only when the
//!   frame is one of those and valid (or plainly not IP); otherwise it
//!   declines, without deciding anything.
//! - [`parse_full`]: everything else (fragments, IPv6 extension headers, ICMP
//!   errors, every malformed frame, so every drop reason) with etherparse and
//!   the extension-header walk below.
//!
//! Where the fast path answers, its answer is the full path's, bit for bit
//! (`tests/parse_paths.rs` checks it over random and mutated frames, and the
//! `parse` fuzz target on every input).
//!
//! Must never: panic on any input, allocate, or modify the frame. Every offset
//! in a [`Parsed`] is in bounds of the frame it came from. A frame longer than
//! 65 535 bytes (which no link carries) is refused as
//! [`DropReason::BadFrameLength`]: offsets are kept in 16 bits.
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
use super::view::{self, Ethernet, Ipv4, Ipv6, Transport};
use crate::flow::{v4_to_16, Addr16, FlowTuple, Proto};
use crate::verdict::DropReason;

/// The longest frame [`parse`] takes: every offset fits 16 bits.
pub const MAX_FRAME: usize = u16::MAX as usize;

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
    /// Offset of the transport header in the frame ([`FlowL4::offset`]).
    offset: u16,
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

impl FlowL4 {
    /// Offset of the transport header in the frame.
    #[inline]
    #[must_use]
    pub const fn offset(&self) -> usize {
        self.offset as usize
    }
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
///
/// Its flow is not copied out (two more addresses would not fit a cache
/// line): [`Quoted::tuple`] reads it from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// [`Quoted::l3`].
    l3: u16,
    /// [`Quoted::l4`].
    l4: u16,
    /// [`Quoted::end`].
    end: u16,
    /// The quoted packet's transport protocol.
    pub proto: Proto,
    /// The quoted packet's IP version (always the ICMP message's).
    pub family: Family,
    /// The quote holds the whole quoted packet (its IP length ends where the
    /// ICMP message ends), so a checksum over all of it can be kept right.
    pub whole: bool,
}

impl Quoted {
    /// Offset of the quoted IP header in the frame.
    #[inline]
    #[must_use]
    pub const fn l3(&self) -> usize {
        self.l3 as usize
    }

    /// Offset of the quoted transport header in the frame.
    #[inline]
    #[must_use]
    pub const fn l4(&self) -> usize {
        self.l4 as usize
    }

    /// End of the quoted bytes in the frame (the ICMP message end).
    #[inline]
    #[must_use]
    pub const fn end(&self) -> usize {
        self.end as usize
    }

    /// The flow as the quoted packet carried it, read from `frame`: the frame
    /// this was parsed from, before anything in the quote was rewritten.
    /// (Bytes out of `frame` read as zero; from the parsed frame there are
    /// none.)
    #[must_use]
    pub fn tuple(&self, frame: &[u8]) -> FlowTuple {
        let at = |from: usize, to: usize| frame.get(from..to).unwrap_or(&[]);
        let mut src_addr = [0u8; 16];
        let mut dst_addr = [0u8; 16];
        let l3 = self.l3();
        match self.family {
            Family::V4 => {
                src_addr = v4_to_16([0; 4]);
                dst_addr = v4_to_16([0; 4]);
                copy_exact(&mut src_addr[12..], at(l3 + 12, l3 + 16));
                copy_exact(&mut dst_addr[12..], at(l3 + 16, l3 + 20));
            }
            Family::V6 => {
                copy_exact(&mut src_addr, at(l3 + 8, l3 + 24));
                copy_exact(&mut dst_addr, at(l3 + 24, l3 + 40));
            }
        }
        let l4 = self.l4();
        FlowTuple {
            src_addr,
            dst_addr,
            src_port: be16(frame, l4).unwrap_or(0),
            dst_port: be16(frame, l4 + 2).unwrap_or(0),
            proto: self.proto,
        }
    }
}

/// Copies `from` into `to` when the lengths match (they do for a parsed
/// frame); leaves `to` as it is otherwise.
fn copy_exact(to: &mut [u8], from: &[u8]) {
    if to.len() == from.len() {
        to.copy_from_slice(from);
    }
}

/// An ICMP or ICMPv6 error message about one of our flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// [`IcmpError::offset`].
    offset: u16,
    /// The quoted packet.
    pub quoted: Quoted,
}

impl IcmpError {
    /// Offset of the ICMP header in the frame.
    #[inline]
    #[must_use]
    pub const fn offset(&self) -> usize {
        self.offset as usize
    }
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

/// [`Fragment`] in 10 bytes: offset and length fit 16 bits (both end
/// within a 65 535-byte datagram), the flags one byte. All zero = none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedFragment {
    id: [u16; 2],
    offset: u16,
    len: u16,
    next: u8,
    flags: u8,
}

impl PackedFragment {
    const PRESENT: u8 = 1;
    const FIRST: u8 = 2;
    const MORE: u8 = 4;
    const NONE: Self = Self {
        id: [0; 2],
        offset: 0,
        len: 0,
        next: 0,
        flags: 0,
    };

    fn pack(f: Option<Fragment>) -> Self {
        let Some(f) = f else { return Self::NONE };
        debug_assert!(f.offset <= u32::from(u16::MAX) && f.len <= u32::from(u16::MAX));
        let bit = |b: bool, v: u8| if b { v } else { 0 };
        Self {
            id: [(f.id >> 16) as u16, f.id as u16],
            offset: f.offset as u16,
            len: f.len as u16,
            next: f.next,
            flags: Self::PRESENT | bit(f.first, Self::FIRST) | bit(f.more, Self::MORE),
        }
    }

    #[inline]
    fn unpack(self) -> Option<Fragment> {
        (self.flags & Self::PRESENT != 0).then(|| Fragment {
            id: u32::from(self.id[0]) << 16 | u32::from(self.id[1]),
            first: self.flags & Self::FIRST != 0,
            offset: u32::from(self.offset),
            len: u32::from(self.len),
            more: self.flags & Self::MORE != 0,
            next: self.next,
        })
    }
}

/// A validated IP packet inside an Ethernet frame: one cache line.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Source address, canonical 16-byte form.
    pub src: Addr16,
    /// Destination address, canonical 16-byte form.
    pub dst: Addr16,
    /// [`Parsed::fragment`].
    fragment: PackedFragment,
    /// The transport part.
    pub l4: L4,
    /// [`Parsed::l3`].
    l3: u16,
    /// [`Parsed::ip_end`].
    ip_end: u16,
    /// IP version.
    pub family: Family,
    /// TTL or hop limit.
    pub ttl: u8,
}

const _: () = assert!(std::mem::size_of::<Parsed>() <= 64);

impl Parsed {
    /// Offset of the IP header (14, or 18 after an 802.1Q tag).
    #[inline]
    #[must_use]
    pub const fn l3(&self) -> usize {
        self.l3 as usize
    }

    /// End of the IP packet in the frame (Ethernet padding lies beyond it).
    #[inline]
    #[must_use]
    pub const fn ip_end(&self) -> usize {
        self.ip_end as usize
    }

    /// Set when the packet is an IP fragment.
    #[inline]
    #[must_use]
    pub fn fragment(&self) -> Option<Fragment> {
        self.fragment.unpack()
    }

    /// Is the packet an IP fragment? (`fragment().is_some()`, without
    /// unpacking it.)
    #[inline]
    #[must_use]
    pub const fn is_fragment(&self) -> bool {
        self.fragment.flags & PackedFragment::PRESENT != 0
    }

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

/// Shows the fields as the accessors give them.
impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("family", &self.family)
            .field("l3", &self.l3())
            .field("ip_end", &self.ip_end())
            .field("src", &crate::flow::ip_from16(self.src))
            .field("dst", &crate::flow::ip_from16(self.dst))
            .field("ttl", &self.ttl)
            .field("fragment", &self.fragment())
            .field("l4", &self.l4)
            .finish()
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
/// The common frames take the fast path ([`parse_fast`]); the rest,
/// [`parse_full`]. Both give the same answer for any frame the fast path
/// takes.
///
/// # Errors
/// A [`DropReason`] naming the first layer that is truncated or inconsistent.
#[inline]
pub fn parse(frame: &[u8]) -> Result<Option<Parsed>, DropReason> {
    fast(frame, parse_full)
}

/// The fast path alone: fixed-offset header views, lengths checked once.
///
/// `Some(Some(p))` for a valid unfragmented TCP, UDP or SCTP packet over
/// IPv4 (options allowed) or IPv6 (no extension headers), behind Ethernet and
/// at most one 802.1Q tag; `Some(None)` for a frame that is plainly not ours
/// (another EtherType, or a valid unfragmented IP packet of a protocol we do
/// not balance and that needs no look: not ICMP, not an IPv4 AH, not an IPv6
/// extension header). `None` for everything else: the frame needs
/// [`parse_full`], which decides it (drop reasons included). Exposed for the
/// test and the fuzz target that hold it to [`parse_full`]'s answers.
#[must_use]
pub fn parse_fast(frame: &[u8]) -> Option<Option<Parsed>> {
    let declined = std::cell::Cell::new(false);
    let answer = fast(frame, |_| {
        declined.set(true);
        Ok(None)
    });
    match answer {
        Ok(p) if !declined.get() => Some(p),
        _ => None,
    }
}

/// The fast path; every frame it does not take goes to `decline` (the full
/// path, in [`parse`]), so that its answer is built once, in place.
#[inline(always)] // reason: one body for `parse` and `parse_fast`, no copy of the answer
fn fast<D>(frame: &[u8], decline: D) -> Result<Option<Parsed>, DropReason>
where
    D: FnOnce(&[u8]) -> Result<Option<Parsed>, DropReason>,
{
    macro_rules! or_decline {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return decline(frame),
            }
        };
    }
    if frame.len() > MAX_FRAME {
        return decline(frame);
    }
    let eth = or_decline!(Ethernet::new_checked(frame));
    let l3 = eth.l3();
    let ip = or_decline!(frame.get(l3..));
    match eth.ether_type() {
        view::ETHERTYPE_IPV4 => {
            let h = or_decline!(Ipv4::new_checked(ip));
            if h.is_fragment() || (h.header_len() > 20 && check_ipv4_options(h.options()).is_err())
            {
                return decline(frame);
            }
            let l4 = l3 + h.header_len();
            let ip_end = l3 + h.total_len();
            let Some(proto) = Proto::from_ip_number(h.protocol()) else {
                return if needs_full_path(h.protocol()) {
                    decline(frame)
                } else {
                    Ok(None)
                };
            };
            let flow = or_decline!(fast_flow(frame.get(l4..ip_end), l4, proto, Family::V4));
            Ok(Some(Parsed {
                src: v4_to_16(h.src()),
                dst: v4_to_16(h.dst()),
                fragment: PackedFragment::NONE,
                l4: L4::Flow(flow),
                l3: l3 as u16,
                ip_end: ip_end as u16,
                family: Family::V4,
                ttl: h.ttl(),
            }))
        }
        view::ETHERTYPE_IPV6 => {
            let h = or_decline!(Ipv6::new_checked(ip));
            let (src, dst) = (h.src(), h.dst());
            if is_v4_mapped(&src) || is_v4_mapped(&dst) {
                return decline(frame);
            }
            let l4 = l3 + 40;
            let ip_end = l4 + h.payload_len();
            let Some(proto) = Proto::from_ip_number(h.next_header()) else {
                return if needs_full_path(h.next_header()) {
                    decline(frame)
                } else {
                    Ok(None)
                };
            };
            let flow = or_decline!(fast_flow(frame.get(l4..ip_end), l4, proto, Family::V6));
            Ok(Some(Parsed {
                src,
                dst,
                fragment: PackedFragment::NONE,
                l4: L4::Flow(flow),
                l3: l3 as u16,
                ip_end: ip_end as u16,
                family: Family::V6,
                ttl: h.hop_limit(),
            }))
        }
        // Another EtherType, or a second tag.
        _ => Ok(None),
    }
}

/// For a valid, unfragmented IP packet whose protocol (or first Next
/// Header) is not TCP, UDP or SCTP: must the full path look further (ICMP,
/// an extension header, AH), or is it simply not ours?
#[inline]
fn needs_full_path(proto: u8) -> bool {
    matches!(
        proto,
        IP_ICMP
            | IP_ICMPV6
            | EXT_HOP_BY_HOP
            | EXT_ROUTING
            | EXT_FRAGMENT
            | EXT_AUTH
            | EXT_DEST_OPTS
    )
}

/// The transport part of an unfragmented packet (`seg`: from the transport
/// header to the IP packet's end), or `None` when the full path must name
/// what is wrong.
#[inline(always)] // reason: one call site per family; no copy of the result
fn fast_flow(seg: Option<&[u8]>, offset: usize, proto: Proto, family: Family) -> Option<FlowL4> {
    let t = Transport::new_checked(seg?, proto)?;
    let csum = match (proto, family) {
        (Proto::Tcp, _) => L4Csum::Tcp,
        (Proto::Udp, Family::V4) => L4Csum::Udp,
        (Proto::Udp, Family::V6) if t.udp_checksum() == 0 => return None,
        (Proto::Udp, Family::V6) => L4Csum::Udp6,
        (Proto::Sctp, _) => L4Csum::None,
    };
    Some(FlowL4 {
        offset: offset as u16,
        proto,
        src_port: t.src_port(),
        dst_port: t.dst_port(),
        tcp_flags: t.tcp_flags(),
        csum,
    })
}

/// The full path: etherparse layer by layer, the IPv6 extension-header walk,
/// fragments and ICMP errors. [`parse`] takes it for every frame
/// [`parse_fast`] declines; exposed as the reference the fast path is tested
/// against.
///
/// # Errors
/// A [`DropReason`] naming the first layer that is truncated or inconsistent.
#[inline(never)] // reason: keeps `parse`, inlined into the batch loop, small
pub fn parse_full(frame: &[u8]) -> Result<Option<Parsed>, DropReason> {
    if frame.len() > MAX_FRAME {
        return Err(DropReason::BadFrameLength);
    }
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
        l3: l3 as u16,
        ip_end: ip_end as u16,
        src: v4_to_16(h.source()),
        dst: v4_to_16(h.destination()),
        ttl: h.ttl(),
        fragment: PackedFragment::pack(fragment),
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
        l3: l3 as u16,
        ip_end: ip_end as u16,
        src: h.source(),
        dst: h.destination(),
        ttl: h.hop_limit(),
        fragment: PackedFragment::pack(fragment),
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
    if let Some(f) = parsed.fragment().filter(|f| !f.first) {
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
        let whole = !parsed.is_fragment();
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
        if parsed.is_fragment() {
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
                offset: offset as u16,
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
                offset: offset as u16,
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
                offset: offset as u16,
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
    let (proto, inner_l4_rel, whole) = match family {
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
            // Addresses at 12..20 and ports at ihl..ihl + 4, all within
            // `inner`: `Quoted::tuple` reads them there.
            let whole = usize::from(be16(inner, 2).unwrap_or(0)) == inner.len();
            (proto, ihl, whole)
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
            // Addresses at 8..40 and ports at 40..44, within `inner`.
            let whole = 40 + usize::from(be16(inner, 4).unwrap_or(0)) == inner.len();
            (proto, 40, whole)
        }
    };
    Ok(Some(IcmpError {
        offset: offset as u16,
        quoted: Quoted {
            l3: inner_l3 as u16,
            l4: (inner_l3 + inner_l4_rel) as u16,
            end: end as u16,
            proto,
            family,
            whole,
        },
    }))
}
