//! End to end: a flood of new flows from spoofed sources against `clustergate
//! run`, while real TCP connections through it carry data.
//!
//! The namespaces of tests/e2e/topology.sh (two-armed, the `routed` return
//! path), a gateway with a small connection table (`--flows 1024`), 40 held
//! connections to the streaming echo that make a round trip each every
//! 0.1 s, and a long byte-checked stream. Then tests/e2e/flood.py sends, on
//! the client's link, ten times the table's capacity in new flows: SYN,
//! mid-stream ACK, UDP, and UDP datagrams in two fragments, from sources in
//! 198.19.128.0/17 (inside 198.18.0.0/15), paced and bounded. Every round
//! trip and every byte of the stream must come back, during the flood and
//! after it; the evictions must have been counted by class; the table never
//! holds more than its capacity, and the gateway's memory stays flat.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use clustergate_dataplane::flow::{addr16, Addr16};
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use e2e::*;
use serde_json::Value;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

fn a(s: &str) -> Addr16 {
    addr16(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
}

/// The `n`-th flood flow's frames, to `vip`: SYN to :80, mid-stream ACK to
/// :80, UDP to :9001, a UDP datagram to :9001 in two fragments, in turn.
fn flood_frames(n: u32, vip: Addr16) -> Vec<Vec<u8>> {
    let src = a(&format!("198.19.{}.{}", 128 + (n >> 8) % 128, n & 0xff));
    let sport = 1024 + (n % 60_000) as u16;
    match n % 4 {
        0 => vec![testkit::client_frame(
            src,
            sport,
            vip,
            80,
            L4Spec::Tcp(Tcp::syn(n)),
            b"",
        )],
        1 => vec![testkit::client_frame(
            src,
            sport,
            vip,
            80,
            L4Spec::Tcp(Tcp::ack(n, 7)),
            b"x",
        )],
        2 => vec![testkit::client_frame(
            src,
            sport,
            vip,
            9001,
            L4Spec::Udp,
            b"flood",
        )],
        _ => {
            let dgram = testkit::udp_datagram(src, vip, sport, 9001, 64);
            let id = (n & 0xffff) as u16;
            vec![
                testkit::ipv4_raw(src, vip, 17, id, (0, true), &dgram[..32]),
                testkit::ipv4_raw(src, vip, 17, id, (4, false), &dgram[32..]),
            ]
        }
    }
}

/// The MAC address of `ifname` in namespace `n`.
fn mac(env: &Env, n: &str, ifname: &str) -> [u8; 6] {
    let v: Value = serde_json::from_str(&env.ip(n, &["-j", "link", "show", ifname])).expect("json");
    let s = v[0]["address"].as_str().expect("address");
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_spoofed_flood_never_breaks_established_connections() {
    if !root_or_skip(
        "a_spoofed_flood_never_breaks_established_connections",
        NEEDS,
    ) {
        return;
    }
    let mut env = Env::up("fl", "two-armed", 1);
    env.control_args = vec!["--return-path", "routed"];
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    let shm = env.dir.join("shm");
    let args = [
        "run",
        "--interface",
        "g0",
        "--interface",
        "g1",
        "--shm-dir",
        shm.to_str().expect("utf-8"),
        "--cores",
        "0",
        "--queues",
        "1",
        "--metrics",
        "127.0.0.1:10257",
        "--flows",
        "1024",
        "--exit-after-s",
        "120",
    ];
    let cmd = env.in_ns("gw", &gateway_bin(), &args);
    let gw_pid = env.spawn("gateway", cmd, true);
    env.wait_healthy();
    // The Service has its endpoints once an HTTP request gets through.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = env.peer("cli", &["http", VIP, "80", "1"]);
        if v["errors"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "web:80 never answered: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = env.metrics();
    let capacity = env.metric(&m, "clustergate_conntrack_capacity") as u32;
    assert!(capacity >= 1024, "capacity {capacity}:\n{m}");

    // Established connections: a byte-checked stream, and 40 held
    // connections making a round trip each every 0.1 s.
    let stream = Stream::start(&mut env, "9000", 14, 2048);
    let stop = env.dir.join("stop-hold");
    let mut cmd = env.in_ns("cli", Path::new("python3"), &[]);
    cmd.arg(e2e_dir().join("flood.py")).args([
        "hold",
        VIP,
        "9000",
        "40",
        stop.to_str().expect("utf-8"),
        "60",
    ]);
    env.spawn("hold", cmd, true);
    let mut hold = BufReader::new(env.child("hold").stdout.take().expect("stdout"));
    let mut line = String::new();
    hold.read_line(&mut line).expect("hold");
    let held: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(held["held"], 40, "{held}\n{}", env.log("hold"));
    std::thread::sleep(Duration::from_secs(1));
    let before = env.metrics();
    let rss_before = rss_kib(gw_pid);

    // The flood: ten times the capacity in new flows, on the client's link
    // to the gateway's MAC, at most 20 000 frames a second.
    let (gw_mac, cli_mac) = (mac(&env, "gw", "g0"), mac(&env, "cli", "c0"));
    let vip = a(VIP);
    let flows = 10 * capacity;
    let path = env.dir.join("flood.bin");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("flood file"));
    let mut frames = 0u64;
    for n in 0..flows {
        for mut f in flood_frames(n, vip) {
            f[..6].copy_from_slice(&gw_mac);
            f[6..12].copy_from_slice(&cli_mac);
            file.write_all(&(f.len() as u16).to_be_bytes())
                .expect("write");
            file.write_all(&f).expect("write");
            frames += 1;
        }
    }
    file.flush().expect("flush");
    drop(file);
    let sent = env
        .in_ns("cli", Path::new("python3"), &[])
        .arg(e2e_dir().join("flood.py"))
        .args(["send", "c0", path.to_str().expect("utf-8"), "20000", "30"])
        .output()
        .expect("flood.py send");
    let text = String::from_utf8_lossy(&sent.stdout);
    let sent: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("flood.py send: {e}: {text:?} {:?}", sent.stderr));
    assert_eq!(sent["sent"].as_u64(), Some(frames), "{sent}");

    // After the flood: one more round trip on every held connection.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&stop, b"").expect("stop file");
    line.clear();
    hold.read_line(&mut line).expect("hold result");
    let trips: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let after = env.metrics();
    let rss_after = rss_kib(gw_pid);
    let stream = stream.finish(100_000);

    let rounds = trips["rounds"].as_u64().unwrap_or(0);
    assert_eq!(trips["failed"], 0, "held connections broke: {trips}");
    assert_eq!(trips["ok"].as_u64(), Some(40 * rounds), "{trips}");
    assert!(rounds >= 10, "round trips ran through the flood: {trips}");

    let grew = |name: &str, label: &str| {
        env.metric_where(&after, name, label) - env.metric_where(&before, name, label)
    };
    let evicted = |class: &str| {
        grew(
            "clustergate_conntrack_evictions_total{",
            &format!("class=\"{class}\""),
        )
    };
    let entries = env.metric(&after, "clustergate_conntrack_entries");
    let processed = grew("clustergate_packets_total{", "verdict=\"forward\"")
        + grew("clustergate_packets_total{", "verdict=\"drop\"");
    eprintln!(
        "flood: {flows} new flows in {frames} frames ({}s); table capacity {capacity}, \
         {entries} entries after; evicted tcp_syn {} tcp_midstream {} tcp_closing {} udp {}; \
         refused {}; frames the gateway decided on {processed}; held connections: {rounds} \
         rounds, {} round trips, 0 failed; stream {} bytes echoed; gateway RSS {rss_before} → \
         {rss_after} KiB",
        sent["secs"],
        evicted("tcp_syn"),
        evicted("tcp_midstream"),
        evicted("tcp_closing"),
        evicted("udp"),
        grew("clustergate_conntrack_refused_total", ""),
        trips["ok"],
        stream["received"],
    );
    for class in ["tcp_syn", "tcp_midstream", "udp"] {
        assert!(evicted(class) > 0.0, "no {class} evicted:\n{after}");
    }
    assert!(
        entries <= f64::from(capacity),
        "{entries} entries > capacity {capacity}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "gateway RSS grew from {rss_before} to {rss_after} KiB"
    );
}
