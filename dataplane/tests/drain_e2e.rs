//! End to end: graceful drain with kube-proxy's semantics, through
//! `clustergate-control` (following a manifest) and `clustergate run` in the
//! namespaces of tests/e2e/topology.sh (`docs/semantics.md`, "Draining").
//!
//! A long TCP stream (peer.py stream: a counter pattern, paced, echoed back
//! and checked byte for byte) runs on backend B. Mid-stream B's endpoint
//! turns `ready: false, serving: true, terminating: true`, as in a rolling
//! update: new connections all go to the other backends, and the stream goes
//! on. Then B's endpoint is removed altogether: the stream still completes,
//! with every byte and no reset (the gateway keeps the connection's backend,
//! and keeps steering its replies, as Linux conntrack keeps kube-proxy's
//! DNAT). Once for source NAT (control's default), once for `routed`.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::sync::Mutex;
use std::time::Duration;

use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;
use e2e::*;
use serde_json::Value;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

/// One gateway test at a time: they share the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long the stream sends (it then waits for the echo to catch up).
const STREAM_S: u32 = 10;
/// Bytes per send; the stream sleeps 1 ms after each.
const CHUNK: u32 = 4096;

/// [`manifest`] with backends 1..=3 and backend-`b`'s endpoint serving and
/// terminating, no longer ready.
fn manifest_terminating(env: &Env, b: u8) -> String {
    let text = manifest(&[1, 2, 3], env.return_path, env.http_port);
    let ready = format!("- addresses: [198.18.2.1{b}]\n  conditions: {{ready: true}}\n");
    assert!(text.contains(&ready), "the manifest lists backend-{b}");
    text.replace(
        &ready,
        &format!(
            "- addresses: [198.18.2.1{b}]\n  conditions: {{ready: false, serving: true, terminating: true}}\n"
        ),
    )
}

/// The weight of backend-`b` among web:9000's backends in the published
/// snapshot (`None`: not a backend).
fn stream_weight(env: &Env, b: u8) -> Option<u32> {
    let table = snapshot::load_current(&env.dir.join("shm"))
        .expect("snapshot")
        .expect("a published snapshot");
    let vip = addr16(VIP.parse().expect("vip"));
    let fi = table.frontend(&vip, 9000, Proto::Tcp).expect("web:9000");
    let fe = table.frontend_record(fi).expect("record");
    let addr = addr16(backend_addr(b, 4).parse().expect("backend address"));
    table
        .backends_of(fe)
        .iter()
        .find(|r| r.addr == addr)
        .map(|r| r.weight)
}

/// `n` HTTP connections through the VIP: all answered; per backend, how many.
fn new_connections(env: &Env, n: u64) -> std::collections::BTreeMap<String, u64> {
    let v = env.peer("cli", &["http", VIP, "80", &n.to_string()]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "HTTP errors: {v}"
    );
    let got = counts(&v);
    assert_eq!(got.values().sum::<u64>(), n, "{v}");
    got
}

fn drain(env: &mut Env) {
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    env.start_gateway(&["g0", "g1"], "0,1", 2, &[]);
    env.wait_healthy();
    assert_eq!(new_connections(env, 150).len(), 3, "every backend answers");

    let stream = Stream::start(env, "9000", STREAM_S, CHUNK);
    let b = stream.backend;
    let name = format!("backend-{b}");
    std::thread::sleep(Duration::from_millis(1500));
    let moved0 = env.metric(&env.metrics(), "clustergate_flows_moved_total");

    // B turns terminating (still serving): it drains.
    let g0 = env.generation();
    env.write_manifest_text(&manifest_terminating(env, b));
    let g1 = env.wait_generation_above(g0);
    assert_eq!(
        stream_weight(env, b),
        Some(0),
        "{name} is kept, with weight 0"
    );
    let shares = ring_shares(&env.dir.join("shm"));
    assert!(
        !shares.contains_key(&name),
        "{name} is draining, yet in the ring: {shares:?}"
    );
    let got = new_connections(env, 300);
    assert!(
        !got.contains_key(&name),
        "{name} is draining, yet took new connections: {got:?}"
    );
    assert_eq!(got.len(), 2, "the two others take them: {got:?}");

    // B is removed altogether.
    let others: Vec<u8> = [1, 2, 3].into_iter().filter(|x| *x != b).collect();
    env.write_manifest(&others);
    let _ = env.wait_generation_above(g1);
    assert_eq!(stream_weight(env, b), None, "{name} is gone from the table");
    std::thread::sleep(Duration::from_millis(500));
    let got = new_connections(env, 300);
    assert!(
        !got.contains_key(&name),
        "{name} is removed, yet took new connections: {got:?}"
    );

    // The stream ends on its own: every byte echoed, in order, no reset.
    let r: Value = stream.finish(3_000_000);
    eprintln!("drain: stream on {name}: {r}");
    assert!(
        env.log("gateway")
            .contains("steering: backends kept for their TCP connections"),
        "the gateway keeps steering the removed backend's replies:\n{}",
        env.log("gateway")
    );
    let m = env.metrics();
    assert_eq!(
        env.metric(&m, "clustergate_flows_moved_total"),
        moved0,
        "no TCP connection moved:\n{m}"
    );
}

#[test]
fn a_stream_outlives_its_backend_draining_then_leaving_with_source_nat() {
    if !root_or_skip(
        "a_stream_outlives_its_backend_draining_then_leaving_with_source_nat",
        NEEDS,
    ) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Control's default return path, source NAT, in a pod network.
    let mut env = Env::up("r", "two-armed pod-network", 2);
    drain(&mut env);
}

#[test]
fn a_stream_outlives_its_backend_draining_then_leaving_routed() {
    if !root_or_skip(
        "a_stream_outlives_its_backend_draining_then_leaving_routed",
        NEEDS,
    ) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The backends' default route is the gateway.
    let mut env = Env::up("s", "two-armed", 2);
    env.control_args = vec!["--return-path", "routed"];
    drain(&mut env);
}
