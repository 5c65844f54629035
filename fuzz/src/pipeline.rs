//! The pipeline target: one worker and a table, fed a sequence of frames in
//! both directions.
//!
//! Input: `[variant, op, op, ...]` (at most [`MAX_OPS`] ops). The variant
//! byte picks:
//! - bits 0..3: the table ([`tables`]: every frontend kind with routed, SNAT
//!   and DSR return paths, with and without affinity, under a NetworkPolicy;
//!   frontends on the addresses random bytes carry most; no services at all);
//! - bit 3: whether each buffer has room for a reject or an encapsulation;
//! - bit 4: a small encapsulation MTU (576), so DSR answers "too big";
//! - bit 5: whether the worker knows the node's addresses;
//! - bit 6: frames go through `process_batch`, eight at a time, instead of
//!   `process` one by one (frames that need an earlier output first flush).
//!
//! Each op ([`Op`]) makes zero or more frames: raw bytes, a well-formed
//! client frame to one of the table's frontends, the *reply* to an earlier
//! forwarded frame (its addresses and ports swapped: what the backend, or
//! the client, sends back, so reverse entries created earlier in the same
//! input are hit), an ICMP error quoting an earlier forwarded frame, a UDP
//! datagram in two fragments, a jump in time, a switch to the next table
//! generation (a backend removed, one draining), or the last frame with one
//! byte changed.
//!
//! Checked for every frame: no panic; a `Forward` keeps the frame length, or
//! (DSR) grows it by at most an outer header within the buffer; a `Reject`
//! fits the buffer; nothing is written past the frame (or the reject, or the
//! encapsulated frame, or for a drop one outer header); a `Pass` leaves the
//! frame unchanged. For frames
//! built well-formed (client frames, replies, ICMP errors), every frame that
//! is forwarded or rejected has right lengths and checksums on every layer
//! ([`testkit::wire`]). Finally, a frame length past its buffer is dropped.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16, Proto};
use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_dataplane::pipeline::{Frame, NodeAddrs, Verdict, Worker};
use clustergate_dataplane::policy::{
    PolicyBackendRecord, PolicyClassRecord, PolicyParts, PolicyPortRecord, PolicyRuleRecord,
    BACKEND_INGRESS_ISOLATED, CLASS_EGRESS_ISOLATED, PROTO_ANY,
};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{BackendState, FrontendKind, PrefixRecord, ReturnPath, Table};
use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::testkit::{self, L4Spec, Tcp, CLIENT_MAC, GATEWAY_MAC};
use clustergate_dataplane::time::Now;
use ipnet::IpNet;

/// Size of a frame buffer with room (an AF_XDP chunk).
pub const BUF_LEN: usize = 2048;
/// Ops read from one input at most.
pub const MAX_OPS: usize = 32;
/// Forwarded frames remembered for [`Op::Reply`] and [`Op::Icmp`].
const HISTORY: usize = 8;
/// Frames per `process_batch` call in batched runs.
const BATCH: usize = 8;

/// Variant bit: buffers have room past the frame.
pub const ROOM: u8 = 0x08;
/// Variant bit: encapsulation MTU 576.
pub const SMALL_MTU: u8 = 0x10;
/// Variant bit: the worker knows the node's addresses.
pub const NODE_ADDRS: u8 = 0x20;
/// Variant bit: frames go through `process_batch`.
pub const BATCHED: u8 = 0x40;

/// The node's IPv4 address (node ports are served on it).
pub const NODE_V4: &str = "198.18.0.11";
/// The node's IPv6 address.
pub const NODE_V6: &str = "2001:db8::11";
/// Client addresses of [`Op::Client`], IPv4: inside and outside the
/// load balancer's source range, on the node-local frontend's nodes, a
/// backend itself (hairpin) and the gateway's own SNAT address.
pub const CLIENTS_V4: [&str; 6] = [
    "198.18.0.5",
    "198.18.0.200",
    "10.1.2.3",
    "198.18.1.1",
    "198.18.2.1",
    "198.18.0.11",
];
/// Client addresses of [`Op::Client`], IPv6.
pub const CLIENTS_V6: [&str; 4] = [
    "2001:db8:5::5",
    "2001:db8::77",
    "2001:db8:1::1",
    "2001:2::5",
];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("fuzz table address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("fuzz prefix")
}

