//! The gateway's own side of source NAT and direct server return: which
//! address a flow leaves the gateway with, and which ports source NAT may use.
//!
//! Owns: [`PortRange`] (`--snat-ports LO-HI`), its split between the workers
//! ([`PortRange::split`]; a reply's port names the worker that allocated it,
//! [`PortRange::owner`]), the default range, chosen around the node's
//! `ip_local_port_range` and the NodePort range ([`default_range`]),
//! [`SourceAddrs`] (the address the kernel would choose for a destination, as
//! MASQUERADE does, from the I/O layer's routes), and [`ReturnConfig`], what
//! one worker needs to know.
//!
//! Must never: read a file, a clock or the kernel's tables (the caller reads
//! `ip_local_port_range` and the routes), or allocate per packet.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use std::fmt;
use std::str::FromStr;

use crate::flow::{ip_from16, Addr16};

/// The NodePort range Kubernetes uses by default (`--service-node-port-range`):
/// a reply to a node port would be taken for a new connection, so the default
/// SNAT range avoids it.
pub const NODE_PORTS: PortRange = PortRange {
    lo: 30_000,
    hi: 32_767,
};

/// Ports below this are privileged and never chosen by default.
pub const FIRST_UNPRIVILEGED: u16 = 1024;

/// Linux's default `net.ipv4.ip_local_port_range`.
pub const LINUX_LOCAL_PORTS: PortRange = PortRange {
    lo: 32_768,
    hi: 60_999,
};

/// An inclusive range of ports, never containing port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    /// `lo..=hi`, if `1 <= lo <= hi`.
    #[must_use]
    pub const fn new(lo: u16, hi: u16) -> Option<Self> {
        if lo == 0 || lo > hi {
            None
        } else {
            Some(Self { lo, hi })
        }
    }

    /// First port.
    #[must_use]
    pub const fn lo(&self) -> u16 {
        self.lo
    }

    /// Last port.
    #[must_use]
    pub const fn hi(&self) -> u16 {
        self.hi
    }

    /// Number of ports (at least 1).
    #[must_use]
    pub const fn len(&self) -> u32 {
        self.hi as u32 - self.lo as u32 + 1
    }

    /// Never empty; for clippy's `len_without_is_empty`.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Is `port` in the range?
    #[must_use]
    pub const fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    /// Do the two ranges share a port?
    #[must_use]
    pub const fn overlaps(&self, o: &Self) -> bool {
        self.lo <= o.hi && o.lo <= self.hi
    }

    /// The `i`-th port (`i < len`).
    #[must_use]
    pub const fn nth(&self, i: u32) -> u16 {
        (self.lo as u32 + i % self.len()) as u16
    }

    /// Contiguous shares for `workers` workers, in worker order: worker `w`
    /// allocates only from `split(workers)[w]`, so that a reply's destination
    /// port tells which worker's flow it belongs to ([`PortRange::owner`]).
    ///
    /// # Errors
    /// When the range has fewer ports than there are workers.
    pub fn split(&self, workers: usize) -> Result<Vec<PortRange>, String> {
        let n = self.len() as usize;
        if workers == 0 || workers > n {
            return Err(format!(
                "{self} has {n} port(s), fewer than the {workers} worker(s) that each need a share"
            ));
        }
        Ok((0..workers)
            .map(|w| {
                let a = self.lo as usize + w * n / workers;
                let b = self.lo as usize + (w + 1) * n / workers - 1;
                PortRange {
                    lo: a as u16,
                    hi: b as u16,
                }
            })
            .collect())
    }

    /// The worker (of `workers`) whose share holds `port`, as
    /// [`PortRange::split`] cuts it.
    #[must_use]
    pub fn owner(&self, workers: usize, port: u16) -> Option<usize> {
        if !self.contains(port) || workers == 0 {
            return None;
        }
        let n = self.len() as usize;
        let i = usize::from(port - self.lo);
        // The share w spans [w·n/W, (w+1)·n/W): the largest w with w·n/W ≤ i.
        let mut w = (i * workers) / n;
        while w + 1 < workers && (w + 1) * n / workers <= i {
            w += 1;
        }
        while w > 0 && w * n / workers > i {
            w -= 1;
        }
        Some(w)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `LO-HI` (or a single port), `1 <= LO <= HI <= 65535`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let port = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: {x:?} is not a port (1-65535)"))
        };
        let (lo, hi) = (port(a)?, port(b)?);
        PortRange::new(lo, hi).ok_or_else(|| {
            if lo == 0 {
                format!("{s:?}: port 0 cannot be allocated")
            } else {
                format!("{s:?}: the range runs backwards")
            }
        })
    }
}

