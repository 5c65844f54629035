//! Next-hop resolution for the frames the AF_XDP workers transmit: which
//! interface a destination leaves through, and which Ethernet addresses the
//! frame carries (the interface's own as source, the next hop's as
//! destination).
//!
//! Owns: the `NETLINK_ROUTE` socket ([`Resolver`], one management thread),
//! the immutable [`NextHops`] view it builds from the kernel's main routing
//! table, its neighbour (ARP/NDP) table and the served interfaces' MACs, and
//! the *managed* neighbour entries it asks the kernel to keep resolved for
//! the service backends ([`Resolver::keep_resolved`]), and the gateway's own
//! source address for a destination ([`NextHops`] implements
//! [`SourceAddrs`]: the route's preferred source, else the egress
//! interface's primary address, see [`NextHops::source_for`]), and the
//! node's own addresses for node ports ([`NextHops::node_addrs`], a
//! [`NodeAddrSet`] over every interface's addresses, the same `Arc` from one
//! refresh to the next while they do not change), and the workers' cache of
//! resolved hops per destination ([`HopCache`], checked against the view's
//! [`NextHops::id`] so that a new view is used from the next packet on).
//!
//! Must never: make a syscall or allocate in [`NextHops::resolve`] or
//! [`NextHops::source_for`] (they run per packet and per new flow on the
//! workers); shell out to `ip`; resolve anything itself (no
//! ARP/NDP of its own: the kernel resolves, this module reads the result);
//! touch neighbour entries it did not create, and above all never overwrite
//! a permanent or NOARP entry (a `NLM_F_REPLACE` or `NTF_USE` request on one
//! turns it into a dynamic entry that has lost its address — checked on
//! kernel 6.18).
//!
//! What the kernel wants for a managed entry (checked with `iproute2` and raw
//! requests on 6.18): `RTM_NEWNEIGH` with `NLM_F_CREATE | NLM_F_REPLACE`,
//! `ndm_state = NUD_NONE` (a `NUD_PERMANENT` state with `NTF_EXT_MANAGED` is
//! `EINVAL`), `ndm_flags = 0`, `NDA_DST` and `NDA_FLAGS_EXT = NTF_EXT_MANAGED`,
//! no lladdr. The kernel then probes at once and keeps re-probing (the entry
//! stays `managed` through `FAILED`). Replacing a dynamic entry this way keeps
//! its lladdr and state. An `NTF_USE` request clears the managed flag of an
//! existing entry, so [`Resolver::trigger`] leaves managed entries alone. The
//! entries this module creates carry `NDA_PROTOCOL` [`NEIGHBOUR_PROTOCOL`]
//! (`ip -d neigh` shows `proto 203`).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use foldhash::fast::FixedState;
use hashbrown::HashMap;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
    NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHopFlags,
    RouteProtocol, RouteType, RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::flow::{addr16, ip_from16, Addr16};
use crate::io::node_addrs::NodeAddrSet;
use crate::snat::SourceAddrs;

/// `NDA_PROTOCOL` of the managed neighbour entries this module creates
/// (`ip -d neigh` shows `proto 203`). An entry that is managed and carries it
/// is clustergate's: a new [`Resolver`] adopts such entries (left by a
/// predecessor that crashed) and removes them once they are no longer wanted.
pub const NEIGHBOUR_PROTOCOL: u8 = 203;

/// The kernel's local routing table (`local`).
const RT_TABLE_LOCAL: u32 = 255;
/// How often a dump the kernel marked `NLM_F_DUMP_INTR` is retried.
const DUMP_ATTEMPTS: usize = 4;
/// Receive buffer: the kernel fills dump datagrams up to 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Neighbour states whose lladdr can be used.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
/// Neighbour states an administrator set (never touched).
const NUD_STATIC: u16 = 0x40 | 0x80;

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// `NLM_F_CAPPED` on an error message: the request was not echoed whole.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
const ENOENT: i32 = 2;
const ENODEV: i32 = 19;

/// One resolved next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// Egress interface.
    pub ifindex: u32,
    /// The egress interface's own MAC (the frame's source).
    pub src_mac: [u8; 6],
    /// The next hop's MAC (the frame's destination).
    pub dst_mac: [u8; 6],
}

/// Why a destination could not be resolved (each is counted by the caller as
/// a drop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unresolved {
    /// No route for the destination (or a blackhole/unreachable/prohibit/throw route).
    NoRoute,
    /// The route leaves through an interface the gateway does not serve.
    OtherInterface,
    /// Route found, but no usable neighbour entry (incomplete/failed/absent) yet.
    NoNeighbour,
}

impl Unresolved {
    /// Every reason, in label order.
    pub const ALL: [Unresolved; 3] = [
        Unresolved::NoRoute,
        Unresolved::OtherInterface,
        Unresolved::NoNeighbour,
    ];

    /// Metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Unresolved::NoRoute => "no_route",
            Unresolved::OtherInterface => "other_interface",
            Unresolved::NoNeighbour => "no_neighbour",
        }
    }
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A route as the kernel reported it (or as a test wrote it), input of
/// [`NextHops::from_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination network (IPv4 or IPv6; the family picks the table).
    pub dst: IpAddr,
    /// Prefix length (at most 32 for IPv4, 128 for IPv6; longer ones are ignored).
    pub prefix_len: u8,
    /// Route priority (`metric`); among equal prefixes the lowest wins.
    pub metric: u32,
    /// Where matching packets go.
    pub target: RouteTarget,
    /// The route's preferred source (`RTA_PREFSRC`, `ip route … src ADDR`):
    /// the gateway's own address for destinations it matches.
    pub prefsrc: Option<IpAddr>,
}

/// Where a route sends packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// Blackhole, unreachable, prohibit or throw: [`Unresolved::NoRoute`].
    Reject,
    /// One next hop, or several (ECMP: the destination address picks one).
    /// Empty means no live next hop: [`Unresolved::NoRoute`].
    Via(Vec<Gateway>),
}

/// One next hop of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    /// Egress interface (0 when the kernel did not say, which no gateway serves).
    pub ifindex: u32,
    /// The router to send to; `None` when the destination is directly connected.
    pub via: Option<IpAddr>,
}

/// An interface address as the kernel reported it (`RTM_NEWADDR`), input of
/// [`NextHops::from_parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressEntry {
    /// Interface the address is on.
    pub ifindex: u32,
    /// The address (`IFA_LOCAL`, else `IFA_ADDRESS`).
    pub addr: IpAddr,
    /// Prefix length of its subnet.
    pub prefix_len: u8,
    /// Scope (`global` is [`AddressScope::Universe`]).
    pub scope: AddressScope,
    /// `IFA_F_*` flags (`IFA_FLAGS`, else the header's 8 bits).
    pub flags: AddressFlags,
}

impl AddressEntry {
    /// May this address be the source of a flow leaving through its
    /// interface? Global scope, and not secondary (for IPv6: temporary),
    /// tentative, deprecated or failed duplicate address detection.
    fn candidate(&self) -> bool {
        self.scope == AddressScope::Universe
            && !self.flags.intersects(
                AddressFlags::Secondary
                    | AddressFlags::Tentative
                    | AddressFlags::Deprecated
                    | AddressFlags::Dadfailed,
            )
    }
}

/// A neighbour entry as the kernel reported it, input of
/// [`NextHops::from_parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighbourEntry {
    /// Interface the entry belongs to.
    pub ifindex: u32,
    /// The neighbour's IP address.
    pub addr: IpAddr,
    /// NUD state; usable: reachable, stale, delay, probe, permanent, noarp.
    pub state: NeighbourState,
    /// Its link-layer address, when it has a 6-byte one.
    pub mac: Option<[u8; 6]>,
}

/// One prefix of the route tables, in the IPv4-mapped 16-byte form as a
/// `u128` so that both families share one scan.
#[derive(Debug, Clone, Copy)]
struct Prefix {
    net: u128,
    mask: u128,
    /// First next hop in `Routes::hops`.
    first: u32,
    /// Number of next hops; 0 is a reject route.
    count: u32,
    /// The route's preferred source.
    prefsrc: Option<Addr16>,
}

/// A route's next hop, in the form the scan wants.
#[derive(Debug, Clone, Copy)]
struct NextHop {
    ifindex: u32,
    via: Option<Addr16>,
}

/// The route part of a [`NextHops`], kept by the [`Resolver`] for
/// [`Resolver::trigger`].
#[derive(Debug, Clone, Default)]
struct Routes {
    /// IPv4 prefixes, longest first, then lowest metric.
    v4: Vec<Prefix>,
    /// IPv6 prefixes, longest first, then lowest metric.
    v6: Vec<Prefix>,
    hops: Vec<NextHop>,
    /// Served interfaces and their MACs.
    served: Vec<(u32, [u8; 6])>,
}