fn spec(addr: &str, port: u16, proto: Proto, backends: &[(&str, u16)]) -> ServiceSpec {
    ServiceSpec::cluster_ip(
        ip(addr),
        port,
        proto,
        backends
            .iter()
            .map(|(a, p)| BackendSpec::ready(ip(a), *p))
            .collect(),
    )
}

/// Services with a few frontends of each protocol and family, one with a
/// draining (weight 0) backend, and some without endpoints.
fn full() -> Vec<ServiceSpec> {
    let mut drain = spec(
        "198.19.0.11",
        80,
        Proto::Tcp,
        &[("198.18.1.1", 8080), ("198.18.1.3", 8080)],
    );
    drain.backends[1].weight = 0;
    drain.backends[1].state = BackendState::Terminating;
    vec![
        spec(
            "198.19.0.10",
            80,
            Proto::Tcp,
            &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
        )
        .with_name("default/web:http"),
        spec("198.19.0.10", 53, Proto::Udp, &[("198.18.1.1", 5353)]),
        spec("198.19.0.10", 3868, Proto::Sctp, &[("198.18.1.1", 38680)]),
        spec(
            "2001:db8::10",
            80,
            Proto::Tcp,
            &[("2001:db8:1::1", 8080), ("2001:db8:1::2", 8080)],
        ),
        spec("2001:db8::10", 53, Proto::Udp, &[("2001:db8:1::1", 5353)]),
        spec(
            "2001:db8::10",
            3868,
            Proto::Sctp,
            &[("2001:db8:1::1", 38680)],
        ),
        drain,
        spec("198.19.0.12", 80, Proto::Tcp, &[]),
        spec("198.19.0.12", 53, Proto::Udp, &[]),
        spec("2001:db8::12", 53, Proto::Udp, &[]),
    ]
}

/// Frontends on the addresses random bytes are likeliest to carry.
fn zeros() -> Vec<ServiceSpec> {
    vec![
        spec("0.0.0.0", 0, Proto::Tcp, &[("198.18.1.1", 1)]),
        spec("0.0.0.0", 0, Proto::Udp, &[]),
        spec("::", 0, Proto::Udp, &[("2001:db8:1::1", 1)]),
        spec("::", 0, Proto::Tcp, &[]),
    ]
}

fn with_return_path(rp: ReturnPath, specs: &[ServiceSpec]) -> Vec<ServiceSpec> {
    specs
        .iter()
        .map(|s| s.clone().with_return_path(rp))
        .collect()
}

fn with_affinity(specs: &[ServiceSpec]) -> Vec<ServiceSpec> {
    let mut specs = specs.to_vec();
    for s in &mut specs {
        s.affinity_timeout_s = Some(10_800);
    }
    specs
}

/// `specs` plus the other frontend kinds: node ports (IPv4 TCP, IPv6 UDP),
/// an external IP, a load-balancer IP open to 198.18.0.0/24 only, and a
/// node-local frontend with a backend on each of two nodes (and none on a
/// third); with the nodes' prefixes and node ports on every address.
fn every_kind(specs: &[ServiceSpec]) -> TableSpec {
    let mut services = specs.to_vec();
    let rp = specs.first().map_or(ReturnPath::Routed, |s| s.return_path);
    let affinity = specs.first().and_then(|s| s.affinity_timeout_s);
    let np = |s: ServiceSpec, any: &str| {
        let mut s = s.with_kind(FrontendKind::NodePort, ip(any));
        s.port = 30_080;
        s.affinity_timeout_s = affinity;
        s.with_return_path(rp)
    };
    services.push(np(
        spec("198.19.0.10", 0, Proto::Tcp, &[("198.18.1.1", 8080)]),
        "0.0.0.0",
    ));
    services.push(np(
        spec("2001:db8::10", 0, Proto::Udp, &[("2001:db8:1::1", 5353)]),
        "::",
    ));
    let mut ext = spec("198.19.8.1", 443, Proto::Tcp, &[("198.18.1.2", 8443)])
        .with_kind(FrontendKind::ExternalIp, ip("198.19.8.1"))
        .with_return_path(rp);
    ext.affinity_timeout_s = affinity;
    services.push(ext);
    let mut lb = spec("198.19.9.1", 80, Proto::Tcp, &[("198.18.1.2", 8080)])
        .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.1"))
        .with_return_path(rp);
    lb.source_ranges = Some(vec![net("198.18.0.0/24")]);
    lb.affinity_timeout_s = affinity;
    services.push(lb);
    let mut local = ServiceSpec::cluster_ip(
        ip("198.19.0.20"),
        80,
        Proto::Tcp,
        vec![
            BackendSpec::ready(ip("198.18.1.1"), 8080).on_node(1),
            BackendSpec::ready(ip("198.18.1.2"), 8080).on_node(2),
        ],
    )
    .with_return_path(rp);
    local.node_local = true;
    local.affinity_timeout_s = affinity;
    services.push(local);
    TableSpec {
        services,
        nodes: vec![
            (net("198.18.0.0/24"), 1),
            (net("198.18.0.11/32"), 2),
            (net("198.18.1.0/24"), 2),
            (net("10.0.0.0/8"), 3),
            (net("2001:db8::/32"), 1),
        ],
        node_port_addresses: vec![net("0.0.0.0/0"), net("::/0")],
        policy: policy(),
    }
}

