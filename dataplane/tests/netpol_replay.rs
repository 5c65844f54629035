//! NetworkPolicy through the real binaries: `clustergate-control build`
//! compiles a manifest with Pods, Namespaces and NetworkPolicies into a
//! snapshot, and `clustergate replay` runs a capture through it. The
//! verdicts are the ones the policies call for: allowed clients reach the
//! Service, denied ones are dropped as `network_policy` (before any NAT),
//! and an ipBlock that admits a client to one backend only lets its flows
//! through when Maglev picks that backend.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clustergate_dataplane::flow::{addr16, Addr16};
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use pcap_file::pcap::{PcapPacket, PcapWriter};

// For `control_bin` (built next to `clustergate` when missing).
#[path = "support/e2e.rs"]
mod e2e;
use e2e::control_bin;

const VIP: &str = "198.19.0.10";

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().unwrap())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fixture control's tests use too.
fn manifest() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/tests/fixtures/netpol.yaml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut w = PcapWriter::new(File::create(path).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_secs(1_700_000_000 + i as u64);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

fn syn(src: &str, sport: u16) -> Vec<u8> {
    testkit::client_frame(a(src), sport, a(VIP), 80, L4Spec::Tcp(Tcp::syn(100)), b"")
}

#[test]
fn replay_applies_the_network_policies_control_compiled() {
    let dir = TempDir(std::env::temp_dir().join(format!("cg-netpol-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let yaml = dir.0.join("manifest.yaml");
    std::fs::write(&yaml, manifest()).unwrap();
    let snap = dir.0.join("table.snap");
    let out = Command::new(control_bin())
        .args(["build", "--manifest"])
        .arg(&yaml)
        .arg("--out")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "control build: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two flows of the allowed client, two of the denied one, then twenty
    // from outside the pods, inside the ipBlock that admits web-2 only.
    let mut frames = vec![
        syn("198.18.65.10", 40000),
        syn("198.18.65.10", 40001),
        syn("198.18.65.11", 40000),
        syn("198.18.65.11", 40001),
    ];
    for port in 41000..41020 {
        frames.push(syn("198.18.200.5", port));
    }
    let pcap = dir.0.join("in.pcap");
    write_pcap(&pcap, &frames);
    let run = Command::new(env!("CARGO_BIN_EXE_clustergate"))
        .args(["replay", "--snapshot"])
        .arg(&snap)
        .arg("--pcap")
        .arg(&pcap)
        .arg("--out")
        .arg(dir.0.join("out.pcap"))
        .arg("--verdicts")
        .arg(dir.0.join("verdicts.txt"))
        .args(["--snat-address", "198.18.0.1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "replay: {stderr}");
    let lines: Vec<String> = std::fs::read_to_string(dir.0.join("verdicts.txt"))
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_owned())
        .collect();
    for (i, l) in lines[..2].iter().enumerate() {
        assert!(
            l.starts_with("forward to=198.18.64.2") && l.contains("side=backend"),
            "allowed client, flow {i}: {l}"
        );
    }
    assert_eq!(lines[2], "drop reason=network_policy", "denied client");
    assert_eq!(lines[3], "drop reason=network_policy", "denied client");
    let outside = &lines[4..];
    let to_web2 = outside
        .iter()
        .filter(|l| l.starts_with("forward to=198.18.64.22 "))
        .count();
    let denied = outside
        .iter()
        .filter(|l| *l == "drop reason=network_policy")
        .count();
    assert_eq!(
        to_web2 + denied,
        outside.len(),
        "outside clients reach web-2 only: {outside:?}"
    );
    assert!(
        to_web2 > 0 && denied > 0,
        "Maglev spreads 20 flows over both backends, and only web-2's are let through: {outside:?}"
    );
}