impl Routes {
    fn build(served: &[(u32, [u8; 6])], routes: &[RouteEntry]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut hops = Vec::new();
        for r in routes {
            let (bits, table) = match r.dst {
                IpAddr::V4(_) if r.prefix_len <= 32 => (96 + u32::from(r.prefix_len), &mut v4),
                IpAddr::V6(_) if r.prefix_len <= 128 => (u32::from(r.prefix_len), &mut v6),
                _ => continue,
            };
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            let first = hops.len() as u32;
            let count = match &r.target {
                RouteTarget::Reject => 0,
                RouteTarget::Via(gws) if gws.is_empty() => 0,
                RouteTarget::Via(gws) => {
                    hops.extend(gws.iter().map(|g| NextHop {
                        ifindex: g.ifindex,
                        via: g.via.map(addr16),
                    }));
                    gws.len() as u32
                }
            };
            let net = u128::from_be_bytes(addr16(r.dst)) & mask;
            // A preferred source of the other family is not one.
            let prefsrc = r
                .prefsrc
                .filter(|s| s.is_ipv4() == r.dst.is_ipv4())
                .map(addr16);
            table.push((
                bits,
                r.metric,
                Prefix {
                    net,
                    mask,
                    first,
                    count,
                    prefsrc,
                },
            ));
        }
        let finish = |mut t: Vec<(u32, u32, Prefix)>| {
            // Stable: among equal (length, metric) the kernel's order wins.
            t.sort_by_key(|&(bits, metric, _)| (std::cmp::Reverse(bits), metric));
            t.into_iter().map(|(_, _, p)| p).collect::<Vec<_>>()
        };
        Routes {
            v4: finish(v4),
            v6: finish(v6),
            hops,
            served: served.to_vec(),
        }
    }