/// A NetworkPolicy: clients in 198.18.0.0/24 and 2001:db8:5::/48 are
/// class 1, 10.0.0.0/8 class 2 (isolated for egress: it reaches nothing);
/// backend 198.18.1.2 admits class 1 on TCP 8080 only, 2001:db8:1::2 class 1
/// on every port; other backends are not isolated.
fn policy() -> PolicyParts {
    PolicyParts {
        prefixes: vec![
            PrefixRecord::new(net("198.18.0.0/24"), 1),
            PrefixRecord::new(net("10.0.0.0/8"), 2),
            PrefixRecord::new(net("2001:db8:5::/48"), 1),
        ],
        classes: vec![
            PolicyClassRecord::default(),
            PolicyClassRecord::default(),
            // Isolated for egress, with no rule: it reaches nothing.
            PolicyClassRecord {
                flags: CLASS_EGRESS_ISOLATED,
                rules_start: 0,
                rules_len: 0,
                reserved: 0,
            },
        ],
        backends: vec![
            PolicyBackendRecord {
                addr: addr16(ip("198.18.1.2")),
                rules_start: 0,
                rules_len: 1,
                flags: BACKEND_INGRESS_ISOLATED,
                class: 0,
            },
            PolicyBackendRecord {
                addr: addr16(ip("2001:db8:1::2")),
                rules_start: 1,
                rules_len: 1,
                flags: BACKEND_INGRESS_ISOLATED,
                class: 0,
            },
        ],
        // Both rules admit class 1 (bit 1 of one bitmap word).
        rules: vec![
            PolicyRuleRecord {
                bits_start: 0,
                ports_start: 0,
                ports_len: 1,
                reserved: 0,
            },
            PolicyRuleRecord {
                bits_start: 0,
                ports_start: 1,
                ports_len: 1,
                reserved: 0,
            },
        ],
        ports: vec![
            PolicyPortRecord::new(6, 8080, 8080),
            PolicyPortRecord::new(PROTO_ANY, 0, u16::MAX),
        ],
        bits: vec![1 << 1],
    }
}

fn plain(specs: Vec<ServiceSpec>) -> TableSpec {
    TableSpec {
        services: specs,
        ..TableSpec::default()
    }
}

/// The next generation of `spec`, as after an endpoint change: each
/// service's first backend removed where it has several, else drained
/// (terminating, weight 0).
fn next_generation(spec: &TableSpec) -> TableSpec {
    let mut spec = spec.clone();
    for s in &mut spec.services {
        if s.backends.len() > 1 && !s.node_local {
            s.backends.remove(0);
        } else if let Some(b) = s.backends.first_mut() {
            b.weight = 0;
            b.state = BackendState::Terminating;
        }
    }
    spec
}

/// The eight tables a variant picks from, each with its next generation
/// ([`Op::Switch`]).
pub fn tables() -> &'static [(Table, Table)] {
    static T: OnceLock<Vec<(Table, Table)>> = OnceLock::new();
    T.get_or_init(|| {
        let full = full();
        let specs = [
            (every_kind(&full), 0),
            (every_kind(&with_affinity(&full)), 7),
            (plain(zeros()), 0),
            (TableSpec::default(), 0),
            (every_kind(&with_return_path(ReturnPath::Snat, &full)), 0),
            (every_kind(&with_return_path(ReturnPath::Dsr, &full)), 0),
            (
                every_kind(&with_return_path(ReturnPath::Snat, &with_affinity(&full))),
                3,
            ),
            (plain(with_return_path(ReturnPath::Dsr, &zeros())), 0),
        ];
        specs
            .iter()
            .enumerate()
            .map(|(i, (s, seed))| {
                let g = i as u64 + 1;
                let build = |g, s: &TableSpec| {
                    Table::build_full(g, *seed, s, DEFAULT_MAX_RING_SIZE).expect("fuzz table")
                };
                (build(g, s), build(g + 100, &next_generation(s)))
            })
            .collect()
    })
}

