//! `clustergate replay` end to end: a snapshot and a pcap in, rewritten
//! frames and one verdict line per packet out, from the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clustergate_builder::snapshot;
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("clustergate-replay-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, f: Tcp) -> Vec<u8> {
    testkit::client_frame(a(src), sport, a(dst), dport, L4Spec::Tcp(f), b"")
}

/// Writes `frames` to a pcap, one second apart from 1 700 000 000 s.
fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) {
    let mut w = PcapWriter::new(File::create(path).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_secs(1_700_000_000 + i as u64);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

/// Every packet of a pcap, with its timestamp.
fn read_pcap(path: &std::path::Path) -> Vec<(Duration, Vec<u8>)> {
    let mut r = PcapReader::new(File::open(path).unwrap()).unwrap();
    let mut got = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        got.push((p.timestamp, p.data.to_vec()));
    }
    got
}

/// `clustergate replay` of `pcap` with `snap` into `dir/out.pcap` and
/// `dir/verdicts.txt`, with `extra` flags.
fn replay(
    dir: &std::path::Path,
    snap: &std::path::Path,
    pcap: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clustergate"))
        .args(["replay", "--snapshot"])
        .arg(snap)
        .arg("--pcap")
        .arg(pcap)
        .arg("--out")
        .arg(dir.join("out.pcap"))
        .arg("--verdicts")
        .arg(dir.join("verdicts.txt"))
        .args(extra)
        .output()
        .unwrap()
}

/// The lines of `dir/verdicts.txt`.
fn verdict_lines(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("verdicts.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn replay_tells_what_the_gateway_would_do() {
    let dir = TempDir::new("basic");
    let table = Table::build(
        7,
        0,
        &[
            ServiceSpec::cluster_ip(
                "198.19.0.10".parse().unwrap(),
                80,
                Proto::Tcp,
                vec![BackendSpec::ready("198.18.1.1".parse().unwrap(), 8080)],
            ),
            ServiceSpec::cluster_ip("198.19.0.12".parse().unwrap(), 80, Proto::Tcp, vec![]),
        ],
    )
    .unwrap();
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, snapshot::encode(&table)).unwrap();

    // 1 SYN → forward; 2 SYN-ACK from the backend → forward to the client;
    // 3 ARP → pass; 4 SYN to a service without endpoints → reject;
    // 5 a frame cut inside the IPv4 header → drop.
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&testkit::CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0u8; 20]);
        f
    };
    let frames = [
        tcp("198.18.0.1", 40000, "198.19.0.10", 80, Tcp::syn(100)),
        tcp(
            "198.18.1.1",
            8080,
            "198.18.0.1",
            40000,
            Tcp {
                syn: true,
                ack: Some(101),
                seq: 9,
                ..Tcp::default()
            },
        ),
        arp,
        tcp("198.18.0.1", 40001, "198.19.0.12", 80, Tcp::syn(5)),
        tcp("198.18.0.1", 40002, "198.19.0.10", 80, Tcp::syn(5))[..20].to_vec(),
    ];
    let pcap = dir.0.join("in.pcap");
    write_pcap(&pcap, &frames);
    let run = replay(&dir.0, &snap, &pcap, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "replay failed: {stderr}");
    assert!(
        stderr.contains("5 packets: 2 forward, 1 reject, 1 pass, 1 drop; 3 written"),
        "{stderr}"
    );
    assert!(stderr.contains("generation 7"), "{stderr}");

    assert_eq!(
        verdict_lines(&dir.0),
        [
            "1 forward to=198.18.1.1 side=backend len=54",
            "2 forward to=198.18.0.1 side=client len=54",
            "3 pass",
            "4 reject len=54",
            "5 drop reason=ipv4_malformed",
        ]
    );

    let got = read_pcap(&dir.0.join("out.pcap"));
    assert_eq!(got.len(), 3);
    // Timestamps carried over from the input.
    assert_eq!(got[0].0, Duration::from_secs(1_700_000_000));
    assert_eq!(got[2].0, Duration::from_secs(1_700_000_003));
    let view = |f: &[u8]| {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4")
        };
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        let h = ip.header().to_header();
        assert_eq!(ip.header().header_checksum(), h.calc_header_checksum());
        assert_eq!(
            t.checksum(),
            t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
        );
        (
            ip.header().destination_addr().to_string(),
            t.destination_port(),
            ip.header().source_addr().to_string(),
            t.source_port(),
            t.rst(),
        )
    };
    assert_eq!(
        view(&got[0].1),
        ("198.18.1.1".into(), 8080, "198.18.0.1".into(), 40000, false)
    );
    assert_eq!(
        view(&got[1].1),
        ("198.18.0.1".into(), 40000, "198.19.0.10".into(), 80, false)
    );
    assert_eq!(
        view(&got[2].1),
        ("198.18.0.1".into(), 40001, "198.19.0.12".into(), 80, true)
    );
}

