//! Fixed-offset header views: the fast path of [`super::parse::parse`].
//!
//! Owns: read-only views of the headers of the common frames ([`Ethernet`]
//! with at most one 802.1Q tag, [`Ipv4`] with or without options, [`Ipv6`]
//! without extension headers, and the transport header of TCP, UDP or SCTP,
//! [`Transport`]). Each view is made by a `new_checked` that checks the
//! lengths once (in the manner of smoltcp's `Packet::new_checked`); after it,
//! every accessor reads a field at a fixed offset and can neither fail nor
//! panic.
//!
//! A view's checks are those of the full parse (`parse_full`, etherparse):
//! a header a view accepts, the full parse accepts too and reads the same.
//! A view refuses (`None`) what the full parse would refuse *and* what it
//! does not cover (fragments, extension headers, ICMP); the caller then takes
//! the full parse, which names the drop reason. The proptest in
//! `tests/parse_paths.rs` holds the two to the same answers.
//!
//! Must never: panic on any input, allocate, or modify the bytes.

use crate::flow::Proto;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType (TPID) of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;

#[inline]
const fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// An Ethernet II header, with the 802.1Q tag that may follow it.
#[derive(Debug, Clone, Copy)]
pub struct Ethernet {
    ether_type: u16,
    l3: usize,
}

impl Ethernet {
    /// Checks that the frame holds the Ethernet header (14 bytes) and, when
    /// its EtherType is 802.1Q, the tag (4 more bytes).
    #[inline]
    #[must_use]
    pub fn new_checked(frame: &[u8]) -> Option<Self> {
        let h: &[u8; 18] = match frame.first_chunk() {
            Some(h) => h,
            None => {
                // Too short for a tag: fine if there is none.
                let h: &[u8; 14] = frame.first_chunk()?;
                let ether_type = be16(h[12], h[13]);
                return (ether_type != ETHERTYPE_VLAN).then_some(Self { ether_type, l3: 14 });
            }
        };
        let ether_type = be16(h[12], h[13]);
        Some(if ether_type == ETHERTYPE_VLAN {
            Self {
                ether_type: be16(h[16], h[17]),
                l3: 18,
            }
        } else {
            Self { ether_type, l3: 14 }
        })
    }

    /// The EtherType of the payload (after the tag, if any).
    #[inline]
    #[must_use]
    pub const fn ether_type(&self) -> u16 {
        self.ether_type
    }

    /// Offset of the network header: 14, or 18 after a tag.
    #[inline]
    #[must_use]
    pub const fn l3(&self) -> usize {
        self.l3
    }
}

/// Fields of the IPv4 header (RFC 791 §3.1), as offsets from its start.
mod v4 {
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    pub const MIN_LEN: usize = 20;
    /// The More Fragments flag and the fragment offset.
    pub const MF_OFFSET: u16 = 0x3fff;
}

/// An IPv4 header whose lengths were checked: the header (IHL, options
/// included) and the total length lie within the bytes, and the total length
/// covers the header.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4<'a> {
    h: &'a [u8; v4::MIN_LEN],
    bytes: &'a [u8],
    header_len: usize,
    total_len: usize,
}

impl<'a> Ipv4<'a> {
    /// Checks version 4, IHL ≥ 5, and IHL × 4 ≤ total length ≤ `bytes.len()`.
    #[inline]
    #[must_use]
    pub fn new_checked(bytes: &'a [u8]) -> Option<Self> {
        let h: &[u8; v4::MIN_LEN] = bytes.first_chunk()?;
        if h[v4::VER_IHL] >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(h[v4::VER_IHL] & 0x0f) * 4;
        let total_len = usize::from(be16(h[v4::TOTAL_LEN], h[v4::TOTAL_LEN + 1]));
        if header_len < v4::MIN_LEN || total_len < header_len || total_len > bytes.len() {
            return None;
        }
        Some(Self {
            h,
            bytes,
            header_len,
            total_len,
        })
    }

    /// Header length in bytes, options included.
    #[inline]
    #[must_use]
    pub const fn header_len(&self) -> usize {
        self.header_len
    }

    /// Total length: header and payload.
    #[inline]
    #[must_use]
    pub const fn total_len(&self) -> usize {
        self.total_len
    }

