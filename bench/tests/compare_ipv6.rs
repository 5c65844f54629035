//! `clustergate-bench compare --quick --family 6` end to end: the same as
//! `compare_quick.rs`, over IPv6 (2001:2::/48): clustergate with each
//! return path (SNAT to the gateway's IPv6 address given with
//! `--snat-address`, routed, DSR with IPv6-in-IPv6), the kernel's `ip6`
//! nftables DNAT with and without kube-proxy's masquerade, and bounce, with
//! rate-limited UDP. The sinks run with `--family 6`: they expect their own
//! IPv6 address as the destination (the outer one under DSR), so a frame
//! they count as ok is an IPv6 frame whose checksums, lengths and return
//! path fields all passed; an IPv4 frame would be counted as bad. Asserts
//! that every dataplane delivered such frames to every backend, with no
//! failed check, duplicate or reordering. Then the topology is gone.
//!
//! Root only; CI runs as root, so there a missing root fails instead of
//! skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use common::bin_dir;

const ALL: [&str; 6] = [
    "clustergate-snat",
    "kernel-masq",
    "clustergate-routed",
    "kernel",
    "clustergate-dsr",
    "bounce",
];

#[test]
fn ipv6_compare_checks_every_frame_on_every_dataplane() {
    if !support::root_or_skip(
        "ipv6_compare_checks_every_frame_on_every_dataplane",
        "network namespaces, XDP, AF_XDP, nftables",
    ) {
        return;
    }
    let t = std::time::Instant::now();
    let out = std::env::temp_dir().join(format!("cgb-quick6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_clustergate-bench"))
        .args(["compare", "--quick", "--family", "6", "--prefix", "cgbq6"])
        .args(["--backends", "3", "--services", "3", "--flows", "600"])
        .args(["--duration-s", "0.5", "--dataplanes", &ALL.join(",")])
        .arg("--out")
        .arg(&out)
        .arg("--bin-dir")
        .arg(bin_dir())
        .output()
        .expect("running clustergate-bench compare");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "compare --family 6 failed ({}):\n{stderr}\n{stdout}",
        run.status
    );
    for ns in ["cgbq6-cli", "cgbq6-gw", "cgbq6-lan", "cgbq6-b1"] {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "{ns} left behind"
        );
    }
    assert!(stdout.contains("IPv6 UDP traffic"), "{stdout}");

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(report["family"], "6");
    let sc = &report["scenarios"][0];
    assert_eq!(sc["scenario"]["frame_size"], 84, "IPv6's smallest frame");
    let runs = sc["runs"].as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["dataplane"].as_str().unwrap())
        .collect();
    assert_eq!(names, ALL);
    for r in runs {
        let name = r["dataplane"].as_str().unwrap();
        let rep = &r["reps"][0];
        let (sent, received) = (
            rep["sent"].as_u64().unwrap(),
            rep["received"].as_u64().unwrap(),
        );
        assert!(sent >= 2_500, "{name}: only {sent} frames sent");
        assert!(received <= sent, "{name}: {received} of {sent} received");
        assert!(
            received as f64 >= sent as f64 * 0.95,
            "{name}: only {received} of {sent} IPv6 frames arrived checked"
        );
        let bad = rep["bad"].as_object().unwrap();
        assert!(bad.len() >= 16, "{name}: too few checks: {bad:?}");
        for (check, n) in bad {
            assert_eq!(n.as_u64(), Some(0), "{name}: {n} frames failed {check}");
        }
        assert_eq!(rep["duplicates"].as_u64(), Some(0), "{name}: duplicates");
        assert_eq!(rep["reordered"].as_u64(), Some(0), "{name}: reordered");
        let per: Vec<u64> = rep["per_backend"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(per.len(), 3, "{name}: {per:?}");
        assert!(
            per.iter().all(|&n| n > 0),
            "{name}: a backend got no IPv6 frame: {per:?}"
        );
        assert!(stdout.contains(&format!("| {name} |")), "{name}: {stdout}");
    }
    let ratios = sc["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 3);
    for r in ratios {
        assert!(r["pps_over_baseline"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["pps_over_bounce"].as_f64().unwrap() > 0.0, "{r}");
    }
    let _ = std::fs::remove_dir_all(&out);
    eprintln!(
        "compare --quick --family 6: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
