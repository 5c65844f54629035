//! `clustergate-bench compare --quick` end to end: its own topology, the
//! three dataplanes one after another, rate-limited traffic, and every sink
//! check. Asserts correctness only, never speed: every frame that reached a
//! backend was rewritten to that backend with its source preserved and valid
//! checksums, arrived once and in order within its flow, and every backend
//! got a share of the flows. Then the topology is gone.
//!
//! Root only; CI runs as root, so there a missing root fails instead of
//! skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

/// `clustergate` and `clustergate-control`, built next to this package's
/// binary (the workspace's test command builds them; a run of this package
/// alone builds them here).
fn bin_dir() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_clustergate-bench"));
    let dir = bench.parent().expect("binary directory").to_path_buf();
    for (pkg, bin) in [
        ("clustergate-dataplane", "clustergate"),
        ("clustergate-control", "clustergate-control"),
    ] {
        if !dir.join(bin).exists() {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", pkg, "--bin", bin]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().expect("cargo build").success(),
                "building {bin}"
            );
        }
    }
    dir
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn quick_compare_checks_every_frame_on_all_three_dataplanes() {
    if !support::root_or_skip(
        "quick_compare_checks_every_frame_on_all_three_dataplanes",
        "network namespaces, XDP, AF_XDP, nftables",
    ) {
        return;
    }
    // UDP through all three; then TCP (a SYN per flow, then ACKs) through
    // the two AF_XDP dataplanes (the kernel's conntrack refuses one-way TCP,
    // and compare says so).
    check_run("udp", &["clustergate", "kernel", "bounce"]);
    check_run("tcp", &["clustergate", "bounce"]);
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
            rep["bad"].as_object().unwrap().len() >= 6,
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
    assert!(stdout.contains("| clustergate |"), "{stdout}");
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("clustergate"),
        "chart"
    );
    let _ = std::fs::remove_dir_all(&out);
}