/// The node's own addresses, when the worker is told them.
#[derive(Debug)]
struct Node;

impl NodeAddrs for Node {
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        *addr == addr16(ip(NODE_V4)) || *addr == addr16(ip(NODE_V6))
    }
}

fn worker(encap_mtu: u16, node_addrs: bool) -> Worker {
    let cfg = Config {
        capacity: 64,
        shards: 2,
        partitions: 1,
        affinity_capacity: 16,
        fragment_capacity: 16,
        ..Config::default()
    };
    let mut w = Worker::with_config(
        Arc::new(Conntrack::new(&cfg)),
        ReturnConfig {
            // Eight ports: exhaustion and port reuse are reached too.
            ports: PortRange::new(20_000, 20_007).expect("fuzz SNAT range"),
            encap_mtu,
            ..ReturnConfig::default()
        },
    );
    w.set_sources(Some(Arc::new(FixedSources {
        v4: Some(addr16(ip("198.18.2.1"))),
        v6: Some(addr16(ip("2001:db8:2::1"))),
    })));
    if node_addrs {
        w.set_node_addrs(Some(Arc::new(Node)));
    }
    w
}

/// One step of an input. `encode` writes it as the target reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Raw bytes (an Ethernet header is put in front unless they start with
    /// one); at most 2048 of them.
    Raw(Vec<u8>),
    /// A well-formed frame from a client to frontend `frontend` (modulo the
    /// table's count). `client`: which address of [`CLIENTS_V4`] or
    /// [`CLIENTS_V6`]; source port `40000 + sport`. `flags`: bits 0..2 the
    /// protocol (0 the frontend's, then TCP, UDP, SCTP), bits 2..6 SYN, ACK,
    /// FIN, RST, bit 6 a VLAN tag, bit 7 the port after the frontend's.
    /// `payload`: its length.
    Client {
        /// Frontend index.
        frontend: u8,
        /// Client index.
        client: u8,
        /// Source port offset.
        sport: u8,
        /// Protocol and flags.
        flags: u8,
        /// Payload length.
        payload: u8,
    },
    /// The reply to forwarded frame `back` (0 the latest): addresses and
    /// ports swapped (the inner packet's, for an encapsulated one); TCP flags
    /// from `flags` bits 0..4 (SYN, ACK, FIN, RST; none: SYN-ACK).
    Reply {
        /// Which earlier forwarded frame.
        back: u8,
        /// TCP flags.
        flags: u8,
        /// Payload length.
        payload: u8,
    },
    /// An ICMP error quoting forwarded frame `back`, sent to its source by its
    /// destination or by a router (`kind` bit 7); `kind` bits 0..2 the type
    /// (IPv4: unreachable, time exceeded, parameter problem, fragmentation
    /// needed; IPv6: unreachable, too big, time exceeded, parameter problem),
    /// bits 2..5 the code; `quote`: bytes quoted past 28, in fours.
    Icmp {
        /// Which earlier forwarded frame.
        back: u8,
        /// Type, code and sender.
        kind: u8,
        /// Quote length.
        quote: u8,
    },
    /// A UDP datagram to frontend `frontend` from client `client`, in two
    /// fragments; `split`: its length and where it is cut; `order` bit 0 the
    /// last fragment first, bit 1 the first fragment twice.
    Fragments {
        /// Frontend index.
        frontend: u8,
        /// Client index.
        client: u8,
        /// Length and cut.
        split: u8,
        /// Order.
        order: u8,
    },
    /// Time moves on ([`advance_secs`]).
    Advance(u8),
    /// The table's next generation is published (once; later ones do nothing).
    Switch,
    /// The last frame again, with byte `at` (modulo its length) XORed with
    /// `xor` (0: 0xff).
    Mutate {
        /// Offset.
        at: u16,
        /// Mask.
        xor: u8,
    },
}

