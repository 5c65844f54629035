//! The bench's frames on the wire: what `pktgen` writes and what `sink`
//! checks.
//!
//! Owns: the frame format, building frames into a buffer from a template made
//! once per run ([`Template`]), and checking a received frame against what a
//! sink expects ([`check`]). It never allocates per frame and never reads a
//! clock: the caller passes the timestamp in.
//!
//! Format: Ethernet II / IPv4 (20-byte header, DF, TTL 64, ID 0) or IPv6
//! (40-byte header, no extension header, hop limit 64, traffic class and
//! flow label 0) / UDP or TCP / payload, zero-padded to the chosen frame
//! length (64..=1500 bytes for IPv4, 84..=1500 for IPv6: the same payload
//! behind the 20 more bytes of header; the Ethernet frame without FCS). The
//! IPv4 header checksum and the L4 checksum are always set.
//!
//! | proto | L4 header | payload |
//! |---|---|---|
//! | UDP | ports | `CB 01`, ts u64, flow u32, seq u64 (22 bytes) |
//! | TCP | ports, seq = low 32 bits of seq, ack = flow, SYN or ACK, window 65535 | `CB 02`, ts u64 (10 bytes) |
//!
//! All integers are big-endian; `ts` is `CLOCK_MONOTONIC` in ns at send.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustergate_dataplane::packet::checksum::{
    finish, ipv4_header_checksum, pseudo_header_v4, pseudo_header_v6, sum_bytes, udp_wire,
};
use etherparse::{Ipv4HeaderSlice, PacketBuilder};
use serde::{Deserialize, Serialize};

use crate::layout::{self, Family};

/// Shortest frame: 14 + 20 + 8 + 22 (UDP) = 14 + 20 + 20 + 10 (TCP).
pub const MIN_FRAME: usize = 64;
/// Shortest IPv6 frame: 14 + 40 + 8 + 22 (UDP) = 14 + 40 + 20 + 10 (TCP).
pub const MIN_FRAME6: usize = 84;

/// The shortest frame of `family`.
#[must_use]
pub const fn min_frame(family: Family) -> usize {
    match family {
        Family::V4 => MIN_FRAME,
        Family::V6 => MIN_FRAME6,
    }
}
/// Longest frame (a 1500-byte frame without FCS; an IP MTU of 1486).
pub const MAX_FRAME: usize = 1500;
/// UDP payload magic.
pub const MAGIC_UDP: [u8; 2] = [0xCB, 0x01];
/// TCP payload magic.
pub const MAGIC_TCP: [u8; 2] = [0xCB, 0x02];

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPV6_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TTL: u8 = 64;
const WINDOW: u16 = 65_535;

/// Byte offsets in a frame this module builds (20-byte IPv4 header).
mod field {
    use std::ops::Range;

    /// Ethernet destination.
    pub const ETH_DST: Range<usize> = 0..6;
    /// Ethertype.
    pub const ETHERTYPE: Range<usize> = 12..14;
    /// IPv4 header start.
    pub const L3: usize = 14;
    /// IPv4 header checksum.
    pub const IP_CSUM: Range<usize> = 24..26;
    /// IPv4 source address.
    pub const IP_SRC: Range<usize> = 26..30;
    /// IPv4 destination address.
    pub const IP_DST: Range<usize> = 30..34;
    /// Transport header start.
    pub const L4: usize = 34;
    /// Source port.
    pub const SRC_PORT: Range<usize> = 34..36;
    /// Destination port.
    pub const DST_PORT: Range<usize> = 36..38;
    /// UDP checksum.
    pub const UDP_CSUM: Range<usize> = 40..42;
    /// UDP payload.
    pub const UDP_PAYLOAD: usize = 42;
    /// TCP sequence number.
    pub const TCP_SEQ: Range<usize> = 38..42;
    /// TCP acknowledgment number.
    pub const TCP_ACK: Range<usize> = 42..46;
    /// TCP flags.
    pub const TCP_FLAGS: usize = 47;
    /// TCP checksum.
    pub const TCP_CSUM: Range<usize> = 50..52;
    /// TCP payload.
    pub const TCP_PAYLOAD: usize = 54;

    /// Payload offsets (from the payload start).
    pub const MAGIC: Range<usize> = 0..2;
    /// Timestamp.
    pub const TS: Range<usize> = 2..10;
    /// Flow id (UDP).
    pub const FLOW: Range<usize> = 10..14;
    /// Sequence number (UDP).
    pub const SEQ: Range<usize> = 14..22;
    /// UDP payload bytes that are not padding.
    pub const UDP_DATA: usize = 22;
    /// TCP payload bytes that are not padding.
    pub const TCP_DATA: usize = 10;
}

/// The transport protocol of the bench's frames.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum L4Proto {
    /// UDP, IP protocol 17.
    #[default]
    Udp,
    /// TCP, IP protocol 6.
    Tcp,
}

impl L4Proto {
    /// The IP protocol number.
    #[must_use]
    pub const fn ip_number(self) -> u8 {
        match self {
            Self::Udp => IPPROTO_UDP,
            Self::Tcp => IPPROTO_TCP,
        }
    }

    /// Transport header and non-padding payload bytes.
    const fn data_len(self) -> usize {
        match self {
            Self::Udp => 8 + field::UDP_DATA,
            Self::Tcp => 20 + field::TCP_DATA,
        }
    }
}

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frame length is out of range.
    #[error("frame size {0}: must be {1}..={MAX_FRAME}")]
    FrameSize(usize, usize),
    /// etherparse refused to build the template.
    #[error("building the {proto:?} frame template: {reason}")]
    Build {
        /// Protocol.
        proto: L4Proto,
        /// etherparse's error.
        reason: String,
    },
}

/// What varies from one frame to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// Source address and port (of the template's family).
    pub src: (IpAddr, u16),
    /// Destination address and port (of the template's family).
    pub dst: (IpAddr, u16),
    /// Flow id.
    pub flow: u32,
    /// Sequence number (TCP carries its low 32 bits).
    pub seq: u64,
    /// `CLOCK_MONOTONIC` ns at send.
    pub ts: u64,
    /// TCP: SYN (the flow's first packet) rather than ACK. Ignored for UDP.
    pub syn: bool,
}

/// A frame made once with etherparse (MACs, lengths, constant header fields,
/// magic, zero padding), patched per frame by [`Template::write`].
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    proto: L4Proto,
    family: Family,
}

impl Template {
    /// An IPv4 template of `len` bytes for `proto`, from `src_mac` to `dst_mac`.
    ///
    /// # Errors
    /// `len` out of [`MIN_FRAME`]..=[`MAX_FRAME`].
    #[cfg(test)]
    pub fn new(
        proto: L4Proto,
        len: usize,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
    ) -> Result<Self, WireError> {
        Self::new_in(Family::V4, proto, len, src_mac, dst_mac)
    }

