//! Flow identity and the flow hash.
//!
//! Owns: the [`FlowTuple`] (the 5-tuple as the gateway sees it), the transport
//! protocols we balance ([`Proto`]), and the hash functions whose output picks a
//! Maglev slot. These hash functions are **part of the ABI** (see
//! `docs/architecture.md`, "Flow hash"): every gateway of every version must map
//! the same tuple to the same value, so that several gateways behind ECMP pick the
//! same backend. Never change the byte layout or the seeds without bumping the
//! snapshot ABI version.
//!
//! Must never: read a clock, allocate, or depend on process-local randomness.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Transport protocols the gateway balances (the `protocol` of a Service port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Proto {
    /// TCP, IP protocol 6.
    Tcp = 6,
    /// UDP, IP protocol 17.
    Udp = 17,
    /// SCTP, IP protocol 132.
    Sctp = 132,
}

impl Proto {
    /// The protocol for an IP protocol number, if it is one we balance.
    #[must_use]
    pub const fn from_ip_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number (IANA).
    #[must_use]
    pub const fn ip_number(self) -> u8 {
        self as u8
    }

    /// The name Kubernetes uses in `ServicePort.protocol`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// An IP address in the gateway's canonical 16-byte form: IPv6 as is, IPv4 as an
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2).
pub type Addr16 = [u8; 16];

/// Maps an IPv4 address to its canonical 16-byte form.
#[must_use]
pub const fn v4_to_16(a: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Canonical 16-byte form of any address.
#[must_use]
pub fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => v4_to_16(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Back from the canonical form: IPv4-mapped addresses become IPv4.
#[must_use]
pub fn ip_from16(a: Addr16) -> IpAddr {
    if a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// A transport flow as it arrives at the gateway (source = the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// Sender's address, canonical 16-byte form.
    pub src_addr: Addr16,
    /// Receiver's address, canonical 16-byte form.
    pub dst_addr: Addr16,
    /// Sender's port (host order).
    pub src_port: u16,
    /// Receiver's port (host order).
    pub dst_port: u16,
    /// Transport protocol.
    pub proto: Proto,
}

impl FlowTuple {
    /// The same flow seen from the other end.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }

    /// The 37 bytes hashed by [`flow_hash`]: `src_addr[16] ‖ dst_addr[16] ‖
    /// src_port (big-endian) ‖ dst_port (big-endian) ‖ IP protocol number`.
    #[must_use]
    pub fn hash_input(&self) -> [u8; 37] {
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&self.src_addr);
        b[16..32].copy_from_slice(&self.dst_addr);
        b[32..34].copy_from_slice(&self.src_port.to_be_bytes());
        b[34..36].copy_from_slice(&self.dst_port.to_be_bytes());
        b[36] = self.proto.ip_number();
        b
    }
}

/// ABI: the flow hash that picks a Maglev slot for a new flow of a service
/// without session affinity: XXH3-64 (xxHash 0.8 specification) with `seed`
/// over [`FlowTuple::hash_input`]. The slot is `flow_hash % M`.
///
/// `seed` is the snapshot's flow-hash seed (default 0). Gateways that must agree
/// (the same ECMP group) must share the seed; a different seed reshuffles flows.
#[must_use]
#[inline]
pub fn flow_hash(seed: u64, t: &FlowTuple) -> u64 {
    xxh3_64_with_seed(&t.hash_input(), seed)
}

/// ABI: the hash that picks a Maglev slot for a service with ClientIP session
/// affinity: XXH3-64 with `seed` over the 16 canonical bytes of the client
/// address alone, so that every gateway sends one client to one backend.
#[must_use]
#[inline]
pub fn client_hash(seed: u64, client: &Addr16) -> u64 {
    xxh3_64_with_seed(client, seed)
}

/// ABI: seed of the hash that gives a backend its Maglev `offset`
/// (the ASCII bytes of "cg-mgl-o", big-endian).
pub const MAGLEV_OFFSET_SEED: u64 = u64::from_be_bytes(*b"cg-mgl-o");
/// ABI: seed of the hash that gives a backend its Maglev `skip`
/// (the ASCII bytes of "cg-mgl-s", big-endian).
pub const MAGLEV_SKIP_SEED: u64 = u64::from_be_bytes(*b"cg-mgl-s");

/// ABI: the 18 bytes that identify a backend in Maglev's permutation:
/// `addr[16] (canonical) ‖ port (big-endian)`.
#[must_use]
pub fn backend_id(addr: &Addr16, port: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..16].copy_from_slice(addr);
    b[16..].copy_from_slice(&port.to_be_bytes());
    b
}