/// Seconds an [`Op::Advance`] moves the clock by: across the UDP, SYN,
/// established and affinity timeouts.
#[must_use]
pub fn advance_secs(b: u8) -> u64 {
    const STEPS: [u64; 8] = [1, 10, 60, 300, 3_600, 7_500, 11_000, 100_000];
    STEPS[usize::from(b % 8)] + u64::from(b >> 3)
}

impl Op {
    /// The op as input bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Raw(b) => {
                let len = b.len().min(BUF_LEN) as u16;
                let mut v = vec![0];
                v.extend_from_slice(&len.to_le_bytes());
                v.extend_from_slice(&b[..usize::from(len)]);
                v
            }
            Self::Client {
                frontend,
                client,
                sport,
                flags,
                payload,
            } => vec![1, *frontend, *client, *sport, *flags, *payload],
            Self::Reply {
                back,
                flags,
                payload,
            } => vec![2, *back, *flags, *payload],
            Self::Icmp { back, kind, quote } => vec![3, *back, *kind, *quote],
            Self::Fragments {
                frontend,
                client,
                split,
                order,
            } => vec![4, *frontend, *client, *split, *order],
            Self::Advance(b) => vec![5, *b],
            Self::Switch => vec![6],
            Self::Mutate { at, xor } => {
                let mut v = vec![7];
                v.extend_from_slice(&at.to_le_bytes());
                v.push(*xor);
                v
            }
        }
    }

    /// Reads one op from the front of `data`; `None` at the end. Missing
    /// trailing bytes read as zeros.
    fn decode(data: &mut &[u8]) -> Option<Self> {
        let (&code, rest) = data.split_first()?;
        *data = rest;
        let mut byte = || {
            let (&b, rest) = data.split_first().unwrap_or((&0, &[]));
            *data = rest;
            b
        };
        Some(match code % 8 {
            0 => {
                let len = u16::from_le_bytes([byte(), byte()]);
                let len = usize::from(len).min(BUF_LEN).min(data.len());
                let (frame, rest) = data.split_at(len);
                *data = rest;
                Self::Raw(frame.to_vec())
            }
            1 => Self::Client {
                frontend: byte(),
                client: byte(),
                sport: byte(),
                flags: byte(),
                payload: byte(),
            },
            2 => Self::Reply {
                back: byte(),
                flags: byte(),
                payload: byte(),
            },
            3 => Self::Icmp {
                back: byte(),
                kind: byte(),
                quote: byte(),
            },
            4 => Self::Fragments {
                frontend: byte(),
                client: byte(),
                split: byte(),
                order: byte(),
            },
            5 => Self::Advance(byte()),
            6 => Self::Switch,
            _ => Self::Mutate {
                at: u16::from_le_bytes([byte(), byte()]),
                xor: byte(),
            },
        })
    }
}

/// An input: the variant byte, then the ops.
#[must_use]
pub fn encode(variant: u8, ops: &[Op]) -> Vec<u8> {
    let mut v = vec![variant];
    for op in ops {
        v.extend(op.encode());
    }
    v
}

/// Puts an Ethernet header in front of `f` unless it already looks like one.
fn with_ethernet(f: &[u8]) -> Vec<u8> {
    let et = f.get(12..14);
    if matches!(
        et,
        Some([0x08, 0x00] | [0x86, 0xdd] | [0x81, 0x00] | [0x88, 0xa8] | [0x08, 0x06])
    ) {
        return f.to_vec();
    }
    let mut out = [GATEWAY_MAC, CLIENT_MAC].concat();
    match f.first().map(|b| b >> 4) {
        Some(6) => out.extend_from_slice(&[0x86, 0xdd]),
        _ => out.extend_from_slice(&[0x08, 0x00]),
    }
    out.extend_from_slice(f);
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

/// The untagged copy of a frame (its 802.1Q tag, if any, removed).
fn untagged(f: &[u8]) -> Vec<u8> {
    if f.get(12..14) == Some(&[0x81, 0x00]) && f.len() >= 18 {
        [&f[..12], &f[16..]].concat()
    } else {
        f.to_vec()
    }
}

/// Addresses, IP protocol and the first four transport bytes of a frame's
/// packet (the inner one, if `inner` and it is encapsulated).
fn tuple(frame: &[u8], inner: bool) -> Option<(Addr16, Addr16, u8, [u8; 4])> {
    use etherparse::{IpSlice, NetSlice, SlicedPacket};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let ip_of = |ip: &IpSlice<'_>| -> (Addr16, Addr16, u8, Vec<u8>) {
        match ip {
            IpSlice::Ipv4(v) => (
                addr16(IpAddr::V4(v.header().source_addr())),
                addr16(IpAddr::V4(v.header().destination_addr())),
                v.payload().ip_number.0,
                v.payload().payload.to_vec(),
            ),
            IpSlice::Ipv6(v) => (
                v.header().source(),
                v.header().destination(),
                v.payload().ip_number.0,
                v.payload().payload.to_vec(),
            ),
        }
    };
    let outer = match p.net? {
        NetSlice::Ipv4(v) => IpSlice::Ipv4(v),
        NetSlice::Ipv6(v) => IpSlice::Ipv6(v),
        NetSlice::Arp(_) => return None,
    };
    let (mut s, mut d, mut proto, mut payload) = ip_of(&outer);
    if inner && (proto == 4 || proto == 41) {
        let i = IpSlice::from_slice(&payload).ok()?;
        (s, d, proto, payload) = ip_of(&i);
    }
    let ports = payload.get(..4)?.try_into().ok()?;
    Some((s, d, proto, ports))
}

