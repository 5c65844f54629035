//! A hostile corpus through `clustergate replay`, with an independent checker.
//!
//! The corpus (built here, deterministically) holds, for IPv4 and IPv6, TCP,
//! UDP, SCTP and ICMP/ICMPv6, both directions:
//! - valid frames, each with the verdict it must get;
//! - every hostile class of `docs/architecture.md` ("Hostile packets"), each
//!   with the drop reason it must get (or the forward it must get);
//! - every truncation (every prefix length) of every valid frame: all must be
//!   dropped;
//! - frames with fuzzed header fields whose checksums were made valid again
//!   (a seeded generator): any verdict, but no panic, and whatever leaves
//!   must be sound.
//!
//! The real binary replays it. The checker below shares no code with the
//! dataplane: its own Ethernet/IP walk, one's-complement sums and CRC32c. It
//! verifies every output frame (lengths consistent with the frame, no
//! trailing bytes, IPv4 header checksum, TCP/UDP/ICMP/ICMPv6 checksums, SCTP
//! CRC32c; in ICMP errors the quoted header and, when quoted whole, the
//! quoted packet's checksum), reassembles the forwarded fragments to check
//! their datagram's checksum, and checks that every expected drop wrote
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clustergate_builder::snapshot;
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{ip_from16, v4_to_16, Addr16, Proto};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{
    client_frame, frame, icmp_error, ipv4_raw, ipv6_fragment, udp_datagram, L4Spec, Tcp,
    CLIENT_MAC, GATEWAY_MAC,
};
use etherparse::{
    ip_number, IpHeaders, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
    PacketBuilder,
};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

const C4: Addr16 = v4_to_16([198, 18, 0, 1]);
const VIP4: Addr16 = v4_to_16([198, 19, 0, 10]);
const B1: Addr16 = v4_to_16([198, 18, 1, 1]);
const B2: Addr16 = v4_to_16([198, 18, 1, 2]);
const EMPTY4: Addr16 = v4_to_16([198, 19, 0, 12]);
const fn v6(tail: [u8; 4]) -> Addr16 {
    [
        0x20, 0x01, 0, 2, tail[0], tail[1], 0, 0, 0, 0, 0, 0, 0, 0, tail[2], tail[3],
    ]
}
/// 2001:2:0:1::1
const C6: Addr16 = v6([0, 1, 0, 1]);
/// 2001:2:0:10::10
const VIP6: Addr16 = v6([0, 0x10, 0, 0x10]);
/// 2001:2:0:20::1
const B6: Addr16 = v6([0, 0x20, 0, 1]);
/// 2001:2:0:10::12
const EMPTY6: Addr16 = v6([0, 0x10, 0, 0x12]);

const SCTP_PORT: u16 = 3868;

fn table() -> Table {
    let svc = |addr: Addr16, port, proto, backends: &[(Addr16, u16)]| {
        ServiceSpec::cluster_ip(
            ip_from16(addr),
            port,
            proto,
            backends
                .iter()
                .map(|(a, p)| BackendSpec::ready(ip_from16(*a), *p))
                .collect(),
        )
    };
    let services = [
        svc(VIP4, 80, Proto::Tcp, &[(B1, 8080)]),
        svc(VIP4, 443, Proto::Tcp, &[(B1, 8443), (B2, 8443)]),
        svc(VIP4, 53, Proto::Udp, &[(B1, 5353)]),
        svc(VIP4, SCTP_PORT, Proto::Sctp, &[(B1, 38680)]),
        svc(VIP6, 80, Proto::Tcp, &[(B6, 8080)]),
        svc(VIP6, 53, Proto::Udp, &[(B6, 5353)]),
        svc(VIP6, SCTP_PORT, Proto::Sctp, &[(B6, 38680)]),
        svc(EMPTY4, 80, Proto::Tcp, &[]),
        svc(EMPTY4, 53, Proto::Udp, &[]),
        svc(EMPTY4, SCTP_PORT, Proto::Sctp, &[]),
        svc(EMPTY6, 80, Proto::Tcp, &[]),
        svc(EMPTY6, 53, Proto::Udp, &[]),
        svc(EMPTY6, SCTP_PORT, Proto::Sctp, &[]),
    ];
    Table::build(3, 0, &services).unwrap()
}

// ---------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Forward,
    Reject,
    Pass,
    /// Dropped for exactly this reason (its label).
    Drop(&'static str),
    /// Dropped, any reason (truncations).
    AnyDrop,
    /// Any verdict (fuzzed frames); whatever leaves is still checked.
    Any,
}

struct Case {
    what: String,
    frame: Vec<u8>,
    expect: Expect,
}

#[derive(Default)]
struct Corpus {
    cases: Vec<Case>,
    /// Valid frames: truncated and fuzzed below.
    seeds: Vec<Vec<u8>>,
}

impl Corpus {
    fn add(&mut self, what: impl Into<String>, frame: Vec<u8>, expect: Expect) {
        self.cases.push(Case {
            what: what.into(),
            frame,
            expect,
        });
    }

    /// A valid frame with its verdict: also a seed for truncation and fuzzing.
    fn valid(&mut self, what: impl Into<String>, frame: Vec<u8>, expect: Expect) {
        self.seeds.push(frame.clone());
        self.add(what, frame, expect);
    }
}