    /// A template of `family`, `len` bytes for `proto`, from `src_mac` to `dst_mac`.
    ///
    /// # Errors
    /// `len` out of [`min_frame`]`(family)..=`[`MAX_FRAME`].
    pub fn new_in(
        family: Family,
        proto: L4Proto,
        len: usize,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
    ) -> Result<Self, WireError> {
        let min = min_frame(family);
        if !(min..=MAX_FRAME).contains(&len) {
            return Err(WireError::FrameSize(len, min));
        }
        let extra = min - MIN_FRAME;
        let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
        let mut bytes = Vec::with_capacity(len);
        let (udp_payload, tcp_payload) = (
            len - field::UDP_PAYLOAD - extra,
            len - field::TCP_PAYLOAD - extra,
        );
        let mut payload = vec![
            0u8;
            match proto {
                L4Proto::Udp => udp_payload,
                L4Proto::Tcp => tcp_payload,
            }
        ];
        payload[field::MAGIC].copy_from_slice(match proto {
            L4Proto::Udp => &MAGIC_UDP,
            L4Proto::Tcp => &MAGIC_TCP,
        });
        let built = match (family, proto) {
            (Family::V4, L4Proto::Udp) => eth
                .ipv4([0; 4], [0; 4], TTL)
                .udp(0, 0)
                .write(&mut bytes, &payload),
            (Family::V4, L4Proto::Tcp) => eth
                .ipv4([0; 4], [0; 4], TTL)
                .tcp(0, 0, 0, WINDOW)
                .ack(0)
                .write(&mut bytes, &payload),
            (Family::V6, L4Proto::Udp) => eth
                .ipv6([0; 16], [0; 16], TTL)
                .udp(0, 0)
                .write(&mut bytes, &payload),
            (Family::V6, L4Proto::Tcp) => eth
                .ipv6([0; 16], [0; 16], TTL)
                .tcp(0, 0, 0, WINDOW)
                .ack(0)
                .write(&mut bytes, &payload),
        };
        built.map_err(|e| WireError::Build {
            proto,
            reason: e.to_string(),
        })?;
        if bytes.len() != len {
            return Err(WireError::Build {
                proto,
                reason: format!("{} bytes built, {len} wanted", bytes.len()),
            });
        }
        Ok(Self {
            bytes,
            proto,
            family,
        })
    }

    /// Frame length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Its family.
    #[must_use]
    pub fn family(&self) -> Family {
        self.family
    }

    /// Writes one frame into the start of `buf` and returns its length, or 0
    /// when `buf` is too short or an address is not of the template's family
    /// (nothing is written then).
    #[must_use]
    pub fn write(&self, buf: &mut [u8], f: &Fields) -> usize {
        let len = self.bytes.len();
        let Some(out) = buf.get_mut(..len) else {
            return 0;
        };
        // Offsets below are IPv4's; IPv6's header is 20 bytes longer.
        let d = match self.family {
            Family::V4 => 0,
            Family::V6 => MIN_FRAME6 - MIN_FRAME,
        };
        let at = |r: std::ops::Range<usize>| r.start + d..r.end + d;
        let pseudo = match (self.family, f.src.0, f.dst.0) {
            (Family::V4, IpAddr::V4(src), IpAddr::V4(dst)) => {
                let (src, dst) = (src.octets(), dst.octets());
                out.copy_from_slice(&self.bytes);
                out[field::IP_SRC].copy_from_slice(&src);
                out[field::IP_DST].copy_from_slice(&dst);
                let ip_csum = ipv4_header_checksum(&out[field::L3..field::L4]);
                out[field::IP_CSUM].copy_from_slice(&ip_csum.to_be_bytes());
                pseudo_header_v4(src, dst, self.proto.ip_number(), (len - field::L4) as u16)
            }
            (Family::V6, IpAddr::V6(src), IpAddr::V6(dst)) => {
                let (src, dst) = (src.octets(), dst.octets());
                out.copy_from_slice(&self.bytes);
                out[field::L3 + 8..field::L3 + 24].copy_from_slice(&src);
                out[field::L3 + 24..field::L3 + 40].copy_from_slice(&dst);
                pseudo_header_v6(
                    &src,
                    &dst,
                    self.proto.ip_number(),
                    (len - field::L4 - d) as u32,
                )
            }
            _ => return 0,
        };
        out[at(field::SRC_PORT)].copy_from_slice(&f.src.1.to_be_bytes());
        out[at(field::DST_PORT)].copy_from_slice(&f.dst.1.to_be_bytes());
        let csum_at = match self.proto {
            L4Proto::Udp => {
                let p = &mut out[field::UDP_PAYLOAD + d..];
                p[field::TS].copy_from_slice(&f.ts.to_be_bytes());
                p[field::FLOW].copy_from_slice(&f.flow.to_be_bytes());
                p[field::SEQ].copy_from_slice(&f.seq.to_be_bytes());
                at(field::UDP_CSUM)
            }
            L4Proto::Tcp => {
                out[at(field::TCP_SEQ)].copy_from_slice(&(f.seq as u32).to_be_bytes());
                out[at(field::TCP_ACK)].copy_from_slice(&f.flow.to_be_bytes());
                out[field::TCP_FLAGS + d] = if f.syn { TCP_SYN } else { TCP_ACK };
                let p = field::TCP_PAYLOAD + d;
                out[p + field::TS.start..p + field::TS.end].copy_from_slice(&f.ts.to_be_bytes());
                at(field::TCP_CSUM)
            }
        };
        out[csum_at.clone()].fill(0);
        // The padding is zeros and adds nothing to the sum: sum the headers
        // and the data only (an even length, so word alignment holds).
        let l4 = field::L4 + d;
        let data = &out[l4..l4 + self.proto.data_len()];
        let c = finish(sum_bytes(pseudo, data));
        let c = match self.proto {
            L4Proto::Udp => udp_wire(c),
            L4Proto::Tcp => c,
        };
        out[csum_at].copy_from_slice(&c.to_be_bytes());
        len
    }
}

/// What a sink accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// Its own MAC.
    pub mac: [u8; 6],
    /// Its own address (or the one it was told to accept): the destination,
    /// or under DSR the outer destination. Frames of the other family are
    /// [`Bad::DstAddr`].
    pub addr: IpAddr,
    /// First accepted destination port (not DSR: the port stays the service's).
    pub first_port: u16,
    /// Last accepted destination port (inclusive).
    pub last_port: u16,
    /// Flows the generator sends (flow ids are below this).
    pub flows: u32,
    /// How the dataplane under test delivers the client's packets.
    pub path: PathExpect,
}

/// What the return path does to the client's packet on its way to the
/// backend, as a sink checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathExpect {
    /// Destination NAT only: the source is the flow's (client address and
    /// port).
    Routed,
    /// Source NAT as well: the source address is `addr` (the gateway's) and
    /// the source port one of `lo..=hi`; the flow id comes from the payload.
    /// (That the port stays the same within a flow, and differs between
    /// flows, is the sink's to check: [`Probe::src_port`].)
    Snat {
        /// The gateway's SNAT address.
        addr: IpAddr,
        /// First SNAT port.
        lo: u16,
        /// Last SNAT port (inclusive).
        hi: u16,
    },
    /// Direct server return: IPv4 in IPv4 (RFC 2003) from `gateway` to the
    /// sink's address, outer TTL [`OUTER_TTL`], TOS, ID and DF copied from
    /// the inner header, no options (IPv6: IPv6 in IPv6, RFC 2473, next
    /// header 41, hop limit [`OUTER_TTL`], traffic class and flow label
    /// copied, no extension header); the inner packet is the client's
    /// (source: the flow's, destination: the VIP of the flow's service of
    /// `services`, port [`layout::SERVICE_PORT`]) with its TTL one lower
    /// than sent.
    Dsr {
        /// The gateway's address (the outer source).
        gateway: IpAddr,
        /// Services the generator spreads the flows over (flow f goes to
        /// service f mod services).
        services: u32,
    },
}