#[test]
fn replay_refuses_bad_inputs_with_clear_errors() {
    let dir = TempDir::new("bad");
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, b"not a snapshot").unwrap();
    let pcap = dir.0.join("in.pcap");
    std::fs::write(&pcap, b"not a pcap either").unwrap();
    let run = |snap: &PathBuf, pcap: &PathBuf| {
        Command::new(env!("CARGO_BIN_EXE_clustergate"))
            .args(["replay", "--snapshot"])
            .arg(snap)
            .arg("--pcap")
            .arg(pcap)
            .arg("--out")
            .arg(dir.0.join("out.pcap"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let o = run(&snap, &pcap);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("table.snap"), "the error names the file: {e}");

    let good = Table::build(1, 0, &[]).unwrap();
    std::fs::write(&snap, snapshot::encode(&good)).unwrap();
    let o = run(&snap, &pcap);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("in.pcap"), "the error names the pcap: {e}");
}

#[test]
fn replay_takes_and_checks_the_return_path_flags() {
    let dir = TempDir::new("flags");
    let table = Table::build(
        3,
        0,
        &[ServiceSpec::cluster_ip(
            "198.19.0.10".parse().unwrap(),
            80,
            Proto::Tcp,
            vec![BackendSpec::ready("198.18.1.1".parse().unwrap(), 8080)],
        )],
    )
    .unwrap();
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, snapshot::encode(&table)).unwrap();
    let pcap = dir.0.join("in.pcap");
    {
        let syn = tcp("198.18.0.1", 40000, "198.19.0.10", 80, Tcp::syn(1));
        let mut w = PcapWriter::new(File::create(&pcap).unwrap()).unwrap();
        w.write_packet(&PcapPacket::new(
            Duration::from_secs(1_700_000_000),
            syn.len() as u32,
            &syn,
        ))
        .unwrap();
    }
    let run = |flags: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_clustergate"))
            .args(["replay", "--snapshot"])
            .arg(&snap)
            .arg("--pcap")
            .arg(&pcap)
            .arg("--out")
            .arg(dir.0.join("out.pcap"))
            .args(flags)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let flags = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // Accepted: a routed frontend forwards as without them.
    let o = run(&flags(&[
        "--snat-address",
        "198.18.0.100",
        "--snat-address",
        "2001:2::100",
        "--snat-ports",
        "20000-20999",
        "--encap-mtu",
        "1400",
    ]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("1 packets: 1 forward"), "{e}");

    let seventeen: Vec<String> = (1..=17)
        .flat_map(|i| ["--snat-address".to_owned(), format!("198.18.0.{i}")])
        .collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (flags(&["--snat-ports", "0-10"]), "port 0"),
        (flags(&["--snat-ports", "20-10"]), "backwards"),
        (
            flags(&["--snat-ports", "1024-70000"]),
            "\"70000\" is not a port",
        ),
        (flags(&["--snat-address", "224.0.0.1"]), "multicast"),
        (flags(&["--snat-address", "0.0.0.0"]), "unspecified"),
        (
            flags(&["--snat-address", "::ffff:198.18.0.1"]),
            "IPv4-mapped",
        ),
        (
            flags(&["--snat-address", "198.18.0"]),
            "not an IPv4 or IPv6",
        ),
        (seventeen, "more than 16 IPv4"),
        (
            flags(&["--snat-address", "2001:2::1", "--snat-address", "2001:2::1"]),
            "given twice",
        ),
        (flags(&["--encap-mtu", "100"]), "--encap-mtu"),
        (flags(&["--encap-mtu", "9217"]), "576..=9216"),
    ];
    for (f, needle) in cases {
        let o = run(&f);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{f:?} succeeded");
        assert!(e.contains(needle), "{f:?}: {e:?} does not say {needle:?}");
    }
}

