//! What the core decides about a frame, and why it drops one.
//!
//! Owns: [`Verdict`], [`NextHop`], [`DropReason`]. Drop reasons are a small
//! `Copy` enum with a dense index so that per-core counters are a plain array.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use crate::flow::Addr16;

/// Which side of the gateway a rewritten frame goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Towards a backend (pod endpoint): the forward direction.
    Backend,
    /// Towards the client: replies and rejects.
    Client,
}

/// Where a forwarded frame goes next. The I/O layer resolves `addr` to a MAC
/// through the neighbour table and writes it with [`crate::packet::rewrite::set_macs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// The address to resolve (the backend for forwards, the client for replies).
    pub addr: Addr16,
    /// The side it lives on (picks the interface in the two-armed topology).
    pub side: Side,
}

/// The decision for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The frame was rewritten in place; send its first `len` bytes to `next_hop`.
    Forward {
        /// Length of the rewritten frame.
        len: usize,
        /// Where it goes.
        next_hop: NextHop,
    },
    /// The frame was rewritten in place into a TCP RST or an ICMP/ICMPv6 port
    /// unreachable addressed to the sender, MACs swapped; send its first `len`
    /// bytes back out the interface it came in on.
    Reject {
        /// Length of the reject frame.
        len: usize,
    },
    /// Not service traffic: hand the frame to the kernel unchanged.
    Pass,
    /// Another worker owns this frame's flow ([`crate::pipeline::Ownership`]):
    /// the frame is unchanged; give it to worker `owner`, whose
    /// `process`/`process_batch` decides it. Counted as a hand-off by this
    /// worker, and as its verdict by the owner.
    Handoff {
        /// The owning worker's index.
        owner: u16,
    },
    /// Dropped, for this reason.
    Drop(DropReason),
}

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $name:ident => $label:literal, )*) => {
        /// Why a frame was dropped. Each has a counter per core.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $( $(#[$doc])* $name, )* }

        impl DropReason {
            /// Every reason, in index order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons (the length of a counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// Dense index, for counter arrays.
            #[must_use]
            pub const fn index(self) -> usize { self as usize }

            /// Stable snake_case label, used in metrics and verdict files.
            #[must_use]
            pub const fn label(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
        }
    };
}

