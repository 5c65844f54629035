//! Fuzz `Worker::process` over whole frames.
//!
//! Input: `[variant, frames...]`. The first byte picks a variant: bits 0..3
//! the table (a few frontends, an empty-endpoint service, affinity, no
//! services at all, or the frontends with source NAT or DSR; the tables with
//! the few frontends also have node ports on every address, a
//! load-balancer IP with source ranges and a node-local frontend), bit 3
//! whether the buffer has room for a reject (or an encapsulation), bit 4 a
//! small encapsulation MTU (576: ICMP too-big answers), bit 5 whether the
//! worker knows the node's addresses (one IPv4, one IPv6) or takes every
//! address within the node-port addresses; the rest is
//! split into frames at every `0xC0 0xFF` marker, all processed by one worker
//! (so state from one frame, a flow or a fragment, meets the next). Frames
//! that do not start with an Ethernet header get one (gateway MACs, IPv4 or
//! IPv6 ether type by their first nibble), so most inputs reach the IP layer.
//!
//! Checked: no panic; a `Forward` keeps the frame length, or (DSR) grows it
//! by at most an outer IPv6 header within the buffer; a `Reject` fits the
//! buffer; nothing is written past the frame (or the reject, or the
//! encapsulated frame); a `Pass` leaves the frame unchanged. The SNAT range is
//! eight ports, so exhaustion and port reuse are reached too.

#![no_main]

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::flow::Addr16;
use clustergate_dataplane::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_dataplane::pipeline::{NodeAddrs, Verdict, Worker};
use clustergate_dataplane::snat::{FixedSources, PortRange, ReturnConfig};
use clustergate_dataplane::table::{
    BackendSpec, FrontendKind, ReturnPath, ServiceSpec, Table, TableSpec,
};
use ipnet::IpNet;
use clustergate_dataplane::time::Now;
use libfuzzer_sys::fuzz_target;

const BUF_LEN: usize = 2048;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("fuzz table address")
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

fn tables() -> &'static [Table] {
    static T: OnceLock<Vec<Table>> = OnceLock::new();
    T.get_or_init(|| {
        let full = vec![
            spec(
                "198.19.0.10",
                80,
                Proto::Tcp,
                &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
            ),
            spec("198.19.0.10", 53, Proto::Udp, &[("198.18.1.1", 5353)]),
            spec("198.19.0.10", 3868, Proto::Sctp, &[("198.18.1.1", 38680)]),
            spec("2001:db8::10", 80, Proto::Tcp, &[("2001:db8:1::1", 8080)]),
            spec("2001:db8::10", 53, Proto::Udp, &[("2001:db8:1::1", 5353)]),
            spec("198.19.0.12", 80, Proto::Tcp, &[]),
            spec("198.19.0.12", 53, Proto::Udp, &[]),
            spec("2001:db8::12", 53, Proto::Udp, &[]),
        ];
        let mut affinity = full.clone();
        for s in &mut affinity {
            s.affinity_timeout_s = Some(10_800);
        }
        // Frontends on the addresses random bytes are likeliest to carry.
        let zeros = vec![
            spec("0.0.0.0", 0, Proto::Tcp, &[("198.18.1.1", 1)]),
            spec("0.0.0.0", 0, Proto::Udp, &[]),
            spec("::", 0, Proto::Udp, &[("2001:db8:1::1", 1)]),
            spec("::", 0, Proto::Tcp, &[]),
        ];
        let with = |rp: ReturnPath, specs: &[ServiceSpec]| -> Vec<ServiceSpec> {
            specs
                .iter()
                .map(|s| s.clone().with_return_path(rp))
                .collect()
        };
        // The other kinds: node ports (IPv4 TCP, IPv6 UDP), a
        // load-balancer IP open to 198.18.0.0/24 only, and a node-local
        // frontend with a backend on each of two nodes (and none on a
        // third), on top of `specs`.
        let every_kind = |g: u64, seed: u64, specs: &[ServiceSpec]| -> Table {
            let net = |s: &str| -> IpNet { s.parse().expect("fuzz prefix") };
            let mut services = specs.to_vec();
            let rp = specs.first().map_or(ReturnPath::Routed, |s| s.return_path);
            let np = |s: ServiceSpec, any: &str| {
                let mut s = s.with_kind(FrontendKind::NodePort, ip(any));
                s.port = 30_080;
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
            let mut lb = spec("198.19.9.1", 80, Proto::Tcp, &[("198.18.1.2", 8080)])
                .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.1"))
                .with_return_path(rp);
            lb.source_ranges = Some(vec![net("198.18.0.0/24")]);
            lb.affinity_timeout_s = specs.first().and_then(|s| s.affinity_timeout_s);
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
            local.affinity_timeout_s = specs.first().and_then(|s| s.affinity_timeout_s);
            services.push(local);
            let spec = TableSpec {
                services,
                nodes: vec![
                    (net("198.18.0.0/24"), 1),
                    (net("198.18.0.11/32"), 2),
                    (net("198.18.1.0/24"), 2),
                    (net("10.0.0.0/8"), 3),
                    (net("2001:db8::/32"), 1),
                ],
                node_port_addresses: vec![net("0.0.0.0/0"), net("::/0")],
            };
            Table::build_full(g, seed, &spec, DEFAULT_MAX_RING_SIZE).expect("every-kind table")
        };
        vec![
            every_kind(1, 0, &full),
            every_kind(2, 7, &affinity),
            Table::build(3, 0, &zeros).expect("zeros table"),
            Table::empty(4),
            every_kind(5, 0, &with(ReturnPath::Snat, &full)),
            every_kind(6, 0, &with(ReturnPath::Dsr, &full)),
            every_kind(7, 3, &with(ReturnPath::Snat, &affinity)),
            Table::build(8, 0, &with(ReturnPath::Dsr, &zeros)).expect("dsr zeros"),
        ]
    })
}