/// `replay --snat-address --snat-ports` honours each frontend's return path:
/// a source-NATed SYN leaves from the given address and the range's one
/// port, the backend's answer to that address and port comes back to the
/// client from the VIP, a second flow finds the range used up, and a DSR
/// frontend's SYN is encapsulated from the same address.
#[test]
fn replay_honours_the_return_paths() {
    use clustergate_dataplane::table::ReturnPath;
    let dir = TempDir::new("paths");
    let backend = || vec![BackendSpec::ready("198.18.1.1".parse().unwrap(), 8080)];
    let table = Table::build(
        4,
        0,
        &[
            ServiceSpec::cluster_ip("198.19.0.10".parse().unwrap(), 80, Proto::Tcp, backend())
                .with_return_path(ReturnPath::Snat),
            ServiceSpec::cluster_ip("198.19.0.11".parse().unwrap(), 80, Proto::Tcp, backend())
                .with_return_path(ReturnPath::Dsr),
        ],
    )
    .unwrap();
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, snapshot::encode(&table)).unwrap();
    let synack = Tcp {
        syn: true,
        ack: Some(2),
        seq: 9,
        ..Tcp::default()
    };
    let frames = [
        tcp("198.18.0.1", 40000, "198.19.0.10", 80, Tcp::syn(1)),
        tcp("198.18.1.1", 8080, "198.18.0.100", 20000, synack),
        tcp("198.18.0.1", 40001, "198.19.0.10", 80, Tcp::syn(1)),
        tcp("198.18.0.1", 40002, "198.19.0.11", 80, Tcp::syn(1)),
    ];
    let pcap = dir.0.join("in.pcap");
    write_pcap(&pcap, &frames);
    let run = replay(
        &dir.0,
        &snap,
        &pcap,
        &[
            "--snat-address",
            "198.18.0.100",
            "--snat-ports",
            "20000-20000",
        ],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "replay failed: {stderr}");
    assert_eq!(
        verdict_lines(&dir.0),
        [
            "1 forward to=198.18.1.1 side=backend len=54",
            "2 forward to=198.18.0.1 side=client len=54",
            "3 drop reason=snat_ports_exhausted",
            "4 forward to=198.18.1.1 side=backend len=74",
        ]
    );
    let got: Vec<testkit::Wire> = read_pcap(&dir.0.join("out.pcap"))
        .iter()
        .map(|(_, f)| testkit::wire(f))
        .collect();
    assert_eq!(got.len(), 3);
    let t = |w: &testkit::Wire| (w.src, w.sport, w.dst, w.dport);
    assert_eq!(
        t(&got[0]),
        (a("198.18.0.100"), 20000, a("198.18.1.1"), 8080)
    );
    assert_eq!(t(&got[1]), (a("198.19.0.10"), 80, a("198.18.0.1"), 40000));
    assert_eq!(t(&got[2]), (a("198.18.0.1"), 40002, a("198.19.0.11"), 80));
    assert_eq!(
        got[2].outer,
        Some((a("198.18.0.100"), a("198.18.1.1"), 64)),
        "DSR: encapsulated from the SNAT address to the backend"
    );
}

/// A snapshot with every kind of frontend: Service "web" (one backend) on its
/// cluster IP, node port 30080, an external IP and a load-balancer IP with
/// source ranges; Service "local" (`internalTrafficPolicy: Local`, one
/// backend on node 1, one on node 2). Node-port addresses 198.18.0.0/24.
fn every_kind_table() -> Table {
    use clustergate_builder::table::TableSpec;
    use clustergate_dataplane::table::FrontendKind;
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let net = |s: &str| -> ipnet::IpNet { s.parse().unwrap() };
    let web = ServiceSpec::cluster_ip(
        ip("198.19.0.10"),
        80,
        Proto::Tcp,
        vec![BackendSpec::ready(ip("198.18.64.21"), 8080)],
    );
    let mut node_port = web.clone().with_kind(FrontendKind::NodePort, ip("0.0.0.0"));
    node_port.port = 30080;
    let mut lb = web
        .clone()
        .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.1"));
    lb.source_ranges = Some(vec![net("198.18.100.0/24")]);
    let mut local = ServiceSpec::cluster_ip(
        ip("198.19.0.20"),
        80,
        Proto::Tcp,
        vec![
            BackendSpec::ready(ip("198.18.64.31"), 8080).on_node(1),
            BackendSpec::ready(ip("198.18.65.32"), 8080).on_node(2),
        ],
    );
    local.node_local = true;
    let spec = TableSpec {
        services: vec![
            web.clone(),
            node_port,
            web.with_kind(FrontendKind::ExternalIp, ip("198.19.8.1")),
            lb,
            local,
        ],
        nodes: vec![
            (net("198.18.64.0/24"), 1),
            (net("198.18.0.11/32"), 1),
            (net("198.18.65.0/24"), 2),
        ],
        node_port_addresses: vec![net("198.18.0.0/24")],
        policy: Default::default(),
    };
    Table::build_full(
        11,
        0,
        &spec,
        clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE,
    )
    .unwrap()
}