fn tcp_flags(bits: u8, seq: u32) -> Tcp {
    Tcp {
        syn: bits & 1 != 0,
        ack: (bits & 2 != 0).then_some(seq.wrapping_add(1)),
        fin: bits & 4 != 0,
        rst: bits & 8 != 0,
        seq,
    }
}

/// One frame waiting for its verdict.
struct Pending {
    buf: Vec<u8>,
    len: usize,
    before: Vec<u8>,
    /// Built well-formed: forwarded or rejected, it must be too.
    checked: bool,
}

/// One input's run: the worker, its tables and what it forwarded so far.
struct Run<'a> {
    base: &'a Table,
    later: &'a Table,
    next: bool,
    worker: Worker,
    room: bool,
    batched: bool,
    now: u64,
    pending: Vec<Pending>,
    forwarded: Vec<Vec<u8>>,
    last: Vec<u8>,
}

impl<'a> Run<'a> {
    fn new(base: &'a Table, later: &'a Table, variant: u8) -> Self {
        let mut run = Self {
            base,
            later,
            next: false,
            worker: worker(
                if variant & SMALL_MTU != 0 { 576 } else { 1500 },
                variant & NODE_ADDRS != 0,
            ),
            room: variant & ROOM != 0,
            batched: variant & BATCHED != 0,
            now: 1_000,
            pending: Vec::new(),
            forwarded: Vec::new(),
            last: Vec::new(),
        };
        run.worker.follow_table(base);
        run
    }

