//! `clustergate-bench pipeline --json` as an operator runs it: the last line
//! of stdout is one JSON object with every figure, and a flag out of range is
//! refused with the flag and the value named.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::process::Command;

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clustergate-bench"))
}

#[test]
fn json_is_the_last_line_with_every_figure() {
    let out = bench()
        .args([
            "pipeline",
            "--flows",
            "2000",
            "--services",
            "10",
            "--runs",
            "1",
            "--json",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("no output");
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["flows"], 2000);
    assert_eq!(v["services"], 10);
    assert_eq!(v["runs"], 1);
    assert_eq!(v["threads"], 2);
    for k in [
        "random_read_ns",
        "baseline_ns",
        "established_ns",
        "new_flow_ns",
        "reply_ns",
        "mpps_total",
        "mpps_one_thread",
        "scaling",
    ] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
    }
    let ratio = v["mpps_total"].as_f64().unwrap() / v["mpps_one_thread"].as_f64().unwrap();
    assert!((v["scaling"].as_f64().unwrap() - ratio).abs() < 1e-9, "{v}");
    assert!(v["random_read_bytes"].as_u64().unwrap() >= 64 << 20, "{v}");
}

#[test]
fn json_without_threads_has_no_thread_fields() {
    let out = bench()
        .args([
            "pipeline",
            "--flows",
            "500",
            "--services",
            "3",
            "--runs",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(v["established_ns"].as_f64().unwrap() > 0.0);
    assert!(
        v.get("threads").is_none() && v.get("mpps_total").is_none(),
        "{v}"
    );
}

#[test]
fn bad_threads_is_refused_by_name() {
    for bad in ["0", "65", "two"] {
        let out = bench()
            .args(["pipeline", "--threads", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--threads") && stderr.contains(bad),
            "{bad}: {stderr}"
        );
    }
}