/// Every way into a Service through the binary: node port (and its reply),
/// load-balancer IP with source ranges, external IP, cluster IP, and a
/// node-local Service; `--nodeport-addresses` narrows which addresses are
/// the node's, and a bad CIDR is refused naming it.
#[test]
fn replay_serves_every_kind_of_frontend() {
    let dir = TempDir::new("kinds");
    let snap = dir.0.join("table.snap");
    std::fs::write(&snap, snapshot::encode(&every_kind_table())).unwrap();
    let synack = Tcp {
        syn: true,
        ack: Some(101),
        seq: 9,
        ..Tcp::default()
    };
    let frames = [
        tcp("198.18.200.1", 40000, "198.18.0.11", 30080, Tcp::syn(100)),
        tcp("198.18.64.21", 8080, "198.18.200.1", 40000, synack),
        tcp("198.18.200.1", 40001, "198.19.9.1", 80, Tcp::syn(100)),
        tcp("198.18.100.7", 40002, "198.19.9.1", 80, Tcp::syn(100)),
        tcp("198.18.200.1", 40003, "198.19.8.1", 80, Tcp::syn(100)),
        tcp("198.18.200.1", 40004, "198.19.0.10", 80, Tcp::syn(100)),
        tcp("198.18.65.9", 40005, "198.19.0.20", 80, Tcp::syn(100)),
        tcp("198.18.0.11", 40006, "198.19.0.20", 80, Tcp::syn(100)),
        tcp("198.18.200.1", 40007, "198.19.0.20", 80, Tcp::syn(100)),
        tcp("198.18.200.1", 40008, "198.18.0.99", 30080, Tcp::syn(100)),
        tcp("198.18.200.1", 40009, "198.18.7.7", 30080, Tcp::syn(100)),
    ];
    let pcap = dir.0.join("in.pcap");
    write_pcap(&pcap, &frames);
    let common = [
        "1 forward to=198.18.64.21 side=backend len=54",
        "2 forward to=198.18.200.1 side=client len=54",
        "3 drop reason=source_range",
        "4 forward to=198.18.64.21 side=backend len=54",
        "5 forward to=198.18.64.21 side=backend len=54",
        "6 forward to=198.18.64.21 side=backend len=54",
        "7 forward to=198.18.65.32 side=backend len=54",
        "8 forward to=198.18.64.31 side=backend len=54",
        "9 drop reason=no_local_endpoint",
    ];

    // Without --nodeport-addresses: every address in 198.18.0.0/24 is the
    // node's, 198.18.0.99 included; 198.18.7.7 is outside.
    let run = replay(&dir.0, &snap, &pcap, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "replay failed: {stderr}");
    let mut want: Vec<String> = common.iter().map(|s| (*s).to_owned()).collect();
    want.push("10 forward to=198.18.64.21 side=backend len=54".into());
    want.push("11 pass".into());
    assert_eq!(verdict_lines(&dir.0), want);
    assert!(
        stderr.contains("11 packets: 8 forward, 0 reject, 1 pass, 2 drop; 8 written"),
        "{stderr}"
    );
    let got = read_pcap(&dir.0.join("out.pcap"));
    assert_eq!(got.len(), 8);
    let w = |f: &[u8]| {
        let w = testkit::wire(f); // every checksum verified
        (w.src, w.sport, w.dst, w.dport)
    };
    assert_eq!(
        w(&got[0].1),
        (a("198.18.200.1"), 40000, a("198.18.64.21"), 8080),
        "the node port's SYN reaches the backend"
    );
    assert_eq!(
        w(&got[1].1),
        (a("198.18.0.11"), 30080, a("198.18.200.1"), 40000),
        "the reply comes from the node port"
    );
    assert_eq!(
        w(&got[5].1),
        (a("198.18.65.9"), 40005, a("198.18.65.32"), 8080),
        "node 2's client reaches node 2's backend"
    );

    // With it: only 198.18.0.11 is the node's.
    let run = replay(
        &dir.0,
        &snap,
        &pcap,
        &["--nodeport-addresses", "198.18.0.11/32,2001:2::11/128"],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "replay failed: {stderr}");
    let mut want: Vec<String> = common.iter().map(|s| (*s).to_owned()).collect();
    want.push("10 pass".into());
    want.push("11 pass".into());
    assert_eq!(verdict_lines(&dir.0), want);

    // A bad CIDR: a clear error naming it.
    for bad in ["198.18.0.0/33", "198.18.0.11/32,node"] {
        let run = replay(&dir.0, &snap, &pcap, &["--nodeport-addresses", bad]);
        assert!(!run.status.success());
        let stderr = String::from_utf8_lossy(&run.stderr);
        let value = bad.rsplit(',').next().unwrap();
        assert!(
            stderr.contains("--nodeport-addresses")
                && stderr.contains(&format!("{value:?} is not a CIDR")),
            "{stderr}"
        );
    }
}
