//! Addresses and CIDRs read as kube-proxy reads them: k8s.io/utils/net's
//! `ParseIPSloppy` and `ParseCIDRSloppy` (Go's pre-1.17 `net.ParseIP` and
//! `net.ParseCIDR`).
//!
//! The one difference from a strict parser: an IPv4 part may have leading
//! zeros, read as *decimal* (`198.18.002.7` is 198.18.2.7, `010.0.0.1` is
//! 10.0.0.1, never octal), also in the IPv4 tail of an IPv6 address
//! (`::ffff:010.0.0.1`) and in a CIDR's prefix length (`10.0.0.0/08`). The API
//! server still stores such values in objects created before it validated
//! them strictly (KEP-4858), and kube-proxy serves them.
//!
//! Must never: panic on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// `ParseIPSloppy`: an IPv4 or IPv6 address, IPv4 parts with leading zeros
/// read as decimal. `None` for anything else (no surrounding whitespace, no
/// IPv6 zone).
#[must_use]
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    // Go decides by the first '.' or ':'.
    match s.bytes().find(|b| *b == b'.' || *b == b':')? {
        b'.' => parse_ipv4_sloppy(s).map(IpAddr::V4),
        _ => parse_ipv6_sloppy(s).map(IpAddr::V6),
    }
}

/// Four decimal parts of any length (Go's `dtoi`: value at most 255).
fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        if digits.len() > 3 {
            return None;
        }
        *octet = if digits.is_empty() {
            0
        } else {
            digits.parse::<u8>().ok()?
        };
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// An IPv6 address; a dotted IPv4 tail may have leading zeros.
fn parse_ipv6_sloppy(s: &str) -> Option<Ipv6Addr> {
    if let Ok(a) = s.parse::<Ipv6Addr>() {
        return Some(a);
    }
    let (head, tail) = s.rsplit_once(':')?;
    if !tail.contains('.') {
        return None;
    }
    let v4 = parse_ipv4_sloppy(tail)?;
    format!("{head}:{v4}").parse().ok()
}

/// `ParseCIDRSloppy`: `address/prefix`, the address as [`parse_ip_sloppy`],
/// the prefix length in decimal (leading zeros allowed) within the family's
/// bits. Host bits are kept (callers truncate).
#[must_use]
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    let addr = parse_ip_sloppy(addr)?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = len.trim_start_matches('0');
    let len: u8 = if digits.is_empty() {
        0
    } else if digits.len() > 3 {
        return None;
    } else {
        digits.parse().ok()?
    };
    IpNet::new(addr, len).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn ip(s: &str) -> Option<String> {
        parse_ip_sloppy(s).map(|a| a.to_string())
    }

    #[test]
    fn leading_zeros_are_decimal() {
        assert_eq!(ip("198.18.002.7").as_deref(), Some("198.18.2.7"));
        assert_eq!(ip("010.000.000.001").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip("0000010.0.0.09").as_deref(), Some("10.0.0.9"));
        assert_eq!(ip("::ffff:010.0.0.1").as_deref(), Some("::ffff:10.0.0.1"));
        assert_eq!(
            ip("2001:db8::010.0.0.1").as_deref(),
            Some("2001:db8::a00:1")
        );
    }

    #[test]
    fn strict_forms_are_unchanged() {
        for s in [
            "1.2.3.4",
            "0.0.0.0",
            "255.255.255.255",
            "2001:db8::1",
            "::",
            "::1",
        ] {
            assert_eq!(ip(s), Some(s.parse::<IpAddr>().unwrap().to_string()), "{s}");
        }
    }

    #[test]
    fn what_go_refuses_is_refused() {
        for s in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.0256",
            "1..3.4",
            "1.2.3.4 ",
            " 1.2.3.4",
            "0x1.2.3.4",
            "+1.2.3.4",
            "1.2.3.-4",
            "fe80::1%eth0",
            "2001:db8::g",
            "1.2.3.4:80",
            "a.b.c.d",
            "::1.2.3",
            "10.0.0.1/8",
            "None",
        ] {
            assert_eq!(ip(s), None, "{s:?}");
        }
    }

    #[test]
    fn cidrs_are_sloppy_too() {
        let net = |s: &str| parse_cidr_sloppy(s).map(|n| n.to_string());
        assert_eq!(net("10.000.0.0/08").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("198.18.002.0/24").as_deref(), Some("198.18.2.0/24"));
        assert_eq!(net("2001:db8::/0064").as_deref(), Some("2001:db8::/64"));
        assert_eq!(net("10.0.0.1/32").as_deref(), Some("10.0.0.1/32"));
        for s in [
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "x/8",
            "::/129",
            "10.0.0.0/8/8",
        ] {
            assert_eq!(net(s), None, "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_agrees_with_std_on_strict_ipv4(a: u8, b: u8, c: u8, d: u8, s in ".{0,40}") {
            let _ = parse_ip_sloppy(&s);
            let _ = parse_cidr_sloppy(&s);
            let text = format!("{a}.{b}.{c}.{d}");
            proptest::prop_assert_eq!(parse_ip_sloppy(&text), Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d))));
            let padded = format!("{a:03}.{b:03}.{c:03}.{d:03}");
            proptest::prop_assert_eq!(parse_ip_sloppy(&padded), Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d))));
        }
    }
}