    /// Longest-prefix match: the route and the next hop it picks for `dst`.
    #[inline]
    fn route(&self, dst: &Addr16) -> Result<(&Prefix, &NextHop), Unresolved> {
        let a = u128::from_be_bytes(*dst);
        let table = if is_v4_mapped(dst) {
            &self.v4
        } else {
            &self.v6
        };
        let p = table
            .iter()
            .find(|p| a & p.mask == p.net)
            .ok_or(Unresolved::NoRoute)?;
        let pick = match p.count {
            0 => return Err(Unresolved::NoRoute),
            1 => 0,
            n => {
                let x = (a ^ (a >> 64)) as u64;
                ((x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % u64::from(n)) as usize
            }
        };
        let hop = self
            .hops
            .get(p.first as usize + pick)
            .ok_or(Unresolved::NoRoute)?;
        Ok((p, hop))
    }

    /// Longest-prefix match: the egress interface's slot in `served` and the
    /// next-hop address.
    #[inline]
    fn next_hop(&self, dst: &Addr16) -> Result<(usize, u32, Addr16), Unresolved> {
        let (_, hop) = self.route(dst)?;
        let slot = self
            .served
            .iter()
            .position(|&(i, _)| i == hop.ifindex)
            .ok_or(Unresolved::OtherInterface)?;
        Ok((slot, hop.ifindex, hop.via.unwrap_or(*dst)))
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

#[inline]
fn is_v4_mapped(a: &Addr16) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

fn usable(state: NeighbourState) -> bool {
    u16::from(state) & NUD_USABLE != 0
}

/// A candidate source address on one interface, in the form the scan wants.
#[derive(Debug, Clone, Copy)]
struct SourceAddr {
    ifindex: u32,
    addr: Addr16,
    /// Its subnet, in the IPv4-mapped 16-byte form as a `u128`.
    net: u128,
    mask: u128,
}

/// The interface addresses a [`NextHops`] answers [`NextHops::source_for`]
/// from, and every address of the served interfaces (for the steering
/// program).
#[derive(Debug, Clone, Default)]
struct Sources {
    /// IPv4 candidates, sorted by ifindex, each interface's in the kernel's
    /// order (primary addresses in the order `inet_select_addr` walks them).
    v4: Vec<SourceAddr>,
    /// IPv6 candidates, sorted by ifindex, each interface's in the kernel's order.
    v6: Vec<SourceAddr>,
    /// Every address of a served interface and every preferred source of a
    /// route through one, sorted, without repeats.
    local: Vec<Addr16>,
}

impl Sources {
    fn build(routes: &Routes, addresses: &[AddressEntry]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut local = Vec::new();
        let served = |ifindex: u32| routes.served.iter().any(|&(i, _)| i == ifindex);
        for a in addresses {
            let (bits, list) = match a.addr {
                IpAddr::V4(_) if a.prefix_len <= 32 => (96 + u32::from(a.prefix_len), &mut v4),
                IpAddr::V6(_) if a.prefix_len <= 128 => (u32::from(a.prefix_len), &mut v6),
                _ => continue,
            };
            let addr = addr16(a.addr);
            if served(a.ifindex) {
                local.push(addr);
            }
            if !a.candidate() {
                continue;
            }
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            list.push(SourceAddr {
                ifindex: a.ifindex,
                addr,
                net: u128::from_be_bytes(addr) & mask,
                mask,
            });
        }
        for p in routes.v4.iter().chain(&routes.v6) {
            let hops = routes
                .hops
                .get(p.first as usize..(p.first + p.count) as usize)
                .unwrap_or_default();
            if let Some(src) = p.prefsrc.filter(|_| hops.iter().any(|h| served(h.ifindex))) {
                local.push(src);
            }
        }
        // Stable: each interface's addresses keep the kernel's order.
        v4.sort_by_key(|s| s.ifindex);
        v6.sort_by_key(|s| s.ifindex);
        local.sort_unstable();
        local.dedup();
        Sources { v4, v6, local }
    }
}

/// An immutable view of routes + neighbours + interface MACs + interface
/// addresses, rebuilt by the [`Resolver`] and shared with workers (they hold
/// it in an `Arc`, swapped with arc-swap).
#[derive(Debug, Default)]
pub struct NextHops {
    /// Tells this view from every other one built in this process
    /// ([`HopCache`] entries are tagged with it).
    id: ViewId,
    routes: Routes,
    /// Usable neighbours: (ifindex, address) → MAC.
    neighbours: HashMap<(u32, Addr16), [u8; 6], FixedState>,
    sources: Sources,
    /// The node's addresses (every interface's), for node ports.
    node: Arc<NodeAddrSet>,
}

impl NextHops {
    /// A view that resolves nothing ([`Unresolved::NoRoute`] for every address).
    #[must_use]
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a view from routes, neighbours and interface addresses as the
    /// kernel lists them (tests, replay and simulations make them by hand).
    /// `served`: the interfaces the gateway transmits on, with their MACs.
    /// Routes with an impossible prefix length and neighbours in unusable
    /// states or without a 6-byte lladdr are left out; `addresses` in the
    /// kernel's order (it decides which address is primary).
    #[must_use]
    pub fn from_parts(
        served: &[(u32, [u8; 6])],
        routes: &[RouteEntry],
        neighbours: &[NeighbourEntry],
        addresses: &[AddressEntry],
    ) -> Self {
        let mut map = HashMap::with_capacity_and_hasher(neighbours.len(), FixedState::default());
        for n in neighbours {
            if let (true, Some(mac)) = (usable(n.state), n.mac) {
                map.insert((n.ifindex, addr16(n.addr)), mac);
            }
        }
        let routes = Routes::build(served, routes);
        let sources = Sources::build(&routes, addresses);
        NextHops {
            id: ViewId::default(),
            routes,
            neighbours: map,
            sources,
            node: Arc::new(NodeAddrSet::from_entries(addresses)),
        }
    }

    /// Longest-prefix match over the main routing table (IPv4 and IPv6), then
    /// the neighbour entry of the next-hop address on that interface. No
    /// allocation, no syscall.
    #[inline]
    pub fn resolve(&self, dst: &Addr16) -> Result<Hop, Unresolved> {
        let (slot, ifindex, next) = self.routes.next_hop(dst)?;
        let dst_mac = *self
            .neighbours
            .get(&(ifindex, next))
            .ok_or(Unresolved::NoNeighbour)?;
        let src_mac = self.routes.served[slot].1;
        Ok(Hop {
            ifindex,
            src_mac,
            dst_mac,
        })
    }

    /// The gateway's own address for packets to `dst`, as the kernel would
    /// choose it for the route to `dst` (`None` without a route or an
    /// address). No allocation, no syscall.
    ///
    /// - The route's preferred source (`ip route … src ADDR`), if it has one.
    /// - IPv4, else: the egress interface's addresses as `inet_select_addr`
    ///   (what MASQUERADE uses) walks them: primary (not secondary) addresses
    ///   of global scope, in the kernel's order; the first whose subnet holds
    ///   the next hop (the route's gateway, or `dst` when on-link), else the
    ///   first. Unlike the kernel, no address of another interface is taken
    ///   when the egress interface has none.
    /// - IPv6, else: the first global address of the egress interface that is
    ///   neither tentative, deprecated, temporary nor failed DAD. (The
    ///   kernel's RFC 6724 selection weighs more; a gateway has one global
    ///   address per interface, or gives `--snat-address`.)
    ///
    /// The route is the one [`NextHops::resolve`] takes, ECMP pick included;
    /// it may leave through an interface the gateway does not serve.
    #[inline]
    #[must_use]
    pub fn source_for(&self, dst: &Addr16) -> Option<Addr16> {
        let (route, hop) = self.routes.route(dst).ok()?;
        if route.prefsrc.is_some() {
            return route.prefsrc;
        }
        let v4 = is_v4_mapped(dst);
        let list = if v4 {
            &self.sources.v4
        } else {
            &self.sources.v6
        };
        let start = list.partition_point(|s| s.ifindex < hop.ifindex);
        let mut on_if = list[start..]
            .iter()
            .take_while(|s| s.ifindex == hop.ifindex);
        if !v4 {
            return on_if.next().map(|s| s.addr);
        }
        let next = u128::from_be_bytes(hop.via.unwrap_or(*dst));
        let mut first = None;
        for s in on_if {
            if next & s.mask == s.net {
                return Some(s.addr);
            }
            first.get_or_insert(s.addr);
        }
        first
    }

    /// Every address of the served interfaces (any scope or state) and every
    /// preferred source of a route through one, sorted: the addresses
    /// replies to source NAT can come back to when no `--snat-address` is
    /// given (the steering program's `snat_addrs`).
    #[must_use]
    pub fn local_addrs(&self) -> &[Addr16] {
        &self.sources.local
    }

    /// The node's own addresses (every interface's, see
    /// [`crate::io::node_addrs`]): where node ports are served. The
    /// [`Resolver`] hands out the same `Arc` until they change, so
    /// `Arc::ptr_eq` with the previous view's tells whether they did.
    #[must_use]
    pub fn node_addrs(&self) -> &Arc<NodeAddrSet> {
        &self.node
    }

    /// This view's identity: different for every view built in this
    /// process, never 0 (what [`HopCache`] tags its entries with).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id.0
    }

    /// Number of routes (both families, reject routes included).
    #[must_use]
    pub fn routes(&self) -> usize {
        self.routes.len()
    }

    /// Number of usable neighbour entries.
    #[must_use]
    pub fn neighbours(&self) -> usize {
        self.neighbours.len()
    }
}

/// A [`NextHops`] view's identity: taken from a process-wide counter when
/// the view is built, so two views never share one (unlike an `Arc`'s
/// address, which a later view can reuse once the earlier one is freed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ViewId(u64);

impl Default for ViewId {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// Slots of a [`HopCache`] (a power of two): 4096 × 40 bytes, 160 KiB,
/// which stays in L2, and holds a few thousand backends with few collisions
/// (`cargo bench -p clustergate-dataplane --bench next_hop`).
pub const HOP_CACHE_SLOTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct CachedHop {
    /// The [`NextHops::id`] the hop was resolved in; 0: empty.
    view: u64,
    addr: Addr16,
    hop: Hop,
}

/// One worker's cache of resolved next hops, per destination (backends for
/// forwarded frames, clients for replies): direct-mapped, so a lookup is
/// one hash and one slot. Each entry is tagged with the view it was
/// resolved in, and is served only while that view is the current one: a
/// route or neighbour change (a new view) makes every entry miss once, so a
/// stale MAC is never used. Failures are not cached: an unresolved
/// destination asks the view again on every packet (and the caller asks the
/// resolver, as without a cache). No allocation after [`HopCache::new`], no
/// lock.
#[derive(Debug)]
pub struct HopCache {
    slots: Box<[CachedHop]>,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that asked the view.
    pub misses: u64,
}

impl Default for HopCache {
    fn default() -> Self {
        Self::new()
    }
}

impl HopCache {
    /// An empty cache of [`HOP_CACHE_SLOTS`] slots (allocates once).
    #[must_use]
    pub fn new() -> Self {
        let empty = CachedHop {
            view: 0,
            addr: [0; 16],
            hop: Hop {
                ifindex: 0,
                src_mac: [0; 6],
                dst_mac: [0; 6],
            },
        };
        Self {
            slots: vec![empty; HOP_CACHE_SLOTS].into_boxed_slice(),
            hits: 0,
            misses: 0,
        }
    }

    /// The slot of `dst`.
    #[inline]
    fn slot(dst: &Addr16) -> usize {
        let a = u128::from_be_bytes(*dst);
        let x = (a as u64) ^ ((a >> 64) as u64);
        (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - HOP_CACHE_SLOTS.trailing_zeros())) as usize
    }

    /// [`NextHops::resolve`] of `hops`, from the cache when `dst` was
    /// resolved in this same view, else from the view (and cached when it
    /// resolved).
    ///
    /// # Errors
    /// The view's [`Unresolved`], never cached.
    #[inline]
    pub fn resolve(&mut self, hops: &NextHops, dst: &Addr16) -> Result<Hop, Unresolved> {
        let view = hops.id();
        let i = Self::slot(dst) & (HOP_CACHE_SLOTS - 1);
        if let Some(s) = self.slots.get(i) {
            if s.view == view && s.addr == *dst {
                self.hits += 1;
                return Ok(s.hop);
            }
        }
        self.misses += 1;
        let r = hops.resolve(dst);
        if let (Ok(hop), Some(s)) = (r, self.slots.get_mut(i)) {
            *s = CachedHop {
                view,
                addr: *dst,
                hop,
            };
        }
        r
    }
}

impl SourceAddrs for NextHops {
    #[inline]
    fn source_for(&self, dst: &Addr16) -> Option<Addr16> {
        NextHops::source_for(self, dst)
    }
}

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    /// The `NETLINK_ROUTE` socket could not be opened or set up.
    #[error("opening a NETLINK_ROUTE socket failed: {source}")]
    Socket {
        /// The OS error.
        source: io::Error,
    },
    /// The kernel refused a request, or the socket failed during it.
    #[error("netlink {op} failed: {source}{detail}")]
    Netlink {
        /// What was asked, with its input.
        op: String,
        /// The errno.
        source: io::Error,
        /// The kernel's extended-ack text, as `" (kernel: …)"`, or empty.
        detail: String,
    },
    /// A reply could not be decoded.
    #[error("netlink {op}: cannot decode the kernel's reply: {source}")]
    Decode {
        /// What was asked.
        op: String,
        /// The decoder's complaint.
        source: netlink_packet_core::DecodeError,
    },
    /// The kernel kept interrupting a dump (the table changed during it).
    #[error("netlink {op}: interrupted by table changes {attempts} times in a row")]
    DumpInterrupted {
        /// What was dumped.
        op: String,
        /// How often it was tried.
        attempts: usize,
    },
    /// [`ifindex_by_name`]: no such interface.
    #[error("interface {name}: not found")]
    InterfaceNotFound {
        /// The name asked for.
        name: String,
    },
    /// A served interface is gone.
    #[error("served interface ifindex {ifindex}: not found")]
    ServedInterfaceGone {
        /// Its index.
        ifindex: u32,
    },
    /// A served interface has no 6-byte link-layer address.
    #[error("served interface ifindex {ifindex}: has no Ethernet address")]
    NotEthernet {
        /// Its index.
        ifindex: u32,
    },
    /// [`Resolver::trigger`]: the address has no usable route.
    #[error("cannot resolve {addr}: {reason}")]
    Unroutable {
        /// The address.
        addr: IpAddr,
        /// Why (never [`Unresolved::NoNeighbour`]).
        reason: Unresolved,
    },
}

/// A neighbour entry with what [`Resolver::keep_resolved`] needs to know.
#[derive(Debug, Clone, Copy)]
struct NeighbourInfo {
    entry: NeighbourEntry,
    managed: bool,
    protocol: u8,
}

impl NeighbourInfo {
    fn is_static(&self) -> bool {
        u16::from(self.entry.state) & NUD_STATIC != 0
    }
}

/// The synchronous netlink request/response loop.
#[derive(Debug)]
struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Why a request ended without its answer.
enum Failure {
    Errno(i32, String),
    Io(io::Error),
    Decode(netlink_packet_core::DecodeError),
    Interrupted,
}

impl Netlink {
    fn open() -> Result<Self, NextHopError> {
        let setup = || -> io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            // Best effort: errors are still reported without these.
            let _ = socket.set_ext_ack(true);
            let _ = socket.set_cap_ack(true);
            Ok(socket)
        };
        let socket = setup().map_err(|source| NextHopError::Socket { source })?;
        Ok(Netlink {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends `msg` and collects the kernel's messages until the dump's
    /// `NLMSG_DONE` or the request's ack. Retries interrupted dumps.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NextHopError> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        for _ in 0..DUMP_ATTEMPTS {
            match self.once(&msg, flags, dump, op) {
                Ok(out) => return Ok(out),
                Err(Failure::Interrupted) => continue,
                Err(Failure::Errno(errno, text)) => {
                    return Err(NextHopError::Netlink {
                        op: op(),
                        source: io::Error::from_raw_os_error(errno),
                        detail: if text.is_empty() {
                            String::new()
                        } else {
                            format!(" (kernel: {text})")
                        },
                    })
                }
                Err(Failure::Io(source)) => {
                    return Err(NextHopError::Netlink {
                        op: op(),
                        source,
                        detail: String::new(),
                    })
                }
                Err(Failure::Decode(source)) => {
                    return Err(NextHopError::Decode { op: op(), source })
                }
            }
        }
        Err(NextHopError::DumpInterrupted {
            op: op(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    fn once(
        &mut self,
        msg: &RouteNetlinkMessage,
        flags: u16,
        dump: bool,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg.clone()));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(Failure::Io)?;

        let mut replies = Vec::new();
        let mut interrupted = false;
        let mut skipped = 0usize;
        loop {
            let n = loop {
                match self.socket.recv(&mut &mut self.buf[..], 0) {
                    Ok(n) => break n.min(self.buf.len()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Failure::Io(e)),
                }
            };
            let data = &self.buf[..n];
            let mut off = 0;
            while let Some(hdr) = data.get(off..off + NLMSG_HDR_LEN) {
                let len = ne_u32(hdr, 0) as usize;
                let ty = ne_u16(hdr, 4);
                let fl = ne_u16(hdr, 6);
                let mseq = ne_u32(hdr, 8);
                let Some(whole) = data.get(off..off + len).filter(|_| len >= NLMSG_HDR_LEN) else {
                    return Err(Failure::Decode(
                        format!("netlink message of length {len} at offset {off} of {n}").into(),
                    ));
                };
                off += (len + 3) & !3;
                if mseq != seq {
                    continue; // left over from an earlier request that failed half-way
                }
                if fl & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let payload = &whole[NLMSG_HDR_LEN..];
                match ty {
                    NLMSG_NOOP => {}
                    NLMSG_DONE => {
                        let code = payload.get(..4).map_or(0, |b| ne_u32(b, 0) as i32);
                        if code < 0 {
                            let text = ext_ack_text(payload.get(4..).unwrap_or_default());
                            return Err(Failure::Errno(-code, text));
                        }
                        if skipped > 0 {
                            tracing::warn!(op = %op(), skipped, "netlink dump: left out messages that could not be decoded");
                        }
                        return if interrupted {
                            Err(Failure::Interrupted)
                        } else {
                            Ok(replies)
                        };
                    }
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map_or(-libc_eproto(), |b| ne_u32(b, 0) as i32);
                        if code == 0 {
                            return Ok(replies);
                        }
                        let text = if fl & NLM_F_ACK_TLVS != 0 {
                            error_ext_ack(payload.get(4..).unwrap_or_default(), fl)
                        } else {
                            String::new()
                        };
                        return Err(Failure::Errno(code.saturating_neg(), text));
                    }
                    NLMSG_OVERRUN => {
                        return Err(Failure::Decode("netlink overrun".into()));
                    }
                    _ => match NetlinkMessage::<RouteNetlinkMessage>::deserialize(whole) {
                        Ok(m) => {
                            if let NetlinkPayload::InnerMessage(inner) = m.payload {
                                replies.push(inner);
                            }
                        }
                        Err(e) if dump => {
                            if skipped == 0 {
                                tracing::debug!(op = %op(), error = %e, "netlink dump: undecodable message");
                            }
                            skipped += 1;
                        }
                        Err(e) => return Err(Failure::Decode(e)),
                    },
                }
            }
        }
    }
}

const fn libc_eproto() -> i32 {
    71
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_ne_bytes)
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// The extended-ack text of an `NLMSG_ERROR` (after its code): skip the
/// echoed request (its header only when capped), then read the attributes.
fn error_ext_ack(after_code: &[u8], flags: u16) -> String {
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR_LEN
    } else {
        ne_u32(after_code, 0) as usize
    };
    ext_ack_text(after_code.get((echoed + 3) & !3..).unwrap_or_default())
}

/// `NLMSGERR_ATTR_MSG` among netlink attributes, or empty.
fn ext_ack_text(mut attrs: &[u8]) -> String {
    while attrs.len() >= 4 {
        let len = usize::from(ne_u16(attrs, 0));
        let ty = ne_u16(attrs, 2) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        if ty == NLMSGERR_ATTR_MSG {
            let text = &attrs[4..len];
            let text = text.split(|&b| b == 0).next().unwrap_or_default();
            return String::from_utf8_lossy(text).into_owned();
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
    }
    String::new()
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn via_ip(attrs: &[RouteAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_ip(g),
        RouteAttribute::Via(RouteVia::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Via(RouteVia::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

/// A kernel route as a [`RouteEntry`], or `None` when it is not one
/// [`NextHops`] keeps: other tables, other families, cached clones,
/// source-specific routes, local/broadcast/multicast/anycast types, and
/// routes whose every next hop is dead (the kernel skips those too).
fn parse_route(m: &RouteMessage) -> Option<RouteEntry> {
    let h = &m.header;
    let zero = match h.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) && table != RT_TABLE_LOCAL {
        return None;
    }
    if h.flags.contains(RouteFlags::Cloned) || h.source_prefix_length != 0 {
        return None;
    }
    let target = match h.kind {
        RouteType::Unicast => {
            let multipath = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::MultiPath(hops) => Some(hops),
                _ => None,
            });
            let gws: Vec<Gateway> = match multipath {
                Some(hops) => hops
                    .iter()
                    .filter(|nh| !nh.flags.contains(RouteNextHopFlags::Dead))
                    .map(|nh| Gateway {
                        ifindex: nh.interface_index,
                        via: via_ip(&nh.attributes),
                    })
                    .collect(),
                None if h.flags.contains(RouteFlags::Dead) => Vec::new(),
                None => vec![Gateway {
                    ifindex: m
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            RouteAttribute::Oif(i) => Some(*i),
                            _ => None,
                        })
                        .unwrap_or(0),
                    via: via_ip(&m.attributes),
                }],
            };
            if gws.is_empty() {
                return None;
            }
            RouteTarget::Via(gws)
        }
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw => {
            RouteTarget::Reject
        }
        _ => return None,
    };
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_ip(d),
            _ => None,
        })
        .unwrap_or(zero);
    if family_of(dst) != h.address_family {
        return None;
    }
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    let prefsrc = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(s) => route_ip(s),
        _ => None,
    });
    Some(RouteEntry {
        dst,
        prefix_len: h.destination_prefix_length,
        metric,
        target,
        prefsrc,
    })
}