/// The node's own addresses, when the worker is told them.
#[derive(Debug)]
struct Node;

impl NodeAddrs for Node {
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        *addr == addr16(ip("198.18.0.11")) || *addr == addr16(ip("2001:db8::11"))
    }
}

fn worker(encap_mtu: u16, node_addrs: bool) -> Worker {
    let cfg = Config {
        capacity: 64,
        shards: 2,
        affinity_capacity: 16,
        fragment_capacity: 16,
        ..Config::default()
    };
    let mut w = Worker::with_config(
        Arc::new(Conntrack::new(&cfg)),
        ReturnConfig {
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

/// Puts an Ethernet header in front of `f` unless it already looks like one.
fn with_ethernet(f: &[u8]) -> Vec<u8> {
    let et = f.get(12..14);
    if matches!(
        et,
        Some([0x08, 0x00] | [0x86, 0xdd] | [0x81, 0x00] | [0x08, 0x06])
    ) {
        return f.to_vec();
    }
    let mut out = vec![0x02, 0, 0, 0, 0, 0xfe, 0x02, 0, 0, 0, 0, 0x01];
    match f.first().map(|b| b >> 4) {
        Some(6) => out.extend_from_slice(&[0x86, 0xdd]),
        _ => out.extend_from_slice(&[0x08, 0x00]),
    }
    out.extend_from_slice(f);
    out
}

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let at = rest.windows(2).position(|w| w == [0xc0, 0xff]);
        let (frame, next) = match at {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &[][..]),
        };
        rest = next;
        Some(frame)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&variant, rest)) = data.split_first() else {
        return;
    };
    let tables = tables();
    let table = &tables[usize::from(variant & 0x07) % tables.len()];
    let room = variant & 0x08 != 0;
    let mut w = worker(
        if variant & 0x10 != 0 { 576 } else { 1500 },
        variant & 0x20 != 0,
    );
    for (i, raw) in split(rest).take(16).enumerate() {
        let f = with_ethernet(raw);
        let len = f.len();
        let mut buf = f.clone();
        if room {
            buf.resize(BUF_LEN.max(len), 0xa5);
        }
        let before = buf.clone();
        let now = Now::from_secs(1_000 + i as u64);
        match w.process(now, table, &mut buf, len) {
            Verdict::Forward { len: l, .. } => {
                // DSR: an outer header of 20 or 40 bytes in front (Ethernet
                // padding dropped).
                assert!(
                    l == len || (l <= len + 40 && l <= buf.len()),
                    "a forward keeps the frame length or encapsulates: {len} → {l}"
                );
                let end = l.max(len);
                assert!(buf[end..] == before[end..], "forward wrote past the frame");
            }
            Verdict::Reject { len: l } => {
                assert!(l <= buf.len(), "reject longer than the buffer");
                let end = l.max(len);
                assert!(buf[end..] == before[end..], "reject wrote past itself");
            }
            Verdict::Pass => assert!(buf == before, "a passed frame must be unchanged"),
            Verdict::Drop(_) => assert!(buf[len..] == before[len..], "drop wrote past the frame"),
        }
    }
    // A length past the buffer is refused.
    let mut small = [0u8; 16];
    assert!(matches!(
        w.process(Now::from_secs(1), table, &mut small, 17),
        Verdict::Drop(_)
    ));
});