struct Fam {
    name: &'static str,
    c: Addr16,
    vip: Addr16,
    b: Addr16,
    empty: Addr16,
    /// ICMP "port unreachable" and "too big" (type, code, rest).
    unreach: (u8, u8, [u8; 4]),
    too_big: (u8, u8, [u8; 4]),
}

const FAMS: [Fam; 2] = [
    Fam {
        name: "IPv4",
        c: C4,
        vip: VIP4,
        b: B1,
        empty: EMPTY4,
        unreach: (3, 3, [0; 4]),
        too_big: (3, 4, [0, 0, 0x05, 0xdc]),
    },
    Fam {
        name: "IPv6",
        c: C6,
        vip: VIP6,
        b: B6,
        empty: EMPTY6,
        unreach: (1, 4, [0; 4]),
        too_big: (2, 0, [0, 0, 0x05, 0x00]),
    },
];

fn tcp(f: Tcp) -> L4Spec {
    L4Spec::Tcp(f)
}

/// A frame from `src` to `dst` as a backend or the gateway sends it.
fn from_peer(src: Addr16, sport: u16, dst: Addr16, dport: u16, l4: L4Spec, p: &[u8]) -> Vec<u8> {
    frame(
        GATEWAY_MAC,
        CLIENT_MAC,
        None,
        src,
        sport,
        dst,
        dport,
        l4,
        64,
        p,
    )
}

fn ipv4_with_options(opts: &[u8]) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, ip_number::TCP, [198, 18, 0, 1], [198, 19, 0, 10]).unwrap();
    h.options = Ipv4Options::try_from(opts).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(40100, 80, 1000, 64240)
        .syn()
        .write(&mut out, b"opts")
        .unwrap();
    out
}

fn ipv6_with(exts: Ipv6Extensions, sport: u16) -> Vec<u8> {
    let h = Ipv6Header {
        hop_limit: 64,
        source: C6,
        destination: VIP6,
        ..Default::default()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv6(h, exts))
        .tcp(sport, 80, 1000, 64240)
        .syn()
        .write(&mut out, b"ext")
        .unwrap();
    out
}

fn routing(segments_left: u8) -> Ipv6Extensions {
    Ipv6Extensions {
        routing: Some(etherparse::Ipv6RoutingExtensions {
            routing: Ipv6RawExtHeader::new_raw(ip_number::TCP, &[4, segments_left, 0, 0, 0, 0])
                .unwrap(),
            final_destination_options: None,
        }),
        ..Default::default()
    }
}

/// The fragments of `dgram` (a transport segment) as `family` carries them,
/// cut at the given byte offsets (multiples of 8).
fn fragments(fam: &Fam, proto: u8, id: u16, dgram: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(dgram.len());
    bounds
        .windows(2)
        .map(|w| {
            let (off, more) = ((w[0] / 8) as u16, w[1] != dgram.len());
            if fam.c == C4 {
                ipv4_raw(fam.c, fam.vip, proto, id, (off, more), &dgram[w[0]..w[1]])
            } else {
                ipv6_fragment(
                    fam.c,
                    fam.vip,
                    proto,
                    id.into(),
                    (off, more),
                    &dgram[w[0]..w[1]],
                )
            }
        })
        .collect()
}