/// A kernel address as an [`AddressEntry`], or `None` for other families.
fn parse_address(m: &AddressMessage) -> Option<AddressEntry> {
    let h = &m.header;
    if h.family != AddressFamily::Inet && h.family != AddressFamily::Inet6 {
        return None;
    }
    let mut local = None;
    let mut address = None;
    let mut flags = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(l) => local = Some(*l),
            AddressAttribute::Address(x) => address = Some(*x),
            AddressAttribute::Flags(f) => flags = Some(*f),
            _ => {}
        }
    }
    let addr = local.or(address)?;
    if family_of(addr) != h.family {
        return None;
    }
    Some(AddressEntry {
        ifindex: h.index,
        addr,
        prefix_len: h.prefix_len,
        scope: h.scope,
        flags: flags.unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(h.flags.bits()))),
    })
}

fn parse_neighbour(m: &NeighbourMessage) -> Option<NeighbourInfo> {
    let h = &m.header;
    if h.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    let mut managed = false;
    let mut protocol = 0;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                addr = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                addr = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::LinkLayerAddress(ll) => mac = <[u8; 6]>::try_from(&ll[..]).ok(),
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    Some(NeighbourInfo {
        entry: NeighbourEntry {
            ifindex: h.ifindex,
            addr: addr?,
            state: h.state,
            mac,
        },
        managed,
        protocol,
    })
}

fn neighbour_request(ifindex: u32, addr: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family_of(addr);
    m.header.ifindex = ifindex;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            addr,
        )));
    m
}

/// Owns the netlink socket. Used from one management thread only.
#[derive(Debug)]
pub struct Resolver {
    nl: Netlink,
    served: Vec<u32>,
    /// The routes of the last snapshot, for [`Resolver::trigger`].
    routes: Option<Routes>,
    /// Managed entries this resolver created (or adopted): (ifindex, address).
    owned: BTreeSet<(u32, Addr16)>,
    /// Whether managed entries tagged [`NEIGHBOUR_PROTOCOL`] were adopted yet.
    adopted: bool,
    /// The node's addresses of the last refresh (kept while unchanged).
    node: Arc<NodeAddrSet>,
}

impl Resolver {
    /// `served`: ifindexes of the interfaces the gateway transmits on.
    pub fn new(served: &[u32]) -> Result<Self, NextHopError> {
        let mut served = served.to_vec();
        served.sort_unstable();
        served.dedup();
        Ok(Resolver {
            nl: Netlink::open()?,
            served,
            routes: None,
            owned: BTreeSet::new(),
            adopted: false,
            node: Arc::default(),
        })
    }

