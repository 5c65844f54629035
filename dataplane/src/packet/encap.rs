//! IP-in-IP encapsulation for direct server return: IPv4 in IPv4 (RFC 2003)
//! and IPv6 in IPv6 (RFC 2473), written in place.
//!
//! Owns: [`encapsulate`], which puts an outer IP header (the gateway → the
//! backend) in front of a packet, between its Ethernet header and its own IP
//! header, and [`outer_len`]. The inner packet is left as the client sent it
//! (source: the client, destination: the VIP and service port), except for
//! its TTL or hop limit, which the caller has already decremented as a router
//! does. The backend decapsulates it (an `ipip` or `ip6tnl` device) and,
//! holding the VIP on a local interface, answers the client directly.
//!
//! Must never: allocate, panic, or write past the buffer. The packet moves
//! `outer_len` bytes towards the end of the buffer (a copy of the IP packet;
//! the AF_XDP frames have room for it), and Ethernet padding is dropped.

use super::checksum;
use super::parse::Family;
use super::rewrite::RewriteError;
use crate::flow::Addr16;

/// TTL / hop limit of the outer header (Linux's default, and Katran's).
pub const OUTER_TTL: u8 = 64;
/// IP protocol number of IPv4 in IP (RFC 2003 §3).
pub const IPPROTO_IPIP: u8 = 4;
/// Next header of IPv6 in IPv6 (RFC 2473 §3).
pub const IPPROTO_IPV6: u8 = 41;

/// Bytes the outer header adds in `family`.
#[must_use]
pub const fn outer_len(family: Family) -> usize {
    match family {
        Family::V4 => 20,
        Family::V6 => 40,
    }
}

/// Encapsulates the IP packet `frame[l3..ip_end]` in an outer header from
/// `src` to `dst` of the same family, in place. Returns the new frame length
/// (`ip_end + outer_len`).
///
/// IPv4 outer header (RFC 2003 §3.1): TOS, identification and the Don't
/// Fragment bit copied from the inner header, TTL [`OUTER_TTL`], protocol 4.
/// IPv6 (RFC 2473 §3, §6): traffic class and flow label copied, next header 41,
/// hop limit [`OUTER_TTL`]; no tunnel encapsulation limit option.
///
/// # Errors
/// `OutOfBounds` when the frame does not hold the inner header, or the
/// buffer has no room for the larger packet; nothing is written then.
pub fn encapsulate(
    frame: &mut [u8],
    family: Family,
    l3: usize,
    ip_end: usize,
    src: &Addr16,
    dst: &Addr16,
) -> Result<usize, RewriteError> {
    let outer = outer_len(family);
    let inner_len = ip_end.checked_sub(l3).ok_or(RewriteError::OutOfBounds)?;
    let new_end = ip_end.checked_add(outer).ok_or(RewriteError::OutOfBounds)?;
    if inner_len < outer || new_end > frame.len() {
        return Err(RewriteError::OutOfBounds);
    }
    frame.copy_within(l3..ip_end, l3 + outer);
    let inner = l3 + outer;
    match family {
        Family::V4 => {
            let total = u16::try_from(inner_len + 20).map_err(|_| RewriteError::OutOfBounds)?;
            let tos = frame[inner + 1];
            let id = [frame[inner + 4], frame[inner + 5]];
            let df = frame[inner + 6] & 0x40;
            let h = &mut frame[l3..l3 + 20];
            h[0] = 0x45;
            h[1] = tos;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[4..6].copy_from_slice(&id);
            h[6] = df;
            h[7] = 0;
            h[8] = OUTER_TTL;
            h[9] = IPPROTO_IPIP;
            h[10..12].fill(0);
            h[12..16].copy_from_slice(&src[12..16]);
            h[16..20].copy_from_slice(&dst[12..16]);
            let c = checksum::ipv4_header_checksum(h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        Family::V6 => {
            let payload = u16::try_from(inner_len).map_err(|_| RewriteError::OutOfBounds)?;
            let mut first = [0u8; 4];
            first.copy_from_slice(&frame[inner..inner + 4]);
            let h = &mut frame[l3..l3 + 40];
            // Version 6, the inner traffic class and flow label.
            h[0..4].copy_from_slice(&first);
            h[0] = (h[0] & 0x0f) | 0x60;
            h[4..6].copy_from_slice(&payload.to_be_bytes());
            h[6] = IPPROTO_IPV6;
            h[7] = OUTER_TTL;
            h[8..24].copy_from_slice(src);
            h[24..40].copy_from_slice(dst);
        }
    }
    Ok(new_end)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;
    use crate::flow::{addr16, v4_to_16};
    use crate::testkit::{self, L4Spec, Tcp};
    use etherparse::{NetSlice, SlicedPacket};

    #[test]
    fn ipv4_in_ipv4_keeps_the_inner_packet_and_checksums() {
        let f = testkit::client_frame(
            v4_to_16([198, 18, 0, 1]),
            40_000,
            v4_to_16([198, 19, 0, 10]),
            80,
            L4Spec::Tcp(Tcp::syn(1)),
            b"hello",
        );
        let (mut buf, len) = testkit::to_buf(&f);
        let inner_before = buf[14..len].to_vec();
        let gw = v4_to_16([198, 18, 2, 1]);
        let be = v4_to_16([198, 18, 2, 11]);
        let n = encapsulate(&mut buf, Family::V4, 14, len, &gw, &be).unwrap();
        assert_eq!(n, len + 20);
        assert_eq!(&buf[34..n], &inner_before[..], "inner packet unchanged");
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(NetSlice::Ipv4(outer)) = p.net else {
            panic!("outer IPv4")
        };
        let h = outer.header();
        assert_eq!(h.source(), [198, 18, 2, 1]);
        assert_eq!(h.destination(), [198, 18, 2, 11]);
        assert_eq!(h.protocol().0, IPPROTO_IPIP);
        assert_eq!(usize::from(h.total_len()), n - 14);
        assert_eq!(h.ttl(), OUTER_TTL);
        assert!(h.dont_fragment(), "DF copied from the inner header");
        assert_eq!(
            h.header_checksum(),
            checksum::ipv4_header_checksum(&buf[14..34])
        );
    }

    #[test]
    fn ipv6_in_ipv6_and_refusals() {
        let c = addr16("2001:2::1".parse().unwrap());
        let v = addr16("2001:2:100::1".parse().unwrap());
        let f = testkit::client_frame(c, 40_000, v, 80, L4Spec::Tcp(Tcp::syn(1)), b"");
        let (mut buf, len) = testkit::to_buf(&f);
        let gw = addr16("2001:2:2::1".parse().unwrap());
        let be = addr16("2001:2:2::11".parse().unwrap());
        let n = encapsulate(&mut buf, Family::V6, 14, len, &gw, &be).unwrap();
        assert_eq!(n, len + 40);
        assert_eq!(buf[14] >> 4, 6);
        assert_eq!(buf[14 + 6], IPPROTO_IPV6);
        assert_eq!(
            usize::from(u16::from_be_bytes([buf[18], buf[19]])),
            len - 14
        );
        assert_eq!(&buf[14 + 8..14 + 24], &gw);
        assert_eq!(&buf[14 + 24..14 + 40], &be);
        assert_eq!(buf[54] >> 4, 6, "inner header follows");
        // No room: the buffer is exactly the frame.
        let (mut small, len) = testkit::to_buf(&f);
        small.truncate(len);
        let before = small.clone();
        assert_eq!(
            encapsulate(&mut small, Family::V6, 14, len, &gw, &be),
            Err(RewriteError::OutOfBounds)
        );
        assert_eq!(small, before, "nothing written");
    }
}