fn build() -> Corpus {
    use Expect::{Drop, Forward, Pass, Reject};
    let mut k = Corpus::default();
    for fam in &FAMS {
        let n = fam.name;
        let (c, vip, b, empty) = (fam.c, fam.vip, fam.b, fam.empty);
        // TCP, both directions.
        k.valid(
            format!("{n} TCP SYN"),
            client_frame(c, 40000, vip, 80, tcp(Tcp::syn(100)), b""),
            Forward,
        );
        let syn_ack = Tcp {
            syn: true,
            ack: Some(101),
            seq: 9,
            ..Tcp::default()
        };
        k.valid(
            format!("{n} TCP SYN-ACK from the backend"),
            from_peer(b, 8080, c, 40000, tcp(syn_ack), b""),
            Forward,
        );
        k.valid(
            format!("{n} TCP data"),
            client_frame(
                c,
                40000,
                vip,
                80,
                tcp(Tcp::ack(101, 10)),
                b"GET / HTTP/1.1\r\n\r\n",
            ),
            Forward,
        );
        k.valid(
            format!("{n} TCP data from the backend"),
            from_peer(
                b,
                8080,
                c,
                40000,
                tcp(Tcp::ack(10, 119)),
                b"HTTP/1.1 200 OK\r\n",
            ),
            Forward,
        );
        // UDP and SCTP, both directions.
        k.valid(
            format!("{n} UDP query"),
            client_frame(c, 40001, vip, 53, L4Spec::Udp, b"query"),
            Forward,
        );
        k.valid(
            format!("{n} UDP answer"),
            from_peer(b, 5353, c, 40001, L4Spec::Udp, b"answer"),
            Forward,
        );
        k.valid(
            format!("{n} SCTP"),
            client_frame(c, 40002, vip, SCTP_PORT, L4Spec::Sctp, b"beat"),
            Forward,
        );
        k.valid(
            format!("{n} SCTP from the backend"),
            from_peer(b, 38680, c, 40002, L4Spec::Sctp, b"ack"),
            Forward,
        );
        // ICMP errors, both directions: what the backend saw, and what the
        // client saw, quoted.
        let to_b_udp = client_frame(c, 40001, b, 5353, L4Spec::Udp, b"query");
        let to_b_sctp = client_frame(c, 40002, b, 38680, L4Spec::Sctp, b"beat");
        let from_vip = from_peer(vip, 53, c, 40001, L4Spec::Udp, b"answer");
        k.valid(
            format!("{n} ICMP error from the backend, whole quote"),
            icmp_error(b, c, fam.unreach, &to_b_udp, 1000),
            Forward,
        );
        k.valid(
            format!("{n} ICMP error from the backend, short quote"),
            icmp_error(b, c, fam.unreach, &to_b_udp, 48),
            Forward,
        );
        k.valid(
            format!("{n} ICMP error quoting SCTP whole"),
            icmp_error(b, c, fam.unreach, &to_b_sctp, 1000),
            Forward,
        );
        k.valid(
            format!("{n} ICMP error from the client"),
            icmp_error(c, vip, fam.too_big, &from_vip, 1000),
            Forward,
        );
        // Services without endpoints are answered.
        k.valid(
            format!("{n} TCP SYN, no endpoints"),
            client_frame(c, 40003, empty, 80, tcp(Tcp::syn(1)), b""),
            Reject,
        );
        k.valid(
            format!("{n} UDP, no endpoints"),
            client_frame(c, 40003, empty, 53, L4Spec::Udp, b"q"),
            Reject,
        );
        k.valid(
            format!("{n} SCTP, no endpoints"),
            client_frame(c, 40003, empty, SCTP_PORT, L4Spec::Sctp, b"q"),
            Reject,
        );
        k.valid(
            format!("{n} TCP over 802.1Q"),
            frame(
                CLIENT_MAC,
                GATEWAY_MAC,
                Some(100),
                c,
                40004,
                vip,
                80,
                tcp(Tcp::syn(7)),
                64,
                b"vlan",
            ),
            Forward,
        );
        // Bytes beyond the IP packet are trimmed (checked: no trailing bytes).
        let mut trailing = client_frame(c, 40005, vip, 53, L4Spec::Udp, b"q");
        trailing.extend_from_slice(&[0xa5; 20]);
        k.add(format!("{n} UDP with trailing bytes"), trailing, Forward);
        let mut padded = client_frame(c, 40006, vip, 53, L4Spec::Udp, b"");
        if padded.len() < 60 {
            padded.resize(60, 0);
            k.add(format!("{n} UDP with Ethernet padding"), padded, Forward);
        }
        // Fragments, in order and out of order; the checker reassembles them.
        let dgram = udp_datagram(c, vip, 40007, 53, 200);
        for (i, f) in fragments(fam, 17, 0x100, &dgram, &[64, 128])
            .into_iter()
            .enumerate()
        {
            k.valid(format!("{n} UDP fragment {i}"), f, Forward);
        }
        let dgram = udp_datagram(c, vip, 40008, 53, 120);
        let mut fr = fragments(fam, 17, 0x101, &dgram, &[32, 64]);
        fr.swap(1, 2);
        for (i, f) in fr.into_iter().enumerate() {
            k.add(format!("{n} UDP fragment, out of order {i}"), f, Forward);
        }

        // Hostile classes.
        let mut bad_crc = client_frame(c, 40010, vip, SCTP_PORT, L4Spec::Sctp, b"heartbeat");
        *bad_crc.last_mut().unwrap() ^= 1;
        k.add(
            format!("{n} SCTP with a wrong CRC32c"),
            bad_crc,
            Drop("sctp_bad_checksum"),
        );
        for mac in [
            [0xff; 6],
            [0x01, 0x00, 0x5e, 0, 0, 1],
            [0x33, 0x33, 0, 0, 0, 1],
        ] {
            let mut f = client_frame(c, 40011, vip, 80, tcp(Tcp::syn(1)), b"");
            f[..6].copy_from_slice(&mac);
            k.add(
                format!("{n} to link-layer group {mac:02x?}"),
                f,
                Drop("link_broadcast"),
            );
        }
        let ttl1 = frame(
            CLIENT_MAC,
            GATEWAY_MAC,
            None,
            c,
            40012,
            vip,
            80,
            tcp(Tcp::syn(1)),
            1,
            b"",
        );
        k.add(format!("{n} TTL 1"), ttl1, Drop("ttl_expired"));
        for spoof in [vip, empty] {
            for dst in [vip, empty] {
                let f = client_frame(spoof, 40013, dst, 80, tcp(Tcp::syn(1)), b"");
                k.add(
                    format!("{n} from a frontend's address"),
                    f,
                    Drop("frontend_source"),
                );
            }
        }
        k.add(
            format!("{n} ICMP error to a frontend"),
            icmp_error(b, vip, fam.unreach, &to_b_udp, 1000),
            Drop("error_to_frontend"),
        );
        // Overlaps, repeats, past the end (one datagram each).
        let dgram = udp_datagram(c, vip, 40014, 53, 200);
        let fr = fragments(fam, 17, 0x200, &dgram, &[64, 128]);
        k.add(format!("{n} overlap: first"), fr[0].clone(), Forward);
        k.add(
            format!("{n} overlap: first again"),
            fr[0].clone(),
            Drop("fragment_overlap"),
        );
        k.add(
            format!("{n} overlap: the rest of a poisoned datagram"),
            fr[1].clone(),
            Drop("fragment_overlap"),
        );
        let fr = fragments(fam, 17, 0x201, &dgram, &[64, 128]);
        let inside = fragments(fam, 17, 0x201, &dgram, &[32, 96]);
        k.add(format!("{n} overlap 2: first"), fr[0].clone(), Forward);
        k.add(
            format!("{n} overlap 2: into the first"),
            inside[1].clone(),
            Drop("fragment_overlap"),
        );
        let fr = fragments(fam, 17, 0x202, &dgram, &[64, 128]);
        k.add(format!("{n} past the end: first"), fr[0].clone(), Forward);
        k.add(format!("{n} past the end: last"), fr[2].clone(), Forward);
        let beyond = fragments(
            fam,
            17,
            0x202,
            &udp_datagram(c, vip, 40014, 53, 264),
            &[64, 256],
        );
        k.add(
            format!("{n} past the end: beyond the last"),
            beyond[2].clone(),
            Drop("fragment_overlap"),
        );
        // Oversize, tiny TCP.
        let (big_off, tiny) = if c == C4 {
            (
                ipv4_raw(c, vip, 17, 0x300, (8189, false), &[0; 48]),
                ipv4_raw(c, vip, 6, 0x301, (1, false), &[0; 16]),
            )
        } else {
            (
                ipv6_fragment(c, vip, 17, 0x300, (8190, false), &[0; 48]),
                ipv6_fragment(c, vip, 6, 0x301, (1, false), &[0; 16]),
            )
        };
        k.add(
            format!("{n} fragment past 65 535 bytes"),
            big_off,
            Drop("fragment_oversize"),
        );
        k.add(
            format!("{n} TCP fragment at offset 1"),
            tiny,
            Drop("fragment_tiny_tcp"),
        );
        // A non-first fragment whose data starts like the UDP flow's header,
        // quoted in an error: not matched.
        let mut data = vec![0x9c, 0x41, 0x14, 0xe9, 0, 16, 0, 0];
        data.extend_from_slice(&[0; 8]);
        let nonfirst = if c == C4 {
            ipv4_raw(c, b, 17, 0x400, (1, false), &data)
        } else {
            ipv6_fragment(c, b, 17, 0x400, (1, false), &data)
        };
        k.add(
            format!("{n} ICMP error quoting a non-first fragment"),
            icmp_error(b, c, fam.unreach, &nonfirst, 1000),
            Pass,
        );
    }
    // Martian sources.
    let martians = [
        v4_to_16([0, 0, 0, 0]),
        v4_to_16([0, 1, 2, 3]),
        v4_to_16([127, 0, 0, 1]),
        v4_to_16([224, 0, 0, 1]),
        v4_to_16([255, 255, 255, 255]),
        [0; 16],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ];
    for m in martians {
        let vip = if ip_from16(m).is_ipv4() { VIP4 } else { VIP6 };
        k.add(
            format!("martian {}", ip_from16(m)),
            client_frame(m, 40020, vip, 53, L4Spec::Udp, b"q"),
            Expect::Drop("martian_source"),
        );
    }
    // Source routes, and the options and headers that are fine.
    k.add(
        "IPv4 LSRR",
        ipv4_with_options(&[131, 7, 4, 198, 18, 1, 1, 0]),
        Expect::Drop("source_route"),
    );
    k.add(
        "IPv4 SSRR",
        ipv4_with_options(&[1, 137, 7, 4, 198, 18, 1, 1]),
        Expect::Drop("source_route"),
    );
    k.add(
        "IPv4 option overrunning the header",
        ipv4_with_options(&[7, 11, 4, 0, 0, 0, 0, 0]),
        Expect::Drop("ipv4_malformed"),
    );
    k.add(
        "IPv6 routing header, 1 segment left",
        ipv6_with(routing(1), 40101),
        Expect::Drop("source_route"),
    );
    k.valid(
        "IPv4 record route",
        ipv4_with_options(&[7, 7, 4, 0, 0, 0, 0, 0]),
        Expect::Forward,
    );
    k.valid(
        "IPv6 routing header, no segment left",
        ipv6_with(routing(0), 40102),
        Expect::Forward,
    );
    let hbh = Ipv6Extensions {
        hop_by_hop_options: Some(
            Ipv6RawExtHeader::new_raw(ip_number::TCP, &[1, 4, 0, 0, 0, 0]).unwrap(),
        ),
        ..Default::default()
    };
    k.valid("IPv6 hop-by-hop", ipv6_with(hbh, 40103), Expect::Forward);
    // IPv6 non-first fragment after Destination Options in the
    // fragmentable part: its data is not headers.
    let dgram = udp_datagram(C6, VIP6, 40104, 53, 200);
    let mut first = vec![17, 0, 1, 4, 0, 0, 0, 0];
    first.extend_from_slice(&dgram[..48]);
    k.valid(
        "IPv6 first fragment with Destination Options",
        ipv6_fragment(C6, VIP6, 60, 0x500, (0, true), &first),
        Expect::Forward,
    );
    k.add(
        "IPv6 last fragment after Destination Options",
        ipv6_fragment(C6, VIP6, 60, 0x500, (7, false), &dgram[48..]),
        Expect::Forward,
    );
    // Other malformed traffic.
    let mut mapped = client_frame(C6, 40105, VIP6, 80, tcp(Tcp::syn(1)), b"");
    mapped[14 + 8..14 + 24]
        .copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]);
    k.add(
        "IPv6 from an IPv4-mapped address",
        mapped,
        Expect::Drop("ipv6_mapped_address"),
    );
    let mut zero = client_frame(C6, 40106, VIP6, 53, L4Spec::Udp, b"q");
    zero[14 + 40 + 6..14 + 40 + 8].fill(0);
    k.add(
        "UDP/IPv6 with checksum 0",
        zero,
        Expect::Drop("udp6_zero_checksum"),
    );
    let mut v6_in_v4 = icmp_error(
        B1,
        C4,
        (3, 3, [0; 4]),
        &client_frame(C4, 40001, B1, 5353, L4Spec::Udp, b"q"),
        1000,
    );
    v6_in_v4[14 + 9] = 58;
    fix_checksums(&mut v6_in_v4);
    k.add(
        "ICMPv6 inside IPv4",
        v6_in_v4,
        Expect::Drop("icmp_family_mismatch"),
    );

    // Every truncation of every valid frame.
    let seeds = k.seeds.clone();
    for s in &seeds {
        for len in 0..s.len() {
            k.add(
                format!("truncated to {len} of {} bytes", s.len()),
                s[..len].to_vec(),
                Expect::AnyDrop,
            );
        }
    }
    // Fuzzed header fields, checksums made valid again.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..3000 {
        let mut f = seeds[rng.below(seeds.len())].clone();
        for _ in 0..=rng.below(3) {
            fuzz_field(&mut f, &mut rng);
        }
        if rng.below(10) != 0 {
            fix_checksums(&mut f);
        }
        k.add(format!("fuzzed #{i}"), f, Expect::Any);
    }
    k
}