    /// Dump links (MACs), routes (main table, both families), neighbours
    /// and interface addresses; build a fresh [`NextHops`]. Its
    /// [`NextHops::node_addrs`] is the previous refresh's `Arc` when the
    /// node's addresses did not change.
    pub fn refresh(&mut self) -> Result<NextHops, NextHopError> {
        let (routes, neighbours) = self.snapshot()?;
        let addresses = self.addresses()?;
        let mut map = HashMap::with_capacity_and_hasher(neighbours.len(), FixedState::default());
        for n in &neighbours {
            if let (true, Some(mac)) = (usable(n.entry.state), n.entry.mac) {
                map.insert((n.entry.ifindex, addr16(n.entry.addr)), mac);
            }
        }
        let sources = Sources::build(&routes, &addresses);
        let node = NodeAddrSet::from_entries(&addresses);
        if *self.node != node {
            self.node = Arc::new(node);
        }
        Ok(NextHops {
            id: ViewId::default(),
            routes,
            neighbours: map,
            sources,
            node: Arc::clone(&self.node),
        })
    }

    /// Every interface address (`RTM_GETADDR` dump, both families), in the
    /// kernel's order.
    fn addresses(&mut self) -> Result<Vec<AddressEntry>, NextHopError> {
        let msgs = self.nl.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            &|| "dump of interface addresses".to_string(),
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_address(a),
                _ => None,
            })
            .collect())
    }

    /// Make the kernel keep these addresses resolved and fresh (the service
    /// backends): for each address, route it, and on the egress interface
    /// create a *managed* neighbour entry for the next-hop address, unless a
    /// permanent/NOARP entry or someone else's managed entry already exists.
    /// Addresses without a route through a served interface are skipped.
    /// Managed entries this resolver created that are no longer wanted are
    /// removed. Returns how many entries were created or removed.
    pub fn keep_resolved(&mut self, addrs: &[IpAddr]) -> Result<usize, NextHopError> {
        let (routes, neighbours) = self.snapshot()?;
        let existing: std::collections::HashMap<(u32, Addr16), NeighbourInfo> = neighbours
            .iter()
            .map(|n| ((n.entry.ifindex, addr16(n.entry.addr)), *n))
            .collect();
        if !self.adopted {
            self.adopted = true;
            self.owned.extend(
                existing
                    .iter()
                    .filter(|(_, n)| n.managed && n.protocol == NEIGHBOUR_PROTOCOL)
                    .map(|(k, _)| *k),
            );
        }
        let mut wanted = BTreeSet::new();
        for &addr in addrs {
            match routes.next_hop(&addr16(addr)) {
                Ok((_, ifindex, next)) => {
                    wanted.insert((ifindex, next));
                }
                Err(why) => tracing::debug!(%addr, %why, "keep_resolved: not kept resolved"),
            }
        }
        let mut changed = 0;
        for &(ifindex, next) in &wanted {
            let ours = self.owned.contains(&(ifindex, next));
            match existing.get(&(ifindex, next)) {
                Some(n) if n.is_static() => {
                    self.owned.remove(&(ifindex, next));
                    continue;
                }
                Some(n) if n.managed => {
                    if !ours {
                        tracing::debug!(ifindex, addr = %ip_from16(next), "keep_resolved: managed by someone else");
                    }
                    continue;
                }
                _ => {}
            }
            self.create_managed(ifindex, ip_from16(next))?;
            self.owned.insert((ifindex, next));
            changed += 1;
        }
        let unwanted: Vec<(u32, Addr16)> = self.owned.difference(&wanted).copied().collect();
        for key in unwanted {
            self.owned.remove(&key);
            // Gone, or no longer ours (replaced by a static or unmanaged
            // entry): leave it.
            let still_ours = existing
                .get(&key)
                .is_some_and(|n| n.managed && !n.is_static());
            if still_ours && self.delete_neighbour(key.0, ip_from16(key.1))? {
                changed += 1;
            }
        }
        self.routes = Some(routes);
        Ok(changed)
    }

    /// Ask the kernel to resolve one address now (`RTM_NEWNEIGH` with
    /// `NTF_USE` on the next hop, as Cilium did before managed neighbours),
    /// used when a worker met [`Unresolved::NoNeighbour`] for e.g. a client
    /// address. Routes with the last snapshot's routes (taking one if there
    /// is none); leaves permanent, NOARP and managed entries alone (`NTF_USE`
    /// would strip them).
    pub fn trigger(&mut self, dst: IpAddr) -> Result<(), NextHopError> {
        if self.routes.is_none() {
            let (routes, _) = self.snapshot()?;
            self.routes = Some(routes);
        }
        let next_hop = self.routes.as_ref().map(|r| r.next_hop(&addr16(dst)));
        let (ifindex, next) = match next_hop {
            Some(Ok((_, ifindex, next))) => (ifindex, ip_from16(next)),
            Some(Err(reason)) => return Err(NextHopError::Unroutable { addr: dst, reason }),
            None => {
                return Err(NextHopError::Unroutable {
                    addr: dst,
                    reason: Unresolved::NoRoute,
                })
            }
        };
        if let Some(n) = self.get_neighbour(ifindex, next)? {
            if n.is_static() || n.managed {
                return Ok(());
            }
        }
        let mut m = neighbour_request(ifindex, next);
        m.header.flags = NeighbourFlags::Use;
        m.header.state = NeighbourState::None;
        self.nl
            .request(RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE, &|| {
                format!("resolution request (NTF_USE) for {next} on ifindex {ifindex}")
            })?;
        Ok(())
    }

    /// Routes (with the served interfaces' MACs) and every neighbour entry.
    fn snapshot(&mut self) -> Result<(Routes, Vec<NeighbourInfo>), NextHopError> {
        let mut served = Vec::with_capacity(self.served.len());
        for &ifindex in &self.served.clone() {
            served.push((ifindex, self.link_mac(ifindex)?));
        }
        let route_msgs = self.nl.request(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            NLM_F_DUMP,
            &|| "dump of routes".to_string(),
        )?;
        let routes: Vec<RouteEntry> = route_msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .collect();
        let neigh_msgs = self.nl.request(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            NLM_F_DUMP,
            &|| "dump of neighbours".to_string(),
        )?;
        let neighbours = neigh_msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neighbour(n),
                _ => None,
            })
            .collect();
        Ok((Routes::build(&served, &routes), neighbours))
    }

    fn link_mac(&mut self, ifindex: u32) -> Result<[u8; 6], NextHopError> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        let reply = self.nl.request(RouteNetlinkMessage::GetLink(m), 0, &|| {
            format!("link query for served ifindex {ifindex}")
        });
        let msgs = match reply {
            Err(NextHopError::Netlink { source, .. }) if source.raw_os_error() == Some(ENODEV) => {
                return Err(NextHopError::ServedInterfaceGone { ifindex })
            }
            r => r?,
        };
        msgs.iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => {
                    l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Address(mac) => <[u8; 6]>::try_from(&mac[..]).ok(),
                        _ => None,
                    })
                }
                _ => None,
            })
            .ok_or(NextHopError::NotEthernet { ifindex })
    }

    fn get_neighbour(
        &mut self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<Option<NeighbourInfo>, NextHopError> {
        let reply = self.nl.request(
            RouteNetlinkMessage::GetNeighbour(neighbour_request(ifindex, addr)),
            0,
            &|| format!("neighbour query for {addr} on ifindex {ifindex}"),
        );
        match reply {
            Err(NextHopError::Netlink { source, .. }) if source.raw_os_error() == Some(ENOENT) => {
                Ok(None)
            }
            r => Ok(r?.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neighbour(n),
                _ => None,
            })),
        }
    }

    fn create_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NextHopError> {
        let mut m = neighbour_request(ifindex, addr);
        m.header.state = NeighbourState::None;
        m.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        m.attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                NEIGHBOUR_PROTOCOL,
            )));
        self.nl.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("creation of a managed neighbour {addr} on ifindex {ifindex}"),
        )?;
        Ok(())
    }

    /// Deletes a neighbour entry; `false` when it was already gone.
    fn delete_neighbour(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool, NextHopError> {
        let reply = self.nl.request(
            RouteNetlinkMessage::DelNeighbour(neighbour_request(ifindex, addr)),
            0,
            &|| format!("removal of the managed neighbour {addr} on ifindex {ifindex}"),
        );
        match reply {
            Ok(_) => Ok(true),
            Err(NextHopError::Netlink { source, .. }) if source.raw_os_error() == Some(ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Read an interface's MTU by index (netlink `RTM_GETLINK`, in the calling
/// thread's network namespace), e.g. for the default `--encap-mtu`.
pub fn mtu_by_index(ifindex: u32) -> Result<u32, NextHopError> {
    let mut nl = Netlink::open()?;
    let mut m = LinkMessage::default();
    m.header.index = ifindex;
    let reply = nl.request(RouteNetlinkMessage::GetLink(m), 0, &|| {
        format!("link query for ifindex {ifindex}")
    });
    let msgs = match reply {
        Err(NextHopError::Netlink { source, .. }) if source.raw_os_error() == Some(ENODEV) => {
            return Err(NextHopError::ServedInterfaceGone { ifindex })
        }
        r => r?,
    };
    msgs.iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                })
            }
            _ => None,
        })
        .ok_or(NextHopError::ServedInterfaceGone { ifindex })
}

