//! End to end: a served interface disappears under a running gateway.
//!
//! The gateway says so once (not on every poll), `/healthz` answers 503
//! naming the interface while `/livez` stays 200, and when an interface of
//! that name returns the gateway detaches and exits with status 75, so that
//! its orchestrator restarts it; a new gateway then attaches to the new
//! interface and forwards again.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::time::{Duration, Instant};

use e2e::*;
use serde_json::Value;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

fn healthz(env: &Env) -> Value {
    env.peer("gw", &["get", "http://127.0.0.1:10257/healthz"])
}

#[test]
fn a_lost_interface_is_reported_once_and_its_return_restarts_the_gateway() {
    if !root_or_skip("lost_interface", NEEDS) {
        return;
    }
    let mut env = Env::up("li", "two-armed", 1);
    env.start_backends();
    env.write_manifest(&[1, 2]);
    env.start_control();
    env.start_gateway(&["g0", "g1"], "0", 1, &[]);
    env.wait_healthy();
    let v = env.peer("cli", &["http", VIP, "80", "20"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");

    // The client-side interface goes away (its peer c0 with it).
    env.ip("gw", &["link", "del", "g0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = healthz(&env);
        if v["status"] == 503 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still {v} 10 s after g0 was deleted\n{}",
            env.log("gateway")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let body: Value = serde_json::from_str(v["body"].as_str().unwrap_or("{}")).expect("json");
    let reason = body["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("g0") && reason.contains("disappeared"),
        "reason: {body}"
    );
    let v = env.peer("gw", &["get", "http://127.0.0.1:10257/livez"]);
    assert_eq!(v["status"], 200, "the process is well while it waits: {v}");

    // Several polls and next-hop refreshes later: one line about it, and
    // not the refresh's failure on every round.
    std::thread::sleep(Duration::from_secs(3));
    let log = env.log("gateway");
    assert_eq!(
        log.matches("disappeared").count(),
        1,
        "the loss is logged once:\n{log}"
    );
    assert_eq!(
        log.matches("reading routes and neighbours").count(),
        0,
        "no refresh failure per round:\n{log}"
    );
    assert!(
        env.child("gateway").try_wait().expect("wait").is_none(),
        "the gateway waits for the interface\n{log}"
    );

    // The interface returns (a new index): the gateway exits with 75.
    let (gw, cli) = (env.ns("gw"), env.ns("cli"));
    let st = std::process::Command::new("ip")
        .args(["link", "add", "g0", "netns", &gw, "type", "veth"])
        .args(["peer", "c0", "netns", &cli])
        .status()
        .expect("ip link add");
    assert!(st.success(), "re-creating g0");
    env.ip("gw", &["link", "set", "g0", "up"]);
    env.ip("cli", &["link", "set", "c0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = env.child("gateway").try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway still running 10 s after g0 returned\n{}",
            env.log("gateway")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = env.log("gateway");
    assert_eq!(status.code(), Some(75), "exit status\n{log}");
    assert!(log.contains("is back"), "{log}");
    assert!(!env.xdp_attached("gw", "g1"), "XDP left on g1\n{log}");

    // What the orchestrator does next: a new gateway attaches to the new g0.
    env.kill("gateway");
    for (ns, dev, addr) in [
        ("gw", "g0", "198.18.1.1/24"),
        ("cli", "c0", "198.18.1.2/24"),
    ] {
        env.ip(ns, &["addr", "add", addr, "dev", dev]);
    }
    env.ip(
        "cli",
        &["route", "replace", "198.18.100.0/24", "via", "198.18.1.1"],
    );
    for (ns, dev) in [(gw.as_str(), "g0"), (cli.as_str(), "c0")] {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ethtool", "-K", dev])
            .args([
                "rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ])
            .stdout(std::process::Stdio::null())
            .status();
    }
    env.start_gateway(&["g0", "g1"], "0", 1, &[]);
    env.wait_healthy();
    let v = env.peer("cli", &["http", VIP, "80", "20"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "after the restart: {v}\n{}",
        env.log("gateway")
    );
}