// ---------------------------------------------------------------------------
// Fuzzing
// ---------------------------------------------------------------------------

/// splitmix64: deterministic, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

const ADDRS4: [[u8; 4]; 9] = [
    [198, 18, 0, 1],
    [198, 19, 0, 10],
    [198, 19, 0, 12],
    [198, 18, 1, 1],
    [198, 18, 1, 2],
    [0, 0, 0, 0],
    [127, 0, 0, 1],
    [224, 0, 0, 5],
    [255, 255, 255, 255],
];
const PORTS: [u16; 10] = [80, 443, 53, 3868, 8080, 5353, 38680, 40000, 0, 65535];

/// Sets one header field (IP or transport) to a random or telling value.
fn fuzz_field(f: &mut [u8], rng: &mut Rng) {
    let Some(ip) = walk(f) else { return };
    let l3 = ip.l3;
    let l4 = ip.l4;
    let mut set = |at: usize, bytes: &[u8]| {
        if let Some(d) = f.get_mut(at..at + bytes.len()) {
            d.copy_from_slice(bytes);
        }
    };
    let r = rng.next().to_be_bytes();
    let port = rng.pick(&PORTS).to_be_bytes();
    match (ip.v6, rng.below(12)) {
        (false, 0) => set(l3 + 1, &r[..1]),
        (false, 1) => set(l3 + 4, &r[..2]),
        (false, 2) => set(l3 + 6, &[r[0] & 0xe0 | (r[1] & 3), r[2] & 0x07]),
        (false, 3) => set(l3 + 8, &[rng.pick(&[0, 1, 2, 64, 255])]),
        (false, 4) => set(l3 + 9, &[rng.pick(&[1, 6, 17, 132, 58, 4, 41, 0, 51])]),
        (false, 5) => set(l3 + 12, &rng.pick(&ADDRS4)),
        (false, 6) => set(l3 + 16, &rng.pick(&ADDRS4)),
        (false, 7) => set(l3 + 2, &r[..2]),
        (true, 0) => set(l3, &[0x60 | (r[0] & 0x0f), r[1], r[2], r[3]]),
        (true, 1) => set(l3 + 4, &r[..2]),
        (true, 2) => set(
            l3 + 6,
            &[rng.pick(&[0, 6, 17, 132, 58, 43, 44, 60, 59, 51])],
        ),
        (true, 3) => set(l3 + 7, &[rng.pick(&[0, 1, 2, 64, 255])]),
        (true, 4) => set(
            l3 + 8,
            &rng.pick(&[C6, VIP6, EMPTY6, B6, [0; 16], [0xff; 16]]),
        ),
        (true, 5) => set(l3 + 24, &rng.pick(&[C6, VIP6, EMPTY6, B6, [0; 16]])),
        (true, 6 | 7) => set(l3 + 40 + rng.below(16), &r[..1]),
        (_, 8) => set(l4, &port),
        (_, 9) => set(l4 + 2, &port),
        (_, 10) => set(l4 + rng.below(16), &r[..1]),
        _ => set(l4 + 4, &r[..4]),
    }
}