/// ABI: a backend's Maglev `(offset, skip)` for a ring of prime size `m` (NSDI
/// 2016, §3.4): `offset = h1(id) mod M`, `skip = h2(id) mod (M − 1) + 1`, with
/// `h1`, `h2` = XXH3-64 of [`backend_id`] seeded with [`MAGLEV_OFFSET_SEED`] and
/// [`MAGLEV_SKIP_SEED`].
///
/// # Panics
/// If `m < 2` (a ring needs at least two slots for a skip to exist).
#[must_use]
pub fn maglev_offset_skip(addr: &Addr16, port: u16, m: u32) -> (u32, u32) {
    assert!(m >= 2, "Maglev ring size must be at least 2, got {m}");
    let id = backend_id(addr, port);
    let m64 = u64::from(m);
    let offset = xxh3_64_with_seed(&id, MAGLEV_OFFSET_SEED) % m64;
    let skip = xxh3_64_with_seed(&id, MAGLEV_SKIP_SEED) % (m64 - 1) + 1;
    (offset as u32, skip as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn tuple() -> FlowTuple {
        FlowTuple {
            src_addr: v4_to_16([198, 18, 0, 1]),
            dst_addr: v4_to_16([198, 19, 0, 10]),
            src_port: 40000,
            dst_port: 80,
            proto: Proto::Tcp,
        }
    }

    /// Golden values: if one of these changes, gateways of different versions
    /// stop agreeing on backends. That is an ABI break.
    #[test]
    fn flow_hash_is_frozen() {
        let t = tuple();
        assert_eq!(
            t.hash_input(),
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0xff, 0xff, 198, 19, 0, 10, 0x9c, 0x40, 0, 80, 6
            ]
        );
        assert_eq!(flow_hash(0, &t), GOLDEN_FLOW_HASH_SEED0);
        assert_eq!(flow_hash(42, &t), GOLDEN_FLOW_HASH_SEED42);
        assert_eq!(client_hash(0, &t.src_addr), GOLDEN_CLIENT_HASH_SEED0);
        assert_eq!(
            maglev_offset_skip(&t.dst_addr, 8080, 65537),
            GOLDEN_OFFSET_SKIP
        );
    }

    const GOLDEN_FLOW_HASH_SEED0: u64 = 4_632_304_806_779_547_149;
    const GOLDEN_FLOW_HASH_SEED42: u64 = 2_934_156_188_560_300_827;
    const GOLDEN_CLIENT_HASH_SEED0: u64 = 13_066_249_307_991_619_832;
    const GOLDEN_OFFSET_SKIP: (u32, u32) = (18540, 31199);

    #[test]
    fn seed_changes_hash() {
        let t = tuple();
        assert_ne!(flow_hash(0, &t), flow_hash(1, &t));
    }

    #[test]
    fn reversed_twice_is_identity() {
        let t = tuple();
        assert_eq!(t.reversed().reversed(), t);
        assert_ne!(t.reversed(), t);
    }

    #[test]
    fn addr_roundtrip() {
        for ip in ["198.18.0.1", "2001:db8::1", "::ffff:198.18.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = ip_from16(addr16(ip));
            assert_eq!(addr16(back), addr16(ip));
        }
        assert_eq!(
            ip_from16(v4_to_16([198, 18, 0, 1])),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
        );
    }

    #[test]
    fn skip_is_never_zero_and_offset_in_range() {
        for p in 0..2000u16 {
            let (o, s) = maglev_offset_skip(&v4_to_16([198, 18, 1, (p % 251) as u8]), p, 251);
            assert!(o < 251);
            assert!((1..251).contains(&s));
        }
    }
}
