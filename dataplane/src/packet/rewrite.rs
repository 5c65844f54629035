//! In-place header rewrites with incremental checksum updates (RFC 1624).
//!
//! Owns: writing new MAC addresses, IP addresses, ports, TTL and hop limit
//! into a frame, and keeping every checksum that covers the changed bytes
//! correct without summing the packet again: the IPv4 header checksum, the
//! TCP, UDP and ICMPv6 checksums through their pseudo-headers, and (on
//! request, since it cannot be updated incrementally) SCTP's CRC32c.
//!
//! Must never: panic, allocate, parse, or decide policy. Offsets come from the
//! parser (`l3`: the IP header's offset in the frame, `l4`: the transport
//! header's); every function checks them against the frame and returns
//! [`RewriteError::OutOfBounds`] rather than indexing out of it. Every function
//! checks all of its bounds before it writes, so an `Err` leaves the frame
//! untouched. Whether a packet with TTL 0 is dropped, or a checksum verified,
//! is the pipeline's business, not this module's.

use super::checksum::{udp_wire, update16, update32, update_words, update_words_odd};

/// Ethernet destination address (IEEE 802.3 §3.2.4).
const ETH_DST: usize = 0;
/// Ethernet source address (IEEE 802.3 §3.2.5).
const ETH_SRC: usize = 6;
/// Length of the two Ethernet addresses together.
const ETH_ADDRS_LEN: usize = 12;
/// IPv4 time to live, followed by protocol (RFC 791 §3.1).
const IPV4_TTL: usize = 8;
/// IPv4 header checksum (RFC 791 §3.1).
const IPV4_CSUM: usize = 10;
/// IPv4 source address (RFC 791 §3.1).
const IPV4_SRC: usize = 12;
/// IPv4 destination address (RFC 791 §3.1).
const IPV4_DST: usize = 16;
/// IPv6 hop limit (RFC 8200 §3).
const IPV6_HOP_LIMIT: usize = 7;
/// IPv6 source address (RFC 8200 §3).
const IPV6_SRC: usize = 8;
/// IPv6 destination address (RFC 8200 §3).
const IPV6_DST: usize = 24;
/// Source port of TCP, UDP and SCTP (RFC 9293 §3.1, RFC 768, RFC 9260 §3.1).
const L4_SRC_PORT: usize = 0;
/// Destination port of TCP, UDP and SCTP (RFC 9293 §3.1, RFC 768, RFC 9260 §3.1).
const L4_DST_PORT: usize = 2;
/// TCP checksum (RFC 9293 §3.1).
const TCP_CSUM: usize = 16;
/// UDP checksum (RFC 768).
const UDP_CSUM: usize = 6;
/// ICMPv6 checksum (RFC 4443 §2.1).
const ICMPV6_CSUM: usize = 2;
/// SCTP checksum (RFC 9260 §3.1).
const SCTP_CSUM: usize = 8;
/// Length of the SCTP common header (RFC 9260 §3.1).
const SCTP_COMMON_HEADER_LEN: usize = 12;

/// Why a rewrite was refused; the frame is left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// An offset, or a field at it, lies outside the frame.
    #[error("offset out of the frame's bounds")]
    OutOfBounds,
    /// The TTL or hop limit is already zero, so it cannot be decremented.
    #[error("TTL or hop limit already zero")]
    TtlExpired,
    /// The transport has no ports at `l4+0`/`l4+2` (ICMPv6).
    #[error("transport has no ports")]
    NoPorts,
    /// The old and new byte runs given to a checksum adjustment differ in length.
    #[error("old and new bytes differ in length")]
    LengthMismatch,
    /// A checksum that must be right before a rewrite (SCTP's CRC32c) is not.
    #[error("checksum does not match the packet")]
    BadChecksum,
}

/// How the transport checksum depends on what we rewrite.
///
/// Addresses are 16-bit aligned in every pseudo-header and ports are at even
/// offsets of the transport header, so RFC 1624 applies word by word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// TCP: checksum at l4+16, covers the pseudo-header (RFC 9293 §3.1).
    Tcp,
    /// UDP over IPv4: checksum at l4+6, covers the pseudo-header; zero means "none" and stays zero, a result of 0 is written as 0xFFFF (RFC 768).
    Udp,
    /// UDP over IPv6: checksum at l4+6, covers the pseudo-header and is mandatory (RFC 8200 §8.1); a result of 0 is written as 0xFFFF, a zero on input is not special-cased.
    Udp6,
    /// ICMPv6: checksum at l4+2, covers the pseudo-header (RFC 4443 §2.3).
    Icmpv6,
    /// No transport checksum depends on the IP addresses (SCTP's CRC32c does not cover them; ICMPv4's does not; or the L4 header, or its checksum field, is not in this packet, e.g. a non-first fragment or a truncated quote in an ICMP error).
    None,
}

