//! The benchmark network's fixed layout, shared by every subcommand: names,
//! addresses, MACs, the services' VIPs and the pktgen's flows. Everything is
//! in 198.18.0.0/15 (RFC 2544's benchmarking range) and every MAC is locally
//! administered, so nothing here can collide with a real network.
//!
//! ```text
//!  PREFIX-cli          PREFIX-gw                 PREFIX-lan         PREFIX-bI
//!  c0 198.18.1.2 ── g0 198.18.1.1 | g1 198.18.2.1 ── l0 [br0] lI ── e0 198.18.2.(10+I)
//! ```
//!
//! VIPs are 198.19.(k / 256).(k % 256) port 80 for service k; every
//! endpoint listens on port [`BACKEND_PORT`] (the sinks accept a range
//! starting there, for the update-latency scenario).
//!
//! IPv6 (`--family 6`) mirrors it in 2001:2::/48 (RFC 5180, the IPv6
//! benchmarking range): the client link is 2001:2:0:1::/64 (c0 ::2, g0
//! ::1), the backend LAN 2001:2:0:2::/64 (g1 ::1, backend I ::(10+I)),
//! service k's VIP 2001:2:0:100::((k + 1) / 65536):((k + 1) % 65536), and flow f's
//! source 2001:2:0:1::1:(f / 64000) with the same ports as IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address family of the traffic (`--family 4|6`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum Family {
    /// IPv4, in 198.18.0.0/15.
    #[default]
    #[serde(rename = "4")]
    V4,
    /// IPv6, in 2001:2::/48.
    #[serde(rename = "6")]
    V6,
}

impl Family {
    /// 4 or 6.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::V4 => 4,
            Self::V6 => 6,
        }
    }
}

/// `--family`: 4 or 6.
///
/// # Errors
/// Anything else.
pub fn parse_family(s: &str) -> Result<Family, String> {
    match s.trim() {
        "4" | "ipv4" => Ok(Family::V4),
        "6" | "ipv6" => Ok(Family::V6),
        _ => Err(format!("{s:?}: 4 or 6")),
    }
}

const fn v6(seg: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    )
}

/// The client's IPv6 address on c0.
pub const CLIENT_ADDR6: Ipv6Addr = v6([0x2001, 2, 0, 1, 0, 0, 0, 2]);
/// The gateway's client-side IPv6 address (g0).
pub const GW_CLIENT_ADDR6: Ipv6Addr = v6([0x2001, 2, 0, 1, 0, 0, 0, 1]);
/// The gateway's backend-side IPv6 address (g1).
pub const GW_LAN_ADDR6: Ipv6Addr = v6([0x2001, 2, 0, 2, 0, 0, 0, 1]);
/// The backends' IPv6 subnet (the "cluster CIDR" of kube-proxy's masquerade rule).
pub const LAN_NET6: &str = "2001:2:0:2::/64";
/// Where the IPv6 VIPs are.
pub const VIP_NET6: &str = "2001:2:0:100::/64";

/// Backend `i` (1-based) address of `family`.
#[must_use]
pub fn backend_ip(family: Family, i: u32) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(backend_addr(i)),
        Family::V6 => IpAddr::V6(v6([0x2001, 2, 0, 2, 0, 0, 0, 10 + i as u16])),
    }
}

/// Service `k`'s VIP of `family` (IPv6: 2001:2:0:100::(k + 1)).
#[must_use]
pub fn vip_ip(family: Family, k: u32) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(vip(k)),
        Family::V6 => {
            // k + 1: no VIP with an all-zero interface ID (the subnet-router anycast).
            let n = k + 1;
            IpAddr::V6(v6([0x2001, 2, 0, 0x100, 0, 0, (n >> 16) as u16, n as u16]))
        }
    }
}

/// The gateway's backend-side address (g1) of `family`.
#[must_use]
pub fn gw_lan_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(GW_LAN_ADDR),
        Family::V6 => IpAddr::V6(GW_LAN_ADDR6),
    }
}

/// Flow `f`'s client side of `family` (IPv6: 2001:2:0:1::1:(f / 64000)).
#[must_use]
pub fn flow_source_ip(family: Family, f: u32) -> (IpAddr, u16) {
    let (a, p) = flow_source(f);
    match family {
        Family::V4 => (IpAddr::V4(a), p),
        Family::V6 => (
            IpAddr::V6(v6([
                0x2001,
                2,
                0,
                1,
                0,
                0,
                1,
                (f / PORTS_PER_SOURCE) as u16,
            ])),
            p,
        ),
    }
}

/// The flow whose source is (addr, port), of either family.
#[must_use]
pub fn flow_of_ip(addr: IpAddr, port: u16, flows: u32) -> Option<u32> {
    match addr {
        IpAddr::V4(a) => flow_of(a, port, flows),
        IpAddr::V6(a) => {
            let s = a.segments();
            let hi = u32::from(s[7]);
            let lo = u32::from(port).checked_sub(u32::from(FIRST_SOURCE_PORT))?;
            let f = hi * PORTS_PER_SOURCE + lo;
            (s[..7] == [0x2001, 2, 0, 1, 0, 0, 1] && lo < PORTS_PER_SOURCE && f < flows)
                .then_some(f)
        }
    }
}

