//! Rejects: a frame for a service without endpoints is rewritten in place into
//! the answer kube-proxy's REJECT rules give: a TCP RST for TCP, an ICMP (or
//! ICMPv6) port unreachable for UDP and SCTP, from the service address back to
//! the sender, with the Ethernet addresses swapped.
//!
//! Owns: [`reject_in_place`], and [`too_big_in_place`], the ICMP
//! fragmentation needed (RFC 1191) / ICMPv6 packet too big (RFC 4443 §3.2)
//! answer to a packet that would exceed the MTU once encapsulated for DSR.
//! Must never: answer an answer (a RST, an ICMP error) or a broadcast or
//! multicast source (RFC 1812 §4.3.2.7), or write past the buffer.

use super::checksum;
use super::parse::{tcp_flags, Family, FlowL4, Parsed};
use super::rewrite::swap_macs;
use crate::flow::Proto;
use crate::verdict::DropReason;

/// TTL / hop limit of generated packets (Linux's default).
const TTL: u8 = 64;
/// IPv4 ICMP errors fit in 576 bytes (RFC 1812 §4.3.2.3).
const ICMP4_MAX: usize = 576;
/// ICMPv6 errors fit in the minimum MTU (RFC 4443 §2.4(c)).
const ICMP6_MAX: usize = 1280;

fn is_unicast_source(p: &Parsed) -> bool {
    let a = &p.src;
    match p.family {
        Family::V4 => {
            let o = &a[12..16];
            !(o[0] == 0 || o[0] >= 224 || o == [255, 255, 255, 255])
        }
        Family::V6 => !(a[0] == 0xff || a == &[0u8; 16]),
    }
}

/// Rewrites `buf[..len]`, parsed as `p` with transport `f`, into a reject.
/// Returns the new frame length.
///
/// # Errors
/// [`DropReason::NoEndpoints`] when the frame must not be answered (a RST, a
/// non-unicast source); [`DropReason::BufferTooSmall`] when the answer does not
/// fit in `buf`.
pub fn reject_in_place(
    buf: &mut [u8],
    len: usize,
    p: &Parsed,
    f: &FlowL4,
) -> Result<usize, DropReason> {
    if !is_unicast_source(p) || len > buf.len() {
        return Err(DropReason::NoEndpoints);
    }
    match f.proto {
        Proto::Tcp => tcp_rst(buf, p, f),
        Proto::Udp | Proto::Sctp => icmp_error(buf, p, IcmpKind::PortUnreachable),
    }
}

/// Rewrites `buf[..len]`, parsed as `p`, into an ICMP destination
/// unreachable / fragmentation needed (type 3 code 4, next-hop MTU `mtu`,
/// RFC 1191 §4) or an ICMPv6 packet too big (type 2, MTU `mtu`, RFC 4443
/// §3.2), from the packet's destination back to its sender, quoting as much
/// of it as fits. Returns the new frame length.
///
/// # Errors
/// [`DropReason::EncapTooBig`] when the frame must not be answered (a
/// non-unicast source); [`DropReason::BufferTooSmall`] when the answer does
/// not fit in `buf`.
pub fn too_big_in_place(
    buf: &mut [u8],
    len: usize,
    p: &Parsed,
    mtu: u16,
) -> Result<usize, DropReason> {
    if !is_unicast_source(p) || len > buf.len() {
        return Err(DropReason::EncapTooBig);
    }
    icmp_error(buf, p, IcmpKind::TooBig(mtu))
}

/// The ICMP errors the gateway writes.
#[derive(Clone, Copy)]
enum IcmpKind {
    /// Destination (port) unreachable.
    PortUnreachable,
    /// Fragmentation needed / packet too big, with the MTU to use.
    TooBig(u16),
}

fn get4(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// RFC 9293 §3.10.7.1: the reset for a segment to a closed port.
fn tcp_rst(buf: &mut [u8], p: &Parsed, f: &FlowL4) -> Result<usize, DropReason> {
    if f.tcp_flags & tcp_flags::RST != 0 {
        return Err(DropReason::NoEndpoints);
    }
    let l4 = f.offset();
    let seq = get4(buf, l4 + 4);
    let ack = get4(buf, l4 + 8);
    let data_offset = usize::from(buf.get(l4 + 12).copied().unwrap_or(0x50) >> 4) * 4;
    let seg_len = p.ip_end().saturating_sub(l4 + data_offset) as u32
        + u32::from(f.tcp_flags & tcp_flags::SYN != 0)
        + u32::from(f.tcp_flags & tcp_flags::FIN != 0);
    // If the segment has ACK: <SEQ=SEG.ACK><CTL=RST>; otherwise
    // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    let (rst_seq, rst_ack, flags) = if f.tcp_flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        (
            0,
            seq.wrapping_add(seg_len),
            tcp_flags::RST | tcp_flags::ACK,
        )
    };
    let ip_len = match p.family {
        Family::V4 => 20,
        Family::V6 => 40,
    };
    let new_l4 = p.l3() + ip_len;
    let new_len = new_l4 + 20;
    if new_len > buf.len() {
        return Err(DropReason::BufferTooSmall);
    }
    write_ip_header(buf, p, ip_len, 20, 6);
    let t = &mut buf[new_l4..new_len];
    t[0..2].copy_from_slice(&f.dst_port.to_be_bytes());
    t[2..4].copy_from_slice(&f.src_port.to_be_bytes());
    t[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    t[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..20].fill(0); // window, checksum, urgent pointer
    let c = l4_checksum(buf, p, new_l4, new_len, 6);
    buf[new_l4 + 16..new_l4 + 18].copy_from_slice(&c.to_be_bytes());
    swap_macs(buf).map_err(|_| DropReason::BufferTooSmall)?;
    Ok(new_len)
}