drop_reasons! {
    /// The buffer handed in is shorter than the stated frame length, or the
    /// frame is longer than 65 535 bytes (no link carries one).
    BadFrameLength => "bad_frame_length",
    /// Shorter than an Ethernet header.
    EthernetTruncated => "ethernet_truncated",
    /// An 802.1Q tag was announced but is cut off.
    VlanTruncated => "vlan_truncated",
    /// IPv4 header invalid: version, IHL, total length or options.
    Ipv4Malformed => "ipv4_malformed",
    /// IPv6 header or extension headers invalid.
    Ipv6Malformed => "ipv6_malformed",
    /// IPv6 with an IPv4-mapped source or destination (`::ffff:0:0/96`), which
    /// RFC 4291 §2.5.5.2 keeps off the wire; never matched to IPv4 services.
    Ipv6MappedAddress => "ipv6_mapped_address",
    /// The frame ends before the IP packet's stated length.
    IpTruncated => "ip_truncated",
    /// TCP, UDP or SCTP header cut off or inconsistent with the IP length.
    L4Malformed => "l4_malformed",
    /// ICMPv4 inside IPv6 or ICMPv6 inside IPv4.
    IcmpFamilyMismatch => "icmp_family_mismatch",
    /// An ICMP error whose checksum is wrong or whose quoted packet is unusable.
    IcmpMalformed => "icmp_malformed",
    /// UDP over IPv6 with a zero checksum (RFC 8200 §8.1 forbids it).
    Udp6ZeroChecksum => "udp6_zero_checksum",
    /// A fragmented SCTP packet whose port must change: its CRC32c covers the
    /// whole reassembled packet, which the gateway never sees.
    SctpFragmentPortRewrite => "sctp_fragment_port_rewrite",
    /// TTL or hop limit would reach zero.
    TtlExpired => "ttl_expired",
    /// A non-first IP fragment whose first fragment was not seen (or whose
    /// datagram arrived in more than 8 disjoint pieces at once).
    FragmentUntracked => "fragment_untracked",
    /// The service has no endpoints and the frame cannot be answered with a
    /// reject (it is itself a RST, an ICMP error or a non-first fragment).
    NoEndpoints => "no_endpoints",
    /// The connection table has no room: the flow's shard is full of
    /// confirmed flows, which are never evicted (the new flow is refused).
    ConntrackFull => "conntrack_full",
    /// A reject would not fit in the frame's buffer.
    BufferTooSmall => "buffer_too_small",
    /// Source NAT found no free port for the flow's (SNAT address, backend
    /// address, backend port, protocol) in this worker's share of the range.
    SnatPortsExhausted => "snat_ports_exhausted",
    /// A DSR packet too big for the backend side once encapsulated that
    /// cannot be answered with ICMP (a fragment, an ICMP error, a
    /// non-unicast source). Answerable ones are rejected with ICMP
    /// fragmentation needed / packet too big and counted apart.
    EncapTooBig => "encap_too_big",
    /// Source NAT or DSR needs the gateway's own address in the flow's family,
    /// and there is none: no `--snat-address` of that family and no route
    /// (with a source address) to the backend.
    SnatNoAddress => "snat_no_address",
    /// A new flow to a load-balancer IP from a source outside the Service's
    /// `loadBalancerSourceRanges`.
    SourceRange => "source_range",
    /// A new flow to an `internalTrafficPolicy: Local` frontend from a client
    /// whose node has none of its endpoints (or is not a known node), as
    /// kube-proxy drops it.
    NoLocalEndpoint => "no_local_endpoint",
    /// An SCTP packet whose CRC32c is wrong, seen before a rewrite that would
    /// otherwise give it a valid one (RFC 9260 §6.8: the receiver drops it).
    SctpBadChecksum => "sctp_bad_checksum",
    /// A frame to a frontend sent to a link-layer broadcast or multicast
    /// address: a router does not forward it (RFC 1812 §5.3.4).
    LinkBroadcast => "link_broadcast",
    /// A packet to a frontend from a source no host can have (0/8, loopback,
    /// multicast, broadcast; IPv6 unspecified, loopback, multicast): a
    /// martian (RFC 1812 §5.3.7), dropped and never answered.
    MartianSource => "martian_source",
    /// A new flow that the NetworkPolicies of its backend pod (ingress) or
    /// of its client pod (egress) do not allow; no flow is created.
    NetworkPolicy => "network_policy",
    /// A fragment that overlaps, repeats or contradicts (past the end a last
    /// fragment set) a fragment of its datagram already forwarded; the
    /// datagram's later fragments are dropped too (RFC 5722, RFC 1858 §3;
    /// Linux discards the whole datagram).
    FragmentOverlap => "fragment_overlap",
    /// A fragment that reaches past the largest datagram IP can carry (65 535
    /// bytes): the "ping of death" (RFC 791 §3.1, RFC 8200 §4.5).
    FragmentOversize => "fragment_oversize",
    /// A TCP fragment at offset 8 bytes, which can only rewrite the TCP
    /// header's flags (RFC 1858 §4, RFC 3128 §3).
    FragmentTinyTcp => "fragment_tiny_tcp",
    /// A source-routed packet: IPv4 LSRR or SSRR option (RFC 7126 §4.3, Linux
    /// `accept_source_route=0`), or an IPv6 routing header with segments left
    /// (RFC 8200 §4.4, RFC 5095).
    SourceRoute => "source_route",
    /// A new flow from a cluster IP or load-balancer address (not an
    /// external IP, which may be a node's): a spoofed source whose replies
    /// would go to the frontend (Linux drops a source that is a local address
    /// as a martian).
    FrontendSource => "frontend_source",
    /// An ICMP error that would be sent to a cluster IP or load-balancer
    /// address.
    ErrorToFrontend => "error_to_frontend",
    /// A new routed flow whose reply tuple is a live flow's: the same client
    /// port to another frontend with the same backend. Refused, as Linux
    /// conntrack refuses a clash, so that the live flow keeps its replies.
    FlowClash => "flow_clash",
}