    /// The options (empty for IHL 5).
    #[inline]
    #[must_use]
    pub fn options(&self) -> &'a [u8] {
        self.bytes.get(v4::MIN_LEN..self.header_len).unwrap_or(&[])
    }

    /// Is the packet a fragment (More Fragments set, or a non-zero offset)?
    #[inline]
    #[must_use]
    pub const fn is_fragment(&self) -> bool {
        be16(self.h[v4::FLAGS_FRAG], self.h[v4::FLAGS_FRAG + 1]) & v4::MF_OFFSET != 0
    }

    /// Time to live.
    #[inline]
    #[must_use]
    pub const fn ttl(&self) -> u8 {
        self.h[v4::TTL]
    }

    /// The protocol number of the payload.
    #[inline]
    #[must_use]
    pub const fn protocol(&self) -> u8 {
        self.h[v4::PROTOCOL]
    }

    /// Source address.
    #[inline]
    #[must_use]
    pub const fn src(&self) -> [u8; 4] {
        let h = self.h;
        [h[v4::SRC], h[v4::SRC + 1], h[v4::SRC + 2], h[v4::SRC + 3]]
    }

    /// Destination address.
    #[inline]
    #[must_use]
    pub const fn dst(&self) -> [u8; 4] {
        let h = self.h;
        [h[v4::DST], h[v4::DST + 1], h[v4::DST + 2], h[v4::DST + 3]]
    }
}

/// Fields of the IPv6 fixed header (RFC 8200 §3), as offsets from its start.
mod v6 {
    pub const VERSION: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
    pub const LEN: usize = 40;
}

/// An IPv6 fixed header whose lengths were checked: a non-zero payload
/// length, and the payload within the bytes.
#[derive(Debug, Clone, Copy)]
pub struct Ipv6<'a> {
    h: &'a [u8; v6::LEN],
    payload_len: usize,
}

impl<'a> Ipv6<'a> {
    /// Checks version 6 and 0 < payload length ≤ `bytes.len()` − 40.
    #[inline]
    #[must_use]
    pub fn new_checked(bytes: &'a [u8]) -> Option<Self> {
        let h: &[u8; v6::LEN] = bytes.first_chunk()?;
        if h[v6::VERSION] >> 4 != 6 {
            return None;
        }
        let payload_len = usize::from(be16(h[v6::PAYLOAD_LEN], h[v6::PAYLOAD_LEN + 1]));
        if payload_len == 0 || v6::LEN + payload_len > bytes.len() {
            return None;
        }
        Some(Self { h, payload_len })
    }

    /// Payload length (extension headers included).
    #[inline]
    #[must_use]
    pub const fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The Next Header of the fixed header.
    #[inline]
    #[must_use]
    pub const fn next_header(&self) -> u8 {
        self.h[v6::NEXT_HEADER]
    }

    /// Hop limit.
    #[inline]
    #[must_use]
    pub const fn hop_limit(&self) -> u8 {
        self.h[v6::HOP_LIMIT]
    }

    /// Source address.
    #[inline]
    #[must_use]
    pub fn src(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.h[v6::SRC..v6::SRC + 16]);
        a
    }

    /// Destination address.
    #[inline]
    #[must_use]
    pub fn dst(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.h[v6::DST..v6::DST + 16]);
        a
    }
}

/// Fields of the transport headers, as offsets from their start.
mod l4 {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    /// UDP length (RFC 768).
    pub const UDP_LEN: usize = 4;
    /// UDP checksum (RFC 768).
    pub const UDP_CHECKSUM: usize = 6;
    pub const UDP_HEADER: usize = 8;
    /// TCP data offset, in the high nibble (RFC 9293 §3.1).
    pub const TCP_DATA_OFFSET: usize = 12;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_HEADER: usize = 20;
    /// SCTP common header (RFC 9260 §3.1).
    pub const SCTP_HEADER: usize = 12;
}

/// The transport header of a whole (unfragmented) TCP, UDP or SCTP packet,
/// checked: TCP's data offset within the segment, UDP's length between 8 and
/// the segment, SCTP's common header present.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    udp_checksum: u16,
}