/// Parses `net.ipv4.ip_local_port_range` as the kernel prints it (`"32768\t60999\n"`).
///
/// # Errors
/// Text that is not two ports in order.
pub fn parse_local_port_range(text: &str) -> Result<PortRange, String> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) => PortRange::new(lo.max(1), hi)
            .ok_or_else(|| format!("ip_local_port_range {text:?} runs backwards")),
        _ => Err(format!("ip_local_port_range {text:?} is not two ports")),
    }
}

/// The default SNAT range: the longest run of ports in 1024–65535 that
/// overlaps neither the node's own ephemeral ports (`local`, its
/// `ip_local_port_range`, so the node's connections are never taken for
/// replies) nor [`NODE_PORTS`]. Ties go to the lower run. With Linux's
/// defaults it is 1024–29999.
#[must_use]
pub fn default_range(local: PortRange) -> PortRange {
    let mut avoid = [local, NODE_PORTS];
    avoid.sort_by_key(|r| r.lo);
    let mut best: Option<PortRange> = None;
    let mut next = u32::from(FIRST_UNPRIVILEGED);
    let consider = |lo: u32, hi: u32, best: &mut Option<PortRange>| {
        if lo <= hi && hi <= 65_535 {
            let r = PortRange {
                lo: lo as u16,
                hi: hi as u16,
            };
            if best.is_none_or(|b| r.len() > b.len()) {
                *best = Some(r);
            }
        }
    };
    for a in avoid {
        if u32::from(a.lo) > next {
            consider(next, u32::from(a.lo) - 1, &mut best);
        }
        next = next.max(u32::from(a.hi) + 1);
    }
    consider(next, 65_535, &mut best);
    // Everything from 1024 up is taken: fall back to the top of the space,
    // which the caller will find overlapping and refuse with a message.
    best.unwrap_or(PortRange {
        lo: 65_535,
        hi: 65_535,
    })
}

/// Where the gateway's own address for a destination comes from: the source
/// the kernel would choose for the route to it (the route's preferred source,
/// else the primary address of the route's interface in that family), as
/// MASQUERADE picks it. The I/O layer implements it over its routes; tests
/// use [`FixedSources`].
pub trait SourceAddrs: Send + Sync + fmt::Debug {
    /// The source address for packets to `dst`, in `dst`'s family.
    fn source_for(&self, dst: &Addr16) -> Option<Addr16>;
}

/// One fixed source address per family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedSources {
    /// For IPv4 destinations.
    pub v4: Option<Addr16>,
    /// For IPv6 destinations.
    pub v6: Option<Addr16>,
}