    fn table(&self) -> &'a Table {
        if self.next {
            self.later
        } else {
            self.base
        }
    }

    fn submit(&mut self, frame: Vec<u8>, checked: bool) {
        let len = frame.len();
        let mut buf = frame.clone();
        if self.room {
            buf.resize(BUF_LEN.max(len), 0xa5);
        }
        self.last = frame;
        let p = Pending {
            before: buf.clone(),
            buf,
            len,
            checked,
        };
        if self.batched {
            self.pending.push(p);
            if self.pending.len() == BATCH {
                self.flush();
            }
        } else {
            let mut p = p;
            let table = self.table();
            let v = self
                .worker
                .process(Now::from_secs(self.now), table, &mut p.buf, p.len);
            self.check(&p, v);
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let mut verdicts = [Verdict::Pass; BATCH];
        {
            let mut frames: Vec<Frame<'_>> = pending
                .iter_mut()
                .map(|p| Frame {
                    buf: &mut p.buf,
                    len: p.len,
                })
                .collect();
            let table = self.table();
            self.worker.process_batch(
                Now::from_secs(self.now),
                table,
                &mut frames,
                &mut verdicts[..],
            );
        }
        for (p, v) in pending.iter().zip(verdicts) {
            self.check(p, v);
        }
    }

    fn check(&mut self, p: &Pending, v: Verdict) {
        let (buf, before, len) = (&p.buf, &p.before, p.len);
        match v {
            Verdict::Forward { len: l, .. } => {
                // DSR: an outer header of 20 or 40 bytes in front.
                assert!(
                    l == len || (l <= len + 40 && l <= buf.len()),
                    "a forward keeps the frame length or encapsulates: {len} → {l}"
                );
                let end = l.max(len);
                assert!(buf[end..] == before[end..], "forward wrote past the frame");
                if p.checked {
                    let _ = testkit::wire(&buf[..l]);
                }
                if self.forwarded.len() == HISTORY {
                    self.forwarded.remove(0);
                }
                self.forwarded.push(buf[..l].to_vec());
            }
            Verdict::Reject { len: l } => {
                assert!(l <= buf.len(), "reject longer than the buffer");
                let end = l.max(len);
                assert!(buf[end..] == before[end..], "reject wrote past itself");
                if p.checked {
                    let _ = testkit::wire(&buf[..l]);
                }
            }
            Verdict::Pass | Verdict::Handoff { .. } => {
                assert!(buf == before, "a passed or handed-off frame must be unchanged")
            }
            // A dropped frame may have been rewritten first (a DSR fragment
            // is encapsulated before its range is found to overlap): the
            // buffer is discarded, but nothing lies past one outer header.
            Verdict::Drop(_) => {
                let end = (len + 40).min(buf.len());
                assert!(buf[end..] == before[end..], "drop wrote past the frame");
            }
        }
    }

    /// Where a client reaches frontend `i`: its address and port (a node's
    /// address for a node port), its protocol and IP family.
    fn frontend(&self, i: u8) -> (Addr16, u16, u8, bool) {
        let fs = self.table().frontends();
        let Some(f) = fs.get(usize::from(i) % fs.len().max(1)) else {
            return (addr16(ip("198.19.0.10")), 80, 6, true);
        };
        let v4 = ip_from16(f.addr).is_ipv4();
        let addr = if f.kind == FrontendKind::NodePort as u8 {
            addr16(ip(if v4 { NODE_V4 } else { NODE_V6 }))
        } else {
            f.addr
        };
        (addr, f.port, f.proto, v4)
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Raw(b) => self.submit(with_ethernet(&b), false),
            Op::Client {
                frontend,
                client,
                sport,
                flags,
                payload,
            } => {
                let (dst, port, proto, v4) = self.frontend(frontend);
                let src = client_addr(client, v4);
                let dport = if flags & 0x80 != 0 {
                    port.wrapping_add(1)
                } else {
                    port
                };
                let proto = match flags & 3 {
                    0 => proto,
                    1 => 6,
                    2 => 17,
                    _ => 132,
                };
                let l4 = match proto {
                    6 => L4Spec::Tcp(tcp_flags(flags >> 2, u32::from(sport) * 1000)),
                    17 => L4Spec::Udp,
                    _ => L4Spec::Sctp,
                };
                let f = testkit::frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    (flags & 0x40 != 0).then_some(100),
                    src,
                    40_000 + u16::from(sport),
                    dst,
                    dport,
                    l4,
                    64,
                    &pattern(usize::from(payload)),
                );
                self.submit(f, true);
            }
            Op::Reply {
                back,
                flags,
                payload,
            } => {
                self.flush();
                let Some(out) = self.back(back) else { return };
                let Some((s, d, proto, ports)) = tuple(&out, true) else {
                    return;
                };
                let l4 = match proto {
                    6 => {
                        let bits = if flags & 0x0f == 0 { 3 } else { flags };
                        L4Spec::Tcp(tcp_flags(bits, u32::from(flags) << 20))
                    }
                    17 => L4Spec::Udp,
                    132 => L4Spec::Sctp,
                    _ => return,
                };
                if ip_from16(s).is_ipv4() != ip_from16(d).is_ipv4() {
                    return;
                }
                let f = testkit::frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    None,
                    d,
                    u16::from_be_bytes([ports[2], ports[3]]),
                    s,
                    u16::from_be_bytes([ports[0], ports[1]]),
                    l4,
                    64,
                    &pattern(usize::from(payload)),
                );
                self.submit(f, true);
            }
            Op::Icmp { back, kind, quote } => {
                self.flush();
                let Some(out) = self.back(back) else { return };
                let out = untagged(&out);
                let Some((s, d, _, _)) = tuple(&out, false) else {
                    return;
                };
                let v4 = ip_from16(s).is_ipv4();
                if v4 != ip_from16(d).is_ipv4() {
                    return;
                }
                let from = if kind & 0x80 != 0 {
                    addr16(ip(if v4 { "198.18.3.1" } else { "2001:db8:3::1" }))
                } else {
                    d
                };
                let code = (kind >> 2) & 0x07;
                let icmp = match (v4, kind & 3) {
                    (true, 0) => (3, code, [0; 4]),
                    (true, 1) => (11, code & 1, [0; 4]),
                    (true, 2) => (12, 0, [20, 0, 0, 0]),
                    (true, _) => (3, 4, [0, 0, 0x02, 0x40]),
                    (false, 0) => (1, code, [0; 4]),
                    (false, 1) => (2, 0, 1280u32.to_be_bytes()),
                    (false, 2) => (3, code & 1, [0; 4]),
                    (false, _) => (4, code % 3, 40u32.to_be_bytes()),
                };
                let f = testkit::icmp_error(from, s, icmp, &out, 28 + usize::from(quote) * 4);
                self.submit(f, true);
            }
            Op::Fragments {
                frontend,
                client,
                split,
                order,
            } => {
                let (dst, port, _, v4) = self.frontend(frontend);
                let src = client_addr(client, v4);
                let sport = 40_000 + u16::from(client);
                // 8 + 8·k bytes, cut after 8·c of them (1 ≤ c ≤ k).
                let k = 1 + usize::from(split % 32);
                let len = 8 + 8 * k;
                let cut = 8 * (1 + usize::from(split >> 5) % k);
                let d = testkit::udp_datagram(src, dst, sport, port, len);
                let id = u16::from(split) << 8 | u16::from(order);
                let off = (cut / 8) as u16;
                let (first, last) = if v4 {
                    (
                        testkit::ipv4_raw(src, dst, 17, id, (0, true), &d[..cut]),
                        testkit::ipv4_raw(src, dst, 17, id, (off, false), &d[cut..]),
                    )
                } else {
                    (
                        testkit::ipv6_fragment(src, dst, 17, id.into(), (0, true), &d[..cut]),
                        testkit::ipv6_fragment(src, dst, 17, id.into(), (off, false), &d[cut..]),
                    )
                };
                let mut frames = vec![first.clone(), last];
                if order & 1 != 0 {
                    frames.reverse();
                }
                if order & 2 != 0 {
                    frames.push(first);
                }
                for f in frames {
                    self.submit(f, false);
                }
            }
            Op::Advance(b) => self.now += advance_secs(b),
            Op::Switch => {
                self.flush();
                if !self.next {
                    self.next = true;
                    let table = self.table();
                    self.worker.follow_table(table);
                }
            }
            Op::Mutate { at, xor } => {
                let mut f = self.last.clone();
                if f.is_empty() {
                    return;
                }
                let i = usize::from(at) % f.len();
                f[i] ^= if xor == 0 { 0xff } else { xor };
                self.submit(f, false);
            }
        }
    }

    fn back(&self, back: u8) -> Option<Vec<u8>> {
        let n = self.forwarded.len();
        let i = usize::from(back) % n.max(1);
        n.checked_sub(1 + i).map(|j| self.forwarded[j].clone())
    }
}