/// Most backends a topology can have.
pub const MAX_BACKENDS: u32 = 16;
/// Most services a scenario can have (VIPs 198.19.0.0–198.19.255.255).
pub const MAX_SERVICES: u32 = 65_536;
/// Most pktgen flows (source addresses × source ports).
pub const MAX_FLOWS: u32 = 4_000_000;
/// The service port of every VIP.
pub const SERVICE_PORT: u16 = 80;
/// The port every endpoint listens on (the first of the sinks' range).
pub const BACKEND_PORT: u16 = 8080;
/// Source ports per source address: 1024..=64999.
pub const PORTS_PER_SOURCE: u32 = 64_000;
/// The first source port.
pub const FIRST_SOURCE_PORT: u16 = 1024;

/// The client's address on c0.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The gateway's client-side address (g0).
pub const GW_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The gateway's backend-side address (g1).
pub const GW_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

/// MTU of the backend LAN (g1, the bridge, the backends' e0): room for a
/// 1500-byte packet and DSR's 20-byte outer header. The client side (c0, g0)
/// keeps 1500.
pub const LAN_MTU: u16 = 1520;

/// c0's MAC.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xcb, 0x01, 0, 0, 2];
/// g0's MAC.
pub const GW_CLIENT_MAC: [u8; 6] = [0x02, 0xcb, 0x01, 0, 0, 1];
/// g1's MAC.
pub const GW_LAN_MAC: [u8; 6] = [0x02, 0xcb, 0x02, 0, 0, 1];

/// Backend `i` (1-based) address on its e0.
#[must_use]
pub fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, 10 + i as u8)
}

/// Backend `i` (1-based) e0's MAC.
#[must_use]
pub fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0xcb, 0x02, 0, 0, 10 + i as u8]
}

/// Service `k`'s VIP (k < [`MAX_SERVICES`]).
#[must_use]
pub fn vip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (k >> 8) as u8, k as u8)
}

/// Flow `f`'s client side: source address 198.18.1.(16 + f / 64000) and
/// source port 1024 + f % 64000. (With [`MAX_FLOWS`] the address stays
/// below 198.18.1.80.)
#[must_use]
pub fn flow_source(f: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(198, 18, 1, 16 + (f / PORTS_PER_SOURCE) as u8),
        FIRST_SOURCE_PORT + (f % PORTS_PER_SOURCE) as u16,
    )
}

/// The flow whose source is (addr, port), if it is one of `flows`.
#[must_use]
pub fn flow_of(addr: Ipv4Addr, port: u16, flows: u32) -> Option<u32> {
    let o = addr.octets();
    let hi = u32::from(o[3]).checked_sub(16)?;
    let lo = u32::from(port).checked_sub(u32::from(FIRST_SOURCE_PORT))?;
    let f = hi * PORTS_PER_SOURCE + lo;
    (o[..3] == [198, 18, 1] && lo < PORTS_PER_SOURCE && f < flows).then_some(f)
}

/// Flow `f` goes to service `f % services`.
#[must_use]
pub fn flow_service(f: u32, services: u32) -> u32 {
    f % services.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_and_services_round_trip() {
        for f in [0, 1, 63_999, 64_000, 1_000_000, MAX_FLOWS - 1] {
            let (a, p) = flow_source(f);
            assert_eq!(flow_of(a, p, MAX_FLOWS), Some(f), "{a}:{p}");
        }
        assert_eq!(flow_of(CLIENT_ADDR, 1024, MAX_FLOWS), None);
        assert_eq!(
            flow_of(flow_source(10).0, 1024 + 10, 10),
            None,
            "beyond the flow count"
        );
        assert_eq!(vip(0), Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(vip(MAX_SERVICES - 1), Ipv4Addr::new(198, 19, 255, 255));
        assert_eq!(backend_addr(MAX_BACKENDS), Ipv4Addr::new(198, 18, 2, 26));
    }

    #[test]
    fn ipv6_layout_stays_in_the_benchmarking_range() {
        let range = |a: IpAddr| match a {
            IpAddr::V6(a) => a.segments()[..3] == [0x2001, 2, 0],
            IpAddr::V4(_) => false,
        };
        for f in [0, 1, 63_999, 64_000, 1_000_000, MAX_FLOWS - 1] {
            let (a, p) = flow_source_ip(Family::V6, f);
            assert!(range(a), "{a}");
            assert_eq!(flow_of_ip(a, p, MAX_FLOWS), Some(f), "{a}:{p}");
            let (a4, p4) = flow_source_ip(Family::V4, f);
            assert_eq!(flow_of_ip(a4, p4, MAX_FLOWS), Some(f));
        }
        assert_eq!(flow_of_ip(IpAddr::V6(CLIENT_ADDR6), 1024, MAX_FLOWS), None);
        for a in [
            vip_ip(Family::V6, 0),
            vip_ip(Family::V6, MAX_SERVICES - 1),
            backend_ip(Family::V6, MAX_BACKENDS),
            gw_lan_ip(Family::V6),
        ] {
            assert!(range(a), "{a}");
        }
        assert_eq!(vip_ip(Family::V6, 65_537).to_string(), "2001:2:0:100::1:2");
        assert_eq!(backend_ip(Family::V6, 1).to_string(), "2001:2:0:2::b");
        assert_eq!(parse_family("6"), Ok(Family::V6));
        assert!(parse_family("5").is_err());
    }
}