/// TTL of a DSR outer header (what the gateway writes: Linux's default).
pub const OUTER_TTL: u8 = 64;
/// IP protocol number of IPv4 in IPv4.
const IPPROTO_IPIP: u8 = 4;
/// Next header of IPv6 in IPv6.
const IPPROTO_IPV6: u8 = 41;

/// A frame that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Flow id.
    pub flow: u32,
    /// Sequence number (TCP: only the low 32 bits travel).
    pub seq: u64,
    /// Send time, `CLOCK_MONOTONIC` ns.
    pub ts: u64,
    /// Protocol.
    pub proto: L4Proto,
    /// Source port on the wire (under source NAT, the gateway's port).
    pub src_port: u16,
    /// Destination port (under DSR, the service port).
    pub dst_port: u16,
    /// TCP SYN flag set.
    pub syn: bool,
}

/// The first check a frame failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Bad {
    /// Not Ethernet II / IPv4 / UDP or TCP (under DSR: IPv4 / IPv4 / UDP or
    /// TCP), a fragment, inconsistent lengths (IHL, total length, UDP
    /// length, TCP data offset), or truncated.
    #[error("malformed or truncated")]
    Malformed,
    /// The payload does not start with the protocol's magic.
    #[error("wrong magic")]
    Magic,
    /// The IPv4 header checksum is wrong (under DSR: the inner header's).
    #[error("bad IPv4 header checksum")]
    IpChecksum,
    /// The TCP or UDP checksum is wrong (or UDP's is 0: the generator always
    /// sets one).
    #[error("bad L4 checksum")]
    L4Checksum,
    /// Not to the sink's address (under DSR: the inner destination is not
    /// the VIP of the flow's service).
    #[error("wrong destination address")]
    DstAddr,
    /// Not to one of the sink's ports (under DSR: not the service port).
    #[error("wrong destination port")]
    DstPort,
    /// The source (address, port) is not that of the flow id in the payload
    /// (under source NAT: the flow id is not one the generator sends).
    #[error("source does not match the flow")]
    Src,
    /// Not to the sink's MAC.
    #[error("wrong destination MAC")]
    DstMac,
    /// Source NAT: the source address is not the gateway's.
    #[error("source is not the SNAT address")]
    SnatAddr,
    /// Source NAT: the source port is outside the SNAT range.
    #[error("source port outside the SNAT range")]
    SnatPort,
    /// Source NAT: the source port differs from the one earlier frames of
    /// the same flow had (counted by the sink, which remembers them).
    #[error("SNAT port changed within a flow")]
    SnatUnstable,
    /// Source NAT: another flow already came with this (destination port,
    /// source port) (counted by the sink).
    #[error("SNAT port shared by two flows")]
    SnatShared,
    /// DSR: the outer IPv4 header checksum is wrong.
    #[error("bad outer IPv4 header checksum")]
    OuterChecksum,
    /// DSR: the outer source is not the gateway or the outer destination not
    /// the sink.
    #[error("wrong outer source or destination")]
    OuterAddr,
    /// DSR: not IP-in-IP (protocol 4), or an outer field is wrong (options,
    /// TTL, TOS, ID or DF not copied, total length).
    #[error("not IP-in-IP, or a wrong outer header field")]
    OuterHeader,
    /// DSR: the inner TTL is not one lower than sent.
    #[error("inner TTL not decremented once")]
    Ttl,
}

impl Bad {
    /// Every variant, in [`Bad::index`] order.
    pub const ALL: [Self; 16] = [
        Self::Malformed,
        Self::Magic,
        Self::IpChecksum,
        Self::L4Checksum,
        Self::DstAddr,
        Self::DstPort,
        Self::Src,
        Self::DstMac,
        Self::SnatAddr,
        Self::SnatPort,
        Self::SnatUnstable,
        Self::SnatShared,
        Self::OuterChecksum,
        Self::OuterAddr,
        Self::OuterHeader,
        Self::Ttl,
    ];

    /// Position in [`Bad::ALL`] (for counter arrays).
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// The IP header of a packet of the bench's.
enum Header<'a> {
    V4(Ipv4HeaderSlice<'a>),
    /// The 40 bytes of the fixed header (no extension header follows).
    V6(&'a [u8]),
}

/// One IP packet of the bench's, taken apart (structure checked, checksums
/// not yet).
struct Ip<'a> {
    header: Header<'a>,
    proto: L4Proto,
    /// The transport header and payload (up to the total length).
    l4: &'a [u8],
    /// The transport payload.
    payload: &'a [u8],
}

/// An IPv6 header's addresses.
fn v6_addrs(h: &[u8]) -> ([u8; 16], [u8; 16]) {
    let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
    s.copy_from_slice(&h[8..24]);
    d.copy_from_slice(&h[24..40]);
    (s, d)
}

impl<'a> Ip<'a> {
    /// `b` starts at the IP header of `family`; bytes past its total
    /// length are padding.
    fn parse(b: &'a [u8], family: Family) -> Result<Self, Bad> {
        let (header, hlen, total, proto) = match family {
            Family::V4 => {
                let header = Ipv4HeaderSlice::from_slice(b).map_err(|_| Bad::Malformed)?;
                let ihl_len = header.slice().len();
                let total = usize::from(header.total_len());
                if total < ihl_len
                    || total > b.len()
                    || header.more_fragments()
                    || header.fragments_offset().value() != 0
                {
                    return Err(Bad::Malformed);
                }
                let proto = header.protocol().0;
                (Header::V4(header), ihl_len, total, proto)
            }
            Family::V6 => {
                if b.len() < IPV6_LEN || b[0] >> 4 != 6 {
                    return Err(Bad::Malformed);
                }
                let total = IPV6_LEN + usize::from(be16(b, 4));
                if total > b.len() {
                    return Err(Bad::Malformed);
                }
                (Header::V6(&b[..IPV6_LEN]), IPV6_LEN, total, b[6])
            }
        };
        let proto = match proto {
            IPPROTO_UDP => L4Proto::Udp,
            IPPROTO_TCP => L4Proto::Tcp,
            _ => return Err(Bad::Malformed),
        };
        let l4 = &b[hlen..total];
        let payload_at = match proto {
            L4Proto::Udp => {
                if l4.len() < 8 || usize::from(be16(l4, 4)) != l4.len() {
                    return Err(Bad::Malformed);
                }
                8
            }
            L4Proto::Tcp => {
                if l4.len() < 20 {
                    return Err(Bad::Malformed);
                }
                let doff = usize::from(l4[12] >> 4) * 4;
                if doff < 20 || doff > l4.len() {
                    return Err(Bad::Malformed);
                }
                doff
            }
        };
        let payload = &l4[payload_at..];
        let data = match proto {
            L4Proto::Udp => field::UDP_DATA,
            L4Proto::Tcp => field::TCP_DATA,
        };
        if payload.len() < data {
            return Err(Bad::Malformed);
        }
        Ok(Self {
            header,
            proto,
            l4,
            payload,
        })
    }