// ---------------------------------------------------------------------------
// The independent checker
// ---------------------------------------------------------------------------

fn sum16(mut acc: u64, b: &[u8]) -> u64 {
    for c in b.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// CRC32c (Castagnoli, reflected 0x82F63B78), bit by bit, over `b` with the
/// SCTP checksum field (bytes 8..12) taken as zero (RFC 9260 Appendix B).
fn crc32c_sctp(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for (i, &byte) in b.iter().enumerate() {
        let byte = if (8..12).contains(&i) { 0 } else { byte };
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Where an IP packet's parts are, read by this test's own walk.
#[derive(Debug, Clone, Copy)]
struct IpView {
    v6: bool,
    l3: usize,
    /// The upper-layer header (after IPv6 extension headers).
    l4: usize,
    /// End of the IP packet by its length field.
    end: usize,
    proto: u8,
    /// A fragment: (identification, offset in bytes, more, key protocol,
    /// start of its fragment data).
    frag: Option<(u32, usize, bool, u8, usize)>,
}

/// Walks Ethernet (one optional 802.1Q tag) and the IP header(s).
fn walk(f: &[u8]) -> Option<IpView> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    walk_ip(f, l3, et)
}

fn walk_ip(f: &[u8], l3: usize, et: u16) -> Option<IpView> {
    match et {
        0x0800 => {
            let ihl = usize::from(f.get(l3)? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*f.get(l3 + 2)?, *f.get(l3 + 3)?]));
            let fo = u16::from_be_bytes([*f.get(l3 + 6)?, *f.get(l3 + 7)?]);
            let (off, more) = (usize::from(fo & 0x1fff) * 8, fo & 0x2000 != 0);
            let proto = *f.get(l3 + 9)?;
            let id = u32::from(u16::from_be_bytes([*f.get(l3 + 4)?, *f.get(l3 + 5)?]));
            Some(IpView {
                v6: false,
                l3,
                l4: l3 + ihl,
                end: l3 + total,
                proto,
                frag: (off != 0 || more).then_some((id, off, more, proto, l3 + ihl)),
            })
        }
        0x86dd => {
            let pl = usize::from(u16::from_be_bytes([*f.get(l3 + 4)?, *f.get(l3 + 5)?]));
            let end = l3 + 40 + pl;
            let mut next = *f.get(l3 + 6)?;
            let mut at = l3 + 40;
            let mut frag = None;
            loop {
                match next {
                    0 | 43 | 60 => {
                        let len = (usize::from(*f.get(at + 1)?) + 1) * 8;
                        next = *f.get(at)?;
                        at += len;
                    }
                    44 => {
                        let fo = u16::from_be_bytes([*f.get(at + 2)?, *f.get(at + 3)?]);
                        let id = u32::from_be_bytes(f.get(at + 4..at + 8)?.try_into().ok()?);
                        let (off, more) = (usize::from(fo & 0xfff8), fo & 1 != 0);
                        next = *f.get(at)?;
                        at += 8;
                        if off != 0 || more {
                            frag = Some((id, off, more, next, at));
                            if off != 0 {
                                break;
                            }
                        }
                    }
                    _ => break,
                }
            }
            Some(IpView {
                v6: true,
                l3,
                l4: at,
                end,
                proto: next,
                frag,
            })
        }
        _ => None,
    }
}