impl L4Csum {
    /// Offset of the checksum field from the transport header, if there is one to update.
    #[must_use]
    pub const fn field_offset(self) -> Option<usize> {
        match self {
            Self::Tcp => Some(TCP_CSUM),
            Self::Udp | Self::Udp6 => Some(UDP_CSUM),
            Self::Icmpv6 => Some(ICMPV6_CSUM),
            Self::None => None,
        }
    }
}

/// `base + delta`, or `OutOfBounds` if it overflows.
fn offset(base: usize, delta: usize) -> Result<usize, RewriteError> {
    base.checked_add(delta).ok_or(RewriteError::OutOfBounds)
}

/// Copies the `N` bytes at `at` out of the frame.
fn read<const N: usize>(frame: &[u8], at: usize) -> Result<[u8; N], RewriteError> {
    let bytes = frame
        .get(at..offset(at, N)?)
        .ok_or(RewriteError::OutOfBounds)?;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

/// Reads the big-endian 16-bit word at `at`.
fn read16(frame: &[u8], at: usize) -> Result<u16, RewriteError> {
    read::<2>(frame, at).map(u16::from_be_bytes)
}

/// Writes `bytes` into the frame at `at`.
fn write(frame: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), RewriteError> {
    frame
        .get_mut(at..offset(at, bytes.len())?)
        .ok_or(RewriteError::OutOfBounds)?
        .copy_from_slice(bytes);
    Ok(())
}

/// Writes the big-endian 16-bit word `value` at `at`.
fn write16(frame: &mut [u8], at: usize, value: u16) -> Result<(), RewriteError> {
    write(frame, at, &value.to_be_bytes())
}

/// A checksum field's new value, worked out before anything is written.
#[derive(Debug, Clone, Copy)]
struct CsumWrite {
    /// Offset of the field in the frame.
    at: usize,
    /// New value of the field.
    value: u16,
}

/// Works out the transport checksum after `old` becomes `new` in the pseudo-header or header (RFC 1624 eqn. 3).
fn plan_l4(
    frame: &[u8],
    l4: Option<(usize, L4Csum)>,
    old: &[u8],
    new: &[u8],
) -> Result<Option<CsumWrite>, RewriteError> {
    let Some((l4, kind)) = l4 else {
        return Ok(None);
    };
    let Some(field) = kind.field_offset() else {
        return Ok(None);
    };
    let at = offset(l4, field)?;
    let csum = read16(frame, at)?;
    let value = match kind {
        L4Csum::Udp if csum == 0 => return Ok(None),
        L4Csum::Udp | L4Csum::Udp6 => udp_wire(update_words(csum, old, new)),
        L4Csum::Tcp | L4Csum::Icmpv6 | L4Csum::None => update_words(csum, old, new),
    };
    Ok(Some(CsumWrite { at, value }))
}

/// Writes a checksum worked out by [`plan_l4`], if any.
fn apply(frame: &mut [u8], write_csum: Option<CsumWrite>) -> Result<(), RewriteError> {
    match write_csum {
        Some(CsumWrite { at, value }) => write16(frame, at, value),
        None => Ok(()),
    }
}

/// Sets the Ethernet source (bytes 6..12) and destination (bytes 0..6) addresses (IEEE 802.3 §3.2).
///
/// # Errors
/// `OutOfBounds` if the frame is shorter than 12 bytes.
pub fn set_macs(frame: &mut [u8], src: [u8; 6], dst: [u8; 6]) -> Result<(), RewriteError> {
    if frame.len() < ETH_ADDRS_LEN {
        return Err(RewriteError::OutOfBounds);
    }
    write(frame, ETH_DST, &dst)?;
    write(frame, ETH_SRC, &src)
}

/// Swaps the Ethernet source and destination addresses, to send a frame back where it came from.
///
/// # Errors
/// `OutOfBounds` if the frame is shorter than 12 bytes.
pub fn swap_macs(frame: &mut [u8]) -> Result<(), RewriteError> {
    let addrs = frame
        .get_mut(..ETH_ADDRS_LEN)
        .ok_or(RewriteError::OutOfBounds)?;
    let (dst, src) = addrs.split_at_mut(ETH_SRC);
    dst.swap_with_slice(src);
    Ok(())
}

/// Writes an IPv4 address at `l3 + field`, updating the header and transport checksums (RFC 1624 eqn. 3).
fn set_ipv4_addr(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    field: usize,
    new: [u8; 4],
) -> Result<(), RewriteError> {
    let at = offset(l3, field)?;
    let old = read::<4>(frame, at)?;
    let ip_csum_at = offset(l3, IPV4_CSUM)?;
    let ip_csum = read16(frame, ip_csum_at)?;
    let l4_csum = plan_l4(frame, l4, &old, &new)?;
    write(frame, at, &new)?;
    write16(frame, ip_csum_at, update32(ip_csum, old, new))?;
    apply(frame, l4_csum)
}

/// Sets the IPv4 source address (l3+12) and updates the header checksum and the transport checksum (RFC 791 §3.1, RFC 1624).
///
/// `l4` is the transport header's offset and checksum kind; `None` (or
/// `L4Csum::None`) leaves the transport untouched. Over IPv4, UDP is
/// [`L4Csum::Udp`]: a zero checksum stays zero.
///
/// # Errors
/// `OutOfBounds` if the address, the header checksum or the transport
/// checksum field lies outside the frame; nothing is written then.
pub fn set_ipv4_src(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    new: [u8; 4],
) -> Result<(), RewriteError> {
    set_ipv4_addr(frame, l3, l4, IPV4_SRC, new)
}

/// Sets the IPv4 destination address (l3+16) and updates the header checksum and the transport checksum (RFC 791 §3.1, RFC 1624).
///
/// See [`set_ipv4_src`] for `l4`.
///
/// # Errors
/// `OutOfBounds` if the address, the header checksum or the transport
/// checksum field lies outside the frame; nothing is written then.
pub fn set_ipv4_dst(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    new: [u8; 4],
) -> Result<(), RewriteError> {
    set_ipv4_addr(frame, l3, l4, IPV4_DST, new)
}

/// Writes an IPv6 address at `l3 + field`, updating the transport checksum (RFC 8200 §8.1, RFC 1624 eqn. 3).
fn set_ipv6_addr(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    field: usize,
    new: &[u8; 16],
) -> Result<(), RewriteError> {
    let at = offset(l3, field)?;
    let old = read::<16>(frame, at)?;
    let l4_csum = plan_l4(frame, l4, &old, new)?;
    write(frame, at, new)?;
    apply(frame, l4_csum)
}

/// Sets the IPv6 source address (l3+8) and updates the transport checksum; IPv6 has no header checksum (RFC 8200 §3, §8.1).
///
/// Over IPv6, UDP is [`L4Csum::Udp6`] (a zero UDP checksum is invalid there
/// and is dropped by the pipeline before any rewrite).
///
/// # Errors
/// `OutOfBounds` if the address or the transport checksum field lies
/// outside the frame; nothing is written then.
pub fn set_ipv6_src(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    new: [u8; 16],
) -> Result<(), RewriteError> {
    set_ipv6_addr(frame, l3, l4, IPV6_SRC, &new)
}

/// Sets the IPv6 destination address (l3+24) and updates the transport checksum; IPv6 has no header checksum (RFC 8200 §3, §8.1).
///
/// See [`set_ipv6_src`] for `l4`.
///
/// # Errors
/// `OutOfBounds` if the address or the transport checksum field lies
/// outside the frame; nothing is written then.
pub fn set_ipv6_dst(
    frame: &mut [u8],
    l3: usize,
    l4: Option<(usize, L4Csum)>,
    new: [u8; 16],
) -> Result<(), RewriteError> {
    set_ipv6_addr(frame, l3, l4, IPV6_DST, &new)
}

/// Writes a port at `l4 + field`, updating the transport checksum (RFC 1624 eqn. 3).
fn set_port(
    frame: &mut [u8],
    l4: usize,
    csum: L4Csum,
    field: usize,
    new: u16,
) -> Result<(), RewriteError> {
    if csum == L4Csum::Icmpv6 {
        return Err(RewriteError::NoPorts);
    }
    let at = offset(l4, field)?;
    let old = read::<2>(frame, at)?;
    let new = new.to_be_bytes();
    let l4_csum = plan_l4(frame, Some((l4, csum)), &old, &new)?;
    write(frame, at, &new)?;
    apply(frame, l4_csum)
}

/// Sets the TCP, UDP or SCTP source port (l4+0) and updates the TCP or UDP checksum (RFC 1624).
///
/// With `L4Csum::None` (SCTP) only the port is written: call
/// [`sctp_update_crc`] once all rewrites of the packet are done.
///
/// # Errors
/// `NoPorts` for `L4Csum::Icmpv6`; `OutOfBounds` if the port or the
/// checksum field lies outside the frame. Nothing is written then.
pub fn set_src_port(
    frame: &mut [u8],
    l4: usize,
    csum: L4Csum,
    new: u16,
) -> Result<(), RewriteError> {
    set_port(frame, l4, csum, L4_SRC_PORT, new)
}

/// Sets the TCP, UDP or SCTP destination port (l4+2) and updates the TCP or UDP checksum (RFC 1624).
///
/// See [`set_src_port`] for SCTP.
///
/// # Errors
/// `NoPorts` for `L4Csum::Icmpv6`; `OutOfBounds` if the port or the
/// checksum field lies outside the frame. Nothing is written then.
pub fn set_dst_port(
    frame: &mut [u8],
    l4: usize,
    csum: L4Csum,
    new: u16,
) -> Result<(), RewriteError> {
    set_port(frame, l4, csum, L4_DST_PORT, new)
}

/// Recomputes the CRC32c of the SCTP packet `frame[l4..end]` and writes it at l4+8 (RFC 9260 §6.8).
///
/// `end` is where the SCTP packet ends (the end of the IP payload, which may
/// be before the end of the frame if it has Ethernet padding).
///
/// # Errors
/// `OutOfBounds` if `l4..end` is not inside the frame or is shorter than the
/// 12-byte common header; nothing is written then.
pub fn sctp_update_crc(frame: &mut [u8], l4: usize, end: usize) -> Result<(), RewriteError> {
    let sctp = frame.get_mut(l4..end).ok_or(RewriteError::OutOfBounds)?;
    if sctp.len() < SCTP_COMMON_HEADER_LEN {
        return Err(RewriteError::OutOfBounds);
    }
    let crc = super::checksum::sctp_crc32c(sctp);
    write(sctp, SCTP_CSUM, &crc.to_le_bytes())
}

/// Is the SCTP packet `frame[l4..end]`'s CRC32c right (RFC 9260 §6.8)? A
/// rewrite must not launder a corrupt packet into a valid one, so the CRC is
/// checked before the ports change and recomputed after.
///
/// # Errors
/// `OutOfBounds` if the common header lies outside the frame; `BadChecksum`
/// if the CRC does not match.
pub fn sctp_crc_checked(frame: &[u8], l4: usize, end: usize) -> Result<(), RewriteError> {
    let sctp = frame.get(l4..end).ok_or(RewriteError::OutOfBounds)?;
    if sctp.len() < SCTP_COMMON_HEADER_LEN {
        return Err(RewriteError::OutOfBounds);
    }
    let stored = u32::from_le_bytes(read::<4>(sctp, SCTP_CSUM)?);
    if super::checksum::sctp_crc32c(sctp) == stored {
        Ok(())
    } else {
        Err(RewriteError::BadChecksum)
    }
}

/// The CRC32c the SCTP packet `frame[l4..end]` should carry as it is now
/// (RFC 9260 §6.8): the value [`sctp_crc_follow`] takes as `before`.
///
/// # Errors
/// `OutOfBounds` if the common header lies outside the frame.
pub fn sctp_crc_computed(frame: &[u8], l4: usize, end: usize) -> Result<u32, RewriteError> {
    let sctp = frame.get(l4..end).ok_or(RewriteError::OutOfBounds)?;
    if sctp.len() < SCTP_COMMON_HEADER_LEN {
        return Err(RewriteError::OutOfBounds);
    }
    Ok(super::checksum::sctp_crc32c(sctp))
}

/// Moves the stored CRC32c of `frame[l4..end]` by as much as the rewrite
/// since `before` (its [`sctp_crc_computed`] then) moved the computed one:
/// a right CRC stays right, a wrong one stays wrong by the same amount (CRC32c
/// is affine in the message, the CRC field being taken as zero). For a
/// packet quoted whole in an ICMP error, whose CRC the gateway never judges.
///
/// # Errors
/// `OutOfBounds` if the common header lies outside the frame; nothing is
/// written then.
pub fn sctp_crc_follow(
    frame: &mut [u8],
    l4: usize,
    end: usize,
    before: u32,
) -> Result<(), RewriteError> {
    let now = sctp_crc_computed(frame, l4, end)?;
    let at = l4 + SCTP_CSUM;
    let stored = u32::from_le_bytes(read::<4>(frame, at)?);
    write(frame, at, &(stored ^ before ^ now).to_le_bytes())
}

/// Decrements the IPv4 TTL (l3+8) and updates the header checksum; returns the new TTL, which may be 0 (RFC 791 §3.1, RFC 1624).
///
/// The TTL is the high byte of the 16-bit word at l3+8, whose low byte is the
/// protocol.
///
/// # Errors
/// `OutOfBounds` if the TTL or the header checksum lies outside the frame;
/// `TtlExpired` if the TTL is already 0. Nothing is written then.
pub fn decrement_ttl_ipv4(frame: &mut [u8], l3: usize) -> Result<u8, RewriteError> {
    let ttl_at = offset(l3, IPV4_TTL)?;
    let [ttl, proto] = read::<2>(frame, ttl_at)?;
    let csum_at = offset(l3, IPV4_CSUM)?;
    let csum = read16(frame, csum_at)?;
    let new_ttl = ttl.checked_sub(1).ok_or(RewriteError::TtlExpired)?;
    let old_word = u16::from_be_bytes([ttl, proto]);
    let new_word = u16::from_be_bytes([new_ttl, proto]);
    write(frame, ttl_at, &[new_ttl])?;
    write16(frame, csum_at, update16(csum, old_word, new_word))?;
    Ok(new_ttl)
}

/// Decrements the IPv6 hop limit (l3+7); returns the new value, which may be 0 (RFC 8200 §3).
///
/// # Errors
/// `OutOfBounds` if the hop limit lies outside the frame; `TtlExpired` if it
/// is already 0. Nothing is written then.
pub fn decrement_hop_limit_ipv6(frame: &mut [u8], l3: usize) -> Result<u8, RewriteError> {
    let at = offset(l3, IPV6_HOP_LIMIT)?;
    let [hop_limit] = read::<1>(frame, at)?;
    let new = hop_limit.checked_sub(1).ok_or(RewriteError::TtlExpired)?;
    write(frame, at, &[new])?;
    Ok(new)
}

/// Fixes the 16-bit checksum at `csum_offset` for bytes that changed from `old` to `new` inside the data it covers (RFC 1624 eqn. 3).
///
/// For an enclosing checksum, e.g. the ICMP checksum over a quoted packet
/// whose addresses or ports were rewritten. The changed run must start at an
/// **even** offset from the start of the checksummed data (use
/// [`adjust_checksum_at_odd`] otherwise); its length may be odd. The value is
/// written as computed, without UDP's 0 → 0xFFFF rule.
///
/// # Errors
/// `LengthMismatch` if `old` and `new` differ in length; `OutOfBounds` if the
/// checksum field lies outside the frame. Nothing is written then.
pub fn adjust_checksum_at(
    frame: &mut [u8],
    csum_offset: usize,
    old: &[u8],
    new: &[u8],
) -> Result<(), RewriteError> {
    if old.len() != new.len() {
        return Err(RewriteError::LengthMismatch);
    }
    let csum = read16(frame, csum_offset)?;
    write16(frame, csum_offset, update_words(csum, old, new))
}

/// Like [`adjust_checksum_at`], for a changed run that starts at an **odd** offset from the start of the checksummed data (RFC 1071 §2(B)).
///
/// # Errors
/// `LengthMismatch` if `old` and `new` differ in length; `OutOfBounds` if the
/// checksum field lies outside the frame. Nothing is written then.
pub fn adjust_checksum_at_odd(
    frame: &mut [u8],
    csum_offset: usize,
    old: &[u8],
    new: &[u8],
) -> Result<(), RewriteError> {
    if old.len() != new.len() {
        return Err(RewriteError::LengthMismatch);
    }
    let csum = read16(frame, csum_offset)?;
    write16(frame, csum_offset, update_words_odd(csum, old, new))
}

#[cfg(test)]
mod tests {
    use super::super::checksum::{ipv4_header_checksum, l4_checksum_v4, sctp_crc32c};
    use super::*;

    /// Ethernet + the classic IPv4 header (checksum 0xB861) + an 8-byte UDP header with payload.
    fn udp4_frame() -> Vec<u8> {
        let mut f = vec![
            // Ethernet: dst, src, type
            0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00, // IPv4
            0x45, 0x00, 0x00, 0x20, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
            // UDP: 1234 → 53, length 12, checksum, payload
            0x04, 0xD2, 0x00, 0x35, 0x00, 0x0C, 0x00, 0x00, 1, 2, 3, 4,
        ];
        let ip = ipv4_header_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&ip.to_be_bytes());
        let udp = udp_wire(l4_checksum_v4(
            [192, 168, 0, 1],
            [192, 168, 0, 199],
            17,
            &f[34..],
        ));
        f[40..42].copy_from_slice(&udp.to_be_bytes());
        f
    }

    /// Recomputes the UDP checksum of [`udp4_frame`]-shaped frames.
    fn udp4_full(f: &[u8]) -> u16 {
        let mut seg = f[34..].to_vec();
        seg[6..8].copy_from_slice(&[0, 0]);
        let src = [f[26], f[27], f[28], f[29]];
        let dst = [f[30], f[31], f[32], f[33]];
        udp_wire(l4_checksum_v4(src, dst, 17, &seg))
    }

    #[test]
    fn ipv4_dst_and_port_rewrite_match_full() {
        let mut f = udp4_frame();
        let l4 = Some((34, L4Csum::Udp));
        set_ipv4_dst(&mut f, 14, l4, [10, 96, 0, 10]).expect("in bounds");
        set_dst_port(&mut f, 34, L4Csum::Udp, 8053).expect("in bounds");
        set_ipv4_src(&mut f, 14, l4, [10, 0, 0, 1]).expect("in bounds");
        set_src_port(&mut f, 34, L4Csum::Udp, 40000).expect("in bounds");
        assert_eq!(&f[30..34], &[10, 96, 0, 10]);
        assert_eq!(&f[36..38], &8053u16.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([f[24], f[25]]),
            ipv4_header_checksum(&f[14..34])
        );
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), udp4_full(&f));
    }

    #[test]
    fn udp4_zero_checksum_stays_zero() {
        let mut f = udp4_frame();
        f[40..42].copy_from_slice(&[0, 0]);
        set_ipv4_dst(&mut f, 14, Some((34, L4Csum::Udp)), [1, 2, 3, 4]).expect("in bounds");
        set_dst_port(&mut f, 34, L4Csum::Udp, 1).expect("in bounds");
        assert_eq!(&f[40..42], &[0, 0]);
    }

    #[test]
    fn ttl_decrement() {
        let mut f = udp4_frame();
        assert_eq!(decrement_ttl_ipv4(&mut f, 14), Ok(0x3F));
        assert_eq!(
            u16::from_be_bytes([f[24], f[25]]),
            ipv4_header_checksum(&f[14..34])
        );
        f[22] = 1;
        let c = ipv4_header_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(decrement_ttl_ipv4(&mut f, 14), Ok(0));
        let before = f.clone();
        assert_eq!(
            decrement_ttl_ipv4(&mut f, 14),
            Err(RewriteError::TtlExpired)
        );
        assert_eq!(f, before);
    }

    #[test]
    fn hop_limit_decrement() {
        let mut f = [0u8; 54];
        f[14 + 7] = 2;
        assert_eq!(decrement_hop_limit_ipv6(&mut f, 14), Ok(1));
        assert_eq!(decrement_hop_limit_ipv6(&mut f, 14), Ok(0));
        assert_eq!(
            decrement_hop_limit_ipv6(&mut f, 14),
            Err(RewriteError::TtlExpired)
        );
        assert_eq!(
            decrement_hop_limit_ipv6(&mut f, 47),
            Err(RewriteError::OutOfBounds)
        );
    }

    #[test]
    fn macs() {
        let mut f = udp4_frame();
        swap_macs(&mut f).expect("in bounds");
        assert_eq!(&f[0..6], &[0x02, 0, 0, 0, 0, 0x02]);
        assert_eq!(&f[6..12], &[0x02, 0, 0, 0, 0, 0x01]);
        set_macs(&mut f, [1; 6], [2; 6]).expect("in bounds");
        assert_eq!(&f[0..6], &[2; 6]);
        assert_eq!(&f[6..12], &[1; 6]);
        assert_eq!(swap_macs(&mut f[..11]), Err(RewriteError::OutOfBounds));
        assert_eq!(
            set_macs(&mut f[..11], [0; 6], [0; 6]),
            Err(RewriteError::OutOfBounds)
        );
    }

    #[test]
    fn errors_leave_frame_untouched() {
        let mut f = udp4_frame();
        let before = f.clone();
        // Transport checksum field past the end: the address must not be written either.
        assert_eq!(
            set_ipv4_dst(&mut f, 14, Some((40, L4Csum::Tcp)), [9; 4]),
            Err(RewriteError::OutOfBounds)
        );
        assert_eq!(
            set_ipv4_src(&mut f, usize::MAX - 3, None, [9; 4]),
            Err(RewriteError::OutOfBounds)
        );
        assert_eq!(
            set_dst_port(&mut f, 34, L4Csum::Icmpv6, 7),
            Err(RewriteError::NoPorts)
        );
        assert_eq!(
            adjust_checksum_at(&mut f, 40, &[1, 2], &[3]),
            Err(RewriteError::LengthMismatch)
        );
        assert_eq!(
            sctp_update_crc(&mut f, 40, 30),
            Err(RewriteError::OutOfBounds)
        );
        assert_eq!(f, before);
    }

    #[test]
    fn sctp_crc_rewrite() {
        let mut f = vec![0u8; 14 + 20];
        f.extend_from_slice(&[
            0x13, 0x88, 0x13, 0x88, 0x00, 0x00, 0x00, 0x00, 0x06, 0xa9, 0x00, 0xe1,
        ]);
        let end = f.len();
        set_dst_port(&mut f, 34, L4Csum::None, 80).expect("in bounds");
        sctp_update_crc(&mut f, 34, end).expect("in bounds");
        assert_eq!(&f[42..46], &sctp_crc32c(&f[34..]).to_le_bytes());
        set_dst_port(&mut f, 34, L4Csum::None, 5000).expect("in bounds");
        sctp_update_crc(&mut f, 34, end).expect("in bounds");
        assert_eq!(&f[42..46], &[0x06, 0xa9, 0x00, 0xe1]);
    }

    #[test]
    fn adjust_enclosing_checksum() {
        // An ICMP-like region: checksum at 2, covering bytes 0..len.
        let mut region: Vec<u8> = (0..30u8).map(|b| b.wrapping_mul(91) ^ 0x3C).collect();
        region[2..4].copy_from_slice(&[0, 0]);
        let c = super::super::checksum::finish(super::super::checksum::sum_bytes(0, &region));
        region[2..4].copy_from_slice(&c.to_be_bytes());
        let full = |r: &[u8]| {
            let mut r = r.to_vec();
            r[2..4].copy_from_slice(&[0, 0]);
            super::super::checksum::finish(super::super::checksum::sum_bytes(0, &r))
        };
        let old = region[8..12].to_vec();
        region[8..12].copy_from_slice(&[1, 2, 3, 4]);
        adjust_checksum_at(&mut region, 2, &old, &[1, 2, 3, 4]).expect("in bounds");
        assert_eq!(u16::from_be_bytes([region[2], region[3]]), full(&region));
        let old = region[13..16].to_vec();
        region[13..16].copy_from_slice(&[9, 8, 7]);
        adjust_checksum_at_odd(&mut region, 2, &old, &[9, 8, 7]).expect("in bounds");
        assert_eq!(u16::from_be_bytes([region[2], region[3]]), full(&region));
    }
}