    /// The IPv4 header checksum (IPv6 has none), then the L4 checksum.
    fn checksums(&self) -> Result<(), Bad> {
        if self.proto == L4Proto::Udp && be16(self.l4, 6) == 0 {
            return Err(Bad::L4Checksum);
        }
        let pseudo = match &self.header {
            Header::V4(h) => {
                if finish(sum_bytes(0, h.slice())) != 0 {
                    return Err(Bad::IpChecksum);
                }
                pseudo_header_v4(
                    h.source(),
                    h.destination(),
                    self.proto.ip_number(),
                    self.l4.len() as u16,
                )
            }
            Header::V6(h) => {
                let (s, d) = v6_addrs(h);
                pseudo_header_v6(&s, &d, self.proto.ip_number(), self.l4.len() as u32)
            }
        };
        if finish(sum_bytes(pseudo, self.l4)) != 0 {
            return Err(Bad::L4Checksum);
        }
        Ok(())
    }

    fn magic(&self) -> Result<(), Bad> {
        let magic = match self.proto {
            L4Proto::Udp => MAGIC_UDP,
            L4Proto::Tcp => MAGIC_TCP,
        };
        if self.payload[field::MAGIC] == magic {
            Ok(())
        } else {
            Err(Bad::Magic)
        }
    }

    fn probe(&self) -> Probe {
        let (l4, payload) = (self.l4, self.payload);
        let (flow, seq, syn) = match self.proto {
            L4Proto::Udp => (
                be32(payload, field::FLOW.start),
                be64(payload, field::SEQ.start),
                false,
            ),
            L4Proto::Tcp => (be32(l4, 8), u64::from(be32(l4, 4)), l4[13] & TCP_SYN != 0),
        };
        Probe {
            flow,
            seq,
            ts: be64(payload, field::TS.start),
            proto: self.proto,
            src_port: be16(l4, 0),
            dst_port: be16(l4, 2),
            syn,
        }
    }

    fn src(&self) -> IpAddr {
        match &self.header {
            Header::V4(h) => IpAddr::V4(Ipv4Addr::from(h.source())),
            Header::V6(h) => IpAddr::V6(Ipv6Addr::from(v6_addrs(h).0)),
        }
    }

    fn dst(&self) -> IpAddr {
        match &self.header {
            Header::V4(h) => IpAddr::V4(Ipv4Addr::from(h.destination())),
            Header::V6(h) => IpAddr::V6(Ipv6Addr::from(v6_addrs(h).1)),
        }
    }