impl Transport {
    /// Checks `seg`, the IP payload (from the transport header to the IP
    /// packet's end), as a `proto` header.
    #[inline(always)] // reason: the protocol is known where it is called
    #[must_use]
    pub fn new_checked(seg: &[u8], proto: Proto) -> Option<Self> {
        let h: &[u8; l4::UDP_HEADER] = seg.first_chunk()?;
        let mut t = Self {
            src_port: be16(h[l4::SRC_PORT], h[l4::SRC_PORT + 1]),
            dst_port: be16(h[l4::DST_PORT], h[l4::DST_PORT + 1]),
            tcp_flags: 0,
            udp_checksum: 0,
        };
        match proto {
            Proto::Tcp => {
                let h: &[u8; l4::TCP_HEADER] = seg.first_chunk()?;
                let data_offset = usize::from(h[l4::TCP_DATA_OFFSET] >> 4) * 4;
                if data_offset < l4::TCP_HEADER || data_offset > seg.len() {
                    return None;
                }
                t.tcp_flags = h[l4::TCP_FLAGS];
            }
            Proto::Udp => {
                let len = usize::from(be16(h[l4::UDP_LEN], h[l4::UDP_LEN + 1]));
                if len < l4::UDP_HEADER || len > seg.len() {
                    return None;
                }
                t.udp_checksum = be16(h[l4::UDP_CHECKSUM], h[l4::UDP_CHECKSUM + 1]);
            }
            Proto::Sctp => {
                if seg.len() < l4::SCTP_HEADER {
                    return None;
                }
            }
        }
        Some(t)
    }

    /// Source port.
    #[inline]
    #[must_use]
    pub const fn src_port(&self) -> u16 {
        self.src_port
    }

    /// Destination port.
    #[inline]
    #[must_use]
    pub const fn dst_port(&self) -> u16 {
        self.dst_port
    }

    /// TCP flags byte (offset 13); zero for UDP and SCTP.
    #[inline]
    #[must_use]
    pub const fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }

    /// UDP checksum field; zero for TCP and SCTP.
    #[inline]
    #[must_use]
    pub const fn udp_checksum(&self) -> u16 {
        self.udp_checksum
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    /// Ethernet, IPv4 (198.18.0.1 → 198.19.0.10, TTL 64, no options), TCP
    /// 40000 → 80 with ACK|PSH, data offset 5, no payload.
    static IPV4_TCP: [u8; 54] = [
        2, 0, 0, 0, 0, 0xfe, 2, 0, 0, 0, 0, 1, 0x08, 0x00, // Ethernet
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 19, 0, 10, // IPv4
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 2, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0, // TCP
    ];

    #[test]
    fn views_read_fields_at_fixed_offsets() {
        let eth = Ethernet::new_checked(&IPV4_TCP).unwrap();
        assert_eq!((eth.ether_type(), eth.l3()), (ETHERTYPE_IPV4, 14));
        let ip = Ipv4::new_checked(&IPV4_TCP[14..]).unwrap();
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.total_len(), 40);
        assert!(!ip.is_fragment(), "DF alone is not a fragment");
        assert_eq!((ip.ttl(), ip.protocol()), (64, 6));
        assert_eq!((ip.src(), ip.dst()), ([198, 18, 0, 1], [198, 19, 0, 10]));
        assert!(ip.options().is_empty());
        let t = Transport::new_checked(&IPV4_TCP[34..], Proto::Tcp).unwrap();
        assert_eq!(
            (t.src_port(), t.dst_port(), t.tcp_flags()),
            (40000, 80, 0x18)
        );
    }

    #[test]
    fn views_refuse_what_does_not_fit() {
        // Every truncation of the frame: no view panics, and the ones whose
        // bytes are cut refuse.
        for n in 0..IPV4_TCP.len() {
            let f = &IPV4_TCP[..n];
            let eth = Ethernet::new_checked(f);
            assert_eq!(eth.is_some(), n >= 14, "{n}");
            let ip = f.get(14..).and_then(Ipv4::new_checked);
            assert!(ip.is_none(), "total length 40 needs 54 bytes, got {n}");
            let t = f
                .get(34..)
                .and_then(|s| Transport::new_checked(s, Proto::Tcp));
            assert!(t.is_none(), "{n}");
        }
        let mut f = IPV4_TCP;
        f[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        assert!(Ethernet::new_checked(&f[..17]).is_none(), "a cut tag");
        f[14] = 0x44;
        assert!(Ipv4::new_checked(&f[14..]).is_none(), "IHL 4");
        f[14] = 0x46;
        f[17] = 22;
        assert!(Ipv4::new_checked(&f[14..]).is_none(), "total < IHL");
        f[20] = 0x20;
        f[17] = 40;
        assert!(Ipv4::new_checked(&f[14..]).unwrap().is_fragment(), "MF");
        let mut t = IPV4_TCP;
        t[46] = 0x40;
        assert!(Transport::new_checked(&t[34..], Proto::Tcp).is_none());
        t[46] = 0x60;
        assert!(Transport::new_checked(&t[34..], Proto::Tcp).is_none());
    }
}
