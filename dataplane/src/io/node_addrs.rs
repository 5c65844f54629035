//! The node's own addresses, for node ports: every address of every
//! interface of the host, both families, as the kernel lists them
//! (`RTM_GETADDR` dump, read by [`crate::io::nexthop::Resolver::refresh`]
//! with the routes; never by shelling out).
//!
//! Owns: [`NodeAddrSet`], an immutable hash set of [`Addr16`] that
//! implements [`NodeAddrs`]. It travels inside each [`NextHops`] view; the
//! resolver keeps the same `Arc` while the addresses do not change, so the
//! workers hand it to the core ([`crate::pipeline::Worker::set_node_addrs`])
//! between batches only when it changed, and the management loop re-syncs
//! the steering program's node-port keys only then
//! ([`crate::io::steer::Steering::set_node_addrs`]).
//!
//! Which addresses count: every unicast address of any interface, up or
//! down, any scope (link-local included), except loopback addresses
//! (`127.0.0.0/8`, `::1`: a packet from the wire never carries them) and
//! IPv6 addresses the kernel does not accept packets for yet or at all
//! (tentative, failed duplicate address detection). Which of them serve
//! node ports is further narrowed by the table's node-port addresses
//! (control's `--nodeport-addresses`).
//!
//! Must never: make a syscall or allocate in [`NodeAddrSet::contains`] (the
//! core asks it per new node-port packet).
//!
//! [`NextHops`]: crate::io::nexthop::NextHops

use std::net::IpAddr;

use foldhash::fast::FixedState;
use hashbrown::HashSet;
use netlink_packet_route::address::AddressFlags;

use crate::flow::{addr16, Addr16};
use crate::io::nexthop::AddressEntry;
use crate::pipeline::NodeAddrs;

/// The node's addresses (see the module documentation for which).
#[derive(Debug, Clone, Default)]
pub struct NodeAddrSet {
    set: HashSet<Addr16, FixedState>,
    /// The same, sorted.
    sorted: Vec<Addr16>,
}

impl PartialEq for NodeAddrSet {
    fn eq(&self, other: &Self) -> bool {
        self.sorted == other.sorted
    }
}

impl Eq for NodeAddrSet {}

/// Is this address one the node receives packets from the wire on?
fn counts(a: &AddressEntry) -> bool {
    let usable = match a.addr {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_multicast(),
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && v6.to_ipv4_mapped().is_none()
        }
    };
    usable
        && !a
            .flags
            .intersects(AddressFlags::Tentative | AddressFlags::Dadfailed)
}

impl NodeAddrSet {
    /// The node's addresses among `addresses` (every interface's, as the
    /// kernel lists them).
    #[must_use]
    pub fn from_entries(addresses: &[AddressEntry]) -> Self {
        Self::from_addrs(
            addresses
                .iter()
                .filter(|a| counts(a))
                .map(|a| addr16(a.addr)),
        )
    }

    /// A set of exactly these addresses (tests, replay).
    #[must_use]
    pub fn from_addrs(addrs: impl IntoIterator<Item = Addr16>) -> Self {
        let mut sorted: Vec<Addr16> = addrs.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut set = HashSet::with_capacity_and_hasher(sorted.len(), FixedState::default());
        set.extend(sorted.iter().copied());
        Self { set, sorted }
    }

    /// Is `addr` one of the node's addresses? No allocation, no syscall.
    #[inline]
    #[must_use]
    pub fn contains(&self, addr: &Addr16) -> bool {
        self.set.contains(addr)
    }

    /// Every address, sorted.
    #[must_use]
    pub fn addrs(&self) -> &[Addr16] {
        &self.sorted
    }

    /// Number of addresses.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// No address at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }
}

impl NodeAddrs for NodeAddrSet {
    #[inline]
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        self.contains(addr)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use netlink_packet_route::address::AddressScope;

    use super::*;
    use crate::flow::ip_from16;

    fn entry(ifindex: u32, a: &str, scope: AddressScope, flags: AddressFlags) -> AddressEntry {
        AddressEntry {
            ifindex,
            addr: a.parse().unwrap(),
            prefix_len: 24,
            scope,
            flags,
        }
    }

    fn a16(s: &str) -> Addr16 {
        addr16(s.parse().unwrap())
    }

    #[test]
    fn every_interface_every_family_but_loopback_and_unusable() {
        use AddressScope::{Host, Link, Universe};
        let none = AddressFlags::empty();
        let set = NodeAddrSet::from_entries(&[
            entry(1, "127.0.0.1", Host, AddressFlags::Permanent),
            entry(1, "::1", Host, AddressFlags::Permanent),
            entry(2, "198.18.0.10", Universe, AddressFlags::Permanent),
            entry(2, "198.18.0.11", Universe, AddressFlags::Secondary),
            entry(3, "198.18.1.10", Universe, none),
            entry(2, "fe80::1", Link, AddressFlags::Permanent),
            entry(2, "2001:2::10", Universe, none),
            entry(2, "2001:2::11", Universe, AddressFlags::Deprecated),
            entry(3, "2001:2::12", Universe, AddressFlags::Tentative),
            entry(3, "2001:2::13", Universe, AddressFlags::Dadfailed),
            // A service address on a dummy interface (kube-ipvs0) is local too.
            entry(9, "198.18.211.10", Universe, none),
            // The same address on two interfaces counts once.
            entry(4, "198.18.1.10", Universe, none),
        ]);
        let got: Vec<String> = set
            .addrs()
            .iter()
            .map(|a| ip_from16(*a).to_string())
            .collect();
        assert_eq!(
            got,
            [
                "198.18.0.10",
                "198.18.0.11",
                "198.18.1.10",
                "198.18.211.10",
                "2001:2::10",
                "2001:2::11",
                "fe80::1",
            ]
        );
        assert_eq!(set.len(), 7);
        let dyn_set: &dyn NodeAddrs = &set;
        assert!(dyn_set.is_node_addr(&a16("198.18.0.11")));
        assert!(dyn_set.is_node_addr(&a16("fe80::1")));
        assert!(!dyn_set.is_node_addr(&a16("127.0.0.1")));
        assert!(!dyn_set.is_node_addr(&a16("2001:2::12")));
        assert!(!dyn_set.is_node_addr(&a16("198.18.0.12")));
        assert!(NodeAddrSet::default().is_empty());
    }

    #[test]
    fn equality_ignores_order() {
        let a = NodeAddrSet::from_addrs([a16("198.18.0.1"), a16("2001:2::1")]);
        let b = NodeAddrSet::from_addrs([a16("2001:2::1"), a16("198.18.0.1"), a16("198.18.0.1")]);
        assert_eq!(a, b);
        assert_ne!(a, NodeAddrSet::from_addrs([a16("198.18.0.1")]));
    }
}