/// Which end of a flow a one-pass NAT rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatSide {
    /// Destination address and port (forward: frontend → backend).
    Dst,
    /// Source address and port (reply: backend → frontend).
    Src,
}

/// 16-bit big-endian word at `at` (bounds checked by the caller).
#[inline(always)]
fn word(frame: &[u8], at: usize) -> u32 {
    u32::from(u16::from_be_bytes([frame[at], frame[at + 1]]))
}

/// Adds the RFC 1624 eqn. 3 terms of `old → new` 16-bit words to `sum`.
#[inline(always)]
fn add_change(sum: &mut u32, old: &[u8], new: &[u8]) {
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        *sum += u32::from(!u16::from_be_bytes([o[0], o[1]]))
            + u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
}

/// Writes checksum `at` updated by the change terms in `sum` (eqn. 3), with
/// UDP's rules: over IPv4 a zero checksum stays zero; a zero result is sent
/// as 0xFFFF.
#[inline(always)]
fn apply_sum(frame: &mut [u8], at: usize, sum: u32, csum: L4Csum) {
    let old = word(frame, at) as u16;
    if csum == L4Csum::Udp && old == 0 {
        return;
    }
    let total = sum + u32::from(!old);
    let mut v = !super::checksum::fold(total);
    if matches!(csum, L4Csum::Udp | L4Csum::Udp6) && v == 0 {
        v = 0xFFFF;
    }
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One-pass NAT of an IPv4 TCP or UDP packet: the source or destination
/// address and port become `addr`/`port`, the TTL drops by one, and the IPv4
/// header checksum and the transport checksum are each updated once for all
/// the changed words (RFC 1624 eqn. 3). The result is byte for byte what
/// [`set_ipv4_src`]/[`set_ipv4_dst`], [`set_src_port`]/[`set_dst_port`] and
/// [`decrement_ttl_ipv4`] give in sequence (a property test holds it).
///
/// `csum` is [`L4Csum::Tcp`] or [`L4Csum::Udp`]; anything else is refused with
/// `NoPorts` (SCTP's CRC32c needs the general path). Returns the new TTL.
///
/// # Errors
/// `OutOfBounds` if the header or the fields lie outside the frame,
/// `TtlExpired` if the TTL is already zero, `NoPorts` for other transports;
/// nothing is written then.
pub fn nat_ipv4(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    side: NatSide,
    addr: [u8; 4],
    port: u16,
) -> Result<u8, RewriteError> {
    nat_v4_ends(frame, l3, l4, csum, &[(side, addr, port)])
}

/// The one-pass IPv4 NAT of [`nat_ipv4`] and [`nat_both_ipv4`]: each end in
/// `ends` gets its address and port, the TTL drops by one, and each checksum
/// is updated once for all the changed words.
fn nat_v4_ends(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    ends: &[(NatSide, [u8; 4], u16)],
) -> Result<u8, RewriteError> {
    let csum_at = nat_bounds(frame, l3, 20, l4, csum, L4Csum::Udp)?;
    let ttl = frame[l3 + IPV4_TTL];
    if ttl == 0 {
        return Err(RewriteError::TtlExpired);
    }
    // An address changes both checksums; a port only the transport's; the
    // TTL (high byte of the word it shares with the protocol) only the header's.
    let (mut ip_sum, mut l4_sum) = (0u32, 0u32);
    for (side, addr, port) in ends {
        let addr_at = match side {
            NatSide::Dst => l3 + IPV4_DST,
            NatSide::Src => l3 + IPV4_SRC,
        };
        let (ip, l4s) = nat_rewrite(frame, addr_at, l4, *side, addr, *port);
        ip_sum += ip;
        l4_sum += l4s;
    }
    let proto = frame[l3 + IPV4_TTL + 1];
    add_change(&mut ip_sum, &[ttl, proto], &[ttl - 1, proto]);
    frame[l3 + IPV4_TTL] = ttl - 1;
    apply_sum(frame, l3 + IPV4_CSUM, ip_sum, L4Csum::Tcp);
    apply_sum(frame, csum_at, l4_sum, csum);
    Ok(ttl - 1)
}

/// Checks, before anything is written, that a one-pass NAT's fields lie in
/// the frame: the IP header (`ip_len` bytes at `l3`), the ports and the
/// transport checksum. `udp` is the UDP kind of the family. Returns the
/// checksum's offset.
fn nat_bounds(
    frame: &[u8],
    l3: usize,
    ip_len: usize,
    l4: usize,
    csum: L4Csum,
    udp: L4Csum,
) -> Result<usize, RewriteError> {
    if csum != L4Csum::Tcp && csum != udp {
        return Err(RewriteError::NoPorts);
    }
    let csum_at = offset(l4, csum.field_offset().unwrap_or(0))?;
    let ip_end = offset(l3, ip_len)?;
    let l4_end = offset(csum_at, 2)?.max(offset(l4, 4)?);
    if ip_end > frame.len() || l4_end > frame.len() {
        return Err(RewriteError::OutOfBounds);
    }
    Ok(csum_at)
}

/// Writes the address at `addr_at` and the port on `side`, and returns the
/// RFC 1624 change terms: (the address alone, the address and the port).
/// Bounds were checked by [`nat_bounds`].
fn nat_rewrite<const N: usize>(
    frame: &mut [u8],
    addr_at: usize,
    l4: usize,
    side: NatSide,
    addr: &[u8; N],
    port: u16,
) -> (u32, u32) {
    let port_at = match side {
        NatSide::Dst => l4 + L4_DST_PORT,
        NatSide::Src => l4 + L4_SRC_PORT,
    };
    let new_port = port.to_be_bytes();
    let mut addr_sum = 0u32;
    add_change(&mut addr_sum, &frame[addr_at..addr_at + N], addr);
    let mut both = addr_sum;
    add_change(&mut both, &frame[port_at..port_at + 2], &new_port);
    frame[addr_at..addr_at + N].copy_from_slice(addr);
    frame[port_at..port_at + 2].copy_from_slice(&new_port);
    (addr_sum, both)
}

/// One-pass NAT of an IPv6 TCP or UDP packet: as [`nat_ipv4`], with the hop
/// limit instead of the TTL and no header checksum. `csum` is
/// [`L4Csum::Tcp`] or [`L4Csum::Udp6`]. Returns the new hop limit.
///
/// # Errors
/// As [`nat_ipv4`].
pub fn nat_ipv6(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    side: NatSide,
    addr: &[u8; 16],
    port: u16,
) -> Result<u8, RewriteError> {
    nat_v6_ends(frame, l3, l4, csum, &[(side, addr, port)])
}

/// The one-pass IPv6 NAT of [`nat_ipv6`] and [`nat_both_ipv6`]: as
/// [`nat_v4_ends`], with the hop limit and no header checksum.
fn nat_v6_ends(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    ends: &[(NatSide, &[u8; 16], u16)],
) -> Result<u8, RewriteError> {
    let csum_at = nat_bounds(frame, l3, 40, l4, csum, L4Csum::Udp6)?;
    let hops = frame[l3 + IPV6_HOP_LIMIT];
    if hops == 0 {
        return Err(RewriteError::TtlExpired);
    }
    let mut l4_sum = 0u32;
    for (side, addr, port) in ends {
        let addr_at = match side {
            NatSide::Dst => l3 + IPV6_DST,
            NatSide::Src => l3 + IPV6_SRC,
        };
        l4_sum += nat_rewrite(frame, addr_at, l4, *side, addr, *port).1;
    }
    frame[l3 + IPV6_HOP_LIMIT] = hops - 1;
    apply_sum(frame, csum_at, l4_sum, csum);
    Ok(hops - 1)
}

/// One-pass NAT of both ends of an IPv4 TCP or UDP packet (source NAT and
/// destination NAT at once, or their reverse): the source address and port
/// become `src`, the destination address and port `dst`, the TTL drops by
/// one, and both checksums are updated once for all the changed words
/// (RFC 1624 eqn. 3). Byte for byte what [`set_ipv4_src`], [`set_src_port`],
/// [`set_ipv4_dst`], [`set_dst_port`] and [`decrement_ttl_ipv4`] give in
/// sequence (a property test holds it). Returns the new TTL.
///
/// # Errors
/// As [`nat_ipv4`]; nothing is written then.
pub fn nat_both_ipv4(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
) -> Result<u8, RewriteError> {
    nat_v4_ends(
        frame,
        l3,
        l4,
        csum,
        &[(NatSide::Src, src.0, src.1), (NatSide::Dst, dst.0, dst.1)],
    )
}

/// One-pass NAT of both ends of an IPv6 TCP or UDP packet: as
/// [`nat_both_ipv4`], with the hop limit and no header checksum. Returns the
/// new hop limit.
///
/// # Errors
/// As [`nat_ipv6`]; nothing is written then.
pub fn nat_both_ipv6(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    csum: L4Csum,
    src: (&[u8; 16], u16),
    dst: (&[u8; 16], u16),
) -> Result<u8, RewriteError> {
    nat_v6_ends(
        frame,
        l3,
        l4,
        csum,
        &[(NatSide::Src, src.0, src.1), (NatSide::Dst, dst.0, dst.1)],
    )
}
