//! `clustergate-bench compare --quick` end to end: its own topology, every
//! dataplane one after another (clustergate with each return path, snat,
//! routed and dsr; the kernel's nftables DNAT with and without kube-proxy's
//! masquerade; bounce), rate-limited traffic, and every sink check. Asserts
//! correctness only, never speed: every frame that reached a backend was
//! what its return path promises (rewritten to that backend with the flow's
//! source; or with the gateway's source and a SNAT port in range, the same
//! for every frame of the flow and no other flow's; or IP-in-IP from the
//! gateway around the client's packet, TTL one lower) with valid checksums,
//! arrived once and in order within its flow, and every backend got a share
//! of the flows. Then the topology is gone.
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

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

const ALL: [&str; 6] = [
    "clustergate-snat",
    "kernel-masq",
    "clustergate-routed",
    "kernel",
    "clustergate-dsr",
    "bounce",
];

#[test]
fn quick_compare_checks_every_frame_on_every_dataplane() {
    if !support::root_or_skip(
        "quick_compare_checks_every_frame_on_every_dataplane",
        "network namespaces, XDP, AF_XDP, nftables",
    ) {
        return;
    }
    // UDP through all six; then TCP (a SYN per flow, then ACKs) through
    // clustergate's source NAT and DSR (the kernel's conntrack refuses
    // one-way TCP, and compare says so; routed TCP rewrites as routed UDP).
    let t = std::time::Instant::now();
    check_run("udp", &ALL);
    check_run("tcp", &["clustergate-snat", "clustergate-dsr"]);
    eprintln!(
        "compare --quick, UDP and TCP: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn check_run(proto: &str, dataplanes: &[&str]) {
    let out = std::env::temp_dir().join(format!("cgb-quick-{proto}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_clustergate-bench"))
        .args(["compare", "--quick", "--prefix", "cgbq", "--backends", "3"])
        .args(["--services", "3", "--flows", "600", "--proto", proto])
        .args(["--dataplanes", &dataplanes.join(",")])
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
        "{proto}: compare failed ({}):\n{stderr}\n{stdout}",
        run.status
    );
    for ns in ["cgbq-cli", "cgbq-gw", "cgbq-lan", "cgbq-b1"] {
        assert!(!netns_exists(ns), "{ns} left behind");
    }

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let runs = report["scenarios"][0]["runs"].as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["dataplane"].as_str().unwrap())
        .collect();
    assert_eq!(names, dataplanes);
    for r in runs {
        let name = r["dataplane"].as_str().unwrap();
        let rep = &r["reps"][0];
        let (sent, received) = (
            rep["sent"].as_u64().unwrap(),
            rep["received"].as_u64().unwrap(),
        );
        assert!(sent >= 5_000, "{proto} {name}: only {sent} frames sent");
        assert!(
            received <= sent,
            "{proto} {name}: {received} of {sent} received"
        );
        // 20 kpps is far below what any of them forwards: nothing should be
        // lost (a little slack for a sink descheduled on a busy machine).
        assert!(
            received as f64 >= sent as f64 * 0.95,
            "{proto} {name}: only {received} of {sent} frames arrived"
        );
        for (check, n) in rep["bad"].as_object().unwrap() {
            assert_eq!(
                n.as_u64(),
                Some(0),
                "{proto} {name}: {n} frames failed the {check} check"
            );
        }
        assert!(
            rep["bad"].as_object().unwrap().len() >= 16,
            "{proto} {name}: the sinks reported too few checks: {}",
            rep["bad"]
        );
        assert_eq!(
            rep["duplicates"].as_u64(),
            Some(0),
            "{proto} {name}: duplicates"
        );
        assert_eq!(
            rep["reordered"].as_u64(),
            Some(0),
            "{proto} {name}: reordered within a flow"
        );
        let per: Vec<u64> = rep["per_backend"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(per.len(), 3, "{proto} {name}: {per:?}");
        assert!(
            per.iter().all(|&n| n > 0),
            "{proto} {name}: a backend got nothing: {per:?}"
        );
    }
    for d in dataplanes {
        assert!(stdout.contains(&format!("| {d} |")), "{d}: {stdout}");
    }
    // Each clustergate return path has its ratios to its own baseline.
    let ratios = report["scenarios"][0]["ratios"].as_array().unwrap();
    for r in ratios {
        let (d, b) = (
            r["dataplane"].as_str().unwrap(),
            r["baseline"].as_str().unwrap(),
        );
        let want = if d == "clustergate-snat" {
            "kernel-masq"
        } else {
            "kernel"
        };
        assert_eq!(b, want, "{d}");
        if dataplanes.contains(&want) {
            assert!(r["pps_over_baseline"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    assert_eq!(
        ratios.len(),
        dataplanes
            .iter()
            .filter(|d| d.starts_with("clustergate"))
            .count()
    );
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("clustergate"),
        "chart"
    );
    let _ = std::fs::remove_dir_all(&out);
}