fn addrs(f: &[u8], ip: &IpView) -> (Vec<u8>, Vec<u8>) {
    if ip.v6 {
        (
            f[ip.l3 + 8..ip.l3 + 24].to_vec(),
            f[ip.l3 + 24..ip.l3 + 40].to_vec(),
        )
    } else {
        (
            f[ip.l3 + 12..ip.l3 + 16].to_vec(),
            f[ip.l3 + 16..ip.l3 + 20].to_vec(),
        )
    }
}

/// The transport checksum's pseudo-header sum (none for ICMPv4).
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    if proto == 1 {
        return 0;
    }
    sum16(sum16(0, src), dst) + len as u64 + u64::from(proto)
}

/// Offset of the checksum field of `proto` in its header.
fn csum_at(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(16),
        17 => Some(6),
        1 | 58 => Some(2),
        _ => None,
    }
}

/// Checks the transport segment `seg` of `proto` (whole).
/// With `sums` false (an input that was itself wrong), lengths only.
fn check_l4(
    sums: bool,
    v6: bool,
    src: &[u8],
    dst: &[u8],
    proto: u8,
    seg: &[u8],
) -> Result<(), String> {
    match proto {
        132 => {
            if seg.len() < 12 {
                return Err("SCTP shorter than its common header".into());
            }
            let stored = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            if sums && stored != crc32c_sctp(seg) {
                return Err("SCTP CRC32c wrong".into());
            }
            Ok(())
        }
        6 | 17 | 1 | 58 => {
            let min = match proto {
                6 => 20,
                _ => 8,
            };
            if seg.len() < min {
                return Err(format!(
                    "protocol {proto}: {} bytes, shorter than its header",
                    seg.len()
                ));
            }
            if proto == 6 && usize::from(seg[12] >> 4) * 4 > seg.len() {
                return Err("TCP data offset past the segment".into());
            }
            if proto == 17 {
                if usize::from(u16::from_be_bytes([seg[4], seg[5]])) != seg.len() {
                    return Err("UDP length differs from the IP payload".into());
                }
                if !v6 && seg[6..8] == [0, 0] {
                    return Ok(()); // no checksum (RFC 768)
                }
            }
            if sums && fold(sum16(pseudo(src, dst, proto, seg.len()), seg)) != 0xffff {
                return Err(format!("protocol {proto} checksum wrong"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks one output frame; fragments are kept for reassembly. With `sums`
/// false (its input was itself wrong), lengths and structure only: the
/// gateway keeps a wrong checksum wrong, never recomputes one.
fn check_frame(f: &[u8], frags: &mut Frags, sums: bool) -> Result<(), String> {
    let ip = walk(f).ok_or("not an IP frame")?;
    if ip.end != f.len() {
        return Err(format!(
            "IP packet ends at {}, the frame at {}",
            ip.end,
            f.len()
        ));
    }
    check_ip(f, &ip, frags, sums)
}

fn check_ip(f: &[u8], ip: &IpView, frags: &mut Frags, sums: bool) -> Result<(), String> {
    let ttl = if ip.v6 { f[ip.l3 + 7] } else { f[ip.l3 + 8] };
    if ttl == 0 {
        return Err("TTL 0 sent".into());
    }
    if !ip.v6 {
        if f[ip.l3] >> 4 != 4 || ip.l4 - ip.l3 < 20 || ip.l4 > ip.end {
            return Err("IPv4 header length".into());
        }
        if sums && fold(sum16(0, &f[ip.l3..ip.l4])) != 0xffff {
            return Err("IPv4 header checksum wrong".into());
        }
    } else if f[ip.l3] >> 4 != 6 || ip.l4 > ip.end {
        return Err("IPv6 header or extension headers past the packet".into());
    }
    let (src, dst) = addrs(f, ip);
    if let Some((id, off, more, key, data)) = ip.frag.filter(|_| sums) {
        frags.entry((src, dst, id, key, ip.v6)).or_default().push((
            off,
            more,
            f[data..ip.end].to_vec(),
        ));
        return Ok(());
    }
    if ip.frag.is_some() {
        return Ok(());
    }
    let seg = &f[ip.l4..ip.end];
    match ip.proto {
        4 | 41 => {
            // IP in IP (DSR): the inner packet fills the outer payload.
            let inner = walk_ip(f, ip.l4, if ip.proto == 4 { 0x0800 } else { 0x86dd })
                .ok_or("inner header")?;
            if inner.end != ip.end {
                return Err("inner packet length differs from the outer payload".into());
            }
            check_ip(f, &inner, frags, sums)
        }
        1 | 58 => {
            check_l4(sums, ip.v6, &src, &dst, ip.proto, seg)?;
            let error = if ip.v6 {
                (1..=4).contains(&seg[0])
            } else {
                matches!(seg[0], 3 | 11 | 12)
            };
            if error {
                check_quote(&seg[8..], sums)?;
            }
            Ok(())
        }
        p => check_l4(sums, ip.v6, &src, &dst, p, seg),
    }
}

/// An ICMP error's quote: the quoted IPv4 header's checksum, and the quoted
/// packet's transport checksum when it is quoted whole (and not a fragment).
fn check_quote(q: &[u8], sums: bool) -> Result<(), String> {
    let et = match q.first().map(|b| b >> 4) {
        Some(4) => 0x0800,
        Some(6) => 0x86dd,
        _ => return Err("quote is not IP".into()),
    };
    let ip = walk_ip(q, 0, et).ok_or("quote header cut")?;
    if sums && !ip.v6 && ip.l4 <= q.len() && fold(sum16(0, &q[..ip.l4])) != 0xffff {
        return Err("quoted IPv4 header checksum wrong".into());
    }
    if ip.end == q.len() && ip.frag.is_none() && ip.l4 <= q.len() {
        let (src, dst) = addrs(q, &ip);
        check_l4(sums, ip.v6, &src, &dst, ip.proto, &q[ip.l4..])
            .map_err(|e| format!("quoted packet: {e}"))?;
    }
    Ok(())
}

type Frags = HashMap<(Vec<u8>, Vec<u8>, u32, u8, bool), Vec<(usize, bool, Vec<u8>)>>;

/// Reassembles every complete datagram of forwarded fragments and checks
/// its transport checksum; returns how many were checked.
fn check_reassembled(frags: &Frags) -> Result<usize, String> {
    let mut done = 0;
    for ((src, dst, id, key, v6), parts) in frags {
        let mut parts = parts.clone();
        parts.sort_by_key(|p| p.0);
        let mut data = Vec::new();
        let mut hole = false;
        for (off, _, d) in &parts {
            if *off < data.len() {
                return Err(format!("datagram {id:#x}: fragments overlap at {off}"));
            }
            hole |= *off > data.len();
            data.resize(*off, 0);
            data.extend_from_slice(d);
        }
        if hole || parts.last().is_none_or(|p| p.1) {
            continue; // incomplete: the rest was (rightly) dropped or never sent
        }
        let (mut next, mut at) = (*key, 0);
        while matches!(next, 0 | 43 | 60) {
            next = data[at];
            at += (usize::from(data[at + 1]) + 1) * 8;
        }
        check_l4(true, *v6, src, dst, next, &data[at..])
            .map_err(|e| format!("datagram {id:#x}: {e}"))?;
        done += 1;
    }
    Ok(done)
}

/// Makes the frame's checksums valid for its fields as they are (what a
/// careful attacker sends), where the lengths allow.
fn fix_checksums(f: &mut [u8]) {
    let Some(ip) = walk(f) else { return };
    if !ip.v6 && ip.l4 <= f.len() && ip.l4 >= ip.l3 + 20 {
        f[ip.l3 + 10..ip.l3 + 12].fill(0);
        let c = !fold(sum16(0, &f[ip.l3..ip.l4]));
        f[ip.l3 + 10..ip.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if ip.frag.is_some() || ip.end > f.len() || ip.l4 > ip.end {
        return;
    }
    let (src, dst) = addrs(f, &ip);
    let seg = &mut f[ip.l4..ip.end];
    if ip.proto == 132 && seg.len() >= 12 {
        let crc = crc32c_sctp(seg);
        seg[8..12].copy_from_slice(&crc.to_le_bytes());
    } else if let Some(at) = csum_at(ip.proto).filter(|a| a + 2 <= seg.len()) {
        seg[at..at + 2].fill(0);
        let c = !fold(sum16(pseudo(&src, &dst, ip.proto, seg.len()), seg));
        let c = if ip.proto == 17 && c == 0 { 0xffff } else { c };
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ts(i: usize) -> Duration {
    Duration::from_secs(1_700_000_000) + Duration::from_millis(i as u64)
}

#[test]
fn the_hostile_corpus_through_replay() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("clustergate-hostile-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, snapshot::encode(&table())).unwrap();
    let corpus = build();
    let input = dir.0.join("in.pcap");
    {
        let mut w = PcapWriter::new(File::create(&input).unwrap()).unwrap();
        for (i, c) in corpus.cases.iter().enumerate() {
            w.write_packet(&PcapPacket::new(ts(i), c.frame.len() as u32, &c.frame))
                .unwrap();
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_clustergate"))
        .args(["replay", "--snapshot"])
        .arg(&snap)
        .arg("--pcap")
        .arg(&input)
        .arg("--out")
        .arg(dir.0.join("out.pcap"))
        .arg("--verdicts")
        .arg(dir.0.join("verdicts.txt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed (a panic?): {stderr}");
    let verdicts: Vec<String> = std::fs::read_to_string(dir.0.join("verdicts.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(verdicts.len(), corpus.cases.len(), "one verdict per frame");
    let mut written = read_pcap(&dir.0.join("out.pcap")).into_iter();

    let mut failures = Vec::new();
    let mut frags = Frags::new();
    let (mut checked, mut by_kind) = (0usize, HashMap::<&str, usize>::new());
    for (i, (case, line)) in corpus.cases.iter().zip(&verdicts).enumerate() {
        let mut words = line.split_whitespace().skip(1);
        let kind = words.next().unwrap_or("");
        *by_kind
            .entry(if kind == "drop" { "drop" } else { kind })
            .or_default() += 1;
        let ok = match case.expect {
            Expect::Forward => kind == "forward",
            Expect::Reject => kind == "reject",
            Expect::Pass => kind == "pass",
            Expect::Drop(reason) => line.ends_with(&format!("drop reason={reason}")),
            Expect::AnyDrop => kind == "drop",
            Expect::Any => true,
        };
        if !ok {
            failures.push(format!(
                "#{} {}: expected {:?}, got `{line}`",
                i + 1,
                case.what,
                case.expect
            ));
        }
        if matches!(kind, "forward" | "reject") {
            let Some((t, f)) = written.next() else {
                failures.push(format!("#{} {}: no frame written", i + 1, case.what));
                break;
            };
            assert_eq!(t, ts(i), "output frames follow the verdicts");
            checked += 1;
            // A fuzzed frame's output checksums must be right when its
            // input's were (fragments: checked once reassembled).
            let sums = case.expect != Expect::Any
                || check_frame(&case.frame, &mut Frags::new(), true).is_ok();
            if let Err(e) = check_frame(&f, &mut frags, sums) {
                failures.push(format!(
                    "#{} {} ({line}): {e}:\n  in  {:02x?}\n  out {f:02x?}",
                    i + 1,
                    case.what,
                    case.frame
                ));
            }
        }
    }
    assert!(
        written.next().is_none(),
        "more frames written than forwards and rejects"
    );
    match check_reassembled(&frags) {
        Ok(n) => assert!(n >= 5, "only {n} datagrams reassembled"),
        Err(e) => failures.push(e),
    }
    assert!(
        failures.is_empty(),
        "{} of {} frames failed:\n{}",
        failures.len(),
        corpus.cases.len(),
        failures[..failures.len().min(30)].join("\n")
    );
    // Not vacuous: a broad corpus, and much of it went through.
    assert!(corpus.cases.len() > 6000, "{} frames", corpus.cases.len());
    assert!(checked > 300, "only {checked} frames written");
    eprintln!(
        "hostile corpus: {} frames, {checked} written and checked, {by_kind:?}",
        corpus.cases.len()
    );
}

fn read_pcap(path: &Path) -> Vec<(Duration, Vec<u8>)> {
    let mut r = PcapReader::new(File::open(path).unwrap()).unwrap();
    let mut got = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        got.push((p.timestamp, p.data.to_vec()));
    }
    got
}