impl SourceAddrs for FixedSources {
    fn source_for(&self, dst: &Addr16) -> Option<Addr16> {
        if ip_from16(*dst).is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// Most SNAT addresses one family can have (`--snat-address` given this
/// many times multiplies the port space this many times).
pub const MAX_SNAT_ADDRS: usize = 16;

/// What one worker needs for source NAT and direct server return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnConfig {
    /// `--snat-address` for IPv4; empty: the route's source ([`SourceAddrs`]).
    pub snat_v4: Vec<Addr16>,
    /// `--snat-address` for IPv6; empty: the route's source.
    pub snat_v6: Vec<Addr16>,
    /// This worker's share of the SNAT ports.
    pub ports: PortRange,
    /// The largest IP packet the backend side carries (its MTU): a packet that
    /// would exceed it once encapsulated for DSR is answered with ICMP
    /// fragmentation needed / packet too big.
    pub encap_mtu: u16,
}

impl Default for ReturnConfig {
    fn default() -> Self {
        Self {
            snat_v4: Vec::new(),
            snat_v6: Vec::new(),
            ports: default_range(LINUX_LOCAL_PORTS),
            encap_mtu: 1500,
        }
    }
}

impl ReturnConfig {
    /// The `--snat-address` overrides of one family (IPv4 if `v4`).
    #[must_use]
    pub fn overrides(&self, v4: bool) -> &[Addr16] {
        if v4 {
            &self.snat_v4
        } else {
            &self.snat_v6
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;
    use crate::flow::addr16;

    #[test]
    fn ranges_parse_and_refuse_with_reasons() {
        assert_eq!("1024-29999".parse::<PortRange>().unwrap().len(), 28_976);
        assert_eq!("20000".parse::<PortRange>().unwrap().len(), 1);
        let e = "0-10".parse::<PortRange>().unwrap_err();
        assert!(e.contains("port 0"), "{e}");
        let e = "20-10".parse::<PortRange>().unwrap_err();
        assert!(e.contains("backwards"), "{e}");
        let e = "10-70000".parse::<PortRange>().unwrap_err();
        assert!(e.contains("\"70000\" is not a port"), "{e}");
        let e = "x".parse::<PortRange>().unwrap_err();
        assert!(e.contains("not a port"), "{e}");
    }

    #[test]
    fn split_covers_the_range_and_owner_inverts_it() {
        for (lo, hi) in [(1024u16, 29_999u16), (20_000, 20_003), (5, 12), (100, 100)] {
            let r = PortRange::new(lo, hi).unwrap();
            for workers in 1..=r.len().min(17) as usize {
                let shares = r.split(workers).unwrap();
                assert_eq!(shares.len(), workers);
                assert_eq!(shares[0].lo(), lo);
                assert_eq!(shares[workers - 1].hi(), hi);
                for w in 1..workers {
                    assert_eq!(shares[w].lo(), shares[w - 1].hi() + 1, "contiguous");
                }
                for p in lo..=hi {
                    let w = r.owner(workers, p).unwrap();
                    assert!(shares[w].contains(p), "{p} owned by {w} of {workers}");
                }
                assert_eq!(r.owner(workers, hi.wrapping_add(1)), None);
            }
        }
        let e = PortRange::new(20_000, 20_001)
            .unwrap()
            .split(3)
            .unwrap_err();
        assert!(e.contains("fewer than the 3 worker"), "{e}");
    }

    #[test]
    fn default_range_avoids_local_ports_and_node_ports() {
        let r = default_range(LINUX_LOCAL_PORTS);
        assert_eq!((r.lo(), r.hi()), (1024, 29_999));
        // A node that moved its ephemeral ports low: the top is chosen.
        let r = default_range(PortRange::new(1024, 20_000).unwrap());
        assert_eq!((r.lo(), r.hi()), (32_768, 65_535));
        for local in [
            PortRange::new(1, 65_535).unwrap(),
            PortRange::new(40_000, 40_100).unwrap(),
            PortRange::new(30_500, 31_000).unwrap(),
        ] {
            let r = default_range(local);
            if local.lo() > 1 {
                assert!(!r.overlaps(&local), "{r} overlaps {local}");
                assert!(!r.overlaps(&NODE_PORTS), "{r} overlaps node ports");
                assert!(r.lo() >= FIRST_UNPRIVILEGED);
            }
        }
    }

    #[test]
    fn local_port_range_parses_as_the_kernel_prints_it() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n").unwrap(),
            LINUX_LOCAL_PORTS
        );
        assert!(parse_local_port_range("32768").is_err());
        assert!(parse_local_port_range("9 1").is_err());
    }

    #[test]
    fn fixed_sources_answer_per_family() {
        let s = FixedSources {
            v4: Some(addr16("198.18.2.1".parse().unwrap())),
            v6: None,
        };
        assert_eq!(s.source_for(&addr16("198.18.2.11".parse().unwrap())), s.v4);
        assert_eq!(s.source_for(&addr16("2001:2::11".parse().unwrap())), None);
    }
}