fn client_addr(i: u8, v4: bool) -> Addr16 {
    let i = usize::from(i);
    addr16(ip(if v4 {
        CLIENTS_V4[i % CLIENTS_V4.len()]
    } else {
        CLIENTS_V6[i % CLIENTS_V6.len()]
    }))
}

/// Runs one input (see the module's docs); panics on a broken property.
pub fn run(data: &[u8]) {
    let Some((&variant, mut rest)) = data.split_first() else {
        return;
    };
    let tables = tables();
    let (base, later) = &tables[usize::from(variant & 0x07) % tables.len()];
    let mut run = Run::new(base, later, variant);
    for _ in 0..MAX_OPS {
        let Some(op) = Op::decode(&mut rest) else {
            break;
        };
        run.op(op);
    }
    run.end();
}

/// Runs `ops` over `table` with a worker of `variant` (as [`run`] does);
/// panics on a broken property.
pub fn drive(table: &Table, variant: u8, ops: &[Op]) {
    let mut run = Run::new(table, table, variant);
    for op in ops {
        run.op(op.clone());
    }
    run.end();
}

impl Run<'_> {
    fn end(mut self) {
        self.flush();
        // A length past the buffer is refused.
        let mut small = [0u8; 16];
        let table = self.table();
        assert!(matches!(
            self.worker
                .process(Now::from_secs(self.now), table, &mut small, 17),
            Verdict::Drop(_)
        ));
    }
}
