//! `clustergate-bench update-latency` end to end, small: its own topology,
//! control on a few services, the gateway, the probes and the sink with its
//! SNAT checks. A burst through the scripted API server reports the
//! gateway's CPU per packet in the quiet window and in the burst, and their
//! ratio on the last line; one change at a time reports no ratio
//! (`cpu_ratio=-`). Asserts that the figures are there and finite, never
//! what they are: they are a benchmark's. Then the topology is gone.
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

/// The lock the end-to-end tests hold while their namespaces exist
/// (dataplane/tests/support/e2e.rs): runs from other checkouts wait.
fn e2e_lock() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/clustergate-e2e.lock")
        .expect("opening /tmp/clustergate-e2e.lock");
    f.lock().expect("flock /tmp/clustergate-e2e.lock");
    f
}

/// Runs update-latency with `flags`; its stdout's last line and its JSON.
fn update_latency(name: &str, flags: &[&str]) -> (String, Value) {
    let out = std::env::temp_dir().join(format!("cgb-ul-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_clustergate-bench"))
        .args(["update-latency", "--prefix", "cgbuq"])
        .args(flags)
        .arg("--out")
        .arg(&out)
        .arg("--bin-dir")
        .arg(bin_dir())
        .output()
        .expect("running clustergate-bench update-latency");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{name}: update-latency failed ({}):\n{}\n{stdout}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    for ns in ["cgbuq-cli", "cgbuq-gw", "cgbuq-lan", "cgbuq-b1", "cgbuq-b2"] {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "{name}: {ns} left behind"
        );
    }
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("update-latency.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    (last, json)
}

/// The value of `key=` on `line`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn a_burst_reports_the_gateways_cpu_per_packet_against_a_quiet_window() {
    if !support::root_or_skip(
        "a_burst_reports_the_gateways_cpu_per_packet_against_a_quiet_window",
        "network namespaces, XDP, AF_XDP",
    ) {
        return;
    }
    let _lock = e2e_lock();

    let (last, json) = update_latency(
        "burst",
        &[
            "--source",
            "api",
            "--services",
            "20",
            "--endpoints",
            "2",
            "--changes",
            "4",
            "--burst",
            "40",
        ],
    );
    assert!(
        last.starts_with(
            "update-latency: source=api services=20 endpoints=2 changes=4 burst=40 p50_ms="
        ),
        "{last}"
    );
    let fields: Vec<&str> = last
        .split(' ')
        .skip(1)
        .map(|f| f.split('=').next().unwrap_or_default())
        .collect();
    assert_eq!(
        fields,
        [
            "source",
            "services",
            "endpoints",
            "changes",
            "burst",
            "p50_ms",
            "p99_ms",
            "cpu_ratio"
        ],
        "{last}"
    );
    let r: f64 = field(&last, "cpu_ratio")
        .parse()
        .unwrap_or_else(|e| panic!("cpu_ratio in {last:?}: {e}"));
    assert!(r.is_finite() && r > 0.0, "{last}");
    assert_eq!(json["latencies_ms"].as_array().map(Vec::len), Some(4));
    assert!(json["frames_checked"].as_u64().unwrap() > 0, "{json}");
    let cpu = &json["cpu"];
    assert!(
        (cpu["cpu_ratio"].as_f64().unwrap() - r).abs() < 0.001,
        "{cpu}"
    );
    assert!(
        cpu["worker_cpu_ratio"].as_f64().is_some_and(f64::is_finite),
        "the worker threads were not found by name: {cpu}"
    );
    for w in ["quiet", "burst"] {
        let win = &cpu[w];
        assert!(win["packets"].as_u64().unwrap() > 0, "{w}: {cpu}");
        assert!(win["s"].as_f64().unwrap() >= 0.9, "{w}: {cpu}");
        for k in ["ns_per_packet", "worker_ns_per_packet"] {
            assert!(
                win[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
                "{w} {k}: {cpu}"
            );
        }
    }

    // One change at a time: no burst, no ratio.
    let (last, json) = update_latency(
        "sequential",
        &[
            "--source",
            "api",
            "--services",
            "20",
            "--endpoints",
            "2",
            "--changes",
            "2",
        ],
    );
    assert!(
        last.starts_with("update-latency: source=api services=20 endpoints=2 changes=2 burst=0 "),
        "{last}"
    );
    assert_eq!(field(&last, "cpu_ratio"), "-", "{last}");
    assert!(json["cpu"].is_null(), "{json}");
    assert_eq!(json["latencies_ms"].as_array().map(Vec::len), Some(2));
}