/// RFC 792 / RFC 4443 §3.1, §3.2: an ICMP error of `kind` quoting as much of
/// the offending packet as fits.
fn icmp_error(buf: &mut [u8], p: &Parsed, kind: IcmpKind) -> Result<usize, DropReason> {
    let (ip_len, max, min_quote) = match p.family {
        Family::V4 => (
            20,
            ICMP4_MAX,
            usize::from(buf.get(p.l3()).map_or(5, |b| b & 0x0f)) * 4 + 8,
        ),
        Family::V6 => (40, ICMP6_MAX, 48),
    };
    let orig = p.ip_end() - p.l3();
    let room = buf.len().saturating_sub(p.l3() + ip_len + 8);
    let quote = orig.min(max - ip_len - 8).min(room);
    if quote < min_quote.min(orig) {
        return Err(DropReason::BufferTooSmall);
    }
    let icmp = p.l3() + ip_len;
    let new_len = icmp + 8 + quote;
    buf.copy_within(p.l3()..p.l3() + quote, icmp + 8);
    let (icmp_proto, icmp_type, icmp_code, rest) = match (p.family, kind) {
        (Family::V4, IcmpKind::PortUnreachable) => (1, 3, 3, [0; 4]),
        (Family::V6, IcmpKind::PortUnreachable) => (58, 1, 4, [0; 4]),
        // RFC 1191 §4: unused (16 bits), then the next-hop MTU.
        (Family::V4, IcmpKind::TooBig(mtu)) => {
            let m = mtu.to_be_bytes();
            (1, 3, 4, [0, 0, m[0], m[1]])
        }
        // RFC 4443 §3.2: the MTU as 32 bits.
        (Family::V6, IcmpKind::TooBig(mtu)) => (58, 2, 0, u32::from(mtu).to_be_bytes()),
    };
    write_ip_header(buf, p, ip_len, 8 + quote, icmp_proto);
    buf[icmp..icmp + 4].copy_from_slice(&[icmp_type, icmp_code, 0, 0]);
    buf[icmp + 4..icmp + 8].copy_from_slice(&rest);
    let c = match p.family {
        Family::V4 => checksum::finish(checksum::sum_bytes(0, &buf[icmp..new_len])),
        Family::V6 => l4_checksum(buf, p, icmp, new_len, 58),
    };
    buf[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    swap_macs(buf).map_err(|_| DropReason::BufferTooSmall)?;
    Ok(new_len)
}

/// Writes a fresh IP header at `p.l3()` from the service address (the original
/// destination) to the sender.
fn write_ip_header(buf: &mut [u8], p: &Parsed, ip_len: usize, payload_len: usize, proto: u8) {
    let h = &mut buf[p.l3()..p.l3() + ip_len];
    match p.family {
        Family::V4 => {
            let total = (ip_len + payload_len) as u16;
            h[0] = 0x45;
            h[1] = 0;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[4..6].fill(0); // identification
            h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
            h[8] = TTL;
            h[9] = proto;
            h[10..12].fill(0);
            h[12..16].copy_from_slice(&p.dst[12..16]);
            h[16..20].copy_from_slice(&p.src[12..16]);
            let c = checksum::ipv4_header_checksum(h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        Family::V6 => {
            h[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
            h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
            h[6] = proto;
            h[7] = TTL;
            h[8..24].copy_from_slice(&p.dst);
            h[24..40].copy_from_slice(&p.src);
        }
    }
}

/// Full transport checksum of `buf[from..to]` for the reversed addresses.
fn l4_checksum(buf: &[u8], p: &Parsed, from: usize, to: usize, proto: u8) -> u16 {
    let seg = &buf[from..to];
    match p.family {
        Family::V4 => {
            let mut s = [0u8; 4];
            let mut d = [0u8; 4];
            s.copy_from_slice(&p.dst[12..16]);
            d.copy_from_slice(&p.src[12..16]);
            checksum::l4_checksum_v4(s, d, proto, seg)
        }
        Family::V6 => checksum::l4_checksum_v6(&p.dst, &p.src, proto, seg),
    }
}