    /// TTL or hop limit.
    fn ttl(&self) -> u8 {
        match &self.header {
            Header::V4(h) => h.ttl(),
            Header::V6(h) => h[7],
        }
    }
}

/// Checks a received frame against `expect`; the checks run in this order:
/// structure ([`Bad::Malformed`]), checksums (under DSR the outer header's
/// first), magic, destination MAC, then the fields of the return path
/// (under DSR the outer header's first). A rewrite with correct checksums
/// (what a NAT does) is judged by the fields; a corrupted frame by its
/// checksums. Per-flow state (a SNAT port that must not change within a
/// flow nor be shared by two) is the caller's: [`Probe::src_port`]. IPv4
/// and IPv6 frames are checked alike; a frame of the other family than
/// `expect.addr`'s is [`Bad::DstAddr`].
///
/// # Errors
/// The first check that failed.
pub fn check(frame: &[u8], expect: &Expect) -> Result<Probe, Bad> {
    if frame.len() < field::L3 {
        return Err(Bad::Malformed);
    }
    let family = match be16(frame, field::ETHERTYPE.start) {
        ETHERTYPE_IPV4 => Family::V4,
        ETHERTYPE_IPV6 => Family::V6,
        _ => return Err(Bad::Malformed),
    };
    if let PathExpect::Dsr { gateway, services } = expect.path {
        return check_dsr(frame, family, expect, gateway, services);
    }
    let ip = Ip::parse(&frame[field::L3..], family)?;
    ip.checksums()?;
    ip.magic()?;
    if frame[field::ETH_DST] != expect.mac {
        return Err(Bad::DstMac);
    }
    if ip.dst() != expect.addr {
        return Err(Bad::DstAddr);
    }
    let p = ip.probe();
    if !(expect.first_port..=expect.last_port).contains(&p.dst_port) {
        return Err(Bad::DstPort);
    }
    match expect.path {
        PathExpect::Snat { addr, lo, hi } => {
            if ip.src() != addr {
                return Err(Bad::SnatAddr);
            }
            if !(lo..=hi).contains(&p.src_port) {
                return Err(Bad::SnatPort);
            }
            if p.flow >= expect.flows {
                return Err(Bad::Src);
            }
        }
        _ => {
            if layout::flow_of_ip(ip.src(), p.src_port, expect.flows) != Some(p.flow) {
                return Err(Bad::Src);
            }
        }
    }
    Ok(p)
}

/// [`check`] under DSR.
fn check_dsr(
    frame: &[u8],
    family: Family,
    expect: &Expect,
    gateway: IpAddr,
    services: u32,
) -> Result<Probe, Bad> {
    let b = &frame[field::L3..];
    let inner = match family {
        Family::V4 => {
            let outer = Ipv4HeaderSlice::from_slice(b).map_err(|_| Bad::Malformed)?;
            let olen = outer.slice().len();
            let ototal = usize::from(outer.total_len());
            if ototal < olen
                || ototal > b.len()
                || outer.more_fragments()
                || outer.fragments_offset().value() != 0
            {
                return Err(Bad::Malformed);
            }
            if outer.protocol().0 != IPPROTO_IPIP {
                return Err(Bad::OuterHeader);
            }
            let inner = Ip::parse(&b[olen..ototal], Family::V4)?;
            if finish(sum_bytes(0, outer.slice())) != 0 {
                return Err(Bad::OuterChecksum);
            }
            inner.checksums()?;
            inner.magic()?;
            if frame[field::ETH_DST] != expect.mac {
                return Err(Bad::DstMac);
            }
            if IpAddr::V4(Ipv4Addr::from(outer.source())) != gateway
                || IpAddr::V4(Ipv4Addr::from(outer.destination())) != expect.addr
            {
                return Err(Bad::OuterAddr);
            }
            let Header::V4(ih) = &inner.header else {
                return Err(Bad::Malformed);
            };
            if olen != 20
                || outer.ttl() != OUTER_TTL
                || outer.dcp().value() != ih.dcp().value()
                || outer.ecn().value() != ih.ecn().value()
                || outer.identification() != ih.identification()
                || outer.dont_fragment() != ih.dont_fragment()
                || ototal != olen + usize::from(ih.total_len())
            {
                return Err(Bad::OuterHeader);
            }
            inner
        }
        Family::V6 => {
            if b.len() < IPV6_LEN || b[0] >> 4 != 6 {
                return Err(Bad::Malformed);
            }
            let ototal = IPV6_LEN + usize::from(be16(b, 4));
            if ototal > b.len() {
                return Err(Bad::Malformed);
            }
            if b[6] != IPPROTO_IPV6 {
                return Err(Bad::OuterHeader);
            }
            let inner = Ip::parse(&b[IPV6_LEN..ototal], Family::V6)?;
            inner.checksums()?;
            inner.magic()?;
            if frame[field::ETH_DST] != expect.mac {
                return Err(Bad::DstMac);
            }
            let (s, d) = v6_addrs(b);
            if IpAddr::V6(Ipv6Addr::from(s)) != gateway
                || IpAddr::V6(Ipv6Addr::from(d)) != expect.addr
            {
                return Err(Bad::OuterAddr);
            }
            let ib = &b[IPV6_LEN..];
            let inner_total = IPV6_LEN + usize::from(be16(ib, 4));
            // Traffic class and flow label copied (the version nibble aside).
            if b[7] != OUTER_TTL
                || b[0] & 0x0f != ib[0] & 0x0f
                || b[1..4] != ib[1..4]
                || ototal != IPV6_LEN + inner_total
            {
                return Err(Bad::OuterHeader);
            }
            inner
        }
    };
    if inner.ttl() != TTL - 1 {
        return Err(Bad::Ttl);
    }
    let p = inner.probe();
    if p.flow >= expect.flows {
        return Err(Bad::Src);
    }
    if inner.dst() != layout::vip_ip(family, layout::flow_service(p.flow, services)) {
        return Err(Bad::DstAddr);
    }
    if p.dst_port != layout::SERVICE_PORT {
        return Err(Bad::DstPort);
    }
    if layout::flow_of_ip(inner.src(), p.src_port, expect.flows) != Some(p.flow) {
        return Err(Bad::Src);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly.

    use std::net::IpAddr;

    use clustergate_dataplane::flow::addr16;
    use clustergate_dataplane::packet::encap::encapsulate;
    use clustergate_dataplane::packet::parse::Family;
    use clustergate_dataplane::packet::rewrite::{
        adjust_checksum_at, decrement_ttl_ipv4, set_dst_port, set_ipv4_dst, set_ipv4_src, set_macs,
        set_src_port, L4Csum,
    };
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;
    use crate::layout::{
        backend_addr, backend_mac, flow_source, flow_source_ip, vip, CLIENT_MAC, GW_CLIENT_MAC,
    };

    const FLOWS: u32 = 100_000;

    fn fields(flow: u32, seq: u64, syn: bool) -> Fields {
        Fields {
            src: flow_source_ip(layout::Family::V4, flow),
            dst: (vip(3).into(), 80),
            flow,
            seq,
            ts: 0x0102_0304_0506_0708,
            syn,
        }
    }

    fn at_vip() -> Expect {
        Expect {
            mac: GW_CLIENT_MAC,
            addr: vip(3).into(),
            first_port: 80,
            last_port: 80,
            flows: FLOWS,
            path: PathExpect::Routed,
        }
    }

    fn build(proto: L4Proto, len: usize, f: &Fields) -> Vec<u8> {
        let t = Template::new(proto, len, CLIENT_MAC, GW_CLIENT_MAC).unwrap();
        let mut buf = vec![0xAAu8; 2048];
        assert_eq!(t.write(&mut buf, f), len);
        buf.truncate(len);
        buf
    }

    fn l4csum(proto: L4Proto) -> L4Csum {
        match proto {
            L4Proto::Udp => L4Csum::Udp,
            L4Proto::Tcp => L4Csum::Tcp,
        }
    }

    #[test]
    fn round_trip_udp_and_tcp_at_three_sizes() {
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            for len in [64, 128, 1500] {
                for (flow, seq, syn) in [(0, 0, true), (77_777, 1 << 40 | 5, false)] {
                    let f = fields(flow, seq, syn);
                    let frame = build(proto, len, &f);
                    let p = check(&frame, &at_vip()).unwrap();
                    let want_seq = match proto {
                        L4Proto::Udp => seq,
                        L4Proto::Tcp => u64::from(seq as u32),
                    };
                    assert_eq!(
                        p,
                        Probe {
                            flow,
                            seq: want_seq,
                            ts: f.ts,
                            proto,
                            src_port: flow_source(flow).1,
                            dst_port: 80,
                            syn: syn && proto == L4Proto::Tcp,
                        },
                        "{proto:?} {len}"
                    );
                    // An independent parser agrees on the headers and checksums.
                    let s = SlicedPacket::from_ethernet(&frame).unwrap();
                    let Some(NetSlice::Ipv4(ip)) = &s.net else {
                        panic!("not IPv4")
                    };
                    let h = ip.header().to_header();
                    assert!(h.dont_fragment);
                    assert_eq!(h.time_to_live, 64);
                    assert_eq!(h.header_checksum, h.calc_header_checksum());
                    assert_eq!(usize::from(h.total_len), len - 14);
                    match s.transport.unwrap() {
                        TransportSlice::Udp(u) => {
                            assert_eq!(proto, L4Proto::Udp);
                            let uh = u.to_header();
                            assert_eq!(
                                uh.checksum,
                                uh.calc_checksum_ipv4(&h, u.payload()).unwrap()
                            );
                        }
                        TransportSlice::Tcp(t) => {
                            assert_eq!(proto, L4Proto::Tcp);
                            assert_eq!(t.syn(), syn);
                            assert_eq!(t.ack(), !syn);
                            assert_eq!(t.window_size(), 65_535);
                            assert_eq!(t.acknowledgment_number(), flow);
                            let th = t.to_header();
                            assert_eq!(
                                th.checksum,
                                th.calc_checksum_ipv4(&h, t.payload()).unwrap()
                            );
                        }
                        _ => panic!("not UDP or TCP"),
                    }
                }
            }
        }
    }

    #[test]
    fn frame_sizes_out_of_range_are_refused() {
        for len in [0, 63, 1501] {
            assert!(Template::new(L4Proto::Udp, len, CLIENT_MAC, GW_CLIENT_MAC).is_err());
        }
        let t = Template::new(L4Proto::Udp, 128, CLIENT_MAC, GW_CLIENT_MAC).unwrap();
        assert_eq!(t.write(&mut [0u8; 127], &fields(0, 0, false)), 0);
    }

    /// The gateway's rewrite: dst MAC, address and port, incremental checksums.
    fn nat_to_backend(frame: &mut [u8], proto: L4Proto) {
        set_macs(frame, [2, 0, 0, 0, 0, 1], backend_mac(1)).unwrap();
        set_ipv4_dst(
            frame,
            14,
            Some((34, l4csum(proto))),
            backend_addr(1).octets(),
        )
        .unwrap();
        set_dst_port(frame, 34, l4csum(proto), 8080).unwrap();
    }

    fn at_backend() -> Expect {
        Expect {
            mac: backend_mac(1),
            addr: backend_addr(1).into(),
            first_port: 8080,
            last_port: 8089,
            flows: FLOWS,
            path: PathExpect::Routed,
        }
    }

    #[test]
    fn a_rewrite_with_incremental_checksums_passes() {
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            for len in [64, 128, 1500] {
                let mut frame = build(proto, len, &fields(4242, 99, false));
                assert_eq!(check(&frame, &at_backend()), Err(Bad::DstMac));
                nat_to_backend(&mut frame, proto);
                let p = check(&frame, &at_backend()).unwrap();
                assert_eq!((p.flow, p.seq, p.dst_port), (4242, 99, 8080));
            }
        }
    }