/// Read an interface's ifindex by name (netlink `RTM_GETLINK`), e.g. for
/// `--interface eth0`.
pub fn ifindex_by_name(name: &str) -> Result<u32, NextHopError> {
    let mut nl = Netlink::open()?;
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    let reply = nl.request(RouteNetlinkMessage::GetLink(m), 0, &|| {
        format!("link query for interface {name:?}")
    });
    let msgs = match reply {
        Err(NextHopError::Netlink { source, .. }) if source.raw_os_error() == Some(ENODEV) => {
            return Err(NextHopError::InterfaceNotFound {
                name: name.to_string(),
            })
        }
        r => r?,
    };
    msgs.iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
            _ => None,
        })
        .ok_or_else(|| NextHopError::InterfaceNotFound {
            name: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressHeaderFlags;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x1];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x2];

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn a16(s: &str) -> Addr16 {
        addr16(ip(s))
    }

    fn route(dst: &str, len: u8, ifindex: u32, via: Option<&str>) -> RouteEntry {
        RouteEntry {
            dst: ip(dst),
            prefix_len: len,
            metric: 0,
            target: RouteTarget::Via(vec![Gateway {
                ifindex,
                via: via.map(ip),
            }]),
            prefsrc: None,
        }
    }

    fn neigh(ifindex: u32, addr: &str, state: NeighbourState, mac: [u8; 6]) -> NeighbourEntry {
        NeighbourEntry {
            ifindex,
            addr: ip(addr),
            state,
            mac: Some(mac),
        }
    }

    fn served() -> Vec<(u32, [u8; 6])> {
        vec![(2, MAC_A), (3, MAC_B)]
    }

    #[test]
    fn labels_are_stable() {
        let labels: Vec<_> = Unresolved::ALL.iter().map(|u| u.label()).collect();
        assert_eq!(labels, ["no_route", "other_interface", "no_neighbour"]);
    }

    #[test]
    fn empty_resolves_nothing() {
        let nh = NextHops::empty();
        assert_eq!(nh.resolve(&a16("198.18.0.1")), Err(Unresolved::NoRoute));
        assert_eq!(nh.resolve(&a16("2001:2::1")), Err(Unresolved::NoRoute));
        assert_eq!((nh.routes(), nh.neighbours()), (0, 0));
    }

    #[test]
    fn longest_prefix_wins_whatever_the_input_order() {
        let routes = [
            route("0.0.0.0", 0, 2, Some("198.18.0.1")),
            route("198.18.0.0", 24, 2, None),
            route("198.18.0.128", 25, 3, Some("198.19.0.1")),
        ];
        let neighbours = [
            neigh(2, "198.18.0.1", NeighbourState::Reachable, GW_MAC),
            neigh(2, "198.18.0.7", NeighbourState::Stale, HOST_MAC),
            neigh(3, "198.19.0.1", NeighbourState::Delay, MAC_B),
        ];
        for perm in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let r: Vec<_> = perm.iter().map(|&i| routes[i].clone()).collect();
            let nh = NextHops::from_parts(&served(), &r, &neighbours, &[]);
            // /24, directly connected: the destination's own entry.
            assert_eq!(
                nh.resolve(&a16("198.18.0.7")),
                Ok(Hop {
                    ifindex: 2,
                    src_mac: MAC_A,
                    dst_mac: HOST_MAC
                })
            );
            // /25 through a router on ifindex 3.
            assert_eq!(
                nh.resolve(&a16("198.18.0.200")),
                Ok(Hop {
                    ifindex: 3,
                    src_mac: MAC_B,
                    dst_mac: MAC_B
                })
            );
            // /0: the default gateway.
            assert_eq!(
                nh.resolve(&a16("203.0.113.9")),
                Ok(Hop {
                    ifindex: 2,
                    src_mac: MAC_A,
                    dst_mac: GW_MAC
                })
            );
            // On-link but not in the neighbour table.
            assert_eq!(nh.resolve(&a16("198.18.0.8")), Err(Unresolved::NoNeighbour));
            assert_eq!((nh.routes(), nh.neighbours()), (3, 3));
        }
    }

    #[test]
    fn lower_metric_wins_among_equal_prefixes() {
        let mut worse = route("198.18.0.0", 16, 3, Some("198.18.9.9"));
        worse.metric = 200;
        let mut better = route("198.18.0.0", 16, 2, Some("198.18.0.1"));
        better.metric = 100;
        let n = [
            neigh(2, "198.18.0.1", NeighbourState::Reachable, GW_MAC),
            neigh(3, "198.18.9.9", NeighbourState::Reachable, HOST_MAC),
        ];
        let nh = NextHops::from_parts(&served(), &[worse, better], &n, &[]);
        assert_eq!(
            nh.resolve(&a16("198.18.5.5")).map(|h| h.dst_mac),
            Ok(GW_MAC)
        );
    }

    #[test]
    fn families_do_not_mix() {
        // An IPv6 default route must not catch IPv4 destinations, and the
        // reverse.
        let routes = [
            route("::", 0, 2, Some("fe80::1")),
            route("0.0.0.0", 0, 3, Some("198.18.0.1")),
        ];
        let n = [
            neigh(2, "fe80::1", NeighbourState::Reachable, GW_MAC),
            neigh(3, "198.18.0.1", NeighbourState::Reachable, HOST_MAC),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        assert_eq!(
            nh.resolve(&a16("2001:2::5")),
            Ok(Hop {
                ifindex: 2,
                src_mac: MAC_A,
                dst_mac: GW_MAC
            })
        );
        assert_eq!(
            nh.resolve(&a16("198.18.3.3")),
            Ok(Hop {
                ifindex: 3,
                src_mac: MAC_B,
                dst_mac: HOST_MAC
            })
        );
        let v6_only = NextHops::from_parts(&served(), &routes[..1], &n, &[]);
        assert_eq!(
            v6_only.resolve(&a16("198.18.3.3")),
            Err(Unresolved::NoRoute)
        );
        let v4_only = NextHops::from_parts(&served(), &routes[1..], &n, &[]);
        assert_eq!(v4_only.resolve(&a16("2001:2::5")), Err(Unresolved::NoRoute));
    }

    #[test]
    fn ipv6_longest_prefix_and_direct() {
        let routes = [
            route("2001:2::", 48, 2, None),
            route("2001:2:0:1::", 64, 3, Some("fe80::99")),
        ];
        let n = [
            neigh(2, "2001:2::10", NeighbourState::Probe, HOST_MAC),
            neigh(3, "fe80::99", NeighbourState::Permanent, GW_MAC),
            // Same address on the other interface must not be confused.
            neigh(2, "fe80::99", NeighbourState::Reachable, MAC_A),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        assert_eq!(
            nh.resolve(&a16("2001:2::10"))
                .map(|h| (h.ifindex, h.dst_mac)),
            Ok((2, HOST_MAC))
        );
        assert_eq!(
            nh.resolve(&a16("2001:2:0:1::10"))
                .map(|h| (h.ifindex, h.dst_mac)),
            Ok((3, GW_MAC))
        );
        assert_eq!(nh.resolve(&a16("2001:3::1")), Err(Unresolved::NoRoute));
    }

    #[test]
    fn unusable_states_give_no_neighbour() {
        let routes = [route("198.18.0.0", 24, 2, None)];
        for (state, ok) in [
            (NeighbourState::Reachable, true),
            (NeighbourState::Stale, true),
            (NeighbourState::Delay, true),
            (NeighbourState::Probe, true),
            (NeighbourState::Permanent, true),
            (NeighbourState::Noarp, true),
            (NeighbourState::Incomplete, false),
            (NeighbourState::Failed, false),
            (NeighbourState::None, false),
        ] {
            let n = [neigh(2, "198.18.0.9", state, HOST_MAC)];
            let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
            let want = if ok {
                Ok(HOST_MAC)
            } else {
                Err(Unresolved::NoNeighbour)
            };
            assert_eq!(
                nh.resolve(&a16("198.18.0.9")).map(|h| h.dst_mac),
                want,
                "{state:?}"
            );
        }
        // A usable state without an lladdr is no better.
        let n = [NeighbourEntry {
            ifindex: 2,
            addr: ip("198.18.0.9"),
            state: NeighbourState::Reachable,
            mac: None,
        }];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        assert_eq!(nh.resolve(&a16("198.18.0.9")), Err(Unresolved::NoNeighbour));
    }

    #[test]
    fn unserved_interface_is_other_interface() {
        let routes = [
            route("198.18.0.0", 24, 7, None),
            route("0.0.0.0", 0, 2, Some("198.18.1.1")),
        ];
        let n = [
            neigh(7, "198.18.0.9", NeighbourState::Reachable, HOST_MAC),
            neigh(2, "198.18.1.1", NeighbourState::Reachable, GW_MAC),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        // The /24 wins even though the default route would be served.
        assert_eq!(
            nh.resolve(&a16("198.18.0.9")),
            Err(Unresolved::OtherInterface)
        );
    }

    #[test]
    fn reject_routes_shadow_shorter_prefixes() {
        let routes = [
            route("0.0.0.0", 0, 2, Some("198.18.0.1")),
            RouteEntry {
                dst: ip("198.19.0.0"),
                prefix_len: 16,
                metric: 0,
                target: RouteTarget::Reject,
                prefsrc: None,
            },
            RouteEntry {
                dst: ip("198.19.1.0"),
                prefix_len: 24,
                metric: 0,
                target: RouteTarget::Via(vec![]),
                prefsrc: None,
            },
        ];
        let n = [neigh(2, "198.18.0.1", NeighbourState::Reachable, GW_MAC)];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        assert_eq!(nh.resolve(&a16("198.19.3.3")), Err(Unresolved::NoRoute));
        assert_eq!(nh.resolve(&a16("198.19.1.3")), Err(Unresolved::NoRoute));
        assert_eq!(
            nh.resolve(&a16("198.20.0.1")).map(|h| h.dst_mac),
            Ok(GW_MAC)
        );
    }

    #[test]
    fn host_routes_and_bad_prefix_lengths() {
        let routes = [
            route("198.18.0.5", 32, 3, Some("198.18.0.1")),
            route("198.18.0.0", 24, 2, None),
            route("198.18.0.0", 33, 2, None), // impossible: ignored
            route("2001:2::", 129, 2, None),  // impossible: ignored
        ];
        let n = [
            neigh(3, "198.18.0.1", NeighbourState::Reachable, GW_MAC),
            neigh(2, "198.18.0.5", NeighbourState::Reachable, HOST_MAC),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        assert_eq!(nh.routes(), 2);
        assert_eq!(
            nh.resolve(&a16("198.18.0.5"))
                .map(|h| (h.ifindex, h.dst_mac)),
            Ok((3, GW_MAC))
        );
        assert_eq!(nh.resolve(&a16("198.18.0.6")), Err(Unresolved::NoNeighbour));
    }

    #[test]
    fn ecmp_picks_a_live_hop_deterministically() {
        let routes = [RouteEntry {
            dst: ip("0.0.0.0"),
            prefix_len: 0,
            metric: 0,
            target: RouteTarget::Via(vec![
                Gateway {
                    ifindex: 2,
                    via: Some(ip("198.18.0.1")),
                },
                Gateway {
                    ifindex: 3,
                    via: Some(ip("198.18.1.1")),
                },
            ]),
            prefsrc: None,
        }];
        let n = [
            neigh(2, "198.18.0.1", NeighbourState::Reachable, GW_MAC),
            neigh(3, "198.18.1.1", NeighbourState::Reachable, HOST_MAC),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &n, &[]);
        let mut seen = BTreeSet::new();
        for i in 0..64u8 {
            let d = a16(&format!("203.0.{i}.{}", i.wrapping_mul(37)));
            let h = nh.resolve(&d).expect("ecmp resolves");
            assert_eq!(nh.resolve(&d), Ok(h));
            seen.insert(h.ifindex);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn parses_kernel_route_messages() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 24;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(198, 18, 7, 0))),
            RouteAttribute::Oif(4),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(198, 18, 0, 1))),
            RouteAttribute::Priority(50),
        ];
        assert_eq!(
            parse_route(&m),
            Some(RouteEntry {
                dst: ip("198.18.7.0"),
                prefix_len: 24,
                metric: 50,
                target: RouteTarget::Via(vec![Gateway {
                    ifindex: 4,
                    via: Some(ip("198.18.0.1"))
                }]),
                prefsrc: None,
            })
        );
        let mut with_src = m.clone();
        with_src
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet(
                Ipv4Addr::new(198, 18, 0, 9),
            )));
        assert_eq!(
            parse_route(&with_src).and_then(|r| r.prefsrc),
            Some(ip("198.18.0.9"))
        );
        let mut other_table = m.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        assert_eq!(parse_route(&other_table), None);
        let mut local = m.clone();
        local.header.kind = RouteType::Local;
        assert_eq!(parse_route(&local), None);
        let mut broadcast = m.clone();
        broadcast.header.kind = RouteType::Broadcast;
        assert_eq!(parse_route(&broadcast), None);
        let mut blackhole = m.clone();
        blackhole.header.kind = RouteType::BlackHole;
        assert_eq!(
            parse_route(&blackhole).map(|r| r.target),
            Some(RouteTarget::Reject)
        );
        let mut default = m;
        default.header.destination_prefix_length = 0;
        default
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Destination(_)));
        assert_eq!(
            parse_route(&default).map(|r| (r.dst, r.prefix_len)),
            Some((ip("0.0.0.0"), 0))
        );
    }

    #[test]
    fn parses_kernel_address_messages() {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = 24;
        m.header.index = 4;
        m.header.scope = AddressScope::Universe;
        m.header.flags = AddressHeaderFlags::Permanent;
        // A point-to-point address: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        m.attributes = vec![
            AddressAttribute::Address(ip("198.18.7.2")),
            AddressAttribute::Local(ip("198.18.7.1")),
        ];
        assert_eq!(
            parse_address(&m),
            Some(AddressEntry {
                ifindex: 4,
                addr: ip("198.18.7.1"),
                prefix_len: 24,
                scope: AddressScope::Universe,
                flags: AddressFlags::Permanent,
            })
        );
        // IFA_FLAGS (32 bits) wins over the header's 8.
        let mut flagged = m.clone();
        flagged.attributes.push(AddressAttribute::Flags(
            AddressFlags::Secondary | AddressFlags::Noprefixroute,
        ));
        assert_eq!(
            parse_address(&flagged).map(|a| a.flags),
            Some(AddressFlags::Secondary | AddressFlags::Noprefixroute)
        );
        // IPv6 has IFA_ADDRESS only.
        let mut v6 = AddressMessage::default();
        v6.header.family = AddressFamily::Inet6;
        v6.header.prefix_len = 64;
        v6.header.index = 5;
        v6.header.scope = AddressScope::Link;
        v6.header.flags = AddressHeaderFlags::Tentative;
        v6.attributes = vec![AddressAttribute::Address(ip("fe80::1"))];
        assert_eq!(
            parse_address(&v6),
            Some(AddressEntry {
                ifindex: 5,
                addr: ip("fe80::1"),
                prefix_len: 64,
                scope: AddressScope::Link,
                flags: AddressFlags::Tentative,
            })
        );
        let mut mismatched = v6.clone();
        mismatched.header.family = AddressFamily::Inet;
        assert_eq!(parse_address(&mismatched), None);
        let mut other = v6;
        other.header.family = AddressFamily::Packet;
        assert_eq!(parse_address(&other), None);
        assert_eq!(parse_address(&AddressMessage::default()), None);
    }

    fn address(ifindex: u32, cidr: &str, scope: AddressScope, flags: AddressFlags) -> AddressEntry {
        let (a, len) = cidr.split_once('/').expect("ADDR/LEN");
        AddressEntry {
            ifindex,
            addr: ip(a),
            prefix_len: len.parse().expect("prefix length"),
            scope,
            flags,
        }
    }

    #[test]
    fn source_is_the_prefsrc_else_the_egress_primary() {
        use AddressScope::{Host, Link, Universe};
        let none = AddressFlags::empty();
        let addresses = [
            address(2, "198.18.5.1/24", Universe, AddressFlags::Permanent),
            address(2, "198.18.0.10/24", Universe, none),
            address(2, "198.18.0.11/24", Universe, AddressFlags::Secondary),
            address(2, "127.0.0.5/8", Host, none),
            address(3, "198.18.1.10/24", Universe, none),
            address(7, "198.18.50.1/24", Universe, none),
            address(2, "fe80::1/64", Link, none),
            address(2, "2001:2::9/64", Universe, AddressFlags::Tentative),
            address(2, "2001:2::10/64", Universe, none),
            address(3, "2001:2:1::10/64", Universe, AddressFlags::Deprecated),
            address(3, "2001:2:1::12/64", Universe, AddressFlags::Dadfailed),
            address(3, "2001:2:1::11/64", Universe, none),
        ];
        let mut with_src = route("198.18.40.0", 24, 2, None);
        with_src.prefsrc = Some(ip("198.18.99.99"));
        let mut wrong_family_src = route("198.18.41.0", 24, 2, None);
        wrong_family_src.prefsrc = Some(ip("2001:2::99"));
        let routes = [
            route("198.18.0.0", 24, 2, None),
            route("198.18.7.0", 24, 2, Some("198.18.0.1")),
            route("203.0.113.0", 24, 2, Some("198.18.5.254")),
            route("0.0.0.0", 0, 2, Some("198.19.9.9")),
            with_src,
            wrong_family_src,
            route("198.18.1.0", 24, 3, None),
            route("198.18.50.0", 24, 7, None),
            route("198.18.51.0", 24, 8, None),
            RouteEntry {
                dst: ip("198.18.60.0"),
                prefix_len: 24,
                metric: 0,
                target: RouteTarget::Reject,
                prefsrc: Some(ip("198.18.0.10")),
            },
            route("2001:2::", 64, 2, None),
            route("2001:2:1::", 64, 3, None),
        ];
        let nh = NextHops::from_parts(&served(), &routes, &[], &addresses);
        let src = |d: &str| nh.source_for(&a16(d)).map(ip_from16);
        for (dst, want) in [
            // On-link: the primary address whose subnet holds the destination,
            // not the first primary, nor a secondary.
            ("198.18.0.7", Some("198.18.0.10")),
            // Through a router: the subnet that holds the router.
            ("198.18.7.7", Some("198.18.0.10")),
            ("203.0.113.9", Some("198.18.5.1")),
            // A router in no subnet of the interface: the first primary.
            ("198.51.100.1", Some("198.18.5.1")),
            // The route's own source wins; one of the other family does not count.
            ("198.18.40.3", Some("198.18.99.99")),
            ("198.18.41.3", Some("198.18.5.1")),
            ("198.18.1.20", Some("198.18.1.10")),
            // An interface the gateway does not serve still has its source.
            ("198.18.50.5", Some("198.18.50.1")),
            // An interface without addresses, a reject route: none.
            ("198.18.51.5", None),
            ("198.18.60.5", None),
            // IPv6: the first global one that is neither tentative,
            // deprecated nor failed.
            ("2001:2::77", Some("2001:2::10")),
            ("2001:2:1::77", Some("2001:2:1::11")),
            ("2001:3::1", None),
        ] {
            assert_eq!(src(dst), want.map(ip), "source for {dst}");
        }
        // Through the trait, as the workers hand it to the core.
        let dyn_sources: &dyn SourceAddrs = &nh;
        assert_eq!(
            dyn_sources.source_for(&a16("198.18.1.20")),
            Some(a16("198.18.1.10"))
        );
        assert_eq!(NextHops::empty().source_for(&a16("198.18.1.20")), None);

        // The steering program's view: every address of a served interface
        // and the preferred sources of routes through one.
        let local: Vec<IpAddr> = nh.local_addrs().iter().map(|a| ip_from16(*a)).collect();
        for want in [
            "198.18.5.1",
            "198.18.0.11",
            "127.0.0.5",
            "198.18.1.10",
            "198.18.99.99",
            "fe80::1",
            "2001:2::9",
            "2001:2:1::11",
        ] {
            assert!(local.contains(&ip(want)), "{want} in {local:?}");
        }
        assert!(!local.contains(&ip("198.18.50.1")), "{local:?}");
        assert!(!local.contains(&ip("2001:2::99")), "{local:?}");
        let mut sorted = local.clone();
        sorted.sort_unstable_by_key(|a| addr16(*a));
        sorted.dedup();
        assert_eq!(sorted, local);

        // The node's addresses, for node ports: every interface's, served
        // or not, but no loopback or unusable IPv6 address, and no
        // route's preferred source that no interface holds.
        let node = nh.node_addrs();
        for want in ["198.18.50.1", "198.18.0.11", "fe80::1", "2001:2:1::10"] {
            assert!(node.contains(&a16(want)), "{want} in {node:?}");
        }
        for not in ["127.0.0.5", "2001:2::9", "2001:2:1::12", "198.18.99.99"] {
            assert!(!node.contains(&a16(not)), "{not} in {node:?}");
        }
        assert!(NextHops::empty().node_addrs().is_empty());
    }

    #[test]
    fn parses_extended_ack_text() {
        // NLMSGERR_ATTR_MSG = "bad thing\0", padded.
        let mut attrs = vec![14, 0, 1, 0];
        attrs.extend_from_slice(b"bad thing\0");
        attrs.extend_from_slice(&[0, 0]);
        assert_eq!(ext_ack_text(&attrs), "bad thing");
        let mut err = vec![0u8; NLMSG_HDR_LEN];
        err.extend_from_slice(&attrs);
        assert_eq!(
            error_ext_ack(&err, NLM_F_CAPPED | NLM_F_ACK_TLVS),
            "bad thing"
        );
        assert_eq!(ext_ack_text(&[1, 0]), "");
        assert_eq!(ext_ack_text(&[200, 0, 1, 0, b'x']), "");
    }

    fn hop_view(mac: [u8; 6]) -> NextHops {
        NextHops::from_parts(
            &served(),
            &[route("198.18.0.0", 16, 2, None)],
            &[
                neigh(2, "198.18.0.7", NeighbourState::Reachable, mac),
                neigh(2, "198.18.0.8", NeighbourState::Reachable, HOST_MAC),
            ],
            &[],
        )
    }

    #[test]
    fn hop_cache_uses_a_new_neighbour_mac_at_once() {
        let mut cache = HopCache::new();
        let dst = a16("198.18.0.7");
        let old = hop_view(GW_MAC);
        let want = |mac| {
            Ok(Hop {
                ifindex: 2,
                src_mac: MAC_A,
                dst_mac: mac,
            })
        };
        assert_eq!(cache.resolve(&old, &dst), want(GW_MAC));
        assert_eq!(cache.resolve(&old, &dst), want(GW_MAC));
        assert_eq!((cache.hits, cache.misses), (1, 1));
        // The neighbour moved: the resolver's next view has its new MAC,
        // and the very next packet goes there.
        let new = hop_view(HOST_MAC);
        assert_ne!(old.id(), new.id());
        assert_eq!(cache.resolve(&new, &dst), want(HOST_MAC));
        assert_eq!(cache.resolve(&new, &dst), want(HOST_MAC));
        assert_eq!((cache.hits, cache.misses), (2, 2));
        // The neighbour is gone: not resolved, and not remembered either.
        let gone = NextHops::from_parts(&served(), &[route("198.18.0.0", 16, 2, None)], &[], &[]);
        for _ in 0..2 {
            assert_eq!(cache.resolve(&gone, &dst), Err(Unresolved::NoNeighbour));
        }
        assert_eq!(cache.misses, 4);
        // Back: resolved again on the next packet.
        assert_eq!(cache.resolve(&old, &dst), want(GW_MAC));
    }

    #[test]
    fn hop_cache_collisions_return_each_destinations_own_hop() {
        // Two on-link destinations that share a slot.
        let first = a16("198.18.0.7");
        let slot = HopCache::slot(&first) & (HOP_CACHE_SLOTS - 1);
        let mut colliding = (0u32..65536)
            .map(|i| addr16(IpAddr::V4(Ipv4Addr::from(0xc612_0000 | i))))
            .filter(|a| *a != first && HopCache::slot(a) & (HOP_CACHE_SLOTS - 1) == slot);
        let other = colliding
            .next()
            .expect("a colliding address in 198.18.0.0/16");
        let third = colliding.next().expect("another one");
        let view = NextHops::from_parts(
            &served(),
            &[route("198.18.0.0", 16, 2, None)],
            &[
                NeighbourEntry {
                    ifindex: 2,
                    addr: ip("198.18.0.7"),
                    state: NeighbourState::Reachable,
                    mac: Some(GW_MAC),
                },
                NeighbourEntry {
                    ifindex: 2,
                    addr: ip_from16(other),
                    state: NeighbourState::Reachable,
                    mac: Some(HOST_MAC),
                },
            ],
            &[],
        );
        let mut cache = HopCache::new();
        for _ in 0..3 {
            assert_eq!(cache.resolve(&view, &first).map(|h| h.dst_mac), Ok(GW_MAC));
            assert_eq!(
                cache.resolve(&view, &other).map(|h| h.dst_mac),
                Ok(HOST_MAC)
            );
        }
        // Each evicted the other: every lookup asked the view.
        assert_eq!((cache.hits, cache.misses), (0, 6));
        assert_eq!(
            cache.resolve(&view, &other).map(|h| h.dst_mac),
            Ok(HOST_MAC)
        );
        assert_eq!(cache.hits, 1);
        // A third destination in the slot, without a neighbour: unresolved,
        // and the cached hop stays.
        assert_eq!(cache.resolve(&view, &third), Err(Unresolved::NoNeighbour));
        assert_eq!(
            cache.resolve(&view, &other).map(|h| h.dst_mac),
            Ok(HOST_MAC)
        );
        assert_eq!(cache.hits, 2);
    }
}
