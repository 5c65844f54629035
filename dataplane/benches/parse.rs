//! Frame parsing: `packet::parse::parse` on typical frames, in ns per frame.
//!
//! Run with `cargo bench -p clustergate-dataplane --bench parse`.
//!
//! Each bench parses 64 distinct frames of one kind (one RX batch: ports and
//! addresses differ, so nothing is learnt from a single frame) in a loop;
//! the time criterion reports is **per frame** (the batch time ÷ 64), and
//! `thrpt` is millions of frames per second on one core.
//!
//! - `parse/ipv4_tcp`: untagged IPv4 (no options) + TCP ACK, 64-byte frames.
//! - `parse/ipv6_udp`: untagged IPv6 + UDP, 82-byte frames.
//! - `parse/vlan_ipv4_tcp`: one 802.1Q tag + IPv4 + TCP.
//! - `parse/ipv4_options_tcp`: IPv4 with 8 bytes of options (IHL 7) + TCP.
//! - `parse/ipv6_first_fragment`: IPv6 + Fragment header + UDP (the full,
//!   extension-header-walking path).
//! - `parse/icmp_error`: an ICMP "fragmentation needed" quoting a TCP packet
//!   (the full path).
//!
//! At the end one line per bench is printed: `parse <bench>: X ns/frame`
//! (median of criterion's samples).
//!
//! Figures (2-core VM shared with other builds, medians of 6 alternating
//! runs of the old and new binaries, ns/frame): IPv4 TCP 39.0 → 13.5, IPv6
//! UDP 42.2 → 13.3, VLAN IPv4 TCP 38.6 → 14.4, IPv4 options 35.9 → 18.6
//! (fixed-offset views); IPv6 first fragment 40.0 → 31.6, ICMP error 66.2 →
//! 46.5 (etherparse path, smaller `Parsed`). callgrind, IPv4 TCP, bench loop
//! included: 269 → 135 instructions per frame.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clustergate_dataplane::flow::{v4_to_16, Addr16};
use clustergate_dataplane::packet::parse::parse;
use clustergate_dataplane::testkit::{
    client_frame, frame, icmp_error, ipv6_fragment, udp_datagram, L4Spec, Tcp, CLIENT_MAC,
    GATEWAY_MAC,
};
use criterion::{Criterion, Throughput};

/// Frames per bench (one RX batch).
const BATCH: usize = 64;
/// 14 (Ethernet) + 20 (IPv4) + 20 (TCP) + 10 = a 64-byte frame.
const PAYLOAD: &[u8; 10] = b"0123456789";

/// 2001:2::`tail` (benchmarking range, RFC 5180).
fn v6(tail: u16) -> Addr16 {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x02]);
    a[14..].copy_from_slice(&tail.to_be_bytes());
    a
}

fn client4(i: usize) -> Addr16 {
    v4_to_16([198, 18, 128, i as u8])
}

const VIP4: Addr16 = v4_to_16([198, 19, 0, 10]);

fn ack() -> L4Spec {
    L4Spec::Tcp(Tcp::ack(1000, 2000))
}

/// IPv4 + TCP with `opts` as IPv4 options (a multiple of 4 bytes).
fn ipv4_with_options(i: usize, opts: &[u8]) -> Vec<u8> {
    let mut f = client_frame(client4(i), 1024 + i as u16, VIP4, 80, ack(), PAYLOAD);
    let ihl = 5 + opts.len() / 4;
    f[14] = 0x40 | ihl as u8;
    let total = u16::from_be_bytes([f[16], f[17]]) + opts.len() as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.splice(34..34, opts.iter().copied());
    f
}

fn cases() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let batch = |f: &dyn Fn(usize) -> Vec<u8>| (0..BATCH).map(f).collect::<Vec<_>>();
    vec![
        (
            "ipv4_tcp",
            batch(&|i| client_frame(client4(i), 1024 + i as u16, VIP4, 80, ack(), PAYLOAD)),
        ),
        (
            "ipv6_udp",
            batch(&|i| {
                client_frame(
                    v6(0x100 + i as u16),
                    1024 + i as u16,
                    v6(0x10),
                    53,
                    L4Spec::Udp,
                    &[0x5a; 20],
                )
            }),
        ),
        (
            "vlan_ipv4_tcp",
            batch(&|i| {
                frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    Some(100),
                    client4(i),
                    1024 + i as u16,
                    VIP4,
                    80,
                    ack(),
                    64,
                    PAYLOAD,
                )
            }),
        ),
        (
            "ipv4_options_tcp",
            // NOP, NOP, NOP, end of list; then a timestamp-less padding word.
            batch(&|i| ipv4_with_options(i, &[1, 1, 1, 1, 1, 1, 1, 0])),
        ),
        (
            "ipv6_first_fragment",
            batch(&|i| {
                let d = udp_datagram(v6(0x100), v6(0x10), 1024 + i as u16, 53, 200);
                ipv6_fragment(v6(0x100), v6(0x10), 17, i as u32, (0, true), &d[..64])
            }),
        ),
        (
            "icmp_error",
            batch(&|i| {
                let q = client_frame(VIP4, 80, client4(i), 1024 + i as u16, ack(), PAYLOAD);
                icmp_error(
                    v4_to_16([198, 18, 200, 1]),
                    VIP4,
                    (3, 4, [0, 0, 0x05, 0xdc]),
                    &q,
                    28,
                )
            }),
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut summary = Vec::new();
    {
        let mut group = c.benchmark_group("parse");
        group
            .sample_size(30)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Elements(1));
        for (name, frames) in cases() {
            for f in &frames {
                assert!(
                    matches!(parse(f), Ok(Some(_))),
                    "{name}: every bench frame parses"
                );
            }
            let mut samples = Vec::new();
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        for f in &frames {
                            let _ = black_box(parse(black_box(f)));
                        }
                    }
                    let per_frame = t.elapsed() / BATCH as u32;
                    samples.push(per_frame.as_secs_f64() * 1e9 / iters as f64);
                    per_frame
                });
            });
            summary.push((name, median(samples)));
        }
        group.finish();
    }
    c.final_summary();
    // Under `cargo test --benches` (no `--bench` argument) each bench runs
    // once, unoptimised: no figure to print.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for (name, ns) in summary {
        println!("parse {name}: {ns:.1} ns/frame");
    }
}