    #[test]
    fn every_corruption_gives_its_variant() {
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            let mut good = build(proto, 128, &fields(12, 34, false));
            nat_to_backend(&mut good, proto);
            let e = at_backend();
            assert!(check(&good, &e).is_ok());
            let csum_at = match proto {
                L4Proto::Udp => 40,
                L4Proto::Tcp => 50,
            };
            let payload_at = match proto {
                L4Proto::Udp => 42,
                L4Proto::Tcp => 54,
            };

            let mut f = good.clone();
            f[25] ^= 0x01;
            assert_eq!(check(&f, &e), Err(Bad::IpChecksum), "{proto:?}");

            let mut f = good.clone();
            f[csum_at + 1] ^= 0x01;
            assert_eq!(check(&f, &e), Err(Bad::L4Checksum), "{proto:?}");

            // A corrupted payload byte (no checksum fix) is a checksum error.
            let mut f = good.clone();
            f[100] ^= 0x40;
            assert_eq!(check(&f, &e), Err(Bad::L4Checksum), "{proto:?}");

            // A source port that is not the flow's, checksum kept right.
            let mut f = good.clone();
            set_src_port(&mut f, 34, l4csum(proto), 1024 + 13).unwrap();
            assert_eq!(check(&f, &e), Err(Bad::Src), "{proto:?}");

            // A flow id beyond --flows.
            assert_eq!(
                check(&good, &Expect { flows: 12, ..e }),
                Err(Bad::Src),
                "{proto:?}"
            );

            let mut f = good.clone();
            set_ipv4_dst(
                &mut f,
                14,
                Some((34, l4csum(proto))),
                backend_addr(2).octets(),
            )
            .unwrap();
            assert_eq!(check(&f, &e), Err(Bad::DstAddr), "{proto:?}");

            let mut f = good.clone();
            set_dst_port(&mut f, 34, l4csum(proto), 8090).unwrap();
            assert_eq!(check(&f, &e), Err(Bad::DstPort), "{proto:?}");
            set_dst_port(&mut f, 34, l4csum(proto), 8089).unwrap();
            assert!(check(&f, &e).is_ok(), "{proto:?}: last port of the range");

            let mut f = good.clone();
            let old = [f[payload_at], f[payload_at + 1]];
            let new = [0xCB, 0x07];
            f[payload_at..payload_at + 2].copy_from_slice(&new);
            adjust_checksum_at(&mut f, csum_at, &old, &new).unwrap();
            assert_eq!(check(&f, &e), Err(Bad::Magic), "{proto:?}");

            let mut f = good.clone();
            f[5] ^= 0x01;
            assert_eq!(check(&f, &e), Err(Bad::DstMac), "{proto:?}");

            for cut in [0, 13, 14, 33, 40, 60, 127] {
                assert_eq!(
                    check(&good[..cut], &e),
                    Err(Bad::Malformed),
                    "{proto:?} {cut}"
                );
            }
        }
    }

    #[test]
    fn udp_without_checksum_is_bad() {
        let mut f = build(L4Proto::Udp, 64, &fields(1, 1, false));
        f[40..42].fill(0);
        assert_eq!(check(&f, &at_vip()), Err(Bad::L4Checksum));
    }

    #[test]
    fn ihl_and_lengths_must_agree() {
        let good = build(L4Proto::Udp, 128, &fields(5, 6, false));
        let fix_ip = |f: &mut Vec<u8>| {
            f[24..26].fill(0);
            let c = ipv4_header_checksum(&f[14..14 + usize::from(f[14] & 0xf) * 4]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        };
        // IHL 6 without an option: the UDP header is read 4 bytes late, its
        // length no longer matches.
        let mut f = good.clone();
        f[14] = 0x46;
        fix_ip(&mut f);
        assert_eq!(check(&f, &at_vip()), Err(Bad::Malformed));
        // IHL 4.
        let mut f = good.clone();
        f[14] = 0x44;
        assert_eq!(check(&f, &at_vip()), Err(Bad::Malformed));
        // IHL 15 in a 128-byte frame with total length 20.
        let mut f = good.clone();
        f[14] = 0x4f;
        f[16..18].copy_from_slice(&20u16.to_be_bytes());
        fix_ip(&mut f);
        assert_eq!(check(&f, &at_vip()), Err(Bad::Malformed));
        // Total length beyond the frame.
        let mut f = good.clone();
        f[16..18].copy_from_slice(&200u16.to_be_bytes());
        fix_ip(&mut f);
        assert_eq!(check(&f, &at_vip()), Err(Bad::Malformed));
        // A real 4-byte option (NOPs), lengths fixed: accepted.
        let mut f = good[..34].to_vec();
        f.extend_from_slice(&[1, 1, 1, 1]);
        f.extend_from_slice(&good[34..]);
        f[14] = 0x46;
        f[16..18].copy_from_slice(&(128u16 - 14 + 4).to_be_bytes());
        fix_ip(&mut f);
        assert!(check(&f, &at_vip()).is_ok());
        // Not IPv4.
        let mut f = good;
        f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        assert_eq!(check(&f, &at_vip()), Err(Bad::Malformed));
    }

    const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

    fn at_backend_snat() -> Expect {
        Expect {
            path: PathExpect::Snat {
                addr: GW.into(),
                lo: 1024,
                hi: 29_999,
            },
            ..at_backend()
        }
    }

    /// The gateway's source NAT on top of `nat_to_backend`.
    fn snat(frame: &mut [u8], proto: L4Proto, addr: Ipv4Addr, port: u16) {
        set_ipv4_src(frame, 14, Some((34, l4csum(proto))), addr.octets()).unwrap();
        set_src_port(frame, 34, l4csum(proto), port).unwrap();
    }

    #[test]
    fn source_nat_is_checked_by_address_range_and_payload_flow() {
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            let mut good = build(proto, 128, &fields(4242, 99, false));
            nat_to_backend(&mut good, proto);
            let e = at_backend_snat();
            // Unchanged source: not the gateway's.
            assert_eq!(check(&good, &e), Err(Bad::SnatAddr), "{proto:?}");
            snat(&mut good, proto, GW, 20_000);
            let p = check(&good, &e).unwrap();
            assert_eq!(
                (p.flow, p.seq, p.src_port, p.dst_port),
                (4242, 99, 20_000, 8080),
                "{proto:?}"
            );
            // The routed check would refuse it: the source is not the flow's.
            assert_eq!(check(&good, &at_backend()), Err(Bad::Src), "{proto:?}");

            let mut f = good.clone();
            snat(&mut f, proto, Ipv4Addr::new(198, 18, 2, 2), 20_000);
            assert_eq!(check(&f, &e), Err(Bad::SnatAddr), "{proto:?}");
            for port in [1023, 30_000] {
                let mut f = good.clone();
                snat(&mut f, proto, GW, port);
                assert_eq!(check(&f, &e), Err(Bad::SnatPort), "{proto:?} {port}");
            }
            for port in [1024, 29_999] {
                let mut f = good.clone();
                snat(&mut f, proto, GW, port);
                assert!(check(&f, &e).is_ok(), "{proto:?} {port}");
            }
            // A flow id the generator does not send.
            assert_eq!(
                check(&good, &Expect { flows: 4242, ..e }),
                Err(Bad::Src),
                "{proto:?}"
            );
            // Destination and checksums are still checked.
            let mut f = good.clone();
            set_dst_port(&mut f, 34, l4csum(proto), 8090).unwrap();
            assert_eq!(check(&f, &e), Err(Bad::DstPort), "{proto:?}");
            let mut f = good.clone();
            f[100] ^= 1;
            assert_eq!(check(&f, &e), Err(Bad::L4Checksum), "{proto:?}");
        }
    }

    fn at_backend_dsr(services: u32) -> Expect {
        Expect {
            path: PathExpect::Dsr {
                gateway: GW.into(),
                services,
            },
            ..at_backend()
        }
    }

    /// The gateway's DSR: MACs, TTL − 1, then the product's own encapsulation.
    fn dsr(frame: &[u8]) -> Vec<u8> {
        let mut buf = frame.to_vec();
        buf.resize(frame.len() + 64, 0);
        set_macs(&mut buf, [2, 0, 0, 0, 0, 1], backend_mac(1)).unwrap();
        assert_eq!(decrement_ttl_ipv4(&mut buf, 14).unwrap(), TTL - 1);
        let a16 = |a: Ipv4Addr| addr16(IpAddr::V4(a));
        let len = encapsulate(
            &mut buf,
            Family::V4,
            14,
            frame.len(),
            &a16(GW),
            &a16(backend_addr(1)),
        )
        .unwrap();
        buf.truncate(len);
        buf
    }

    /// Rewrites the outer header's byte `at` (from the IP header) and fixes
    /// its checksum.
    fn outer_set(f: &mut [u8], at: usize, v: u8) {
        f[14 + at] = v;
        f[24..26].fill(0);
        let c = ipv4_header_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn dsr_is_checked_outside_and_inside() {
        for proto in [L4Proto::Udp, L4Proto::Tcp] {
            for len in [64, 1480] {
                // Flow 4243 goes to service 4243 % 8 = 3, the VIP `fields` uses.
                let plain = build(proto, len, &fields(4243, 7, true));
                let good = dsr(&plain);
                assert_eq!(good.len(), len + 20);
                let e = at_backend_dsr(8);
                let p = check(&good, &e).unwrap();
                assert_eq!(
                    (p.flow, p.seq, p.src_port, p.dst_port, p.syn),
                    (4243, 7, flow_source(4243).1, 80, proto == L4Proto::Tcp),
                    "{proto:?} {len}"
                );
                // Not encapsulated at all.
                let mut routed = plain.clone();
                nat_to_backend(&mut routed, proto);
                assert_eq!(check(&routed, &e), Err(Bad::OuterHeader), "{proto:?}");
                // The flow's service is another VIP.
                assert_eq!(
                    check(&good, &at_backend_dsr(7)),
                    Err(Bad::DstAddr),
                    "{proto:?}"
                );

                let mut f = good.clone();
                f[25] ^= 1;
                assert_eq!(check(&f, &e), Err(Bad::OuterChecksum), "{proto:?}");
                let mut f = good.clone();
                f[45] ^= 1;
                assert_eq!(check(&f, &e), Err(Bad::IpChecksum), "{proto:?}");
                let mut f = good.clone();
                f[len] ^= 0x40;
                assert_eq!(check(&f, &e), Err(Bad::L4Checksum), "{proto:?}");
                // Outer source and destination.
                let mut f = good.clone();
                outer_set(&mut f, 15, 2);
                assert_eq!(check(&f, &e), Err(Bad::OuterAddr), "{proto:?}");
                let mut f = good.clone();
                outer_set(&mut f, 19, 12);
                assert_eq!(check(&f, &e), Err(Bad::OuterAddr), "{proto:?}");
                // TTL, TOS, ID, DF.
                for (at, v) in [(8, 63), (1, 4), (5, 1), (6, 0)] {
                    let mut f = good.clone();
                    outer_set(&mut f, at, v);
                    assert_eq!(check(&f, &e), Err(Bad::OuterHeader), "{proto:?} {at}");
                }
                // Another protocol number.
                let mut f = good.clone();
                outer_set(&mut f, 9, 41);
                assert_eq!(check(&f, &e), Err(Bad::OuterHeader), "{proto:?}");
                // The inner TTL as sent, checksum kept right.
                let mut f = good.clone();
                f[34 + 8] = TTL;
                f[44..46].fill(0);
                let c = ipv4_header_checksum(&f[34..54]);
                f[44..46].copy_from_slice(&c.to_be_bytes());
                assert_eq!(check(&f, &e), Err(Bad::Ttl), "{proto:?}");
                // MAC.
                let mut f = good.clone();
                f[0] ^= 2;
                assert_eq!(check(&f, &e), Err(Bad::DstMac), "{proto:?}");
                for cut in [14, 33, 40, 53, 60] {
                    assert_eq!(check(&good[..cut], &e), Err(Bad::Malformed), "{cut}");
                }
            }
        }
    }

    #[test]
    fn bad_index_matches_all() {
        for (i, b) in Bad::ALL.iter().enumerate() {
            assert_eq!(b.index(), i);
        }
    }

    mod ipv6 {
        use clustergate_dataplane::packet::rewrite::{
            decrement_hop_limit_ipv6, set_ipv6_dst, set_ipv6_src,
        };

        use super::*;
        use crate::layout::{backend_ip, gw_lan_ip, vip_ip, Family as Fam};

        fn v6(a: IpAddr) -> [u8; 16] {
            match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(_) => panic!("{a} is not IPv6"),
            }
        }

        fn csum6(proto: L4Proto) -> L4Csum {
            match proto {
                L4Proto::Udp => L4Csum::Udp6,
                L4Proto::Tcp => L4Csum::Tcp,
            }
        }

        fn build6(proto: L4Proto, len: usize, flow: u32, services: u32) -> Vec<u8> {
            let t = Template::new_in(Fam::V6, proto, len, CLIENT_MAC, GW_CLIENT_MAC).unwrap();
            let f = Fields {
                src: flow_source_ip(Fam::V6, flow),
                dst: (vip_ip(Fam::V6, layout::flow_service(flow, services)), 80),
                flow,
                seq: 9,
                ts: 77,
                syn: true,
            };
            let mut buf = vec![0xAAu8; 2048];
            assert_eq!(t.write(&mut buf, &f), len);
            // Not of the template's family: nothing written.
            let v4 = Fields {
                src: (IpAddr::V4(Ipv4Addr::new(198, 18, 1, 16)), 1024),
                ..f
            };
            assert_eq!(t.write(&mut vec![0u8; 2048], &v4), 0);
            buf.truncate(len);
            buf
        }

        fn at_backend6(path: PathExpect) -> Expect {
            Expect {
                mac: backend_mac(1),
                addr: backend_ip(Fam::V6, 1),
                first_port: 8080,
                last_port: 8080,
                flows: FLOWS,
                path,
            }
        }

        /// The gateway's DNAT over IPv6: MACs, hop limit − 1, destination
        /// address and port with incremental checksum updates.
        fn dnat6(frame: &mut [u8], proto: L4Proto) {
            set_macs(frame, [2, 0, 0, 0, 0, 1], backend_mac(1)).unwrap();
            decrement_hop_limit_ipv6(frame, 14).unwrap();
            set_ipv6_dst(
                frame,
                14,
                Some((54, csum6(proto))),
                v6(backend_ip(Fam::V6, 1)),
            )
            .unwrap();
            set_dst_port(frame, 54, csum6(proto), 8080).unwrap();
        }

        #[test]
        fn ipv6_frames_round_trip_and_agree_with_etherparse() {
            assert!(matches!(
                Template::new_in(Fam::V6, L4Proto::Udp, 83, CLIENT_MAC, GW_CLIENT_MAC),
                Err(WireError::FrameSize(83, 84))
            ));
            for proto in [L4Proto::Udp, L4Proto::Tcp] {
                for len in [84, 128, 1500] {
                    let frame = build6(proto, len, 70_001, 1);
                    let e = Expect {
                        mac: GW_CLIENT_MAC,
                        addr: vip_ip(Fam::V6, 0),
                        first_port: 80,
                        last_port: 80,
                        flows: FLOWS,
                        path: PathExpect::Routed,
                    };
                    let p = check(&frame, &e).unwrap();
                    assert_eq!((p.flow, p.dst_port, p.proto), (70_001, 80, proto));
                    let s = SlicedPacket::from_ethernet(&frame).unwrap();
                    let Some(NetSlice::Ipv6(ip)) = &s.net else {
                        panic!("not IPv6")
                    };
                    let h = ip.header().to_header();
                    assert_eq!(h.hop_limit, 64);
                    assert_eq!(usize::from(h.payload_length), len - 54);
                    match s.transport.unwrap() {
                        TransportSlice::Udp(u) => {
                            let uh = u.to_header();
                            assert_eq!(
                                uh.checksum,
                                uh.calc_checksum_ipv6(&h, u.payload()).unwrap()
                            );
                        }
                        TransportSlice::Tcp(t) => {
                            let th = t.to_header();
                            assert_eq!(
                                th.checksum,
                                th.calc_checksum_ipv6(&h, t.payload()).unwrap()
                            );
                        }
                        _ => panic!("not UDP or TCP"),
                    }
                    // A flipped payload bit is a checksum error.
                    let mut f = frame.clone();
                    f[len - 1] ^= 1;
                    assert_eq!(check(&f, &e), Err(Bad::L4Checksum));
                    // Expecting the IPv4 VIP: the wrong destination.
                    let e4 = Expect {
                        addr: vip(0).into(),
                        ..e
                    };
                    assert_eq!(check(&frame, &e4), Err(Bad::DstAddr));
                    for cut in [14, 53, 60, 83] {
                        assert_eq!(check(&frame[..cut], &e), Err(Bad::Malformed), "{cut}");
                    }
                }
            }
        }

        #[test]
        fn ipv6_routed_snat_and_dsr_are_checked() {
            let gw = gw_lan_ip(Fam::V6);
            for proto in [L4Proto::Udp, L4Proto::Tcp] {
                let plain = build6(proto, 128, 4243, 8);
                // Routed.
                let mut routed = plain.clone();
                dnat6(&mut routed, proto);
                assert!(check(&routed, &at_backend6(PathExpect::Routed)).is_ok());
                let mut f = routed.clone();
                set_src_port(&mut f, 54, csum6(proto), 1024 + 13).unwrap();
                assert_eq!(check(&f, &at_backend6(PathExpect::Routed)), Err(Bad::Src));
                // SNAT.
                let snat = PathExpect::Snat {
                    addr: gw,
                    lo: 1024,
                    hi: 29_999,
                };
                let mut f = routed.clone();
                set_ipv6_src(&mut f, 14, Some((54, csum6(proto))), v6(gw)).unwrap();
                set_src_port(&mut f, 54, csum6(proto), 5000).unwrap();
                assert_eq!(check(&f, &at_backend6(snat)).unwrap().src_port, 5000);
                assert_eq!(check(&routed, &at_backend6(snat)), Err(Bad::SnatAddr));
                // DSR: IPv6 in IPv6 from the gateway, inner hop limit 63.
                let dsr = PathExpect::Dsr {
                    gateway: gw,
                    services: 8,
                };
                let mut buf = plain.clone();
                buf.resize(plain.len() + 64, 0);
                set_macs(&mut buf, [2, 0, 0, 0, 0, 1], backend_mac(1)).unwrap();
                decrement_hop_limit_ipv6(&mut buf, 14).unwrap();
                let a16 = |a: IpAddr| addr16(a);
                let len = encapsulate(
                    &mut buf,
                    Family::V6,
                    14,
                    plain.len(),
                    &a16(gw),
                    &a16(backend_ip(Fam::V6, 1)),
                )
                .unwrap();
                buf.truncate(len);
                let p = check(&buf, &at_backend6(dsr)).unwrap();
                assert_eq!((p.flow, p.dst_port), (4243, 80));
                assert_eq!(check(&routed, &at_backend6(dsr)), Err(Bad::OuterHeader));
                let mut f = buf.clone();
                f[14 + 7] = 63;
                assert_eq!(check(&f, &at_backend6(dsr)), Err(Bad::OuterHeader));
                let mut f = buf.clone();
                f[14 + 2] ^= 1; // the flow label, not copied any more
                assert_eq!(check(&f, &at_backend6(dsr)), Err(Bad::OuterHeader));
                let mut f = buf.clone();
                f[14 + 39] ^= 1; // the outer destination
                assert_eq!(check(&f, &at_backend6(dsr)), Err(Bad::OuterAddr));
                let mut f = buf.clone();
                f[54 + 7] = 64; // the inner hop limit, not decremented
                assert_eq!(check(&f, &at_backend6(dsr)), Err(Bad::Ttl));
                assert_eq!(
                    check(
                        &buf,
                        &at_backend6(PathExpect::Dsr {
                            gateway: gw,
                            services: 7
                        })
                    ),
                    Err(Bad::DstAddr)
                );
            }
        }
    }
}
